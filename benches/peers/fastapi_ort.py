#!/usr/bin/env python3
"""The peer service for `serve_load.py`: FastAPI + onnxruntime, the usual Python pattern for a model REST service,
answering the same KServe v2 JSON request on the same path as `edgepack serve` (one model, fp32, onnxruntime's CPU
execution provider with one intra-op thread per core).

Run: uvicorn --app-dir benches/peers fastapi_ort:app --port 8001   (MODEL=path/to/model.onnx)
"""
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

MODEL = os.environ.get("MODEL", os.path.join(os.path.dirname(__file__), "..", "..", "assets", "models",
                                             "efficientnet_lite0_fp32.onnx"))
so = ort.SessionOptions()
so.intra_op_num_threads = int(os.environ.get("ORT_THREADS", os.cpu_count() or 1))
session = ort.InferenceSession(MODEL, so, providers=["CPUExecutionProvider"])
app = FastAPI()
DTYPES = {"FP32": np.float32, "INT64": np.int64, "UINT8": np.uint8}


@app.get("/v2/health/ready")
def ready():
    return {"ready": True}


@app.post("/v2/models/{model}/infer")
async def infer(model: str, request: Request):
    body = await request.json()
    feeds = {}
    for t in body["inputs"]:
        feeds[t["name"]] = np.asarray(t["data"], dtype=DTYPES[t["datatype"]]).reshape(t["shape"])
    outs = await run_in_threadpool(session.run, None, feeds)  # off the event loop (onnxruntime drops the GIL)
    return JSONResponse({
        "model_name": model,
        "outputs": [{"name": o.name, "datatype": "FP32", "shape": list(v.shape), "data": v.ravel().tolist()}
                    for o, v in zip(session.get_outputs(), outs)],
    })
