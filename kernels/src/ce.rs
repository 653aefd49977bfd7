//! LM head + cross-entropy, fused and chunked over rows and over the vocabulary.
//!
//! The engine's `nll_sum(&frozen_linear(h, weight, None)?, labels)` holds all `[n, vocab]` logits,
//! and its backward several more buffers that size (SmolLM2-135M, n = 1024: 200 MB each). Here the
//! logits exist a block of `rows x vocab_chunk` at a time, and so does the head in f32: a head kept
//! in its stored form (bf16, f16, GGUF blocks; see [`Frozen`]) is widened one vocabulary chunk at a
//! time, never whole (Llama-3.2-1B's tied head is 1.05 GB in f32; Llama-3.1-8B's 2.1 GB).
//!
//! Each row's loss `logsumexp(logits) - logits[label]` is reduced over the vocabulary chunks online:
//! a running maximum and a running sum of `exp(logit - max)` (in f64), rescaled when a later chunk
//! holds a larger logit. When `h` needs a gradient, the same pass accumulates the unnormalised
//! `sum_v exp(logit_v - max) * head_v` (`[n, d]`, rescaled with the sum) with one product per chunk,
//! and at the end `dL/dh = that / sum - head[label]`: the gradient of the summed loss for an upstream
//! gradient of 1 is computed in the forward pass and kept; backward only scales it. That costs the
//! two head products the unfused graph costs (logits, then `dlogits @ head`) and widens a stored head
//! once per pass; recomputing the logits in backward instead would cost a third product.
//!
//! The chunks depend only on the head's shape, not on how it is stored, so a stored head and the same
//! head widened at load give the same values bit for bit.
//!
//! Consequence for callers: with an `h` that tracks gradients the forward pass does the gradient's
//! work too, so evaluation should pass `h.detach()` (then only the loss is computed).
//!
//! No gradient is ever computed for the head: it is a frozen weight in LoRA, held by the op rather
//! than passed as an argument.
use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{contiguous_f32, gemm_add, gemm_set, Operand};
use crate::frozen::Frozen;

/// The most memory one block of logits may take when [`default_chunks`] picks the rows.
pub const LOGITS_BUDGET_BYTES: usize = 128 << 20;

/// The most memory one vocabulary chunk of the head may take in f32 when [`default_chunks`] picks it:
/// at most Llama-3.2-1B's largest layer weight (8192 x 2048 f32, 64 MiB), so the widened chunk reuses
/// the layers' scratch buffers instead of adding one.
pub const HEAD_CHUNK_BYTES: usize = 64 << 20;

/// How a head product is cut: `rows` of `h` at a time, and `vocab` rows of the head at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunks {
    pub rows: usize,
    pub vocab: usize,
}

/// The chunks for `n` rows of `h` against a `[vocab, d]` head: vocabulary chunks of at most
/// [`HEAD_CHUNK_BYTES`] of f32 (a multiple of 256 rows, at least 256), and as many rows as fit a
/// block of logits in [`LOGITS_BUDGET_BYTES`] (at least 128), at most `n`. The vocabulary chunk
/// depends on the head's shape only (the results do too).
///
/// Measured with `bench_smollm2_shapes` (SmolLM2-135M's head, n = 1024, 2 threads; fwd+bwd): see
/// that test. Fewer than ~256 rows leave gemm too few output tiles to share between threads.
pub fn default_chunks(n: usize, vocab: usize, d: usize) -> Chunks {
    let vocab_chunk = (HEAD_CHUNK_BYTES / (d.max(1) * 4) / 256 * 256)
        .max(256)
        .min(vocab.max(1));
    let rows = (LOGITS_BUDGET_BYTES / (vocab_chunk * 4))
        .max(128)
        .min(n.max(1));
    Chunks {
        rows,
        vocab: vocab_chunk,
    }
}

/// Summed next-token NLL of `labels` under logits `h @ head^T`, computed in [`Chunks`]:
/// h [n, d] f32 (gets a gradient), head [vocab, d] frozen in any stored form (never gets one),
/// labels [n] u32. Returns a scalar tensor (shape [], like `Tensor::sum_all`).
///
/// Equal (to f32 rounding), in value and in the gradient w.r.t. `h`, to `nll_sum(&frozen_linear(h,
/// head, None)?, labels)`, while never holding more than a `chunks` block of logits or of the
/// widened head. A label `>= vocab` is an error. On devices other than the CPU this is that unfused
/// composition (the head widened whole, no chunking).
pub fn linear_cross_entropy_sum(
    h: &Tensor,
    head: &Frozen,
    labels: &Tensor,
    chunks: Chunks,
) -> Result<Tensor> {
    let (n, d) = h.dims2()?;
    let (vocab, wd) = head.dims2()?;
    if wd != d {
        bail!("linear-cross-entropy: h is [{n}, {d}] but the head is [{vocab}, {wd}]");
    }
    if chunks.rows == 0 || chunks.vocab == 0 {
        bail!("linear-cross-entropy: chunks must be at least one row ({chunks:?})");
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
    if !h.device().is_cpu() || !head.device().is_cpu() {
        return unfused(h, &head.to_f32(h.device())?, labels);
    }
    if h.dtype() != DType::F32 {
        bail!(
            "linear-cross-entropy: the CPU kernel takes f32, got h {:?}",
            h.dtype()
        );
    }
    let op = LinearCrossEntropy::new(head.clone(), label_ids, chunks, h.track_op());
    h.contiguous()?.apply_op1(op)
}

/// The fused op on `h [n, d]` (contiguous), with the frozen head inside.
struct LinearCrossEntropy {
    head: Frozen,
    labels: Vec<u32>,
    chunks: Chunks,
    /// Compute dL/dh in the forward pass (set when `h` tracks gradients).
    eager_grad: bool,
    /// dL/dh for an upstream gradient of 1, `[n, d]`, set by the forward pass when `eager_grad`.
    grad: OnceLock<Tensor>,
}

/// One row's running reduction over the vocabulary chunks seen so far.
#[derive(Debug, Clone, Copy)]
struct RowState {
    /// The largest logit so far.
    max: f32,
    /// `sum exp(logit - max)` so far.
    sum: f64,
    /// The label's logit, once its chunk has been seen.
    picked: f32,
}

impl Default for RowState {
    fn default() -> Self {
        RowState {
            max: f32::NEG_INFINITY,
            sum: 0.0,
            picked: 0.0,
        }
    }
}

impl RowState {
    /// Takes in one chunk of the row's logits (`row`, the chunk starting at vocabulary entry `v0`).
    /// With `write_exp`, leaves `exp(logit - max)` (the new max) in `row`. Returns the factor by which
    /// what was accumulated against the old max is to be rescaled (1 when nothing was).
    fn absorb(&mut self, row: &mut [f32], label: usize, v0: usize, write_exp: bool) -> f32 {
        if (v0..v0 + row.len()).contains(&label) {
            self.picked = row[label - v0];
        }
        let chunk_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let max = self.max.max(chunk_max);
        let factor = if self.max == f32::NEG_INFINITY || self.max == max {
            1.0
        } else {
            self.sum *= f64::from(self.max - max).exp();
            (self.max - max).exp()
        };
        self.max = max;
        if write_exp {
            for x in row.iter_mut() {
                let e = (*x - max).exp();
                *x = e;
                self.sum += f64::from(e);
            }
        } else {
            self.sum += row.iter().map(|&x| f64::from((x - max).exp())).sum::<f64>();
        }
        factor
    }

    /// `logsumexp - logit[label]`; the picked logit is taken as `logit[label] - max` in f32, as the
    /// unfused graph's `shifted.gather` does.
    fn loss(&self) -> f64 {
        self.sum.ln() - f64::from(self.picked - self.max)
    }
}

impl LinearCrossEntropy {
    fn new(head: Frozen, labels: Vec<u32>, chunks: Chunks, eager_grad: bool) -> Self {
        Self {
            head,
            labels,
            chunks,
            eager_grad,
            grad: OnceLock::new(),
        }
    }

    /// The summed loss and, if `want_grad`, dL/dh (row-major `[n, d]`), in `self.chunks`.
    /// Deterministic: each row is reduced by one thread, chunk by chunk in vocabulary order, and
    /// rows are summed in order.
    fn run(
        &self,
        h: &[f32],
        n: usize,
        d: usize,
        want_grad: bool,
    ) -> Result<(f64, Option<Vec<f32>>)> {
        let (vocab, _) = self.head.dims2()?;
        if self.labels.len() != n || h.len() != n * d {
            bail!(
                "linear-cross-entropy: {} labels and {} values for {n} rows of h",
                self.labels.len(),
                h.len()
            );
        }
        let rc = self.chunks.rows.min(n).max(1);
        let vc = self.chunks.vocab.min(vocab).max(1);
        // One logits block for every chunk (zero-filled once, then overwritten by each product).
        let mut logits = vec![0f32; rc * vc];
        let mut grad = want_grad.then(|| vec![0f32; n * d]);
        // The head's row of each row's label, picked up when its chunk is widened.
        let mut label_rows = if want_grad {
            vec![0f32; rc * d]
        } else {
            Vec::new()
        };
        let mut total = 0f64;
        for r0 in (0..n).step_by(rc) {
            let rows = rc.min(n - r0);
            let labels = &self.labels[r0..r0 + rows];
            let h_rows = Operand::plain(&h[r0 * d..(r0 + rows) * d]);
            let mut state = vec![RowState::default(); rows];
            let mut g = grad.as_mut().map(|g| &mut g[r0 * d..(r0 + rows) * d]);
            for v0 in (0..vocab).step_by(vc) {
                let cols = vc.min(vocab - v0);
                self.head.with_f32_rows(v0..v0 + cols, |w| {
                    let logits = &mut logits[..rows * cols];
                    gemm_set(logits, h_rows, Operand::t(w), (rows, cols, d), 1.0)?;
                    let Some(g) = g.as_deref_mut() else {
                        logits
                            .par_chunks_mut(cols)
                            .zip(state.par_iter_mut())
                            .zip(labels.par_iter())
                            .for_each(|((row, st), &label)| {
                                st.absorb(row, label as usize, v0, false);
                            });
                        return Ok(());
                    };
                    logits
                        .par_chunks_mut(cols)
                        .zip(state.par_iter_mut())
                        .zip(labels.par_iter())
                        .zip(g.par_chunks_mut(d))
                        .zip(label_rows.par_chunks_mut(d))
                        .for_each(|((((row, st), &label), g_row), label_row)| {
                            let label = label as usize;
                            let factor = st.absorb(row, label, v0, true);
                            if factor != 1.0 {
                                g_row.iter_mut().for_each(|x| *x *= factor);
                            }
                            if (v0..v0 + cols).contains(&label) {
                                label_row
                                    .copy_from_slice(&w[(label - v0) * d..(label - v0 + 1) * d]);
                            }
                        });
                    // `logits` now holds exp(logit - max): accumulate them against the head.
                    gemm_add(
                        g,
                        Operand::plain(logits),
                        Operand::plain(w),
                        (rows, d, cols),
                        1.0,
                    )
                })?;
            }
            total += state.iter().map(RowState::loss).sum::<f64>();
            if let Some(g) = g {
                g.par_chunks_mut(d)
                    .zip(state.par_iter())
                    .zip(label_rows.par_chunks(d))
                    .for_each(|((g_row, st), label_row)| {
                        let inv = (1.0 / st.sum) as f32;
                        for (x, w) in g_row.iter_mut().zip(label_row) {
                            *x = *x * inv - w;
                        }
                    });
            }
        }
        Ok((total, grad))
    }
}

impl CustomOp1 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, hs: &CpuStorage, hl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, d) = hl.shape().dims2()?;
        let h = contiguous_f32("linear-cross-entropy", hs, hl)?;
        let (loss, grad) = self.run(h, n, d, self.eager_grad)?;
        if let Some(grad) = grad {
            let grad = Tensor::from_vec(grad, hl.shape().clone(), &Device::Cpu)?;
            if self.grad.set(grad).is_err() {
                bail!("linear-cross-entropy: forward ran twice on one op");
            }
        }
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(&self, h: &Tensor, _loss: &Tensor, grad_loss: &Tensor) -> Result<Option<Tensor>> {
        let grad = match self.grad.get() {
            Some(grad) => grad.clone(),
            None => h.apply_op1_no_bwd(&InputGrad(self))?,
        };
        Ok(Some(grad.broadcast_mul(grad_loss)?))
    }
}

/// dL/dh of a [`LinearCrossEntropy`] whose forward did not compute it (recomputes the logits).
struct InputGrad<'a>(&'a LinearCrossEntropy);

impl CustomOp1 for InputGrad<'_> {
    fn name(&self) -> &'static str {
        "linear-cross-entropy-grad"
    }

    fn cpu_fwd(&self, hs: &CpuStorage, hl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, d) = hl.shape().dims2()?;
        let h = contiguous_f32("linear-cross-entropy", hs, hl)?;
        let (_, grad) = self.0.run(h, n, d, true)?;
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

    /// The fused op on a head held as a plain f32 tensor.
    fn fused(
        h: &Tensor,
        weight: &Tensor,
        labels: &Tensor,
        rows: usize,
        vocab: usize,
    ) -> Result<Tensor> {
        linear_cross_entropy_sum(
            h,
            &Frozen::Dense(weight.clone()),
            labels,
            Chunks { rows, vocab },
        )
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

    fn check_against_reference(c: &Case, chunk: usize, vocab_chunk: usize, what: &str) {
        let (v, g) = value_and_grad(&c.h, |h| {
            fused(h, &c.weight, &c.labels, chunk, vocab_chunk).unwrap()
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
            // The whole vocabulary at once, chunks that do and do not divide it, one entry a chunk.
            for vocab_chunk in [vocab, 7, 16, 1] {
                check_against_reference(
                    &c,
                    chunk,
                    vocab_chunk,
                    &format!("n={n} d={d} vocab={vocab} chunk={chunk} vocab chunk={vocab_chunk}"),
                );
            }
        }
    }

    #[test]
    fn a_stored_head_gives_the_widened_heads_results_bit_for_bit() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use std::sync::Arc;
        let c = case(31, 37, 64, 300, 1.0, 0.5);
        let stored = [
            Frozen::Dense(c.weight.to_dtype(DType::BF16).unwrap()),
            Frozen::Dense(c.weight.to_dtype(DType::F16).unwrap()),
            Frozen::Quantized(Arc::new(
                QTensor::quantize(&c.weight, GgmlDType::Q8_0).unwrap(),
            )),
            Frozen::Quantized(Arc::new(
                QTensor::quantize(&c.weight, GgmlDType::Q4_0).unwrap(),
            )),
        ];
        for head in stored {
            let widened = Frozen::Dense(head.to_f32(&Device::Cpu).unwrap());
            for chunks in [
                Chunks { rows: 8, vocab: 64 },
                Chunks {
                    rows: 37,
                    vocab: 300,
                },
            ] {
                let run = |head: &Frozen| {
                    value_and_grad(&c.h, |h| {
                        linear_cross_entropy_sum(h, head, &c.labels, chunks).unwrap()
                    })
                };
                let (v, g) = run(&head);
                let (wv, wg) = run(&widened);
                let what = format!("{} {chunks:?}", head.stored_type());
                assert_eq!(v.to_bits(), wv.to_bits(), "{what}: loss");
                assert!(
                    g.iter().zip(&wg).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: grad"
                );
            }
        }
    }

    #[test]
    fn the_running_maximum_is_rescaled_when_a_later_chunk_holds_a_larger_logit() {
        // Rows whose largest logits sit in the last vocabulary chunk, far above the first chunk's:
        // without the rescale the early sums would be counted at the wrong scale.
        let mut c = case(37, 9, 12, 40, 1.0, 0.2);
        let mut w = c.weight.to_vec2::<f32>().unwrap();
        for row in w.iter_mut().skip(32) {
            row.iter_mut().for_each(|x| *x *= 60.0);
        }
        c.weight = Tensor::new(w, &Device::Cpu).unwrap();
        check_against_reference(&c, 4, 8, "large logits in the last chunk");
    }

    #[test]
    fn stable_with_large_logits() {
        // Logits in the hundreds: exp would overflow without the max subtraction.
        let c = case(42, 19, 24, 97, 10.0, 3.0);
        check_against_reference(&c, 4, 10, "large logits");
    }

    #[test]
    fn non_contiguous_h_gets_its_gradient() {
        let c = case(7, 6, 10, 23, 1.0, 1.0);
        let ht = c.h.t().unwrap().contiguous().unwrap(); // [d, n]; its transpose is h, strided
        let (v, g) = value_and_grad(&ht, |ht| {
            let h = ht.t().unwrap();
            assert!(!h.is_contiguous());
            fused(&h, &c.weight, &c.labels, 4, 5).unwrap()
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
            fused(&h, &c.weight, &labels, 2, 5).unwrap()
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
            (fused(h, &c.weight, &c.labels, 3, 7).unwrap() * 0.25).unwrap()
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
        let loss = fused(&hv, &wv, &c.labels, 3, 7).unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(&hv).is_some());
        assert!(grads.get(&wv).is_none(), "no gradient for the frozen head");
    }

    #[test]
    fn lazy_backward_recomputes_the_same_gradient() {
        // An op whose forward did not compute the gradient recomputes it in backward.
        let c = case(5, 13, 7, 29, 1.0, 1.0);
        let labels = c.labels.to_vec1::<u32>().unwrap();
        let (v, g) = value_and_grad(&c.h, |h| {
            let chunks = Chunks { rows: 5, vocab: 8 };
            let head = Frozen::Dense(c.weight.clone());
            h.apply_op1(LinearCrossEntropy::new(head, labels.clone(), chunks, false))
                .unwrap()
        });
        let (rv, rg) = value_and_grad(&c.h, |h| reference(h, &c.weight, &c.labels));
        assert_close("lazy: loss", &[v], &[rv]);
        assert_close("lazy: grad", &g, &rg);
    }

    #[test]
    fn detached_h_computes_only_the_loss() {
        let c = case(11, 9, 5, 17, 1.0, 1.0);
        let loss = fused(&c.h, &c.weight, &c.labels, 2, 5).unwrap();
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
        let err = fused(&c.h, &c.weight, &labels, 2, 4)
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
        let (v, g) = value_and_grad(&c.h, |h| fused(h, &c.weight, &c.labels, 3, 4).unwrap());
        assert_eq!(v, 0.0);
        assert!(g.is_empty());
    }

    #[test]
    fn bad_arguments_are_errors() {
        let c = case(19, 4, 3, 11, 1.0, 1.0);
        assert!(fused(&c.h, &c.weight, &c.labels, 0, 4).is_err());
        assert!(fused(&c.h, &c.weight, &c.labels, 2, 0).is_err());
        let short = c.labels.narrow(0, 0, 3).unwrap();
        assert!(fused(&c.h, &c.weight, &short, 2, 4).is_err());
        let w4 = Tensor::zeros((11, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(fused(&c.h, &w4, &c.labels, 2, 4).is_err());
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
    fn default_chunks_stay_within_the_budgets() {
        // SmolLM2-135M (d 576), Llama-3.2-1B (2048), Llama-3.1-8B (4096).
        assert_eq!(
            default_chunks(1024, 49152, 576),
            Chunks {
                rows: 1024,
                vocab: 28928
            }
        );
        assert_eq!(
            default_chunks(512, 128256, 2048),
            Chunks {
                rows: 512,
                vocab: 8192
            }
        );
        assert_eq!(
            default_chunks(1 << 20, 128256, 4096),
            Chunks {
                rows: 8192,
                vocab: 4096
            }
        );
        for (n, vocab, d) in [
            (512, 128256, 2048),
            (4096, 32000, 8192),
            (7, 11, 5),
            (0, 9, 3),
        ] {
            let c = default_chunks(n, vocab, d);
            assert!(
                c.vocab * d * 4 <= HEAD_CHUNK_BYTES.max(256 * d * 4),
                "{c:?}"
            );
            assert!(
                c.rows * c.vocab * 4 <= LOGITS_BUDGET_BYTES.max(128 * c.vocab * 4),
                "{c:?}"
            );
            assert!(c.rows >= 1 && c.vocab >= 1 && c.vocab <= vocab.max(1));
        }
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
        let head = Frozen::Dense(c.weight.clone());
        let bf16 = Frozen::Dense(c.weight.to_dtype(DType::BF16).unwrap());
        let widened_bf16 = Frozen::Dense(bf16.to_f32(&Device::Cpu).unwrap());
        let chunkings = [128, 256, 512, 1024]
            .into_iter()
            .map(|rows| Chunks { rows, vocab })
            .chain([4096, 8192, 16384].map(|v| Chunks { rows: n, vocab: v }))
            .chain([default_chunks(n, vocab, d)]);
        for chunks in chunkings {
            for (what, head) in [
                ("f32", &head),
                ("bf16", &bf16),
                ("bf16 widened", &widened_bf16),
            ] {
                let f = fwd_bwd(&c.h, 3, |h| {
                    linear_cross_entropy_sum(h, head, &c.labels, chunks).unwrap()
                });
                println!(
                    "fused, {what:12} {:4} rows x {:5} vocab: {:7.1} ms fwd+bwd ({:6.0} ms CPU), \
                     peak extra RSS {} MB (logits block {:.1} MB, grad of h {:.1} MB x2), loss {}",
                    chunks.rows,
                    chunks.vocab,
                    f.ms,
                    f.cpu_ms,
                    f.peak_mb,
                    mb(chunks.rows * chunks.vocab * 4),
                    mb(n * d * 4),
                    f.loss
                );
                if what == "f32" {
                    assert_close("SmolLM2 loss", &[f.loss], &[u.loss]);
                    assert_close("SmolLM2 grad", &f.grad, &u.grad);
                }
            }
        }
        let labels = c.labels.to_vec1::<u32>().unwrap();
        let chunks = default_chunks(n, vocab, d);
        let lazy = fwd_bwd(&c.h, 2, |h| {
            let op = LinearCrossEntropy::new(head.clone(), labels.clone(), chunks, false);
            h.apply_op1(op).unwrap()
        });
        println!(
            "fused, {chunks:?}, logits recomputed in backward: {:7.1} ms fwd+bwd \
             ({:6.0} ms CPU)",
            lazy.ms, lazy.cpu_ms
        );
    }
}
