//! lorad-engine: LoRA training with candle, below the daemon. The model (Llama family from HF
//! safetensors or GGUF), LoRA, the data pipeline, AdamW and its schedules, atomic checkpoints, PEFT
//! adapters, generation and the submit-time checks (`preflight`). No tokio, no daemon code: the
//! daemon's worker process drives it (`trainer::Trainer`: open, step, checkpoint, finish; the worker's
//! loop around it is `train::train_with_source`), and the exporter plugins read and merge with it.
#![deny(clippy::unwrap_used)]
pub mod adapter;
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod fingerprint;
pub mod generate;
pub mod gguf;
pub mod lora;
pub mod memory;
pub mod model;
pub mod ops;
pub mod optim;
pub mod preflight;
pub mod rng;
pub mod rope;
pub mod runtime;
pub mod source;
pub mod tensor_file;
pub mod tiny;
pub mod train;
pub mod trainer;
pub mod weights;

use lorad_schema::{JobId, MetricPoint, TrainSettings};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Everything a worker needs to train one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainTask {
    /// The job.
    pub job: JobId,
    /// HF model directory.
    pub base_model: PathBuf,
    /// JSONL dataset.
    pub dataset: PathBuf,
    /// Where the final adapter (PEFT layout) is written.
    pub adapter_dir: PathBuf,
    /// `<state_dir>/jobs/<id>`: checkpoints go to its `checkpoints/`.
    pub job_dir: PathBuf,
    /// Resolved settings.
    pub settings: TrainSettings,
    /// A checkpoint directory (`<job_dir>/checkpoints/step-<N>`) to continue from at step N+1.
    #[serde(default)]
    pub resume_from: Option<PathBuf>,
    /// The user named `resume_from` (`resume --checkpoint`): pin it, so pruning keeps it.
    #[serde(default)]
    pub pin_resume: bool,
}

/// What the engine reports while it trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TrainEvent {
    /// A new phase started.
    Phase {
        /// Which.
        phase: Phase,
    },
    /// The data is counted: the run will take `total_steps` optimizer steps.
    Plan {
        /// Optimizer steps planned.
        total_steps: u64,
        /// Training examples.
        examples: u64,
        /// Trainable parameters.
        trainable_params: u64,
    },
    /// An optimizer step finished.
    Step {
        /// Its metrics.
        point: MetricPoint,
    },
    /// A checkpoint is complete on disk (renamed into place), so a restart can resume from `step`.
    Checkpoint {
        /// The optimizer step it holds.
        step: u64,
        /// `<job_dir>/checkpoints/step-<N>`.
        path: PathBuf,
    },
}

/// The worker's phase, for progress and (later) the stall watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Loading model, tokenizer and dataset.
    Loading,
    /// Training steps.
    Training,
    /// Writing a checkpoint or the adapter.
    Saving,
}

/// Set (from the SIGTERM handler) when the supervisor wants the worker to stop: training writes a
/// checkpoint after the current step and returns `EngineError::Stopped`.
static STOP: AtomicBool = AtomicBool::new(false);

/// Asks the training loop to checkpoint and stop after the current step. Async-signal-safe.
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether a stop was requested.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
