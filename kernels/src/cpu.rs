//! What the CPU kernels share: reading a contiguous f32 input, handing out rows to rayon tasks,
//! output buffers written in full without zeroing, and compiling a kernel for the widest SIMD the CPU
//! has (picked at run time, so the build stays portable).
use candle_core::{bail, CpuStorage, Layout, Result};
use std::mem::MaybeUninit;

/// The elements of a contiguous f32 tensor. The wrappers make every input contiguous, so anything
/// else is a bug in this module, reported as an error rather than a panic.
pub(crate) fn contiguous_f32<'a>(what: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<f32>()?[start..end]),
        None => bail!("{what}: input is not contiguous"),
    }
}

/// Rows handed to one rayon task: enough work (~16k elements) to amortise the task's overhead.
pub(crate) fn rows_per_task(d: usize) -> usize {
    (16 * 1024 / d).max(1)
}

/// A buffer of `n` floats that `fill` must write in full. Not zeroed first: with the worker's
/// allocator, which keeps freed memory, `vec![0.0; n]` is a memset, a whole extra pass over it.
pub(crate) fn uninit_output(n: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    fill(&mut out.spare_capacity_mut()[..n]);
    // SAFETY: the capacity is at least `n`, and every caller's `fill` writes every element: each
    // zips its output rows or chunks with input rows or chunks of the same length (lengths are
    // checked to match) and writes them in full.
    unsafe { out.set_len(n) };
    out
}

/// Runs `f` compiled for AVX-512 or AVX2 where the CPU has them (picked at run time, so the build
/// stays portable), else for the baseline. `f` is a kernel call, inlined into these wrappers and so
/// compiled with their features. Results are the same on every path: nothing here is contracted into
/// FMAs. The f64 row sums are compute-bound on SSE2's two f64 lanes.
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { avx512(f) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { avx2(f) };
        }
    }
    f()
}
