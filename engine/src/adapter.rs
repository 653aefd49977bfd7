//! The adapter on disk, in HF PEFT layout: `adapter_model.safetensors` with PEFT's key names and
//! `adapter_config.json`, so `PeftModel.from_pretrained(base, dir)` loads it with every key matched.
use super::error::EngineError;
use super::lora::LoraConfig;
use super::model::Llama;
use super::weights::{save_tensors, write_text};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Config file name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's prefix for a causal LM's modules (`PeftModelForCausalLM.base_model.model`).
const KEY_PREFIX: &str = "base_model.model.";

/// PEFT's key of one LoRA matrix: `base_model.model.<module>.lora_A.weight` (or `lora_B`).
pub fn peft_key(module: &str, which: char) -> String {
    format!("{KEY_PREFIX}{module}.lora_{which}.weight")
}

/// adapter_config.json as PEFT (0.10 and later) writes it for LoRA; only keys that every such version
/// understands, since older PEFT refuses unknown keys.
pub fn adapter_config_json(lora: &LoraConfig, base_model: &Path) -> serde_json::Value {
    let alpha = if lora.alpha.fract() == 0.0 && lora.alpha.abs() < 1e9 {
        json!(lora.alpha as i64)
    } else {
        json!(lora.alpha)
    };
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model.display().to_string(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": lora.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": lora.targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": lora.use_rslora,
    })
}

/// The file in an adapter directory that says which job wrote it: its content is the job's directory.
/// An output directory is replaced only when it holds this file naming the same job (a restarted
/// worker writing the final adapter again); anything else that exists is refused, never removed.
pub const JOB_MARKER: &str = ".lorad-job";

/// Writes the model's adapter to a new directory `dir` (tools and tests; refuses an existing `dir`).
pub fn save_adapter(
    dir: &Path,
    model: &Llama,
    lora: &LoraConfig,
    base_model: &Path,
) -> Result<(), EngineError> {
    save_adapter_for(dir, None, model, lora, base_model)
}

/// Writes the model's adapter to `dir`: into a fresh, uniquely named sibling directory first, renamed
/// into place, so `dir` is never seen half-written. With `job` (the job's directory), the adapter is
/// marked as that job's, and an existing `dir` marked as the same job's is replaced; any other
/// existing `dir` is refused and left as it is.
pub fn save_adapter_for(
    dir: &Path,
    job: Option<&Path>,
    model: &Llama,
    lora: &LoraConfig,
    base_model: &Path,
) -> Result<(), EngineError> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| EngineError::io(parent, e))?;
    let replace = match dir.symlink_metadata() {
        Err(_) => false,
        Ok(_) if job.is_some_and(|j| written_for(dir, j)) => true,
        Ok(_) => {
            return Err(EngineError::io(
                dir,
                std::io::Error::other(
                    "already exists and is not an adapter lorad wrote for this job; lorad never replaces it (choose a new output directory)",
                ),
            ))
        }
    };
    // Removed on drop if anything below fails; after the rename it names nothing any more.
    let staging = tempfile::Builder::new()
        .prefix(".lorad-adapter-")
        .tempdir_in(parent)
        .map_err(|e| EngineError::io(parent, e))?;
    let tmp = staging.path();
    write_adapter_files(tmp, model, lora, base_model)?;
    if let Some(job) = job {
        write_text(&tmp.join(JOB_MARKER), &format!("{}\n", job.display()))?;
    }
    sync_dir(tmp)?;
    let no_replace = |from: &Path, to: &Path| {
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            from,
            nix::fcntl::AT_FDCWD,
            to,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| EngineError::io(to, e.into()))
    };
    if replace {
        let old = tempfile::Builder::new()
            .prefix(".lorad-old-")
            .tempdir_in(parent)
            .map_err(|e| EngineError::io(parent, e))?;
        let old_adapter = old.path().join("adapter");
        no_replace(dir, &old_adapter)?;
        if let Err(e) = no_replace(tmp, dir) {
            // Put the previous adapter back rather than lose both.
            let _ = no_replace(&old_adapter, dir);
            return Err(e);
        }
        // `old` (the previous adapter of this same job) is removed when dropped.
        drop(old);
    } else {
        no_replace(tmp, dir)?;
    }
    drop(staging);
    sync_dir(parent)?;
    Ok(())
}

/// Whether `dir` is an adapter directory lorad wrote for the job whose directory is `job`.
fn written_for(dir: &Path, job: &Path) -> bool {
    let is_dir = dir.symlink_metadata().map(|m| m.is_dir()).unwrap_or(false);
    is_dir
        && std::fs::read_to_string(dir.join(JOB_MARKER))
            .map(|s| s.trim_end() == job.display().to_string())
            .unwrap_or(false)
}

/// Writes the adapter's two files into the existing directory `dir` (no fsync, no rename): the part of
/// `save_adapter` that checkpoints share, so a checkpoint is itself a loadable adapter.
pub fn write_adapter_files(
    dir: &Path,
    model: &Llama,
    lora: &LoraConfig,
    base_model: &Path,
) -> Result<(), EngineError> {
    let mut tensors = BTreeMap::new();
    for (module, pair) in model.lora_modules() {
        tensors.insert(peft_key(&module, 'A'), pair.a.as_tensor().clone());
        tensors.insert(peft_key(&module, 'B'), pair.b.as_tensor().clone());
    }
    save_tensors(&dir.join(WEIGHTS_FILE), &tensors)?;
    let config =
        serde_json::to_string_pretty(&adapter_config_json(lora, base_model)).unwrap_or_default();
    write_text(&dir.join(CONFIG_FILE), &(config + "\n"))
}

/// fsyncs the files of `dir` and `dir` itself, so the rename that follows publishes complete data.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), EngineError> {
    let entries = std::fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| EngineError::io(dir, e))?.path();
        if path.is_file() {
            let f = std::fs::File::open(&path).map_err(|e| EngineError::io(&path, e))?;
            f.sync_all().map_err(|e| EngineError::io(&path, e))?;
        }
    }
    let d = std::fs::File::open(dir).map_err(|e| EngineError::io(dir, e))?;
    d.sync_all().map_err(|e| EngineError::io(dir, e))
}

/// The fields of adapter_config.json that lorad reads back.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AdapterConfig {
    /// Must be `LORA`.
    pub peft_type: String,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub lora_alpha: f64,
    /// Dropout.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Target modules (PEFT also allows a single regex string; lorad writes lists).
    pub target_modules: Vec<String>,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// The base model it was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

/// An adapter read back from disk.
#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    /// Its config.
    pub config: AdapterConfig,
    /// `(A [r, in], B [out, r])` by module path (`model.layers.0.self_attn.q_proj`).
    pub weights: HashMap<String, (Tensor, Tensor)>,
}

impl LoadedAdapter {
    /// The LoRA config it was trained with.
    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig {
            r: self.config.r,
            alpha: self.config.lora_alpha,
            dropout: self.config.lora_dropout,
            targets: self.config.target_modules.clone(),
            use_rslora: self.config.use_rslora,
        }
    }
}

/// Reads a PEFT LoRA adapter directory (lorad's or PEFT's own) onto the CPU as f32.
pub fn load_adapter(dir: &Path) -> Result<LoadedAdapter, EngineError> {
    let bad = |path: PathBuf, detail: String| EngineError::Adapter { path, detail };
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::io(&cfg_path, e))?;
    let config: AdapterConfig = serde_json::from_str(&text)
        .map_err(|e| bad(cfg_path.clone(), format!("cannot parse: {e}")))?;
    if config.peft_type != "LORA" {
        return Err(bad(
            cfg_path,
            format!("peft_type \"{}\" is not LORA", config.peft_type),
        ));
    }
    let w_path = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&w_path, &Device::Cpu)
        .map_err(|e| bad(w_path.clone(), format!("cannot read safetensors: {e}")))?;
    let mut a_by_module = HashMap::new();
    let mut b_by_module = HashMap::new();
    for (key, t) in tensors {
        let t = t.to_dtype(DType::F32)?;
        let module = key.strip_prefix(KEY_PREFIX).unwrap_or(&key);
        if let Some(m) = module.strip_suffix(".lora_A.weight") {
            a_by_module.insert(m.to_string(), t);
        } else if let Some(m) = module.strip_suffix(".lora_B.weight") {
            b_by_module.insert(m.to_string(), t);
        } else {
            return Err(bad(
                w_path,
                format!("unexpected key {key} (only lora_A / lora_B weights are supported)"),
            ));
        }
    }
    let mut weights = HashMap::new();
    for (module, a) in a_by_module {
        let Some(b) = b_by_module.remove(&module) else {
            return Err(bad(
                w_path,
                format!("{} has no matching lora_B", peft_key(&module, 'A')),
            ));
        };
        if a.dims().len() != 2
            || b.dims().len() != 2
            || a.dim(0)? != config.r
            || b.dim(1)? != config.r
        {
            return Err(bad(
                w_path,
                format!(
                    "{module}: shapes {:?} / {:?} do not have rank r = {}",
                    a.dims(),
                    b.dims(),
                    config.r
                ),
            ));
        }
        weights.insert(module, (a, b));
    }
    if let Some(module) = b_by_module.keys().next() {
        return Err(bad(
            w_path,
            format!("{} has no matching lora_A", peft_key(module, 'B')),
        ));
    }
    Ok(LoadedAdapter { config, weights })
}
