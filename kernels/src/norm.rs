//! RMSNorm (HF `LlamaRMSNorm`) with a frozen weight: one pass over memory forward, one backward.
//!
//! The composition it replaces (`x * (mean(x^2) + eps)^-1/2 * w` from candle ops) makes about seven
//! passes forward and keeps their temporaries for a backward of about fifteen more. Here each row is
//! read once from memory: its sum of squares is taken (in f64) and the output written while the row
//! is still in L1. Backward saves nothing beyond the input the graph holds anyway: per row it
//! recomputes the inverse rms and `sum(g * w * x)` (both in f64, the row in L1 after the first
//! sweep) and writes `dx`:
//!
//! ```text
//! inv  = (sum(x^2) / d + eps)^-1/2
//! dx_j = inv * w_j * g_j - x_j * inv^3 / d * sum_i(g_i * w_i * x_i)
//! ```
//!
//! Outputs are not zeroed before they are written, and the row loops are compiled for AVX-512/AVX2
//! as well and picked at run time (see `wide`).
use crate::cpu::{contiguous_f32, rows_per_task, uninit_output, wide};
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension (HF `LlamaRMSNorm`).
///
/// `x` is `[.., d]` (any layout; a non-contiguous one is copied first) and gets a gradient; `weight`
/// (`[d]`) is frozen: no gradient is computed for it even if it is a `Var`. f32 on the CPU runs the
/// fused kernel; any other device or dtype runs the equivalent candle composition.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let fused = x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && x.elem_count() > 0;
    if !fused {
        return composed(x, weight, eps);
    }
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] {
        bail!(
            "rms_norm: weight has shape {:?}, expected [{d}] for input {:?}",
            weight.dims(),
            x.dims()
        )
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

/// The candle composition, for devices and dtypes without a fused kernel (same as `ops::rms_norm`).
fn composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let inv = x
        .sqr()?
        .mean_keepdim(D::Minus1)?
        .affine(1.0, eps)?
        .sqrt()?
        .recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(weight)
}

/// Forward op on (`x`, `weight`), both contiguous f32.
struct RmsNorm {
    eps: f64,
}

/// Backward op on (`x`, `weight`, `grad`), all contiguous f32; yields `dx`.
struct RmsNormBwd {
    eps: f64,
}

/// `sum(x_i^2)`, accumulated in f64 over eight lanes (which the compiler keeps in vector registers).
#[inline(always)]
fn sum_sq(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f64::from(v) * f64::from(v);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `sum(g_i * w_i * x_i)`, accumulated in f64 like `sum_sq`. Kept out of `sum_sq`'s loop: LLVM
/// vectorises the two separate loops well and the fused one badly (the row is in L1 for the second).
#[inline(always)]
fn sum_gwx(x: &[f32], w: &[f32], g: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let n = x.len() / 8 * 8;
    for ((xc, wc), gc) in x[..n]
        .chunks_exact(8)
        .zip(w[..n].chunks_exact(8))
        .zip(g[..n].chunks_exact(8))
    {
        for i in 0..8 {
            acc[i] += f64::from(gc[i] * wc[i]) * f64::from(xc[i]);
        }
    }
    let tail: f64 = (n..x.len())
        .map(|i| f64::from(g[i] * w[i]) * f64::from(x[i]))
        .sum();
    acc.iter().sum::<f64>() + tail
}

#[inline(always)]
fn inv_rms(sum_sq: f64, d: usize, eps: f64) -> f64 {
    1.0 / (sum_sq / d as f64 + eps).sqrt()
}

/// Forward over whole rows of `w.len()` elements.
#[inline(always)]
fn fwd_rows(y: &mut [MaybeUninit<f32>], x: &[f32], w: &[f32], eps: f64) {
    let d = w.len();
    for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let inv = inv_rms(sum_sq(x), d, eps) as f32;
        // `(x * inv) * w`, in the composition's order, so values agree to rounding.
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            y.write(x * inv * w);
        }
    }
}

/// Backward over whole rows: `dx` from `x` and the incoming gradient `g`.
#[inline(always)]
fn bwd_rows(dx: &mut [MaybeUninit<f32>], x: &[f32], w: &[f32], g: &[f32], eps: f64) {
    let d = w.len();
    for ((dx, x), g) in dx
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d))
        .zip(g.chunks_exact(d))
    {
        let inv = inv_rms(sum_sq(x), d, eps);
        let gwx = sum_gwx(x, w, g);
        let c = (inv * inv * inv * gwx / d as f64) as f32;
        let inv = inv as f32;
        for (((dx, &x), &w), &g) in dx.iter_mut().zip(x).zip(w).zip(g) {
            dx.write(inv * (w * g) - c * x);
        }
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (
            contiguous_f32("rms_norm", s1, l1)?,
            contiguous_f32("rms_norm", s2, l2)?,
        );
        let d = w.len();
        if x.len() % d != 0 {
            bail!("rms_norm: {} elements are not rows of {d}", x.len())
        }
        let rows = rows_per_task(d);
        let out = uninit_output(x.len(), |out| {
            out.par_chunks_mut(rows * d)
                .zip(x.par_chunks(rows * d))
                .for_each(|(y, x)| wide(|| fwd_rows(y, x, w, self.eps)));
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(weight, &grad.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
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
        let (x, w, g) = (
            contiguous_f32("rms_norm", s1, l1)?,
            contiguous_f32("rms_norm", s2, l2)?,
            contiguous_f32("rms_norm", s3, l3)?,
        );
        if g.len() != x.len() {
            bail!(
                "rms_norm backward: gradient has {} elements, input {}",
                g.len(),
                x.len()
            )
        }
        let d = w.len();
        if x.len() % d != 0 {
            bail!(
                "rms_norm backward: {} elements are not rows of {d}",
                x.len()
            )
        }
        let rows = rows_per_task(d);
        let dx = uninit_output(x.len(), |dx| {
            dx.par_chunks_mut(rows * d)
                .zip(x.par_chunks(rows * d).zip(g.par_chunks(rows * d)))
                .for_each(|(dx, (x, g))| wide(|| bwd_rows(dx, x, w, g, self.eps)));
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random, report};
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The unfused composition, written out with plain candle ops.
    fn reference(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let inv = (ms + eps).unwrap().sqrt().unwrap().recip().unwrap();
        x.broadcast_mul(&inv).unwrap().broadcast_mul(w).unwrap()
    }

    /// Values and the gradient of `x` for `x` built by `make` from a fresh variable of `base` dims.
    fn check(seed: u64, base: &[usize], make: impl Fn(&Tensor) -> Tensor, eps: f64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let base = random(&mut rng, base, 3.0);
        let probe = make(&base);
        let d = probe.dim(D::Minus1).unwrap();
        let w = random(&mut rng, &[d], 2.0);
        let r = random(&mut rng, probe.dims(), 1.0);
        let run = |f: &dyn Fn(&Tensor) -> Tensor| {
            let v = Var::from_tensor(&base).unwrap();
            let y = f(&make(v.as_tensor()));
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(v.as_tensor()).expect("gradient of x").clone())
        };
        let (y, gx) = run(&|x| rms_norm(x, &w, eps).unwrap());
        let (y_ref, gx_ref) = run(&|x| reference(x, &w, eps));
        assert!(y.is_contiguous());
        assert_close(&y, &y_ref, "value");
        assert_close(&gx, &gx_ref, "gradient of x");
    }

    #[test]
    fn matches_composition_2d() {
        check(1, &[7, 576], |x| x.clone(), 1e-5);
        check(2, &[5, 33], |x| x.clone(), 1e-6);
    }

    #[test]
    fn matches_composition_one_row_and_odd_sizes() {
        check(3, &[1, 13], |x| x.clone(), 1e-5);
        check(4, &[17], |x| x.clone(), 1e-5);
        // A row of one element: with a small eps the gradient is pure cancellation (y = sign(x) * w),
        // so a large eps keeps it meaningful.
        check(5, &[3, 1], |x| x.clone(), 0.5);
    }

    #[test]
    fn matches_composition_across_parallel_tasks() {
        // 49 rows per rayon task at d = 333: three tasks, the last of two rows.
        check(11, &[100, 333], |x| x.clone(), 1e-5);
    }

    #[test]
    fn matches_composition_3d_and_4d() {
        check(6, &[2, 9, 64], |x| x.clone(), 1e-5);
        check(7, &[2, 3, 5, 40], |x| x.clone(), 1e-5);
    }

    #[test]
    fn matches_composition_on_non_contiguous_input() {
        // A transposed view, and a narrowed one (offset and row stride).
        check(8, &[2, 24, 5], |x| x.transpose(1, 2).unwrap(), 1e-5);
        check(9, &[6, 50], |x| x.narrow(1, 3, 41).unwrap(), 1e-5);
    }

    #[test]
    fn weight_gets_no_gradient_and_other_dtypes_fall_back() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let x = Var::from_tensor(&random(&mut rng, &[4, 8], 1.0)).unwrap();
        let w = Var::from_tensor(&random(&mut rng, &[8], 1.0)).unwrap();
        let grads = rms_norm(&x, &w, 1e-5)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&x).is_some());
        assert!(grads.get(&w).is_none(), "the weight is frozen");

        let x64 = x.to_dtype(DType::F64).unwrap();
        let w64 = w.to_dtype(DType::F64).unwrap();
        let y = rms_norm(&x64, &w64, 1e-5).unwrap();
        let expected = rms_norm(&x, &w, 1e-5).unwrap();
        assert_close(&y.to_dtype(DType::F32).unwrap(), &expected, "f64 fallback");
    }

    /// SmolLM2-135M, batch 4 x seq 256. Run with the
    /// worker's allocator settings (without them every fresh buffer is page-faulted and zeroed by
    /// the kernel, which dominates the backward figures):
    /// `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000 RAYON_NUM_THREADS=2
    /// cargo test --release -p lorad-kernels -- --ignored --nocapture --test-threads=1 bench`.
    #[test]
    #[ignore]
    fn bench_rms_norm() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let x = Var::from_tensor(&random(&mut rng, &[4, 256, 576], 2.0)).unwrap();
        let w = random(&mut rng, &[576], 1.0);
        report(
            "rms_norm [4,256,576]",
            &|| rms_norm(&x, &w, 1e-5).unwrap(),
            &|| reference(&x, &w, 1e-5),
        );
    }
}
