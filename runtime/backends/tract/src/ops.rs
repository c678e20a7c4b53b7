//! tract ops running edgepack's kernel nodes ([`edgepack_lower::nodes`]): parsed from their ONNX attributes once,
//! with the weights packed at load.
use std::sync::Arc;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use edgepack_core::tensor::DType;
use edgepack_lower::nodes::{Data, DataMut, Kernel, KernelDim};

/// Adds the kernel ops to a tract ONNX op register.
pub fn register(reg: &mut OnnxOpRegister) {
    for op in edgepack_lower::nodes::ops() {
        reg.insert(op, parse);
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
