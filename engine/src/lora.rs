//! LoRA: a frozen linear layer plus a trainable low-rank update `B @ A`, as in PEFT.
//!
//! Initialisation and dropout draw from our own seeded ChaCha generator, because candle's CPU RNG
//! cannot be seeded; that makes runs reproducible and (later) resumable from a saved RNG state.
use super::ops::{frozen_linear, lora_linear, swiglu, swiglu_linear, Frozen};
use candle_core::{DType, Device, Result, Tensor, Var};
use lorad_schema::TrainSettings;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Which modules get an adapter and how it is shaped and scaled.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// Dropout probability on the adapter's input.
    pub dropout: f64,
    /// Target module names (`q_proj`, ...).
    pub targets: Vec<String>,
    /// Rank-stabilised scaling.
    pub use_rslora: bool,
}

impl LoraConfig {
    /// The LoRA part of the training settings.
    pub fn from_settings(s: &TrainSettings) -> Self {
        LoraConfig {
            r: s.lora_r.max(1) as usize,
            alpha: s.lora_alpha,
            dropout: s.lora_dropout,
            targets: s.target_modules.clone(),
            use_rslora: s.use_rslora,
        }
    }

    /// The update's scale: alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's `scaling`).
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether `module` (e.g. `q_proj`) is adapted.
    pub fn targets(&self, module: &str) -> bool {
        self.targets.iter().any(|t| t == module)
    }
}

/// The trainable pair of one adapted module.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`, Kaiming-uniform.
    pub a: Var,
    /// `[out, r]`, zeros at init so the adapted model starts equal to the base.
    pub b: Var,
    /// alpha / r (or alpha / sqrt(r)).
    pub scale: f64,
    /// Dropout probability on the adapter input.
    pub dropout: f64,
}

impl LoraPair {
    /// PEFT's default init: A ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
    pub fn init(
        cfg: &LoraConfig,
        in_dim: usize,
        out_dim: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let values: Vec<f32> = (0..cfg.r * in_dim)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(values, (cfg.r, in_dim), device)?)?;
        let b = Var::zeros((out_dim, cfg.r), DType::F32, device)?;
        Ok(LoraPair {
            a,
            b,
            scale: cfg.scale(),
            dropout: cfg.dropout,
        })
    }

    /// A pair with given weights (a loaded adapter).
    pub fn from_weights(a: &Tensor, b: &Tensor, scale: f64, dropout: f64) -> Result<Self> {
        Ok(LoraPair {
            a: Var::from_tensor(a)?,
            b: Var::from_tensor(b)?,
            scale,
            dropout,
        })
    }
}

/// A linear layer with a frozen weight (`[out, in]`, a plain tensor, never a `Var`), an optional
/// frozen bias, and an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// Frozen base weight `[out, in]`, as stored (f32, bf16/f16, or quantized blocks).
    pub weight: Frozen,
    /// Frozen bias `[out]` (Qwen2's q/k/v).
    pub bias: Option<Tensor>,
    /// The adapter, when this module is a target.
    pub lora: Option<LoraPair>,
}

impl LoraLinear {
    /// `x @ W^T + b + dropout(x) @ A^T @ B^T * scale` for `x` of shape `[.., in]`.
    /// `dropout_rng` is `Some` while training (dropout active) and `None` for evaluation.
    pub fn forward(&self, x: &Tensor, dropout_rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(0);
        let x2 = x.reshape(((), in_dim))?;
        let y = match &self.lora {
            None => frozen_linear(&x2, &self.weight, self.bias.as_ref())?,
            Some(lora) => {
                let mask = match dropout_rng {
                    Some(rng) if lora.dropout > 0.0 => {
                        let mask = dropout_mask(x2.shape(), lora.dropout, rng, x2.device())?;
                        Some(mask.to_dtype(x2.dtype())?)
                    }
                    _ => None,
                };
                let (a, b) = (lora.a.as_tensor(), lora.b.as_tensor());
                let bias = self.bias.as_ref();
                lora_linear(&x2, &self.weight, bias, (a, b, lora.scale), mask.as_ref())?
            }
        };
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.weight.dims2()?.0;
        }
        y.reshape(out_dims)
    }
}

impl LoraLinear {
    /// `self.forward(&swiglu(gate, up))`: the Llama MLP's down projection on its SwiGLU input. A
    /// frozen projection with no adapter and no bias runs fused with the SwiGLU, so the graph keeps
    /// only `gate` and `up` (a third less of the MLP's activations); the values are the same.
    pub fn forward_swiglu(
        &self,
        gate: &Tensor,
        up: &Tensor,
        dropout_rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        if self.lora.is_some() || self.bias.is_some() {
            return self.forward(&swiglu(gate, up)?, dropout_rng);
        }
        let dims = gate.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(0);
        let flat = |t: &Tensor| t.reshape(((), in_dim));
        let y = swiglu_linear(&flat(gate)?, &flat(up)?, &self.weight)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.weight.dims2()?.0;
        }
        y.reshape(out_dims)
    }
}

/// The mask of inverted dropout, drawn from `rng`: 1/(1-p) where a value is kept, 0 where dropped.
///
/// Element `i` is kept when the `i`-th `f64` drawn from `rng` is below `1 - p`, as if drawn one after
/// the other, but blocks of elements are drawn in parallel: ChaCha is a counter-mode generator, so
/// each block seeks a clone of `rng` to its own position in the stream. The values and the state
/// `rng` is left in do not depend on the thread count.
pub fn dropout_mask(
    shape: &candle_core::Shape,
    p: f64,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<Tensor> {
    /// Elements per parallel block.
    const BLOCK: usize = 1 << 14;
    /// 32-bit words of the ChaCha stream that one `f64` draw consumes (one `u64`).
    const WORDS_PER_DRAW: u128 = 2;
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    let n = shape.elem_count();
    let start = rng.get_word_pos();
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(block, values)| {
            let mut r = rng.clone();
            r.set_word_pos(start + WORDS_PER_DRAW * (block * BLOCK) as u128);
            for v in values {
                if r.random::<f64>() < keep {
                    *v = scale;
                }
            }
        });
    rng.set_word_pos(start + WORDS_PER_DRAW * n as u128);
    Tensor::from_vec(mask, shape, device)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn cfg() -> LoraConfig {
        LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec!["q_proj".into()],
            use_rslora: false,
        }
    }

    #[test]
    fn init_follows_peft() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let pair = LoraPair::init(&cfg(), 64, 32, &mut rng, &Device::Cpu).unwrap();
        assert_eq!(pair.a.dims(), &[4, 64]);
        assert_eq!(pair.b.dims(), &[32, 4]);
        let a = pair.a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a.iter().all(|v| v.abs() <= 0.125), "A within 1/sqrt(64)");
        assert!(a.iter().any(|v| v.abs() > 0.1), "A spans its range");
        assert!(pair
            .b
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| *v == 0.0));
        assert_eq!(pair.scale, 2.0);
        let rs = LoraConfig {
            use_rslora: true,
            ..cfg()
        };
        assert_eq!(rs.scale(), 4.0);
    }

    #[test]
    fn forward_adds_the_scaled_update() {
        let dev = Device::Cpu;
        let w = Tensor::from_slice(&[1f32, 0.0, 0.0, 1.0, 1.0, 1.0], (3, 2), &dev).unwrap();
        let a = Tensor::from_slice(&[1f32, 2.0], (1, 2), &dev).unwrap();
        let b = Tensor::from_slice(&[1f32, 0.0, -1.0], (3, 1), &dev).unwrap();
        let lin = LoraLinear {
            weight: w.into(),
            bias: None,
            lora: Some(LoraPair::from_weights(&a, &b, 0.5, 0.0).unwrap()),
        };
        let x = Tensor::from_slice(&[1f32, 1.0], (1, 1, 2), &dev).unwrap();
        let y = lin.forward(&x, None).unwrap();
        assert_eq!(y.dims(), &[1, 1, 3]);
        // base [1, 1, 2]; update: (1*1 + 1*2) = 3 -> B * 3 * 0.5 = [1.5, 0, -1.5].
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![2.5, 1.0, 0.5]
        );
    }

    #[test]
    fn dropout_masks_are_the_sequential_draws_at_any_thread_count() {
        let shape = candle_core::Shape::from((3, 40_000));
        let (p, keep) = (0.1, 0.9);
        // An odd start: every draw straddles two words, some of them two ChaCha blocks.
        let mut seq = ChaCha8Rng::seed_from_u64(9);
        let _: u32 = seq.random();
        let want: Vec<f32> = (0..shape.elem_count())
            .map(|_| {
                if seq.random::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let after: u64 = seq.random();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            let _: u32 = rng.random();
            let got = pool
                .install(|| dropout_mask(&shape, p, &mut rng, &Device::Cpu))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(got == want, "{threads} threads");
            assert_eq!(
                rng.random::<u64>(),
                after,
                "the stream goes on where it would"
            );
        }
    }

    #[test]
    fn dropout_is_seeded_and_scaled() {
        let shape = candle_core::Shape::from(1000);
        let mask = |seed| {
            dropout_mask(
                &shape,
                0.25,
                &mut ChaCha8Rng::seed_from_u64(seed),
                &Device::Cpu,
            )
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
        };
        let (d1, d2) = (mask(3), mask(3));
        assert_eq!(d1, d2);
        let zeros = d1.iter().filter(|v| **v == 0.0).count();
        assert!(
            (150..350).contains(&zeros),
            "{zeros} dropped of 1000 at p=0.25"
        );
        assert!(d1
            .iter()
            .all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6));
    }
}
