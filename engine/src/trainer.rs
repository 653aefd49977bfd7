//! The `Trainer`: one LoRA run's state (model, optimizer, schedule, data position, generators, losses)
//! and what is done with it: `open` (or resume), `step`, `checkpoint`, `finish`. The worker's loop
//! (`train::train_with_source`), the speed benchmark (`examples/speed.rs`) and the tests all drive this
//! one type, so what is timed and tested is what the worker runs.
use crate::adapter::save_adapter_for;
use crate::checkpoint::{self, RngState, ScheduleState, Snapshot, TrainerState, DROPOUT_RNG};
use crate::data::{Batch, Encoder, Loader, LoaderOptions, OpenSource};
use crate::device::select_device;
use crate::error::EngineError;
use crate::fingerprint::Fingerprint;
use crate::lora::LoraConfig;
use crate::model::Llama;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use crate::rng::{rng_for, DROPOUT_STREAM, INIT_STREAM};
use crate::source::ModelSource;
use crate::TrainTask;
use candle_core::{Tensor, Var};
use lorad_schema::{MetricPoint, TrainSettings};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
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

/// What a run will do, known once its data is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Optimizer steps of the whole run.
    pub total_steps: u64,
    /// Training examples.
    pub examples: u64,
    /// Trainable parameters.
    pub trainable_params: u64,
}

/// Where the milliseconds of the last step went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    /// Waiting for the loader's batches.
    pub data_wait_ms: f64,
    /// Forward passes and their losses.
    pub forward_ms: f64,
    /// Backward passes and summing the micro-batches' gradients.
    pub backward_ms: f64,
    /// Gradient clipping and the AdamW update.
    pub optimizer_ms: f64,
    /// The whole step.
    pub step_ms: f64,
}

/// Optimizer steps for `examples` examples: `max_steps` if set, else ceil(examples / (batch * accum))
/// per epoch times epochs (the last step of an epoch may accumulate fewer micro-batches).
pub fn total_steps(s: &TrainSettings, examples: usize) -> u64 {
    let batches = examples.div_ceil(s.batch_size.max(1) as usize) as u64;
    s.max_steps
        .unwrap_or_else(|| batches.div_ceil(s.grad_accum.max(1) as u64) * s.epochs as u64)
}

/// A job's files: where checkpoints and the adapter go, and what a checkpoint must match.
struct JobFiles {
    task: TrainTask,
    fingerprint: Fingerprint,
}

/// One LoRA training run, stepped by its caller.
pub struct Trainer {
    settings: TrainSettings,
    model: Llama,
    lora: LoraConfig,
    vars: Vec<Var>,
    optimizer: AdamW,
    schedule: LrSchedule,
    loader: Loader,
    dropout_rng: ChaCha8Rng,
    losses: Vec<f64>,
    plan: Plan,
    /// Optimizer steps done.
    done: u64,
    /// The step whose checkpoint is on disk (0: none, or nothing to save yet).
    saved: u64,
    /// None for a trainer made with `new`: it has nowhere to write.
    job: Option<JobFiles>,
    times: StepTimes,
    /// Gradient checkpointing is on (the `gradient_checkpointing` setting, `auto` resolved).
    checkpointing: bool,
}

impl Trainer {
    /// A trainer for `task`: checks the settings, the model's context and (when resuming) the
    /// checkpoint's fingerprint before anything heavy is loaded, then opens the dataset with
    /// `open_source` (format and chat-template errors surface before the weights are read), loads the
    /// model with fresh LoRA weights, and restores `task.resume_from` if set.
    pub fn open(task: &TrainTask, open_source: &OpenSource<'_>) -> Result<Self, EngineError> {
        let s = &task.settings;
        crate::preflight::check_settings(s)?;
        let device = select_device(&s.device)?;
        // An HF directory or a GGUF file; only headers are read here.
        let source = ModelSource::open(&task.base_model)?;
        crate::preflight::fits_context(s.max_seq_len, source.config())?;
        let fingerprint = Fingerprint::of(task)?;
        let resumed = match &task.resume_from {
            Some(dir) => {
                let loaded = checkpoint::load(dir)?;
                fingerprint.check(&loaded.state.fingerprint, task, dir)?;
                Some(loaded)
            }
            None => None,
        };
        let loader = open_loader(&source, task, open_source)?;
        let lora = LoraConfig::from_settings(s);
        let mut init = rng_for(s.seed, INIT_STREAM);
        let max_len = s.max_seq_len as usize;
        let model = Llama::from_source_with(
            &source,
            &lora,
            &mut init,
            max_len,
            &device,
            task.settings.base_weights,
        )?;
        let mut trainer = Trainer::new(model, lora, loader, s)?;
        trainer.job = Some(JobFiles {
            task: task.clone(),
            fingerprint,
        });
        if let Some(r) = &resumed {
            trainer.resume(r)?;
            if task.pin_resume {
                checkpoint::pin(&r.dir, "named by the user to resume from")?;
            }
        }
        let p = trainer.plan;
        tracing::info!(total_steps = p.total_steps, examples = p.examples, trainable_params = p.trainable_params, device = ?device, "training plan");
        Ok(trainer)
    }

    /// A trainer over a model and a loader already made (the speed benchmark, tests). It trains and
    /// steps exactly as an opened one, but has no job directory: `checkpoint` and `finish` refuse.
    pub fn new(
        model: Llama,
        lora: LoraConfig,
        loader: Loader,
        settings: &TrainSettings,
    ) -> Result<Self, EngineError> {
        let s = settings;
        let vars = model.trainable_vars();
        let plan = Plan {
            total_steps: total_steps(s, loader.len()),
            examples: loader.len() as u64,
            trainable_params: vars.iter().map(|v| v.elem_count() as u64).sum(),
        };
        let adam = AdamWConfig {
            beta1: s.adam_beta1,
            beta2: s.adam_beta2,
            eps: s.adam_eps,
            weight_decay: s.weight_decay,
        };
        let schedule = LrSchedule {
            peak: s.lr,
            warmup: s.warmup_steps,
            total: plan.total_steps,
            kind: s.schedule,
        };
        let checkpointing = model.checkpointing(s.gradient_checkpointing);
        if checkpointing {
            tracing::info!("gradient checkpointing on: each layer is recomputed in backward");
        }
        Ok(Trainer {
            checkpointing,
            settings: s.clone(),
            optimizer: AdamW::new(vars.clone(), adam)?,
            model,
            lora,
            vars,
            schedule,
            loader,
            dropout_rng: rng_for(s.seed, DROPOUT_STREAM),
            losses: Vec::with_capacity(plan.total_steps as usize),
            plan,
            done: 0,
            saved: 0,
            job: None,
            times: StepTimes::default(),
        })
    }

    /// Continues from `r`: LoRA weights, AdamW moments, data position, generators and losses.
    fn resume(&mut self, r: &checkpoint::Loaded) -> Result<(), EngineError> {
        if r.state.total_steps != self.plan.total_steps {
            return Err(EngineError::checkpoint(
                r.dir.join(checkpoint::STATE_FILE),
                format!(
                    "the checkpoint's run planned {} steps, this one plans {}",
                    r.state.total_steps, self.plan.total_steps
                ),
            ));
        }
        self.dropout_rng = r.apply(&self.model, &mut self.optimizer, &mut self.loader)?;
        self.losses = r.state.losses.clone();
        self.done = r.state.step;
        // The resumed step is on disk already: it needs no second copy.
        self.saved = r.state.step;
        tracing::info!(checkpoint = %r.dir.display(), step = r.state.step, "resumed");
        Ok(())
    }

    /// The run's plan.
    pub fn plan(&self) -> Plan {
        self.plan
    }

    /// Optimizer steps done (including those before a resume).
    pub fn steps_done(&self) -> u64 {
        self.done
    }

    /// Every planned step is done.
    pub fn is_done(&self) -> bool {
        self.done >= self.plan.total_steps
    }

    /// The state after the last step is on disk as a checkpoint.
    pub fn is_saved(&self) -> bool {
        self.saved == self.done
    }

    /// A periodic checkpoint is due after this step (`checkpoint_every`; the last step's checkpoint is
    /// `finish`'s).
    pub fn checkpoint_due(&self) -> bool {
        let every = self.settings.checkpoint_every;
        every > 0 && self.done.is_multiple_of(every) && !self.is_done()
    }

    /// The model being trained.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// Where the last step's time went.
    pub fn last_step_times(&self) -> StepTimes {
        self.times
    }

    /// One optimizer step: the step's `grad_accum` micro-batches (fewer at the end of an epoch), a
    /// forward and backward pass on each, gradients normalised by the step's total target count (so
    /// accumulation equals one big batch), clipping, AdamW at the schedule's rate. Call it until
    /// `is_done`; a step past the plan would run at the schedule's rate beyond its end.
    pub fn step(&mut self) -> Result<MetricPoint, EngineError> {
        let started = Instant::now();
        let (batches, data_wait_ms) = self.next_batches()?;
        let step = self.done + 1;
        let (loss, mut grads, forward_ms) = self.gradients(&batches)?;
        if !loss.is_finite() {
            // Nothing of this step reached the weights: the checkpoint on disk is still good.
            let last_checkpoint = (self.saved > 0).then_some(self.saved);
            return Err(EngineError::Diverged {
                step,
                loss,
                last_checkpoint,
            });
        }
        let backward_ms = ms(started) - data_wait_ms - forward_ms;
        let t = Instant::now();
        let grad_norm = clip_grad_norm(&mut grads, self.settings.grad_clip)?;
        let lr = self.schedule.lr(step);
        self.optimizer.step(&grads, lr)?;
        let optimizer_ms = ms(t);
        self.losses.push(loss);
        self.done = step;

        let step_ms = ms(started);
        self.times = StepTimes {
            data_wait_ms,
            forward_ms,
            backward_ms,
            optimizer_ms,
            step_ms,
        };
        let secs = (step_ms / 1000.0).max(1e-9);
        let tokens: usize = batches.iter().map(|b| b.tokens).sum();
        let samples: usize = batches.iter().map(|b| b.examples).sum();
        let point = MetricPoint {
            step,
            epoch: self.loader.epoch_progress(),
            loss,
            lr,
            grad_norm: Some(grad_norm),
            tokens_per_s: tokens as f64 / secs,
            samples_per_s: samples as f64 / secs,
            step_ms,
            data_wait_ms,
            gpu: None,
            cpu: None,
            at_ms: lorad_schema::now_ms(),
        };
        log_step(&point, self.plan.total_steps);
        Ok(point)
    }

    /// The micro-batches of the next step and the ms spent waiting for them.
    fn next_batches(&mut self) -> Result<(Vec<Batch>, f64), EngineError> {
        let accum = self.settings.grad_accum.max(1) as usize;
        let device = self.model.device().clone();
        let mut batches = Vec::with_capacity(accum);
        let mut wait = 0.0;
        loop {
            let t = Instant::now();
            let batch = self.loader.next_batch(&device)?;
            wait += ms(t);
            let end = batch.epoch_end;
            batches.push(batch);
            if end || batches.len() >= accum {
                return Ok((batches, wait));
            }
        }
    }

    /// The step's mean loss, the gradient of each trainable variable, and the ms of the forward passes.
    fn gradients(&mut self, batches: &[Batch]) -> Result<(f64, Vec<Tensor>, f64), EngineError> {
        let targets = batches.iter().map(|b| b.targets).sum::<usize>().max(1) as f64;
        let zeros = self.vars.iter().map(|v| v.zeros_like());
        let mut grads = zeros.collect::<candle_core::Result<Vec<_>>>()?;
        let (mut loss_sum, mut forward_ms) = (0.0, 0.0);
        for b in batches {
            // Every example of this batch was cut before its completion: nothing to learn from it.
            if b.targets == 0 {
                continue;
            }
            let t = Instant::now();
            let rng = Some(&mut self.dropout_rng);
            let (loss, store) = if self.checkpointing {
                // Forward and backward interleave (each layer is recomputed in backward): the
                // whole pass counts as forward time.
                let (ids, pos, labels) = (&b.ids, &b.positions, &b.labels);
                let (loss, store) = (self.model).loss_and_grads_checkpointed(
                    ids,
                    pos,
                    labels,
                    rng,
                    1.0 / targets,
                )?;
                forward_ms += ms(t);
                (loss, store)
            } else {
                let loss = self.model.loss_sum(&b.ids, &b.positions, &b.labels, rng)?;
                forward_ms += ms(t);
                let store = (&loss / targets)?.backward()?;
                (loss, store)
            };
            loss_sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            for (g, v) in grads.iter_mut().zip(&self.vars) {
                if let Some(d) = store.get(v) {
                    *g = (&*g + d)?;
                }
            }
        }
        Ok((loss_sum / targets, grads, forward_ms))
    }

    /// Writes the state after the last step as `<job_dir>/checkpoints/step-<N>` (atomically; older
    /// unpinned ones beyond `keep_checkpoints` are deleted) and returns its path.
    pub fn checkpoint(&mut self) -> Result<PathBuf, EngineError> {
        self.checkpoint_pinned(None)
    }

    /// [`Trainer::checkpoint`], pinned for `reason` when given: pruning keeps it.
    pub fn checkpoint_pinned(&mut self, reason: Option<&str>) -> Result<PathBuf, EngineError> {
        let job = self.job.as_ref().ok_or_else(no_job_dir)?;
        let started = Instant::now();
        let step = self.done;
        let state = TrainerState {
            format: checkpoint::FORMAT,
            step,
            total_steps: self.plan.total_steps,
            epoch: self.loader.epoch_progress(),
            data: self.loader.position(),
            rng: vec![RngState::capture(
                DROPOUT_RNG,
                self.settings.seed,
                &self.dropout_rng,
            )],
            schedule: ScheduleState::at(&self.schedule, step),
            losses: self.losses.clone(),
            fingerprint: job.fingerprint.clone(),
        };
        let snap = Snapshot {
            model: &self.model,
            lora: &self.lora,
            base_model: &job.task.base_model,
            optimizer: &self.optimizer,
            state,
        };
        let keep = self.settings.keep_checkpoints;
        let path = checkpoint::save(&job.task.job_dir, keep, &snap, reason)?;
        self.saved = step;
        tracing::info!(step, path = %path.display(), ms = started.elapsed().as_millis() as u64, "checkpoint written");
        Ok(path)
    }

    /// Ends the run: a checkpoint of the last step unless one is on disk, then the adapter (PEFT
    /// layout) in the task's adapter directory.
    pub fn finish(mut self) -> Result<TrainSummary, EngineError> {
        if !self.is_saved() {
            self.checkpoint()?;
        }
        let job = self.job.as_ref().ok_or_else(no_job_dir)?;
        let (task, steps) = (&job.task, self.done);
        let (model, lora) = (&self.model, &self.lora);
        save_adapter_for(
            &task.adapter_dir,
            Some(&task.job_dir),
            model,
            lora,
            &task.base_model,
        )?;
        tracing::info!(adapter = %task.adapter_dir.display(), steps, "adapter saved");
        Ok(TrainSummary {
            steps,
            final_loss: self.losses.last().copied().unwrap_or(f64::NAN),
            examples: self.plan.examples,
            trainable_params: self.plan.trainable_params,
            adapter_dir: task.adapter_dir.clone(),
            losses: self.losses,
        })
    }
}

/// The task's dataset behind its tokenizer, as the loader reads it.
fn open_loader(
    source: &ModelSource,
    task: &TrainTask,
    open_source: &OpenSource<'_>,
) -> Result<Loader, EngineError> {
    let (s, cfg) = (&task.settings, source.config());
    let encoder = Encoder::from_assets(source.tokenizer()?, s.max_seq_len as usize)
        .with_vocab_size(cfg.vocab_size)
        .with_train_on_inputs(s.train_on_inputs);
    let pad = cfg.eos_token_id.or(cfg.bos_token_id).unwrap_or(0);
    let options = LoaderOptions::from_settings(s, pad);
    Loader::from_source(open_source(&task.dataset)?, Arc::new(encoder), &options)
}

fn no_job_dir() -> EngineError {
    EngineError::Setting {
        field: "job_dir".into(),
        detail: "this trainer was made without a job directory (Trainer::new); use Trainer::open to checkpoint and save".into(),
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn log_step(p: &MetricPoint, total_steps: u64) {
    tracing::info!(
        step = p.step,
        total_steps,
        epoch = format_args!("{:.3}", p.epoch),
        loss = format_args!("{:.4}", p.loss),
        lr = format_args!("{:.3e}", p.lr),
        grad_norm = format_args!("{:.3}", p.grad_norm.unwrap_or(f64::NAN)),
        tokens_per_s = format_args!("{:.0}", p.tokens_per_s),
        step_ms = format_args!("{:.1}", p.step_ms),
        data_wait_ms = format_args!("{:.2}", p.data_wait_ms),
        "step"
    );
}
