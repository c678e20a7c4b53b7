//! tract ops running edgepack's kernel nodes ([`edgepack_lower::nodes`]): parsed from their ONNX attributes once,
//! with the weights packed at load.
use std::sync::Arc;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use edgepack_core::tensor::DType;
use edgepack_lower::nodes::{Data, DataMut, Kernel, KernelDim};

/// tract's ONNX parser with edgepack's additions: the kernel ops, and rank checks in front of the NCHW ops.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    register(&mut onnx.op_register);
    onnx
}

/// Adds the kernel ops to a tract ONNX op register, and puts a rank check in front of its NCHW ops.
pub fn register(reg: &mut OnnxOpRegister) {
    for op in edgepack_lower::nodes::ops() {
        reg.insert(op, parse);
    }
    let tract_own = TRACT_NCHW.get_or_init(|| {
        NCHW_OPS.iter().filter_map(|&(op, rank)| reg.0.get(op).map(|&b| (op.to_string(), (rank, b)))).collect()
    });
    for op in tract_own.keys() {
        reg.0.insert(op.clone(), parse_nchw);
    }
}

/// The ops tract parses into NCHW shapes, with the input rank each needs. tract's `DataFormat::shape` takes a shape
/// of any rank and `BaseDataShape::c`/`hw_dims` index it unchecked (`get_unchecked`): a BatchNormalization of a
/// rank-1 input read past the shape's end while tract inferred its facts (undefined behaviour; the fuzzer found it
/// as an abort of the standard library's debug checks).
const NCHW_OPS: [(&str, usize); 8] = [
    ("BatchNormalization", 2),
    ("Conv", 3),
    ("ConvInteger", 3),
    ("QLinearConv", 3),
    ("ConvTranspose", 3),
    ("MaxPool", 3),
    ("AveragePool", 3),
    ("LpPool", 3),
];

/// An op register's entry (the type is private to tract-onnx).
type OpBuilder = fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's own parsers of [`NCHW_OPS`] (op register builders are plain `fn`s: the wrapper finds them here).
static TRACT_NCHW: std::sync::OnceLock<std::collections::HashMap<String, (usize, OpBuilder)>> =
    std::sync::OnceLock::new();

fn parse_nchw(ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let &(min_rank, tract_parse) = TRACT_NCHW
        .get()
        .and_then(|m| m.get(&node.op_type))
        .ok_or_else(|| format_err!("{}: no parser", node.op_type))?;
    let (op, extra) = tract_parse(ctx, node)?;
    let inner = op
        .as_op()
        .downcast_ref::<Box<dyn Expansion>>()
        .ok_or_else(|| format_err!("{}: tract's parser gave no expansion to check", node.op_type))?
        .clone();
    Ok((expand(RankGuard { inner, min_rank }), extra))
}

/// A tract expansion whose first input (and output) must have at least `min_rank` dims: checked before its own
/// shape rules run and again when it is wired into the typed model.
#[derive(Debug, Clone)]
struct RankGuard {
    inner: Box<dyn Expansion>,
    min_rank: usize,
}

impl RankGuard {
    fn check(name: &str, min_rank: usize, rank: usize) -> TractResult<()> {
        ensure!(rank >= min_rank, "{name} needs an input of rank {min_rank} or more, not {rank}");
        Ok(())
    }
}

impl Expansion for RankGuard {
    fn name(&self) -> StaticName {
        self.inner.as_ref().name()
    }

    fn validation(&self) -> Validation {
        self.inner.as_ref().validation()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        self.inner.as_ref().info()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        self.inner.as_ref().nboutputs()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        // Before the wrapped rules: the solver applies rules in order, so a known rank is checked before any of
        // them reads an axis. Within an op the input's rank can only come from its own fact or the output's.
        let (name, min_rank) = (self.inner.as_ref().name(), self.min_rank);
        for t in inputs.first().into_iter().chain(outputs.first()) {
            let name = name.clone();
            s.given(&t.rank, move |_, rank| Self::check(&name, min_rank, rank.max(0) as usize))?;
        }
        self.inner.as_ref().rules(s, inputs, outputs)
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        if let Some(&x) = inputs.first() {
            Self::check(&self.inner.as_ref().name(), self.min_rank, model.outlet_fact(x)?.rank())?;
        }
        self.inner.as_ref().wire(prefix, model, inputs)
    }

    fn wire_with_inference_model_and_node(
        &self,
        prefix: &str,
        model: &InferenceModel,
        node: &InferenceNode,
        typed_model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        if let Some(&x) = inputs.first() {
            Self::check(&self.inner.as_ref().name(), self.min_rank, typed_model.outlet_fact(x)?.rank())?;
        }
        self.inner.as_ref().wire_with_inference_model_and_node(prefix, model, node, typed_model, inputs)
    }

    fn runs_out_of_plan(&self) -> bool {
        self.inner.as_ref().runs_out_of_plan()
    }
}

/// tract's node as edgepack's (the same ONNX message, through its wire form), parsed by the kernel module.
fn parse(_: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    use prost::Message;
    let ours = edgepack_onnx::NodeProto::decode(node.encode_to_vec().as_slice())?;
    let k = Kernel::parse(&ours).map_err(|e| format_err!("{e}"))?;
    Ok((expand(EpExpansion(EpOp(Arc::new(k)))), vec![]))
}

/// tract's (possibly symbolic) dimension as a kernel node's shape dimension.
#[derive(Debug, Clone, PartialEq)]
struct Dim(TDim);

impl KernelDim for Dim {
    fn value(&self) -> Option<usize> {
        self.0.to_usize().ok()
    }
    fn known(n: usize) -> Self {
        Dim(n.into())
    }
}

fn datum(dt: DType) -> DatumType {
    if dt == DType::U8 { u8::datum_type() } else { f32::datum_type() }
}

#[derive(Debug, Clone)]
struct EpOp(Arc<Kernel>);

impl PartialEq for EpOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for EpOp {}

impl EpOp {
    fn out_shape(&self, ins: &[TVec<TDim>]) -> TractResult<TVec<TDim>> {
        let ins: Vec<Vec<Dim>> = ins.iter().map(|s| s.iter().cloned().map(Dim).collect()).collect();
        Ok(self.0.out_shape(&ins).map_err(|e| format_err!("{e}"))?.into_iter().map(|d| d.0).collect())
    }
}

fn data(t: &TValue) -> TractResult<Data<'_>> {
    let ram = t.try_as_plain_ram()?;
    Ok(if t.datum_type() == u8::datum_type() {
        Data::U8(ram.as_slice::<u8>()?)
    } else {
        Data::F32(ram.as_slice::<f32>()?)
    })
}

impl Op for EpOp {
    fn name(&self) -> StaticName {
        self.0.op_name().into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.0)])
    }

    op_as_typed_op!();
}

impl EvalOp for EpOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        let out = self.0.out_shape(&shapes).map_err(|e| format_err!("{e}"))?;
        let dt = self.0.output_type().map_or_else(|| inputs[0].datum_type(), datum);
        // SAFETY: every kernel writes every output element.
        let mut y = unsafe { Tensor::uninitialized_dt(dt, &out)? };
        let mut view = y.try_as_plain_ram_mut()?;
        let ys = if dt == u8::datum_type() {
            DataMut::U8(view.as_slice_mut::<u8>()?)
        } else {
            DataMut::F32(view.as_slice_mut::<f32>()?)
        };
        let ins: Vec<(Data, &[usize])> =
            inputs.iter().zip(&shapes).map(|(t, s)| Ok((data(t)?, s.as_slice()))).collect::<TractResult<_>>()?;
        self.0.eval(&ins, &out, ys).map_err(|e| format_err!("{e}"))?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for EpOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let name = self.0.op_name();
        let first = inputs.first().map(|f| f.datum_type).ok_or_else(|| format_err!("{name}: no input"))?;
        let want = self.0.input_type().map(datum);
        for i in inputs {
            let ok = match want {
                Some(w) => i.datum_type == w,
                None => i.datum_type == first && (first == u8::datum_type() || first == f32::datum_type()),
            };
            ensure!(ok, "{name}: unexpected input type {:?} (expected {want:?})", i.datum_type);
        }
        let shapes: Vec<TVec<TDim>> = inputs.iter().map(|f| f.shape.to_tvec()).collect();
        let dt = self.0.output_type().map_or(first, datum);
        Ok(tvec!(dt.fact(self.out_shape(&shapes)?)))
    }

    as_op!();
}

#[derive(Debug, Clone)]
struct EpExpansion(EpOp);

impl Expansion for EpExpansion {
    fn name(&self) -> StaticName {
        self.0.0.op_name().into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        check_input_arity(inputs, self.0.0.arity())?;
        match self.0.0.output_type() {
            Some(dt) => s.equals(&outputs[0].datum_type, datum(dt))?,
            None => s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?,
        }
        match self.0.0.rank() {
            Some(rank) => {
                s.equals(&outputs[0].rank, rank as i64)?;
                for i in inputs {
                    s.equals(&i.rank, rank as i64)?;
                }
            }
            None => s.equals(&outputs[0].rank, &inputs[0].rank)?,
        }
        s.given_all(inputs.iter().map(|i| &i.shape), move |s, shapes| {
            let shapes: Vec<TVec<TDim>> = shapes.into_iter().map(|s| s.into_iter().collect()).collect();
            if let Ok(out) = self.0.out_shape(&shapes) {
                s.equals(&outputs[0].shape, ShapeFactoid::from(out))?;
            }
            Ok(())
        })
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.0.clone(), inputs)
    }
}
