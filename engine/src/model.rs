//! Llama-family causal LM (Llama, SmolLM, Mistral, Qwen2) built from differentiable ops only.
//!
//! Base weights are plain tensors loaded from safetensors (frozen by construction); the only `Var`s are
//! the LoRA pairs inside `LoraLinear`s. Layout and numerics follow transformers' `modeling_llama.py`:
//! RMSNorm, non-interleaved RoPE, grouped KV heads, SwiGLU MLP, optionally tied LM head.
pub use super::config::{check_model_dir, ModelConfig};
use super::error::EngineError;
use super::lora::{LoraConfig, LoraLinear, LoraPair};
use super::ops::{apply_rope, causal_attention, frozen_linear, lm_head_nll_sum, rms_norm, Frozen};
pub use super::rope::Rope;
pub use super::source::check_model;
use super::source::ModelSource;
use candle_core::{Device, Result, Tensor, Var};
use lorad_schema::TARGET_MODULES;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
struct Attention {
    q: LoraLinear,
    k: LoraLinear,
    v: LoraLinear,
    o: LoraLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        window: Option<usize>,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let d = self.head_dim;
        // [b, t, h*d] -> [b, h, t, d] views; RoPE reads q and k strided and writes them contiguous.
        let split = |y: Tensor, h: usize| y.reshape((b, t, h, d))?.transpose(1, 2);
        let q = split(self.q.forward(x, rng.as_deref_mut())?, self.heads)?;
        let k = split(self.k.forward(x, rng.as_deref_mut())?, self.kv_heads)?;
        let v = split(self.v.forward(x, rng.as_deref_mut())?, self.kv_heads)?.contiguous()?;
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        let out = causal_attention(&q, &k, &v, 1.0 / (d as f64).sqrt(), window)?;
        let out = out
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, self.heads * d))?;
        self.o.forward(&out, rng)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: LoraLinear,
    up: LoraLinear,
    down: LoraLinear,
}

#[derive(Debug, Clone)]
struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

/// What every decoder layer's forward pass shares: the RoPE tables for the sequence, the attention
/// window, the norms' epsilon.
struct LayerInputs {
    cos: Tensor,
    sin: Tensor,
    window: Option<usize>,
    eps: f64,
}

impl Block {
    /// The layer's projections, in `TARGET_MODULES` order.
    fn linears(&self) -> [&LoraLinear; 7] {
        [
            &self.attn.q,
            &self.attn.k,
            &self.attn.v,
            &self.attn.o,
            &self.mlp.gate,
            &self.mlp.up,
            &self.mlp.down,
        ]
    }

    /// One decoder layer: `x + attn(norm(x))`, then `+ mlp(norm(.))`.
    fn forward(
        &self,
        x: &Tensor,
        c: &LayerInputs,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let a = self.attn.forward(
            &rms_norm(x, &self.input_norm, c.eps)?,
            &c.cos,
            &c.sin,
            c.window,
            rng.as_deref_mut(),
        )?;
        let x = (x + a)?;
        let n = rms_norm(&x, &self.post_norm, c.eps)?;
        let gate = self.mlp.gate.forward(&n, rng.as_deref_mut())?;
        let up = self.mlp.up.forward(&n, rng.as_deref_mut())?;
        x + self.mlp.down.forward_swiglu(&gate, &up, rng)?
    }
}

/// The model: frozen base weights, LoRA pairs on the target modules.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: ModelConfig,
    embed: Frozen,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Frozen,
    rope: Rope,
    max_len: usize,
    device: Device,
}

/// Pulls named tensors out of a loaded checkpoint, checking shapes; errors name the tensor.
struct Weights<'a> {
    map: HashMap<String, Frozen>,
    path: &'a Path,
    device: &'a Device,
}

impl Weights<'_> {
    /// A vector (norm, bias) as an f32 tensor.
    fn take_f32(&mut self, name: &str, dims: &[usize]) -> std::result::Result<Tensor, EngineError> {
        let t = self.take(name, dims)?;
        t.to_f32(self.device)
            .map_err(|e| EngineError::model(self.path, format!("tensor {name}: {e}")))
    }

    fn take(&mut self, name: &str, dims: &[usize]) -> std::result::Result<Frozen, EngineError> {
        let t = self
            .map
            .remove(name)
            .ok_or_else(|| EngineError::model(self.path, format!("missing tensor {name}")))?;
        if t.dims() != dims {
            return Err(EngineError::model(
                self.path,
                format!(
                    "tensor {name} has shape {:?}, config.json implies {dims:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t)
    }
}

impl Llama {
    /// Loads the model at `path` (an HF directory or a GGUF file) with LoRA pairs initialised from
    /// `init_rng` on the target modules, for sequences of at most `max_len` tokens.
    pub fn load(
        path: &Path,
        lora: &LoraConfig,
        init_rng: &mut ChaCha8Rng,
        max_len: usize,
        device: &Device,
    ) -> std::result::Result<Self, EngineError> {
        Self::from_source(&ModelSource::open(path)?, lora, init_rng, max_len, device)
    }

    /// [`Llama::from_source`] with the frozen base held as `base` says: f32, or the matrices in their
    /// stored form (bf16/f16; GGUF blocks on the CPU), widened per product.
    pub fn from_source_with(
        source: &ModelSource,
        lora: &LoraConfig,
        init_rng: &mut ChaCha8Rng,
        max_len: usize,
        device: &Device,
        base: lorad_schema::BaseWeights,
    ) -> std::result::Result<Self, EngineError> {
        let tensors = source.frozen_tensors(device, base)?;
        let cfg = source.config().clone();
        Self::from_frozen(cfg, tensors, source.path(), lora, init_rng, max_len, device)
    }

    /// Loads the weights of an opened model source (see `load`).
    pub fn from_source(
        source: &ModelSource,
        lora: &LoraConfig,
        init_rng: &mut ChaCha8Rng,
        max_len: usize,
        device: &Device,
    ) -> std::result::Result<Self, EngineError> {
        let tensors = source.tensors(device)?;
        let cfg = source.config().clone();
        Self::from_tensors(cfg, tensors, source.path(), lora, init_rng, max_len, device)
    }

    /// Builds the model from already loaded tensors (HF names); `path` is used in error messages.
    pub fn from_tensors(
        cfg: ModelConfig,
        tensors: HashMap<String, Tensor>,
        path: &Path,
        lora: &LoraConfig,
        init_rng: &mut ChaCha8Rng,
        max_len: usize,
        device: &Device,
    ) -> std::result::Result<Self, EngineError> {
        let frozen = tensors
            .into_iter()
            .map(|(k, t)| (k, Frozen::Dense(t)))
            .collect();
        Self::from_frozen(cfg, frozen, path, lora, init_rng, max_len, device)
    }

    /// Builds the model from loaded frozen tensors (HF names); `path` is used in error messages.
    pub fn from_frozen(
        cfg: ModelConfig,
        tensors: HashMap<String, Frozen>,
        path: &Path,
        lora: &LoraConfig,
        init_rng: &mut ChaCha8Rng,
        max_len: usize,
        device: &Device,
    ) -> std::result::Result<Self, EngineError> {
        let mut w = Weights {
            map: tensors,
            path,
            device,
        };
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = w.take("model.embed_tokens.weight", &[v, h])?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let mut lin =
                |group: &str, module: &str| -> std::result::Result<LoraLinear, EngineError> {
                    let (din, dout) = cfg.module_dims(module).unwrap_or((0, 0));
                    let prefix = format!("model.layers.{i}.{group}.{module}");
                    let weight = w.take(&format!("{prefix}.weight"), &[dout, din])?;
                    let bias = match w.map.contains_key(&format!("{prefix}.bias")) {
                        true => Some(w.take_f32(&format!("{prefix}.bias"), &[dout])?),
                        false => None,
                    };
                    let lora = match lora.targets(module) {
                        true => Some(LoraPair::init(lora, din, dout, init_rng, device)?),
                        false => None,
                    };
                    Ok(LoraLinear { weight, bias, lora })
                };
            let attn = Attention {
                q: lin("self_attn", "q_proj")?,
                k: lin("self_attn", "k_proj")?,
                v: lin("self_attn", "v_proj")?,
                o: lin("self_attn", "o_proj")?,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.kv_heads(),
                head_dim: cfg.head_dim(),
            };
            let mlp = Mlp {
                gate: lin("mlp", "gate_proj")?,
                up: lin("mlp", "up_proj")?,
                down: lin("mlp", "down_proj")?,
            };
            let input_norm =
                w.take_f32(&format!("model.layers.{i}.input_layernorm.weight"), &[h])?;
            let post_norm = w.take_f32(
                &format!("model.layers.{i}.post_attention_layernorm.weight"),
                &[h],
            )?;
            blocks.push(Block {
                input_norm,
                attn,
                post_norm,
                mlp,
            });
        }
        let norm = w.take_f32("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else if w.map.contains_key("lm_head.weight") {
            w.take("lm_head.weight", &[v, h])?
        } else {
            return Err(EngineError::model(
                path,
                "missing tensor lm_head.weight (and tie_word_embeddings is false)",
            ));
        };
        let rope = Rope::new(&cfg, max_len, device)?;
        Ok(Llama {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            max_len,
            device: device.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Final hidden states (after the last norm), `[b, t, hidden]`, for token ids `[b, t]` (u32).
    /// `dropout_rng` is `Some` in training (LoRA dropout on) and `None` in evaluation.
    pub fn hidden(&self, ids: &Tensor, mut dropout_rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let (mut x, c) = self.embedded(ids)?;
        for block in &self.blocks {
            x = block.forward(&x, &c, dropout_rng.as_deref_mut())?;
        }
        rms_norm(&x, &self.norm, c.eps)
    }

    /// The embedded tokens `[b, t, hidden]` and what the layers share, for token ids `[b, t]`.
    fn embedded(&self, ids: &Tensor) -> Result<(Tensor, LayerInputs)> {
        let (b, t) = ids.dims2()?;
        if t > self.max_len {
            candle_core::bail!(
                "sequence of {t} tokens is longer than the {} the model was prepared for",
                self.max_len
            );
        }
        let x = self
            .embed
            .rows(&ids.flatten_all()?)?
            .reshape((b, t, self.cfg.hidden_size))?;
        let c = LayerInputs {
            cos: self.rope.cos.narrow(0, 0, t)?,
            sin: self.rope.sin.narrow(0, 0, t)?,
            window: self.cfg.window(),
            eps: self.cfg.rms_norm_eps,
        };
        Ok((x, c))
    }

    /// [`Llama::loss_sum`] and the gradients of `scale * loss` for every LoRA variable, with gradient
    /// checkpointing: the forward pass keeps only each layer's input (and the dropout stream's
    /// position there); backward recomputes one layer at a time from its input, with the same
    /// dropout masks, and sends the gradient of its output through it. Peak activations are one
    /// layer's plus one `[b, t, hidden]` per layer, instead of every layer's.
    ///
    /// The numbers are those of `loss_sum(..).backward()`: the same ops on the same values; a layer's
    /// upstream gradient reaches it as `sum(y * g)`, whose gradient with respect to `y` is exactly `g`.
    pub fn loss_and_grads_checkpointed(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        labels: &Tensor,
        mut dropout_rng: Option<&mut ChaCha8Rng>,
        scale: f64,
    ) -> Result<(Tensor, candle_core::backprop::GradStore)> {
        let (mut x, c) = self.embedded(ids)?;
        let mut kept = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let input = x.detach();
            let rng_here = dropout_rng.as_deref().cloned();
            // Built with the graph (the ops decide what to keep by whether inputs track), then cut:
            // only the output's values survive this loop.
            x = block
                .forward(&input, &c, dropout_rng.as_deref_mut())?
                .detach();
            kept.push((input, rng_here));
        }
        let top = Var::from_tensor(&x)?;
        let h = rms_norm(top.as_tensor(), &self.norm, c.eps)?;
        let rows = h
            .reshape(((), self.cfg.hidden_size))?
            .index_select(positions, 0)?;
        let loss = lm_head_nll_sum(&rows, &self.lm_head, labels)?;
        let head = loss.affine(scale, 0.0)?.backward()?;
        let mut grad = head
            .get(top.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached the last layer".into()))?;
        // The head's graph (a widened LM head among it) is done with: not alive while the layers
        // are recomputed.
        let value = loss.detach();
        drop((loss, head, rows, h));
        let mut all = candle_core::backprop::GradStore::default();
        for (block, (input, rng_here)) in self.blocks.iter().zip(kept).rev() {
            let x = Var::from_tensor(&input)?;
            let mut rng = rng_here;
            let y = block.forward(x.as_tensor(), &c, rng.as_mut())?;
            let store = (y * grad.detach())?.sum_all()?.backward()?;
            for lin in block.linears() {
                if let Some(pair) = &lin.lora {
                    for v in [&pair.a, &pair.b] {
                        if let Some(g) = store.get(v.as_tensor()) {
                            all.insert(v.as_tensor(), g.clone());
                        }
                    }
                }
            }
            grad = match store.get(x.as_tensor()) {
                Some(g) => g.clone(),
                None => break,
            };
        }
        Ok((value, all))
    }

    /// Whether `gradient_checkpointing` (auto: from `GRADIENT_CHECKPOINTING_AUTO_PARAMS` base
    /// parameters) turns checkpointing on for this model.
    pub fn checkpointing(&self, setting: lorad_schema::GradientCheckpointing) -> bool {
        crate::memory::checkpointing_for(&self.cfg, setting)
    }

    /// Logits `[b, t, vocab]` (evaluation; training uses `loss_sum`, which only computes the rows it needs).
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let h = self.hidden(ids, None)?;
        let (b, t, d) = h.dims3()?;
        frozen_linear(&h.reshape((b * t, d))?, &self.lm_head, None)?.reshape((
            b,
            t,
            self.cfg.vocab_size,
        ))
    }

    /// Logits `[b, vocab]` of the last position only: what greedy generation needs, without the
    /// `[t, vocab]` product for every earlier position.
    pub fn last_logits(&self, ids: &Tensor) -> Result<Tensor> {
        let h = self.hidden(ids, None)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?;
        frozen_linear(&last, &self.lm_head, None)
    }

    /// Summed next-token NLL: `positions` (u32, flat indices into `b * t`) are the positions whose
    /// prediction counts, `labels` the tokens they must predict. Logits are computed for those rows only.
    pub fn loss_sum(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        labels: &Tensor,
        dropout_rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let h = self.hidden(ids, dropout_rng)?;
        let rows = h
            .reshape(((), self.cfg.hidden_size))?
            .index_select(positions, 0)?;
        lm_head_nll_sum(&rows, &self.lm_head, labels)
    }

    /// Every projection by HF module path (`model.layers.3.self_attn.q_proj`), in a fixed order:
    /// layer, then q, k, v, o, gate, up, down.
    fn linears(&self) -> Vec<(String, &LoraLinear)> {
        let mut out = Vec::with_capacity(self.blocks.len() * TARGET_MODULES.len());
        for (i, b) in self.blocks.iter().enumerate() {
            let lins = [
                &b.attn.q,
                &b.attn.k,
                &b.attn.v,
                &b.attn.o,
                &b.mlp.gate,
                &b.mlp.up,
                &b.mlp.down,
            ];
            for (k, (name, lin)) in TARGET_MODULES.iter().zip(lins).enumerate() {
                // TARGET_MODULES lists the four attention projections first, then the three MLP ones.
                let group = if k < 4 { "self_attn" } else { "mlp" };
                out.push((format!("model.layers.{i}.{group}.{name}"), lin));
            }
        }
        out
    }

    /// The adapted modules by HF path, in `linears` order: the order of `trainable_vars` and of the
    /// adapter file.
    pub fn lora_modules(&self) -> Vec<(String, &LoraPair)> {
        self.linears()
            .into_iter()
            .filter_map(|(name, lin)| lin.lora.as_ref().map(|p| (name, p)))
            .collect()
    }

    /// Every frozen base tensor by HF name (the LM head only when untied), as held (matrices possibly
    /// in their stored form): for checks that training never touches them, and for merging an
    /// adapter later.
    pub fn base_tensors(&self) -> Vec<(String, Frozen)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (name, lin) in self.linears() {
            if let Some(bias) = &lin.bias {
                out.push((format!("{name}.bias"), bias.clone().into()));
            }
            out.push((format!("{name}.weight"), lin.weight.clone()));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                b.input_norm.clone().into(),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                b.post_norm.clone().into(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone().into()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        out
    }

    /// Every trainable variable: A then B of each adapted module, in `lora_modules` order.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.lora_modules()
            .into_iter()
            .flat_map(|(_, p)| [p.a.clone(), p.b.clone()])
            .collect()
    }

    /// Replaces the LoRA weights with a loaded adapter's (`lora_A`/`lora_B` by module path).
    pub fn set_lora_weights(
        &self,
        weights: &HashMap<String, (Tensor, Tensor)>,
        source: &Path,
    ) -> std::result::Result<(), EngineError> {
        for (name, pair) in self.lora_modules() {
            let Some((a, b)) = weights.get(&name) else {
                return Err(EngineError::Adapter {
                    path: PathBuf::from(source),
                    detail: format!("no weights for {name}"),
                });
            };
            if a.dims() != pair.a.dims() || b.dims() != pair.b.dims() {
                return Err(EngineError::Adapter {
                    path: PathBuf::from(source),
                    detail: format!(
                        "{name}: shapes {:?}/{:?} do not match the model's {:?}/{:?}",
                        a.dims(),
                        b.dims(),
                        pair.a.dims(),
                        pair.b.dims()
                    ),
                });
            }
            pair.a.set(&a.to_device(&self.device)?)?;
            pair.b.set(&b.to_device(&self.device)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "model_tests.rs"]
mod tests;
