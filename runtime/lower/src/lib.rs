//! The lowering passes that turn ONNX graphs into the CPU kernels' graphs: `ai.edgepack` kernel nodes (integer
//! and float, NHWC chains) and onnxruntime's integer arithmetic on float ops for the QDQ patterns left over.
//! [`nodes`] parses those kernel nodes, computes their shapes and evaluates them on slices for any executor.
pub mod f32_kernels;
pub mod nodes;
pub mod qdq_kernels;
pub mod qdq_lower;
mod qdq_tables;
pub mod signed;

pub use f32_kernels::F32Kernels;
pub use qdq_kernels::QdqKernels;
pub use qdq_lower::{LowerFor, QdqInteger};

use edgepack_core::Result;
use edgepack_onnx::{Model, Pass};

/// QDQ patterns → integer-kernel nodes on NHWC uint8 chains ([`QdqKernels`]).
pub struct LowerQdqKernels;

impl Pass for LowerQdqKernels {
    fn name(&self) -> &'static str {
        "lower-qdq-kernels"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        Ok(model.lower_qdq_kernels())
    }
}

/// The remaining QDQ patterns → onnxruntime's integer arithmetic on float ops, for a target ([`QdqInteger`]).
pub struct LowerQdqInteger(pub LowerFor);

impl Pass for LowerQdqInteger {
    fn name(&self) -> &'static str {
        "lower-qdq-integer"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        Ok(model.graph.lower_qdq_integer_with(self.0))
    }
}

/// Float Conv chains → fp32 kernel nodes on NHWC chains ([`F32Kernels`]); meant for graphs without QDQ nodes.
pub struct LowerF32Kernels;

impl Pass for LowerF32Kernels {
    fn name(&self) -> &'static str {
        "lower-f32-kernels"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        Ok(model.lower_f32_kernels())
    }
}

/// Float `Softmax` nodes → `EpSoftmax`, in graphs where the rest of [`LowerF32Kernels`] does not apply (QDQ
/// graphs: their float ops carry exact integers; a Softmax there is float math, a detector's decode).
pub struct LowerF32Softmax;

impl Pass for LowerF32Softmax {
    fn name(&self) -> &'static str {
        "lower-f32-softmax"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        Ok(model.lower_f32_softmax())
    }
}

/// int8 activation QDQ pairs → their uint8 twins, same values ([`signed::signed_activations_to_unsigned`]), so
/// the integer kernels take them.
pub struct UnsignedActivations;

impl Pass for UnsignedActivations {
    fn name(&self) -> &'static str {
        "unsigned-activations"
    }
    fn run(&self, model: &mut Model) -> Result<usize> {
        Ok(signed::signed_activations_to_unsigned(&mut model.graph))
    }
}

/// What [`Model::lower_for_cpu`] rewrote.
pub struct CpuLowering {
    pub model: Model,
    /// QDQ patterns that became integer-kernel nodes.
    pub integer_kernels: usize,
    /// QDQ patterns lowered to exact integer arithmetic on float ops.
    pub integer_ops: usize,
    /// Float patterns that became float-kernel nodes.
    pub float_kernels: usize,
}

impl CpuLowering {
    pub fn changed(&self) -> bool {
        self.integer_kernels + self.integer_ops + self.float_kernels > 0
    }
}

/// The graph the CPU backends run (see [`CpuLowering`]).
pub trait LowerForCpu {
    fn lower_for_cpu(&self, kernels: bool) -> CpuLowering;
}

impl LowerForCpu for Model {
    /// The graph the CPU backends run. QDQ graphs keep onnxruntime's integer arithmetic (exact accumulation, one
    /// requantization multiply): the patterns the integer kernels cover become kernel nodes (NHWC uint8 chains),
    /// the rest is lowered to float ops carrying exact integers. Float graphs: Conv chains (with their Relu/Clip,
    /// residual Adds, MaxPools, Concats) become fp32 NHWC kernel nodes; not mixed with the integer lowering (its
    /// float ops carry exact integers) except for their float Softmax nodes. int8 activation pairs become their
    /// uint8 twins first (same values).
    /// `kernels: false` keeps everything on float ops.
    fn lower_for_cpu(&self, kernels: bool) -> CpuLowering {
        let mut model = self.clone();
        // The passes cannot fail (a rewrite that would not sort leaves the graph as it was).
        let mut run = |p: &dyn Pass| p.run(&mut model).unwrap_or(0);
        if kernels {
            run(&UnsignedActivations);
        }
        let integer_kernels = if kernels { run(&LowerQdqKernels) } else { 0 };
        let integer_ops = run(&LowerQdqInteger(LowerFor::Host));
        let float_kernels = match (kernels, integer_kernels + integer_ops) {
            (false, _) => 0,
            (true, 0) => run(&LowerF32Kernels),
            // The float part of a QDQ graph: its Softmax only (a detector's box decode).
            (true, _) => run(&LowerF32Softmax),
        };
        CpuLowering { model, integer_kernels, integer_ops, float_kernels }
    }
}
