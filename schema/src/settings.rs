//! Training settings: the fields a template presets and `--set key=value` overrides.
use serde::{Deserialize, Serialize};

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Cosine decay to zero at the last step.
    Cosine,
    /// Linear decay to zero at the last step.
    Linear,
    /// Constant after warmup.
    Constant,
}

/// Numeric type for training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    /// 32-bit float (the CPU default).
    F32,
    /// bfloat16 (CUDA).
    Bf16,
    /// IEEE half.
    F16,
}

/// How the frozen base weights are held while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseWeights {
    /// As the file stores them (bf16, f16, or GGUF-quantized blocks), widened to f32 one layer at a time
    /// when a product needs them: a 4-bit base takes ~1/7 of the memory. The results equal `f32`'s.
    Stored,
    /// Widened to f32 once, at load (4 bytes per parameter).
    F32,
}

/// Gradient checkpointing: keep only each decoder layer's input and recompute the layer in backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradientCheckpointing {
    /// On for models of at least `GRADIENT_CHECKPOINTING_AUTO_PARAMS` parameters.
    Auto,
    /// Always (least memory, ~1/3 more compute).
    On,
    /// Never (fastest, activations of every layer kept).
    Off,
}

/// Where a job's attempts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorChoice {
    /// The daemon's `executor` (lorad.toml; `local` unless set).
    Default,
    /// A worker process on the daemon's machine.
    Local,
    /// One Slurm job per attempt (`sbatch`), on the cluster the daemon's machine submits to.
    Slurm,
}

/// The longest value of a Slurm option setting (`partition`, `gres`, `time_limit`, `account`, `qos`).
pub const MAX_SLURM_OPTION: usize = 128;

/// Whether `v` may be passed to `sbatch` as an option's value: letters, digits and `_ . : , = + / @ -`,
/// not starting with `-` (never taken for another option), at most [`MAX_SLURM_OPTION`] bytes.
pub fn valid_slurm_option(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_SLURM_OPTION
        && !v.starts_with('-')
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:,=+/@-".contains(c))
}

/// `gradient_checkpointing=auto` turns checkpointing on from this many base parameters (1B: where
/// the activations of a batch of 4 x 512 start to outweigh a stored-form base).
pub const GRADIENT_CHECKPOINTING_AUTO_PARAMS: u64 = 1_000_000_000;

/// The LoRA modules lorad knows how to adapt.
pub const TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Every training setting. A template gives all of them; overrides change some.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainSettings {
    /// LoRA rank.
    pub lora_r: u32,
    /// LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
    pub lora_alpha: f64,
    /// Dropout on the LoRA input.
    pub lora_dropout: f64,
    /// Modules that get an adapter.
    pub target_modules: Vec<String>,
    /// Rank-stabilised scaling alpha / sqrt(r).
    pub use_rslora: bool,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_eps: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub grad_clip: f64,
    /// Schedule after warmup.
    pub schedule: Schedule,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Passes over the dataset (ignored when max_steps is set).
    pub epochs: u32,
    /// Optimizer steps; wins over epochs when set.
    pub max_steps: Option<u64>,
    /// Examples per micro-batch.
    pub batch_size: u32,
    /// Micro-batches per optimizer step.
    pub grad_accum: u32,
    /// Longest sequence in tokens; longer examples are truncated.
    pub max_seq_len: u32,
    /// Pack several examples into one sequence.
    pub packing: bool,
    /// Train on prompt tokens too.
    pub train_on_inputs: bool,
    /// Seed for init, dropout and shuffling.
    pub seed: u64,
    /// Dataloader threads.
    pub workers: u32,
    /// Batches prepared ahead.
    pub prefetch: u32,
    /// Checkpoint every N optimizer steps (0 = only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    pub keep_checkpoints: u32,
    /// Numeric type.
    pub dtype: DType,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// Seconds without progress while training before a worker counts as stalled and is restarted
    /// (3x that while loading or saving). Default 180: a hung worker is found in minutes; a model whose
    /// step takes longer (a large model on CPU) needs a larger value.
    pub stall_timeout: u64,
    /// Worker restarts before the job fails.
    pub max_restarts: u32,
    /// The longest dataset line (one example) read, in bytes; a longer line is refused with its
    /// number, at submit and in the worker. Default 8 MiB: far above any SFT example (a 128k-token
    /// example is ~0.5 MiB), small enough that a runaway line costs little memory.
    pub max_line_bytes: u64,
    /// How the frozen base weights are held: `stored` (as the file has them, widened per layer when
    /// used) or `f32` (widened at load). Memory only: the losses are the same.
    pub base_weights: BaseWeights,
    /// `auto`, `on` or `off`: recompute each decoder layer in backward instead of keeping its
    /// activations. Memory and time only: the losses are the same.
    pub gradient_checkpointing: GradientCheckpointing,
    /// `default`, `local` or `slurm`: where the job's attempts run.
    pub executor: ExecutorChoice,
    /// Slurm partition (`sbatch --partition`; executor=slurm). None: the daemon's `[slurm]
    /// partition`, else the cluster's default.
    pub partition: Option<String>,
    /// Slurm generic resources (`sbatch --gres`, e.g. `gpu:1`).
    pub gres: Option<String>,
    /// Slurm time limit of each attempt (`sbatch --time`, e.g. `02:00:00`). The worker checkpoints
    /// before Slurm ends it, and the next attempt resumes from there.
    pub time_limit: Option<String>,
    /// Slurm account (`sbatch --account`).
    pub account: Option<String>,
    /// Slurm quality of service (`sbatch --qos`).
    pub qos: Option<String>,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            use_rslora: false,
            lr: 2e-4,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            grad_clip: 1.0,
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            max_seq_len: 512,
            packing: false,
            train_on_inputs: false,
            seed: 42,
            workers: 2,
            prefetch: 4,
            checkpoint_every: 0,
            keep_checkpoints: 3,
            dtype: DType::F32,
            device: "auto".into(),
            stall_timeout: 180,
            max_restarts: 3,
            max_line_bytes: 8 << 20,
            base_weights: BaseWeights::Stored,
            gradient_checkpointing: GradientCheckpointing::Auto,
            executor: ExecutorChoice::Default,
            partition: None,
            gres: None,
            time_limit: None,
            account: None,
            qos: None,
        }
    }
}

/// A setting that could not be applied; the message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingError {
    /// No such field.
    #[error("unknown setting '{key}' (known: {known})")]
    UnknownField {
        /// The key given.
        key: String,
        /// The known keys, comma-separated.
        known: String,
    },
    /// The value does not have the field's type.
    #[error("setting '{key}': cannot use '{value}': {detail}")]
    BadValue {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What was expected.
        detail: String,
    },
    /// The value has the right type but is out of range.
    #[error("setting '{key}': {detail}")]
    OutOfRange {
        /// The key.
        key: String,
        /// Why.
        detail: String,
    },
}

impl TrainSettings {
    /// The names of all fields, in declaration order.
    pub fn field_names() -> Vec<String> {
        match serde_json::to_value(TrainSettings::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Sets field `key` from its text form (`--set key=value`), type-checked against the field.
    /// Lists are comma-separated; `none` clears an optional field. On error `self` is unchanged.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), SettingError> {
        let mut map = match serde_json::to_value(&*self) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => unreachable_settings(),
        };
        let Some(current) = map.get(key).cloned() else {
            return Err(SettingError::UnknownField {
                key: key.into(),
                known: Self::field_names().join(", "),
            });
        };
        let candidates = text_candidates(&current, value);
        let mut last_err = String::new();
        for candidate in candidates {
            map.insert(key.to_string(), candidate);
            match serde_json::from_value::<TrainSettings>(serde_json::Value::Object(map.clone())) {
                Ok(parsed) => {
                    parsed.validate_field(key)?;
                    *self = parsed;
                    return Ok(());
                }
                Err(e) => last_err = e.to_string(),
            }
        }
        Err(SettingError::BadValue {
            key: key.into(),
            value: value.into(),
            detail: describe_type(&current, &last_err),
        })
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), SettingError> {
        for key in Self::field_names() {
            self.validate_field(&key)?;
        }
        Ok(())
    }

    fn validate_field(&self, key: &str) -> Result<(), SettingError> {
        let bad = |detail: String| {
            Err(SettingError::OutOfRange {
                key: key.into(),
                detail,
            })
        };
        match key {
            "lora_r" if self.lora_r == 0 => bad("must be at least 1".into()),
            "lora_alpha" if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) => {
                bad("must be > 0".into())
            }
            "lora_dropout" if !(0.0..1.0).contains(&self.lora_dropout) => {
                bad("must be in [0, 1)".into())
            }
            "target_modules" => {
                if self.target_modules.is_empty() {
                    return bad("needs at least one module".into());
                }
                match self
                    .target_modules
                    .iter()
                    .find(|m| !TARGET_MODULES.contains(&m.as_str()))
                {
                    Some(m) => bad(format!(
                        "unknown module '{m}' (known: {})",
                        TARGET_MODULES.join(", ")
                    )),
                    None => Ok(()),
                }
            }
            "lr" if !(self.lr.is_finite() && self.lr > 0.0) => bad("must be > 0".into()),
            "weight_decay" if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) => {
                bad("must be >= 0".into())
            }
            "adam_beta1" if !(0.0..1.0).contains(&self.adam_beta1) => {
                bad("must be in [0, 1)".into())
            }
            "adam_beta2" if !(0.0..1.0).contains(&self.adam_beta2) => {
                bad("must be in [0, 1)".into())
            }
            "adam_eps" if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) => {
                bad("must be > 0".into())
            }
            "grad_clip" if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) => {
                bad("must be >= 0".into())
            }
            "epochs" if self.epochs == 0 && self.max_steps.is_none() => {
                bad("must be at least 1".into())
            }
            "max_steps" if self.max_steps == Some(0) => bad("must be at least 1".into()),
            "batch_size" if self.batch_size == 0 => bad("must be at least 1".into()),
            "grad_accum" if self.grad_accum == 0 => bad("must be at least 1".into()),
            "max_seq_len" if self.max_seq_len < 2 => bad("must be at least 2".into()),
            "prefetch" if self.prefetch == 0 => bad("must be at least 1".into()),
            "keep_checkpoints" if self.keep_checkpoints == 0 => bad("must be at least 1".into()),
            "stall_timeout" if self.stall_timeout == 0 => bad("must be at least 1 second".into()),
            "max_line_bytes" if !(1024..=1 << 30).contains(&self.max_line_bytes) => {
                bad("must be between 1024 and 1073741824 (1 GiB)".into())
            }
            "partition" | "gres" | "time_limit" | "account" | "qos" => {
                let v = match key {
                    "partition" => &self.partition,
                    "gres" => &self.gres,
                    "time_limit" => &self.time_limit,
                    "account" => &self.account,
                    _ => &self.qos,
                };
                match v.as_deref() {
                    Some(v) if !valid_slurm_option(v) => bad(format!(
                        "'{v}' is not a Slurm option value (letters, digits and _ . : , = + / @ -, \
                         not starting with -, at most {MAX_SLURM_OPTION} characters)"
                    )),
                    _ => Ok(()),
                }
            }
            "device" => {
                let d = self.device.as_str();
                let cuda_ok = d
                    .strip_prefix("cuda:")
                    .is_some_and(|n| n.parse::<u32>().is_ok());
                if d == "auto" || d == "cpu" || d == "cuda" || cuda_ok {
                    Ok(())
                } else {
                    bad(format!("'{d}' is not auto, cpu or cuda:N"))
                }
            }
            _ => Ok(()),
        }
    }
}

fn unreachable_settings() -> serde_json::Map<String, serde_json::Value> {
    // TrainSettings always serializes to an object; keep this total instead of panicking.
    serde_json::Map::new()
}

/// The JSON values a text can stand for, most specific first, given the field's current value.
fn text_candidates(current: &serde_json::Value, text: &str) -> Vec<serde_json::Value> {
    use serde_json::Value;
    let text = text.trim();
    if current.is_array() {
        let items: Vec<Value> = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::String(s.into()))
            .collect();
        return vec![Value::Array(items)];
    }
    let mut out = Vec::new();
    if text.eq_ignore_ascii_case("none") || text.eq_ignore_ascii_case("null") {
        out.push(Value::Null);
    }
    if let Ok(v) = text.parse::<u64>() {
        out.push(Value::from(v));
    }
    if let Ok(v) = text.parse::<i64>() {
        out.push(Value::from(v));
    }
    if let Ok(v) = text.parse::<f64>() {
        if let Some(n) = serde_json::Number::from_f64(v) {
            out.push(Value::Number(n));
        }
    }
    match text.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" => out.push(Value::Bool(true)),
        "false" | "no" | "off" => out.push(Value::Bool(false)),
        _ => {}
    }
    out.push(Value::String(text.to_string()));
    out
}

fn describe_type(current: &serde_json::Value, serde_err: &str) -> String {
    use serde_json::Value;
    match current {
        Value::Bool(_) => "expected true or false".to_string(),
        Value::Number(n) if n.is_u64() => "expected a non-negative integer".to_string(),
        Value::Number(_) => "expected a number".to_string(),
        Value::Null => "expected an integer or 'none'".to_string(),
        Value::String(_) => serde_err.to_string(),
        _ => "expected a comma-separated list".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_type_checks() {
        let mut s = TrainSettings::default();
        s.set("lr", "1e-3").unwrap();
        assert_eq!(s.lr, 1e-3);
        s.set("max_steps", "30").unwrap();
        assert_eq!(s.max_steps, Some(30));
        s.set("max_steps", "none").unwrap();
        assert_eq!(s.max_steps, None);
        s.set("target_modules", "q_proj,k_proj, v_proj").unwrap();
        assert_eq!(s.target_modules, vec!["q_proj", "k_proj", "v_proj"]);
        s.set("schedule", "linear").unwrap();
        assert_eq!(s.schedule, Schedule::Linear);
        s.set("packing", "true").unwrap();
        assert!(s.packing);

        let before = s.clone();
        assert!(matches!(
            s.set("lr", "fast"),
            Err(SettingError::BadValue { .. })
        ));
        assert!(matches!(
            s.set("batch_size", "-1"),
            Err(SettingError::BadValue { .. })
        ));
        assert!(matches!(
            s.set("batch_size", "2.5"),
            Err(SettingError::BadValue { .. })
        ));
        assert!(matches!(
            s.set("schedule", "zigzag"),
            Err(SettingError::BadValue { .. })
        ));
        assert!(matches!(
            s.set("nope", "1"),
            Err(SettingError::UnknownField { .. })
        ));
        assert!(matches!(
            s.set("lora_r", "0"),
            Err(SettingError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.set("target_modules", "q_proj,wq"),
            Err(SettingError::OutOfRange { .. })
        ));
        assert_eq!(s, before, "a rejected override changes nothing");
    }

    #[test]
    fn slurm_options_are_checked_before_they_reach_sbatch() {
        let mut s = TrainSettings::default();
        s.set("executor", "slurm").unwrap();
        assert_eq!(s.executor, ExecutorChoice::Slurm);
        s.set("partition", "debug").unwrap();
        s.set("gres", "gpu:a100:1").unwrap();
        s.set("time_limit", "1-02:00:00").unwrap();
        s.set("account", "123").unwrap();
        assert_eq!(s.account.as_deref(), Some("123"));
        s.set("qos", "none").unwrap();
        assert_eq!(s.qos, None);
        let before = s.clone();
        for (key, value) in [
            ("partition", "--uid=0"),
            ("gres", "gpu:1 --wrap=x"),
            ("account", "a;b"),
            ("time_limit", "x\ny"),
        ] {
            let e = s.set(key, value).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("Slurm option"), "{e}");
        }
        assert!(s.set("executor", "ssh").is_err());
        assert_eq!(s, before);
    }

    #[test]
    fn defaults_are_valid() {
        TrainSettings::default().validate().unwrap();
    }
}
