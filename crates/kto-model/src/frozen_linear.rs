//! A frozen base linear layer whose backward computes only the input gradient.
//!
//! candle's `matmul` backward always computes both operand gradients, so `x.matmul(&w.t())` on the training path
//! would spend one extra GEMM per linear per step on a weight gradient nobody reads (and hold it in memory).
//! [`FrozenMatmul`] is a custom op over the input only: the weight is captured by the op, the forward calls the
//! backend's own GEMM (cuBLAS on CUDA, gemm on CPU), and the backward returns `grad · W`.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, MetalStorage, Result, Shape, Storage,
    Tensor,
};

/// `y = x Wᵀ (+ b)` with frozen `W` [out, in] and optional frozen `b` [out].
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        if weight.rank() != 2 {
            bail!("a linear weight must be 2-D, got {:?}", weight.shape());
        }
        let weight = weight.detach().contiguous()?;
        let bias = bias.map(|b| b.detach());
        Ok(Self { weight, bias })
    }

    /// [out, in].
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x` [..., in] → [..., out], in the weight's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let y = x.apply_op1(FrozenMatmul {
            weight: self.weight.clone(),
        })?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// The custom op behind [`FrozenLinear`]: `x` [..., in] ↦ `x Wᵀ` [..., out].
pub struct FrozenMatmul {
    weight: Tensor,
}

/// GEMM shapes and layouts: `x` viewed as [m, k] and `W` as the transposed view [k, n].
struct Plan {
    m: usize,
    k: usize,
    n: usize,
    lhs: Layout,
    rhs: Layout,
    out_shape: Shape,
}

impl FrozenMatmul {
    fn plan(&self, x_layout: &Layout, w_layout: &Layout) -> Result<Plan> {
        if !x_layout.is_contiguous() {
            bail!("frozen-linear: input must be contiguous");
        }
        let dims = x_layout.dims();
        let (n, k_w) = (w_layout.dims()[0], w_layout.dims()[1]);
        let k = *dims.last().unwrap_or(&0);
        if k != k_w {
            bail!(
                "frozen-linear: input has {k} features, the weight expects {k_w} ({:?})",
                w_layout.shape()
            );
        }
        let m = dims[..dims.len() - 1].iter().product::<usize>();
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = n;
        Ok(Plan {
            m,
            k,
            n,
            lhs: Layout::new(Shape::from((m, k)), vec![k, 1], x_layout.start_offset()),
            rhs: Layout::new(Shape::from((k, n)), vec![1, k], w_layout.start_offset()),
            out_shape: Shape::from(out_dims),
        })
    }

    fn check_dtype(&self, x: DType) -> Result<()> {
        if x != self.weight.dtype() {
            bail!(
                "frozen-linear: input dtype {x:?} differs from weight dtype {:?}",
                self.weight.dtype()
            );
        }
        Ok(())
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check_dtype(x.dtype())?;
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            bail!(
                "frozen-linear: input on the CPU, weight on {:?}",
                self.weight.device().location()
            );
        };
        let p = self.plan(x_layout, w_layout)?;
        let out = x.matmul(w, (1, p.m, p.n, p.k), &p.lhs, &p.rhs)?;
        Ok((out, p.out_shape))
    }

    fn cuda_fwd(&self, x: &CudaStorage, x_layout: &Layout) -> Result<(CudaStorage, Shape)> {
        self.check_dtype(x.dtype())?;
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cuda(w) = &*w_storage else {
            bail!(
                "frozen-linear: input on CUDA, weight on {:?}",
                self.weight.device().location()
            );
        };
        let p = self.plan(x_layout, w_layout)?;
        let out = x.matmul(w, (1, p.m, p.n, p.k), &p.lhs, &p.rhs)?;
        Ok((out, p.out_shape))
    }

    fn metal_fwd(&self, x: &MetalStorage, x_layout: &Layout) -> Result<(MetalStorage, Shape)> {
        self.check_dtype(x.dtype())?;
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Metal(w) = &*w_storage else {
            bail!(
                "frozen-linear: input on Metal, weight on {:?}",
                self.weight.device().location()
            );
        };
        let p = self.plan(x_layout, w_layout)?;
        let out = x.matmul(w, (1, p.m, p.n, p.k), &p.lhs, &p.rhs)?;
        Ok((out, p.out_shape))
    }

    /// Only the input gradient: `grad` [..., out] · `W` [out, in]. The weight is frozen, so no weight gradient.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let n = self.weight.dims()[0];
        let m = grad_res.elem_count() / n.max(1);
        let grad = grad_res.contiguous()?.reshape((m, n))?;
        let grad_in = grad.to_dtype(self.weight.dtype())?.matmul(&self.weight)?;
        Ok(Some(grad_in.reshape(arg.shape())?.to_dtype(arg.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_plain_matmul_in_value_and_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (5, 3), &dev)?;
        let b = Tensor::randn(0f32, 1., 5, &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 4, 3), &dev)?)?;
        let lin = FrozenLinear::new(w.clone(), Some(b.clone()))?;

        let y = lin.forward(x.as_tensor())?;
        let y_ref = x.as_tensor().broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let diff = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");

        // A non-uniform upstream gradient, so a wrong transpose would show.
        let probe = Tensor::randn(0f32, 1., (2, 4, 5), &dev)?;
        let g = (&y * &probe)?.sum_all()?.backward()?;
        let g_ref = (&y_ref * &probe)?.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).expect("input gradient");
        let gx_ref = g_ref.get(x.as_tensor()).expect("reference input gradient");
        let diff = (gx - gx_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "input gradient differs by {diff}");
        // candle's matmul backward computes a gradient for the (untracked) transposed weight; ours computes none.
        let has_weight_grad = |g: &candle_core::backprop::GradStore| {
            g.get_ids().any(|id| matches!(g.get_id(*id).map(|t| t.dims().to_vec()), Some(d) if d == [3, 5] || d == [5, 3]))
        };
        assert!(has_weight_grad(&g_ref));
        assert!(!has_weight_grad(&g));
        Ok(())
    }

    #[test]
    fn works_on_a_narrowed_input_and_in_bf16() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (6, 4), &dev)?;
        let x = Tensor::randn(0f32, 1., (3, 8), &dev)?.narrow(1, 2, 4)?;
        let y = FrozenLinear::new(w.clone(), None)?.forward(&x)?;
        let y_ref = x.matmul(&w.t()?)?;
        assert!((&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);

        let lin16 = FrozenLinear::new(w.to_dtype(DType::BF16)?, None)?;
        let y16 = lin16
            .forward(&x.to_dtype(DType::BF16)?)?
            .to_dtype(DType::F32)?;
        assert!((&y16 - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()? < 0.1);
        assert!(
            lin16.forward(&x).is_err(),
            "dtype mismatch must be an error"
        );
        Ok(())
    }
}
