//! Test support shared by the kernels' tests: seeded inputs, closeness to the reference
//! composition, and the micro-benchmark report.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

pub(crate) fn random(rng: &mut ChaCha8Rng, dims: &[usize], scale: f32) -> Tensor {
    let n = dims.iter().product::<usize>();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// `max |a - b| <= 1e-5 * max |b|`.
pub(crate) fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff <= 1e-5 * scale.max(1e-30),
        "{what}: max diff {diff} vs scale {scale}"
    );
}
/// The fastest of `iters` runs of `f`, in ms: the machine is shared, and the minimum is the
/// figure least disturbed by other work.
pub(crate) fn time(iters: u32, mut f: impl FnMut()) -> f64 {
    f();
    (0..iters)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}
/// Prints fused vs unfused, forward alone and forward + backward. The backward is seeded by
/// `y.backward()` (a gradient of ones): a loss such as `(y * r).sum_all()` would add ~4-10 ms of
/// candle's own broadcast backward to both sides and drown the difference.
pub(crate) fn report(what: &str, fused: &dyn Fn() -> Tensor, unfused: &dyn Fn() -> Tensor) {
    let fwd = |f: &dyn Fn() -> Tensor| time(50, || drop(f()));
    let step = |f: &dyn Fn() -> Tensor| time(50, || drop(f().backward().unwrap()));
    let (ff, uf) = (fwd(fused), fwd(unfused));
    let (fs, us) = (step(fused), step(unfused));
    println!(
        "bench {what}: fwd {ff:.3} ms fused vs {uf:.3} unfused ({:.1}x); \
         fwd+bwd {fs:.3} vs {us:.3} ({:.1}x)",
        uf / ff,
        us / fs
    );
}
