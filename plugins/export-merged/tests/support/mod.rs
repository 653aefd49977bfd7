//! Test support shared by the three exporters' tests and the bench example (`examples/export_check.rs`):
//! the tiny model, a seeded adapter written by lorad's own adapter writer, a short real training run
//! with lorad's engine, a GGUF copy of the tiny model written the way llama.cpp's converter does, the
//! export request the daemon would send, and logits through lorad's engine.
//!
//! The peft and zip crates include this file by path (`#[path = ...] mod support;`), so one copy
//! serves all three crates.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod golden;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use lorad_engine::adapter::{load_adapter, save_adapter};
use lorad_engine::gguf::{hf_name, permute_qk, LAYER_NAMES};
use lorad_engine::lora::LoraConfig;
use lorad_engine::model::Llama;
use lorad_engine::rng::rng_for;
use lorad_engine::train::train;
use lorad_engine::weights::load_weights;
use lorad_engine::{tiny, TrainEvent, TrainTask};
use lorad_plugin::ExportRequest;
use lorad_schema::{JobId, JobRecord, JobState, MetricPoint, Progress, TrainSettings};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Every module lorad can adapt.
pub const ALL_MODULES: [&str; 7] = lorad_schema::TARGET_MODULES;

/// Writes the tiny model (HF layout) to `dir` from `seed`; returns `dir`.
pub fn tiny_model(dir: &Path, seed: u64) -> PathBuf {
    tiny::make_tiny_model(dir, seed).unwrap();
    dir.to_path_buf()
}

/// SplitMix64: a seeded generator simple enough to state in a recipe.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-bound, bound)`, from the top 53 bits.
    pub fn uniform(&mut self, bound: f64) -> f32 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((2.0 * u - 1.0) * bound) as f32
    }
}

/// A deterministic adapter: A and B of every adapted module (in lorad's module order, A then B, row
/// major) drawn uniformly from `SplitMix(seed)`. Non-zero B, so the adapter visibly changes logits.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterRecipe {
    pub seed: u64,
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub targets: Vec<String>,
    pub a_bound: f64,
    pub b_bound: f64,
}

impl AdapterRecipe {
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: 0.0,
            targets: self.targets.clone(),
            use_rslora: self.use_rslora,
        }
    }
}

/// Writes the recipe's adapter for the model at `base` to `out`, through lorad's own adapter writer.
pub fn write_seeded_adapter(base: &Path, out: &Path, recipe: &AdapterRecipe) {
    let lora = recipe.lora();
    let model = Llama::load(base, &lora, &mut rng_for(0, 1), 8, &Device::Cpu).unwrap();
    let mut rng = SplitMix(recipe.seed);
    let mut draw = |dims: &[usize], bound: f64| {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.uniform(bound)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    };
    let mut weights = HashMap::new();
    for (module, pair) in model.lora_modules() {
        let a = draw(pair.a.dims(), recipe.a_bound);
        let b = draw(pair.b.dims(), recipe.b_bound);
        weights.insert(module, (a, b));
    }
    model.set_lora_weights(&weights, out).unwrap();
    save_adapter(out, &model, &lora, base).unwrap();
}

/// A finished training run of lorad's engine.
pub struct TrainedJob {
    pub job_dir: PathBuf,
    pub adapter_dir: PathBuf,
    pub dataset: PathBuf,
    pub settings: TrainSettings,
    pub metrics: Vec<MetricPoint>,
}

impl TrainedJob {
    /// The newest checkpoint directory (`checkpoints/step-N`).
    pub fn latest_checkpoint(&self) -> PathBuf {
        lorad_engine::checkpoint::latest_checkpoint(&self.job_dir).unwrap()
    }
}

/// Settings for a short run: every module adapted, r 4, no dropout, constant lr, checkpoints every
/// 2 steps.
pub fn short_settings(steps: u64, lr: f64) -> TrainSettings {
    let mut s = TrainSettings::default();
    for (k, v) in [
        ("lr", lr.to_string().as_str()),
        ("max_steps", steps.to_string().as_str()),
        ("target_modules", &ALL_MODULES.join(",")),
        ("batch_size", "4"),
        ("lora_r", "4"),
        ("lora_alpha", "8"),
        ("lora_dropout", "0"),
        ("warmup_steps", "0"),
        ("schedule", "constant"),
        ("max_seq_len", "64"),
        ("checkpoint_every", "2"),
        ("device", "cpu"),
    ] {
        s.set(k, v).unwrap();
    }
    s
}

/// Trains `base` for the settings' steps on lorad's demo dataset, in `root/job`.
pub fn train_job(root: &Path, base: &Path, settings: TrainSettings) -> TrainedJob {
    let dataset = root.join("data.jsonl");
    lorad_engine::tiny::write_dataset(&dataset, 64).unwrap();
    let job_dir = root.join("job");
    let task = TrainTask {
        job: JobId(1),
        base_model: base.to_path_buf(),
        dataset: dataset.clone(),
        adapter_dir: job_dir.join("adapter"),
        job_dir: job_dir.clone(),
        settings: settings.clone(),
        resume_from: None,
        pin_resume: false,
    };
    let mut metrics = Vec::new();
    train(&task, &mut |event| {
        if let TrainEvent::Step { point } = event {
            metrics.push(point);
        }
    })
    .unwrap();
    TrainedJob {
        job_dir,
        adapter_dir: task.adapter_dir,
        dataset,
        settings,
        metrics,
    }
}

/// The job record the daemon would keep for `job`.
pub fn job_record(job: &TrainedJob, base: &Path) -> JobRecord {
    let last = job.metrics.last();
    JobRecord {
        id: JobId(1),
        name: "export-test".into(),
        state: JobState::Completed,
        reason: None,
        owner_uid: 1000,
        priority: 0,
        template: "basic-fine-tune".into(),
        base_model: base.display().to_string(),
        dataset: job.dataset.display().to_string(),
        output_dir: job.adapter_dir.display().to_string(),
        settings: job.settings.clone(),
        overrides: BTreeMap::from([("max_steps".into(), job.metrics.len().to_string())]),
        progress: Progress {
            step: last.map_or(0, |p| p.step),
            total_steps: job.metrics.len() as u64,
            epoch: last.map_or(0.0, |p| p.epoch),
            loss: last.map(|p| p.loss),
            ..Progress::default()
        },
        created_at_ms: 1_700_000_000_000,
        started_at_ms: Some(1_700_000_001_000),
        finished_at_ms: Some(1_700_000_060_000),
        adapter_dir: Some(job.adapter_dir.display().to_string()),
        worker_pid: None,
        resume_checkpoint: None,
        requeued: false,
        memory_estimate: None,
        first_started_at_ms: None,
        after: Vec::new(),
        not_before_ms: None,
        on_finish: None,
    }
}

/// The request the daemon sends for the final adapter (`checkpoint` None) or a checkpoint.
pub fn export_request(
    job: &TrainedJob,
    base: &Path,
    out: &Path,
    format: &str,
    checkpoint: Option<&Path>,
) -> ExportRequest {
    let (adapter_dir, name, state) = match checkpoint {
        Some(dir) => (
            dir.to_path_buf(),
            dir.file_name().map(|n| n.to_string_lossy().into_owned()),
            dir.join("trainer_state.json"),
        ),
        None => (
            job.adapter_dir.clone(),
            None,
            job.latest_checkpoint().join("trainer_state.json"),
        ),
    };
    ExportRequest {
        format: format.into(),
        job_dir: job.job_dir.display().to_string(),
        adapter_dir: adapter_dir.display().to_string(),
        base_model: base.display().to_string(),
        out: out.display().to_string(),
        checkpoint: name,
        trainer_state: Some(state.display().to_string()),
        job: job_record(job, base),
        metrics: job.metrics.clone(),
    }
}

/// Logits `[t, vocab]` of `ids` through lorad's engine: the base alone, or with the adapter in
/// `adapter` applied by lorad's LoRA forward (not merged).
pub fn lorad_logits(base: &Path, adapter: Option<&Path>, ids: &[u32]) -> Tensor {
    let dev = Device::Cpu;
    let (lora, weights) = match adapter {
        Some(dir) => {
            let a = load_adapter(dir).unwrap();
            (a.lora_config(), Some(a.weights))
        }
        None => (
            LoraConfig {
                r: 1,
                alpha: 1.0,
                dropout: 0.0,
                targets: vec![],
                use_rslora: false,
            },
            None,
        ),
    };
    let model = Llama::load(base, &lora, &mut rng_for(0, 1), ids.len(), &dev).unwrap();
    if let (Some(w), Some(dir)) = (&weights, adapter) {
        model.set_lora_weights(w, dir).unwrap();
    }
    let ids = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    model.logits(&ids).unwrap().squeeze(0).unwrap()
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap();
    let max = |t: Tensor| t.max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
    max(diff) / max(scale)
}

/// The GGUF name of an HF tensor name (the inverse of lorad's `hf_name`).
fn gguf_name(hf: &str) -> String {
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
fn tokenizer_meta(dir: &Path) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
    };
    let json = read("tokenizer.json");
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
    let template = read("tokenizer_config.json")["chat_template"]
        .as_str()
        .unwrap()
        .to_owned();
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
        ("tokenizer.chat_template".into(), V::String(template)),
    ]
}

/// Writes the tiny HF model in `dir` as a GGUF file at `out` the way llama.cpp's converter does
/// (names, Q/K row permutation, tokenizer metadata), with 2-D weights in `matrices` (Q8_0 makes the
/// dequantization matter).
pub fn write_tiny_gguf(dir: &Path, out: &Path, matrices: GgmlDType) {
    use gguf_file::Value as V;
    let tensors = load_weights(dir, &Device::Cpu, DType::F32).unwrap();
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
    let mut meta: Vec<(String, V)> =
        vec![("general.architecture".into(), V::String("llama".into()))];
    meta.extend(
        model_meta
            .into_iter()
            .map(|(k, v)| (format!("llama.{k}"), v)),
    );
    meta.extend(tokenizer_meta(dir));
    let mut qtensors = BTreeMap::new();
    for (hf, t) in &tensors {
        let name = gguf_name(hf);
        assert_eq!(hf_name(&name).as_deref(), Some(hf.as_str()));
        let t = match name.rsplit('.').nth(1) {
            Some("attn_q") => permute_qk(t, tiny::HEADS, false).unwrap(),
            Some("attn_k") => permute_qk(t, tiny::KV_HEADS, false).unwrap(),
            _ => t.clone(),
        };
        let dtype = if t.rank() == 1 {
            GgmlDType::F32
        } else {
            matrices
        };
        qtensors.insert(name, QTensor::quantize(&t, dtype).unwrap());
    }
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}
