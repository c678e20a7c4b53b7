//! What the fuzz targets share: loading and running a model on both CPU backends, the panic policy, and the
//! structure-aware mutation of ONNX models (fields of the decoded protos, not bytes).

use edgepack_runtime::onnx::Model;
use edgepack_runtime::onnx::proto::{
    AttributeProto, ModelProto, NodeProto, TensorProto, TypeProto, tensor_shape_proto, type_proto,
};
use edgepack_runtime::{Device, Session, SessionOptions};

/// The most elements a fuzzed input may have: a run is a smoke test of the kernels, not a benchmark.
const MAX_INPUT_ELEMENTS: usize = 1 << 16;

/// Panics are bugs, with one exception: a dependency's panic (tract's, say) that the engine catches at its
/// boundary (`no_panic`) and returns as a typed error is the behaviour under test. libfuzzer-sys aborts on every
/// panic, caught or not; this hook aborts on the engine's own panics and lets a dependency's panic unwind to the
/// boundary that catches it. Whose panic it is: `panic_culprit`, the panic's location or else the innermost frame of
/// the backtrace outside the standard library.
pub fn contain_dependency_panics() {
    std::panic::set_hook(Box::new(|info| {
        // The panic's own location decides first (see `panic_culprit`): a dependency's panic unwinds without a
        // symbolized backtrace, which costs the instrumented build gigabytes (an OOM under the fuzzer's 3 GB limit
        // on a tract division by zero, RELIABILITY.md).
        let location = info.location().map(|l| l.file());
        if edgepack_runtime::panic_culprit(location, "", "fuzz/src/lib.rs")
            .is_some_and(edgepack_runtime::is_dependency_source)
        {
            return;
        }
        let trace = std::backtrace::Backtrace::force_capture().to_string();
        let culprit =
            edgepack_runtime::panic_culprit(info.location().map(|l| l.file()), &trace, "fuzz/src/lib.rs").unwrap_or("");
        if edgepack_runtime::is_dependency_source(culprit) {
            return;
        }
        eprintln!("{info}\npanicked in {culprit}\n{trace}");
        std::process::abort();
    }));
}

/// ONNX bytes as the model targets take them: decoded and checked, then [`load_and_run`].
pub fn fuzz_model_bytes(data: &[u8]) {
    if let Ok(model) = Model::from_bytes(data) {
        load_and_run(&model);
    }
}

/// Loads a model on the interpreter and on tract and runs it on small synthetic inputs; every failure must be a
/// typed error.
pub fn load_and_run(model: &Model) {
    for cpu in ["interp", "tract"] {
        // SAFETY: libFuzzer runs the target on one thread; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("EDGEPACK_CPU", cpu) };
        let opts = SessionOptions { device: Device::Cpu, threads: 1, ..Default::default() };
        let Ok(s) = Session::from_model(model, &opts) else { continue };
        let mut feeds = Vec::new();
        for (k, i) in s.inputs().iter().enumerate() {
            let shape = i.concrete_shape(1);
            let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if n.is_none_or(|n| n > MAX_INPUT_ELEMENTS) {
                return;
            }
            let Some(t) = i.synthetic(1, k as u64) else { return };
            feeds.push((i.name.clone(), t));
        }
        let _ = s.run(feeds);
    }
}

/// A small deterministic generator (xorshift) for the mutator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u32) -> Rng {
        Rng(u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }

    /// An integer from the values that break shape arithmetic most often.
    pub fn edge_int(&mut self, old: i64) -> i64 {
        const EDGES: &[i64] =
            &[0, 1, -1, 2, 3, 7, -2, 255, 256, 65_535, 1 << 31, -(1 << 31), 1 << 40, i64::MAX, i64::MIN];
        match self.below(4) {
            0 => EDGES[self.below(EDGES.len())],
            1 => old.wrapping_add(self.below(5) as i64 - 2),
            2 => old.wrapping_mul(if self.below(2) == 0 { 2 } else { -1 }),
            _ => self.next() as i64 >> self.below(64),
        }
    }

    fn edge_float(&mut self) -> f32 {
        const EDGES: &[f32] = &[0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
        EDGES[self.below(EDGES.len())]
    }
}

/// Op types a mutated node may become: the ones that compute shapes, allocate from data or carry subgraphs.
const OPS: &[&str] = &[
    "Add",
    "Conv",
    "ConvTranspose",
    "MatMul",
    "Gemm",
    "Reshape",
    "Transpose",
    "Concat",
    "Split",
    "Slice",
    "Gather",
    "Expand",
    "Tile",
    "Pad",
    "Resize",
    "ConstantOfShape",
    "Range",
    "Shape",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Softmax",
    "Cast",
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "Loop",
    "If",
    "Einsum",
    "TopK",
    "NonZero",
    "Where",
    "OneHot",
    "Identity",
];

fn mutate_attribute(a: &mut AttributeProto, rng: &mut Rng) {
    match rng.below(6) {
        0 => a.i = Some(rng.edge_int(a.i.unwrap_or(0))),
        1 if !a.ints.is_empty() => {
            let k = rng.below(a.ints.len());
            a.ints[k] = rng.edge_int(a.ints[k]);
        }
        2 => match rng.below(3) {
            0 => a.ints.push(rng.edge_int(1)),
            1 => {
                a.ints.pop();
            }
            _ => a.ints = vec![rng.edge_int(1); rng.below(9)],
        },
        3 => a.f = Some(rng.edge_float()),
        4 => a.r#type = Some(rng.below(16) as i32),
        _ => {
            if let Some(t) = a.t.as_mut() {
                mutate_tensor(t, rng);
            }
        }
    }
}

fn mutate_tensor(t: &mut TensorProto, rng: &mut Rng) {
    match rng.below(4) {
        0 if !t.dims.is_empty() => {
            let k = rng.below(t.dims.len());
            t.dims[k] = rng.edge_int(t.dims[k]);
        }
        1 => match rng.below(2) {
            0 => t.dims.push(rng.edge_int(1)),
            _ => {
                t.dims.pop();
            }
        },
        2 => t.data_type = Some(rng.below(17) as i32),
        _ => {
            if !t.raw_data.as_ref().is_none_or(|r| r.is_empty()) {
                let r = t.raw_data.as_mut().unwrap();
                let k = rng.below(r.len());
                r.truncate(k);
            }
        }
    }
}

fn mutate_type(ty: &mut TypeProto, rng: &mut Rng) {
    let Some(type_proto::Value::TensorType(t)) = ty.value.as_mut() else { return };
    match rng.below(3) {
        0 => t.elem_type = Some(rng.below(17) as i32),
        _ => {
            let shape = t.shape.get_or_insert_with(Default::default);
            let dims = &mut shape.dim;
            match rng.below(4) {
                0 if !dims.is_empty() => {
                    let k = rng.below(dims.len());
                    let old = match dims[k].value {
                        Some(tensor_shape_proto::dimension::Value::DimValue(v)) => v,
                        _ => 1,
                    };
                    dims[k].value = Some(tensor_shape_proto::dimension::Value::DimValue(rng.edge_int(old)));
                }
                1 if !dims.is_empty() => {
                    let k = rng.below(dims.len());
                    dims[k].value =
                        Some(tensor_shape_proto::dimension::Value::DimParam(["N", "batch", "h"][k % 3].into()));
                }
                2 => {
                    dims.pop();
                }
                _ => dims.push(tensor_shape_proto::Dimension {
                    denotation: None,
                    value: Some(tensor_shape_proto::dimension::Value::DimValue(rng.edge_int(1))),
                }),
            }
        }
    }
}

fn mutate_node(n: &mut NodeProto, names: &[String], rng: &mut Rng) {
    match rng.below(7) {
        0 | 1 if !n.attribute.is_empty() => {
            let k = rng.below(n.attribute.len());
            mutate_attribute(&mut n.attribute[k], rng);
        }
        2 => n.op_type = Some(OPS[rng.below(OPS.len())].to_string()),
        3 if !n.input.is_empty() && !names.is_empty() => {
            let k = rng.below(n.input.len());
            n.input[k] = names[rng.below(names.len())].clone();
        }
        4 => match rng.below(3) {
            0 => {
                n.input.pop();
            }
            1 if !names.is_empty() => n.input.push(names[rng.below(names.len())].clone()),
            _ => n.input.push(String::new()),
        },
        5 if !n.attribute.is_empty() => {
            n.attribute.remove(rng.below(n.attribute.len()));
        }
        _ => {
            // An attribute the node did not have, with a name its op reads.
            const NAMES: &[&str] = &[
                "axis",
                "axes",
                "perm",
                "pads",
                "strides",
                "kernel_shape",
                "dilations",
                "group",
                "keepdims",
                "split",
                "starts",
                "ends",
                "to",
                "mode",
                "transA",
                "transB",
                "alpha",
                "k",
                "value",
                "num_outputs",
            ];
            let mut a = AttributeProto { name: Some(NAMES[rng.below(NAMES.len())].into()), ..Default::default() };
            if rng.below(2) == 0 {
                a.r#type = Some(2);
                a.i = Some(rng.edge_int(1));
            } else {
                a.r#type = Some(7);
                a.ints = vec![rng.edge_int(1); 1 + rng.below(4)];
            }
            n.attribute.push(a);
        }
    }
}

/// One structural change to a model: an attribute, a node's op type or inputs, an initializer's dims or type, a
/// graph input's shape or element type, the opset, or a node duplicated or removed. `None` when the bytes are not
/// a model (the caller then mutates bytes).
pub fn mutate_model(bytes: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    use prost::Message;
    let mut m = ModelProto::decode(bytes).ok()?;
    let g = m.graph.as_mut()?;
    let names: Vec<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(g.input.iter().filter_map(|i| i.name.clone()))
        .chain(g.initializer.iter().filter_map(|t| t.name.clone()))
        .collect();
    for _ in 0..1 + rng.below(3) {
        match rng.below(10) {
            0..=4 if !g.node.is_empty() => {
                let k = rng.below(g.node.len());
                mutate_node(&mut g.node[k], &names, rng);
            }
            5 if !g.initializer.is_empty() => {
                let k = rng.below(g.initializer.len());
                mutate_tensor(&mut g.initializer[k], rng);
            }
            6 if !g.input.is_empty() => {
                let k = rng.below(g.input.len());
                if let Some(t) = g.input[k].r#type.as_mut() {
                    mutate_type(t, rng);
                }
            }
            7 if !g.node.is_empty() => {
                let k = rng.below(g.node.len());
                let mut copy = g.node[k].clone();
                for o in &mut copy.output {
                    o.push_str("_dup");
                }
                g.node.insert(rng.below(g.node.len() + 1), copy);
            }
            8 if g.node.len() > 1 => {
                g.node.remove(rng.below(g.node.len()));
            }
            _ => {
                if let Some(o) = m.opset_import.first_mut() {
                    o.version = Some([1, 7, 11, 13, 17, 21, 99][rng.below(7)]);
                }
                break;
            }
        }
    }
    Some(m.encode_to_vec())
}
