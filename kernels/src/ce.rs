//! LM head + cross-entropy, fused and chunked over rows.
//!
//! The engine's `nll_sum(&frozen_linear(h, weight, None)?, labels)` holds all `[n, vocab]` logits,
//! and its backward several more buffers that size (SmolLM2-135M, n = 1024: 200 MB each). Here the
//! logits exist `chunk` rows at a time. Each chunk's logits are reduced to the row losses (stable
//! logsumexp minus the picked logit, in f64) and, when `h` needs a gradient, turned in place into
//! `softmax - onehot` and multiplied by the head right away: the gradient of the summed loss for an
//! upstream gradient of 1 is computed in the forward pass and kept (`[n, d]`, 2.4 MB for SmolLM2).
//! Backward only scales it. That costs the two head products the unfused graph costs (logits, then
//! `dlogits @ weight`); recomputing the logits in backward instead would cost a third.
//!
//! Consequence for callers: with an `h` that tracks gradients the forward pass does the gradient's
//! work too, so evaluation should pass `h.detach()` (then only the loss is computed).
//!
//! No gradient is ever computed for the head: it is a frozen weight in LoRA, and the op's backward
//! returns `None` for it.
use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{contiguous_f32, gemm_set, Operand};

/// The most memory one chunk's logits may take when the caller lets [`default_chunk`] pick.
pub const LOGITS_BUDGET_BYTES: usize = 128 << 20;

/// Rows per chunk for a vocabulary of `vocab`: as many as fit in [`LOGITS_BUDGET_BYTES`], between 128
/// and 512. Measured with `bench_smollm2_shapes` (n = 1024, d = 576, vocab = 49152, 2 threads;
/// fwd+bwd): 767 ms at 64 rows, 558 at 128, 485 at 256, 462 at 512, 458 at 1024 (the unfused graph:
/// 1.8 s). Below ~256 rows the `dlogits @ weight` product (a `[rows, d]` result over a 49152-long
/// reduction) leaves gemm too few output tiles to share between threads; past 512 the time no longer
/// moves while the buffer keeps doubling (512 rows of SmolLM2's vocabulary: 100 MB, against about
/// 2.8 GB of peak extra memory for the unfused graph).
pub fn default_chunk(vocab: usize) -> usize {
    (LOGITS_BUDGET_BYTES / (vocab.max(1) * 4)).clamp(128, 512)
}

/// Summed next-token NLL of `labels` under logits `h @ weight^T`, computed `chunk` rows at a time:
/// h [n, d] f32 (gets a gradient), weight [vocab, d] f32 frozen (never gets one), labels [n] u32.
/// Returns a scalar tensor (shape [], like `Tensor::sum_all`).
///
/// Equal, in value and in the gradient w.r.t. `h`, to `nll_sum(&frozen_linear(h, weight, None)?,
/// labels)`, while never holding more than `chunk x vocab` logits. A label `>= vocab` is an error.
/// On devices other than the CPU this is that unfused composition (no chunking).
pub fn linear_cross_entropy_sum(
    h: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    let (n, d) = h.dims2()?;
    let (vocab, wd) = weight.dims2()?;
    if wd != d {
        bail!("linear-cross-entropy: h is [{n}, {d}] but the head is [{vocab}, {wd}]");
    }
    if chunk == 0 {
        bail!("linear-cross-entropy: chunk must be at least one row");
    }
    let label_ids = labels.to_vec1::<u32>()?;
    if label_ids.len() != n {
        bail!(
            "linear-cross-entropy: {} labels for {n} rows of h",
            label_ids.len()
        );
    }
    if let Some((row, &label)) = label_ids
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= vocab)
    {
        bail!(
            "linear-cross-entropy: label {label} (row {row}) is out of range \
             for a vocabulary of {vocab}"
        );
    }
    if !h.device().is_cpu() {
        return unfused(h, weight, labels);
    }
    if h.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        bail!(
            "linear-cross-entropy: the CPU kernel takes f32, got h {:?} and head {:?}",
            h.dtype(),
            weight.dtype()
        );
    }
    let op = LinearCrossEntropy::new(label_ids, chunk, h.track_op());
    h.contiguous()?
        .apply_op2(&weight.detach().contiguous()?, op)
}

/// The fused op on `(h [n, d], head [vocab, d])`, both contiguous; the head is a detached tensor.
struct LinearCrossEntropy {
    labels: Vec<u32>,
    chunk: usize,
    /// Compute dL/dh in the forward pass (set when `h` tracks gradients).
    eager_grad: bool,
    /// dL/dh for an upstream gradient of 1, `[n, d]`, set by the forward pass when `eager_grad`.
    grad: OnceLock<Tensor>,
}

impl LinearCrossEntropy {
    fn new(labels: Vec<u32>, chunk: usize, eager_grad: bool) -> Self {
        Self {
            labels,
            chunk,
            eager_grad,
            grad: OnceLock::new(),
        }
    }

    /// The summed loss and, if `want_grad`, dL/dh (row-major `[n, d]`), `chunk` rows at a time.
    /// Deterministic: each row is reduced by one thread, and rows are summed in order.
    fn run(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        want_grad: bool,
    ) -> Result<(f64, Option<Vec<f32>>)> {
        let (n, d) = hl.shape().dims2()?;
        let (vocab, _) = wl.shape().dims2()?;
        if self.labels.len() != n {
            bail!(
                "linear-cross-entropy: {} labels for {n} rows of h",
                self.labels.len()
            );
        }
        let h = contiguous_f32("linear-cross-entropy", hs, hl)?;
        let w = contiguous_f32("linear-cross-entropy", ws, wl)?;
        let chunk = self.chunk.min(n).max(1);
        // One logits buffer for every chunk (zero-filled once, then overwritten by each product).
        let mut logits = vec![0f32; chunk * vocab];
        let mut total = 0f64;
        let mut grad = want_grad.then(|| vec![0f32; n * d]);
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            let logits = &mut logits[..rows * vocab];
            let h_rows = Operand::plain(&h[r0 * d..(r0 + rows) * d]);
            gemm_set(logits, h_rows, Operand::t(w), (rows, vocab, d), 1.0)?;
            let losses: Vec<f64> = logits
                .par_chunks_mut(vocab)
                .zip(self.labels[r0..r0 + rows].par_iter())
                .map(|(row, &label)| row_loss(row, label as usize, want_grad))
                .collect();
            total += losses.iter().sum::<f64>();
            if let Some(grad) = grad.as_mut() {
                // `logits` now holds dL/dlogits of the chunk: dL/dh = dlogits @ head, written in place.
                let dst = &mut grad[r0 * d..(r0 + rows) * d];
                gemm_set(
                    dst,
                    Operand::plain(logits),
                    Operand::plain(w),
                    (rows, d, vocab),
                    1.0,
                )?;
            }
        }
        Ok((total, grad))
    }
}

/// One row's `logsumexp(row) - row[label]`; with `want_grad`, leaves `softmax(row) - onehot(label)`
/// in `row`. The picked logit is taken as `row[label] - max`, the same f32 rounding as the unfused
/// graph's `shifted.gather`; the exponentials are summed in f64.
fn row_loss(row: &mut [f32], label: usize, want_grad: bool) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let picked = row[label] - max;
    let sum = if want_grad {
        let mut sum = 0f64;
        for x in row.iter_mut() {
            let e = (*x - max).exp();
            *x = e;
            sum += f64::from(e);
        }
        let inv = (1.0 / sum) as f32;
        for x in row.iter_mut() {
            *x *= inv;
        }
        row[label] -= 1.0;
        sum
    } else {
        row.iter().map(|&x| f64::from((x - max).exp())).sum()
    };
    sum.ln() - f64::from(picked)
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (loss, grad) = self.run(hs, hl, ws, wl, self.eager_grad)?;
        if let Some(grad) = grad {
            let grad = Tensor::from_vec(grad, hl.shape().clone(), &Device::Cpu)?;
            if self.grad.set(grad).is_err() {
                bail!("linear-cross-entropy: forward ran twice on one op");
            }
        }
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        head: &Tensor,
        _loss: &Tensor,
        grad_loss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = match self.grad.get() {
            Some(grad) => grad.clone(),
            None => h.apply_op2_no_bwd(head, &InputGrad(self))?,
        };
        Ok((Some(grad.broadcast_mul(grad_loss)?), None))
    }
}

/// dL/dh of a [`LinearCrossEntropy`] whose forward did not compute it (recomputes the logits).
struct InputGrad<'a>(&'a LinearCrossEntropy);

impl CustomOp2 for InputGrad<'_> {
    fn name(&self) -> &'static str {
        "linear-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, grad) = self.0.run(hs, hl, ws, wl, true)?;
        let Some(grad) = grad else {
            bail!("linear-cross-entropy: no gradient computed");
        };
        Ok((CpuStorage::F32(grad), hl.shape().clone()))
    }
}

/// The unfused composition for non-CPU devices: `linear::frozen_linear` (no head gradient) followed by
/// the engine's `nll_sum` (max-subtracted logsumexp minus the gathered logit).
fn unfused(h: &Tensor, weight: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logits = crate::linear::frozen_linear_f32(h, weight)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let labels = labels.to_device(h.device())?.unsqueeze(1)?;
    let picked = shifted.gather(&labels, 1)?;
    (log_z - picked)?.sum_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// SplitMix64: a seeded generator, enough for test inputs (candle's CPU RNG cannot be seeded).
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in [-scale, scale).
        fn uniform(&mut self, len: usize, scale: f32) -> Vec<f32> {
            (0..len)
                .map(|_| ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
                .collect()
        }

        fn labels(&mut self, len: usize, vocab: usize) -> Vec<u32> {
            (0..len)
                .map(|_| (self.next_u64() % vocab as u64) as u32)
                .collect()
        }
    }

    pub(super) struct Case {
        pub(super) h: Tensor,
        pub(super) weight: Tensor,
        pub(super) labels: Tensor,
    }

    /// Random `h [n, d]`, head `[vocab, d]` and labels; the logits' standard deviation is
    /// `h_scale * w_scale * sqrt(d) / 3`.
    pub(super) fn case(
        seed: u64,
        n: usize,
        d: usize,
        vocab: usize,
        h_scale: f32,
        w_scale: f32,
    ) -> Case {
        let mut rng = Rng(seed);
        let dev = &Device::Cpu;
        Case {
            h: Tensor::from_vec(rng.uniform(n * d, h_scale), (n, d), dev).unwrap(),
            weight: Tensor::from_vec(rng.uniform(vocab * d, w_scale), (vocab, d), dev).unwrap(),
            labels: Tensor::from_vec(rng.labels(n, vocab), n, dev).unwrap(),
        }
    }

    /// The unfused composition in plain candle ops (today's engine math, with candle's own matmul).
    fn reference(h: &Tensor, weight: &Tensor, labels: &Tensor) -> Tensor {
        let logits = h.matmul(&weight.t().unwrap()).unwrap();
        let max = logits.max_keepdim(D::Minus1).unwrap().detach();
        let shifted = logits.broadcast_sub(&max).unwrap();
        let log_z = shifted
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap();
        let picked = shifted.gather(&labels.unsqueeze(1).unwrap(), 1).unwrap();
        (log_z - picked).unwrap().sum_all().unwrap()
    }

    /// Loss value and dL/dh of `f` at `h`, through a `Var` and `backward()`.
    fn value_and_grad(h: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> (f32, Vec<f32>) {
        let hv = Var::from_tensor(h).unwrap();
        let loss = f(hv.as_tensor());
        assert_eq!(loss.dims(), &[] as &[usize], "a scalar, like sum_all");
        let grads = loss.backward().unwrap();
        let g = grads.get(&hv).expect("gradient of h");
        (
            loss.to_scalar::<f32>().unwrap(),
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        )
    }

    /// `max |a - b| <= 1e-5 * max |b|`.
    pub(super) fn assert_close(what: &str, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            err <= 1e-5 * scale,
            "{what}: max error {err} vs largest magnitude {scale}"
        );
    }

    fn check_against_reference(c: &Case, chunk: usize, what: &str) {
        let (v, g) = value_and_grad(&c.h, |h| {
            linear_cross_entropy_sum(h, &c.weight, &c.labels, chunk).unwrap()
        });
        let (rv, rg) = value_and_grad(&c.h, |h| reference(h, &c.weight, &c.labels));
        assert_close(&format!("{what}: loss"), &[v], &[rv]);
        assert_close(&format!("{what}: grad"), &g, &rg);
    }

    #[test]
    fn matches_unfused_value_and_grad() {
        // (n, d, vocab, chunk): n not a multiple of chunk, chunk = 1, chunk > n, chunk = n, d odd.
        let shapes = [
            (7, 5, 11, 3),
            (16, 8, 50, 1),
            (5, 9, 33, 64),
            (12, 16, 40, 12),
            (33, 17, 257, 8),
            (70, 31, 1000, 16),
        ];
        for (i, &(n, d, vocab, chunk)) in shapes.iter().enumerate() {
            let c = case(i as u64 + 1, n, d, vocab, 1.0, 1.0);
            check_against_reference(
                &c,
                chunk,
                &format!("n={n} d={d} vocab={vocab} chunk={chunk}"),
            );
        }
    }

    #[test]
    fn stable_with_large_logits() {
        // Logits in the hundreds: exp would overflow without the max subtraction.
        let c = case(42, 19, 24, 97, 10.0, 3.0);
        check_against_reference(&c, 4, "large logits");
    }

    #[test]
    fn non_contiguous_h_gets_its_gradient() {
        let c = case(7, 6, 10, 23, 1.0, 1.0);
        let ht = c.h.t().unwrap().contiguous().unwrap(); // [d, n]; its transpose is h, strided
        let (v, g) = value_and_grad(&ht, |ht| {
            let h = ht.t().unwrap();
            assert!(!h.is_contiguous());
            linear_cross_entropy_sum(&h, &c.weight, &c.labels, 4).unwrap()
        });
        let (rv, rg) = value_and_grad(&ht, |ht| reference(&ht.t().unwrap(), &c.weight, &c.labels));
        assert_close("strided h: loss", &[v], &[rv]);
        assert_close("strided h: grad", &g, &rg);
    }

    #[test]
    fn h_at_an_offset_in_its_storage() {
        // Rows 3..10 of a bigger tensor: contiguous, but not from the start of its storage.
        let c = case(8, 12, 10, 23, 1.0, 1.0);
        let labels = c.labels.narrow(0, 3, 7).unwrap();
        let (v, g) = value_and_grad(&c.h, |h| {
            let h = h.narrow(0, 3, 7).unwrap();
            assert!(h.is_contiguous() && h.layout().start_offset() > 0);
            linear_cross_entropy_sum(&h, &c.weight, &labels, 2).unwrap()
        });
        let (rv, rg) = value_and_grad(&c.h, |h| {
            reference(&h.narrow(0, 3, 7).unwrap(), &c.weight, &labels)
        });
        assert_close("offset h: loss", &[v], &[rv]);
        assert_close("offset h: grad", &g, &rg);
    }

    #[test]
    fn scales_by_upstream_gradient() {
        let c = case(9, 10, 12, 30, 1.0, 1.0);
        let (_, g) = value_and_grad(&c.h, |h| {
            (linear_cross_entropy_sum(h, &c.weight, &c.labels, 3).unwrap() * 0.25).unwrap()
        });
        let (_, rg) = value_and_grad(&c.h, |h| {
            (reference(h, &c.weight, &c.labels) * 0.25).unwrap()
        });
        assert_close("scaled grad", &g, &rg);
    }

    #[test]
    fn head_gets_no_gradient() {
        let c = case(3, 8, 6, 20, 1.0, 1.0);
        // Even a head passed as a Var gets nothing.
        let hv = Var::from_tensor(&c.h).unwrap();
        let wv = Var::from_tensor(&c.weight).unwrap();
        let loss = linear_cross_entropy_sum(&hv, &wv, &c.labels, 3).unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(&hv).is_some());
        assert!(grads.get(&wv).is_none(), "no gradient for the frozen head");
        // And the op's backward itself returns none for it.
        let op = LinearCrossEntropy::new(c.labels.to_vec1().unwrap(), 3, false);
        let one = Tensor::new(1f32, &Device::Cpu).unwrap();
        let (gh, gw) = op.bwd(&c.h, &c.weight, &one, &one).unwrap();
        assert_eq!(gh.expect("gradient of h").dims(), &[8, 6]);
        assert!(gw.is_none());
    }

    #[test]
    fn lazy_backward_recomputes_the_same_gradient() {
        // An op whose forward did not compute the gradient recomputes it in backward.
        let c = case(5, 13, 7, 29, 1.0, 1.0);
        let labels = c.labels.to_vec1::<u32>().unwrap();
        let (v, g) = value_and_grad(&c.h, |h| {
            h.apply_op2(&c.weight, LinearCrossEntropy::new(labels.clone(), 5, false))
                .unwrap()
        });
        let (rv, rg) = value_and_grad(&c.h, |h| reference(h, &c.weight, &c.labels));
        assert_close("lazy: loss", &[v], &[rv]);
        assert_close("lazy: grad", &g, &rg);
    }

    #[test]
    fn detached_h_computes_only_the_loss() {
        let c = case(11, 9, 5, 17, 1.0, 1.0);
        let loss = linear_cross_entropy_sum(&c.h, &c.weight, &c.labels, 2).unwrap();
        assert!(!loss.track_op());
        let r = reference(&c.h, &c.weight, &c.labels);
        assert_close(
            "detached",
            &[loss.to_scalar::<f32>().unwrap()],
            &[r.to_scalar::<f32>().unwrap()],
        );
    }

    #[test]
    fn unfused_fallback_matches_and_leaves_the_head_alone() {
        let c = case(13, 21, 11, 64, 1.0, 1.0);
        let (v, g) = value_and_grad(&c.h, |h| unfused(h, &c.weight, &c.labels).unwrap());
        let (rv, rg) = value_and_grad(&c.h, |h| reference(h, &c.weight, &c.labels));
        assert_close("fallback: loss", &[v], &[rv]);
        assert_close("fallback: grad", &g, &rg);
        let wv = Var::from_tensor(&c.weight).unwrap();
        let hv = Var::from_tensor(&c.h).unwrap();
        let grads = unfused(&hv, &wv, &c.labels).unwrap().backward().unwrap();
        assert!(grads.get(&hv).is_some());
        assert!(grads.get(&wv).is_none());
    }

    #[test]
    fn label_out_of_range_is_an_error() {
        let c = case(17, 4, 3, 11, 1.0, 1.0);
        let labels = Tensor::new(&[0u32, 10, 11, 2], &Device::Cpu).unwrap();
        let err = linear_cross_entropy_sum(&c.h, &c.weight, &labels, 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("label 11") && err.contains("row 2") && err.contains("vocabulary of 11"),
            "{err}"
        );
    }

    #[test]
    fn no_rows_is_a_zero_loss() {
        let c = case(23, 0, 4, 9, 1.0, 1.0);
        let (v, g) = value_and_grad(&c.h, |h| {
            linear_cross_entropy_sum(h, &c.weight, &c.labels, 3).unwrap()
        });
        assert_eq!(v, 0.0);
        assert!(g.is_empty());
    }

    #[test]
    fn bad_arguments_are_errors() {
        let c = case(19, 4, 3, 11, 1.0, 1.0);
        assert!(linear_cross_entropy_sum(&c.h, &c.weight, &c.labels, 0).is_err());
        let short = c.labels.narrow(0, 0, 3).unwrap();
        assert!(linear_cross_entropy_sum(&c.h, &c.weight, &short, 2).is_err());
        let w4 = Tensor::zeros((11, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(linear_cross_entropy_sum(&c.h, &w4, &c.labels, 2).is_err());
    }
}

/// The micro-benchmark, in its own module so that the filter `ce::bench` selects it.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod bench {
    use super::tests::{assert_close, case};
    use super::*;
    use candle_core::Var;
    use std::time::Instant;

    /// Resets the peak resident set (VmHWM) and returns the current one, in bytes.
    fn reset_peak_rss() -> Option<u64> {
        std::fs::write("/proc/self/clear_refs", "5").ok()?;
        proc_status("VmRSS:")
    }

    fn proc_status(key: &str) -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(key))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// CPU time of the whole process (all threads), in ms: `/proc/self/stat` utime + stime, in
    /// USER_HZ ticks (100 per second on Linux/x86). Less disturbed than wall time by other work on
    /// a shared machine.
    fn process_cpu_ms() -> f64 {
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return f64::NAN;
        };
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let after = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            f.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        (ticks(11) + ticks(12)) * 10.0
    }

    struct Run {
        /// Best fwd+bwd wall time over the repetitions.
        ms: f64,
        /// Mean CPU time (both threads together) per repetition.
        cpu_ms: f64,
        loss: f32,
        grad: Vec<f32>,
        /// Peak RSS above the RSS before the first repetition.
        peak_mb: String,
    }

    fn fwd_bwd(h: &Tensor, reps: usize, f: impl Fn(&Tensor) -> Tensor) -> Run {
        let base = reset_peak_rss();
        let mut ms = f64::INFINITY;
        let mut last = None;
        let cpu0 = process_cpu_ms();
        for _ in 0..reps {
            let hv = Var::from_tensor(h).unwrap();
            let start = Instant::now();
            let loss = f(hv.as_tensor());
            let grads = loss.backward().unwrap();
            let grad = grads.get(&hv).expect("gradient of h").clone();
            drop(grads);
            ms = ms.min(start.elapsed().as_secs_f64() * 1e3);
            last = Some((loss, grad));
        }
        let cpu_ms = (process_cpu_ms() - cpu0) / reps as f64;
        let (loss, grad) = last.expect("one repetition");
        let peak_mb = base
            .and_then(|b| Some(proc_status("VmHWM:")?.saturating_sub(b) as f64 / 1e6))
            .map_or("?".to_string(), |mb| format!("{mb:.0}"));
        Run {
            ms,
            cpu_ms,
            loss: loss.to_scalar::<f32>().unwrap(),
            grad: grad.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            peak_mb,
        }
    }

    #[test]
    fn default_chunks_stay_within_the_logits_budget() {
        assert_eq!(default_chunk(49152), 512);
        assert_eq!(default_chunk(32000), 512);
        let llama3 = default_chunk(128256);
        assert!((128..512).contains(&llama3));
        assert!(llama3 * 128256 * 4 <= LOGITS_BUDGET_BYTES);
        assert_eq!(default_chunk(1 << 22), 128);
        assert_eq!(default_chunk(0), 512);
    }

    /// SmolLM2-135M's head: `RAYON_NUM_THREADS=2 cargo test --release -p lorad-kernels ce::bench --
    /// --ignored --nocapture`. Compares with the engine's composition today (`frozen_linear` +
    /// `nll_sum`, as `unfused`), checks value and gradient agree at this size, and prints times and
    /// the peak resident memory each adds.
    #[test]
    #[ignore]
    fn bench_smollm2_shapes() {
        let (n, d, vocab) = (1024, 576, 49152);
        // Hidden states after the final norm are O(1); the tied embedding's entries are O(0.05).
        let c = case(2024, n, d, vocab, 1.0, 0.1);
        let mb = |bytes: usize| bytes as f64 / 1e6;
        println!(
            "n={n} d={d} vocab={vocab}, {} threads; all logits = {:.0} MB per buffer",
            rayon::current_num_threads(),
            mb(n * vocab * 4)
        );
        let u = fwd_bwd(&c.h, 3, |h| unfused(h, &c.weight, &c.labels).unwrap());
        println!(
            "unfused (frozen_linear + nll_sum): {:7.1} ms fwd+bwd ({:6.0} ms CPU), \
             peak extra RSS {} MB, loss {}",
            u.ms, u.cpu_ms, u.peak_mb, u.loss
        );
        for chunk in [32, 64, 128, 256, 512, 1024] {
            let f = fwd_bwd(&c.h, 3, |h| {
                linear_cross_entropy_sum(h, &c.weight, &c.labels, chunk).unwrap()
            });
            println!(
                "fused, chunk {chunk:3}:              {:7.1} ms fwd+bwd ({:6.0} ms CPU), \
                 peak extra RSS {} MB \
                 (estimate: {:.1} MB logits + {:.1} MB grad of h x2), loss {}",
                f.ms,
                f.cpu_ms,
                f.peak_mb,
                mb(chunk * vocab * 4),
                mb(n * d * 4),
                f.loss
            );
            assert_close("SmolLM2 loss", &[f.loss], &[u.loss]);
            assert_close("SmolLM2 grad", &f.grad, &u.grad);
        }
        let labels = c.labels.to_vec1::<u32>().unwrap();
        let lazy = fwd_bwd(&c.h, 2, |h| {
            let op = LinearCrossEntropy::new(labels.clone(), default_chunk(vocab), false);
            h.apply_op2(&c.weight, op).unwrap()
        });
        println!(
            "fused, chunk {}, logits recomputed in backward: {:7.1} ms fwd+bwd \
             ({:6.0} ms CPU)",
            default_chunk(vocab),
            lazy.ms,
            lazy.cpu_ms
        );
    }
}
