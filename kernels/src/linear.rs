//! Linear layers of a LoRA step on the CPU, written by gemm straight into their outputs.
//!
//! - [`frozen_linear`]: `x @ weight^T` for a frozen weight: backward returns only `grad @ weight` (no
//!   weight gradient), and the product is the op's own output (no copy to attach it to the graph).
//! - [`lora_linear`]: a frozen layer and its LoRA update (with the adapter's dropout mask) as one op:
//!   without dropout the update is merged into a copy of the weight, so the output and the input
//!   gradient are one product each; the adapter's gradients are rank-`r` products.
//! - [`product`]: the backward passes' products, the scale applied by gemm (no extra pass).
//!
//! The fused paths need f32, rank-2, CPU tensors. Elsewhere `frozen_linear` computes the product on a
//! detached input and attaches it through an identity op with the same backward (so the CUDA build
//! computes no weight gradient either), and `lora_linear` is the candle composition.
use crate::cpu::{contiguous_f32, gemm_add, gemm_new, Operand, Read};
use crate::frozen::Frozen;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, MetalStorage,
    Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Whether the fused path applies: every tensor f32 on the CPU.
pub fn supported(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 2)
}

/// `x @ weight^T` (`x` `[n, in]`, `weight` `[out, in]` frozen) -> `[n, out]`; `x` gets a gradient,
/// `weight` never does. A weight kept in its stored form (bf16, f16, quantized) is widened for each
/// product on the CPU; elsewhere it is widened once here and kept for backward.
pub fn frozen_linear(x: &Tensor, weight: &Frozen) -> Result<Tensor> {
    match weight {
        Frozen::Dense(w) if w.dtype() == x.dtype() => frozen_linear_f32(x, w),
        _ if supported(&[x]) && weight.device().is_cpu() => {
            x.contiguous()?.apply_op1(StoredLinear {
                weight: weight.clone(),
            })
        }
        _ => {
            let w = weight.to_f32(x.device())?;
            frozen_linear_f32(x, &w.to_dtype(x.dtype())?)
        }
    }
}

pub(crate) fn frozen_linear_f32(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
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

/// A frozen linear layer with its LoRA update, in one op:
/// `x @ weight^T + scale * (x * mask) @ a^T @ b^T`, for `x` `[n, in]`, a frozen `weight` `[out, in]`
/// (never gets a gradient), `a` `[r, in]`, `b` `[out, r]` and the adapter's dropout `mask` `[n, in]`
/// (0 or 1/keep; `None` without dropout). Gradients for `x`, `a` and `b`.
///
/// On the CPU in f32 the output and every gradient are single gemm passes into fresh buffers. Without
/// a mask the update is merged into a copy of the weight first (`weight + scale * b @ a`, an
/// `[out, in]` buffer rebuilt in backward rather than kept), so the layer's output and its input
/// gradient are one product each; with a mask the update is a rank-`r` product added to the output.
/// Elsewhere this is the candle composition (`frozen_linear` plus the adapter's products).
pub fn lora_linear(
    x: &Tensor,
    weight: &Frozen,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mut all = vec![x, a, b];
    all.extend(mask);
    if supported(&all) && weight.device().is_cpu() {
        let weight = match weight {
            Frozen::Dense(w) => Frozen::Dense(w.detach().contiguous()?),
            q => q.clone(),
        };
        let op = LoraLinear {
            weight,
            mask: mask.map(|m| m.detach().contiguous()).transpose()?,
            scale: scale as f32,
            x_grad: x.track_op(),
        };
        return x
            .contiguous()?
            .apply_op3(&a.contiguous()?, &b.contiguous()?, op);
    }
    let y = frozen_linear(x, weight)?;
    let xin = match mask {
        Some(m) => (x * m)?,
        None => x.clone(),
    };
    let u = xin.matmul(&a.t()?)?;
    y + u.matmul(&b.t()?)?.affine(scale, 0.0)?
}

/// `scale * lhs @ rhs`, or `scale * lhs^T @ rhs` with `lhs_t`, as a fresh tensor that tracks no
/// gradient: the products of the backward passes here. On the CPU in f32 it is one gemm with the
/// scale folded in (candle's matmul then a scaling would be two passes); elsewhere candle's matmul.
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

/// [`FrozenLinear`] for a weight in its stored form: the weight is the op's own (not an input), widened
/// into a scratch buffer for the forward product and again for backward's.
struct StoredLinear {
    weight: Frozen,
}

impl CustomOp1 for StoredLinear {
    fn name(&self) -> &'static str {
        "frozen-linear-stored"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = dims2(l1, "frozen-linear")?;
        let (out, k2) = self.weight.dims2()?;
        if k != k2 {
            bail!("frozen-linear: x has {k} columns, the weight {k2}");
        }
        let x = contiguous_f32("frozen-linear", s1, l1)?;
        let y = self
            .weight
            .with_f32(|w| gemm_new(Operand::plain(x), Operand::t(w), (n, out, k), 1.0))?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (n, out) = grad.dims2()?;
        let (wo, k) = self.weight.dims2()?;
        if wo != out {
            bail!("frozen-linear backward: gradient [{n}, {out}] for a weight [{wo}, {k}]");
        }
        let rg = Read::new(&grad);
        let g = rg.f32("frozen-linear backward")?;
        let dx = self
            .weight
            .with_f32(|w| gemm_new(Operand::plain(g), Operand::plain(w), (n, k, out), 1.0))?;
        Tensor::from_vec(dx, (n, k), grad.device()).map(Some)
    }
}

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

/// See [`lora_linear`].
struct LoraLinear {
    weight: Frozen,
    mask: Option<Tensor>,
    scale: f32,
    /// Whether `x` needs a gradient (not the first layer's input, which comes from frozen weights):
    /// without it backward skips the full-size product for dx.
    x_grad: bool,
}

/// The shapes of a [`LoraLinear`]: rows, in, out, rank.
struct LoraDims {
    n: usize,
    k: usize,
    out: usize,
    r: usize,
}

impl LoraLinear {
    fn dims(&self, x: &Layout, a: &Layout, b: &Layout) -> Result<LoraDims> {
        let what = "lora-linear";
        let ((n, k), (r, ka), (out, rb)) = (dims2(x, what)?, dims2(a, what)?, dims2(b, what)?);
        let (wo, wk) = self.weight.dims2()?;
        if ka != k || rb != r || wo != out || wk != k {
            bail!(
                "lora-linear: x [{n}, {k}], weight [{wo}, {wk}], a [{r}, {ka}] and b [{out}, {rb}] \
                 do not fit"
            );
        }
        if let Some(m) = &self.mask {
            if m.dims() != [n, k] {
                bail!("lora-linear: dropout mask {:?} for x [{n}, {k}]", m.dims());
            }
        }
        Ok(LoraDims { n, k, out, r })
    }

    /// Calls `f` with `weight + scale * b @ a`, `[out, in]`, built in a scratch buffer.
    fn with_merged<R>(
        &self,
        a: &[f32],
        b: &[f32],
        d: &LoraDims,
        f: impl FnOnce(&[f32]) -> Result<R>,
    ) -> Result<R> {
        self.weight.with_f32_mut(|merged| {
            let (b, a) = (Operand::plain(b), Operand::plain(a));
            gemm_add(merged, b, a, (d.out, d.k, d.r), self.scale)?;
            f(merged)
        })
    }
}

/// `x * mask`, elementwise.
fn masked(x: &[f32], mask: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(
            x.par_chunks(ELEMS_PER_TASK)
                .zip(mask.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(out, (x, mask))| {
            for ((o, x), m) in out.iter_mut().zip(x).zip(mask) {
                *o = x * m;
            }
        });
    out
}

/// `dst += src * mask`, elementwise.
fn add_masked(dst: &mut [f32], src: &[f32], mask: &[f32]) {
    dst.par_chunks_mut(ELEMS_PER_TASK)
        .zip(
            src.par_chunks(ELEMS_PER_TASK)
                .zip(mask.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(dst, (src, mask))| {
            for ((d, s), m) in dst.iter_mut().zip(src).zip(mask) {
                *d += s * m;
            }
        });
}

/// Elements per rayon task in the elementwise loops above.
const ELEMS_PER_TASK: usize = 1 << 15;

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        let d = self.dims(l1, l2, l3)?;
        let x = contiguous_f32("lora-linear", s1, l1)?;
        let a = contiguous_f32("lora-linear", s2, l2)?;
        let b = contiguous_f32("lora-linear", s3, l3)?;
        let y = match &self.mask {
            None => self.with_merged(a, b, &d, |merged| {
                gemm_new(
                    Operand::plain(x),
                    Operand::t(merged),
                    (d.n, d.out, d.k),
                    1.0,
                )
            })?,
            Some(mask) => {
                let mask = Read::new(mask);
                let xin = masked(x, mask.f32("lora-linear mask")?);
                let mut y = self.weight.with_f32(|w| {
                    gemm_new(Operand::plain(x), Operand::t(w), (d.n, d.out, d.k), 1.0)
                })?;
                let u = gemm_new(Operand::plain(&xin), Operand::t(a), (d.n, d.r, d.k), 1.0)?;
                let (u, b) = (Operand::plain(&u), Operand::t(b));
                gemm_add(&mut y, u, b, (d.n, d.out, d.r), self.scale)?;
                y
            }
        };
        Ok((CpuStorage::F32(y), Shape::from((d.n, d.out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let d = self.dims(x.layout(), a.layout(), b.layout())?;
        let what = "lora-linear backward";
        let (rx, ra, rb, rg) = (Read::new(x), Read::new(a), Read::new(b), Read::new(&grad));
        let (xs, a_s, bs, g) = (rx.f32(what)?, ra.f32(what)?, rb.f32(what)?, rg.f32(what)?);
        let (n, k, out, r, s) = (d.n, d.k, d.out, d.r, self.scale);
        // g @ b, [n, r]: the gradient at the adapter's bottleneck (before the scale).
        let gb = gemm_new(Operand::plain(g), Operand::plain(bs), (n, r, out), 1.0)?;
        let (dx, xin) = match &self.mask {
            None if !self.x_grad => (None, None),
            None => {
                // dx = g @ (weight + s * b @ a) in one product.
                let dx = self.with_merged(a_s, bs, &d, |merged| {
                    gemm_new(Operand::plain(g), Operand::plain(merged), (n, k, out), 1.0)
                })?;
                (Some(dx), None)
            }
            Some(mask) => {
                let mask = Read::new(mask);
                let mask = mask.f32(what)?;
                let dx = if self.x_grad {
                    let mut dx = self.weight.with_f32(|w| {
                        gemm_new(Operand::plain(g), Operand::plain(w), (n, k, out), 1.0)
                    })?;
                    let dxin = gemm_new(Operand::plain(&gb), Operand::plain(a_s), (n, k, r), s)?;
                    add_masked(&mut dx, &dxin, mask);
                    Some(dx)
                } else {
                    None
                };
                (dx, Some(masked(xs, mask)))
            }
        };
        let xin = xin.as_deref().unwrap_or(xs);
        // u = xin @ a^T, [n, r] (recomputed: cheaper than keeping it).
        let u = gemm_new(Operand::plain(xin), Operand::t(a_s), (n, r, k), 1.0)?;
        let da = gemm_new(Operand::t(&gb), Operand::plain(xin), (r, k, n), s)?;
        let db = gemm_new(Operand::t(g), Operand::plain(&u), (out, r, n), s)?;
        let dev = x.device();
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, (n, k), dev)).transpose()?,
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (out, r), dev)?),
        ))
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
    fn lora_linear_matches_the_composition_with_and_without_dropout() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for (n, k, out, r) in [(1, 1, 1, 1), (37, 13, 29, 4), (130, 64, 96, 16)] {
            for dropout in [false, true] {
                let x = Var::from_tensor(&rand((n, k), &mut rng)).unwrap();
                let w = rand((out, k), &mut rng);
                let a = Var::from_tensor(&rand((r, k), &mut rng)).unwrap();
                let b = Var::from_tensor(&rand((out, r), &mut rng)).unwrap();
                let probe = rand((n, out), &mut rng);
                let mask = dropout.then(|| {
                    let m: Vec<f32> = (0..n * k)
                        .map(|_| if rng.random_bool(0.3) { 0.0 } else { 1.0 / 0.7 })
                        .collect();
                    Tensor::from_vec(m, (n, k), &Device::Cpu).unwrap()
                });
                let scale = 0.75;

                let fused = lora_linear(&x, &Frozen::from(w.clone()), &a, &b, scale, mask.as_ref())
                    .unwrap();
                let xin = match &mask {
                    Some(m) => (x.as_tensor() * m).unwrap(),
                    None => x.as_tensor().clone(),
                };
                let update = xin
                    .matmul(&a.t().unwrap())
                    .unwrap()
                    .matmul(&b.t().unwrap())
                    .unwrap();
                let composed =
                    (x.matmul(&w.t().unwrap()).unwrap() + (update * scale).unwrap()).unwrap();
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
    }

    #[test]
    fn off_the_fused_path_lora_linear_is_the_composition() {
        // f64 takes the path other devices take: candle's ops, gradients included.
        let d = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[[1f64, 2.0], [3.0, -1.0]], &d).unwrap()).unwrap();
        let w = Tensor::new(&[[1f64, 0.0], [0.0, 1.0], [1.0, 1.0]], &d).unwrap();
        let a = Var::from_tensor(&Tensor::new(&[[0.5f64, -1.0]], &d).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[[1f64], [2.0], [0.0]], &d).unwrap()).unwrap();
        let mask = Tensor::new(&[[2f64, 0.0], [0.0, 2.0]], &d).unwrap();
        let y = lora_linear(&x, &Frozen::from(w.clone()), &a, &b, 0.5, Some(&mask)).unwrap();
        // Row 0: base [1, 2, 3]; x*mask = [2, 0] -> u = 1 -> + 0.5 * [1, 2, 0].
        // Row 1: base [3, -1, 2]; x*mask = [0, -2] -> u = 2 -> + 0.5 * [2, 4, 0].
        let want = vec![vec![1.5, 3.0, 3.0], vec![4.0, 1.0, 2.0]];
        assert_eq!(y.to_vec2::<f64>().unwrap(), want);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_some() && g.get(&a).is_some() && g.get(&b).is_some());
    }

    #[test]
    fn a_stored_weight_gives_the_widened_weights_results_on_and_off_the_fused_path() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let w = rand((24, 64), &mut rng);
        let half = Frozen::Dense(w.to_dtype(DType::BF16).unwrap());
        let widened = Frozen::Dense(
            w.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        );
        // The CPU's fused path (f32 input): the same products, forward and backward, bit for bit.
        let x = Var::from_tensor(&rand((10, 64), &mut rng)).unwrap();
        let a = Var::from_tensor(&rand((4, 64), &mut rng)).unwrap();
        let b = Var::from_tensor(&rand((24, 4), &mut rng)).unwrap();
        for w in [&half, &widened] {
            assert!(!w.is_variable());
        }
        let run = |w: &Frozen| {
            let y = frozen_linear(&x, w).unwrap();
            let z = lora_linear(&x, w, &a, &b, 0.5, None).unwrap();
            let g = (y.sum_all().unwrap() + z.sum_all().unwrap())
                .unwrap()
                .backward()
                .unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (v(&y), v(&z), v(g.get(&x).unwrap()), v(g.get(&a).unwrap()))
        };
        assert_eq!(run(&half), run(&widened));
        // Off the fused path (f64 stands for another device): candle's cast, then its product.
        let x64 = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let y = frozen_linear(&x64, &half).unwrap();
        let want = x64
            .matmul(
                &widened
                    .to_f32(&Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .t()
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap(), want.to_vec2::<f64>().unwrap());
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x64).is_some(), "the input still gets its gradient");
    }

    #[test]
    fn an_input_without_gradient_gets_none_and_the_adapter_still_learns() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let x = rand((6, 4), &mut rng);
        let w = rand((3, 4), &mut rng);
        let a = Var::from_tensor(&rand((2, 4), &mut rng)).unwrap();
        let b = Var::from_tensor(&rand((3, 2), &mut rng)).unwrap();
        let mask = Tensor::ones((6, 4), DType::F32, &Device::Cpu).unwrap();
        for mask in [None, Some(&mask)] {
            let y = lora_linear(&x, &Frozen::from(w.clone()), &a, &b, 2.0, mask).unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            assert!(g.get(&x).is_none());
            let composed = (x.matmul(&w.t().unwrap()).unwrap()
                + (x.matmul(&a.t().unwrap())
                    .unwrap()
                    .matmul(&b.t().unwrap())
                    .unwrap()
                    * 2.0)
                    .unwrap())
            .unwrap();
            let gc = composed.sum_all().unwrap().backward().unwrap();
            close(g.get(&a).unwrap(), gc.get(&a).unwrap());
            close(g.get(&b).unwrap(), gc.get(&b).unwrap());
        }
    }

    #[test]
    fn products_match_matmul() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (l, r) = (rand((7, 5), &mut rng), rand((5, 3), &mut rng));
        close(
            &product(&l, &r, false, 2.0).unwrap(),
            &(l.matmul(&r).unwrap() * 2.0).unwrap(),
        );
        let lt = rand((5, 7), &mut rng);
        close(
            &product(&lt, &r, true, 0.5).unwrap(),
            &(lt.t().unwrap().matmul(&r).unwrap() * 0.5).unwrap(),
        );
    }

    #[test]
    fn the_weight_gets_no_gradient() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let x = Var::from_tensor(&rand((5, 3), &mut rng)).unwrap();
        let w = Var::from_tensor(&rand((4, 3), &mut rng)).unwrap();
        let g = frozen_linear(&x, &Frozen::from(w.as_tensor().clone()))
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
        assert!(frozen_linear(&x, &Frozen::from(w.clone())).is_err());
        let x = Tensor::zeros((2, 3), DType::F32, &d).unwrap();
        let w = Tensor::zeros((4, 3), DType::F32, &d).unwrap();
        let a = Tensor::zeros((2, 3), DType::F32, &d).unwrap();
        let b = Tensor::zeros((4, 3), DType::F32, &d).unwrap();
        assert!(lora_linear(&x, &Frozen::from(w.clone()), &a, &b, 1.0, None).is_err());
        let b = Tensor::zeros((4, 2), DType::F32, &d).unwrap();
        let mask = Tensor::zeros((3, 3), DType::F32, &d).unwrap();
        assert!(lora_linear(&x, &Frozen::from(w.clone()), &a, &b, 1.0, Some(&mask)).is_err());
        assert!(lora_linear(&x, &Frozen::from(w.clone()), &a, &b, 1.0, None).is_ok());
        // Off the fused path (here f64) the product still comes out, through candle's matmul.
        let x64 = Tensor::ones((2, 3), DType::F64, &d).unwrap();
        let w64 = Tensor::ones((4, 3), DType::F64, &d).unwrap();
        let y64 = frozen_linear(&x64, &Frozen::from(w64.clone())).unwrap();
        assert_eq!(y64.to_vec2::<f64>().unwrap(), vec![vec![3.0; 4]; 2]);
    }
}
