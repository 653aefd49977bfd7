//! The training loop: load, plan, step, save. Synchronous; reports through a callback so it knows
//! nothing about the daemon (the worker process forwards events over its control channel).
use super::adapter::save_adapter_for;
use super::checkpoint::{self, RngState, ScheduleState, Snapshot, TrainerState, DROPOUT_RNG};
use super::data::{DataSource, Encoder, JsonlSource, Loader, LoaderOptions, Tokenized};
use super::error::EngineError;
use super::fingerprint::Fingerprint;
use super::lora::LoraConfig;
use super::model::Llama;
use super::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use super::source::ModelSource;
use super::{Phase, TrainEvent, TrainTask};
use candle_core::{Device, Tensor};
use lorad_schema::{DType, MetricPoint, TrainSettings};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Optimizer steps done.
    pub steps: u64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Loss of every step, in order.
    pub losses: Vec<f64>,
    /// Training examples.
    pub examples: u64,
    /// Trainable parameters.
    pub trainable_params: u64,
    /// Where the adapter was written.
    pub adapter_dir: PathBuf,
}

/// Independent generator streams derived from the one seed, so that e.g. changing the dropout rate
/// does not change the LoRA init or the data order.
pub fn rng_for(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}
/// Stream of the LoRA initialisation.
pub const INIT_STREAM: u64 = 1;
/// Stream of the LoRA dropout masks.
pub const DROPOUT_STREAM: u64 = 2;

/// The device named by the `device` setting: `auto` is CUDA 0 when built with CUDA and one is present,
/// else the CPU.
pub fn select_device(spec: &str) -> Result<Device, EngineError> {
    let setting = |detail: String| EngineError::Setting {
        field: "device".into(),
        detail,
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" if cfg!(feature = "cuda") => Ok(Device::cuda_if_available(0)?),
        "auto" => Ok(Device::Cpu),
        other => {
            let ordinal = match other {
                "cuda" => 0,
                _ => match other
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse::<usize>().ok())
                {
                    Some(n) => n,
                    None => return Err(setting(format!("'{other}' is not auto, cpu or cuda:N"))),
                },
            };
            if !cfg!(feature = "cuda") {
                return Err(setting(format!(
                    "'{other}': this lorad was built without CUDA support"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| setting(format!("'{other}': {e}")))
        }
    }
}

/// Optimizer steps for `examples` examples: `max_steps` if set, else ceil(examples / (batch * accum))
/// per epoch times epochs (the last step of an epoch may accumulate fewer micro-batches).
pub fn total_steps(s: &TrainSettings, examples: usize) -> u64 {
    let batches = examples.div_ceil(s.batch_size.max(1) as usize) as u64;
    s.max_steps
        .unwrap_or_else(|| batches.div_ceil(s.grad_accum.max(1) as u64) * s.epochs as u64)
}

/// Why a dtype other than f32 is refused (also checked at submit).
pub const DTYPE_UNSUPPORTED: &str =
    "only f32 training is implemented yet (bf16/f16 arrive with the CUDA path); use --set dtype=f32";

/// Opens the dataset of a task (lorad's JSONL reader, or a dataloader plugin's source).
pub type OpenSource<'a> = dyn Fn(&Path) -> Result<Arc<dyn DataSource>, EngineError> + 'a;

/// The dataset as lorad reads it itself: JSONL.
pub fn open_jsonl(path: &Path, max_line: usize) -> Result<Arc<dyn DataSource>, EngineError> {
    Ok(Arc::new(JsonlSource::open_limited(path, max_line)?))
}

/// Trains one job on a JSONL dataset and writes its adapter to `task.adapter_dir`.
pub fn train(
    task: &TrainTask,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary, EngineError> {
    let max_line = task.settings.max_line_bytes as usize;
    train_with_source(task, &|path| open_jsonl(path, max_line), on_event)
}

/// Trains one job, its dataset opened by `open_source`, and writes its adapter to `task.adapter_dir`.
pub fn train_with_source(
    task: &TrainTask,
    open_source: &OpenSource<'_>,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary, EngineError> {
    let s = &task.settings;
    s.validate().map_err(|e| EngineError::Setting {
        field: "settings".into(),
        detail: e.to_string(),
    })?;
    on_event(TrainEvent::Phase {
        phase: Phase::Loading,
    });
    let device = select_device(&s.device)?;
    if s.dtype != DType::F32 {
        // Refuse rather than silently train in another precision than the one asked for.
        return Err(EngineError::Setting {
            field: "dtype".into(),
            detail: DTYPE_UNSUPPORTED.into(),
        });
    }
    // An HF directory or a GGUF file; only headers are read here.
    let model_source = ModelSource::open(&task.base_model)?;
    let cfg = model_source.config().clone();
    crate::preflight::fits_context(s.max_seq_len, &cfg)?;
    let max_len = s.max_seq_len as usize;
    // The fingerprint is checked before anything heavy is loaded, so a refused resume fails fast.
    let fingerprint = Fingerprint::of(task)?;
    let resumed = match &task.resume_from {
        Some(dir) => {
            let loaded = checkpoint::load(dir)?;
            fingerprint.check(&loaded.state.fingerprint, task, dir)?;
            Some(loaded)
        }
        None => None,
    };

    // Dataset errors (format, chat template) surface here, before the weights are read.
    let encoder = Encoder::from_assets(model_source.tokenizer()?, max_len)
        .with_vocab_size(cfg.vocab_size)
        .with_train_on_inputs(s.train_on_inputs);
    let pad = cfg.eos_token_id.or(cfg.bos_token_id).unwrap_or(0);
    let source = open_source(&task.dataset)?;
    let mut loader = Loader::from_source(
        source,
        std::sync::Arc::new(encoder),
        &LoaderOptions::from_settings(s, pad),
    )?;
    let n_examples = loader.len();
    let lora = LoraConfig::from_settings(s);
    let model = Llama::from_source(
        &model_source,
        &lora,
        &mut rng_for(s.seed, INIT_STREAM),
        max_len,
        &device,
    )?;
    let vars = model.trainable_vars();
    let trainable_params: u64 = vars.iter().map(|v| v.elem_count() as u64).sum();
    let total = total_steps(s, n_examples);
    if let Some(r) = &resumed {
        if r.state.total_steps != total {
            return Err(EngineError::checkpoint(
                r.dir.join(checkpoint::STATE_FILE),
                format!(
                    "the checkpoint's run planned {} steps, this one plans {total}",
                    r.state.total_steps
                ),
            ));
        }
    }
    tracing::info!(total_steps = total, examples = n_examples, trainable_params, device = ?device, "training plan");
    on_event(TrainEvent::Plan {
        total_steps: total,
        examples: n_examples as u64,
        trainable_params,
    });

    let adam = AdamWConfig {
        beta1: s.adam_beta1,
        beta2: s.adam_beta2,
        eps: s.adam_eps,
        weight_decay: s.weight_decay,
    };
    let mut opt = AdamW::new(vars.clone(), adam)?;
    let schedule = LrSchedule {
        peak: s.lr,
        warmup: s.warmup_steps,
        total,
        kind: s.schedule,
    };
    let mut dropout_rng = rng_for(s.seed, DROPOUT_STREAM);
    let mut losses = Vec::with_capacity(total as usize);
    let mut start = 1;
    if let Some(r) = &resumed {
        dropout_rng = r.apply(&model, &mut opt, &mut loader)?;
        losses.extend_from_slice(&r.state.losses);
        start = r.state.step + 1;
        tracing::info!(checkpoint = %r.dir.display(), step = r.state.step, "resumed");
    }
    on_event(TrainEvent::Phase {
        phase: Phase::Training,
    });
    // The step whose checkpoint is on disk: the resumed one needs no second copy at the end.
    let mut saved = start - 1;
    for step in start..=total {
        let started = Instant::now();
        // The step's micro-batches: grad_accum of them, fewer at the end of an epoch.
        let mut batches = Vec::with_capacity(s.grad_accum as usize);
        let mut data_wait = 0.0;
        loop {
            let t = Instant::now();
            let batch = loader.next_batch(&device)?;
            data_wait += t.elapsed().as_secs_f64() * 1000.0;
            let end = batch.epoch_end;
            batches.push(batch);
            if end || batches.len() >= s.grad_accum as usize {
                break;
            }
        }
        // Normalise by the step's total target count, so accumulation equals one big batch.
        let targets: usize = batches.iter().map(|b| b.targets).sum();
        let mut grads: Vec<Tensor> = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<_>>()?;
        let mut loss_sum = 0.0;
        for b in &batches {
            // Every example of this batch was cut before its completion: nothing to learn from it.
            if b.targets == 0 {
                continue;
            }
            let loss = model.loss_sum(&b.ids, &b.positions, &b.labels, Some(&mut dropout_rng))?;
            loss_sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            let store = (loss / targets.max(1) as f64)?.backward()?;
            for (g, v) in grads.iter_mut().zip(&vars) {
                if let Some(d) = store.get(v) {
                    *g = (&*g + d)?;
                }
            }
        }
        let loss = loss_sum / targets.max(1) as f64;
        if !loss.is_finite() {
            return Err(EngineError::Diverged { step, loss });
        }
        let grad_norm = clip_grad_norm(&mut grads, s.grad_clip)?;
        let lr = schedule.lr(step);
        opt.step(&grads, lr)?;
        losses.push(loss);

        let step_ms = started.elapsed().as_secs_f64() * 1000.0;
        let secs = (step_ms / 1000.0).max(1e-9);
        let tokens: usize = batches.iter().map(|b| b.tokens).sum();
        let samples: usize = batches.iter().map(|b| b.examples).sum();
        let point = MetricPoint {
            step,
            epoch: loader.epoch_progress(),
            loss,
            lr,
            grad_norm: Some(grad_norm),
            tokens_per_s: tokens as f64 / secs,
            samples_per_s: samples as f64 / secs,
            step_ms,
            data_wait_ms: data_wait,
            gpu: None,
            at_ms: lorad_schema::now_ms(),
        };
        tracing::info!(
            step,
            total_steps = total,
            epoch = format_args!("{:.3}", point.epoch),
            loss = format_args!("{loss:.4}"),
            lr = format_args!("{lr:.3e}"),
            grad_norm = format_args!("{grad_norm:.3}"),
            tokens_per_s = format_args!("{:.0}", point.tokens_per_s),
            step_ms = format_args!("{step_ms:.1}"),
            data_wait_ms = format_args!("{data_wait:.2}"),
            "step"
        );
        on_event(TrainEvent::Step { point });

        // A checkpoint every `checkpoint_every` steps, and one before stopping when the supervisor asks
        // (pause, cancel, daemon shutdown); the final one is written after the loop.
        let periodic = s.checkpoint_every > 0 && step % s.checkpoint_every == 0 && step < total;
        let stop = step < total && super::stop_requested();
        if periodic || stop {
            let state = trainer_state(
                step,
                &loader,
                s.seed,
                &dropout_rng,
                &schedule,
                &losses,
                &fingerprint,
            );
            write_checkpoint(task, &model, &lora, &opt, state, on_event)?;
            saved = step;
            if stop {
                tracing::info!(step, "stop requested: checkpoint written");
                return Err(EngineError::Stopped { step });
            }
            on_event(TrainEvent::Phase {
                phase: Phase::Training,
            });
        }
    }

    if saved != total {
        let state = trainer_state(
            total,
            &loader,
            s.seed,
            &dropout_rng,
            &schedule,
            &losses,
            &fingerprint,
        );
        write_checkpoint(task, &model, &lora, &opt, state, on_event)?;
    } else {
        on_event(TrainEvent::Phase {
            phase: Phase::Saving,
        });
    }
    save_adapter_for(
        &task.adapter_dir,
        Some(&task.job_dir),
        &model,
        &lora,
        &task.base_model,
    )?;
    tracing::info!(adapter = %task.adapter_dir.display(), steps = total, "adapter saved");
    Ok(TrainSummary {
        steps: total,
        final_loss: losses.last().copied().unwrap_or(f64::NAN),
        losses,
        examples: n_examples as u64,
        trainable_params,
        adapter_dir: task.adapter_dir.clone(),
    })
}

/// The trainer's state after `step` (everything but weights and moments, which `Snapshot` borrows).
fn trainer_state(
    step: u64,
    loader: &Loader,
    seed: u64,
    dropout_rng: &ChaCha8Rng,
    schedule: &LrSchedule,
    losses: &[f64],
    fingerprint: &Fingerprint,
) -> TrainerState {
    TrainerState {
        format: checkpoint::FORMAT,
        step,
        total_steps: schedule.total,
        epoch: loader.epoch_progress(),
        data: loader.position(),
        rng: vec![RngState::capture(DROPOUT_RNG, seed, dropout_rng)],
        schedule: ScheduleState::at(schedule, step),
        losses: losses.to_vec(),
        fingerprint: fingerprint.clone(),
    }
}

/// Writes a checkpoint of `state`, reporting the Saving phase before it and a Checkpoint event once it
/// is on disk.
fn write_checkpoint(
    task: &TrainTask,
    model: &Llama,
    lora: &LoraConfig,
    optimizer: &AdamW,
    state: TrainerState,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<(), EngineError> {
    on_event(TrainEvent::Phase {
        phase: Phase::Saving,
    });
    let started = Instant::now();
    let step = state.step;
    let snap = Snapshot {
        model,
        lora,
        base_model: &task.base_model,
        optimizer,
        state,
    };
    let path = checkpoint::save(&task.job_dir, task.settings.keep_checkpoints, &snap)?;
    tracing::info!(step, path = %path.display(), ms = started.elapsed().as_millis() as u64, "checkpoint written");
    on_event(TrainEvent::Checkpoint { step, path });
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
