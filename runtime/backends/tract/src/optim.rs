//! tract's optimiser with a bound on its rewrites.
//!
//! tract optimises a model by applying rewrite patches, pass after pass, until no pass finds one. Nothing bounds
//! that loop: on a model whose shapes do not agree (a mangled attention block adding a `[2,3,4,6]` score to a
//! `[2,3,h,8]` value with `h` = 1, found by `onnx_structured`), two of its codegen rewrites undo each other and
//! the plan never finishes. Every pass here runs inside [`Bounded`], which counts the rewrites of the whole
//! optimisation and fails it, as a typed error, past [`cap`] of them: far more than any real model needs (the
//! shared models' counts are tested to stay under a tenth of it: `runtime/tests/tract_optimiser.rs`), so a model that
//! converges is never cut short. The cap counts the nodes of loop and branch bodies too (tract declutters a Scan's
//! body, what ONNX LSTM/GRU/RNN/Scan become, in the outer session, so its rewrites count here); what tract does
//! inside a body when it generates code for it (its own `into_optimized`) is beyond this bound.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::logic::IfThenElse;
use tract_onnx::tract_core::ops::scan::Scan;
use tract_onnx::tract_core::optim::{Optimizer, OptimizerSession, TypedPass};

/// Rewrites allowed per node of the typed model, with [`MIN_REWRITES`] as the floor.
const REWRITES_PER_NODE: usize = 32;
const MIN_REWRITES: usize = 1024;

/// The most rewrites an optimisation of a model of `nodes` typed nodes may apply.
pub(crate) fn cap(nodes: usize) -> usize {
    MIN_REWRITES.max(nodes.saturating_mul(REWRITES_PER_NODE))
}

/// The nodes of `model` and of every Scan and If body inside it.
fn nodes(model: &TypedModel) -> usize {
    model
        .nodes
        .iter()
        .map(|n| {
            1 + n.op_as::<Scan>().map_or(0, |s| nodes(&s.body))
                + n.op_as::<IfThenElse>().map_or(0, |i| nodes(&i.then_body) + nodes(&i.else_body))
        })
        .sum()
}

/// One of tract's passes, counting what it changes into the optimisation's shared count.
#[derive(Clone)]
struct Bounded {
    inner: Box<dyn TypedPass>,
    used: Arc<AtomicUsize>,
    cap: usize,
}

/// tract names the pass in its error context ("running pass …"): the pass's own name, not the wrapper's fields.
impl std::fmt::Debug for Bounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Bounded {
    fn count(&self) -> TractResult<()> {
        let used = self.used.fetch_add(1, Ordering::Relaxed) + 1;
        if used > self.cap {
            return Err(TractError::msg(format!(
                "tract's optimiser did not converge: over {} rewrites, the last by {:?} (a model whose shapes do not \
                 agree?)",
                self.cap, self.inner
            )));
        }
        Ok(())
    }
}

impl TypedPass for Bounded {
    fn reset(&mut self) -> TractResult<()> {
        self.inner.reset()
    }

    fn next(&mut self, session: &mut OptimizerSession, model: &TypedModel) -> TractResult<Option<TypedModelPatch>> {
        let patch = self.inner.next(session, model)?;
        if patch.is_some() {
            self.count()?;
        }
        Ok(patch)
    }

    fn run_direct(&mut self, model: &mut TypedModel) -> TractResult<bool> {
        let changed = self.inner.run_direct(model)?;
        if changed {
            self.count()?;
        }
        Ok(changed)
    }
}

/// What `InferenceModel::into_optimized` does (analysis and typing, then tract's declutter and codegen
/// optimisers), with every pass bounded; also returns the rewrites applied and the cap.
pub(crate) fn optimized(model: InferenceModel) -> TractResult<(TypedModel, [usize; 2])> {
    let mut typed = model.into_typed()?;
    check_sizes(&typed)?;
    let used = Arc::new(AtomicUsize::new(0));
    let cap = cap(nodes(&typed));
    let bounded = |o: Optimizer| Optimizer {
        passes: o
            .passes
            .into_iter()
            .map(|inner| Box::new(Bounded { inner, used: used.clone(), cap }) as Box<dyn TypedPass>)
            .collect(),
        steps: None,
    };
    bounded(Optimizer::declutter()).optimize(&mut typed)?;
    typed.optimize_with_session(&mut bounded(Optimizer::codegen()).session())?;
    check_sizes(&typed)?;
    Ok((typed, [used.load(Ordering::Relaxed), cap]))
}

/// The most bytes one value of a plan may take: 1 GiB, the interpreter's bound of 2^28 elements for f32.
pub(crate) const MAX_VALUE_BYTES: usize = 1 << 30;

/// Refuses a graph whose typed facts give a value over [`MAX_VALUE_BYTES`] (or whose size overflows): tract would
/// allocate it when the node runs (or when the optimiser folds it), and an allocation of 120 GB aborts the process
/// instead of failing. Checked before the optimiser, which folds constant subgraphs, and after it. Values whose
/// shape depends on data (symbolic dims) are not known here.
pub(crate) fn check_sizes(model: &TypedModel) -> TractResult<()> {
    for node in &model.nodes {
        for (slot, out) in node.outputs.iter().enumerate() {
            let Some(shape) = out.fact.shape.as_concrete() else { continue };
            let bytes = shape.iter().try_fold(out.fact.datum_type.size_of(), |a, &d| a.checked_mul(d));
            if bytes.is_none_or(|b| b > MAX_VALUE_BYTES) {
                let size = bytes.map_or_else(|| "more than 2^64 bytes".to_string(), |b| format!("{b} bytes"));
                return Err(tract_onnx::tract_hir::internal::format_err!(
                    "node `{}` ({}) output {slot} would be a {:?} tensor of shape {shape:?}, {size}: over the \
                     limit of {MAX_VALUE_BYTES} bytes per value",
                    node.name,
                    node.op().name(),
                    out.fact.datum_type,
                ));
            }
        }
    }
    Ok(())
}
