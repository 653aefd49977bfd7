//! The golden check's inputs and outputs, shared by tests/golden.rs and the bench example that
//! regenerates the reference (`bench/export_check.sh --update-golden`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::{lorad_logits, tiny_model, write_seeded_adapter, AdapterRecipe};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// tests/golden/recipe.json.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Recipe {
    pub model_seed: u64,
    pub tokens: Vec<u32>,
    pub vocab_stride: usize,
    pub adapters: BTreeMap<String, AdapterRecipe>,
}

/// tests/golden/reference.json: logits `[token][vocab_ids]` by adapter name.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reference {
    /// The recipe the reference was computed from (must equal recipe.json).
    pub recipe: Recipe,
    /// Which vocabulary columns are kept.
    pub vocab_ids: Vec<u32>,
    /// `PeftModel.from_pretrained(base, adapter)` logits.
    pub peft: BTreeMap<String, Vec<Vec<f32>>>,
    /// `AutoModelForCausalLM.from_pretrained(merged)` logits, `merged` written by the exporter.
    pub merged: BTreeMap<String, Vec<Vec<f32>>>,
    /// Versions of the tools that produced it.
    pub generated_by: String,
}

pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

pub fn read_recipe() -> Recipe {
    let path = golden_dir().join("recipe.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The columns `0, stride, 2 * stride, ...` of `[t, vocab]` logits.
pub fn select(logits: &Tensor, stride: usize) -> Tensor {
    let vocab = logits.dim(1).unwrap();
    let ids: Vec<u32> = (0..vocab as u32).step_by(stride).collect();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
    logits.index_select(&ids, 1).unwrap()
}

/// The inputs of the check in `dir`: `model/` and, per adapter, `<name>/adapter`. Returns the model.
pub fn setup(dir: &Path, recipe: &Recipe) -> PathBuf {
    let model = tiny_model(&dir.join("model"), recipe.model_seed);
    for (name, adapter) in &recipe.adapters {
        write_seeded_adapter(&model, &dir.join(name).join("adapter"), adapter);
    }
    model
}

/// lorad's logits of the adapter `name` through the LoRA forward, selected columns.
pub fn lorad_lora(dir: &Path, recipe: &Recipe, name: &str) -> Tensor {
    let adapter = dir.join(name).join("adapter");
    let full = lorad_logits(&dir.join("model"), Some(&adapter), &recipe.tokens);
    select(&full, recipe.vocab_stride)
}
