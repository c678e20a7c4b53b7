//! Passes as listable objects (tract's pass lists are the model): each graph rewrite is a named [`Pass`], and a
//! pipeline is a slice of them run in order by [`run_passes`], which reports what each one changed. The same
//! rewrites stay callable one by one as methods of [`Graph`] and [`Model`] for callers that want their detailed
//! results (the BatchNorm nodes folded, the opset conversions made).
use edgepack_core::Result;

use crate::Model;

/// A rewrite of a whole model.
pub trait Pass: Send + Sync {
    /// A short stable name, for logs and reports.
    fn name(&self) -> &'static str;
    /// Rewrites `model` in place; returns how many places changed (0: the model is untouched).
    fn run(&self, model: &mut Model) -> Result<usize>;
}

/// What one pass of a list changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassRun {
    pub pass: &'static str,
    pub changed: usize,
}

/// Runs `passes` in order; stops at the first error.
pub fn run_passes(model: &mut Model, passes: &[&dyn Pass]) -> Result<Vec<PassRun>> {
    passes.iter().map(|p| Ok(PassRun { pass: p.name(), changed: p.run(model)? })).collect()
}

/// Upgrades the default-domain opset to the version given (see [`Model::upgrade_opset`]).
pub struct UpgradeOpset(pub i64);

impl Pass for UpgradeOpset {
    fn name(&self) -> &'static str {
        "upgrade-opset"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        Ok(model.upgrade_opset(self.0)?.converted.len())
    }
}

/// Gives every node a unique name ([`crate::Graph::name_unnamed_nodes`]).
pub struct NameNodes;

impl Pass for NameNodes {
    fn name(&self) -> &'static str {
        "name-nodes"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        Ok(model.graph.name_unnamed_nodes())
    }
}

/// `Constant` nodes become initializers ([`crate::Graph::constants_to_initializers`]).
pub struct ConstantsToInitializers;

impl Pass for ConstantsToInitializers {
    fn name(&self) -> &'static str {
        "constants-to-initializers"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        Ok(model.graph.constants_to_initializers())
    }
}

/// Inference BatchNormalization after a Conv is folded into the Conv ([`crate::Graph::fold_batchnorm`]).
pub struct FoldBatchNorm;

impl Pass for FoldBatchNorm {
    fn name(&self) -> &'static str {
        "fold-batchnorm"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        Ok(model.graph.fold_batchnorm().len())
    }
}

/// A leading input dim fixed at 1 becomes free ([`crate::Graph::free_batch_dim`]).
pub struct FreeBatchDim;

impl Pass for FreeBatchDim {
    fn name(&self) -> &'static str {
        "free-batch-dim"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        Ok(model.graph.free_batch_dim())
    }
}

/// Shapes traced at one input shape are dropped from a graph with symbolic inputs
/// ([`crate::Graph::forget_traced_shapes`]).
pub struct ForgetTracedShapes;

impl Pass for ForgetTracedShapes {
    fn name(&self) -> &'static str {
        "forget-traced-shapes"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        Ok(model.graph.forget_traced_shapes())
    }
}

/// Nodes whose outputs nothing reads are removed, then unread initializers.
pub struct RemoveDead;

impl Pass for RemoveDead {
    fn name(&self) -> &'static str {
        "remove-dead"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        Ok(model.graph.remove_dead_nodes() + model.graph.remove_unused_initializers())
    }
}

/// Nodes in topological order (files need not be sorted); a cycle is an error.
pub struct TopoSort;

impl Pass for TopoSort {
    fn name(&self) -> &'static str {
        "topo-sort"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        model.graph.topo_sort()?;
        Ok(0)
    }
}

/// 4-bit weights unpacked to f32 initializers (see [`crate::Graph::fold_low_bit_weights`]).
pub struct FoldLowBitWeights;

impl Pass for FoldLowBitWeights {
    fn name(&self) -> &'static str {
        "fold-low-bit-weights"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        Ok(model.graph.fold_low_bit_weights())
    }
}

/// The preparation every offline tool gives a model before calibrating or pruning it: opset 13, named nodes,
/// constants as initializers, nodes sorted.
pub const PREPARE: &[&dyn Pass] = &[&UpgradeOpset(13), &NameNodes, &ConstantsToInitializers, &TopoSort];

/// What the GPU backend runs before planning: constants as initializers, BatchNorm folded.
pub const DEVICE_PREPARE: &[&dyn Pass] = &[&ConstantsToInitializers, &FoldBatchNorm];
