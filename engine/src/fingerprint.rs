//! The fingerprint of a run: what its numbers depend on, saved in every checkpoint so that a resume
//! against a different dataset, base model or math setting is refused before any step is taken,
//! instead of silently producing a run that matches neither the old nor a fresh one.
//!
//! Hashes are SHA-256 so that a fingerprint means the same thing across lorad versions and machines
//! (std's hasher is neither stable nor meant for files). The math settings are also kept verbatim,
//! so a refusal names the field that changed rather than just "the settings differ".
use super::error::EngineError;
use super::TrainTask;
use lorad_schema::TrainSettings;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Settings that do not change the numbers of a run, so a resume may change them: dataloader threads
/// and prefetch (the order is deterministic), checkpoint cadence and retention, supervision limits, and
/// the device (a job may be resumed on another GPU; results then agree to float tolerance, not bits).
/// Every other field, including ones added later, counts as math: the safe default.
pub const NON_MATH_SETTINGS: [&str; 16] = [
    "workers",
    "prefetch",
    "checkpoint_every",
    "keep_checkpoints",
    "stall_timeout",
    "max_restarts",
    "device",
    "max_line_bytes",
    // Memory strategies with the same results: a job may resume with another.
    "base_weights",
    "gradient_checkpointing",
    // Where attempts run: a job may move between machines and executors.
    "executor",
    "partition",
    "gres",
    "time_limit",
    "account",
    "qos",
];

/// What a run's numbers depend on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// SHA-256 (hex) of the math settings as JSON.
    pub settings: String,
    /// SHA-256 (hex) of the dataset file's bytes.
    pub dataset: String,
    /// SHA-256 (hex) of the base model's config: `config.json` of an HF directory, or the whole GGUF
    /// file (its config lives in the file's metadata).
    pub model: String,
    /// The math settings themselves, to name what changed.
    pub math_settings: Map<String, Value>,
}

impl Fingerprint {
    /// The fingerprint of `task` as it is on disk now. Reads the dataset once (and a GGUF model file).
    pub fn of(task: &TrainTask) -> Result<Self, EngineError> {
        let math = math_settings(&task.settings);
        Ok(Fingerprint {
            settings: sha256_bytes(Value::Object(math.clone()).to_string().as_bytes()),
            dataset: sha256_file(&task.dataset)?,
            model: sha256_file(&model_identity(&task.base_model))?,
            math_settings: math,
        })
    }

    /// `Ok` when `self` (now) matches `saved` (the checkpoint's); otherwise a `ResumeMismatch` naming
    /// every setting that changed and whether the dataset or base model did.
    pub fn check(
        &self,
        saved: &Fingerprint,
        task: &TrainTask,
        checkpoint: &Path,
    ) -> Result<(), EngineError> {
        let mut changes = Vec::new();
        if self.settings != saved.settings {
            let keys: std::collections::BTreeSet<&String> = self
                .math_settings
                .keys()
                .chain(saved.math_settings.keys())
                .collect();
            let show = |v: Option<&Value>| v.map_or_else(|| "unset".to_string(), Value::to_string);
            for key in keys {
                let (then, now) = (saved.math_settings.get(key), self.math_settings.get(key));
                if then != now {
                    changes.push(format!(
                        "setting '{key}' changed ({} at the checkpoint, {} now)",
                        show(then),
                        show(now)
                    ));
                }
            }
            if changes.is_empty() {
                changes.push("the training settings changed".into());
            }
        }
        if self.dataset != saved.dataset {
            changes.push(format!(
                "the dataset {} changed since the checkpoint (sha256 {} then, {} now)",
                task.dataset.display(),
                short(&saved.dataset),
                short(&self.dataset)
            ));
        }
        if self.model != saved.model {
            changes.push(format!(
                "the base model's config {} changed since the checkpoint (sha256 {} then, {} now)",
                model_identity(&task.base_model).display(),
                short(&saved.model),
                short(&self.model)
            ));
        }
        if changes.is_empty() {
            return Ok(());
        }
        Err(EngineError::ResumeMismatch {
            checkpoint: checkpoint.to_path_buf(),
            changes,
        })
    }
}

/// The settings that affect the math, as a JSON object (every field but `NON_MATH_SETTINGS`).
pub fn math_settings(s: &TrainSettings) -> Map<String, Value> {
    let mut map = match serde_json::to_value(s) {
        Ok(Value::Object(map)) => map,
        // TrainSettings is a plain struct of numbers, strings and enums: it always serializes to an
        // object. Should that ever change, an empty map still fingerprints the dataset and model.
        _ => Map::new(),
    };
    for key in NON_MATH_SETTINGS {
        map.remove(key);
    }
    map
}

/// The file that identifies the base model's config: `config.json` in an HF directory, else the model
/// path itself (a GGUF file).
fn model_identity(base_model: &Path) -> PathBuf {
    if base_model.is_dir() {
        base_model.join("config.json")
    } else {
        base_model.to_path_buf()
    }
}

fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Streams the file through SHA-256 (datasets and GGUF files can be large).
fn sha256_file(path: &Path) -> Result<String, EngineError> {
    let mut file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| EngineError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first 12 hex digits: enough to tell two hashes apart in a message.
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn math_settings_leave_out_operational_ones() {
        let mut s = TrainSettings::default();
        let before = math_settings(&s);
        assert!(before.contains_key("lr") && before.contains_key("seed"));
        assert!(!before.contains_key("workers") && !before.contains_key("device"));
        s.workers = 7;
        s.checkpoint_every = 3;
        s.device = "cpu".into();
        assert_eq!(math_settings(&s), before);
        s.lora_dropout = 0.5;
        assert_ne!(math_settings(&s), before);
    }

    #[test]
    fn sha256_matches_the_standard_vector() {
        assert_eq!(
            sha256_bytes(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"abc").unwrap();
        assert_eq!(sha256_file(f.path()).unwrap(), sha256_bytes(b"abc"));
    }
}
