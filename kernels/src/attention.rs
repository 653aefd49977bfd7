//! Causal self-attention with grouped KV heads, as one candle op with its own backward.
//!
//! The engine's composition (`repeat_kv`, `q @ k^T * scale + mask`, softmax, `@ v`) materialises the
//! repeated K/V and keeps about six `[b, h, t, t]` tensors alive for backward. This op computes the
//! same numbers flash-attention style:
//!
//! - forward, one rayon task per (batch, query head), in tiles of [`BLOCK`] query rows: the tile's
//!   scores against only the keys it may see (causal, and the sliding window), a softmax per row,
//!   times V. The query head reads its KV head in place (no repeat). It keeps only the output and
//!   the per-row log-sum-exp `[b, h, t]`.
//! - backward, one task per (batch, KV head), so the query heads sharing a KV head accumulate dK and
//!   dV into the same task's buffers (no races, no atomics): per tile, the probabilities are
//!   recomputed from the scores and the saved log-sum-exp, then `dV += P^T dO`,
//!   `dS = P * (dO V^T - rowsum(dO * O)) * scale`, `dQ = dS K`, `dK += dS^T Q`.
//!
//! The products run on per-tile matrices through the `gemm` crate (the kernels candle's own matmul
//! uses), single-threaded inside each task. Everything is f32, as in the composition: the row
//! reductions (max, sum of exponentials, `dO . O`) keep 16 independent accumulators summed pairwise,
//! and the exponential is a branch-free polynomial within 2 ulp, so that the row work vectorises (an
//! AVX-512 build of it is picked at run time, like gemm's kernels). The order of every sum is fixed,
//! so results do not depend on the number of threads.
use std::sync::{Mutex, PoisonError};

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::Read;

/// Query rows per tile. A tile's scores are `BLOCK x keys` (at most `BLOCK x t` floats per thread);
/// smaller tiles skip more of the masked upper triangle, larger ones make longer gemm calls.
const BLOCK: usize = 64;

/// Causal self-attention with grouped KV heads: q [b, h, t, d], k and v [b, kv, t, d] (h a multiple
/// of kv; query head i uses KV head i / (h / kv), as transformers' repeat_kv), scores scaled by
/// `scale`, masked causally and, with `window = Some(w)`, to keys j with i - j < w (Mistral sliding
/// window). Returns [b, h, t, d] contiguous. Gradients for q, k and v.
///
/// On the CPU with f32 inputs this is one fused op that keeps only its output and the per-row
/// log-sum-exp for backward; elsewhere (CUDA, other dtypes) it is the plain composition of candle
/// ops, which computes the same math.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    let dims = Dims::new(q, k, v, scale, window)?;
    let fused = [q, k, v]
        .iter()
        .all(|x| x.device().is_cpu() && x.dtype() == DType::F32);
    if !fused {
        return composed(q, k, v, scale, window);
    }
    if dims.is_empty() {
        return Tensor::zeros((dims.b, dims.h, dims.t, dims.d), DType::F32, q.device());
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3(
        &k,
        &v,
        Attention {
            dims,
            lse: Mutex::new(None),
        },
    )
}

/// The engine's composition of candle ops (`worker::model::Attention::forward`): the fallback off
/// the CPU, and what the fused op must equal.
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let repeat = |x: &Tensor| -> Result<Tensor> {
        if h == kv {
            return Ok(x.clone());
        }
        x.unsqueeze(2)?
            .broadcast_as((b, kv, h / kv, t, d))?
            .contiguous()?
            .reshape((b, h, t, d))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| {
                let outside = j > i || window.is_some_and(|w| i - j >= w);
                if outside {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), q.device())?.to_dtype(q.dtype())?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let e = scores.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.matmul(&v)
}

/// The validated problem size.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    d: usize,
    scale: f32,
    window: Option<usize>,
}

impl Dims {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, window: Option<usize>) -> Result<Self> {
        let (b, h, t, d) = q.dims4()?;
        let (bk, kv, tk, dk) = k.dims4()?;
        if v.dims() != k.dims() || (bk, tk, dk) != (b, t, d) {
            bail!(
                "causal_attention: q {:?}, k {:?}, v {:?}: expected q [b, h, t, d] and k, v [b, kv, t, d]",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if kv == 0 || h % kv != 0 {
            bail!("causal_attention: {h} query heads is not a multiple of {kv} KV heads");
        }
        if window == Some(0) {
            bail!("causal_attention: a sliding window must hold at least one key");
        }
        Ok(Dims {
            b,
            h,
            kv,
            t,
            d,
            scale: scale as f32,
            window,
        })
    }

    fn is_empty(&self) -> bool {
        self.b * self.h * self.t * self.d == 0
    }

    /// Query heads per KV head.
    fn group(&self) -> usize {
        self.h / self.kv
    }

    /// The first key query row `i` may attend to (the last is `i` itself).
    fn first_key(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))
    }

    /// Elements of one head's `[t, d]` matrix.
    fn head(&self) -> usize {
        self.t * self.d
    }
}

/// The op. Forward leaves the per-row log-sum-exp here for backward (candle's `CustomOp3` returns
/// a single tensor; the op lives in the graph exactly as long as backward can still be called).
struct Attention {
    dims: Dims,
    lse: Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
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
        let Dims { b, h, kv, t, d, .. } = self.dims;
        let q = contiguous_f32(s1, l1, &[b, h, t, d])?;
        let k = contiguous_f32(s2, l2, &[b, kv, t, d])?;
        let v = contiguous_f32(s3, l3, &[b, kv, t, d])?;
        let (out, lse) = forward(&self.dims, q, k, v);
        *self.lse.lock().unwrap_or_else(PoisonError::into_inner) = Some(lse);
        Ok((CpuStorage::F32(out), Shape::from((b, h, t, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(lse) = lse.as_deref() else {
            bail!("causal-attention: backward without a forward");
        };
        let grad = grad.contiguous()?;
        let (gq, gk, gv) = (Read::new(q), Read::new(k), Read::new(v));
        let (go, ggrad) = (Read::new(out), Read::new(&grad));
        let what = "causal-attention backward";
        let (dq, dk, dv) = backward(
            &self.dims,
            gq.f32(what)?,
            gk.f32(what)?,
            gv.f32(what)?,
            go.f32(what)?,
            ggrad.f32(what)?,
            lse,
        );
        let dq = Tensor::from_vec(dq, q.shape(), q.device())?;
        let dk = Tensor::from_vec(dk, k.shape(), k.device())?;
        let dv = Tensor::from_vec(dv, v.shape(), v.device())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The f32 elements of a contiguous CPU storage of the expected shape.
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, dims: &[usize]) -> Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("causal-attention: input is not contiguous");
    };
    if l.dims() != dims {
        bail!(
            "causal-attention: input of shape {:?}, expected {dims:?}",
            l.dims()
        );
    }
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// Forward over all (batch, query head) pairs: the output `[b, h, t, d]` and log-sum-exp `[b, h, t]`.
fn forward(dims: &Dims, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (head, t) = (dims.head(), dims.t);
    let mut out = vec![0f32; dims.b * dims.h * head];
    let mut lse = vec![0f32; dims.b * dims.h * t];
    out.par_chunks_mut(head)
        .zip(lse.par_chunks_mut(t))
        .enumerate()
        .for_each_init(
            || vec![0f32; BLOCK * t],
            |scores, (bh, (out, lse))| {
                // Query head bh % h of batch bh / h reads KV head (bh % h) / group of that batch.
                let kvh = bh / dims.h * dims.kv + bh % dims.h / dims.group();
                let kv = kvh * head..(kvh + 1) * head;
                let qh = &q[bh * head..(bh + 1) * head];
                forward_head(dims, qh, &k[kv.clone()], &v[kv], out, lse, scores);
            },
        );
    (out, lse)
}

fn forward_head(
    dims: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
    scores: &mut [f32],
) {
    let d = dims.d;
    for i0 in (0..dims.t).step_by(BLOCK) {
        let i1 = (i0 + BLOCK).min(dims.t);
        let (rows, lo) = (i1 - i0, dims.first_key(i0));
        let keys = i1 - lo;
        let s = &mut scores[..rows * keys];
        let qt = View::rows(&q[i0 * d..i1 * d], rows, d);
        matmul(
            s,
            keys,
            qt,
            View::rows(&k[lo * d..i1 * d], keys, d).t(),
            dims.scale,
            false,
        );
        softmax_tile(dims, s, keys, i0, lo, lse);
        matmul(
            &mut out[i0 * d..i1 * d],
            d,
            View::rows(s, rows, keys),
            View::rows(&v[lo * d..i1 * d], keys, d),
            1.0,
            false,
        );
    }
}

/// Backward over all (batch, KV head) pairs: dQ `[b, h, t, d]`, dK and dV `[b, kv, t, d]`.
fn backward(
    dims: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    grad: &[f32],
    lse: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (head, t, group) = (dims.head(), dims.t, dims.group());
    let mut dq = vec![0f32; dims.b * dims.h * head];
    let mut dk = vec![0f32; dims.b * dims.kv * head];
    let mut dv = vec![0f32; dims.b * dims.kv * head];
    dq.par_chunks_mut(group * head)
        .zip(dk.par_chunks_mut(head))
        .zip(dv.par_chunks_mut(head))
        .enumerate()
        .for_each_init(
            || Scratch {
                p: vec![0f32; BLOCK * t],
                ds: vec![0f32; BLOCK * t],
                delta: vec![0f32; t],
            },
            |scratch, (bg, ((dq, dk), dv))| {
                let kv = bg * head..(bg + 1) * head;
                let (kh, vh) = (&k[kv.clone()], &v[kv]);
                // The query heads of KV head g of batch n are n * h + g * group + r, which is
                // bg * group + r: contiguous, in the same order as this task's dq chunk.
                for (r, dq) in dq.chunks_exact_mut(head).enumerate() {
                    let bh = bg * group + r;
                    let rows = bh * head..(bh + 1) * head;
                    let head_io = HeadIo {
                        q: &q[rows.clone()],
                        out: &out[rows.clone()],
                        grad: &grad[rows],
                        lse: &lse[bh * t..(bh + 1) * t],
                    };
                    backward_head(dims, head_io, kh, vh, dq, dk, dv, scratch);
                }
            },
        );
    (dq, dk, dv)
}

/// One query head's forward tensors, as backward reads them.
struct HeadIo<'a> {
    q: &'a [f32],
    out: &'a [f32],
    grad: &'a [f32],
    lse: &'a [f32],
}

/// Per-thread work space of backward.
struct Scratch {
    p: Vec<f32>,
    ds: Vec<f32>,
    delta: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn backward_head(
    dims: &Dims,
    io: HeadIo<'_>,
    k: &[f32],
    v: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    scratch: &mut Scratch,
) {
    let d = dims.d;
    // rowsum(P * dP) = rowsum(dO * O): the softmax backward's subtrahend, from the saved output.
    row_dots(&mut scratch.delta, io.grad, io.out, d);
    for i0 in (0..dims.t).step_by(BLOCK) {
        let i1 = (i0 + BLOCK).min(dims.t);
        let (rows, lo) = (i1 - i0, dims.first_key(i0));
        let keys = i1 - lo;
        let (p, ds) = (
            &mut scratch.p[..rows * keys],
            &mut scratch.ds[..rows * keys],
        );
        let q_tile = View::rows(&io.q[i0 * d..i1 * d], rows, d);
        let grad_tile = View::rows(&io.grad[i0 * d..i1 * d], rows, d);
        let (k_tile, v_tile) = (
            View::rows(&k[lo * d..i1 * d], keys, d),
            View::rows(&v[lo * d..i1 * d], keys, d),
        );
        // P, recomputed: exp(scores - lse) on the visible keys, 0 elsewhere.
        matmul(p, keys, q_tile, k_tile.t(), dims.scale, false);
        probs_tile(dims, p, keys, i0, lo, io.lse);
        let dv_tile = &mut dv[lo * d..i1 * d];
        matmul(
            dv_tile,
            d,
            View::rows(p, rows, keys).t(),
            grad_tile,
            1.0,
            true,
        );
        // dS = P * (dO V^T - delta) * scale; masked entries have P = 0 and stay 0.
        matmul(ds, keys, grad_tile, v_tile.t(), 1.0, false);
        ds_tile(ds, p, keys, &scratch.delta[i0..i1], dims.scale);
        let ds = View::rows(ds, rows, keys);
        matmul(&mut dq[i0 * d..i1 * d], d, ds, k_tile, 1.0, false);
        matmul(&mut dk[lo * d..i1 * d], d, ds.t(), q_tile, 1.0, true);
    }
}

/// Defines a function whose body is compiled twice: for AVX-512 (picked at run time, as gemm picks its
/// kernels) and for the portable baseline. The bodies are written with explicit [`LANES`]-wide
/// accumulators and plain multiplies and adds (Rust never contracts them into FMAs), so both
/// versions vectorise and give bit-identical results.
macro_rules! simd_fn {
    ($(#[$doc:meta])* fn $name:ident / $portable:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    $portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, checked just above.
                    unsafe { avx512($($arg),*) };
                    return;
                }
            }
            $portable($($arg),*)
        }

        #[inline(always)]
        fn $portable($($arg: $ty),*) $body
    };
}

/// Independent accumulators of the row reductions: one AVX-512 register of f32.
const LANES: usize = 16;

simd_fn! {
    /// Turns a tile of scaled scores (`keys` per row, query rows from `i0`, keys from `lo`) into
    /// probabilities, 0 outside each row's visible keys, and writes each row's log-sum-exp.
    fn softmax_tile / softmax_tile_portable(dims: &Dims, s: &mut [f32], keys: usize, i0: usize, lo: usize, lse: &mut [f32]) {
        for (r, row) in s.chunks_exact_mut(keys).enumerate() {
            let i = i0 + r;
            let (a, e) = (dims.first_key(i) - lo, i + 1 - lo);
            row[..a].fill(0.0);
            row[e..].fill(0.0);
            let visible = &mut row[a..e];
            let max = row_max(visible);
            let sum = exp_sum(visible, max);
            for x in visible.iter_mut() {
                *x /= sum;
            }
            lse[i] = max + sum.ln();
        }
    }
}

simd_fn! {
    /// Recomputes a tile of probabilities from its scaled scores and the rows' log-sum-exp.
    fn probs_tile / probs_tile_portable(dims: &Dims, p: &mut [f32], keys: usize, i0: usize, lo: usize, lse: &[f32]) {
        for (r, row) in p.chunks_exact_mut(keys).enumerate() {
            let i = i0 + r;
            let (a, e) = (dims.first_key(i) - lo, i + 1 - lo);
            row[..a].fill(0.0);
            row[e..].fill(0.0);
            let lse = lse[i];
            for x in &mut row[a..e] {
                *x = exp(*x - lse);
            }
        }
    }
}

simd_fn! {
    /// `ds = p * (ds - delta) * scale` with `ds` holding `dO V^T`: the scores' gradient, 0 wherever
    /// the probability is (masked keys).
    fn ds_tile / ds_tile_portable(ds: &mut [f32], p: &[f32], keys: usize, delta: &[f32], scale: f32) {
        for ((ds, p), &delta) in ds.chunks_exact_mut(keys).zip(p.chunks_exact(keys)).zip(delta) {
            for (x, &p) in ds.iter_mut().zip(p) {
                *x = p * (*x - delta) * scale;
            }
        }
    }
}

simd_fn! {
    /// `dots[i] = a[i, :] . b[i, :]` for row-major `a`, `b` with rows of `d`.
    fn row_dots / row_dots_portable(dots: &mut [f32], a: &[f32], b: &[f32], d: usize) {
        for ((dot, a), b) in dots.iter_mut().zip(a.chunks_exact(d)).zip(b.chunks_exact(d)) {
            let mut acc = [0f32; LANES];
            let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
            let (ra, rb) = (ca.remainder(), cb.remainder());
            for (a, b) in ca.zip(cb) {
                for l in 0..LANES {
                    acc[l] += a[l] * b[l];
                }
            }
            for (l, (a, b)) in ra.iter().zip(rb).enumerate() {
                acc[l] += a * b;
            }
            *dot = lane_sum(acc);
        }
    }
}

#[inline(always)]
fn row_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    for (l, &x) in rest.iter().enumerate() {
        acc[l] = if x > acc[l] { x } else { acc[l] };
    }
    acc.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

/// `x = exp(x - sub)` in place; returns the sum of the results.
#[inline(always)]
fn exp_sum(xs: &mut [f32], sub: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp(c[l] - sub);
            acc[l] += c[l];
        }
    }
    for (l, x) in chunks.into_remainder().iter_mut().enumerate() {
        *x = exp(*x - sub);
        acc[l] += *x;
    }
    lane_sum(acc)
}

/// Pairwise sum of the lanes.
#[inline(always)]
fn lane_sum(mut acc: [f32; LANES]) -> f32 {
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for l in 0..n {
            acc[l] += acc[l + n];
        }
    }
    acc[0]
}

/// `e^x` for the softmax (arguments at most ~0), branch-free so that it vectorises: Cephes' `expf`
/// (x = n ln 2 + r, |r| <= ln 2 / 2, a degree-7 polynomial in r, times 2^n), within 2 ulp of the
/// true value on [-87, 88]. Below -87 it returns about 1.6e-38 instead of a smaller number or 0,
/// which no softmax sum or product can notice.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // few bits, so n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low bits of the mantissa.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + SHIFT;
    let n = shifted - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let y = p * (r * r) + r + 1.0;
    // 2^n from n's bits: the integer n sits in the low mantissa bits of `shifted`.
    let n_bits = shifted.to_bits().wrapping_sub(SHIFT.to_bits());
    y * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// A strided `rows x cols` f32 matrix inside a slice.
#[derive(Debug, Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix filling `data`.
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst = beta * a @ b`, or `dst += beta * a @ b` with `accumulate`, `dst` row-major with rows
/// `dst_stride` apart. One thread: the callers are already parallel.
fn matmul(
    dst: &mut [f32],
    dst_stride: usize,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    accumulate: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k
            && a.in_bounds()
            && b.in_bounds()
            && (m == 0 || n == 0 || (m - 1) * dst_stride + n <= dst.len()),
        "causal-attention: tile product out of bounds"
    );
    // SAFETY: the assertion keeps every element gemm reads (a, b) or writes (dst) inside its slice;
    // dst is borrowed exclusively, so it overlaps neither input. Strides fit isize: they are at most
    // the slices' lengths.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Uniform in [-range, range), from a seeded generator (candle's CPU RNG cannot be seeded).
    pub(super) fn random(rng: &mut ChaCha8Rng, dims: &[usize], range: f32) -> Tensor {
        let n = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-range..range)).collect();
        Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
    }

    /// The engine's composition (worker::model::Attention::forward with ops::softmax_last and
    /// model::causal_mask), written out with plain candle ops.
    pub(super) fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        window: Option<usize>,
    ) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let rep = h / k.dim(1).unwrap();
        let repeat_kv = |x: &Tensor| {
            if rep == 1 {
                return x.clone();
            }
            let kv = x.dim(1).unwrap();
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, kv, rep, t, d))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b, h, t, d))
                .unwrap()
        };
        let (k, v) = (repeat_kv(k), repeat_kv(v));
        let mut mask = vec![0f32; t * t];
        for i in 0..t {
            for j in 0..t {
                if j > i || window.is_some_and(|w| i - j >= w) {
                    mask[i * t + j] = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
        let scores = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(&v).unwrap()
    }

    /// max |a - b| / max |b|; the plain max |a - b| where `b` is all zeros (the gradient of q with
    /// a single visible key per row is exactly zero in the composition, rounding noise here).
    pub(super) fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let largest = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        if largest > 0.0 {
            diff / largest
        } else {
            diff
        }
    }

    /// Values and the gradients of q, k, v of `(attention * w).sum()`, fused and composed.
    fn check(b: usize, h: usize, kv: usize, t: usize, d: usize, window: Option<usize>, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let q = Var::from_tensor(&random(&mut rng, &[b, h, t, d], 2.0)).unwrap();
        let k = Var::from_tensor(&random(&mut rng, &[b, kv, t, d], 2.0)).unwrap();
        let v = Var::from_tensor(&random(&mut rng, &[b, kv, t, d], 1.0)).unwrap();
        let w = random(&mut rng, &[b, h, t, d], 1.0);
        let scale = 1.0 / (d as f64).sqrt();
        let what = format!("b={b} h={h} kv={kv} t={t} d={d} window={window:?}");

        let fused = causal_attention(&q, &k, &v, scale, window).unwrap();
        let composed = reference(&q, &k, &v, scale, window);
        assert!(fused.is_contiguous());
        let err = rel_err(&fused, &composed);
        assert!(err < 1e-5, "{what}: output differs by {err}");

        let gf = (&fused * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (f, c) = (gf.get(x).unwrap(), gc.get(x).unwrap());
            let err = rel_err(f, c);
            assert!(err < 1e-5, "{what}: d{name} differs by {err}");
        }
    }

    #[test]
    fn equals_composition_multi_head() {
        check(2, 4, 4, 37, 16, None, 1);
        check(2, 4, 4, 37, 13, Some(4), 2);
    }

    #[test]
    fn equals_composition_grouped_kv() {
        // SmolLM2: 9 query heads on 3 KV heads.
        check(2, 9, 3, 37, 13, None, 3);
        check(2, 9, 3, 37, 16, Some(4), 4);
    }

    #[test]
    fn equals_composition_single_token() {
        check(2, 9, 3, 1, 13, None, 5);
        check(2, 4, 4, 1, 8, Some(4), 6);
    }

    #[test]
    fn equals_composition_across_tiles() {
        // Several tiles, windows shorter and longer than a tile, a window of one (only itself) and
        // one longer than the sequence.
        check(2, 6, 2, 100, 9, Some(33), 7);
        check(2, 6, 3, 70, 7, Some(1), 8);
        check(2, 2, 1, 70, 5, Some(500), 9);
        check(1, 3, 1, 2 * BLOCK, 11, None, 10);
        check(2, 6, 2, 2 * BLOCK + 5, 9, Some(BLOCK + 6), 14);
        // The real head size, at a SmolLM2 sequence length.
        check(1, 3, 1, 256, 64, None, 13);
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in 0..=880_000 {
            let x = -87.0 + f64::from(i) * 1e-4;
            let got = f64::from(exp(x as f32));
            let want = (f64::from(x as f32)).exp();
            worst = worst.max((got - want).abs() / want);
        }
        // One f32 ulp is 2^-23 relative at worst (2^-24 at best).
        assert!(
            worst < 2.0 * f64::from(f32::EPSILON),
            "worst relative error {worst:e}"
        );
        assert!(exp(-1000.0) < 2e-38 && exp(-1000.0) >= 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn simd_and_portable_builds_agree_bit_for_bit() {
        // On a CPU with AVX-512 the dispatching functions run the AVX-512 build; elsewhere both
        // sides are the portable build and this test is trivially true.
        let mut rng = ChaCha8Rng::seed_from_u64(15);
        let mut random_vec = |n: usize, range: f32| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(-range..range)).collect()
        };
        let (t, d, i0) = (100, 37, BLOCK);
        let dims = Dims {
            b: 1,
            h: 1,
            kv: 1,
            t,
            d,
            scale: 0.2,
            window: Some(50),
        };
        let (rows, lo) = (t - i0, dims.first_key(i0));
        let keys = t - lo;
        let scores = random_vec(rows * keys, 8.0);
        let (mut s1, mut s2) = (scores.clone(), scores.clone());
        let (mut lse1, mut lse2) = (vec![0f32; t], vec![0f32; t]);
        softmax_tile(&dims, &mut s1, keys, i0, lo, &mut lse1);
        softmax_tile_portable(&dims, &mut s2, keys, i0, lo, &mut lse2);
        assert_eq!((&s1, &lse1), (&s2, &lse2));
        let (mut p1, mut p2) = (scores.clone(), scores);
        probs_tile(&dims, &mut p1, keys, i0, lo, &lse1);
        probs_tile_portable(&dims, &mut p2, keys, i0, lo, &lse1);
        assert_eq!(p1, p2);
        let (dp, delta) = (random_vec(rows * keys, 3.0), random_vec(rows, 1.0));
        let (mut ds1, mut ds2) = (dp.clone(), dp);
        ds_tile(&mut ds1, &p1, keys, &delta, 0.2);
        ds_tile_portable(&mut ds2, &p1, keys, &delta, 0.2);
        assert_eq!(ds1, ds2);
        let (a, b) = (random_vec(t * d, 2.0), random_vec(t * d, 2.0));
        let (mut dots1, mut dots2) = (vec![0f32; t], vec![0f32; t]);
        row_dots(&mut dots1, &a, &b, d);
        row_dots_portable(&mut dots2, &a, &b, d);
        assert_eq!(dots1, dots2);
    }

    #[test]
    fn accepts_strided_inputs() {
        // q, k, v as the caller has them before `.contiguous()`: [b, t, heads, d] transposed.
        let (b, h, kv, t, d, window) = (2, 6, 2, 19, 8, Some(5));
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let q = Var::from_tensor(&random(&mut rng, &[b, t, h, d], 2.0)).unwrap();
        let k = Var::from_tensor(&random(&mut rng, &[b, t, kv, d], 2.0)).unwrap();
        let v = Var::from_tensor(&random(&mut rng, &[b, t, kv, d], 1.0)).unwrap();
        let w = random(&mut rng, &[b, h, t, d], 1.0);
        let views = [&q, &k, &v].map(|x| x.transpose(1, 2).unwrap());
        assert!(!views[0].is_contiguous());
        let fused = causal_attention(&views[0], &views[1], &views[2], 0.3, window).unwrap();
        let contiguous = views.map(|x| x.contiguous().unwrap());
        let composed = reference(&contiguous[0], &contiguous[1], &contiguous[2], 0.3, window);
        let err = rel_err(&fused, &composed);
        assert!(err < 1e-5, "strided inputs: output differs by {err}");
        let gf = (&fused * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let err = rel_err(gf.get(x).unwrap(), gc.get(x).unwrap());
            assert!(err < 1e-5, "strided inputs: d{name} differs by {err}");
        }
    }

    #[test]
    fn fallback_is_the_composition() {
        // What a CUDA build runs (and f64 on the CPU), checked against the fused op in f32.
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let q = random(&mut rng, &[2, 9, 21, 8], 2.0);
        let k = random(&mut rng, &[2, 3, 21, 8], 2.0);
        let v = random(&mut rng, &[2, 3, 21, 8], 1.0);
        let fused = causal_attention(&q, &k, &v, 0.35, Some(6)).unwrap();
        let plain = composed(&q, &k, &v, 0.35, Some(6)).unwrap();
        assert!(rel_err(&fused, &plain) < 1e-5);
        let f64s = [&q, &k, &v].map(|x| x.to_dtype(DType::F64).unwrap());
        let wide = causal_attention(&f64s[0], &f64s[1], &f64s[2], 0.35, Some(6)).unwrap();
        assert_eq!(wide.dtype(), DType::F64);
        assert!(rel_err(&wide.to_dtype(DType::F32).unwrap(), &fused) < 1e-5);
    }

    #[test]
    fn rejects_bad_shapes() {
        let x = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        let err = |q, k, v, w| causal_attention(&q, &k, &v, 1.0, w).is_err();
        assert!(err(
            x(&[1, 4, 5, 8]),
            x(&[1, 3, 5, 8]),
            x(&[1, 3, 5, 8]),
            None
        ));
        assert!(err(
            x(&[1, 4, 5, 8]),
            x(&[1, 2, 5, 8]),
            x(&[1, 2, 6, 8]),
            None
        ));
        assert!(err(
            x(&[1, 4, 5, 8]),
            x(&[1, 2, 5, 4]),
            x(&[1, 2, 5, 4]),
            None
        ));
        assert!(err(
            x(&[1, 4, 5, 8]),
            x(&[1, 2, 5, 8]),
            x(&[1, 2, 5, 8]),
            Some(0)
        ));
        assert!(!err(
            x(&[1, 4, 5, 8]),
            x(&[1, 2, 5, 8]),
            x(&[1, 2, 5, 8]),
            None
        ));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod bench {
    use std::time::{Duration, Instant};

    use super::tests::{random, reference, rel_err};
    use super::*;
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The fastest of `runs` timings of each of `fs`, after one warm-up call each. The functions
    /// take turns, so that a load that comes and goes (a shared machine) hits them alike.
    fn fastest<const N: usize>(runs: usize, fs: [&dyn Fn(); N]) -> [Duration; N] {
        fs.iter().for_each(|f| f());
        let mut best = [Duration::MAX; N];
        for _ in 0..runs {
            for (f, best) in fs.iter().zip(&mut best) {
                let start = Instant::now();
                f();
                *best = (*best).min(start.elapsed());
            }
        }
        best
    }

    /// Bytes of the tensors the composition's graph holds from forward to backward, besides q, k
    /// and v themselves (candle keeps every node's inputs alive, and the output).
    fn composed_bytes(b: usize, h: usize, kv: usize, t: usize, d: usize) -> usize {
        let heads = b * h * t * d;
        let repeated = if h == kv { 0 } else { 2 * heads }; // repeat_kv copies of k and v
        let k_t = heads; // k.t().contiguous()
        let scores = 6 * b * h * t * t; // q k^T, * scale, + mask, - max, exp, / sum
        let rows = 2 * b * h; // row max and row sum
        let mask = t * t;
        4 * (repeated + k_t + scores + rows + mask + heads)
    }

    /// Bytes the fused op keeps: its output and the per-row log-sum-exp.
    fn fused_bytes(b: usize, h: usize, t: usize, d: usize) -> usize {
        4 * (b * h * t * d + b * h * t)
    }

    fn shape(name: &str, b: usize, h: usize, kv: usize, t: usize, d: usize) {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let q = Var::from_tensor(&random(&mut rng, &[b, h, t, d], 2.0)).unwrap();
        let k = Var::from_tensor(&random(&mut rng, &[b, kv, t, d], 2.0)).unwrap();
        let v = Var::from_tensor(&random(&mut rng, &[b, kv, t, d], 1.0)).unwrap();
        let w = random(&mut rng, &[b, h, t, d], 1.0);
        let scale = 1.0 / (d as f64).sqrt();
        let fused = || causal_attention(&q, &k, &v, scale, None).unwrap();
        let composed = || reference(&q, &k, &v, scale, None);
        let backward = |out: Tensor| (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(rel_err(&fused(), &composed()) < 1e-5);

        let runs = 20;
        let [fused_fwd, composed_fwd, fused_step, composed_step] = fastest(
            runs,
            [
                &|| drop(fused()),
                &|| drop(composed()),
                &|| drop(backward(fused())),
                &|| drop(backward(composed())),
            ],
        );
        let ms = |x: Duration| x.as_secs_f64() * 1e3;
        let mb = |x: usize| x as f64 / (1 << 20) as f64;
        println!(
            "{name} (b={b} h={h} kv={kv} t={t} d={d}), best of {runs}, 2 threads:\n  \
             forward:          fused {:7.2} ms  composed {:7.2} ms  ({:.2}x)\n  \
             forward+backward: fused {:7.2} ms  composed {:7.2} ms  ({:.2}x)\n  \
             kept for backward: fused {:.2} MiB  composed {:.2} MiB  ({:.0}x less)",
            ms(fused_fwd),
            ms(composed_fwd),
            ms(composed_fwd) / ms(fused_fwd),
            ms(fused_step),
            ms(composed_step),
            ms(composed_step) / ms(fused_step),
            mb(fused_bytes(b, h, t, d)),
            mb(composed_bytes(b, h, kv, t, d)),
            composed_bytes(b, h, kv, t, d) as f64 / fused_bytes(b, h, t, d) as f64,
        );
    }

    #[test]
    #[ignore = "micro-benchmark: cargo test --release -p lorad-kernels attention::bench -- --ignored --nocapture"]
    fn fused_vs_composed() {
        // Two threads whatever RAYON_NUM_THREADS says: the fused op's tasks and candle's gemm both
        // run on the installed pool.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            shape("SmolLM2-135M", 4, 9, 3, 256, 64);
            shape("Llama-110M", 8, 12, 12, 128, 64);
        });
    }
}
