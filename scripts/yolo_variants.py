"""Dynamic-axes variants of the shared static YOLOv8n export, built the way Ultralytics' `dynamic=True` export traces
its head, for the tests of models with symbolic input dims.

The shared `yolov8n-doclaynet.onnx` is a static, simplified export (opset 12, 1×3×1024×1024): its head reads the
anchor points and strides as constants of 21 504 columns and reshapes with constant shapes. An export with
`dynamic=True` instead computes them from the feature maps (Detect.make_anchors: Shape → Gather → Range → Add 0.5 →
Expand → Concat, `torch.full` as ConstantOfShape) and reshapes with shapes read through Shape, so one file takes any
batch and any size divisible by 32. This script rewrites the static head into that form (the weights are the same,
so at 1×3×1024×1024 both give the same outputs), sets the input to `images [batch, 3, height, width]`, upgrades to
opset 17 and, like the exporter, keeps value_info traced at one concrete shape (1×3×320×320 by default): those
traced shapes contradict any other input shape, which is what a loader must cope with (onnxruntime itself folds
Shape nodes from them and then runs such a file only at the traced shape; `--no-value-info` writes the variant it
runs at every shape, the reference for the others).

    python scripts/yolo_variants.py SHARED/models/yolov8n-doclaynet.onnx OUT.onnx [--trace 1,3,320,320] [--no-value-info]
"""
import argparse
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference, version_converter

STRIDES = (8, 16, 32)


class Builder:
    def __init__(self, prefix):
        self.nodes, self.inits, self.prefix, self.n = [], [], prefix, 0

    def name(self, what):
        self.n += 1
        return f"{self.prefix}/{what}_{self.n}"

    def const(self, value, dtype=np.int64):
        name = self.name("const")
        self.inits.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, **attrs):
        out = self.name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def rewrite_head(model):
    g = model.graph
    by_out = {n.output[0]: n for n in g.node}
    inits = {i.name: i for i in g.initializer}
    b = Builder("/dyn")

    # The three box-branch feature maps [b, 64, h, w] (cv2.k) in stride order: the anchors are made from them.
    feats = [f"/model.22/cv2.{k}/cv2.{k}.2/Conv_output_0" for k in range(3)]
    for f in feats:
        assert f in by_out, f"not the expected YOLOv8 head: {f} missing"
    points, strides = [], []
    zero_f, one_f = b.const(0.0, np.float32), b.const(1.0, np.float32)
    half = b.const(0.5, np.float32)
    for f, s in zip(feats, STRIDES):
        shp = b.op("Shape", [f])
        h = b.op("Gather", [shp, b.const(2)], axis=0)
        w = b.op("Gather", [shp, b.const(3)], axis=0)
        hf, wf = b.op("Cast", [h], to=TensorProto.FLOAT), b.op("Cast", [w], to=TensorProto.FLOAT)
        sx = b.op("Add", [b.op("Range", [zero_f, wf, one_f]), half])
        sy = b.op("Add", [b.op("Range", [zero_f, hf, one_f]), half])
        hw = b.op("Concat", [b.op("Unsqueeze", [h, b.const([0])]), b.op("Unsqueeze", [w, b.const([0])])], axis=0)
        gx = b.op("Expand", [b.op("Unsqueeze", [sx, b.const([0])]), hw])  # [h, w]: sx along rows
        gy = b.op("Expand", [b.op("Unsqueeze", [sy, b.const([1])]), hw])  # [h, w]: sy down columns
        xy = b.op("Concat", [b.op("Unsqueeze", [gx, b.const([-1])]), b.op("Unsqueeze", [gy, b.const([-1])])], axis=-1)
        points.append(b.op("Reshape", [xy, b.const([-1, 2])]))
        n = b.op("Unsqueeze", [b.op("Mul", [h, w]), b.const([0])])
        strides.append(b.op("ConstantOfShape", [n], value=numpy_helper.from_array(np.array([s], np.float32))))
    anchors = b.op("Unsqueeze", [b.op("Transpose", [b.op("Concat", points, axis=0)], perm=[1, 0]), b.const([0])])
    stride_row = b.op("Unsqueeze", [b.op("Concat", strides, axis=0), b.const([0])])

    def batch_of(x):
        return b.op("Slice", [b.op("Shape", [x]), b.const([0]), b.const([1])])

    # Reshapes with shapes read from the tensors (x.view(shape[0], no, -1), the DFL's view(b, 4, c1, a)).
    replace = {}
    for idx, n in enumerate(g.node):
        if not n.name.startswith("/model.22") or n.op_type != "Reshape":
            continue
        x, shape_name = n.input
        old = numpy_helper.to_array(inits[shape_name])
        if n.name == "/model.22/dfl/Reshape":  # [b, 64, A] → [b, 4, 16, A]
            a = b.op("Slice", [b.op("Shape", [x]), b.const([2]), b.const([3])])
            shape = b.op("Concat", [batch_of(x), b.const([4, 16]), a], axis=0)
        elif n.name == "/model.22/dfl/Reshape_1":  # [b, 1, 4, A] → [b, 4, A]
            a = b.op("Slice", [b.op("Shape", [x]), b.const([3]), b.const([4])])
            shape = b.op("Concat", [batch_of(x), b.const([4]), a], axis=0)
        else:  # [b, C, h, w] → [b, C, -1]
            shape = b.op("Concat", [batch_of(x), b.const(old[1:].tolist())], axis=0)
        replace[idx] = shape
    for idx, n in enumerate(g.node):
        if idx in replace:
            n.input[1] = replace[idx]
        for i, name in enumerate(n.input):
            if name in ("/model.22/Constant_12_output_0", "/model.22/Constant_13_output_0"):
                n.input[i] = anchors
            elif name == "/model.22/Constant_15_output_0":
                n.input[i] = stride_row

    # The new nodes are placed by a topological sort (stable: the original order wherever it is free to stay).
    nodes = list(g.node) + b.nodes
    known = {i.name for i in g.input} | {i.name for i in g.initializer} | {i.name for i in b.inits} | {""}
    ordered, pending = [], nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        assert len(rest) < len(pending), "cycle in the rewritten head"
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
    g.initializer.extend(b.inits)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def set_dims(value, dims):
    d = value.type.tensor_type.shape.dim
    for i, v in enumerate(dims):
        d[i].Clear()
        if isinstance(v, str):
            d[i].dim_param = v
        else:
            d[i].dim_value = v


def make(src, trace=(1, 3, 320, 320)):
    """The dynamic variant; `trace`: the input shape its value_info is traced at (None: no value_info)."""
    model = onnx.load(src)
    rewrite_head(model)
    set_dims(model.graph.input[0], ["batch", 3, "height", "width"])
    set_dims(model.graph.output[0], ["batch", 15, "anchors"])
    del model.graph.value_info[:]
    model = version_converter.convert_version(model, 17)
    del model.graph.value_info[:]
    for p in model.metadata_props:
        if p.key == "args":
            p.value = p.value.replace("'dynamic': False", "'dynamic': True").replace("'opset': 12", "'opset': 17")
            p.value = p.value.replace("'simplify': True", "'simplify': False")
    if trace:
        traced = onnx.ModelProto()
        traced.CopyFrom(model)
        set_dims(traced.graph.input[0], list(trace))
        traced = shape_inference.infer_shapes(traced, data_prop=True)
        model.graph.value_info.extend(traced.graph.value_info)
    onnx.checker.check_model(model)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--trace", default="1,3,320,320", help="the input shape value_info is traced at")
    ap.add_argument("--no-value-info", action="store_true", help="write no value_info (runs at any shape on onnxruntime)")
    a = ap.parse_args(argv)
    model = make(a.src, None if a.no_value_info else tuple(int(x) for x in a.trace.split(",")))
    onnx.save(model, a.out)
    print(f"wrote {a.out}: {len(model.graph.node)} nodes, {len(model.graph.value_info)} value_info, opset "
          f"{model.opset_import[0].version}")


if __name__ == "__main__":
    sys.exit(main())
