"""onnxruntime on one reference case of scripts/arm_cases.py, one thread, RUNS times (run by an aarch64 Python
under qemu for `scripts/aarch64.sh count-models`: instructions per inference are the difference of two counts).

Usage: arm_ort_run.py CASE_DIR RUNS
"""
import os
import sys

import numpy as np
import onnxruntime as ort

d, runs = sys.argv[1], int(sys.argv[2])
model, feeds = None, {}
for line in open(os.path.join(d, "case.txt")):
    f = line.rstrip("\n").split("\t")
    if f[0] == "model":
        model = os.path.join(d, f[1])
    elif f[0] == "input":
        feeds[f[1]] = np.load(os.path.join(d, f[2]))
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.log_severity_level = 3
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
for _ in range(runs):
    sess.run(None, feeds)
