//! Linear layers of a LoRA step on the CPU, written by gemm straight into their outputs.
//!
//! - [`frozen_linear`]: `x @ weight^T` for a frozen weight: backward returns only `grad @ weight` (no
//!   weight gradient), and the product is the op's own output (no copy to attach it to the graph).
//! - [`lora_add`]: `y + scale * u @ b^T`, the LoRA update added to a layer's output in one pass
//!   (`u = dropout(x) @ a^T` is computed by the caller, so `a` gets its gradient through `u`), instead
//!   of a product, a scaled copy and a sum as separate tensors.
//!
//! The fused paths need f32, rank-2, CPU tensors. Elsewhere `frozen_linear` computes the product on a
//! detached input and attaches it through an identity op with the same backward (so the CUDA build
//! computes no weight gradient either); `lora_add` needs the callers' candle composition.
use crate::cpu::{contiguous_f32, gemm_add, gemm_new, Operand};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, MetalStorage, Result,
    Shape, Tensor,
};

/// Whether the fused path applies: every tensor f32 on the CPU.
pub fn supported(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 2)
}

/// `x @ weight^T` (`x` `[n, in]`, `weight` `[out, in]` frozen) -> `[n, out]`; `x` gets a gradient,
/// `weight` never does.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if supported(&[x, weight]) {
        return x
            .contiguous()?
            .apply_op2(&weight.contiguous()?.detach(), FrozenLinear);
    }
    let weight = weight.detach();
    let y = x.detach().matmul(&weight.t()?)?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op2(&y, AttachProduct { weight })
}

/// `y + scale * u @ b^T` (`y` `[n, out]`, `u` `[n, r]`, `b` `[out, r]`); gradients for all three.
pub fn lora_add(y: &Tensor, u: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    if !supported(&[y, u, b]) {
        bail!("lora-add: needs rank-2 f32 CPU tensors");
    }
    y.contiguous()?
        .apply_op3(&u.contiguous()?, &b.contiguous()?, LoraAdd { scale })
}

/// `scale * lhs @ rhs`, or `scale * lhs^T @ rhs` with `lhs_t`, as a fresh tensor that tracks no
/// gradient: the products of the backward passes here. On the CPU in f32 it is one gemm into an
/// output that is never zero-filled first (candle's matmul zero-fills it, then scaling is another
/// pass); elsewhere candle's matmul.
pub fn product(lhs: &Tensor, rhs: &Tensor, lhs_t: bool, scale: f64) -> Result<Tensor> {
    if supported(&[lhs, rhs]) {
        let op = Product {
            lhs_t,
            scale: scale as f32,
        };
        return lhs.contiguous()?.apply_op2_no_bwd(&rhs.contiguous()?, &op);
    }
    let lhs = if lhs_t { lhs.t()? } else { lhs.clone() };
    let p = lhs.matmul(rhs)?;
    if scale == 1.0 {
        Ok(p)
    } else {
        p.affine(scale, 0.0)
    }
}

fn dims2(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.shape().dims() {
        &[a, b] => Ok((a, b)),
        d => bail!("{what}: expected a rank-2 tensor, got shape {d:?}"),
    }
}

struct FrozenLinear;

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((n, k), (out, k2)) = (dims2(l1, "frozen-linear")?, dims2(l2, "frozen-linear")?);
        if k != k2 {
            bail!("frozen-linear: x has {k} columns, the weight {k2}");
        }
        let x = contiguous_f32("frozen-linear", s1, l1)?;
        let w = contiguous_f32("frozen-linear", s2, l2)?;
        let y = gemm_new(Operand::plain(x), Operand::t(w), (n, out, k), 1.0)?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(product(grad, weight, false, 1.0)?), None))
    }
}

/// The identity on its second argument (a product computed on the detached input); backward sends
/// `grad @ weight` to the first. Used off the CPU, where the product comes from candle's matmul.
struct AttachProduct {
    weight: Tensor,
}

/// The precomputed product is always fresh (contiguous from offset 0), so copying its storage is a
/// copy of exactly the result.
fn check_fresh(l: &Layout) -> Result<()> {
    if l.is_contiguous() && l.start_offset() == 0 {
        Ok(())
    } else {
        bail!("frozen-linear: precomputed product is not a fresh contiguous tensor")
    }
}

impl CustomOp2 for AttachProduct {
    fn name(&self) -> &'static str {
        "frozen-linear-attach"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_fresh(l2)?;
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_fresh(l2)?;
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        s2: &MetalStorage,
        l2: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        check_fresh(l2)?;
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&self.weight)?), None))
    }
}

/// See [`product`].
struct Product {
    lhs_t: bool,
    scale: f32,
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((a, b), (k2, n)) = (dims2(l1, "product")?, dims2(l2, "product")?);
        let (m, k) = if self.lhs_t { (b, a) } else { (a, b) };
        if k != k2 {
            bail!("product: [{m}, {k}] @ [{k2}, {n}] do not fit");
        }
        let lhs = contiguous_f32("product", s1, l1)?;
        let rhs = contiguous_f32("product", s2, l2)?;
        let lhs = Operand {
            data: lhs,
            transposed: self.lhs_t,
        };
        let out = gemm_new(lhs, Operand::plain(rhs), (m, n, k), self.scale)?;
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

struct LoraAdd {
    scale: f64,
}

impl CustomOp3 for LoraAdd {
    fn name(&self) -> &'static str {
        "lora-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, out) = dims2(l1, "lora-add")?;
        let ((n2, r), (out2, r2)) = (dims2(l2, "lora-add")?, dims2(l3, "lora-add")?);
        if n != n2 || out != out2 || r != r2 {
            bail!("lora-add: shapes [{n}, {out}] + [{n2}, {r}] @ [{out2}, {r2}]^T do not fit");
        }
        let y = contiguous_f32("lora-add", s1, l1)?;
        let u = contiguous_f32("lora-add", s2, l2)?;
        let b = contiguous_f32("lora-add", s3, l3)?;
        let mut dst = y.to_vec();
        gemm_add(
            &mut dst,
            Operand::plain(u),
            Operand::t(b),
            (n, out, r),
            self.scale as f32,
        )?;
        Ok((CpuStorage::F32(dst), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        u: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let du = product(grad, b, false, self.scale)?;
        let db = product(grad, u, true, self.scale)?;
        Ok((Some(grad.clone()), Some(du), Some(db)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn rand(shape: (usize, usize), rng: &mut rand_chacha::ChaCha8Rng) -> Tensor {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        let err = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err / scale < 1e-5, "relative error {}", err / scale);
    }

    #[test]
    fn frozen_linear_and_lora_add_match_the_composition() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for (n, k, out, r) in [(1, 1, 1, 1), (37, 13, 29, 4), (130, 64, 96, 16)] {
            let x = Var::from_tensor(&rand((n, k), &mut rng)).unwrap();
            let w = rand((out, k), &mut rng);
            let a = Var::from_tensor(&rand((r, k), &mut rng)).unwrap();
            let b = Var::from_tensor(&rand((out, r), &mut rng)).unwrap();
            let probe = rand((n, out), &mut rng);
            let scale = 0.75;

            let u = x.matmul(&a.t().unwrap()).unwrap();
            let fused = lora_add(&frozen_linear(&x, &w).unwrap(), &u, &b, scale).unwrap();
            let composed = (x.matmul(&w.t().unwrap()).unwrap()
                + (u.matmul(&b.t().unwrap()).unwrap() * scale).unwrap())
            .unwrap();
            close(&fused, &composed);

            let gf = (fused * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gc = (composed * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &a, &b] {
                close(gf.get(v).unwrap(), gc.get(v).unwrap());
            }
        }
    }

    #[test]
    fn the_weight_gets_no_gradient() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let x = Var::from_tensor(&rand((5, 3), &mut rng)).unwrap();
        let w = Var::from_tensor(&rand((4, 3), &mut rng)).unwrap();
        let g = frozen_linear(&x, &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&w).is_none());
        assert!(g.get(&x).is_some());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let d = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &d).unwrap();
        let w = Tensor::zeros((4, 5), DType::F32, &d).unwrap();
        assert!(frozen_linear(&x, &w).is_err());
        let y = Tensor::zeros((2, 4), DType::F32, &d).unwrap();
        let u = Tensor::zeros((2, 2), DType::F32, &d).unwrap();
        let b = Tensor::zeros((4, 3), DType::F32, &d).unwrap();
        assert!(lora_add(&y, &u, &b, 1.0).is_err());
        // Off the fused path (here f64) the product still comes out, through candle's matmul.
        let x64 = Tensor::ones((2, 3), DType::F64, &d).unwrap();
        let w64 = Tensor::ones((4, 3), DType::F64, &d).unwrap();
        let y64 = frozen_linear(&x64, &w64).unwrap();
        assert_eq!(y64.to_vec2::<f64>().unwrap(), vec![vec![3.0; 4]; 2]);
    }
}
