//! The base model's `config.json` (HF layout) and the cheap validation the daemon runs at submit.
use super::error::EngineError;
use super::weights;
use serde::Deserialize;
use std::path::Path;

/// `model_type`s whose forward pass is the Llama one (RMSNorm, RoPE, GQA attention, SwiGLU MLP).
/// Qwen2's q/k/v biases are loaded when the checkpoint has them.
pub const SUPPORTED_MODEL_TYPES: [&str; 3] = ["llama", "mistral", "qwen2"];
/// `architectures` entries accepted, matching the model types above.
pub const SUPPORTED_ARCHITECTURES: [&str; 3] =
    ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// RoPE parameters: `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RopeParams {
    /// `default`, `linear` or `llama3` (older configs spell it `type`).
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    /// transformers 5 keeps the base here.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Scaling factor (`linear`, `llama3`).
    #[serde(default)]
    pub factor: Option<f64>,
    /// `llama3` only.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// `llama3` only.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// `llama3` only.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// The fields of an HF `config.json` that the Llama-family forward pass needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelConfig {
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// e.g. `llama`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4 spelling).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4).
    #[serde(default)]
    pub rope_scaling: Option<RopeParams>,
    /// RoPE base and scaling (transformers 5).
    #[serde(default)]
    pub rope_parameters: Option<RopeParams>,
    /// Longest context the model was trained for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Rows of the embedding matrix.
    pub vocab_size: usize,
    /// The LM head is the embedding matrix (when `lm_head.weight` is absent).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token (some configs give a list; the first is used).
    #[serde(default, deserialize_with = "first_id")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token (some configs give a list; the first is used).
    #[serde(default, deserialize_with = "first_id")]
    pub eos_token_id: Option<u32>,
    /// Activation of the MLP; only `silu` is supported.
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Sliding-window attention span (Mistral, Qwen2), when enabled.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2 turns the window off with this flag.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
}

fn default_eps() -> f64 {
    1e-6
}

fn default_max_pos() -> usize {
    2048
}

fn first_id<'de, De: serde::Deserializer<'de>>(d: De) -> Result<Option<u32>, De::Error> {
    let v = serde_json::Value::deserialize(d)?;
    let first = match &v {
        serde_json::Value::Array(items) => {
            items.first().cloned().unwrap_or(serde_json::Value::Null)
        }
        other => other.clone(),
    };
    match first {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Number(n) => match n.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(id) => Ok(Some(id)),
            None => Err(serde::de::Error::custom(format!(
                "token id {n} is not a u32"
            ))),
        },
        other => Err(serde::de::Error::custom(format!(
            "token id must be an integer, got {other}"
        ))),
    }
}

impl ModelConfig {
    /// Reads and checks `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        let cfg: ModelConfig = serde_json::from_str(&text)
            .map_err(|e| EngineError::model(&path, format!("cannot parse: {e}")))?;
        cfg.validate()
            .map_err(|detail| EngineError::model(&path, detail))?;
        Ok(cfg)
    }

    /// Checks that the forward pass supports this configuration; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.model_type {
            if !SUPPORTED_MODEL_TYPES.contains(&t.as_str()) {
                return Err(format!(
                    "model_type \"{t}\" is not supported (supported: {})",
                    SUPPORTED_MODEL_TYPES.join(", ")
                ));
            }
        }
        if let Some(a) = self
            .architectures
            .iter()
            .find(|a| !SUPPORTED_ARCHITECTURES.contains(&a.as_str()))
        {
            return Err(format!(
                "architectures entry \"{a}\" is not supported (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            ));
        }
        if self.model_type.is_none() && self.architectures.is_empty() {
            return Err("neither model_type nor architectures is given".into());
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!("hidden_act \"{act}\" is not supported (only silu)"));
            }
        }
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("num_key_value_heads", self.kv_heads()),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{field} must be at least 1"));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return Err(format!(
                "head_dim {} must be even and positive (RoPE rotates pairs)",
                self.head_dim()
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        let rope = self.rope();
        match rope.rope_type.as_deref().unwrap_or("default") {
            "default" => {}
            "linear" if rope.factor.is_some() => {}
            "llama3"
                if rope.factor.is_some()
                    && rope.low_freq_factor.is_some()
                    && rope.high_freq_factor.is_some()
                    && rope.original_max_position_embeddings.is_some() => {}
            other => {
                return Err(format!(
                    "rope_scaling.rope_type \"{other}\" is not supported or lacks its parameters \
                     (supported: default, linear with factor, llama3 with its four parameters)"
                ))
            }
        }
        Ok(())
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The RoPE parameters from whichever spelling the config uses, with the base resolved.
    pub fn rope(&self) -> RopeParams {
        let mut p = self
            .rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default();
        p.rope_theta = p.rope_theta.or(self.rope_theta).or(Some(10_000.0));
        p
    }

    /// The attention window, when sliding-window attention is on.
    pub fn window(&self) -> Option<usize> {
        match self.use_sliding_window {
            Some(false) => None,
            _ => self.sliding_window,
        }
    }

    /// (input, output) width of a target module.
    pub fn module_dims(&self, module: &str) -> Option<(usize, usize)> {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim());
        Some(match module {
            "q_proj" => (h, self.num_attention_heads * d),
            "k_proj" | "v_proj" => (h, self.kv_heads() * d),
            "o_proj" => (self.num_attention_heads * d, h),
            "gate_proj" | "up_proj" => (h, i),
            "down_proj" => (i, h),
            _ => return None,
        })
    }
}

/// Cheap validation of a base model directory, used by the daemon at submit: config.json parses and is
/// supported, weights and tokenizer.json exist. Loads no tensor.
pub fn check_model_dir(dir: &Path) -> Result<ModelConfig, EngineError> {
    if !dir.is_dir() {
        return Err(EngineError::model(
            dir,
            "not a directory (expected an HF model directory)",
        ));
    }
    let cfg = ModelConfig::load(dir)?;
    let files = weights::weight_files(dir)?;
    let tok = dir.join("tokenizer.json");
    if !tok.is_file() {
        return Err(EngineError::model(dir, "tokenizer.json does not exist"));
    }
    for file in &files {
        weights::check_complete(file)?;
    }
    Ok(cfg)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig, String> {
        let cfg: ModelConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 100"#;

    #[test]
    fn reads_both_rope_spellings_and_lists_of_ids() {
        let old = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_theta": 500000.0}}"#
        ))
        .unwrap();
        assert_eq!(old.rope().rope_theta, Some(500000.0));
        assert_eq!(old.kv_heads(), 4);
        assert_eq!(old.head_dim(), 16);
        let new = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_parameters": {{"rope_type": "default", "rope_theta": 1e5}},
               "eos_token_id": [7, 8], "bos_token_id": null}}"#
        ))
        .unwrap();
        assert_eq!(new.rope().rope_theta, Some(1e5));
        assert_eq!(new.eos_token_id, Some(7));
        assert_eq!(new.bos_token_id, None);
    }

    #[test]
    fn rejects_unsupported_with_field_name() {
        let e = parse(&format!(r#"{{"model_type": "gpt2", {BASE}}}"#)).unwrap_err();
        assert!(e.contains("model_type \"gpt2\""), "{e}");
        let e = parse(&format!(r#"{{"architectures": ["BertModel"], {BASE}}}"#)).unwrap_err();
        assert!(e.contains("architectures entry \"BertModel\""), "{e}");
        let e = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "hidden_act": "gelu"}}"#
        ))
        .unwrap_err();
        assert!(e.contains("hidden_act"), "{e}");
        let e = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "num_key_value_heads": 3}}"#
        ))
        .unwrap_err();
        assert!(e.contains("num_key_value_heads 3"), "{e}");
        let e = parse(r#"{"model_type": "llama", "hidden_size": 64}"#).unwrap_err();
        assert!(e.contains("intermediate_size"), "{e}");
    }

    #[test]
    fn check_model_dir_names_missing_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_model_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
        std::fs::write(
            dir.path().join("config.json"),
            format!(r#"{{"model_type": "llama", {BASE}}}"#),
        )
        .unwrap();
        let e = check_model_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no weights"), "{e}");
        std::fs::write(dir.path().join("model.safetensors"), b"").unwrap();
        let e = check_model_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }
}
