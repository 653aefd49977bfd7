//! Checkpoints, and everything an exact resume needs.
//!
//! Layout: `<job_dir>/checkpoints/step-<N>/` holds
//! - `adapter_model.safetensors` + `adapter_config.json`: the LoRA weights in PEFT layout, so a
//!   checkpoint is itself a loadable adapter;
//! - `optimizer.safetensors`: AdamW's moments, `<PEFT key>.exp_avg` / `.exp_avg_sq` per LoRA tensor, and
//!   the optimizer's step count in the header metadata (`step`);
//! - `trainer_state.json`: `TrainerState` (step, data position, RNG states, schedule, losses, fingerprint).
//!
//! A checkpoint is written into `.tmp-step-<N>-<pid>/`, its files and the directory fsynced, then renamed
//! to `step-<N>`: a crash leaves either no `step-<N>` or a complete one, and only `step-<N>` names are
//! ever resumed from. Old checkpoints are renamed to `.old-...` before deletion for the same reason.
use super::adapter::{load_adapter, peft_key, sync_dir, write_adapter_files, WEIGHTS_FILE};
use super::data::{DataPosition, Loader};
use super::error::EngineError;
use super::fingerprint::Fingerprint;
use super::lora::LoraConfig;
use super::model::Llama;
use super::optim::{AdamW, LrSchedule};
use super::rng::rng_for;
use super::weights::{save_tensors_with_metadata, write_text};
use candle_core::{Device, Tensor};
use lorad_schema::Schedule;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Directory of a job's checkpoints, inside its job directory.
pub const CHECKPOINTS_DIR: &str = lorad_schema::layout::JobDir::CHECKPOINTS;
/// AdamW state file.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer state file.
pub const STATE_FILE: &str = "trainer_state.json";
/// Version of `trainer_state.json`; a different one is refused rather than misread.
pub const FORMAT: u32 = 1;
/// Present in a checkpoint that pruning keeps (the one a stop wrote, one a user resumed from): it
/// holds the reason. Such checkpoints stay until the job is deleted.
pub const PIN_FILE: &str = "pinned";
/// Name of the dropout generator in `TrainerState::rng`.
pub const DROPOUT_RNG: &str = "dropout";
const STEP_PREFIX: &str = "step-";
const TMP_PREFIX: &str = ".tmp-";
const OLD_PREFIX: &str = ".old-";
const STEP_META: &str = "step";

/// A ChaCha8 generator's position: `rng_for(seed, stream)` advanced by `word_pos` 32-bit words.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// Which generator (`dropout`).
    pub name: String,
    /// The run seed it was derived from.
    pub seed: u64,
    /// Its stream.
    pub stream: u64,
    /// Words consumed, including the ones buffered but not yet used (`ChaCha8Rng::get_word_pos`).
    pub word_pos: u128,
}

impl RngState {
    /// The state of `rng`, which was made by `rng_for(seed, rng.get_stream())`.
    pub fn capture(name: &str, seed: u64, rng: &ChaCha8Rng) -> Self {
        RngState {
            name: name.into(),
            seed,
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos(),
        }
    }

    /// A generator that continues exactly where the captured one was.
    pub fn restore(&self) -> ChaCha8Rng {
        let mut rng = rng_for(self.seed, self.stream);
        rng.set_word_pos(self.word_pos);
        rng
    }
}

/// The schedule as it was, and the learning rate of the checkpoint's step (for humans: the rate is a
/// pure function of the step, so restoring the step restores the schedule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// Shape after warmup.
    pub kind: Schedule,
    /// Peak learning rate.
    pub peak: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// Total steps the schedule spans.
    pub total: u64,
    /// The learning rate of the checkpoint's step.
    pub lr: f64,
}

impl ScheduleState {
    /// `schedule` at `step`.
    pub fn at(schedule: &LrSchedule, step: u64) -> Self {
        ScheduleState {
            kind: schedule.kind,
            peak: schedule.peak,
            warmup: schedule.warmup,
            total: schedule.total,
            lr: schedule.lr(step),
        }
    }
}

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// `FORMAT`.
    pub format: u32,
    /// Optimizer steps done; a resume continues at `step + 1`.
    pub step: u64,
    /// Optimizer steps of the whole run.
    pub total_steps: u64,
    /// Epochs done, fractional (as in the step metrics).
    pub epoch: f64,
    /// Where the data loader stands. The order of an epoch is drawn from its own seeded stream, so the
    /// position is all the data order needs.
    pub data: DataPosition,
    /// Every generator that is still drawn from during training.
    pub rng: Vec<RngState>,
    /// The learning-rate schedule.
    pub schedule: ScheduleState,
    /// Loss of every step so far, in order.
    pub losses: Vec<f64>,
    /// What the numbers depend on; a resume with a different one is refused.
    pub fingerprint: Fingerprint,
}

impl TrainerState {
    /// The generator named `name`; a checkpoint without it cannot be resumed exactly.
    pub fn rng(&self, name: &str, dir: &Path) -> Result<ChaCha8Rng, EngineError> {
        self.rng
            .iter()
            .find(|r| r.name == name)
            .map(RngState::restore)
            .ok_or_else(|| {
                EngineError::checkpoint(dir.join(STATE_FILE), format!("no \"{name}\" rng state"))
            })
    }
}

/// What a checkpoint is made of, borrowed from the running trainer.
pub struct Snapshot<'a> {
    /// The model (its LoRA weights are saved).
    pub model: &'a Llama,
    /// The LoRA config, for adapter_config.json.
    pub lora: &'a LoraConfig,
    /// The base model path, for adapter_config.json.
    pub base_model: &'a Path,
    /// The optimizer (moments and step count).
    pub optimizer: &'a AdamW,
    /// Everything else.
    pub state: TrainerState,
}

/// `<job_dir>/checkpoints/step-<step>`.
pub fn checkpoint_dir(job_dir: &Path, step: u64) -> PathBuf {
    lorad_schema::layout::JobDir::new(job_dir).checkpoint_at(step)
}

/// The complete checkpoints of a job (`step-<N>` directories with a trainer state), oldest first.
/// Temporary and half-deleted directories have other names and are never listed.
pub fn list_checkpoints(job_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(job_dir.join(CHECKPOINTS_DIR)) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            if !lorad_schema::layout::valid_checkpoint_name(&name) {
                return None;
            }
            let digits = name.strip_prefix(STEP_PREFIX)?;
            // A real directory, not a link: job directories belong to their users, and the root
            // daemon lists them; a link must not make it look elsewhere.
            if !e.file_type().ok()?.is_dir() {
                return None;
            }
            let path = e.path();
            path.join(STATE_FILE)
                .is_file()
                .then_some((digits.parse().ok()?, path))
        })
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint of a job, to resume from after a crash.
pub fn latest_checkpoint(job_dir: &Path) -> Option<PathBuf> {
    list_checkpoints(job_dir).pop().map(|(_, p)| p)
}

/// The newest complete checkpoint of a job at or before `step` (the last step the journal recorded).
pub fn latest_checkpoint_at_most(job_dir: &Path, step: u64) -> Option<PathBuf> {
    list_checkpoints(job_dir)
        .into_iter()
        .rfind(|(s, _)| *s <= step)
        .map(|(_, p)| p)
}

/// The AdamW parameter names, in `Llama::trainable_vars` order (A then B of each adapted module).
fn param_names(model: &Llama) -> Vec<String> {
    model
        .lora_modules()
        .into_iter()
        .flat_map(|(m, _)| [peft_key(&m, 'A'), peft_key(&m, 'B')])
        .collect()
}

/// Whether the checkpoint in `dir` is pinned (a regular file `pinned`, not a link: the daemon asks
/// this of directories users own).
pub fn is_pinned(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir.join(PIN_FILE)).is_ok_and(|m| m.is_file())
}

/// Pins the checkpoint in `dir` for `reason`, so pruning keeps it.
pub fn pin(dir: &Path, reason: &str) -> Result<(), EngineError> {
    write_text(&dir.join(PIN_FILE), &format!("{reason}\n"))
}

/// Writes `snap` as `<job_dir>/checkpoints/step-<N>` atomically (pinned for `pin`'s reason, if
/// given), then deletes all but the newest `keep` unpinned checkpoints (never the one just written).
/// Returns the checkpoint's path.
pub fn save(
    job_dir: &Path,
    keep: u32,
    snap: &Snapshot<'_>,
    pin_reason: Option<&str>,
) -> Result<PathBuf, EngineError> {
    let root = job_dir.join(CHECKPOINTS_DIR);
    std::fs::create_dir_all(&root).map_err(|e| EngineError::io(&root, e))?;
    remove_leftovers(&root)?;
    let step = snap.state.step;
    let final_dir = checkpoint_dir(job_dir, step);
    let tmp = root.join(format!(
        "{TMP_PREFIX}{STEP_PREFIX}{step}-{}",
        std::process::id()
    ));
    std::fs::create_dir(&tmp).map_err(|e| EngineError::io(&tmp, e))?;

    write_adapter_files(&tmp, snap.model, snap.lora, snap.base_model)?;
    let (m, v) = snap.optimizer.moments();
    let mut tensors = BTreeMap::new();
    for ((name, m), v) in param_names(snap.model).into_iter().zip(m).zip(v) {
        tensors.insert(format!("{name}.exp_avg"), m.clone());
        tensors.insert(format!("{name}.exp_avg_sq"), v.clone());
    }
    let meta = [(STEP_META, snap.optimizer.steps().to_string())];
    save_tensors_with_metadata(&tmp.join(OPTIMIZER_FILE), &tensors, &meta)?;
    let state = serde_json::to_string_pretty(&snap.state)
        .map_err(|e| EngineError::checkpoint(tmp.join(STATE_FILE), e.to_string()))?;
    write_text(&tmp.join(STATE_FILE), &(state + "\n"))?;
    if let Some(reason) = pin_reason {
        pin(&tmp, reason)?;
    }
    sync_dir(&tmp)?;

    // Re-writing an existing step (a resume from an older checkpoint reached it again) swaps the old
    // one out first, so `step-<N>` is complete at every instant it exists.
    if final_dir.exists() {
        retire(&root, &final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| EngineError::io(&final_dir, e))?;
    sync_dir(&root)?;

    let all: Vec<(u64, PathBuf)> = list_checkpoints(job_dir)
        .into_iter()
        .filter(|(_, dir)| !is_pinned(dir))
        .collect();
    let excess = all.len().saturating_sub(keep.max(1) as usize);
    for (_, old) in all.into_iter().take(excess).filter(|(s, _)| *s != step) {
        retire(&root, &old)?;
    }
    Ok(final_dir)
}

/// Renames `dir` to a `.old-` name (atomic, so it stops being a checkpoint at once), then deletes it.
fn retire(root: &Path, dir: &Path) -> Result<(), EngineError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let old = root.join(format!("{OLD_PREFIX}{name}-{}", std::process::id()));
    std::fs::rename(dir, &old).map_err(|e| EngineError::io(dir, e))?;
    std::fs::remove_dir_all(&old).map_err(|e| EngineError::io(&old, e))
}

/// Deletes temporary and half-deleted directories that a crashed attempt left behind. Only one worker
/// trains a job at a time, so none of them can be in use.
fn remove_leftovers(root: &Path) -> Result<(), EngineError> {
    let entries = std::fs::read_dir(root).map_err(|e| EngineError::io(root, e))?;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TMP_PREFIX) || name.starts_with(OLD_PREFIX) {
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing a checkpoint left over by a crash");
            std::fs::remove_dir_all(&path).map_err(|e| EngineError::io(&path, e))?;
        }
    }
    Ok(())
}

/// A checkpoint read back into memory (on the CPU), not yet applied to a trainer.
#[derive(Debug)]
pub struct Loaded {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// `trainer_state.json`.
    pub state: TrainerState,
    weights: HashMap<String, (Tensor, Tensor)>,
    moments: HashMap<String, Tensor>,
    optimizer_steps: u64,
}

/// Reads the checkpoint in `dir`. Every error names the file at fault.
pub fn load(dir: &Path) -> Result<Loaded, EngineError> {
    if !dir.is_dir() {
        return Err(EngineError::checkpoint(dir, "not a checkpoint directory"));
    }
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| EngineError::checkpoint(&state_path, format!("cannot read: {e}")))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| EngineError::checkpoint(&state_path, format!("not a trainer state: {e}")))?;
    if state.format != FORMAT {
        return Err(EngineError::checkpoint(
            &state_path,
            format!(
                "format {} is not {FORMAT} (written by another lorad version)",
                state.format
            ),
        ));
    }
    if state.step > state.total_steps {
        return Err(EngineError::checkpoint(
            &state_path,
            format!(
                "step {} is past total_steps {}",
                state.step, state.total_steps
            ),
        ));
    }
    if state.losses.len() as u64 != state.step {
        return Err(EngineError::checkpoint(
            &state_path,
            format!("{} losses for {} steps", state.losses.len(), state.step),
        ));
    }
    let weights = load_adapter(dir)
        .map_err(|e| match e {
            EngineError::Io { path, source } => {
                EngineError::checkpoint(path, format!("cannot read: {source}"))
            }
            EngineError::Adapter { path, detail } => EngineError::checkpoint(path, detail),
            other => other,
        })?
        .weights;

    let opt_path = dir.join(OPTIMIZER_FILE);
    let bad = |detail: String| EngineError::checkpoint(&opt_path, detail);
    let bytes = std::fs::read(&opt_path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let optimizer_steps = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STEP_META))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| bad(format!("no \"{STEP_META}\" count in the metadata")))?;
    if optimizer_steps != state.step {
        return Err(bad(format!(
            "optimizer step {optimizer_steps} but {STATE_FILE} says step {}",
            state.step
        )));
    }
    let moments = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        state,
        weights,
        moments,
        optimizer_steps,
    })
}

impl Loaded {
    /// Puts the checkpoint's LoRA weights, AdamW moments and step count, and data position into a
    /// freshly built trainer; returns the dropout generator to continue with.
    pub fn apply(
        &self,
        model: &Llama,
        optimizer: &mut AdamW,
        loader: &mut Loader,
    ) -> Result<ChaCha8Rng, EngineError> {
        model.set_lora_weights(&self.weights, &self.dir.join(WEIGHTS_FILE))?;
        let opt_path = self.dir.join(OPTIMIZER_FILE);
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for name in param_names(model) {
            for (suffix, out) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
                let key = format!("{name}.{suffix}");
                let t = self.moments.get(&key).ok_or_else(|| {
                    EngineError::checkpoint(&opt_path, format!("no tensor {key}"))
                })?;
                out.push(t.clone());
            }
        }
        optimizer
            .restore(m, v, self.optimizer_steps)
            .map_err(|e| EngineError::checkpoint(&opt_path, e.to_string()))?;
        loader
            .seek(self.state.data)
            .map_err(|e| EngineError::checkpoint(self.dir.join(STATE_FILE), e.to_string()))?;
        self.state.rng(DROPOUT_RNG, &self.dir)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "checkpoint_tests.rs"]
mod tests;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "checkpoint_fault_tests.rs"]
mod fault_tests;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "grad_checkpoint_tests.rs"]
mod grad_checkpoint_tests;
