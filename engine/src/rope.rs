//! Rotary position embeddings: the angle tables, with transformers' `linear` and `llama3` scaling.
//! Applying them is `ops::apply_rope` (HF's non-interleaved `rotate_half` layout).
use super::config::{ModelConfig, RopeParams};
use candle_core::{Device, Result, Tensor};

/// Precomputed RoPE tables for positions `0..max_len`, each `[max_len, head_dim]`.
#[derive(Debug, Clone)]
pub struct Rope {
    /// cos of the angles, `[max_len, head_dim]`.
    pub cos: Tensor,
    /// sin of the angles, `[max_len, head_dim]`.
    pub sin: Tensor,
}

impl Rope {
    /// Tables for `max_len` positions (the training sequence length, not the model's whole context).
    pub fn new(cfg: &ModelConfig, max_len: usize, device: &Device) -> Result<Self> {
        let d = cfg.head_dim();
        let p = cfg.rope();
        let base = p.rope_theta.unwrap_or(10_000.0) as f32;
        // f32 like transformers, so the angles match it to rounding.
        let mut inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
            .collect();
        match p.rope_type.as_deref() {
            Some("linear") => {
                let f = p.factor.unwrap_or(1.0) as f32;
                inv.iter_mut().for_each(|v| *v /= f);
            }
            Some("llama3") => llama3_scaling(&mut inv, &p),
            _ => {}
        }
        let mut freqs = Vec::with_capacity(max_len * d);
        for pos in 0..max_len {
            let row: Vec<f32> = inv.iter().map(|f| pos as f32 * f).collect();
            freqs.extend_from_slice(&row);
            freqs.extend_from_slice(&row);
        }
        let freqs = Tensor::from_vec(freqs, (max_len, d), device)?;
        Ok(Rope {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }
}

/// transformers' `_compute_llama3_parameters`: low frequencies scaled by `factor`, a smooth blend between.
pub(crate) fn llama3_scaling(inv: &mut [f32], p: &RopeParams) {
    let factor = p.factor.unwrap_or(1.0);
    let (low, high) = (
        p.low_freq_factor.unwrap_or(1.0),
        p.high_freq_factor.unwrap_or(4.0),
    );
    let old_ctx = p.original_max_position_embeddings.unwrap_or(8192) as f64;
    let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
    for f in inv.iter_mut() {
        let freq = *f as f64;
        let wavelen = 2.0 * std::f64::consts::PI / freq;
        let scaled = if wavelen > low_wavelen {
            freq / factor
        } else {
            freq
        };
        // wavelen is finite (freq > 0), so "not below and not above" is this range.
        let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
        *f = if medium {
            let smooth = (old_ctx / wavelen - low) / (high - low);
            ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
        } else {
            scaled as f32
        };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn rope_tables_follow_transformers() {
        let cfg: ModelConfig = serde_json::from_str(
            r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 2, "vocab_size": 10, "rope_theta": 100.0}"#,
        )
        .unwrap();
        let rope = Rope::new(&cfg, 3, &Device::Cpu).unwrap();
        assert_eq!(rope.cos.dims(), &[3, 4]);
        let cos = rope.cos.to_vec2::<f32>().unwrap();
        let sin = rope.sin.to_vec2::<f32>().unwrap();
        // head_dim 4: inv_freq = [1, 100^-0.5] = [1, 0.1]; the two halves repeat.
        let expected = [2f32.cos(), 0.2f32.cos(), 2f32.cos(), 0.2f32.cos()];
        for (got, want) in cos[2].iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{:?}", cos[2]);
        }
        assert_eq!(cos[0], vec![1.0; 4]);
        assert!((sin[1][1] - 0.1f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_frequencies() {
        let p = RopeParams {
            rope_type: Some("llama3".into()),
            factor: Some(8.0),
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(8192),
            rope_theta: Some(500000.0),
        };
        let mut inv = vec![1.0f32, 1e-4];
        llama3_scaling(&mut inv, &p);
        assert_eq!(inv[0], 1.0, "short wavelengths unchanged");
        assert!(
            (inv[1] - 1e-4 / 8.0).abs() < 1e-9,
            "long wavelengths divided by factor"
        );
    }
}
