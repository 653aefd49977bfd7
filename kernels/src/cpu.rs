//! What the CPU kernels share: reading a contiguous f32 input, handing out rows to rayon tasks,
//! output buffers written in full without zeroing, and compiling a kernel for the widest SIMD the CPU
//! has (picked at run time, so the build stays portable).
use candle_core::{bail, CpuStorage, Layout, Result, Storage, StorageRef, Tensor};
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

/// An operand of [`gemm_to`]: a matrix stored row-major, used as stored or transposed.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub data: &'a [f32],
    /// The stored matrix is `[cols, rows]` of the operand (it is read transposed, no copy).
    pub transposed: bool,
}

impl<'a> Operand<'a> {
    pub(crate) fn plain(data: &'a [f32]) -> Self {
        Operand {
            data,
            transposed: false,
        }
    }

    pub(crate) fn t(data: &'a [f32]) -> Self {
        Operand {
            data,
            transposed: true,
        }
    }

    /// Column and row strides of the `[rows, cols]` operand.
    fn strides(&self, rows: usize, cols: usize) -> (isize, isize) {
        match self.transposed {
            true => (rows as isize, 1),
            false => (1, cols as isize),
        }
    }
}

/// `dst[m, n] = scale * lhs[m, k] @ rhs[k, n]` (or `dst += ...` with `accumulate`), `dst` row-major,
/// computed by the `gemm` crate on the current rayon pool (private: `accumulate` on uninitialised
/// memory would read it; the wrappers below pair each kind of buffer with the right mode). Every
/// buffer's length is checked, so a shape bug is an error, never an out-of-bounds access. Writes
/// every element of `dst`.
fn gemm_to(
    dst: &mut [MaybeUninit<f32>],
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    (m, n, k): (usize, usize, usize),
    scale: f32,
    accumulate: bool,
) -> Result<()> {
    if dst.len() != m * n || lhs.data.len() != m * k || rhs.data.len() != k * n {
        bail!(
            "gemm: buffers of {}, {} and {} floats for a [{m}, {k}] @ [{k}, {n}] product",
            dst.len(),
            lhs.data.len(),
            rhs.data.len()
        );
    }
    if m * n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(MaybeUninit::new(0.0));
        }
        return Ok(());
    }
    let parallelism = match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    let (lhs_cs, lhs_rs) = lhs.strides(m, k);
    let (rhs_cs, rhs_rs) = rhs.strides(k, n);
    // SAFETY: the lengths were checked above: lhs holds m*k floats and rhs k*n, read with the
    // strides of their [m, k] / [k, n] views (row-major, or transposed); dst holds m*n floats,
    // written row-major, and aliases neither input (it is a unique borrow). With accumulate =
    // false gemm writes dst without reading it, so uninitialised memory is never read: in
    // gemm-common 0.19.0 (pinned `=0.19.0` in the workspace; re-check on any bump) every kernel
    // compiled here (`microkernel!`, gemv, gevv, the k = 0 path) tests `alpha` (zero when
    // read_dst is false) before reading dst, full tiles and edge tiles alike. Only its
    // `microkernel_amx!` kernels copy a destination's edge tiles in first, and they exist only
    // with gemm's `experimental-apple-amx` feature, which nothing in this workspace enables
    // (`cargo tree -e features -i gemm-common`). With accumulate = true the callers pass
    // initialised memory (`gemm_add`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<f32>(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.data.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// `dst += scale * lhs @ rhs` on initialised memory (see [`gemm_to`]).
pub(crate) fn gemm_add(
    dst: &mut [f32],
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    dims: (usize, usize, usize),
    scale: f32,
) -> Result<()> {
    // SAFETY: f32 and MaybeUninit<f32> have the same layout; gemm_to only writes floats into it.
    let dst = unsafe { &mut *(dst as *mut [f32] as *mut [MaybeUninit<f32>]) };
    gemm_to(dst, lhs, rhs, dims, scale, true)
}

/// `dst = scale * lhs @ rhs` into initialised memory (a reused buffer; see [`gemm_to`]).
pub(crate) fn gemm_set(
    dst: &mut [f32],
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    dims: (usize, usize, usize),
    scale: f32,
) -> Result<()> {
    // SAFETY: f32 and MaybeUninit<f32> have the same layout; gemm_to only writes floats into it.
    let dst = unsafe { &mut *(dst as *mut [f32] as *mut [MaybeUninit<f32>]) };
    gemm_to(dst, lhs, rhs, dims, scale, false)
}

/// A fresh `[m, n]` product `scale * lhs @ rhs` (see [`gemm_to`]), never zero-filled first.
pub(crate) fn gemm_new(
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    (m, n, k): (usize, usize, usize),
    scale: f32,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(m * n);
    gemm_to(
        &mut out.spare_capacity_mut()[..m * n],
        lhs,
        rhs,
        (m, n, k),
        scale,
        false,
    )?;
    // SAFETY: gemm_to succeeded, so it wrote all m * n elements (accumulate = false).
    unsafe { out.set_len(m * n) };
    Ok(out)
}

/// A read-locked CPU tensor: backward passes receive tensors, not storages.
pub(crate) struct Read<'a> {
    storage: StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Read<'a> {
    pub(crate) fn new(t: &'a Tensor) -> Self {
        let (storage, layout) = t.storage_and_layout();
        Read { storage, layout }
    }

    /// The elements, if the tensor is a contiguous f32 CPU tensor (else an error naming `what`).
    pub(crate) fn f32(&self, what: &str) -> Result<&[f32]> {
        let Storage::Cpu(s) = &*self.storage else {
            bail!("{what}: not a CPU tensor");
        };
        contiguous_f32(what, s, self.layout)
    }
}
