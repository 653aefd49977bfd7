//! A GGUF file written from the tiny HF model the way llama.cpp's converter writes one (names, Q/K row
//! permutation, tokenizer metadata), with knobs to break it, for the GGUF tests.
use super::*;
use crate::lora::LoraConfig;
use crate::model::Llama;
use crate::tiny::{self, make_tiny_model};
use crate::weights::load_weights;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::DType;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// How to write the test file.
pub struct Fixture {
    /// Type of the 2-D weights (norms are always F32).
    pub matrices: GgmlDType,
    /// Type of the embedding (which is also the tied LM head).
    pub embedding: GgmlDType,
    /// `general.architecture` and the prefix of the model's metadata keys.
    pub arch: &'static str,
    /// Apply llama.cpp's Q/K permutation (the converter does for `llama`, not for `qwen2`).
    pub permute: bool,
    /// Metadata to change (`Some`) or drop (`None`).
    pub meta: Vec<(&'static str, Option<gguf_file::Value>)>,
    /// Tensors to leave out.
    pub drop: Vec<&'static str>,
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture {
            matrices: GgmlDType::F32,
            embedding: GgmlDType::F32,
            arch: "llama",
            permute: true,
            meta: vec![],
            drop: vec![],
        }
    }
}

/// The GGUF name of an HF tensor name: the inverse of `hf_name`.
pub fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, kind) = rest.rsplit_once('.').unwrap();
    let (g, _) = LAYER_NAMES.iter().find(|(_, h)| *h == module).unwrap();
    format!("blk.{layer}.{g}.{kind}")
}

/// The tiny model's tokenizer as llama.cpp's `gpt2` tokenizer metadata.
pub fn tokenizer_meta(dir: &Path) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let merges: Vec<V> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => V::String(s.clone()),
            pair => V::String(format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            )),
        })
        .collect();
    let types = (0..tokens.len())
        .map(|i| V::I32(if i < tiny::SPECIAL_TOKENS.len() { 3 } else { 1 }))
        .collect();
    let template: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    vec![
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), V::Array(types)),
        ("tokenizer.ggml.merges".into(), V::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(0)),
        ("tokenizer.ggml.padding_token_id".into(), V::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            V::String(template["chat_template"].as_str().unwrap().into()),
        ),
    ]
}

/// Writes the tiny model in `dir` as a GGUF file at `out`, as llama.cpp's converter would.
pub fn write_gguf(dir: &Path, out: &Path, fx: &Fixture) {
    use gguf_file::Value as V;
    let tensors = load_weights(dir, &Device::Cpu, DType::F32).unwrap();
    let arch = fx.arch;
    let model_meta: [(&str, V); 9] = [
        ("embedding_length", V::U32(tiny::HIDDEN as u32)),
        ("block_count", V::U32(tiny::LAYERS as u32)),
        ("feed_forward_length", V::U32(tiny::INTERMEDIATE as u32)),
        ("attention.head_count", V::U32(tiny::HEADS as u32)),
        ("attention.head_count_kv", V::U32(tiny::KV_HEADS as u32)),
        ("attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("rope.freq_base", V::F32(10000.0)),
        (
            "rope.dimension_count",
            V::U32((tiny::HIDDEN / tiny::HEADS) as u32),
        ),
        ("context_length", V::U32(tiny::MAX_POS as u32)),
    ];
    let mut meta: Vec<(String, V)> = vec![("general.architecture".into(), V::String(arch.into()))];
    meta.extend(
        model_meta
            .into_iter()
            .map(|(k, v)| (format!("{arch}.{k}"), v)),
    );
    meta.extend(tokenizer_meta(dir));
    for (key, value) in &fx.meta {
        meta.retain(|(k, _)| k != key);
        if let Some(v) = value {
            meta.push((key.to_string(), v.clone()));
        }
    }
    let mut qtensors = BTreeMap::new();
    for (hf, t) in &tensors {
        let name = gguf_name(hf);
        assert_eq!(
            hf_name(&name).as_deref(),
            Some(hf.as_str()),
            "name mapping round trip"
        );
        if fx.drop.contains(&name.as_str()) {
            continue;
        }
        let heads = match name.rsplit('.').nth(1) {
            Some("attn_q") => Some(tiny::HEADS),
            Some("attn_k") => Some(tiny::KV_HEADS),
            _ => None,
        };
        let t = match heads {
            Some(h) if fx.permute => permute_qk(t, h, false).unwrap(),
            _ => t.clone(),
        };
        let dtype = match (t.rank(), name.as_str()) {
            (1, _) => GgmlDType::F32,
            (_, "token_embd.weight") => fx.embedding,
            _ => fx.matrices,
        };
        // Rows must be whole blocks: like llama.cpp, a matrix whose rows are not (the tiny model's
        // down_proj, 384 wide, under a 256-value K-quant) falls back to Q8_0.
        let cols = t.dims().last().copied().unwrap_or(0);
        let dtype = if cols % dtype.block_size() == 0 {
            dtype
        } else {
            GgmlDType::Q8_0
        };
        qtensors.insert(name, QTensor::quantize(&t, dtype).unwrap());
    }
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

pub fn tiny_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    make_tiny_model(&dir.path().join("hf"), 3).unwrap();
    dir
}

pub fn load(path: &Path) -> Llama {
    let lora = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec!["q_proj".into()],
        use_rslora: false,
    };
    Llama::load(
        path,
        &lora,
        &mut ChaCha8Rng::seed_from_u64(1),
        32,
        &Device::Cpu,
    )
    .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}
