//! Submit: resolve the template and overrides, validate model and dataset, then queue. Nothing is
//! written unless every check passes.
use super::Peer;
use crate::core::Core;
use lorad_schema::{
    now_ms, ErrorCode, JobRecord, JobSpec, Progress, Response, TrainSettings, WireError,
};
use std::path::Path;

fn invalid(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::InvalidArgument, msg)
}

pub async fn handle(core: &Core, peer: Peer, spec: JobSpec) -> Result<Response, WireError> {
    crate::quota::check_spec(&spec)?;
    let settings = resolve_settings(core, &spec)?;
    let slurm = crate::scheduler::runs_on_slurm_with(
        settings.executor,
        core.config.executor == crate::config::Executor::Slurm,
    );
    if slurm {
        crate::supervisor::slurm::check_sbatch(&core.config.slurm).map_err(invalid)?;
    }
    if !peer.is_admin() {
        crate::quota::may_prioritise(spec.priority, peer.uid, &core.config.limits)?;
        let jobs = core
            .read(|j| j.jobs())
            .await
            .map_err(super::journal_error)?;
        crate::quota::may_queue(&jobs, peer.uid, &core.config.limits)?;
    }

    // The model, the dataset and the output directory are the submitter's: a `lorad worker --check`
    // process checks them as that user, off the daemon, under a deadline. A dataset whose extension a
    // dataloader plugin claims is read by that plugin, in the training worker.
    let task = crate::worker::preflight::CheckTask {
        base_model: spec.base_model.clone().into(),
        dataset: spec.dataset.clone().into(),
        max_seq_len: settings.max_seq_len,
        max_line_bytes: settings.max_line_bytes,
        output_dir: spec.output_dir.clone().map(Into::into),
        plugin_format: core
            .plugins()
            .dataloader_for(Path::new(&spec.dataset))
            .map(|d| d.format.name),
        settings: Some(settings.clone()),
        // A Slurm job's memory is the cluster's to find: this machine's is no limit on it.
        memory_limit: (!slurm)
            .then(|| memory_limit(core, &settings.device))
            .flatten(),
        max_seq_len_explicit: spec.overrides.contains_key("max_seq_len"),
    };
    let checked = crate::supervisor::check::submit(core, peer.uid, task).await?;
    let examples = checked.examples;
    if spec.dry_run {
        return Ok(Response::Estimate(lorad_schema::Estimate {
            memory_estimate: checked.memory_estimate.unwrap_or(0),
            memory: checked.memory.unwrap_or_default(),
            examples: examples.map(|n| n as u64),
            devices: memory_limit(core, &settings.device)
                .map(|(_, d)| d)
                .unwrap_or_default(),
        }));
    }
    let estimate = checked.memory_estimate;
    // The template's sequence length is longer than the model's context: lowered, and said so.
    let mut settings = settings;
    let notice = checked.lowered_max_seq_len.map(|n| {
        let was = std::mem::replace(&mut settings.max_seq_len, n);
        format!("max_seq_len lowered from the template's {was} to {n}, the model's context")
    });

    let job = queue(core, peer, spec, settings, estimate, notice).await?;
    tracing::info!(job = %job.id, uid = peer.uid, examples = ?examples, template = %job.template, notice = ?job.reason, "job queued");
    // The job's directory exists from now on, with a copy of its record: if the journal were lost
    // before the job ever ran, `lorad recover-journal` still knows its id.
    let (dir, owner) = (core.config.job_dir(job.id), job.owner_uid);
    let made = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let who = crate::identity::for_owner(owner).map_err(|e| e.to_string())?;
        crate::logs::prepare_job_dir(&dir, who.map(|w| (w.uid, w.gid)))
            .map_err(|e| e.to_string())?;
        Ok(())
    })
    .await;
    core.keep_record(&job).await;
    if !matches!(made, Ok(Ok(()))) {
        tracing::warn!(job = %job.id, "cannot make the job's directory yet; its first attempt will");
    }
    core.kick.notify_one();
    Ok(Response::Job(job))
}

/// The most memory a device the job may use has (its `device` setting: `cpu`, `cuda:N`, or `auto`:
/// any GPU, and the CPU if `auto_cpu`), with those devices in words.
fn memory_limit(core: &Core, device: &str) -> Option<(u64, String)> {
    let cpu = || {
        let bytes = core
            .config
            .cpu_memory
            .or_else(|| crate::devices::meminfo("MemTotal"))?;
        Some((bytes, format!("cpu {}", lorad_engine::memory::human(bytes))))
    };
    let gpu = |g: &crate::devices::GpuInfo| {
        let bytes = g.memory_total;
        (
            bytes,
            format!("cuda:{} {}", g.index, lorad_engine::memory::human(bytes)),
        )
    };
    let mut options: Vec<(u64, String)> = match device {
        "cpu" => cpu().into_iter().collect(),
        "auto" => {
            let mut all: Vec<_> = core.devices.gpus.iter().map(gpu).collect();
            if core.config.auto_cpu {
                all.extend(cpu());
            }
            all
        }
        other => {
            let index = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<u32>().ok());
            let index = index.or((other == "cuda").then_some(0));
            index
                .and_then(|n| core.devices.gpu(n))
                .map(gpu)
                .into_iter()
                .collect()
        }
    };
    options.sort_by_key(|(bytes, _)| std::cmp::Reverse(*bytes));
    let most = options.first()?.0;
    let words: Vec<String> = options.into_iter().map(|(_, w)| w).collect();
    Some((most, words.join(", ")))
}

/// The template's settings with the spec's overrides, checked (`preflight::check_settings`).
fn resolve_settings(core: &Core, spec: &JobSpec) -> Result<TrainSettings, WireError> {
    let plugins = core.plugins();
    let template = plugins.template(&spec.template).ok_or_else(|| {
        let names: Vec<String> = plugins.templates().into_iter().map(|t| t.name).collect();
        invalid(if names.is_empty() {
            format!(
                "unknown template '{}': no template plugin is loaded (see `loractl status`)",
                spec.template
            )
        } else {
            format!(
                "unknown template '{}' (available: {})",
                spec.template,
                names.join(", ")
            )
        })
    })?;
    let mut settings = template.settings;
    for (key, value) in &spec.overrides {
        settings
            .set(key, value)
            .map_err(|e| invalid(e.to_string()))?;
    }
    crate::worker::preflight::check_settings(&settings).map_err(|e| invalid(e.to_string()))?;
    // A device this lorad or this machine does not have is refused now, not when the job starts.
    if let Some(why) = core
        .devices
        .refuse(&settings.device, cfg!(feature = "cuda"))
    {
        return Err(invalid(why));
    }
    Ok(settings)
}

/// Commits the job as queued; the quota is checked again under the write lock, so two submits
/// racing cannot both pass it.
async fn queue(
    core: &Core,
    peer: Peer,
    spec: JobSpec,
    settings: TrainSettings,
    memory_estimate: Option<u64>,
    notice: Option<String>,
) -> Result<JobRecord, WireError> {
    let layout = core.config.layout();
    let name = spec
        .name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| {
            Path::new(&spec.dataset)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "job".into())
        });
    let (limits, admin) = (core.config.limits.clone(), peer.is_admin());
    core.write(move |j| {
        let jobs = j.jobs()?;
        if !admin {
            crate::quota::may_queue(&jobs, peer.uid, &limits)
                .map_err(crate::journal::JournalError::Refused)?;
        }
        // Under the write lock: a prerequisite cannot fail between this check and the insert.
        crate::queue::check_after(&spec.after, &jobs, peer.uid, admin)
            .map_err(crate::journal::JournalError::Refused)?;
        let (job, event) = j.insert_job(|id| JobRecord {
            id,
            name,
            state: lorad_schema::JobState::Queued,
            reason: notice,
            owner_uid: peer.uid,
            priority: spec.priority,
            template: spec.template,
            base_model: spec.base_model,
            dataset: spec.dataset,
            output_dir: spec
                .output_dir
                .unwrap_or_else(|| layout.job(id).adapter().display().to_string()),
            settings,
            overrides: spec.overrides,
            progress: Progress::default(),
            created_at_ms: now_ms(),
            started_at_ms: None,
            finished_at_ms: None,
            adapter_dir: None,
            worker_pid: None,
            resume_checkpoint: None,
            requeued: false,
            memory_estimate,
            first_started_at_ms: None,
            after: spec.after,
            not_before_ms: spec.not_before_ms,
            on_finish: spec.on_finish,
        })?;
        Ok((job, vec![event]))
    })
    .await
    .map_err(super::journal_error)
}
