//! SwiGLU's `silu(gate) * up`: one pass over memory forward, one backward, nothing saved.
//!
//! The composition makes two passes forward and keeps `silu(gate)` for a backward of about ten more
//! (candle's silu backward alone rebuilds the sigmoid through neg, exp, add, recip). Here backward
//! reads `gate`, `up` and the incoming gradient once and writes both gradients in the same sweep,
//! recomputing the sigmoid:
//!
//! ```text
//! s = 1 / (1 + exp(-g))      d_up = grad * g * s      d_gate = grad * u * s * (1 + g * (1 - s))
//! ```
//!
//! `exp` is a branch-free polynomial that vectorises (libm's `expf` does not), outputs are not zeroed
//! before they are written, and the loops are compiled for AVX-512/AVX2 as well and picked at run
//! time (see `wide`).
use crate::cpu::{contiguous_f32, uninit_output, wide};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `silu(gate) * up`, elementwise; both inputs (same shape, any layout) get gradients.
///
/// f32 on the CPU runs the fused kernel; any other device or dtype runs `gate.silu()? * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let fused = gate.device().is_cpu() && gate.dtype() == DType::F32 && up.dtype() == DType::F32;
    if !fused {
        return gate.silu()? * up;
    }
    if gate.dims() != up.dims() {
        bail!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        )
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// Forward op on (`gate`, `up`), both contiguous f32.
struct Swiglu;

/// Backward op on (`gate`, `up`, `grad`), all contiguous f32; yields `[2, ..]`: `d_gate` then `d_up`.
struct SwigluBwd;

/// Elements handed to one rayon task.
const CHUNK: usize = 16 * 1024;

/// `exp(x)` to about one ulp for `x` in `[-87, 88]` (Cephes' `expf` polynomial), arguments outside
/// clamped into it (the sigmoid needs nothing beyond). Unlike `f32::exp` (a libm call) it has no
/// branches or calls, so loops over slices vectorise.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits (for |v| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: i32 = 0x4B40_0000;
    // ln 2 split so that `n * LN2_HI` is exact for the |n| <= 127 used here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n built from its exponent bits: n + 127 lies in [1, 254], a normal float.
    let two_n = f32::from_bits(((t.to_bits() as i32 - ROUND_BITS + 127) << 23) as u32);
    e * two_n
}

/// `y = silu(g) * u` over one chunk, as candle's silu (`g / (1 + exp(-g))`) times `u`.
#[inline(always)]
fn fwd_kernel(y: &mut [MaybeUninit<f32>], g: &[f32], u: &[f32]) {
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        y.write(g / (1.0 + exp(-g)) * u);
    }
}

/// Both gradients over one chunk, the sigmoid recomputed from `g`.
#[inline(always)]
fn bwd_kernel(
    dg: &mut [MaybeUninit<f32>],
    du: &mut [MaybeUninit<f32>],
    g: &[f32],
    u: &[f32],
    dy: &[f32],
) {
    for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du).zip(g).zip(u).zip(dy) {
        let s = 1.0 / (1.0 + exp(-g));
        du.write(dy * (g * s));
        dg.write(dy * u * (s * (1.0 + g * (1.0 - s))));
    }
}

/// `silu(g) * u` into a fresh buffer, in parallel.
pub(crate) fn forward(g: &[f32], u: &[f32]) -> Result<Vec<f32>> {
    let n = g.len();
    if u.len() != n {
        bail!("swiglu: {n} gate elements, {} up", u.len())
    }
    Ok(uninit_output(n, |y| {
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| wide(|| fwd_kernel(y, g, u)))
    }))
}

/// Both gradients for an incoming `dy`: one buffer, `d_gate` then `d_up`, written in the same sweep.
pub(crate) fn backward(g: &[f32], u: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
    let n = g.len();
    if u.len() != n || dy.len() != n {
        bail!(
            "swiglu backward: {n} gate elements, {} up, {} gradient",
            u.len(),
            dy.len()
        )
    }
    Ok(uninit_output(2 * n, |out| {
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .zip(dy.par_chunks(CHUNK))
            .for_each(|(((dg, du), (g, u)), dy)| wide(|| bwd_kernel(dg, du, g, u, dy)))
    }))
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (
            contiguous_f32("swiglu", s1, l1)?,
            contiguous_f32("swiglu", s2, l2)?,
        );
        Ok((CpuStorage::F32(forward(g, u)?), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwigluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

impl CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
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
        let (g, u, dy) = (
            contiguous_f32("swiglu", s1, l1)?,
            contiguous_f32("swiglu", s2, l2)?,
            contiguous_f32("swiglu", s3, l3)?,
        );
        let out = backward(g, u, dy)?;
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random, report};
    use candle_core::{Device, Var};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The unfused composition, written out with plain candle ops.
    fn reference(gate: &Tensor, up: &Tensor) -> Tensor {
        (gate.silu().unwrap() * up).unwrap()
    }

    /// Values and both gradients; `gate` and `up` are built by `make` from variables of `base` dims.
    fn check(seed: u64, base: &[usize], make: impl Fn(&Tensor) -> Tensor) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Wide enough to reach both tails of the sigmoid.
        let gate0 = random(&mut rng, base, 12.0);
        let up0 = random(&mut rng, base, 2.0);
        let r = random(&mut rng, make(&gate0).dims(), 1.0);
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
            let (g, u) = (
                Var::from_tensor(&gate0).unwrap(),
                Var::from_tensor(&up0).unwrap(),
            );
            let y = f(&make(g.as_tensor()), &make(u.as_tensor()));
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let dg = grads.get(g.as_tensor()).expect("gradient of gate").clone();
            let du = grads.get(u.as_tensor()).expect("gradient of up").clone();
            (y, dg, du)
        };
        let (y, dg, du) = run(&|g, u| swiglu(g, u).unwrap());
        let (y_ref, dg_ref, du_ref) = run(&|g, u| reference(g, u));
        assert!(y.is_contiguous());
        assert_close(&y, &y_ref, "value");
        assert_close(&dg, &dg_ref, "gradient of gate");
        assert_close(&du, &du_ref, "gradient of up");
    }

    #[test]
    fn matches_composition_2d_and_odd_sizes() {
        check(1, &[7, 1536], |x| x.clone());
        check(2, &[5, 33], |x| x.clone());
        check(3, &[1, 1], |x| x.clone());
        check(4, &[40_001], |x| x.clone());
    }

    #[test]
    fn matches_composition_3d_and_4d() {
        check(5, &[2, 9, 70], |x| x.clone());
        check(6, &[2, 3, 5, 40], |x| x.clone());
    }

    #[test]
    fn matches_composition_on_non_contiguous_input() {
        check(7, &[3, 40, 6], |x| x.transpose(1, 2).unwrap());
        check(8, &[6, 50], |x| x.narrow(1, 3, 41).unwrap());
    }

    #[test]
    fn other_dtypes_fall_back() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (g, u) = (
            random(&mut rng, &[3, 8], 4.0),
            random(&mut rng, &[3, 8], 1.0),
        );
        let y = swiglu(
            &g.to_dtype(DType::F64).unwrap(),
            &u.to_dtype(DType::F64).unwrap(),
        )
        .unwrap();
        assert_eq!(y.dtype(), DType::F64);
        assert_close(
            &y.to_dtype(DType::F32).unwrap(),
            &reference(&g, &u),
            "f64 fallback",
        );
    }

    #[test]
    fn exp_is_accurate_in_range_and_saturates_outside() {
        let mut worst = 0f64;
        for i in 0..=175_000 {
            let x = -87.0 + i as f64 * 1e-3;
            let got = f64::from(exp(x as f32));
            let want = (x as f32 as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "max relative error {worst:e}");
        // Far outside: finite, so the sigmoid is exactly 0 or 1 and silu never produces NaN.
        for x in [-1e30f32, -1000.0, 1000.0, 1e30] {
            assert!(exp(x).is_finite() && exp(x) > 0.0, "exp({x})");
        }
        let g = Tensor::new(&[-1e4f32, -200.0, -90.0, 90.0, 200.0, 1e4], &Device::Cpu).unwrap();
        let u = Tensor::ones(6, DType::F32, &Device::Cpu).unwrap();
        assert_close(&swiglu(&g, &u).unwrap(), &reference(&g, &u), "saturated");
    }

    /// SmolLM2-135M's MLP, batch 4 x seq 256. Run with the
    /// worker's allocator settings (without them every fresh buffer is page-faulted and zeroed by
    /// the kernel, which dominates the backward figures):
    /// `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000 RAYON_NUM_THREADS=2
    /// cargo test --release -p lorad-kernels -- --ignored --nocapture --test-threads=1 bench`.
    #[test]
    #[ignore]
    fn bench_swiglu() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let dims = [4, 256, 1536];
        let g = Var::from_tensor(&random(&mut rng, &dims, 4.0)).unwrap();
        let u = Var::from_tensor(&random(&mut rng, &dims, 1.0)).unwrap();
        report("swiglu [4,256,1536]", &|| swiglu(&g, &u).unwrap(), &|| {
            reference(&g, &u)
        });
    }
}
