//! Where a base model comes from: an HF directory or a GGUF file, behind one interface.
//!
//! The rest of the engine sees only what a model is made of (config, HF-named f32 tensors, tokenizer,
//! chat template, special ids), so training, generation and the daemon's submit check are the same code
//! for both. `open` is cheap (config and headers, no tensor data): the daemon runs it at submit; the
//! worker then asks for the tokenizer and, separately, the tensors, so a bad dataset fails before the
//! weights are read.
use super::config::{check_model_dir, ModelConfig};
use super::error::EngineError;
use super::gguf::{self, GgufModel};
use super::weights;
use candle_core::{DType, Device, Tensor};
use lorad_kernels::frozen::Frozen;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Special token ids and whether the tokenizer's owner wants BOS prepended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence (of a turn, for chat models).
    pub eos: Option<u32>,
    /// Padding.
    pub pad: Option<u32>,
    /// `add_bos_token` from tokenizer_config.json or `tokenizer.ggml.add_bos_token`; `None` when the
    /// model does not say.
    pub add_bos: Option<bool>,
}

/// A model's tokenizer and what goes with it.
#[derive(Debug, Clone)]
pub struct TokenizerAssets {
    /// The tokenizer, special tokens registered.
    pub tokenizer: Tokenizer,
    /// The Jinja chat template, for chat datasets and generation.
    pub chat_template: Option<String>,
    /// Special token ids.
    pub special: SpecialTokens,
    /// Where it came from (tokenizer.json or the GGUF file), for messages.
    pub path: PathBuf,
}

/// Everything a loaded model is made of.
#[derive(Debug)]
pub struct ModelAssets {
    /// The configuration (from config.json or GGUF metadata).
    pub config: ModelConfig,
    /// Base weights by HF name, f32, plain tensors (frozen by construction).
    pub tensors: HashMap<String, Tensor>,
    /// The tokenizer and its companions.
    pub tokenizer: TokenizerAssets,
}

/// A base model, opened and checked but not loaded.
pub enum ModelSource {
    /// An HF directory: config.json, safetensors (single or sharded), tokenizer.json.
    HfDir {
        /// The directory.
        dir: PathBuf,
        /// Its config.json.
        config: ModelConfig,
    },
    /// A GGUF file.
    Gguf(GgufModel),
}

impl ModelSource {
    /// Opens `path`: a GGUF file (by its magic) or an HF model directory. Reads configs and headers
    /// only; errors name the file and the field or tensor at fault.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        if gguf::is_gguf(path) {
            return Ok(ModelSource::Gguf(GgufModel::open(path)?));
        }
        if !path.exists() {
            return Err(EngineError::model(
                path,
                "does not exist (expected an HF model directory or a GGUF file)",
            ));
        }
        if path.is_file() {
            return Err(EngineError::model(
                path,
                "not a GGUF file (no GGUF magic) and not an HF model directory",
            ));
        }
        let config = check_model_dir(path)?;
        Ok(ModelSource::HfDir {
            dir: path.to_path_buf(),
            config,
        })
    }

    /// The model's path as given.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::HfDir { dir, .. } => dir,
            ModelSource::Gguf(g) => g.path(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        match self {
            ModelSource::HfDir { config, .. } => config,
            ModelSource::Gguf(g) => g.config(),
        }
    }

    /// The tokenizer: tokenizer.json (+ tokenizer_config.json) or the GGUF metadata.
    pub fn tokenizer(&self) -> Result<TokenizerAssets, EngineError> {
        match self {
            ModelSource::HfDir { dir, config } => hf_tokenizer(dir, config),
            ModelSource::Gguf(g) => gguf::tokenizer::build(&g.meta(), g.config().vocab_size),
        }
    }

    /// Every base tensor by HF name, f32, on `device` (GGUF tensors dequantized).
    pub fn tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>, EngineError> {
        match self {
            ModelSource::HfDir { dir, .. } => weights::load_weights(dir, device, DType::F32),
            ModelSource::Gguf(g) => g.load_tensors(device),
        }
    }

    /// Every base tensor by HF name as training holds it: with `BaseWeights::Stored`, matrices in
    /// their stored form (bf16/f16, GGUF blocks on the CPU) and everything else f32; with
    /// `BaseWeights::F32`, all f32 (as [`ModelSource::tensors`]).
    pub fn frozen_tensors(
        &self,
        device: &Device,
        base: lorad_schema::BaseWeights,
    ) -> Result<HashMap<String, Frozen>, EngineError> {
        let widen = |m: HashMap<String, Tensor>| {
            m.into_iter().map(|(k, t)| (k, Frozen::Dense(t))).collect()
        };
        match (self, base) {
            (_, lorad_schema::BaseWeights::F32) => Ok(widen(self.tensors(device)?)),
            (ModelSource::HfDir { dir, .. }, _) => weights::load_weights_stored(dir, device),
            // Quantized blocks are widened on the CPU; another device gets f32 at load.
            (ModelSource::Gguf(g), _) if device.is_cpu() => g.load_frozen(),
            (ModelSource::Gguf(g), _) => Ok(widen(g.load_tensors(device)?)),
        }
    }

    /// Config, tensors and tokenizer together.
    pub fn load(&self, device: &Device) -> Result<ModelAssets, EngineError> {
        Ok(ModelAssets {
            config: self.config().clone(),
            tokenizer: self.tokenizer()?,
            tensors: self.tensors(device)?,
        })
    }
}

/// Cheap validation of a base model (HF directory or GGUF file), used by the daemon at submit: the
/// config is supported, the weights (for GGUF: every tensor the model needs, by header) and the
/// tokenizer are there. Reads no tensor data.
pub fn check_model(path: &Path) -> Result<ModelConfig, EngineError> {
    ModelSource::open(path).map(|s| s.config().clone())
}

/// tokenizer.json, with the chat template and `add_bos_token` from tokenizer_config.json (or the
/// chat_template.jinja file newer transformers write) and BOS/EOS from config.json.
fn hf_tokenizer(dir: &Path, config: &ModelConfig) -> Result<TokenizerAssets, EngineError> {
    let path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&path).map_err(|e| EngineError::Tokenizer {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc: serde_json::Value = match std::fs::read_to_string(&tc_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| EngineError::Tokenizer {
            path: tc_path.clone(),
            detail: format!("not valid JSON: {e}"),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
        Err(e) => return Err(EngineError::io(&tc_path, e)),
    };
    let template = match tc.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        // Older configs list named templates; "default" is the one transformers applies.
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| named.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    };
    let jinja = dir.join("chat_template.jinja");
    let chat_template = match template {
        Some(t) => Some(t),
        None if jinja.is_file() => {
            Some(std::fs::read_to_string(&jinja).map_err(|e| EngineError::io(&jinja, e))?)
        }
        None => None,
    };
    // pad_token may be a string or an AddedToken object.
    let pad = tc
        .get("pad_token")
        .and_then(|p| {
            p.as_str()
                .or_else(|| p.get("content").and_then(|c| c.as_str()))
        })
        .and_then(|p| tokenizer.token_to_id(p));
    Ok(TokenizerAssets {
        special: SpecialTokens {
            bos: config.bos_token_id,
            eos: config.eos_token_id,
            pad,
            add_bos: tc.get("add_bos_token").and_then(|b| b.as_bool()),
        },
        tokenizer,
        chat_template,
        path,
    })
}
