//! The non-weight files of the merged model, so that transformers' `AutoModelForCausalLM` and
//! `AutoTokenizer.from_pretrained(out)` (and lorad itself) load it: copied from an HF directory, or
//! written from what lorad read out of a GGUF file.
use crate::error::MergeError;
use lorad_engine::config::ModelConfig;
use lorad_engine::source::TokenizerAssets;
use serde_json::{json, Map, Value};
use std::path::Path;

/// Files copied from an HF base directory when present. config.json is handled apart (its dtype is
/// rewritten).
pub const COPIED: [&str; 7] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "added_tokens.json",
];

/// Copies config.json (dtype set to float32, the dtype of the merged weights, so transformers does
/// not load them in the base's half precision) and the tokenizer files of the HF directory `base`
/// into `out`. Returns the file names written.
pub fn copy_from_hf_dir(base: &Path, out: &Path) -> Result<Vec<String>, MergeError> {
    let src = base.join("config.json");
    let text = std::fs::read_to_string(&src).map_err(|e| MergeError::io(&src, e))?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| MergeError::Base {
        path: src.clone(),
        detail: format!("not valid JSON: {e}"),
    })?;
    if let Some(obj) = config.as_object_mut() {
        obj.insert("torch_dtype".into(), json!("float32"));
        obj.insert("dtype".into(), json!("float32"));
    }
    write_json(&out.join("config.json"), &config)?;
    let mut written = vec!["config.json".to_owned()];
    for name in COPIED {
        let from = base.join(name);
        if from.is_file() {
            let to = out.join(name);
            std::fs::copy(&from, &to).map_err(|e| MergeError::io(&from, e))?;
            written.push(name.to_owned());
        }
    }
    Ok(written)
}

/// Writes config.json, generation_config.json, tokenizer.json, tokenizer_config.json and
/// special_tokens_map.json for a model lorad read from a GGUF file. `attention_bias`: the q/k/v
/// projections have biases (in `llama` models; Qwen2 always has them).
pub fn write_for_gguf(
    cfg: &ModelConfig,
    tok: &TokenizerAssets,
    attention_bias: bool,
    out: &Path,
) -> Result<Vec<String>, MergeError> {
    let mut config = config_json(cfg, attention_bias);
    if let (Some(pad), Some(obj)) = (tok.special.pad, config.as_object_mut()) {
        obj.insert("pad_token_id".into(), json!(pad));
    }
    write_json(&out.join("config.json"), &config)?;

    let tokenizer_path = out.join("tokenizer.json");
    let text = tok
        .tokenizer
        .to_string(false)
        .map_err(|e| MergeError::Base {
            path: tok.path.clone(),
            detail: format!("cannot serialize the tokenizer: {e}"),
        })?;
    std::fs::write(&tokenizer_path, text).map_err(|e| MergeError::io(&tokenizer_path, e))?;

    let token = |id: Option<u32>| id.and_then(|i| tok.tokenizer.id_to_token(i));
    let mut special = Map::new();
    for (key, id) in [
        ("bos_token", tok.special.bos),
        ("eos_token", tok.special.eos),
        ("pad_token", tok.special.pad),
    ] {
        if let Some(t) = token(id) {
            special.insert(key.into(), Value::String(t));
        }
    }
    let mut tc = special.clone();
    tc.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    tc.insert(
        "model_max_length".into(),
        json!(cfg.max_position_embeddings),
    );
    tc.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(add_bos) = tok.special.add_bos {
        tc.insert("add_bos_token".into(), json!(add_bos));
    }
    if let Some(template) = &tok.chat_template {
        tc.insert("chat_template".into(), json!(template));
    }
    write_json(&out.join("tokenizer_config.json"), &Value::Object(tc))?;
    write_json(
        &out.join("special_tokens_map.json"),
        &Value::Object(special),
    )?;

    let mut generation = Map::new();
    for (key, id) in [
        ("bos_token_id", tok.special.bos),
        ("eos_token_id", tok.special.eos),
        ("pad_token_id", tok.special.pad),
    ] {
        if let Some(id) = id {
            generation.insert(key.into(), json!(id));
        }
    }
    write_json(
        &out.join("generation_config.json"),
        &Value::Object(generation),
    )?;
    Ok([
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ]
    .map(str::to_owned)
    .to_vec())
}

/// An HF config.json for `cfg`, in both spellings transformers 4 and 5 read (`rope_theta` and
/// `rope_parameters`, `torch_dtype` and `dtype`).
pub fn config_json(cfg: &ModelConfig, attention_bias: bool) -> Value {
    let rope = cfg.rope();
    let theta = rope.rope_theta.unwrap_or(10_000.0);
    let mut rope_parameters = Map::new();
    rope_parameters.insert(
        "rope_type".into(),
        json!(rope.rope_type.as_deref().unwrap_or("default")),
    );
    rope_parameters.insert("rope_theta".into(), json!(theta));
    for (key, value) in [
        ("factor", rope.factor),
        ("low_freq_factor", rope.low_freq_factor),
        ("high_freq_factor", rope.high_freq_factor),
    ] {
        if let Some(v) = value {
            rope_parameters.insert(key.into(), json!(v));
        }
    }
    if let Some(n) = rope.original_max_position_embeddings {
        rope_parameters.insert("original_max_position_embeddings".into(), json!(n));
    }
    let scaled = rope.rope_type.as_deref().is_some_and(|t| t != "default");
    let model_type = cfg.model_type.clone().unwrap_or_else(|| "llama".into());
    let architectures = if cfg.architectures.is_empty() {
        vec!["LlamaForCausalLM".to_owned()]
    } else {
        cfg.architectures.clone()
    };
    let mut c = json!({
        "architectures": architectures,
        "model_type": model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads(),
        "head_dim": cfg.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": theta,
        "rope_scaling": if scaled { Value::Object(rope_parameters.clone()) } else { Value::Null },
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": true,
        "torch_dtype": "float32",
        "dtype": "float32",
    });
    if let Some(obj) = c.as_object_mut() {
        if model_type == "qwen2" {
            obj.insert("use_sliding_window".into(), json!(cfg.window().is_some()));
            obj.insert("sliding_window".into(), json!(cfg.sliding_window));
        } else {
            obj.insert("attention_bias".into(), json!(attention_bias));
            obj.insert("mlp_bias".into(), json!(false));
            obj.insert("pretraining_tp".into(), json!(1));
        }
    }
    c
}

fn write_json(path: &Path, value: &Value) -> Result<(), MergeError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default() + "\n";
    std::fs::write(path, text).map_err(|e| MergeError::io(path, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_through_lorads_reader() {
        let cfg: ModelConfig = serde_json::from_value(json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "max_position_embeddings": 256, "tie_word_embeddings": true,
            "bos_token_id": 1, "eos_token_id": 2,
        }))
        .unwrap();
        let json = config_json(&cfg, false);
        let back: ModelConfig = serde_json::from_value(json.clone()).unwrap();
        back.validate().unwrap();
        assert_eq!(back.rope().rope_theta, Some(100000.0));
        assert_eq!(
            (back.kv_heads(), back.head_dim(), back.tie_word_embeddings),
            (2, 16, true)
        );
        assert_eq!((back.bos_token_id, back.eos_token_id), (Some(1), Some(2)));
        assert_eq!(json["torch_dtype"], "float32");
        assert_eq!(json["rope_scaling"], Value::Null);
    }
}
