//! Structured channel pruning that rewrites the dense graph.
//!
//! [`Groups::analyze`] walks the graph once and finds *channel groups*: sets of channels that must be removed
//! together. A group starts at the output channels of a Conv (its *source*); channel-wise ops (activations,
//! pooling, depthwise convolutions) carry it on; a residual Add (or Mul, Max...) of two activations ties the
//! groups on either side into one (a channel is removed from every branch or from none); a Concat on the channel
//! axis places groups side by side (each keeps its own offset). Where a group ends it is read by a Conv (its input
//! channels), or a Gemm after global pooling. A group that reaches anything else (a graph output, a reshape
//! that mixes channels, a grouped convolution, an op this pass does not know) is *blocked*: never pruned.
//!
//! [`Groups::prune`] removes chosen channels: source filters and biases, depthwise filters, biases and `group`,
//! consumer input slices. With channel statistics it repairs each consumer without training: the mean
//! contribution of a removed input channel (Σ taps W·E\[x\]) moves into the consumer's bias.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use edgepack_runtime::onnx::builder::tensor_f32;
use edgepack_runtime::onnx::passes::tensor_f32_values;
use edgepack_runtime::onnx::{Model, NodeExt, NodeProto};

use super::PruneError;
use super::stats::ChannelStats;

/// Where a group's channels appear in the graph's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Use {
    /// Output channels of a Conv: filters (weight axis 0) and bias.
    Source { node: usize },
    /// A depthwise Conv carrying the group: filters and bias at `offset`, and its `group` attribute.
    Depthwise { node: usize, offset: usize },
    /// Input channels of a Conv (weight axis 1) at `offset`.
    ConvInput { node: usize, offset: usize },
    /// Input features of a Gemm after global pooling (B's input axis) at `offset`.
    GemmInput { node: usize, offset: usize },
}

/// A set of channels removed together.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Group {
    /// Name: the first source Conv's node name.
    pub name: String,
    pub channels: usize,
    /// Source Conv node names (several when residual Adds tie them).
    pub sources: Vec<String>,
    #[serde(skip)]
    pub uses: Vec<Use>,
    /// Why it cannot be pruned.
    pub blocked: Option<String>,
}

impl Group {
    pub fn prunable(&self) -> bool {
        self.blocked.is_none() && self.channels >= 2
    }
}

/// A segment of a value's channel axis: `len` channels of group `group`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Seg {
    group: usize,
    len: usize,
}

/// The channel layout of a value (NCHW axis 1), and whether its spatial dims are 1 (after global pooling).
#[derive(Debug, Clone)]
struct Layout {
    segs: Vec<Seg>,
    spatial_one: bool,
}

/// The groups of a model, found by [`Groups::analyze`].
#[derive(Debug, Clone)]
pub struct Groups {
    /// Root groups only (ties resolved), in graph order.
    pub groups: Vec<Group>,
}

/// Channel-wise unary ops (output channel c depends on input channel c only).
const UNARY: &[&str] = &[
    "Relu",
    "Clip",
    "LeakyRelu",
    "PRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Elu",
    "Selu",
    "Softplus",
    "Dropout",
    "Identity",
    "Neg",
    "Abs",
    "Sqrt",
    "Exp",
    "Gelu",
];
/// The channel-wise unary ops that commute with a positive per-channel scale (f(s·x) = s·f(x), s > 0): what may
/// carry a group that [`Groups::rescale`] scales.
const HOMOGENEOUS_UNARY: &[&str] = &["Relu", "LeakyRelu", "PRelu", "Dropout", "Identity", "Neg", "Abs"];
const POOLS: &[&str] = &["MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"];
const BINARY: &[&str] = &["Add", "Sub", "Mul", "Div", "Max", "Min", "Sum"];

struct Walker {
    parent: Vec<usize>,
    groups: Vec<Group>,
}

impl Walker {
    fn find(&mut self, g: usize) -> usize {
        let mut r = g;
        while self.parent[r] != r {
            r = self.parent[r];
        }
        let mut x = g;
        while self.parent[x] != r {
            let next = self.parent[x];
            self.parent[x] = r;
            x = next;
        }
        r
    }
    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            let (lo, hi) = if a < b { (a, b) } else { (b, a) };
            self.parent[hi] = lo;
        }
    }
    fn new_group(&mut self, name: &str, channels: usize, node: usize) -> usize {
        let id = self.groups.len();
        self.parent.push(id);
        self.groups.push(Group {
            name: name.to_string(),
            channels,
            sources: vec![name.to_string()],
            uses: vec![Use::Source { node }],
            blocked: None,
        });
        id
    }
    fn block(&mut self, l: &Layout, why: String) {
        for s in &l.segs {
            if self.groups[s.group].blocked.is_none() {
                self.groups[s.group].blocked = Some(why.clone());
            }
        }
    }
    fn add_uses(&mut self, l: &Layout, make: impl Fn(usize) -> Use) {
        let mut off = 0;
        for s in &l.segs {
            self.groups[s.group].uses.push(make(off));
            off += s.len;
        }
    }
}

fn is_scalar_initializer(model: &Model, name: &str) -> bool {
    model.graph.initializer(name).is_some_and(|t| t.dims.iter().product::<i64>() == 1)
}

fn dims_of(model: &Model, name: &str) -> Option<Vec<usize>> {
    model.graph.initializer(name).map(|t| t.dims.iter().map(|&d| d.max(0) as usize).collect())
}

/// A Reshape/Flatten/Squeeze after global pooling that only drops the 1×1 spatial dims.
fn flattens_pooled(model: &Model, n: &NodeProto) -> bool {
    match n.op() {
        "Flatten" => n.attr_i("axis").unwrap_or(1) == 1,
        "Squeeze" => true,
        "Reshape" => {
            let Some(t) = n.input.get(1).and_then(|s| model.graph.initializer(s)) else { return false };
            let v: Vec<i64> = match (&t.raw_data, t.int64_data.is_empty()) {
                (Some(r), _) => r.as_chunks::<8>().0.iter().map(|c| i64::from_le_bytes(*c)).collect(),
                (None, _) => t.int64_data.clone(),
            };
            v.len() == 2 && matches!(v[0], -1..=1) && v[1] == -1
        }
        _ => false,
    }
}

impl Groups {
    /// Finds the channel groups of `model` (nodes in topological order, as the passes keep them).
    pub fn analyze(model: &Model) -> Groups {
        Self::analyze_with(model, false)
    }

    /// Groups whose channels can be rescaled without changing the model's function: as [`Groups::analyze`], but a
    /// group is carried only by ops that commute with a positive per-channel scale (ReLU-like activations, pools,
    /// Concat, sums and maxima of tied activations, products with a scalar constant); any other op blocks it. What
    /// activation equalization ([`crate::equalize`]) scales.
    pub fn analyze_scalable(model: &Model) -> Groups {
        Self::analyze_with(model, true)
    }

    fn analyze_with(model: &Model, homogeneous: bool) -> Groups {
        let g = &model.graph;
        let mut w = Walker { parent: vec![], groups: vec![] };
        let mut layouts: HashMap<String, Layout> = HashMap::new();
        for (i, n) in g.nodes.iter().enumerate() {
            let ins: Vec<Option<Layout>> =
                n.input.iter().map(|s| if s.is_empty() { None } else { layouts.get(s).cloned() }).collect();
            let first = ins.first().cloned().flatten();
            let out0 = n.output.first().cloned().unwrap_or_default();
            let op = n.op();
            let block_all = |w: &mut Walker, why: String| {
                for l in ins.iter().flatten() {
                    w.block(l, why.clone());
                }
            };
            if !n.domain_name().is_empty() && n.domain_name() != "ai.onnx" {
                block_all(&mut w, format!("read by {}::{op} `{}`", n.domain_name(), n.name()));
                continue;
            }
            match op {
                "Conv" => {
                    let wd = n.input.get(1).and_then(|s| dims_of(model, s));
                    let bias_ok = n.input.get(2).is_none_or(|b| b.is_empty() || g.initializer(b).is_some());
                    let Some(wd) = wd.filter(|d| d.len() >= 3 && bias_ok) else {
                        block_all(&mut w, format!("read by Conv `{}` whose weights are not constant", n.name()));
                        continue;
                    };
                    let groups = n.attr_i("group").unwrap_or(1).max(1) as usize;
                    let (c_out, c_in_g) = (wd[0], wd[1]);
                    if ins.iter().skip(1).any(Option::is_some) {
                        block_all(&mut w, format!("weights of Conv `{}`", n.name()));
                        continue;
                    }
                    if groups == 1 {
                        if let Some(l) = &first {
                            w.add_uses(l, |offset| Use::ConvInput { node: i, offset });
                        }
                        let id = w.new_group(n.name(), c_out, i);
                        layouts.insert(out0, Layout { segs: vec![Seg { group: id, len: c_out }], spatial_one: false });
                    } else if c_in_g == 1 && c_out == groups {
                        // Depthwise, multiplier 1: channel c in, channel c out.
                        match first {
                            Some(l) => {
                                w.add_uses(&l, |offset| Use::Depthwise { node: i, offset });
                                layouts.insert(out0, Layout { segs: l.segs, spatial_one: false });
                            }
                            None => {
                                // Fed by a graph input: its output channels are its own group, fixed by the input.
                                let id = w.new_group(n.name(), c_out, i);
                                w.groups[id].blocked =
                                    Some(format!("depthwise Conv `{}` reads a graph input", n.name()));
                                layouts.insert(
                                    out0,
                                    Layout { segs: vec![Seg { group: id, len: c_out }], spatial_one: false },
                                );
                            }
                        }
                    } else {
                        block_all(&mut w, format!("read by grouped Conv `{}` (group {groups})", n.name()));
                    }
                }
                op if homogeneous && UNARY.contains(&op) && !HOMOGENEOUS_UNARY.contains(&op) => {
                    block_all(&mut w, format!("read by {op} `{}`, which a channel scale does not pass", n.name()));
                }
                op if UNARY.contains(&op) || POOLS.contains(&op) => {
                    let extra_ok = n.input.iter().skip(1).all(|s| s.is_empty() || is_scalar_initializer(model, s));
                    let extra_outputs = n.output.iter().skip(1).any(|s| !s.is_empty());
                    match first {
                        Some(l) if extra_ok && !extra_outputs => {
                            let spatial_one = l.spatial_one || op.starts_with("Global");
                            layouts.insert(out0, Layout { segs: l.segs, spatial_one });
                        }
                        _ => block_all(&mut w, format!("read by {op} `{}` with per-channel or extra values", n.name())),
                    }
                }
                op if BINARY.contains(&op) => {
                    let acts: Vec<&Layout> = ins.iter().flatten().collect();
                    let others_scalar = n
                        .input
                        .iter()
                        .zip(&ins)
                        .filter(|(_, l)| l.is_none())
                        .all(|(s, _)| s.is_empty() || is_scalar_initializer(model, s));
                    let shapes_match = acts.windows(2).all(|p| {
                        p[0].segs.len() == p[1].segs.len()
                            && p[0].segs.iter().zip(&p[1].segs).all(|(a, b)| a.len == b.len)
                            && p[0].spatial_one == p[1].spatial_one
                    });
                    if acts.is_empty() {
                        continue;
                    }
                    // A channel scale passes a sum or maximum of activations scaled alike, and a product with
                    // (or a quotient by) a constant; not a product of two activations nor an added constant.
                    let all_acts = acts.len() == n.input.iter().filter(|s| !s.is_empty()).count();
                    let scalable = if acts.len() >= 2 {
                        all_acts && matches!(op, "Add" | "Sub" | "Max" | "Min" | "Sum")
                    } else {
                        op == "Mul" || (op == "Div" && ins.first().is_some_and(Option::is_some))
                    };
                    if homogeneous && !scalable {
                        block_all(&mut w, format!("read by {op} `{}`, which a channel scale does not pass", n.name()));
                        continue;
                    }
                    if !others_scalar || !shapes_match {
                        block_all(
                            &mut w,
                            format!("read by {op} `{}` with a non-scalar constant or mixed layouts", n.name()),
                        );
                        continue;
                    }
                    let base = acts[0].clone();
                    for other in &acts[1..] {
                        for (a, b) in base.segs.iter().zip(&other.segs) {
                            w.union(a.group, b.group);
                        }
                    }
                    layouts.insert(out0, base);
                }
                "Concat" if n.attr_i("axis") == Some(1) && ins.iter().all(Option::is_some) => {
                    let parts: Vec<&Layout> = ins.iter().flatten().collect();
                    let spatial_one = parts.iter().all(|l| l.spatial_one);
                    let segs = parts.iter().flat_map(|l| l.segs.iter().copied()).collect();
                    layouts.insert(out0, Layout { segs, spatial_one });
                }
                "Flatten" | "Reshape" | "Squeeze" if first.as_ref().is_some_and(|l| l.spatial_one) => {
                    let l = first.unwrap();
                    if flattens_pooled(model, n) {
                        layouts.insert(out0, l);
                    } else {
                        w.block(&l, format!("reshaped by {op} `{}`", n.name()));
                    }
                }
                "Gemm" if first.as_ref().is_some_and(|l| l.spatial_one) && ins.iter().skip(1).all(Option::is_none) => {
                    let l = first.unwrap();
                    let b_ok = n.input.get(1).and_then(|s| dims_of(model, s)).is_some_and(|d| d.len() == 2);
                    let c_ok = n.input.get(2).is_none_or(|c| c.is_empty() || g.initializer(c).is_some());
                    if n.attr_i("transA").unwrap_or(0) != 0 || !b_ok || !c_ok {
                        w.block(&l, format!("read by Gemm `{}` (transposed A or non-constant B/C)", n.name()));
                    } else {
                        w.add_uses(&l, |offset| Use::GemmInput { node: i, offset });
                    }
                }
                _ => block_all(&mut w, format!("read by {op} `{}`", n.name())),
            }
        }
        for o in &g.outputs {
            if let Some(l) = o.name.as_ref().and_then(|n| layouts.get(n)).cloned() {
                w.block(&l, format!("reaches the graph output `{}`", o.name.as_deref().unwrap_or("")));
            }
        }
        // Merge tied groups into their roots.
        let n = w.groups.len();
        let mut merged: BTreeMap<usize, Group> = BTreeMap::new();
        for id in 0..n {
            let r = w.find(id);
            let grp = w.groups[id].clone();
            match merged.get_mut(&r) {
                None => {
                    merged.insert(r, grp);
                }
                Some(root) => {
                    root.sources.extend(grp.sources);
                    root.uses.extend(grp.uses);
                    if root.blocked.is_none() {
                        root.blocked = grp.blocked;
                    }
                    if root.channels != grp.channels {
                        root.blocked = Some(format!("tied groups of {} and {} channels", root.channels, grp.channels));
                    }
                }
            }
        }
        Groups { groups: merged.into_values().collect() }
    }

    pub fn prunable(&self) -> impl Iterator<Item = (usize, &Group)> {
        self.groups.iter().enumerate().filter(|(_, g)| g.prunable())
    }

    pub fn by_name(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.name == name)
    }

    /// Importance of each channel of group `gi` (higher = keep). See [`Criterion`](super::Criterion).
    pub fn importance(
        &self,
        model: &Model,
        gi: usize,
        criterion: super::Criterion,
        stats: Option<&ChannelStats>,
        bn_scales: &HashMap<String, Vec<f32>>,
    ) -> Result<Vec<f64>, PruneError> {
        use super::Criterion as C;
        let grp = &self.groups[gi];
        let mut score = vec![0f64; grp.channels];
        let g = &model.graph;
        for u in &grp.uses {
            match (*u, criterion) {
                (Use::Source { node }, C::L1 | C::L2) => {
                    let (wd, wv) = weights(model, node)?;
                    let per = wv.len() / wd[0];
                    for (c, s) in score.iter_mut().enumerate() {
                        let f = &wv[c * per..(c + 1) * per];
                        *s += match criterion {
                            C::L1 => f.iter().map(|x| x.abs() as f64).sum::<f64>() / per as f64,
                            _ => (f.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / per as f64).sqrt(),
                        };
                    }
                }
                (Use::Source { node }, C::BnScale) => {
                    let name = g.nodes[node].name();
                    let sc = bn_scales.get(name).ok_or_else(|| {
                        PruneError::Invalid(format!(
                            "criterion bn-scale: Conv `{name}` is not followed by a BatchNormalization"
                        ))
                    })?;
                    for (s, v) in score.iter_mut().zip(sc) {
                        *s += v.abs() as f64;
                    }
                }
                (
                    Use::ConvInput { node, offset } | Use::GemmInput { node, offset },
                    C::Contribution | C::Reconstruction,
                ) => {
                    let st = stats.ok_or_else(|| {
                        PruneError::Invalid(format!("criterion {criterion:?} needs calibration samples").to_lowercase())
                    })?;
                    let input = &g.nodes[node].input[0];
                    let ch = st.get(input).ok_or_else(|| {
                        PruneError::Invalid(format!(
                            "no statistics for `{input}` (input of `{}`)",
                            g.nodes[node].name()
                        ))
                    })?;
                    let (wd, wv) = weights(model, node)?;
                    let is_gemm = matches!(u, Use::GemmInput { .. });
                    let residual = if criterion == C::Reconstruction { conditional_variances(ch) } else { None };
                    for (c, s) in score.iter_mut().enumerate() {
                        let j = offset + c;
                        let norm2: f64 = if is_gemm {
                            gemm_column(&g.nodes[node], &wd, &wv, j).map(|x| (x as f64).powi(2)).sum()
                        } else {
                            conv_input_slice(&wd, &wv, j).map(|x| (x as f64).powi(2)).sum()
                        };
                        *s += match &residual {
                            // What the consumer's output loses when channel j is rebuilt from all the others.
                            Some(v) => norm2 * v.get(j).copied().unwrap_or(0.0),
                            None => ch.mean_abs.get(j).copied().unwrap_or(0.0) as f64 * norm2.sqrt(),
                        };
                    }
                }
                _ => {}
            }
        }
        Ok(score)
    }

    /// The model with channels `remove[group]` (indices within each group) taken out. With `stats` (per-channel
    /// means of consumer inputs on calibration samples), each consumer's bias absorbs the mean contribution of
    /// the channels it loses.
    pub fn prune(
        &self,
        model: &Model,
        remove: &BTreeMap<usize, Vec<usize>>,
        stats: Option<&ChannelStats>,
    ) -> Result<Model, PruneError> {
        // Per node: output channels to drop (source/depthwise) and input channels to drop (consumers).
        let mut out_rm: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        let mut in_rm: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        let mut depthwise: BTreeSet<usize> = BTreeSet::new();
        for (&gi, chans) in remove {
            let grp = self.groups.get(gi).ok_or_else(|| PruneError::Invalid(format!("no group {gi}")))?;
            if chans.is_empty() {
                continue;
            }
            if !grp.prunable() {
                return Err(PruneError::Invalid(format!("group `{}` cannot be pruned", grp.name)));
            }
            if chans.len() >= grp.channels || chans.iter().any(|&c| c >= grp.channels) {
                return Err(PruneError::Invalid(format!(
                    "group `{}`: cannot remove {} of {} channels",
                    grp.name,
                    chans.len(),
                    grp.channels
                )));
            }
            for u in &grp.uses {
                match *u {
                    Use::Source { node } => out_rm.entry(node).or_default().extend(chans.iter().copied()),
                    Use::Depthwise { node, offset } => {
                        depthwise.insert(node);
                        out_rm.entry(node).or_default().extend(chans.iter().map(|c| c + offset));
                    }
                    Use::ConvInput { node, offset } | Use::GemmInput { node, offset } => {
                        in_rm.entry(node).or_default().extend(chans.iter().map(|c| c + offset))
                    }
                }
            }
        }
        let mut m = model.clone();
        // Consumers first (bias correction reads the original weights of the removed inputs).
        for (&node, rm) in &in_rm {
            let n = m.graph.nodes[node].clone();
            let (wd, wv) = weights(&m, node)?;
            let is_gemm = n.op() == "Gemm";
            let c_out = if is_gemm { gemm_outputs(&n, &wd) } else { wd[0] };
            let mut wv = wv;
            if let Some(st) = stats {
                let ch = st.get(&n.input[0]).ok_or_else(|| {
                    PruneError::Invalid(format!("no statistics for `{}` (input of `{}`)", n.input[0], n.name()))
                })?;
                let c_in = if is_gemm { wv.len() / c_out } else { wd[1] };
                let taps = if is_gemm { 1 } else { wd[2..].iter().product() };
                // Index of weight (o, j, t) in the stored layout.
                let trans_b = n.attr_i("transB").unwrap_or(0) != 0;
                let at = |o: usize, j: usize, t: usize| -> usize {
                    if !is_gemm {
                        (o * c_in + j) * taps + t
                    } else if trans_b {
                        o * c_in + j
                    } else {
                        j * c_out + o
                    }
                };
                let alpha = if is_gemm { n.attr_f("alpha").unwrap_or(1.0) as f64 } else { 1.0 };
                // Removed inputs rebuilt from the kept ones: x_r ≈ Σ_k B[r,k]·x_k + c_r (least squares on the
                // samples; B = 0, c = E[x_r] without second moments, which is plain bias correction).
                let (keep, b, c) = reconstruction(ch, rm, c_in);
                let mut bias: Vec<f64> = bias_of(&m, &n, c_out)?.iter().map(|&v| v as f64).collect();
                for (ri, &r) in rm.iter().enumerate() {
                    for o in 0..c_out {
                        for t in 0..taps {
                            let w = wv[at(o, r, t)] as f64;
                            if w == 0.0 {
                                continue;
                            }
                            bias[o] += alpha * w * c[ri];
                            if !b.is_empty() {
                                for (ki, &k) in keep.iter().enumerate() {
                                    let idx = at(o, k, t);
                                    wv[idx] = (wv[idx] as f64 + w * b[ri * keep.len() + ki]) as f32;
                                }
                            }
                        }
                    }
                }
                set_bias(&mut m, node, bias.iter().map(|&v| v as f32).collect())?;
            }
            let axis = if is_gemm { usize::from(n.attr_i("transB").unwrap_or(0) != 0) } else { 1 };
            let (nd, nv) = remove_along(&wd, &wv, axis, rm);
            set_weights(&mut m, node, nd, nv)?;
        }
        for (&node, rm) in &out_rm {
            let n = m.graph.nodes[node].clone();
            let (wd, wv) = weights(&m, node)?;
            let (nd, nv) = remove_along(&wd, &wv, 0, rm);
            let keep_out = nd[0];
            set_weights(&mut m, node, nd, nv)?;
            if n.input.get(2).is_some_and(|b| !b.is_empty()) {
                let b = bias_of(&m, &n, wd[0])?;
                let (_, nb) = remove_along(&[wd[0]], &b, 0, rm);
                set_bias(&mut m, node, nb)?;
            }
            if depthwise.contains(&node) {
                let node_mut = &mut m.graph.nodes[node];
                for a in node_mut.attribute.iter_mut() {
                    if a.name.as_deref() == Some("group") {
                        a.i = Some(keep_out as i64);
                    }
                }
            }
        }
        // Intermediate shape annotations would pin the old channel counts; initializers listed as graph inputs
        // (IR < 4 files) would declare the old weight shapes.
        m.graph.value_info.clear();
        let inits: BTreeSet<String> = m.graph.initializers.iter().filter_map(|t| t.name.clone()).collect();
        m.graph.inputs.retain(|v| !v.name.as_ref().is_some_and(|n| inits.contains(n)));
        Ok(m)
    }

    /// The model with channel `c` of group `gi` divided by `scales[&gi][c]` where the group starts (its source
    /// Convs' filters and biases, and the biases of the depthwise Convs that carry it) and multiplied back where
    /// it is read (its consumers' input weights). For groups of [`Groups::analyze_scalable`] and positive scales
    /// the function is unchanged; only how its values spread over channels (and so over an INT8 range) moves.
    pub fn rescale(&self, model: &Model, scales: &BTreeMap<usize, Vec<f32>>) -> Result<Model, PruneError> {
        // Per node: a divisor per output channel (sources: filters and bias; depthwise: bias) and a factor per
        // input channel (consumers).
        let mut out_div: BTreeMap<usize, (bool, BTreeMap<usize, f32>)> = BTreeMap::new();
        let mut in_mul: BTreeMap<usize, BTreeMap<usize, f32>> = BTreeMap::new();
        for (&gi, sc) in scales {
            let grp = self.groups.get(gi).ok_or_else(|| PruneError::Invalid(format!("no group {gi}")))?;
            if grp.blocked.is_some() || sc.len() != grp.channels || sc.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                return Err(PruneError::Invalid(format!("group `{}` cannot take these scales", grp.name)));
            }
            for u in &grp.uses {
                let (map, offset) = match *u {
                    Use::Source { node } => (&mut out_div.entry(node).or_insert((true, BTreeMap::new())).1, 0),
                    Use::Depthwise { node, offset } => {
                        (&mut out_div.entry(node).or_insert((false, BTreeMap::new())).1, offset)
                    }
                    Use::ConvInput { node, offset } | Use::GemmInput { node, offset } => {
                        (in_mul.entry(node).or_default(), offset)
                    }
                };
                map.extend(sc.iter().enumerate().map(|(c, &s)| (offset + c, s)));
            }
        }
        let mut m = model.clone();
        for (&node, cols) in &in_mul {
            let n = m.graph.nodes[node].clone();
            let (wd, mut wv) = weights(&m, node)?;
            let is_gemm = n.op() == "Gemm";
            let trans_b = n.attr_i("transB").unwrap_or(0) != 0;
            for (i, w) in wv.iter_mut().enumerate() {
                let j = if !is_gemm {
                    (i / wd[2..].iter().product::<usize>()) % wd[1]
                } else if trans_b {
                    i % wd[1]
                } else {
                    i / wd[1]
                };
                if let Some(s) = cols.get(&j) {
                    *w *= s;
                }
            }
            set_weights_as(&mut m, node, wd, wv, "equalized")?;
        }
        for (&node, (filters, rows)) in &out_div {
            let n = m.graph.nodes[node].clone();
            let (wd, mut wv) = weights(&m, node)?;
            if *filters {
                let per = wv.len() / wd[0].max(1);
                for (&c, s) in rows {
                    wv[c * per..(c + 1) * per].iter_mut().for_each(|w| *w /= s);
                }
                set_weights_as(&mut m, node, wd.clone(), wv, "equalized")?;
            }
            if n.input.get(2).is_some_and(|b| !b.is_empty()) {
                let mut b = bias_of(&m, &n, wd[0])?;
                for (&c, s) in rows {
                    b[c] /= s;
                }
                set_input_tensor(&mut m, node, 2, vec![wd[0]], b, "equalized")?;
            }
        }
        m.graph.value_info.clear();
        Ok(m)
    }
}

/// Least-squares reconstruction of the removed channels `rm` of a value from its kept channels, from its
/// statistics: (kept indices, B as |rm|×|kept| row-major, intercepts c). Without second moments B is empty and
/// c the removed channels' means. A small ridge keeps the solve stable on rank-deficient samples.
pub(crate) fn reconstruction(
    ch: &super::stats::Channel,
    rm: &BTreeSet<usize>,
    c_in: usize,
) -> (Vec<usize>, Vec<f64>, Vec<f64>) {
    let keep: Vec<usize> = (0..c_in).filter(|j| !rm.contains(j)).collect();
    let mean = |j: usize| ch.mean.get(j).copied().unwrap_or(0.0) as f64;
    let plain = || (keep.clone(), vec![], rm.iter().map(|&r| mean(r)).collect());
    let c = ch.mean.len();
    if ch.second.len() != c * c || c != c_in || keep.is_empty() {
        return plain();
    }
    let cov = |i: usize, j: usize| ch.second[i * c + j] - mean(i) * mean(j);
    let nk = keep.len();
    let diag: f64 = keep.iter().map(|&k| cov(k, k).max(0.0)).sum::<f64>() / nk as f64;
    let ridge = 1e-3 * diag.max(1e-12);
    let mut a = vec![0f64; nk * nk];
    for (i, &ki) in keep.iter().enumerate() {
        for (j, &kj) in keep.iter().enumerate() {
            a[i * nk + j] = cov(ki, kj) + if i == j { ridge } else { 0.0 };
        }
    }
    // Right-hand sides: one column per removed channel, stored as |rm| rows of length nk.
    let mut x: Vec<f64> = rm.iter().flat_map(|&r| keep.iter().map(move |&k| (r, k))).map(|(r, k)| cov(k, r)).collect();
    if !cholesky_solve(&mut a, nk, &mut x) {
        return plain();
    }
    let cs = rm
        .iter()
        .enumerate()
        .map(|(ri, &r)| mean(r) - keep.iter().enumerate().map(|(ki, &k)| x[ri * nk + ki] * mean(k)).sum::<f64>())
        .collect();
    (keep, x, cs)
}

/// Variance of each channel given all the others (1 / (Σ⁻¹)ⱼⱼ of the covariance, with the reconstruction's
/// ridge): the error left after the least-squares rebuild of that channel alone. `None` without second moments.
fn conditional_variances(ch: &super::stats::Channel) -> Option<Vec<f64>> {
    let c = ch.mean.len();
    if ch.second.len() != c * c || c == 0 {
        return None;
    }
    let mean = |j: usize| ch.mean[j] as f64;
    let mut a: Vec<f64> = (0..c * c).map(|k| ch.second[k] - mean(k / c) * mean(k % c)).collect();
    let diag: f64 = (0..c).map(|j| a[j * c + j].max(0.0)).sum::<f64>() / c as f64;
    let ridge = 1e-3 * diag.max(1e-12);
    for j in 0..c {
        a[j * c + j] += ridge;
    }
    let mut inv: Vec<f64> = (0..c * c).map(|k| if k / c == k % c { 1.0 } else { 0.0 }).collect();
    if !cholesky_solve(&mut a, c, &mut inv) {
        return None;
    }
    Some((0..c).map(|j| 1.0 / inv[j * c + j].max(1e-300)).collect())
}

/// Solves A·x = b in place for each length-n row of `rhs` (A symmetric positive definite, overwritten by its
/// Cholesky factor). False when A is not positive definite.
pub(crate) fn cholesky_solve(a: &mut [f64], n: usize, rhs: &mut [f64]) -> bool {
    if !cholesky(a, n) {
        return false;
    }
    for b in rhs.chunks_mut(n) {
        for i in 0..n {
            let mut s = b[i];
            for k in 0..i {
                s -= a[i * n + k] * b[k];
            }
            b[i] = s / a[i * n + i];
        }
        for i in (0..n).rev() {
            let mut s = b[i];
            for k in i + 1..n {
                s -= a[k * n + i] * b[k];
            }
            b[i] = s / a[i * n + i];
        }
    }
    true
}

/// In-place Cholesky factorisation A = L·Lᵀ (L in the lower triangle; the upper one is left as it was). False when
/// A is not positive definite.
pub(crate) fn cholesky(a: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d <= 0.0 || !d.is_finite() {
            return false;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
    }
    true
}

/// Indices of the lowest-importance channels of a group to remove so that `keep` remain (ties: higher index first).
pub fn lowest(score: &[f64], keep: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..score.len()).collect();
    idx.sort_by(|&a, &b| score[a].total_cmp(&score[b]).then(b.cmp(&a)));
    let mut rm: Vec<usize> = idx.into_iter().take(score.len().saturating_sub(keep.max(1))).collect();
    rm.sort_unstable();
    rm
}

/// Channels to keep for a ratio: round(C·(1−r)), rounded up to a multiple of `multiple` (at most C).
pub fn kept_channels(channels: usize, ratio: f64, multiple: usize) -> usize {
    let keep = ((channels as f64) * (1.0 - ratio.clamp(0.0, 1.0))).round().max(1.0) as usize;
    // Rounded up to the kernels' tile: 35 of 40 channels cost what 48 do (an f32 block pads its width to 16), so
    // the count drops to the tile below or stays whole.
    let keep = if multiple > 1 { keep.div_ceil(multiple) * multiple } else { keep };
    keep.min(channels)
}

pub(crate) fn weights(m: &Model, node: usize) -> Result<(Vec<usize>, Vec<f32>), PruneError> {
    let n = &m.graph.nodes[node];
    let name = n.input.get(1).ok_or_else(|| PruneError::Invalid(format!("`{}` has no weights", n.name())))?;
    let t = m.graph.initializer(name).ok_or_else(|| PruneError::Invalid(format!("`{name}` is not constant")))?;
    let v = tensor_f32_values(t)
        .ok_or_else(|| PruneError::Invalid(format!("weights `{name}` of `{}` are not float32", n.name())))?;
    Ok((t.dims.iter().map(|&d| d as usize).collect(), v))
}

/// Writes a node's weights under a name no other node reads (a shared initializer is copied first).
pub(crate) fn set_weights(m: &mut Model, node: usize, dims: Vec<usize>, v: Vec<f32>) -> Result<(), PruneError> {
    set_input_tensor(m, node, 1, dims, v, "pruned")
}

fn set_weights_as(m: &mut Model, node: usize, dims: Vec<usize>, v: Vec<f32>, suffix: &str) -> Result<(), PruneError> {
    set_input_tensor(m, node, 1, dims, v, suffix)
}

pub(crate) fn set_bias(m: &mut Model, node: usize, v: Vec<f32>) -> Result<(), PruneError> {
    let len = v.len();
    set_input_tensor(m, node, 2, vec![len], v, "pruned")
}

/// Writes input `slot` of a node under a name no other node reads (a shared initializer is copied first, under a
/// fresh name ending in `_{suffix}`).
fn set_input_tensor(
    m: &mut Model,
    node: usize,
    slot: usize,
    dims: Vec<usize>,
    v: Vec<f32>,
    suffix: &str,
) -> Result<(), PruneError> {
    let existing = m.graph.nodes[node].input.get(slot).filter(|s| !s.is_empty()).cloned();
    let shared = existing.as_ref().is_some_and(|name| {
        m.graph.nodes.iter().enumerate().filter(|(i, n)| *i != node && n.input.iter().any(|s| s == name)).count() > 0
            || m.graph.outputs.iter().any(|o| o.name.as_ref() == Some(name))
    });
    let name = match existing {
        Some(name) if !shared => name,
        other => {
            let base = other.unwrap_or_else(|| format!("{}_bias", m.graph.nodes[node].name()));
            let fresh = m.graph.unique_name(&format!("{base}_{suffix}"));
            let inputs = &mut m.graph.nodes[node].input;
            while inputs.len() <= slot {
                inputs.push(String::new());
            }
            inputs[slot] = fresh.clone();
            fresh
        }
    };
    let dims_i: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    m.graph.set_initializer(tensor_f32(&name, &dims_i, &v));
    Ok(())
}

/// A node's bias as f32 (zeros when it has none).
pub(crate) fn bias_of(m: &Model, n: &NodeProto, len: usize) -> Result<Vec<f32>, PruneError> {
    match n.input.get(2).filter(|s| !s.is_empty()) {
        None => Ok(vec![0.0; len]),
        Some(b) => {
            let t = m.graph.initializer(b).ok_or_else(|| PruneError::Invalid(format!("bias `{b}` is not constant")))?;
            let v = tensor_f32_values(t).ok_or_else(|| PruneError::Invalid(format!("bias `{b}` is not float32")))?;
            if v.len() == len {
                Ok(v)
            } else if v.len() == 1 {
                Ok(vec![v[0]; len])
            } else {
                Err(PruneError::Invalid(format!("bias `{b}` of `{}` has {} values, expected {len}", n.name(), v.len())))
            }
        }
    }
}

/// Removes indices `rm` along `axis` of a dense row-major tensor.
pub(crate) fn remove_along(dims: &[usize], v: &[f32], axis: usize, rm: &BTreeSet<usize>) -> (Vec<usize>, Vec<f32>) {
    let outer: usize = dims[..axis].iter().product();
    let n = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(v.len());
    for o in 0..outer {
        for k in (0..n).filter(|k| !rm.contains(k)) {
            let at = (o * n + k) * inner;
            out.extend_from_slice(&v[at..at + inner]);
        }
    }
    let mut nd = dims.to_vec();
    nd[axis] = n - rm.iter().filter(|&&k| k < n).count();
    (nd, out)
}

/// Every weight reading input channel `j` of a group-1 Conv (all filters, all taps).
fn conv_input_slice<'a>(dims: &[usize], v: &'a [f32], j: usize) -> impl Iterator<Item = f32> + 'a {
    let (c_out, c_in) = (dims[0], dims[1]);
    let taps: usize = dims[2..].iter().product();
    (0..c_out).flat_map(move |o| v[(o * c_in + j) * taps..(o * c_in + j + 1) * taps].iter().copied())
}

fn gemm_outputs(n: &NodeProto, dims: &[usize]) -> usize {
    if n.attr_i("transB").unwrap_or(0) != 0 { dims[0] } else { dims[1] }
}

/// Output channels of a weight layer from its weight dims: a Conv's filters, a Gemm's outputs, a MatMul's columns.
pub(crate) fn output_channels(n: &NodeProto, dims: &[usize]) -> usize {
    match n.op() {
        "Conv" => dims[0],
        "Gemm" => gemm_outputs(n, dims),
        _ => *dims.last().unwrap_or(&1),
    }
}

fn gemm_weight(n: &NodeProto, dims: &[usize], v: &[f32], o: usize, j: usize) -> f32 {
    let alpha = n.attr_f("alpha").unwrap_or(1.0);
    alpha * if n.attr_i("transB").unwrap_or(0) != 0 { v[o * dims[1] + j] } else { v[j * dims[1] + o] }
}

fn gemm_column<'a>(n: &'a NodeProto, dims: &'a [usize], v: &'a [f32], j: usize) -> impl Iterator<Item = f32> + 'a {
    (0..gemm_outputs(n, dims)).map(move |o| gemm_weight(n, dims, v, o, j))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_along_axes() {
        let dims = [2, 3, 2];
        let v: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let (d, o) = remove_along(&dims, &v, 1, &BTreeSet::from([1]));
        assert_eq!(d, vec![2, 2, 2]);
        assert_eq!(o, vec![0., 1., 4., 5., 6., 7., 10., 11.]);
        let (d, o) = remove_along(&dims, &v, 0, &BTreeSet::from([0]));
        assert_eq!(d, vec![1, 3, 2]);
        assert_eq!(o, (6..12).map(|x| x as f32).collect::<Vec<_>>());
    }

    #[test]
    fn keep_counts_and_lowest() {
        assert_eq!(kept_channels(96, 0.5, 8), 48);
        assert_eq!(kept_channels(96, 0.3, 8), 72); // 67.2 → 67 → 72
        assert_eq!(kept_channels(10, 0.3, 8), 8); // 7 → 8
        assert_eq!(kept_channels(40, 0.125, 16), 40); // 35 → 48 → all 40: no tile saved
        assert_eq!(kept_channels(40, 0.25, 16), 32);
        assert_eq!(kept_channels(10, 0.3, 1), 7);
        assert_eq!(kept_channels(8, 1.0, 1), 1);
        assert_eq!(lowest(&[0.5, 0.1, 0.9, 0.1], 2), vec![1, 3]);
        assert_eq!(lowest(&[0.5, 0.1], 5), Vec::<usize>::new());
    }
}
