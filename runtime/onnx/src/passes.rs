//! Small rewrite passes over [`Graph`] that several consumers need (quantize, the GPU lowering):
//! - [`Graph::name_unnamed_nodes`]: every node gets a unique name, so reports and `--exclude` can point at it;
//! - [`Graph::fold_batchnorm`]: inference BatchNormalization after a Conv is folded into the Conv's weights and bias;
//! - [`Graph::fold_low_bit_weights`]: 4-bit weights (`DequantizeLinear` of a constant int4/uint4, any domain, and
//!   the `Cast` to float and `Reshape` after it) unpacked once to f32 initializers, so no backend needs a 4-bit
//!   type.
//!
//! Each pass keeps the graph's results (up to float rounding) and its value names, except the values it removes.
use std::collections::HashSet;

use super::builder::tensor_f32;
use super::{Graph, NodeExt, NodeProto, TensorProto};

/// Reads an f32 tensor (raw or typed storage); `None` for other types or inconsistent sizes.
pub fn tensor_f32_values(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != Some(1) {
        return None;
    }
    let n: i64 = t.dims.iter().product();
    let v: Vec<f32> = match &t.raw_data {
        Some(raw) => raw.as_chunks::<4>().0.iter().map(|c| f32::from_le_bytes(*c)).collect(),
        None => t.float_data.clone(),
    };
    (v.len() as i64 == n).then_some(v)
}

impl Graph {
    /// Removes nodes none of whose outputs is read (by a node, a subgraph or the graph outputs), repeatedly.
    pub fn remove_dead_nodes(&mut self) -> usize {
        let before = self.nodes.len();
        loop {
            let mut used: std::collections::HashSet<String> =
                self.outputs.iter().filter_map(|o| o.name.clone()).collect();
            for n in &self.nodes {
                used.extend(n.input.iter().cloned());
                crate::collect_subgraph_refs(n, &mut used);
            }
            let n0 = self.nodes.len();
            self.nodes.retain(|n| n.output.iter().any(|o| used.contains(o)));
            if self.nodes.len() == n0 {
                break;
            }
        }
        before - self.nodes.len()
    }

    /// Whether [`Graph::forget_traced_shapes`] would change anything: some graph input has a dim that is not a
    /// fixed number, and there are value_info shapes or fixed output dims.
    pub fn has_traced_shapes(&self) -> bool {
        use super::proto::{tensor_shape_proto::dimension::Value as D, type_proto::Value as T};
        fn shape(v: &super::ValueInfoProto) -> Option<&super::proto::TensorShapeProto> {
            match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(T::TensorType(t)) => t.shape.as_ref(),
                _ => None,
            }
        }
        let fixed = |d: &super::proto::tensor_shape_proto::Dimension| matches!(d.value, Some(D::DimValue(_)));
        let inits: HashSet<&str> = self.initializers.iter().filter_map(|t| t.name.as_deref()).collect();
        let dynamic = self
            .inputs
            .iter()
            .filter(|v| !v.name.as_deref().is_some_and(|n| inits.contains(n)))
            .filter_map(shape)
            .any(|s| !s.dim.iter().all(fixed));
        dynamic
            && (self.value_info.iter().any(|v| shape(v).is_some())
                || self.outputs.iter().filter_map(shape).any(|s| s.dim.iter().any(fixed)))
    }

    /// Forgets the shapes an exporter traced at one input shape when the graph takes other ones: when some graph
    /// input has a dim that is not a fixed number (symbolic, or unknown), every `value_info` keeps its element type
    /// but loses its shape, and the graph outputs' fixed dims become unknown (their symbolic ones and their rank
    /// stay). Exporters with dynamic axes (torch.onnx with `dynamic_axes`, Ultralytics' `dynamic=True`) write
    /// value_info traced at the example input, e.g. `1×16×160×160` after the first Conv of a 320² trace, which
    /// contradicts every other input shape; the shapes at run time are inferred from the concrete inputs instead.
    /// Returns how many annotations were changed (0: a static graph, or nothing to forget).
    pub fn forget_traced_shapes(&mut self) -> usize {
        use super::proto::{tensor_shape_proto::dimension::Value as D, type_proto::Value as T};
        fn tensor(v: &mut super::ValueInfoProto) -> Option<&mut super::proto::type_proto::Tensor> {
            match v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
                Some(T::TensorType(t)) => Some(t),
                _ => None,
            }
        }
        if !self.has_traced_shapes() {
            return 0;
        }
        let mut changed = 0;
        for v in &mut self.value_info {
            if let Some(t) = tensor(v)
                && t.shape.take().is_some()
            {
                changed += 1;
            }
        }
        for v in &mut self.outputs {
            let Some(s) = tensor(v).and_then(|t| t.shape.as_mut()) else { continue };
            let mut any = false;
            for d in &mut s.dim {
                if matches!(d.value, Some(D::DimValue(_))) {
                    d.value = None;
                    any = true;
                }
            }
            changed += usize::from(any);
        }
        changed
    }

    /// Makes a graph that is written for one sample take batches: every graph input and output whose leading
    /// dim is fixed at 1 gets a symbolic one (`batch`), intermediate shape annotations are dropped (they would pin
    /// it), and a Reshape whose target shape is a constant starting with 1 copies the leading dim instead (0; a
    /// new initializer when the constant is shared). Returns how many inputs were freed (0: the graph is left as
    /// it was). Structural only: a graph that mixes samples (a Reshape folding the batch into another dim, a
    /// reduction over dim 0) is not detected here; callers compare batched results with single runs.
    pub fn free_batch_dim(&mut self) -> usize {
        use super::proto::{tensor_shape_proto::dimension::Value as D, type_proto::Value as T};
        fn free(v: &mut super::ValueInfoProto) -> bool {
            let Some(T::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) else { return false };
            match t.shape.as_mut().and_then(|s| s.dim.first_mut()) {
                Some(d) if d.value == Some(D::DimValue(1)) => {
                    d.value = Some(D::DimParam("batch".into()));
                    true
                }
                _ => false,
            }
        }
        let inits: HashSet<String> = self.initializers.iter().filter_map(|t| t.name.clone()).collect();
        // `free` changes nothing when it returns false: a graph with no such input is left as it was.
        let freed = self
            .inputs
            .iter_mut()
            .filter(|v| !v.name.as_deref().is_some_and(|n| inits.contains(n)))
            .map(free)
            .filter(|&f| f)
            .count();
        if freed == 0 {
            return 0;
        }
        self.constants_to_initializers();
        for v in &mut self.outputs {
            free(v);
        }
        self.value_info.clear();
        let mut added = Vec::new();
        for k in 0..self.nodes.len() {
            let n = &self.nodes[k];
            if n.op() != "Reshape" || n.attr_i("allowzero").unwrap_or(0) != 0 {
                continue;
            }
            let Some(t) = n.input.get(1).and_then(|s| self.initializer(s)) else { continue };
            if t.data_type != Some(7) {
                continue;
            }
            let Ok(shape) = super::tensor_from_proto(t).map(|t| t.to_f32_vec()) else { continue };
            if shape.len() < 2 || shape[0] != 1.0 {
                continue;
            }
            let name = format!("{}_batch", t.name.as_deref().unwrap_or("shape"));
            let mut v: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
            v[0] = 0;
            if self.initializer(&name).is_none()
                && !added.iter().any(|t: &TensorProto| t.name.as_deref() == Some(&name))
            {
                added.push(super::builder::tensor_i64(&name, &[v.len() as i64], &v));
            }
            self.nodes[k].input[1] = name;
        }
        self.initializers.extend(added);
        self.remove_unused_initializers();
        freed
    }

    /// Names every unnamed node `{op}_{first output}` (made unique). Returns how many were named.
    pub fn name_unnamed_nodes(&mut self) -> usize {
        let mut taken: HashSet<String> = self.nodes.iter().map(|n| n.name().to_string()).collect();
        let mut named = 0;
        for n in &mut self.nodes {
            if !n.name().is_empty() {
                continue;
            }
            let out = n.output.first().filter(|o| !o.is_empty()).cloned().unwrap_or_else(|| "node".into());
            let base = format!("{}_{}", n.op(), out);
            let mut name = base.clone();
            let mut i = 1;
            while taken.contains(&name) {
                name = format!("{base}_{i}");
                i += 1;
            }
            taken.insert(name.clone());
            n.name = Some(name);
            named += 1;
        }
        named
    }

    /// Turns top-level `Constant` nodes holding a tensor (`value`) into initializers of the same name, so passes
    /// that look for constant weights (BatchNorm folding, quantization) see them. Returns how many moved.
    pub fn constants_to_initializers(&mut self) -> usize {
        let mut moved = Vec::new();
        self.nodes.retain(|n| {
            let tensor = (n.op() == "Constant" && n.output.len() == 1)
                .then(|| n.attr("value").and_then(|a| a.t.clone()))
                .flatten();
            match tensor {
                Some(mut t) => {
                    t.name = Some(n.output[0].clone());
                    moved.push(t);
                    false
                }
                None => true,
            }
        });
        let count = moved.len();
        self.initializers.extend(moved);
        count
    }

    /// Folds `Conv → BatchNormalization` (inference form, constant parameters, the Conv output read by the BN
    /// only) into the Conv: `W' = W·γ/√(σ²+ε)` per output channel, `b' = (b − μ)·γ/√(σ²+ε) + β`. The BN output
    /// name is kept (now produced by the Conv). Returns the names of the folded BN nodes.
    pub fn fold_batchnorm(&mut self) -> Vec<String> {
        let mut folded = Vec::new();
        let mut i = 0;
        while i < self.nodes.len() {
            if self.nodes[i].op() == "BatchNormalization"
                && let Some(done) = self.try_fold_bn(i)
            {
                folded.push(done);
                continue; // node i was removed; the next one moved into its place
            }
            i += 1;
        }
        if !folded.is_empty() {
            self.remove_unused_initializers();
        }
        folded
    }

    /// An inference `BatchNormalization` node's per-channel factor `γ/√(σ²+ε)`, its mean and its `β`, when its four
    /// parameters are f32 initializers of `c` values: the BN is `(x − mean)·k + β`.
    pub fn batchnorm_scale(&self, bn: &NodeProto, c: usize) -> Option<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let get = |k: usize| self.initializer(bn.input.get(k)?).and_then(tensor_f32_values).filter(|v| v.len() == c);
        let (gamma, beta, mean, var) = (get(1)?, get(2)?, get(3)?, get(4)?);
        let eps = bn.attr_f("epsilon").unwrap_or(1e-5);
        let k: Vec<f32> = (0..c).map(|j| gamma[j] / (var[j] + eps).sqrt()).collect();
        Some((k, mean, beta))
    }

    fn try_fold_bn(&mut self, bn_idx: usize) -> Option<String> {
        let bn = self.nodes[bn_idx].clone();
        // Training-mode outputs (mean/var) must be absent.
        if bn.output.iter().skip(1).any(|o| !o.is_empty()) || bn.input.len() != 5 {
            return None;
        }
        let x = &bn.input[0];
        let conv_idx = *self.producers().get(x.as_str())?;
        let conv = self.nodes[conv_idx].clone();
        if conv.op() != "Conv"
            || self.consumers(x).len() != 1
            || self.outputs.iter().any(|o| o.name.as_ref() == Some(x))
        {
            return None;
        }
        let get = |name: &str| self.initializer(name).and_then(tensor_f32_values);
        let w_t = self.initializer(conv.input.get(1)?)?.clone();
        let w = tensor_f32_values(&w_t)?;
        let c = *w_t.dims.first()? as usize;
        if c == 0 {
            return None;
        }
        let (k, mean, beta) = self.batchnorm_scale(&bn, c)?;
        let b = match conv.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) => {
                let v = get(b)?;
                (v.len() == c).then_some(v)?
            }
            None => vec![0.0; c],
        };
        let inner = w.len() / c;
        let w2: Vec<f32> = w.iter().enumerate().map(|(i, &v)| v * k[i / inner]).collect();
        let b2: Vec<f32> = (0..c).map(|j| (b[j] - mean[j]) * k[j] + beta[j]).collect();
        let w_name = self.unique_name(&format!("{}_bnfolded_W", conv.name()));
        self.set_initializer(tensor_f32(&w_name, &w_t.dims, &w2));
        let b_name = self.unique_name(&format!("{}_bnfolded_B", conv.name()));
        self.set_initializer(tensor_f32(&b_name, &[c as i64], &b2));
        let out = bn.output[0].clone();
        let conv_node = &mut self.nodes[conv_idx];
        conv_node.input.truncate(1);
        conv_node.input.push(w_name);
        conv_node.input.push(b_name);
        conv_node.output[0] = out;
        self.nodes.remove(bn_idx);
        Some(bn.name().to_string())
    }
}

impl Graph {
    /// ONNX element type (data type code) of every value that can be inferred from the declared types, the
    /// initializers and the ops' typing rules: shape arithmetic (`Shape`, `Size`, comparisons, `Cast`...) is told
    /// apart from float activations even when the file declares no intermediate types. Values whose type cannot
    /// be inferred are absent.
    pub fn infer_elem_types(&self) -> std::collections::HashMap<String, i32> {
        use std::collections::HashMap;
        let mut t: HashMap<String, i32> = HashMap::new();
        for v in self.inputs.iter().chain(&self.outputs).chain(&self.value_info) {
            if let (Some(name), Some(vt)) = (v.name.as_ref(), super::value_info_type(v))
                && vt.elem_type != 0
            {
                t.insert(name.clone(), vt.elem_type);
            }
        }
        for i in &self.initializers {
            if let (Some(name), Some(dt)) = (i.name.as_ref(), i.data_type) {
                t.insert(name.clone(), dt);
            }
        }
        const INT64: i32 = 7;
        const BOOL: i32 = 9;
        for n in &self.nodes {
            let first = n.input.first().and_then(|i| t.get(i)).copied();
            let out: Option<i32> = match n.op() {
                "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" => Some(INT64),
                "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And" | "Or" | "Xor"
                | "IsNaN" | "IsInf" => Some(BOOL),
                "Cast" => n.attr_i("to").map(|v| v as i32),
                "CastLike" => n.input.get(1).and_then(|i| t.get(i)).copied(),
                "Constant" => n.attr("value").and_then(|a| a.t.as_ref()).and_then(|x| x.data_type).or_else(|| {
                    n.attr("value_float")
                        .or(n.attr("value_floats"))
                        .map(|_| 1)
                        .or_else(|| n.attr("value_int").or(n.attr("value_ints")).map(|_| INT64))
                }),
                "ConstantOfShape" => n.attr("value").and_then(|a| a.t.as_ref()).and_then(|x| x.data_type).or(Some(1)),
                "QuantizeLinear" => n.input.get(2).and_then(|i| t.get(i)).copied().or(Some(2)),
                "DequantizeLinear" => n.input.get(1).and_then(|i| t.get(i)).copied().or(Some(1)),
                "Where" => n.input.get(1).and_then(|i| t.get(i)).copied(),
                "TopK" => None, // two outputs of different types: handled below
                "If" | "Loop" | "Scan" => None,
                // Everything else keeps the type of its first (data) input: element-wise ops, Gather, Concat,
                // Reshape, Slice, Squeeze, Unsqueeze, Transpose, Conv, pools, Range...
                _ => first,
            };
            if n.op() == "TopK" {
                if let (Some(v), Some(f)) = (n.output.first(), first) {
                    t.insert(v.clone(), f);
                }
                if let Some(i) = n.output.get(1) {
                    t.insert(i.clone(), INT64);
                }
                continue;
            }
            if let Some(dt) = out {
                for o in n.output.iter().filter(|o| !o.is_empty()) {
                    t.entry(o.clone()).or_insert(dt);
                }
            }
        }
        t
    }
}

/// The integers of a packed 4-bit tensor (uint4 21, int4 22; the first value in the low nibble).
pub fn unpack_4bit(t: &TensorProto) -> Option<Vec<i32>> {
    let signed = match t.data_type {
        Some(22) => true,
        Some(21) => false,
        _ => return None,
    };
    let n: i64 = t.dims.iter().product();
    let bytes: Vec<u8> = match &t.raw_data {
        Some(raw) => raw.clone(),
        None => t.int32_data.iter().map(|&v| v as u8).collect(),
    };
    if bytes.len() as i64 != (n + 1) / 2 {
        return None;
    }
    let nib = |b: u8| if signed { ((b << 4) as i8 >> 4) as i32 } else { b as i32 };
    Some((0..n as usize).map(|i| nib(if i % 2 == 0 { bytes[i / 2] & 0xF } else { bytes[i / 2] >> 4 })).collect())
}

impl Graph {
    /// Unpacks 4-bit weights: every `DequantizeLinear` (default or `com.microsoft` domain) of a constant int4/uint4
    /// tensor (and of a constant int8/uint8 one when the graph quantizes no activation: weight-only quantization) with constant f32 or float16 scales (per tensor, per axis or blocked) becomes an f32 initializer, and
    /// a `Cast` to float or a `Reshape` by a constant shape of such a value is folded too. Returns how many nodes were folded.
    pub fn fold_low_bit_weights(&mut self) -> usize {
        let weight_only = self.quantizes_no_activation();
        let mut folded = 0;
        let mut made: HashSet<String> = HashSet::new();
        let mut k = 0;
        while k < self.nodes.len() {
            let n = &self.nodes[k];
            let dom = n.domain_name();
            let value = if n.op() == "DequantizeLinear" && (dom.is_empty() || dom == "com.microsoft") {
                self.dequantize_constant(k, weight_only)
            } else if n.op() == "Reshape" && n.input.first().is_some_and(|x| made.contains(x)) {
                self.reshape_constant(k)
            } else if n.op() == "Cast" && n.attr_i("to") == Some(1) && n.input.first().is_some_and(|x| made.contains(x))
            {
                // The folded values are f32 already.
                let mut t = self.initializer(&n.input[0]).cloned();
                if let (Some(t), Some(o)) = (t.as_mut(), n.output.first()) {
                    t.name = Some(o.clone());
                }
                t
            } else {
                None
            };
            match value {
                Some(t) => {
                    made.insert(t.name.clone().unwrap_or_default());
                    self.initializers.push(t);
                    self.nodes.remove(k);
                    folded += 1;
                }
                None => k += 1,
            }
        }
        if folded > 0 {
            self.remove_unused_initializers();
        }
        folded
    }

    /// A graph that quantizes no activation (weight-only quantization): its 8-bit weights are unpacked too, since
    /// every consumer runs in float anyway and the float kernels want plain f32 weights.
    fn quantizes_no_activation(&self) -> bool {
        !self.nodes.iter().any(|n| matches!(n.op(), "QuantizeLinear" | "DynamicQuantizeLinear"))
    }

    /// Whether [`Graph::fold_low_bit_weights`] has anything to unpack (cheap: no copy of the graph).
    pub fn has_low_bit_weights(&self) -> bool {
        self.initializers.iter().any(|t| matches!(t.data_type, Some(21 | 22)))
            || (self.quantizes_no_activation()
                && self.nodes.iter().any(|n| {
                    n.op() == "DequantizeLinear"
                        && n.input
                            .first()
                            .and_then(|x| self.initializer(x))
                            .is_some_and(|t| matches!(t.data_type, Some(2 | 3)))
                }))
    }

    fn dequantize_constant(&self, k: usize, eight_bit: bool) -> Option<TensorProto> {
        let n = &self.nodes[k];
        let x = self.initializer(n.input.first()?)?;
        let ints = |t: &TensorProto| -> Option<Vec<i32>> {
            match t.data_type {
                Some(2 | 3) if eight_bit => {
                    let signed = t.data_type == Some(3);
                    let b: Vec<i32> = match &t.raw_data {
                        Some(raw) => raw.iter().map(|&v| if signed { v as i8 as i32 } else { v as i32 }).collect(),
                        None => t.int32_data.clone(),
                    };
                    (b.len() as i64 == t.dims.iter().product::<i64>()).then_some(b)
                }
                _ => unpack_4bit(t),
            }
        };
        let q = ints(x)?;
        // f32 or float16 scales.
        let st = self.initializer(n.input.get(1)?)?;
        let scale: Vec<f32> = if st.data_type == Some(10) {
            super::tensor_from_proto(st).ok()?.to_f32_vec()
        } else {
            tensor_f32_values(st)?
        };
        let zp: Vec<i32> = match n.input.get(2).filter(|z| !z.is_empty()) {
            Some(z) => ints(self.initializer(z)?)?,
            None => vec![0],
        };
        let dims: Vec<usize> = x.dims.iter().map(|&d| d as usize).collect();
        let rank = dims.len() as i64;
        let axis = n.attr_i("axis").unwrap_or(1);
        let axis = if axis < 0 { axis + rank } else { axis };
        let block = n.attr_i("block_size").unwrap_or(0).max(0) as usize;
        let per_tensor = scale.len() == 1;
        if !per_tensor && !(0..rank).contains(&axis) {
            return None;
        }
        let axis = axis.max(0) as usize;
        let d_axis = dims.get(axis).copied().unwrap_or(1).max(1);
        let inner: usize = dims.get(axis + 1..).map(|s| s.iter().product()).unwrap_or(1);
        let outer: usize = dims[..axis.min(dims.len())].iter().product();
        let s_axis = if block > 0 { d_axis.div_ceil(block) } else { d_axis };
        let want = if per_tensor {
            1
        } else if block > 0 {
            outer * s_axis * inner
        } else {
            d_axis
        };
        if scale.len() != want || (zp.len() != 1 && zp.len() != want) {
            return None;
        }
        let vals: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let s = if per_tensor {
                    0
                } else {
                    let a = (i / inner) % d_axis;
                    match a.checked_div(block) {
                        Some(b) => ((i / inner / d_axis) * s_axis + b) * inner + i % inner,
                        None => a,
                    }
                };
                // With float16 scales the product is exact in f32 (11-bit × 4/8-bit mantissas) and kept so, as
                // onnxruntime does (the specification would round it to float16 before the Cast).
                (v - zp[if zp.len() == 1 { 0 } else { s }]) as f32 * scale[s]
            })
            .collect();
        Some(tensor_f32(n.output.first()?, &x.dims, &vals))
    }

    fn reshape_constant(&self, k: usize) -> Option<TensorProto> {
        let n = &self.nodes[k];
        if n.attr_i("allowzero").unwrap_or(0) != 0 {
            return None;
        }
        let x = self.initializer(n.input.first()?)?;
        let shape = self.initializer(n.input.get(1)?)?;
        if shape.data_type != Some(7) {
            return None;
        }
        let shape: Vec<i64> = super::tensor_from_proto(shape).ok()?.to_f32_vec().iter().map(|&v| v as i64).collect();
        let total: i64 = x.dims.iter().product();
        let mut dims: Vec<i64> = shape
            .iter()
            .enumerate()
            .map(|(i, &d)| if d == 0 { x.dims.get(i).copied().unwrap_or(0) } else { d })
            .collect();
        if let Some(free) = dims.iter().position(|&d| d == -1) {
            let known: i64 = dims.iter().filter(|&&d| d != -1).product();
            dims[free] = if known > 0 { total / known } else { 0 };
        }
        if dims.iter().product::<i64>() != total || dims.iter().any(|&d| d < 0) {
            return None;
        }
        let mut t = x.clone();
        t.name = Some(n.output.first()?.clone());
        t.dims = dims;
        Some(t)
    }
}
