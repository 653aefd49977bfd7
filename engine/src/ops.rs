//! Differentiable building blocks of the forward pass.
//!
//! candle 0.11's fused `candle_nn::ops::{rms_norm, softmax_last_dim, rotary_emb::*}` record no backward
//! and silently cut the gradient (see CANDLE-NOTES.md), so everything here is composed from ops that
//! do have one, or is a lorad-kernels op with its own backward. `frozen_linear` is a product with a
//! frozen weight whose backward returns only the input's gradient, because candle's matmul backward
//! would also compute (and store) the gradient of every frozen base weight, which LoRA never uses.
use candle_core::{Result, Tensor, D};
pub use lorad_kernels::frozen::Frozen;

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension (HF `LlamaRMSNorm`); `weight` frozen.
/// A fused kernel on the CPU (one pass each way), the composition elsewhere.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    lorad_kernels::norm::rms_norm(x, weight, eps)
}

/// Softmax over the last dimension. The row maximum is detached: subtracting it does not change the
/// result, so its gradient is exactly zero and need not be traced.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Summed negative log-likelihood of `labels` (u32, `[n]`) under `logits` (`[n, vocab]`).
/// Summed, not averaged, so that gradient accumulation can divide by the step's total token count.
pub fn nll_sum(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&labels.unsqueeze(1)?, 1)?;
    (log_z - picked)?.sum_all()
}

/// `silu(gate) * up`: the SwiGLU of the Llama MLP (fused on the CPU).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    lorad_kernels::swiglu::swiglu(gate, up)
}

/// `swiglu(gate, up) @ down^T` for a frozen `down` with no adapter (`gate`, `up` `[n, intermediate]`):
/// on the CPU one op that keeps only `gate` and `up` for backward, not the SwiGLU output
/// (`lorad_kernels::swiglu_linear`); the composition's values bit for bit.
pub fn swiglu_linear(gate: &Tensor, up: &Tensor, down: &Frozen) -> Result<Tensor> {
    lorad_kernels::swiglu_linear::swiglu_linear(gate, up, down)
}

/// Summed next-token NLL of `labels` under the logits `h @ lm_head^T` (`h` `[n, hidden]`, `lm_head`
/// `[vocab, hidden]` frozen): the LM head and the loss together, a chunk of rows at a time, so the
/// `[n, vocab]` logits never exist at once and the frozen head gets no gradient.
///
/// A head kept in its stored form is widened a vocabulary chunk at a time inside the op, never whole.
pub fn lm_head_nll_sum(h: &Tensor, lm_head: &Frozen, labels: &Tensor) -> Result<Tensor> {
    let (vocab, d) = lm_head.dims2()?;
    let chunks = lorad_kernels::ce::default_chunks(h.dims2()?.0, vocab, d);
    lorad_kernels::ce::linear_cross_entropy_sum(h, lm_head, labels, chunks)
}

/// Causal (and, with `window`, sliding-window) attention with grouped KV heads: `q` `[b, h, t, d]`,
/// `k`/`v` `[b, kv, t, d]`, query head `i` reading KV head `i / (h / kv)` (transformers' `repeat_kv`),
/// scores scaled by `scale`. Returns `[b, h, t, d]`. On the CPU a fused kernel that keeps only the
/// output and the row log-sum-exp for backward (never the `[t, t]` probabilities); elsewhere
/// [`causal_attention_composed`].
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    lorad_kernels::attention::causal_attention(q, k, v, scale, window)
}

/// The attention of [`causal_attention`] composed from candle ops (repeat_kv, masked scores, softmax),
/// kept as the reference the fused kernel is tested against.
pub fn causal_attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    let (_, heads, t, _) = q.dims4()?;
    let (k, v) = (repeat_kv(k, heads)?, repeat_kv(v, heads)?);
    let mask = causal_mask(t, window, q.device())?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
    softmax_last(&scores)?.matmul(&v)
}

/// transformers' `repeat_kv`: each of the `x`'s KV heads serves `heads / kv` consecutive query heads.
fn repeat_kv(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, kv, t, d) = x.dims4()?;
    let n_rep = heads / kv.max(1);
    if n_rep == 1 {
        return Ok(x.clone());
    }
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, t, d))?
        .contiguous()?
        .reshape((b, kv * n_rep, t, d))
}

/// Causal (and, when configured, sliding-window) additive mask `[t, t]`: 0 where allowed, -inf elsewhere.
/// Right padding needs no extra mask: pads come after every real token, so causality keeps them out.
pub(crate) fn causal_mask(
    t: usize,
    window: Option<usize>,
    device: &candle_core::Device,
) -> Result<Tensor> {
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
    Tensor::from_vec(mask, (t, t), device)
}

/// HF's `rotate_half` (non-interleaved layout): `[x1, x2] -> [-x2, x1]` on the last dimension.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Applies rotary embeddings to `x` (`[b, heads, t, d]`, any layout with a unit last stride) with
/// `cos`/`sin` tables of shape `[t, d]`; the result is contiguous (fused on the CPU).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    lorad_kernels::rope::rope(x, cos, sin)
}

/// `x @ weight^T (+ bias)` for a frozen `weight` (`[out, in]`), `x` of shape `[n, in]`.
///
/// The gradient reaches `x` (and the LoRA weights below it), while no gradient of `weight` is ever
/// computed (`lorad_kernels::linear::frozen_linear`: gemm into the op's output on the CPU, an identity
/// op over candle's product elsewhere).
pub fn frozen_linear(x: &Tensor, weight: &Frozen, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = lorad_kernels::linear::frozen_linear(x, weight)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// A frozen linear layer with its LoRA adapter: `x @ weight^T (+ bias) + scale * (x * mask) @ a^T @
/// b^T` for `x` `[n, in]`, `(a [r, in], b [out, r], scale)` and the adapter's dropout `mask` (`[n, in]`,
/// `None` without dropout). Gradients reach `x`, `a` and `b`, never `weight`
/// (`lorad_kernels::linear::lora_linear`: on the CPU the layer and its update are one op, and without
/// dropout one product for the output and one for the input gradient).
pub fn lora_linear(
    x: &Tensor,
    weight: &Frozen,
    bias: Option<&Tensor>,
    (a, b, scale): (&Tensor, &Tensor, f64),
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let y = lorad_kernels::linear::lora_linear(x, weight, a, b, scale, mask)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn rms_norm_matches_formula() {
        let x = t(&[1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0], &[2, 4]);
        let w = t(&[1.0, 0.5, 2.0, 1.0], &[4]);
        let y = rms_norm(&x, &w, 1e-6).unwrap().to_vec2::<f32>().unwrap();
        let rms0 = ((1.0f32 + 4.0 + 9.0 + 16.0) / 4.0 + 1e-6).sqrt();
        assert!((y[0][0] - 1.0 / rms0).abs() < 1e-6);
        assert!((y[0][1] - 2.0 * 0.5 / rms0).abs() < 1e-6);
        assert!((y[0][2] - 3.0 * 2.0 / rms0).abs() < 1e-6);
        assert_eq!(rms_norm(&x, &w, 1e-6).unwrap().dims(), &[2, 4]);
    }

    #[test]
    fn rms_norm_and_softmax_pass_gradients() {
        let x = Var::from_tensor(&t(&[1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0], &[2, 4])).unwrap();
        let w = t(&[1.0, 0.5, 2.0, 1.0], &[4]);
        let y = softmax_last(&rms_norm(&x, &w, 1e-6).unwrap()).unwrap();
        let loss = (y * t(&[1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0], &[2, 4]))
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(&x)
            .expect("gradient of x")
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(g > 1e-4, "gradient reached x: {g}");
    }

    #[test]
    fn rotate_half_layout() {
        let x = t(&[1.0, 2.0, 3.0, 4.0], &[1, 1, 1, 4]);
        let r = rotate_half(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(r, vec![-3.0, -4.0, 1.0, 2.0]);
        // Position 0 (cos 1, sin 0) leaves x unchanged.
        let cos = Tensor::ones((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let sin = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = apply_rope(&x, &cos, &sin).unwrap();
        assert_eq!(y.dims(), &[1, 1, 1, 4]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0, 2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn frozen_linear_matches_matmul_and_its_input_gradient() {
        let w = t(&[0.1, -0.2, 0.3, 0.4, 0.5, -0.6], &[2, 3]);
        let xv = t(&[1.0, 2.0, 3.0, -1.0, 0.0, 1.0], &[2, 3]);
        let x = Var::from_tensor(&xv).unwrap();
        let y = frozen_linear(&x, &w.clone().into(), None).unwrap();
        let reference = xv.matmul(&w.t().unwrap()).unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            reference.to_vec2::<f32>().unwrap()
        );
        let weights = t(&[1.0, -2.0, 0.5, 3.0], &[2, 2]);
        let grads = (y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx = grads.get(&x).unwrap().to_vec2::<f32>().unwrap();
        let expected = weights.matmul(&w).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(gx, expected);
        assert!(
            grads.get(&w).is_none(),
            "no gradient is computed for the frozen weight"
        );
    }

    #[test]
    fn nll_sum_matches_log_softmax() {
        let logits = t(&[1.0, 2.0, 3.0, 0.0, 0.0, 0.0], &[2, 3]);
        let labels = Tensor::from_slice(&[2u32, 1], 2, &Device::Cpu).unwrap();
        let got = nll_sum(&logits, &labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let lse0 = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        let expected = (lse0 - 3.0) + 3f32.ln();
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }
}
