//! Opset upgrade pass: rewrites a model to a newer default-domain opset (13 by default), converting the ops
//! whose signature or semantics changed on the way, so later passes (per-channel QDQ needs 13) and backends see
//! one modern form. Each conversion keeps the results identical (checked against onnxruntime by the tests).
//! New constant inputs are `Constant` nodes, so the pass works inside subgraphs too.
use super::builder::{attr_int, tensor_i64};
use super::{AttributeProto, GraphProto, Model, NodeExt, NodeProto, node};
use crate::{Error, Result};

/// The newest opset [`Model::upgrade_opset`] converts to: the conversions cover every change up to it (later
/// opsets change Reduce*, Split, Pad and Resize again, which it does not rewrite).
pub const MAX_UPGRADE_OPSET: i64 = 13;

/// What the upgrade did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UpgradeReport {
    pub from: i64,
    pub to: i64,
    /// (node, what changed)
    pub converted: Vec<(String, String)>,
}

fn ints_const(name: &str, out: &str, v: &[i64]) -> NodeProto {
    let mut n = node("Constant", name, &[], &[out], vec![]);
    n.attribute.push(AttributeProto {
        name: Some("value".into()),
        r#type: Some(4),
        t: Some(tensor_i64(out, &[v.len() as i64], v)),
        ..Default::default()
    });
    n
}

fn float_const(name: &str, out: &str, v: f32) -> NodeProto {
    let mut n = node("Constant", name, &[], &[out], vec![]);
    n.attribute.push(AttributeProto {
        name: Some("value".into()),
        r#type: Some(4),
        t: Some(super::builder::tensor_f32(out, &[], &[v])),
        ..Default::default()
    });
    n
}

fn take_attr(n: &mut NodeProto, name: &str) -> Option<AttributeProto> {
    let i = n.attribute.iter().position(|a| a.name.as_deref() == Some(name))?;
    Some(n.attribute.remove(i))
}

struct Namer<'a> {
    taken: &'a mut std::collections::HashSet<String>,
    /// Values something reads (node inputs anywhere, graph outputs).
    used: std::collections::HashSet<String>,
}

impl Namer<'_> {
    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 1;
        while self.taken.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        self.taken.insert(name.clone());
        name
    }
}

/// Moves attribute `attr` (ints) to a constant input at position `pos` (earlier optional inputs filled with "").
fn attr_to_input(
    n: &mut NodeProto,
    attr: &str,
    pos: usize,
    pre: &mut Vec<NodeProto>,
    names: &mut Namer,
    log: &mut Vec<(String, String)>,
    label: &str,
) {
    if let Some(a) = take_attr(n, attr) {
        let c = names.fresh(&format!("{label}_{attr}"));
        pre.push(ints_const(&format!("{c}_const"), &c, &a.ints));
        while n.input.len() < pos {
            n.input.push(String::new());
        }
        n.input.insert(pos, c);
        log.push((label.to_string(), format!("{attr} attribute → input")));
    }
}

/// Converts one node from opset `from`; returns the replacement nodes (the node itself, possibly changed, with
/// any constants it now needs in front).
fn convert(mut n: NodeProto, from: i64, names: &mut Namer, log: &mut Vec<(String, String)>) -> Result<Vec<NodeProto>> {
    let label = if n.name().is_empty() { n.output.first().cloned().unwrap_or_default() } else { n.name().to_string() };
    let op = n.op().to_string();
    let unsupported = |why: &str| Err(Error::MalformedModel(format!("cannot upgrade node `{label}` ({op}): {why}")));
    let mut pre = Vec::new();
    match n.op() {
        "Softmax" | "LogSoftmax" | "Hardmax" if from < 13 => {
            let axis = take_attr(&mut n, "axis").and_then(|a| a.i).unwrap_or(1);
            if axis == -1 {
                n.attribute.push(attr_int("axis", -1));
                return Ok(vec![n]);
            }
            // Old semantics: flatten to 2D at `axis`, normalise the second dim, restore the shape.
            let (x, y) = (n.input[0].clone(), n.output[0].clone());
            let (shape, flat, soft) = (
                names.fresh(&format!("{label}_shape")),
                names.fresh(&format!("{label}_2d")),
                names.fresh(&format!("{label}_out2d")),
            );
            log.push((label.clone(), format!("{op}(axis={axis}) as Flatten → {op}(-1) → Reshape")));
            return Ok(vec![
                node("Shape", &format!("{shape}_node"), &[&x], &[&shape], vec![]),
                node("Flatten", &format!("{flat}_node"), &[&x], &[&flat], vec![attr_int("axis", axis)]),
                node(&op, &label, &[&flat], &[&soft], vec![attr_int("axis", -1)]),
                node("Reshape", &format!("{y}_reshape"), &[&soft, &shape], &[&y], vec![]),
            ]);
        }
        "Dropout" => {
            if n.output.get(1).is_some_and(|m| !m.is_empty() && names.used.contains(m)) {
                return unsupported("the dropout mask output is used");
            }
            log.push((label.clone(), "Dropout (inference) → Identity".into()));
            return Ok(vec![node("Identity", &label, &[&n.input[0]], &[&n.output[0]], vec![])]);
        }
        "Squeeze" | "Unsqueeze" | "ReduceSum" if from < 13 => {
            attr_to_input(&mut n, "axes", 1, &mut pre, names, log, &label);
        }
        "Split" if from < 13 => {
            attr_to_input(&mut n, "split", 1, &mut pre, names, log, &label);
        }
        "Slice" if from < 10 => {
            let starts = take_attr(&mut n, "starts");
            let ends = take_attr(&mut n, "ends");
            let axes = take_attr(&mut n, "axes");
            let (Some(starts), Some(ends)) = (starts, ends) else { return unsupported("Slice without starts/ends") };
            let mut add = |v: &[i64], what: &str, pre: &mut Vec<NodeProto>, n: &mut NodeProto| {
                let c = names.fresh(&format!("{label}_{what}"));
                pre.push(ints_const(&format!("{c}_const"), &c, v));
                n.input.push(c);
            };
            add(&starts.ints, "starts", &mut pre, &mut n);
            add(&ends.ints, "ends", &mut pre, &mut n);
            if let Some(axes) = axes {
                add(&axes.ints, "axes", &mut pre, &mut n);
            }
            log.push((label.clone(), "starts/ends/axes attributes → inputs".into()));
        }
        "Pad" if from < 11 => {
            let pads = take_attr(&mut n, "pads").map(|a| a.ints).unwrap_or_default();
            let value = take_attr(&mut n, "value").and_then(|a| a.f).unwrap_or(0.0);
            let c = names.fresh(&format!("{label}_pads"));
            pre.push(ints_const(&format!("{c}_const"), &c, &pads));
            n.input.push(c);
            let v = names.fresh(&format!("{label}_value"));
            pre.push(float_const(&format!("{v}_const"), &v, value));
            n.input.push(v);
            log.push((label.clone(), "pads/value attributes → inputs".into()));
        }
        "Clip" if from < 11 => {
            let min = take_attr(&mut n, "min").and_then(|a| a.f);
            let max = take_attr(&mut n, "max").and_then(|a| a.f);
            for (i, v) in [min, max].into_iter().enumerate() {
                while n.input.len() < i + 1 {
                    n.input.push(String::new());
                }
                if let Some(v) = v {
                    let c = names.fresh(&format!("{label}_{}", if i == 0 { "min" } else { "max" }));
                    pre.push(float_const(&format!("{c}_const"), &c, v));
                    n.input.insert(i + 1, c);
                }
            }
            while n.input.last().is_some_and(|s| s.is_empty()) {
                n.input.pop();
            }
            log.push((label.clone(), "min/max attributes → inputs".into()));
        }
        "TopK" if from < 10 => {
            attr_to_input(&mut n, "k", 1, &mut pre, names, log, &label);
        }
        "BatchNormalization" if from < 9 => {
            if let Some(s) = take_attr(&mut n, "spatial")
                && s.i != Some(1)
            {
                return unsupported("spatial=0 has no modern equivalent");
            }
        }
        "Upsample" | "Resize" if from < 11 => {
            return unsupported("Upsample/Resize before opset 11 is not converted yet");
        }
        "Scatter" | "MaxUnpool" | "Scan" | "Loop" if from < 13 => return unsupported("conversion not implemented"),
        _ => {}
    }
    pre.push(n);
    Ok(pre)
}

fn upgrade_graph(
    nodes: Vec<NodeProto>,
    from: i64,
    names: &mut Namer,
    log: &mut Vec<(String, String)>,
) -> Result<Vec<NodeProto>> {
    let mut out = Vec::with_capacity(nodes.len());
    for mut n in nodes {
        for a in &mut n.attribute {
            for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                let sub: GraphProto = std::mem::take(g);
                let mut sub = sub;
                sub.node = upgrade_graph(std::mem::take(&mut sub.node), from, names, log)?;
                *g = sub;
            }
        }
        out.extend(convert(n, from, names, log)?);
    }
    Ok(out)
}

impl Model {
    /// Upgrades the default-domain opset to `target` (≥ 13 supported conversions; a no-op when already there).
    pub fn upgrade_opset(&mut self, target: i64) -> Result<UpgradeReport> {
        let from = self.opset("").unwrap_or(0);
        let mut report = UpgradeReport { from, to: from.max(target), converted: vec![] };
        if from >= target {
            return Ok(report);
        }
        if target > MAX_UPGRADE_OPSET {
            return Err(Error::MalformedModel(format!(
                "upgrading to opset {target} is not supported (conversions are implemented up to opset \
                 {MAX_UPGRADE_OPSET})"
            )));
        }
        if from < 7 {
            return Err(Error::MalformedModel(format!("opset {from} is older than 7; upgrading it is not supported")));
        }
        let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
        for n in &self.graph.nodes {
            taken.insert(n.name().to_string());
            taken.extend(n.output.iter().cloned());
            taken.extend(n.input.iter().cloned());
        }
        taken.extend(self.graph.initializers.iter().filter_map(|t| t.name.clone()));
        let mut used: std::collections::HashSet<String> =
            self.graph.outputs.iter().filter_map(|o| o.name.clone()).collect();
        fn reads(nodes: &[NodeProto], used: &mut std::collections::HashSet<String>) {
            for n in nodes {
                used.extend(n.input.iter().cloned());
                for a in &n.attribute {
                    for g in a.g.iter().chain(&a.graphs) {
                        reads(&g.node, used);
                        used.extend(g.output.iter().filter_map(|o| o.name.clone()));
                    }
                }
            }
        }
        reads(&self.graph.nodes, &mut used);
        let mut names = Namer { taken: &mut taken, used };
        let nodes = std::mem::take(&mut self.graph.nodes);
        self.graph.nodes = upgrade_graph(nodes, from, &mut names, &mut report.converted)?;
        self.set_opset("", target);
        // Opset 13 needs IR version 7.
        if self.ir_version() < 7 {
            self.set_ir_version(7);
        }
        self.check()?;
        Ok(report)
    }
}
