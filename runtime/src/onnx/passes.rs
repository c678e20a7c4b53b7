//! Small rewrite passes over [`Graph`] that several consumers need (quantize, the GPU lowering):
//! - [`Graph::name_unnamed_nodes`]: every node gets a unique name, so reports and `--exclude` can point at it;
//! - [`Graph::fold_batchnorm`]: inference BatchNormalization after a Conv is folded into the Conv's weights and bias.
//!
//! Each pass keeps the graph's results (up to float rounding) and its value names, except the values it removes.
use std::collections::HashSet;

use super::{Graph, NodeExt, TensorProto};

/// Reads an f32 tensor (raw or typed storage); `None` for other types or inconsistent sizes.
pub fn tensor_f32_values(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != Some(1) {
        return None;
    }
    let n: i64 = t.dims.iter().product();
    let v: Vec<f32> = match &t.raw_data {
        Some(raw) => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        None => t.float_data.clone(),
    };
    (v.len() as i64 == n).then_some(v)
}

fn f32_tensor(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(1),
        raw_data: Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ..Default::default()
    }
}

impl Graph {
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
        let (gamma, beta, mean, var) = (get(&bn.input[1])?, get(&bn.input[2])?, get(&bn.input[3])?, get(&bn.input[4])?);
        let w_t = self.initializer(conv.input.get(1)?)?.clone();
        let w = tensor_f32_values(&w_t)?;
        let c = *w_t.dims.first()? as usize;
        if [gamma.len(), beta.len(), mean.len(), var.len()].iter().any(|&l| l != c) || c == 0 {
            return None;
        }
        let b = match conv.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) => {
                let v = get(b)?;
                (v.len() == c).then_some(v)?
            }
            None => vec![0.0; c],
        };
        let eps = bn.attr_f("epsilon").unwrap_or(1e-5);
        let k: Vec<f32> = (0..c).map(|j| gamma[j] / (var[j] + eps).sqrt()).collect();
        let inner = w.len() / c;
        let w2: Vec<f32> = w.iter().enumerate().map(|(i, &v)| v * k[i / inner]).collect();
        let b2: Vec<f32> = (0..c).map(|j| (b[j] - mean[j]) * k[j] + beta[j]).collect();
        let w_name = self.unique_name(&format!("{}_bnfolded_W", conv.name()));
        self.set_initializer(f32_tensor(&w_name, &w_t.dims, &w2));
        let b_name = self.unique_name(&format!("{}_bnfolded_B", conv.name()));
        self.set_initializer(f32_tensor(&b_name, &[c as i64], &b2));
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
