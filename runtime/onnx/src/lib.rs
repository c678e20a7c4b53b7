//! The one graph type every edgepack pass works on: an ONNX model read from protobuf, checked, and written
//! back losslessly (fields are kept as decoded, so decode → encode is byte-identical for canonical files).
//!
//! Quantize, prune and the GPU lowering are small passes over [`Graph`]: they look values up by name, ask for
//! producers and consumers, insert/remove nodes and initializers, and re-sort topologically.
mod arity;
#[allow(clippy::all)]
#[rustfmt::skip]
pub mod proto;

pub mod builder;
pub mod pass;
pub mod passes;
pub mod upgrade;

use std::collections::{HashMap, HashSet};

pub use pass::{Pass, PassRun, run_passes};
use prost::Message;
pub use proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto, ValueInfoProto,
    tensor_proto::DataType,
};

use edgepack_core::tensor::{DType, Tensor, TensorData};
pub use edgepack_core::{Dim, shape_string};
use edgepack_core::{Error, Result};

/// Largest element count a single initializer may declare (guards allocations on hostile files).
const MAX_TENSOR_ELEMENTS: u64 = 1 << 32;

/// Type of a named value where the file states it: element type code and (optional) shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueType {
    /// ONNX data type code (`TensorProto.DataType`).
    pub elem_type: i32,
    /// `None` when the rank is unknown.
    pub shape: Option<Vec<Dim>>,
}

impl ValueType {
    pub fn dtype(&self) -> Option<DType> {
        DType::from_onnx_code(self.elem_type)
    }
}

/// Convenience accessors over a [`NodeProto`] (absent proto2 fields read as empty).
pub trait NodeExt {
    fn name(&self) -> &str;
    fn op(&self) -> &str;
    fn domain_name(&self) -> &str;
    fn attr(&self, name: &str) -> Option<&AttributeProto>;
    fn attr_i(&self, name: &str) -> Option<i64> {
        self.attr(name).and_then(|a| a.i)
    }
    fn attr_f(&self, name: &str) -> Option<f32> {
        self.attr(name).and_then(|a| a.f)
    }
    fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }
    fn attr_s(&self, name: &str) -> Option<&str> {
        self.attr(name).and_then(|a| a.s.as_deref()).and_then(|s| std::str::from_utf8(s).ok())
    }
    /// Inputs that are actually wired (ONNX marks skipped optional inputs with "").
    fn real_inputs(&self) -> Vec<&str>;
}

impl NodeExt for NodeProto {
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }
    fn op(&self) -> &str {
        self.op_type.as_deref().unwrap_or("")
    }
    fn domain_name(&self) -> &str {
        self.domain.as_deref().unwrap_or("")
    }
    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attribute.iter().find(|a| a.name.as_deref() == Some(name))
    }
    fn real_inputs(&self) -> Vec<&str> {
        self.input.iter().map(String::as_str).filter(|s| !s.is_empty()).collect()
    }
}

/// Builds a node (for passes that insert nodes).
pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

/// An ONNX model: the graph plus everything else the file held, preserved untouched.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub graph: Graph,
    /// The `ModelProto` minus its graph (opsets, producer, metadata, functions, training info...).
    header: ModelProto,
}

/// The main graph of a model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Graph {
    /// Nodes, kept in topological order by [`Graph::topo_sort`] (files are not required to be sorted).
    pub nodes: Vec<NodeProto>,
    pub inputs: Vec<ValueInfoProto>,
    pub outputs: Vec<ValueInfoProto>,
    pub initializers: Vec<TensorProto>,
    pub value_info: Vec<ValueInfoProto>,
    /// Remaining `GraphProto` fields (name, doc string, sparse initializers, annotations, metadata).
    rest: GraphProto,
}

impl Model {
    /// Decodes and checks a model. Never panics on malformed bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Model> {
        let proto =
            ModelProto::decode(bytes).map_err(|e| Error::MalformedModel(format!("protobuf decode failed: {e}")))?;
        let model = Model::from_proto(proto)?;
        model.check()?;
        Ok(model)
    }

    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Model> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Model::from_bytes(&bytes)
    }

    /// Splits a decoded proto into graph + header. Does not check consistency (see [`Model::check`]).
    pub fn from_proto(mut proto: ModelProto) -> Result<Model> {
        let g = proto.graph.take().ok_or_else(|| Error::MalformedModel("the model has no graph".into()))?;
        Ok(Model { graph: Graph::from_proto(g), header: proto })
    }

    /// A model of `graph` with this model's header (opsets, IR version): how a subgraph (an `If` branch, a `Loop`
    /// body) is prepared on its own.
    pub fn with_graph(&self, graph: GraphProto) -> Model {
        Model { graph: Graph::from_proto(graph), header: self.header.clone() }
    }

    pub fn to_proto(&self) -> ModelProto {
        let mut p = self.header.clone();
        p.graph = Some(self.graph.to_proto());
        p
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    pub fn ir_version(&self) -> i64 {
        self.header.ir_version.unwrap_or(0)
    }

    pub fn producer(&self) -> String {
        format!(
            "{} {}",
            self.header.producer_name.as_deref().unwrap_or(""),
            self.header.producer_version.as_deref().unwrap_or("")
        )
        .trim()
        .to_string()
    }

    /// Opset version imported for `domain` ("" = the default ONNX domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        self.header
            .opset_import
            .iter()
            .find(|o| {
                let d = o.domain.as_deref().unwrap_or("");
                d == domain || (domain.is_empty() && d == "ai.onnx")
            })
            .and_then(|o| o.version)
    }

    /// Sets (or adds) the opset version imported for `domain`.
    pub fn set_opset(&mut self, domain: &str, version: i64) {
        let found = self.header.opset_import.iter_mut().find(|o| {
            let d = o.domain.as_deref().unwrap_or("");
            d == domain || (domain.is_empty() && d == "ai.onnx")
        });
        match found {
            Some(o) => o.version = Some(version),
            None => self
                .header
                .opset_import
                .push(OperatorSetIdProto { domain: Some(domain.into()), version: Some(version) }),
        }
    }

    pub fn set_ir_version(&mut self, v: i64) {
        self.header.ir_version = Some(v);
    }

    pub fn opset_imports(&self) -> &[OperatorSetIdProto] {
        &self.header.opset_import
    }

    /// Model-level metadata (`metadata_props`).
    pub fn metadata(&self) -> Vec<(String, String)> {
        self.header
            .metadata_props
            .iter()
            .map(|e| (e.key.clone().unwrap_or_default(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    /// Structural checks that make the model safe to hand to a backend: every value used is defined, outputs
    /// exist, names are single-assignment, initializers hold as many elements as they declare, no external data.
    pub fn check(&self) -> Result<()> {
        if self.header.opset_import.is_empty() {
            return Err(Error::MalformedModel("no opset_import".into()));
        }
        self.graph.check(&HashSet::new())
    }
}

impl Graph {
    pub fn from_proto(mut g: GraphProto) -> Graph {
        Graph {
            nodes: std::mem::take(&mut g.node),
            inputs: std::mem::take(&mut g.input),
            outputs: std::mem::take(&mut g.output),
            initializers: std::mem::take(&mut g.initializer),
            value_info: std::mem::take(&mut g.value_info),
            rest: g,
        }
    }

    pub fn to_proto(&self) -> GraphProto {
        let mut g = self.rest.clone();
        g.node = self.nodes.clone();
        g.input = self.inputs.clone();
        g.output = self.outputs.clone();
        g.initializer = self.initializers.clone();
        g.value_info = self.value_info.clone();
        g
    }

    pub fn name(&self) -> &str {
        self.rest.name.as_deref().unwrap_or("")
    }

    /// Graph inputs that are real inputs (not initializers listed as inputs, as old exporters do).
    pub fn runtime_inputs(&self) -> Vec<&ValueInfoProto> {
        let inits: HashSet<&str> = self.initializers.iter().filter_map(|t| t.name.as_deref()).collect();
        self.inputs.iter().filter(|i| !inits.contains(i.name.as_deref().unwrap_or(""))).collect()
    }

    pub fn initializer(&self, name: &str) -> Option<&TensorProto> {
        self.initializers.iter().find(|t| t.name.as_deref() == Some(name))
    }

    /// The named initializers by name, for passes that look many of them up.
    pub fn initializers_by_name(&self) -> HashMap<&str, &TensorProto> {
        self.initializers.iter().filter_map(|t| Some((t.name.as_deref()?, t))).collect()
    }

    /// Adds or replaces an initializer (matched by name).
    pub fn set_initializer(&mut self, t: TensorProto) {
        match self.initializers.iter_mut().find(|x| x.name == t.name) {
            Some(slot) => *slot = t,
            None => self.initializers.push(t),
        }
    }

    /// Removes initializers no node, subgraph or graph output reads (and their graph-input entries, which IR < 4
    /// files carry). Returns how many went.
    pub fn remove_unused_initializers(&mut self) -> usize {
        let mut used: HashSet<String> = HashSet::new();
        for n in &self.nodes {
            used.extend(n.input.iter().cloned());
            collect_subgraph_refs(n, &mut used);
        }
        used.extend(self.outputs.iter().filter_map(|o| o.name.clone()));
        let before = self.initializers.len();
        let mut removed: HashSet<String> = HashSet::new();
        self.initializers.retain(|t| {
            let name = t.name.as_deref().unwrap_or("");
            let keep = used.contains(name);
            if !keep {
                removed.insert(name.to_string());
            }
            keep
        });
        // Old IR versions also list initializers as graph inputs: those entries go with them.
        self.inputs.retain(|i| !removed.contains(i.name.as_deref().unwrap_or("")));
        before - self.initializers.len()
    }

    /// Map from value name to the index of the node producing it.
    pub fn producers(&self) -> HashMap<&str, usize> {
        let mut m = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                m.insert(o.as_str(), i);
            }
        }
        m
    }

    /// Indices of the nodes reading `value` (directly, not through subgraphs).
    pub fn consumers(&self, value: &str) -> Vec<usize> {
        self.nodes.iter().enumerate().filter(|(_, n)| n.input.iter().any(|i| i == value)).map(|(i, _)| i).collect()
    }

    pub fn node_by_name(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name() == name)
    }

    /// Rewires every reader of `old` (nodes and graph outputs) to read `new` instead.
    pub fn replace_uses(&mut self, old: &str, new: &str) {
        for n in &mut self.nodes {
            for i in n.input.iter_mut().filter(|i| *i == old) {
                *i = new.to_string();
            }
        }
        for o in &mut self.outputs {
            if o.name.as_deref() == Some(old) {
                o.name = Some(new.to_string());
            }
        }
    }

    /// Inserts `node` right after the producer of its first input (or at the front), keeping order valid
    /// for the common case; call [`Graph::topo_sort`] after larger rewrites.
    pub fn insert_node(&mut self, node: NodeProto) -> usize {
        let prods = self.producers();
        let at = node.real_inputs().iter().filter_map(|i| prods.get(i)).max().map(|&p| p + 1).unwrap_or(0);
        self.nodes.insert(at, node);
        at
    }

    pub fn remove_node(&mut self, index: usize) -> NodeProto {
        self.nodes.remove(index)
    }

    /// A value or node name not yet used in the graph, derived from `base`.
    pub fn unique_name(&self, base: &str) -> String {
        let mut taken: HashSet<&str> = HashSet::new();
        for n in &self.nodes {
            taken.insert(n.name());
            taken.extend(n.output.iter().map(String::as_str));
        }
        taken.extend(self.inputs.iter().filter_map(|v| v.name.as_deref()));
        taken.extend(self.initializers.iter().filter_map(|v| v.name.as_deref()));
        if !taken.contains(base) {
            return base.to_string();
        }
        (1..).map(|i| format!("{base}_{i}")).find(|c| !taken.contains(c.as_str())).unwrap()
    }

    /// Declared type of a value (from inputs, outputs, value_info or initializers), where the file states it.
    pub fn value_type(&self, name: &str) -> Option<ValueType> {
        if let Some(t) = self.initializer(name) {
            return Some(ValueType {
                elem_type: t.data_type.unwrap_or(0),
                shape: Some(t.dims.iter().map(|&d| Dim::Fixed(d.max(0) as usize)).collect()),
            });
        }
        self.inputs
            .iter()
            .chain(&self.outputs)
            .chain(&self.value_info)
            .find(|v| v.name.as_deref() == Some(name))
            .and_then(value_info_type)
    }

    /// Sorts nodes so that every node comes after the producers of its inputs (stable: already-sorted graphs
    /// keep their order). Fails on cycles and on values nobody defines.
    pub fn topo_sort(&mut self) -> Result<()> {
        let order = self.topo_order(&HashSet::new())?;
        let mut old: Vec<Option<NodeProto>> = std::mem::take(&mut self.nodes).into_iter().map(Some).collect();
        self.nodes = order.into_iter().map(|i| old[i].take().expect("each index once")).collect();
        Ok(())
    }

    fn defined_at_start(&self, outer: &HashSet<String>) -> HashSet<String> {
        let mut defined: HashSet<String> = outer.clone();
        defined.extend(self.inputs.iter().filter_map(|v| v.name.clone()));
        defined.extend(self.initializers.iter().filter_map(|v| v.name.clone()));
        defined
            .extend(self.rest.sparse_initializer.iter().filter_map(|s| s.values.as_ref().and_then(|v| v.name.clone())));
        defined.insert(String::new());
        defined
    }

    /// Kahn's algorithm, preferring the original index among ready nodes.
    fn topo_order(&self, outer: &HashSet<String>) -> Result<Vec<usize>> {
        let defined = self.defined_at_start(outer);
        let prods = self.producers();
        let n = self.nodes.len();
        let mut deps: Vec<HashSet<usize>> = vec![HashSet::new(); n];
        let mut users: Vec<Vec<usize>> = vec![vec![]; n];
        for (i, node) in self.nodes.iter().enumerate() {
            let mut needed: HashSet<String> = node.input.iter().cloned().collect();
            collect_subgraph_refs(node, &mut needed);
            for v in needed {
                if let Some(&p) = prods.get(v.as_str()) {
                    if p == i {
                        if !defined.contains(&v) {
                            return Err(Error::MalformedModel(format!(
                                "node `{}` reads its own output `{v}`",
                                node.name()
                            )));
                        }
                        continue;
                    }
                    if deps[i].insert(p) {
                        users[p].push(i);
                    }
                } else if !defined.contains(&v) && node.input.contains(&v) {
                    return Err(Error::MalformedModel(format!(
                        "node `{}` ({}) reads `{v}`, which no input, initializer or node defines",
                        node.name(),
                        node.op()
                    )));
                }
            }
        }
        let mut remaining: Vec<usize> = deps.iter().map(|d| d.len()).collect();
        let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| remaining[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &u in &users[i] {
                remaining[u] -= 1;
                if remaining[u] == 0 {
                    ready.insert(u);
                }
            }
        }
        if order.len() != n {
            let stuck =
                (0..n).find(|&i| remaining[i] > 0).map(|i| self.nodes[i].name().to_string()).unwrap_or_default();
            return Err(Error::MalformedModel(format!("the graph has a cycle (through node `{stuck}`)")));
        }
        Ok(order)
    }

    fn check(&self, outer: &HashSet<String>) -> Result<()> {
        let mut seen: HashSet<&str> = HashSet::new();
        for t in &self.initializers {
            check_tensor(t)?;
        }
        for v in self.inputs.iter().chain(&self.outputs) {
            if v.name.as_deref().unwrap_or("").is_empty() {
                return Err(Error::MalformedModel("a graph input or output has no name".into()));
            }
        }
        for v in self.inputs.iter().chain(&self.outputs).chain(&self.value_info) {
            check_declared_size(v)?;
        }
        for node in &self.nodes {
            if node.op().is_empty() {
                return Err(Error::MalformedModel(format!("node `{}` has no op_type", node.name())));
            }
            for o in node.output.iter().filter(|o| !o.is_empty()) {
                if !seen.insert(o) {
                    return Err(Error::MalformedModel(format!("value `{o}` is produced twice")));
                }
            }
            for a in &node.attribute {
                if let Some(t) = &a.t {
                    check_tensor(t)?;
                }
                for t in &a.tensors {
                    check_tensor(t)?;
                }
            }
            check_arity(node)?;
            check_axes(self, node)?;
        }
        self.topo_order(outer)?;
        // Subgraphs (If/Loop/Scan bodies) see every outer value.
        let mut scope = self.defined_at_start(outer);
        scope.extend(seen.iter().map(|s| s.to_string()));
        for node in &self.nodes {
            for a in &node.attribute {
                for g in a.g.iter().chain(&a.graphs) {
                    Graph::from_proto(g.clone()).check(&scope)?;
                }
            }
        }
        let prods = self.producers();
        let defined = self.defined_at_start(outer);
        for o in &self.outputs {
            let name = o.name.as_deref().unwrap_or("");
            if !prods.contains_key(name) && !defined.contains(name) {
                return Err(Error::MalformedModel(format!("graph output `{name}` is never produced")));
            }
        }
        Ok(())
    }
}

/// The most elements a graph input, output or value may declare with fixed dims (1 GiB of f32), zero dims aside.
/// Backends trust declared shapes: tract's type inference computed an EyeLike of a declared 2³¹×4 input at load,
/// allocating 32 GiB, which no panic guard can catch; and a Transpose of a declared 1×1×3×700 970 477 325×0×255
/// input (no elements) ran tract's block loop over the other dims for ever.
pub const MAX_DECLARED_ELEMENTS: u128 = 1 << 28;

fn check_declared_size(v: &ValueInfoProto) -> Result<()> {
    let Some(shape) = value_info_type(v).and_then(|t| t.shape) else { return Ok(()) };
    // A zero dim counts as one: an empty tensor's other dims still size loops.
    let n = shape.iter().try_fold(1u128, |n, d| match d {
        Dim::Fixed(d) => n.checked_mul((*d as u128).max(1)),
        Dim::Symbolic(_) => Some(n),
    });
    if n.is_none_or(|n| n > MAX_DECLARED_ELEMENTS) {
        return Err(Error::MalformedModel(format!(
            "`{}` declares a shape of over {MAX_DECLARED_ELEMENTS} elements (zero dims counted as one)",
            v.name.as_deref().unwrap_or("")
        )));
    }
    Ok(())
}

/// The largest value a window attribute (`pads`, `strides`, `dilations`, `kernel_shape`, `output_padding`,
/// `output_shape`) of a default-domain op may hold.
pub const MAX_GEOMETRY: i64 = 1 << 20;

/// The most elements a `kernel_shape` window may cover (a 512 × 512 pool). tract precomputes every window
/// offset per padding zone while it plans: a 2 × 253 782 AveragePool over a 32 × 32 input took 6 s to load
/// under the fuzzer, and one of 2²⁰ × 2²⁰ would never finish.
pub const MAX_WINDOW: u64 = 1 << 18;

/// Window attributes within ±[`MAX_GEOMETRY`], windows of at most [`MAX_WINDOW`] elements, and a ConvTranspose
/// `output_padding` below its stride or dilation (as PyTorch requires of what it exports). tract sizes tensors from
/// them while it plans: an `output_padding` of 5·10¹¹ made it allocate 10 TB at load in a fuzz run.
fn check_geometry(node: &NodeProto) -> Result<()> {
    const NAMES: [&str; 6] = ["pads", "strides", "dilations", "kernel_shape", "output_padding", "output_shape"];
    let bad = |what: String| Err(Error::MalformedModel(format!("node `{}` ({}): {what}", node.name(), node.op())));
    for a in node.attribute.iter().filter(|a| NAMES.contains(&a.name.as_deref().unwrap_or(""))) {
        if let Some(v) = a.ints.iter().find(|v| v.unsigned_abs() > MAX_GEOMETRY as u64) {
            return bad(format!("{} {v} is out of range (at most {MAX_GEOMETRY})", a.name.as_deref().unwrap_or("")));
        }
    }
    if let Some(k) = node.attr_ints("kernel_shape") {
        let window = k.iter().try_fold(1u64, |n, &v| n.checked_mul(v.unsigned_abs()));
        if window.is_none_or(|n| n > MAX_WINDOW) {
            return bad(format!("kernel_shape {k:?} covers over {MAX_WINDOW} elements"));
        }
    }
    if node.op() == "ConvTranspose"
        && let Some(op) = node.attr_ints("output_padding")
    {
        let at = |name: &str, i: usize| node.attr_ints(name).and_then(|v| v.get(i).copied()).unwrap_or(1);
        if let Some((i, p)) =
            op.iter().enumerate().find(|&(i, &p)| p < 0 || p >= at("strides", i).max(at("dilations", i)))
        {
            return bad(format!("output_padding {p} on axis {i} is not below its stride or dilation"));
        }
    }
    Ok(())
}

/// The largest |axis| an ONNX op's `axis`/`axes` attribute may name (a dim of a tensor of at most this rank).
pub const MAX_AXIS: i64 = 64;

/// A default-domain node has as many inputs and outputs as some version of its op takes, and names every input
/// all versions require ([`arity::ARITY`], from the onnx package's schemas). Passes and backends index a node's
/// inputs by the op's signature: a DequantizeLinear of no inputs made the QDQ lowering index an empty list.
fn check_arity(node: &NodeProto) -> Result<()> {
    if !matches!(node.domain_name(), "" | "ai.onnx") {
        return Ok(());
    }
    let Ok(i) = arity::ARITY.binary_search_by(|e| e.0.cmp(node.op())) else { return Ok(()) };
    let (op, lo, hi, olo, ohi, required) = arity::ARITY[i];
    let (n_in, n_out) = (node.input.len(), node.output.len());
    let what = || format!("{op} node `{}`", node.name());
    let span = |lo: u32, hi: u32| match hi {
        _ if lo == hi => lo.to_string(),
        u32::MAX => format!("at least {lo}"),
        _ => format!("{lo} to {hi}"),
    };
    if n_in < lo as usize || n_in > hi as usize {
        return Err(Error::MalformedModel(format!("{} has {n_in} inputs, the op takes {}", what(), span(lo, hi))));
    }
    if n_out < olo as usize || n_out > ohi as usize {
        return Err(Error::MalformedModel(format!("{} has {n_out} outputs, the op gives {}", what(), span(olo, ohi))));
    }
    if let Some(k) = node.input.iter().take(32).enumerate().position(|(k, v)| v.is_empty() && required >> k & 1 == 1) {
        return Err(Error::MalformedModel(format!("{} leaves its required input {k} empty", what())));
    }
    Ok(())
}

/// An `axis`/`axes` attribute of a default-domain op names a dim: at most [`MAX_AXIS`] away from 0, and for
/// LayerNormalization within the declared rank of its input. Backends trust it: tract's LayerNormalization rules
/// loop up to the axis (an axis of 10⁹ exhausted memory in a fuzz run).
fn check_axes(g: &Graph, node: &NodeProto) -> Result<()> {
    if !matches!(node.domain_name(), "" | "ai.onnx") {
        return Ok(());
    }
    for a in &node.attribute {
        let vals: Vec<i64> = match a.name.as_deref() {
            Some("axis") => a.i.into_iter().collect(),
            Some("axes") => a.ints.clone(),
            _ => continue,
        };
        if let Some(v) = vals.iter().find(|v| v.unsigned_abs() > MAX_AXIS as u64) {
            return Err(Error::MalformedModel(format!(
                "node `{}` ({}): axis {v} is out of range (tensors of rank above {MAX_AXIS} are not supported)",
                node.name(),
                node.op()
            )));
        }
    }
    check_geometry(node)?;
    if node.op() == "LayerNormalization" {
        let axis = node.attr_i("axis").unwrap_or(-1);
        let rank = node.input.first().and_then(|x| g.value_type(x)).and_then(|t| t.shape).map(|s| s.len() as i64);
        if let Some(r) = rank
            && !(-r..r).contains(&axis)
        {
            return Err(Error::MalformedModel(format!(
                "node `{}` (LayerNormalization): axis {axis} is out of range for its rank-{r} input",
                node.name()
            )));
        }
    }
    // A Transpose `perm` names each axis once; tract follows its cycles, and `[1, 1, 1, 1]` never closes one (it grew
    // a list to 2 GiB in a fuzz run).
    if node.op() == "Transpose"
        && let Some(perm) = node.attr_ints("perm")
    {
        let mut seen = vec![false; perm.len()];
        let once = |p: &i64| {
            usize::try_from(*p).ok().filter(|&p| p < seen.len()).is_some_and(|p| !std::mem::replace(&mut seen[p], true))
        };
        if !perm.iter().all(once) {
            return Err(Error::MalformedModel(format!(
                "node `{}` (Transpose): perm {perm:?} is not a permutation of 0..{}",
                node.name(),
                perm.len()
            )));
        }
    }
    Ok(())
}

pub(crate) fn value_info_type(v: &ValueInfoProto) -> Option<ValueType> {
    use proto::type_proto::Value;
    let Some(Value::TensorType(t)) = v.r#type.as_ref()?.value.as_ref() else { return None };
    let shape = t.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => Dim::Fixed(*v as usize),
                Some(proto::tensor_shape_proto::dimension::Value::DimParam(p)) => Dim::Symbolic(p.clone()),
                _ => Dim::Symbolic(String::new()),
            })
            .collect()
    });
    Some(ValueType { elem_type: t.elem_type.unwrap_or(0), shape })
}

/// Public form of [`value_info_type`] for callers holding a `ValueInfoProto`.
pub fn value_info_to_type(v: &ValueInfoProto) -> Option<ValueType> {
    value_info_type(v)
}

/// Outer-scope names a node's subgraphs read (so If/Loop nodes are ordered after what their bodies use).
pub fn collect_subgraph_refs(node: &NodeProto, out: &mut HashSet<String>) {
    for a in &node.attribute {
        for g in a.g.iter().chain(&a.graphs) {
            let mut local: HashSet<&str> = HashSet::new();
            local.extend(g.input.iter().filter_map(|v| v.name.as_deref()));
            local.extend(g.initializer.iter().filter_map(|v| v.name.as_deref()));
            for n in &g.node {
                local.extend(n.output.iter().map(String::as_str));
            }
            for n in &g.node {
                for i in &n.input {
                    if !local.contains(i.as_str()) {
                        out.insert(i.clone());
                    }
                }
                collect_subgraph_refs(n, out);
            }
            for o in &g.output {
                if let Some(name) = &o.name
                    && !local.contains(name.as_str())
                {
                    out.insert(name.clone());
                }
            }
        }
    }
}

/// Byte size of one element for fixed-size ONNX types (None for strings and unknown codes).
fn onnx_elem_size(code: i32) -> Option<u64> {
    Some(match code {
        1 | 6 | 12 => 4,          // float, int32, uint32
        2 | 3 | 9 | 17..=20 => 1, // uint8, int8, bool, float8 variants
        4 | 5 | 10 | 16 => 2,     // uint16, int16, float16, bfloat16
        7 | 11 | 13 | 14 => 8,    // int64, double, uint64, complex64
        15 => 16,                 // complex128
        _ => return None,
    })
}

fn check_tensor(t: &TensorProto) -> Result<()> {
    let name = t.name.as_deref().unwrap_or("<unnamed>");
    let bad = |why: String| Err(Error::MalformedModel(format!("tensor `{name}`: {why}")));
    if t.data_location == Some(proto::tensor_proto::DataLocation::External as i32) || !t.external_data.is_empty() {
        return bad("external data is not supported; embed the weights in the .onnx file".into());
    }
    let mut count: u64 = 1;
    for &d in &t.dims {
        if d < 0 {
            return bad(format!("negative dimension {d}"));
        }
        count = match count.checked_mul(d as u64) {
            Some(c) if c <= MAX_TENSOR_ELEMENTS => c,
            _ => return bad(format!("dims {:?} are too large", t.dims)),
        };
    }
    let code = t.data_type.unwrap_or(0);
    if code == 8 {
        return Ok(()); // strings: counted by string_data
    }
    // 4-bit integers (uint4 21, int4 22): two per byte, raw storage only (unpacked by `fold_low_bit_weights`).
    if code == 21 || code == 22 {
        let need = count.div_ceil(2);
        return match &t.raw_data {
            Some(raw) if raw.len() as u64 == need => Ok(()),
            Some(raw) => bad(format!("dims {:?} need {need} packed 4-bit bytes, raw_data holds {}", t.dims, raw.len())),
            None if t.int32_data.len() as u64 == need => Ok(()),
            None => bad(format!("dims {:?} need {need} packed 4-bit values", t.dims)),
        };
    }
    let Some(size) = onnx_elem_size(code) else {
        return bad(format!("unknown data type {code}"));
    };
    if let Some(raw) = &t.raw_data {
        if raw.len() as u64 != count * size {
            return bad(format!("dims {:?} need {} bytes, raw_data holds {}", t.dims, count * size, raw.len()));
        }
        return Ok(());
    }
    let typed =
        t.float_data.len() + t.int32_data.len() + t.int64_data.len() + t.double_data.len() + t.uint64_data.len();
    // Complex types store 2 numbers per element; everything else one.
    let per = if code == 14 || code == 15 { 2 } else { 1 };
    if typed as u64 != count * per && !(typed == 0 && count == 0) {
        return bad(format!("dims {:?} declare {count} elements, the data holds {}", t.dims, typed as u64 / per));
    }
    Ok(())
}

/// The values of an initializer or node-test tensor as a runtime [`Tensor`] (raw or typed storage).
/// Types the runtime does not carry (strings, bfloat16, complex...) are an error naming the type.
pub fn tensor_from_proto(t: &TensorProto) -> Result<Tensor> {
    check_tensor(t)?;
    let code = t.data_type.unwrap_or(0);
    let name = t.name.as_deref().unwrap_or("");
    let dtype = DType::from_onnx_code(code)
        .ok_or_else(|| Error::MalformedModel(format!("tensor `{name}`: element type {code} is not supported")))?;
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    if let Some(raw) = &t.raw_data {
        return Tensor::from_le_bytes(dtype, shape, raw);
    }
    let data = match dtype {
        DType::F32 => TensorData::F32(t.float_data.clone()),
        DType::F64 => TensorData::F64(t.double_data.clone()),
        DType::I64 => TensorData::I64(t.int64_data.clone()),
        DType::I32 => TensorData::I32(t.int32_data.clone()),
        DType::I16 => TensorData::I16(t.int32_data.iter().map(|&v| v as i16).collect()),
        DType::U16 => TensorData::U16(t.int32_data.iter().map(|&v| v as u16).collect()),
        DType::U32 => TensorData::U32(t.uint64_data.iter().map(|&v| v as u32).collect()),
        DType::U64 => TensorData::U64(t.uint64_data.clone()),
        DType::I8 => TensorData::I8(t.int32_data.iter().map(|&v| v as i8).collect()),
        DType::U8 => TensorData::U8(t.int32_data.iter().map(|&v| v as u8).collect()),
        DType::Bool => TensorData::Bool(t.int32_data.iter().map(|&v| v != 0).collect()),
        DType::F16 => TensorData::F16(t.int32_data.iter().map(|&v| half::f16::from_bits(v as u16)).collect()),
    };
    Tensor::new(shape, data)
}

/// A runtime [`Tensor`] as an ONNX tensor (raw little-endian storage).
pub fn tensor_to_proto(name: &str, t: &Tensor) -> TensorProto {
    let dims: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    builder::tensor_raw(name, &dims, t.dtype().onnx_code(), t.to_le_bytes())
}

#[cfg(test)]
mod tests;
