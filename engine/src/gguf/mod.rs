//! GGUF files as base models: llama.cpp's single-file format, often quantized.
//!
//! The engine trains f32 LoRA on plain f32 base weights, so a GGUF model is dequantized on load (every
//! type candle reads: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q8_K) and its tensors
//! renamed to the HF names `Llama` uses. llama.cpp's converter reorders the rows of Q and K for ggml's
//! interleaved RoPE; that is undone here so the HF (rotate_half) RoPE gives the original model's
//! results. The config comes from the `<arch>.*` metadata and the tokenizer from `tokenizer.ggml.*`
//! (see `tokenizer`).
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod fixture;
mod header;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests_meta;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests_train;
pub mod tokenizer;

pub use header::{dtype_name, ggml_type_name, read_content, Meta};

use super::config::{ModelConfig, RopeParams};
use super::error::EngineError;
use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use lorad_kernels::frozen::Frozen;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `general.architecture` values whose forward pass is ours. llama.cpp converts Llama, Mistral and
/// SmolLM to `llama` (with the Q/K row permutation); `qwen2` keeps HF's row order and has q/k/v biases.
pub const SUPPORTED_ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

/// Per-layer tensors: GGUF name (after `blk.N.`), HF name (after `model.layers.N.`).
pub const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The HF name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`),
/// or `None` for a tensor the model does not use.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == module)?;
    matches!(kind, "weight" | "bias").then(|| format!("model.layers.{layer}.{hf}.{kind}"))
}

/// llama.cpp's `LlamaModel.permute` (`undo` false) and its inverse (`undo` true, transformers'
/// `reverse_permute_weights`) on the rows of a Q or K weight `[heads * d, in]` or bias `[heads * d]`:
/// within each head, HF keeps the two RoPE halves apart (rows `0..d/2`, `d/2..d`) while ggml wants the
/// pairs interleaved (rows `0, d/2, 1, d/2 + 1, ...`).
pub fn permute_qk(t: &Tensor, heads: usize, undo: bool) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        candle_core::bail!("{rows} rows do not split into {heads} heads of even width");
    }
    let rest: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    let (a, b) = if undo { (half, 2) } else { (2, half) };
    t.reshape((heads, a, b, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// One tensor the model needs: where it is in the file, what it is called in HF layout, its shape, and
/// whether its rows must be un-permuted (the head count to do it with).
struct Planned {
    gguf: String,
    hf: String,
    dims: Vec<usize>,
    required: bool,
    unpermute_heads: Option<usize>,
}

/// A GGUF base model whose header has been read and checked; tensor data is read by `load_tensors`.
pub struct GgufModel {
    path: PathBuf,
    content: Content,
    config: ModelConfig,
}

impl GgufModel {
    /// Reads the header of `path` (metadata and tensor directory, no tensor data), derives the config
    /// and checks that every tensor the model needs is there with the right shape. Cheap: this is what
    /// the daemon runs at submit.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let content = read_content(path)?;
        let config = config_from_metadata(
            &Meta {
                map: &content.metadata,
                path,
            },
            &content.tensor_infos,
        )?;
        let model = GgufModel {
            path: path.to_path_buf(),
            content,
            config,
        };
        model.plan()?;
        tokenizer::check(&model.meta(), model.config.vocab_size)?;
        model.check_complete()?;
        Ok(model)
    }

    /// The file holds every byte its tensors are declared to occupy (a truncated download or copy is
    /// refused here, at submit, not when the worker reaches the missing tensor).
    fn check_complete(&self) -> Result<(), EngineError> {
        let len = std::fs::metadata(&self.path)
            .map_err(|e| EngineError::io(&self.path, e))?
            .len();
        for (name, info) in &self.content.tensor_infos {
            let block = info.ggml_dtype.block_size() as u64;
            let bytes = (info.shape.elem_count() as u64).div_ceil(block.max(1))
                * info.ggml_dtype.type_size() as u64;
            let to = self.content.tensor_data_offset + info.offset + bytes;
            if to > len {
                return Err(EngineError::model(
                    &self.path,
                    format!("truncated: tensor {name} ends at byte {to}, the file has {len}"),
                ));
            }
        }
        Ok(())
    }

    /// The configuration derived from the metadata.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata, with typed accessors.
    pub fn meta(&self) -> Meta<'_> {
        Meta {
            map: &self.content.metadata,
            path: &self.path,
        }
    }

    /// The GGUF tensors the model uses, checked against the config.
    fn plan(&self) -> Result<Vec<Planned>, EngineError> {
        let cfg = &self.config;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let llama = cfg.model_type.as_deref() == Some("llama");
        let mut plan = vec![
            planned("token_embd.weight", vec![v, h], true, None),
            planned("output_norm.weight", vec![h], true, None),
            planned("output.weight", vec![v, h], false, None),
        ];
        for i in 0..cfg.num_hidden_layers {
            for (g, hf) in LAYER_NAMES {
                let module = hf.rsplit('.').next().unwrap_or(hf);
                let Some((din, dout)) = cfg.module_dims(module) else {
                    plan.push(planned(&format!("blk.{i}.{g}.weight"), vec![h], true, None));
                    continue;
                };
                let heads = match (llama, g) {
                    (true, "attn_q") => Some(cfg.num_attention_heads),
                    (true, "attn_k") => Some(cfg.kv_heads()),
                    _ => None,
                };
                plan.push(planned(
                    &format!("blk.{i}.{g}.weight"),
                    vec![dout, din],
                    true,
                    heads,
                ));
                plan.push(planned(
                    &format!("blk.{i}.{g}.bias"),
                    vec![dout],
                    false,
                    heads,
                ));
            }
        }
        for p in &plan {
            match self.content.tensor_infos.get(&p.gguf) {
                None if p.required => {
                    return Err(EngineError::model(
                        &self.path,
                        format!("GGUF tensor {} is missing", p.gguf),
                    ))
                }
                Some(info) if info.shape.dims() != p.dims.as_slice() => {
                    return Err(EngineError::model(
                        &self.path,
                        format!(
                            "GGUF tensor {} has shape {:?}, the metadata implies {:?}",
                            p.gguf,
                            info.shape.dims(),
                            p.dims
                        ),
                    ))
                }
                _ => {}
            }
        }
        Ok(plan)
    }

    /// Reads, dequantizes to f32 and renames every tensor the model uses, onto `device`.
    pub fn load_tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>, EngineError> {
        let file = std::fs::File::open(&self.path).map_err(|e| EngineError::io(&self.path, e))?;
        let mut reader = std::io::BufReader::new(file);
        let mut out = HashMap::new();
        for p in self.plan()? {
            let Some(info) = self.content.tensor_infos.get(&p.gguf) else {
                continue;
            };
            let t = self
                .read_f32(&mut reader, info)
                .and_then(|t| match p.unpermute_heads {
                    Some(heads) => permute_qk(&t, heads, true),
                    None => Ok(t),
                })
                .and_then(|t| t.to_device(device))
                .map_err(|e| {
                    EngineError::model(
                        &self.path,
                        format!(
                            "GGUF tensor {} ({}): {e}",
                            p.gguf,
                            dtype_name(info.ggml_dtype)
                        ),
                    )
                })?;
            out.insert(p.hf, t);
        }
        Ok(out)
    }

    /// Like [`GgufModel::load_tensors`], but the quantized matrices stay quantized ([`Frozen::Quantized`],
    /// Q and K rows reordered as blocks); everything else (norms, biases, F32/F16/BF16 tensors) is
    /// f32. Quantized blocks live on the CPU: for another device, use `load_tensors`.
    pub fn load_frozen(&self) -> Result<HashMap<String, Frozen>, EngineError> {
        let file = std::fs::File::open(&self.path).map_err(|e| EngineError::io(&self.path, e))?;
        let mut reader = std::io::BufReader::new(file);
        let mut out = HashMap::new();
        for p in self.plan()? {
            let Some(info) = self.content.tensor_infos.get(&p.gguf) else {
                continue;
            };
            let name = |e: candle_core::Error| {
                EngineError::model(
                    &self.path,
                    format!(
                        "GGUF tensor {} ({}): {e}",
                        p.gguf,
                        dtype_name(info.ggml_dtype)
                    ),
                )
            };
            let q = info
                .read(&mut reader, self.content.tensor_data_offset, &Device::Cpu)
                .map_err(name)?;
            let keep = p.dims.len() == 2
                && !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            let frozen = if keep {
                let q = match p.unpermute_heads {
                    Some(heads) => {
                        let order = unpermute_order(p.dims[0], heads).map_err(name)?;
                        lorad_kernels::frozen::permute_rows(&q, &order).map_err(name)?
                    }
                    None => q,
                };
                Frozen::Quantized(std::sync::Arc::new(q))
            } else {
                let t = q
                    .dequantize(&Device::Cpu)
                    .and_then(|t| match p.unpermute_heads {
                        Some(heads) => permute_qk(&t, heads, true),
                        None => Ok(t),
                    })
                    .map_err(name)?;
                Frozen::Dense(t)
            };
            out.insert(p.hf, frozen);
        }
        Ok(out)
    }

    fn read_f32(
        &self,
        reader: &mut std::io::BufReader<std::fs::File>,
        info: &TensorInfo,
    ) -> candle_core::Result<Tensor> {
        info.read(reader, self.content.tensor_data_offset, &Device::Cpu)?
            .dequantize(&Device::Cpu)
    }
}

/// The source row of each row after `permute_qk(.., heads, true)` on a matrix of `rows` rows.
fn unpermute_order(rows: usize, heads: usize) -> candle_core::Result<Vec<usize>> {
    let idx: Vec<u32> = (0..rows as u32).collect();
    let idx = Tensor::from_vec(idx, (rows, 1), &Device::Cpu)?;
    let moved = permute_qk(&idx, heads, true)?;
    Ok(moved
        .flatten_all()?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|i| i as usize)
        .collect())
}

fn planned(gguf: &str, dims: Vec<usize>, required: bool, heads: Option<usize>) -> Planned {
    Planned {
        gguf: gguf.to_string(),
        hf: hf_name(gguf).unwrap_or_else(|| gguf.to_string()),
        dims,
        required,
        unpermute_heads: heads,
    }
}

/// Whether `path` is a GGUF file: a regular file starting with the magic `GGUF`.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// The HF-style config of a GGUF model, from `<arch>.*` metadata and the tensor directory; errors name
/// the metadata field or tensor at fault.
fn config_from_metadata(
    meta: &Meta,
    tensors: &HashMap<String, TensorInfo>,
) -> Result<ModelConfig, EngineError> {
    let arch = meta.str("general.architecture")?.to_string();
    if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(meta.error(
            "general.architecture",
            format!(
                "is \"{arch}\", not supported (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            ),
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let heads = meta.usize(&key("attention.head_count"))?;
    let head_dim = meta.opt_usize(&key("attention.key_length"))?;
    if let Some(vlen) = meta.opt_usize(&key("attention.value_length"))? {
        if Some(vlen) != head_dim && head_dim.is_some() {
            return Err(meta.error(
                &key("attention.value_length"),
                format!("{vlen} differs from attention.key_length (not supported)"),
            ));
        }
    }
    if meta.opt_usize(&key("expert_count"))?.unwrap_or(0) > 0 {
        return Err(meta.error(
            &key("expert_count"),
            "is set: mixture-of-experts models are not supported",
        ));
    }
    if tensors.contains_key("rope_freqs.weight") {
        return Err(EngineError::model(
            meta.path,
            "GGUF tensor rope_freqs.weight (llama3 RoPE scaling factors) is not supported yet",
        ));
    }
    let rope_scaling = match meta.opt_str(&key("rope.scaling.type"))? {
        None | Some("none") => None,
        Some("linear") => Some(RopeParams {
            rope_type: Some("linear".into()),
            factor: Some(
                meta.opt_f64(&key("rope.scaling.factor"))?
                    .ok_or_else(|| meta.error(&key("rope.scaling.factor"), "is missing"))?,
            ),
            ..RopeParams::default()
        }),
        Some(other) => {
            return Err(meta.error(
                &key("rope.scaling.type"),
                format!("is \"{other}\", not supported (supported: none, linear)"),
            ))
        }
    };
    let Some(embed) = tensors.get("token_embd.weight") else {
        return Err(EngineError::model(
            meta.path,
            "GGUF tensor token_embd.weight is missing",
        ));
    };
    let vocab_size = embed.shape.dims().first().copied().unwrap_or(0);
    let cfg = ModelConfig {
        architectures: vec![match arch.as_str() {
            "qwen2" => "Qwen2ForCausalLM".into(),
            _ => "LlamaForCausalLM".into(),
        }],
        model_type: Some(arch.clone()),
        hidden_size: meta.usize(&key("embedding_length"))?,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        num_hidden_layers: meta.usize(&key("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: Some(
            meta.opt_usize(&key("attention.head_count_kv"))?
                .unwrap_or(heads),
        ),
        head_dim,
        rms_norm_eps: meta
            .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| meta.error(&key("attention.layer_norm_rms_epsilon"), "is missing"))?,
        rope_theta: Some(meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0)),
        rope_scaling,
        rope_parameters: None,
        max_position_embeddings: meta.usize(&key("context_length"))?,
        vocab_size,
        tie_word_embeddings: !tensors.contains_key("output.weight"),
        bos_token_id: meta.opt_id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: meta.opt_id("tokenizer.ggml.eos_token_id")?,
        hidden_act: Some("silu".into()),
        sliding_window: None,
        use_sliding_window: None,
    };
    cfg.validate()
        .map_err(|d| EngineError::model(meta.path, format!("config from GGUF metadata: {d}")))?;
    if let Some(rot) = meta.opt_usize(&key("rope.dimension_count"))? {
        if rot != cfg.head_dim() {
            return Err(meta.error(
                &key("rope.dimension_count"),
                format!(
                    "is {rot}, not the head width {} (partial RoPE is not supported)",
                    cfg.head_dim()
                ),
            ));
        }
    }
    Ok(cfg)
}
