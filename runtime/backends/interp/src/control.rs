//! Control flow: `If` and `Loop`. Each subgraph is prepared at load as an interpreter of its own, whose inputs are
//! the subgraph's declared inputs followed by the values it reads from enclosing scopes (its free variables,
//! nested subgraphs included); the step that runs it receives those outer values as extra inputs.
use std::collections::HashSet;

use edgepack_onnx::GraphProto;

use super::*;

/// A prepared subgraph and where its outer values sit among the step's inputs.
pub(crate) struct Sub {
    b: InterpBackend,
    /// For each free variable of the subgraph (in its input order): its position among the step's inputs.
    free_at: Vec<usize>,
}

pub(crate) fn is_control(op: &str) -> bool {
    matches!(op, "If" | "Loop")
}

/// The table entry of a control-flow op: the step runs it through its subgraphs, never as a plain function.
pub(crate) fn op_control(a: &Args) -> Res<Vec<Tensor>> {
    Err(format!("{} runs through its subgraphs", a.n.op()))
}

/// Values a graph reads that it does not define (its inputs, initializers and node outputs), nested subgraphs
/// included, in first-use order.
fn free_vars(g: &GraphProto) -> Vec<String> {
    let mut defined: HashSet<&str> = g.input.iter().filter_map(|i| i.name.as_deref()).collect();
    defined.extend(g.initializer.iter().filter_map(|t| t.name.as_deref()));
    for n in &g.node {
        defined.extend(n.output.iter().map(String::as_str));
    }
    let mut out: Vec<String> = Vec::new();
    let push = |v: &str, out: &mut Vec<String>| {
        if !v.is_empty() && !defined.contains(v) && !out.iter().any(|o| o == v) {
            out.push(v.to_string());
        }
    };
    for n in &g.node {
        for i in &n.input {
            push(i, &mut out);
        }
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                for v in free_vars(sub) {
                    push(&v, &mut out);
                }
            }
        }
    }
    out
}

fn subgraph<'a>(n: &'a NodeProto, name: &str) -> Result<&'a GraphProto> {
    n.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name))
        .and_then(|a| a.g.as_ref())
        .ok_or_else(|| err(format!("{} `{}` has no `{name}` graph", n.op(), n.name())))
}

/// Prepares the subgraphs of an `If`/`Loop` node. Returns the op and the outer values its subgraphs read (to be
/// appended to the step's inputs, after the node's own `node_inputs`).
pub(crate) fn prepare(model: &Model, n: &NodeProto, threads: usize, node_inputs: usize) -> Result<(Op, Vec<String>)> {
    let graphs: Vec<&GraphProto> = match n.op() {
        "If" => vec![subgraph(n, "then_branch")?, subgraph(n, "else_branch")?],
        _ => vec![subgraph(n, "body")?],
    };
    // Outer initializers (weights) a subgraph reads become its own initializers: constant there too, so its
    // convolutions are packed once at load instead of on every call. The other outer values are step inputs.
    let mut all_free: Vec<String> = Vec::new();
    let mut prepared = Vec::with_capacity(graphs.len());
    for g in &graphs {
        let mut g = (*g).clone();
        let mut free = Vec::new();
        for v in free_vars(&g) {
            match model.graph.initializer(&v) {
                Some(t) => g.initializer.push(t.clone()),
                None => {
                    g.input.push(edgepack_onnx::ValueInfoProto { name: Some(v.clone()), ..Default::default() });
                    if !all_free.contains(&v) {
                        all_free.push(v.clone());
                    }
                    free.push(v);
                }
            }
        }
        prepared.push((g, free));
    }
    let subs = prepared
        .into_iter()
        .map(|(g, free)| {
            let b = InterpBackend::load(&model.with_graph(g), threads)
                .map_err(|e| err(format!("{} `{}`: subgraph: {e}", n.op(), n.name())))?;
            let free_at =
                free.iter().map(|v| node_inputs + all_free.iter().position(|x| x == v).unwrap_or(0)).collect();
            Ok(Box::new(Sub { b, free_at }))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut subs = subs.into_iter();
    let op = match (subs.next(), subs.next()) {
        (Some(t), Some(e)) => Op::If(t, e),
        (Some(body), None) => Op::Loop(body),
        _ => return Err(err("control flow without a subgraph")),
    };
    Ok((op, all_free))
}

fn run_sub(sub: &Sub, mut inputs: Vec<Tensor>, ins: &[Option<&Tensor>]) -> Res<Vec<Tensor>> {
    for &k in &sub.free_at {
        inputs.push(input(ins, k)?.clone());
    }
    if inputs.len() != sub.b.inputs.len() {
        return Err(format!("subgraph takes {} inputs, {} given", sub.b.inputs.len(), inputs.len()));
    }
    sub.b.execute(inputs, &sub.b.outputs, None).map_err(|e| e.to_string())
}

fn truthy(t: &Tensor) -> Res<bool> {
    match t.data() {
        TensorData::Bool(v) => v.first().copied().ok_or_else(|| "an empty condition".to_string()),
        _ => Ok(t.to_f32_vec().first().is_some_and(|&v| v != 0.0)),
    }
}

pub(crate) fn run_if(n: &NodeProto, then: &Sub, other: &Sub, ins: &[Option<&Tensor>]) -> Res<Vec<Tensor>> {
    let branch = if truthy(input(ins, 0)?)? { then } else { other };
    let outs = run_sub(branch, vec![], ins)?;
    if outs.len() < n.output.len() {
        return Err(format!("the branch gives {} outputs for {}", outs.len(), n.output.len()));
    }
    Ok(outs)
}

pub(crate) fn run_loop(n: &NodeProto, body: &Sub, ins: &[Option<&Tensor>]) -> Res<Vec<Tensor>> {
    let own = n.input.len();
    let trips = match ins.first().copied().flatten() {
        Some(t) => Some(first(&i64s(&t.cast(DType::I64))?, "the trip count")?),
        None => None,
    };
    let mut cond = match ins.get(1).copied().flatten() {
        Some(c) => truthy(c)?,
        None => true,
    };
    let mut carried: Vec<Tensor> = (2..own).map(|i| input(ins, i).cloned()).collect::<Res<_>>()?;
    let n_scan = n.output.len().saturating_sub(carried.len());
    let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); n_scan];
    let mut i = 0i64;
    // Elements the scan outputs hold so far (each iteration counting at least one): bounds the stacked outputs.
    let mut scanned = 0usize;
    while cond && trips.is_none_or(|m| i < m) {
        let mut inputs = vec![tensor(vec![], TensorData::I64(vec![i]))?, tensor(vec![], TensorData::Bool(vec![cond]))?];
        inputs.extend(carried.iter().cloned());
        let outs = run_sub(body, inputs, ins)?;
        if outs.len() != 1 + carried.len() + n_scan {
            return Err(format!("the body gives {} outputs, {} expected", outs.len(), 1 + carried.len() + n_scan));
        }
        let mut it = outs.into_iter();
        cond = truthy(&it.next().ok_or("no condition")?)?;
        for c in carried.iter_mut() {
            *c = it.next().ok_or("missing loop-carried value")?;
        }
        for s in scans.iter_mut() {
            s.push(it.next().ok_or("missing scan output")?);
        }
        scanned += scans.iter().map(|s| s.last().map_or(0, Tensor::len).max(1)).sum::<usize>();
        if scanned > MAX_ELEMENTS {
            return Err(format!("scan outputs of more than {MAX_ELEMENTS} elements"));
        }
        i += 1;
        if i > 10_000_000 {
            return Err("more than 10^7 iterations".into());
        }
    }
    let mut outs = carried;
    for s in scans {
        // Each scan output stacked along a new leading axis (every iteration gives the same shape).
        outs.push(match s.first() {
            None => tensor(vec![0], TensorData::F32(vec![]))?,
            Some(first) => {
                if let Some(t) = s.iter().find(|t| t.shape() != first.shape() || t.dtype() != first.dtype()) {
                    return Err(format!("scan outputs {:?} and {:?} do not stack", first.shape(), t.shape()));
                }
                let shape: Vec<usize> = std::iter::once(s.len()).chain(first.shape().iter().copied()).collect();
                let bytes: Vec<u8> = s.iter().flat_map(|t| t.to_le_bytes()).collect();
                Tensor::from_le_bytes(first.dtype(), shape, &bytes).map_err(|e| e.to_string())?
            }
        });
    }
    Ok(outs)
}
