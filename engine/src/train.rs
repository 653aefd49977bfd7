//! The worker's training loop around the `Trainer`: it reports phases, steps and checkpoints through
//! a callback (the worker process forwards them over its control channel), writes the periodic
//! checkpoints and the one before a requested stop, and knows nothing about the daemon.
use crate::data::{open_jsonl, OpenSource, Tokenized};
use crate::error::EngineError;
use crate::model::Llama;
use crate::trainer::{TrainSummary, Trainer};
use crate::{Phase, TrainEvent, TrainTask};
use candle_core::Tensor;

/// Trains one job on a JSONL dataset and writes its adapter to `task.adapter_dir`.
pub fn train(
    task: &TrainTask,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary, EngineError> {
    let max_line = task.settings.max_line_bytes as usize;
    train_with_source(task, &|path| open_jsonl(path, max_line), on_event)
}

/// Trains one job, its dataset opened by `open_source`, and writes its adapter to `task.adapter_dir`.
/// Events: Loading, Plan, Training, then a Step per step; Saving and Checkpoint around every
/// checkpoint (then Training again); Saving before the adapter. A stop request (`crate::request_stop`)
/// ends the run after the current step with a checkpoint and `EngineError::Stopped`.
pub fn train_with_source(
    task: &TrainTask,
    open_source: &OpenSource<'_>,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary, EngineError> {
    on_event(TrainEvent::Phase {
        phase: Phase::Loading,
    });
    let mut trainer = Trainer::open(task, open_source)?;
    let plan = trainer.plan();
    on_event(TrainEvent::Plan {
        total_steps: plan.total_steps,
        examples: plan.examples,
        trainable_params: plan.trainable_params,
    });
    on_event(TrainEvent::Phase {
        phase: Phase::Training,
    });
    while !trainer.is_done() {
        let point = trainer.step()?;
        on_event(TrainEvent::Step { point });
        // Checkpoints every `checkpoint_every` steps, and one before stopping when the supervisor asks
        // (pause, cancel, daemon shutdown); the final one comes after the loop.
        let stop = !trainer.is_done() && crate::stop_requested();
        if trainer.checkpoint_due() || stop {
            // The checkpoint a stop (a pause) writes is the one a resume continues from: kept.
            let pin = stop.then_some("written when the job was stopped");
            checkpoint(&mut trainer, on_event, pin)?;
            if stop {
                let step = trainer.steps_done();
                tracing::info!(step, "stop requested: checkpoint written");
                return Err(EngineError::Stopped { step });
            }
            on_event(TrainEvent::Phase {
                phase: Phase::Training,
            });
        }
    }
    if trainer.is_saved() {
        on_event(TrainEvent::Phase {
            phase: Phase::Saving,
        });
    } else {
        checkpoint(&mut trainer, on_event, None)?;
    }
    trainer.finish()
}

/// A checkpoint (pinned for `pin`'s reason, if given), with the Saving phase before it and a
/// Checkpoint event once it is on disk.
fn checkpoint(
    trainer: &mut Trainer,
    on_event: &mut dyn FnMut(TrainEvent),
    pin: Option<&str>,
) -> Result<(), EngineError> {
    on_event(TrainEvent::Phase {
        phase: Phase::Saving,
    });
    let path = trainer.checkpoint_pinned(pin)?;
    on_event(TrainEvent::Checkpoint {
        step: trainer.steps_done(),
        path,
    });
    Ok(())
}

/// Mean next-token loss of `model` over `data` without dropout (evaluation), averaged over all target
/// tokens, one example at a time so no padding is involved.
pub fn mean_loss(model: &Llama, data: &[Tokenized]) -> Result<f64, EngineError> {
    let device = model.device();
    let (mut sum, mut count) = (0.0, 0usize);
    for ex in data {
        let (positions, labels): (Vec<u32>, Vec<u32>) = (1..ex.ids.len())
            .filter(|&p| ex.trained[p])
            .map(|p| ((p - 1) as u32, ex.ids[p]))
            .unzip();
        if labels.is_empty() {
            continue;
        }
        let ids = Tensor::from_slice(&ex.ids, (1, ex.ids.len()), device)?;
        let n = labels.len();
        let positions = Tensor::from_vec(positions, n, device)?;
        let labels = Tensor::from_vec(labels, n, device)?;
        sum += model
            .loss_sum(&ids, &positions, &labels, None)?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        count += n;
    }
    Ok(sum / count.max(1) as f64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "train_tests.rs"]
pub(crate) mod tests;
