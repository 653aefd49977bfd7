//! One attempt of one job: spawn `lorad worker` as the job's owner with job.log as its output, and
//! feed it its task. Following it is `watch`'s, recording its reports `reports`'s.
use crate::channel::{ToWorker, CONTROL_FD};
use crate::core::{Core, WorkerHandle};
use crate::identity::Identity;
use crate::logs;
use crate::plugins::PluginRef;
use crate::scheduler::Slot;
use crate::worker::process::Mode;
use crate::worker::TrainTask;
use command_fds::{CommandFdExt, FdMapping};
use lorad_schema::{frame, JobRecord};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use tokio::net::UnixStream;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A process or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The control descriptor could not be mapped.
    #[error("cannot pass the control channel: {0}")]
    Fd(String),
    /// The task could not be sent.
    #[error("cannot send the task: {0}")]
    Frame(#[from] frame::FrameError),
    /// The job's owner cannot be run as.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// Slurm refused the job or could not be reached (sbatch's own message).
    #[error("Slurm: {0}")]
    Slurm(String),
}

impl SpawnError {
    /// Whether the disk was full (ENOSPC, or the owner's quota).
    pub fn no_space(&self) -> bool {
        matches!(self, SpawnError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }
}

pub(super) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> SpawnError {
    move |source| SpawnError::Io { what, source }
}

/// A started worker.
pub struct Running {
    pub(super) child: Child,
    pub(super) control: UnixStream,
    pub(super) stop: CancellationToken,
    /// Where it runs.
    pub(super) slot: Slot,
    /// No progress for this long while training = stalled (3x while loading or saving).
    pub(super) stall_timeout: std::time::Duration,
    /// job.log, and where this attempt's part of it starts (its separator).
    pub(super) log_path: PathBuf,
    pub(super) log_offset: u64,
}

/// Starts the worker for `job` and registers it in `core.workers`.
pub async fn spawn(
    core: &Core,
    job: &JobRecord,
    why: &str,
    slot: Slot,
) -> Result<Running, SpawnError> {
    let job_dir = core.config.job_dir(job.id);
    let log_path = logs::log_path(&job_dir);
    let resume_from = resume_point(job, &job_dir);
    let from = match &resume_from {
        Some(dir) => format!(
            "resuming from {}",
            dir.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ),
        None => "from the start".to_string(),
    };
    let device = slot.device();
    let separator = logs::separator(&format!("{why}; {from}; on {device}"));
    let (who, log, log_offset) =
        open_log(job.owner_uid, job_dir.clone(), log_path.clone(), separator).await?;
    let (child, mut control) = start_worker(
        core,
        Mode::Train,
        Some(slot),
        who.as_ref(),
        Stdio::from(log.try_clone().map_err(io("dup job.log"))?),
        Stdio::from(log),
    )?;
    let pid = child.id().unwrap_or(0);
    let task = TrainTask {
        job: job.id,
        base_model: PathBuf::from(&job.base_model),
        dataset: PathBuf::from(&job.dataset),
        adapter_dir: PathBuf::from(&job.output_dir),
        job_dir,
        // The device the scheduler chose (`auto` resolved): the worker trains there.
        settings: lorad_schema::TrainSettings {
            device,
            ..job.settings.clone()
        },
        pin_resume: job.resume_checkpoint.is_some() && resume_from.is_some(),
        resume_from,
    };
    let dataloader = dataloader_for(core, &task);
    frame::write_msg_async(&mut control, &ToWorker::Train { task, dataloader }).await?;

    let stop = CancellationToken::new();
    if let Ok(mut workers) = core.workers.lock() {
        let handle = WorkerHandle {
            pid,
            stop: stop.clone(),
            slot,
        };
        workers.insert(job.id, handle);
    }
    tracing::info!(job = %job.id, pid, "worker started");
    Ok(Running {
        child,
        control,
        stop,
        slot,
        stall_timeout: std::time::Duration::from_secs(job.settings.stall_timeout),
        log_path,
        log_offset,
    })
}

/// The checkpoint an attempt resumes from: the one the user named, else the newest one whose steps
/// are all in the journal (one written after a step the journal could not record, on a full disk or
/// by a killed daemon, would skip that step's point); None: a fresh start.
fn resume_point(job: &JobRecord, job_dir: &std::path::Path) -> Option<PathBuf> {
    match &job.resume_checkpoint {
        Some(name) => lorad_schema::layout::JobDir::new(job_dir)
            .checkpoint(name)
            .ok(),
        None => crate::worker::checkpoint::latest_checkpoint_at_most(job_dir, job.progress.step),
    }
}

/// Off the runtime: the owner's identity, the job directory made theirs, and job.log opened for
/// appending with the attempt's separator written; returns where this attempt's part starts.
pub(super) async fn open_log(
    owner: u32,
    job_dir: PathBuf,
    log_path: PathBuf,
    separator: String,
) -> Result<(Option<Identity>, std::fs::File, u64), SpawnError> {
    tokio::task::spawn_blocking(move || -> Result<_, SpawnError> {
        let who = crate::identity::for_owner(owner)?;
        let ids = who.as_ref().map(|w| (w.uid, w.gid));
        logs::prepare_job_dir(&job_dir, ids).map_err(io("make the job directory"))?;
        let log = logs::open_append(&log_path, ids).map_err(io("open job.log"))?;
        let before = log.metadata().map(|m| m.len()).unwrap_or(0);
        (&log)
            .write_all(separator.as_bytes())
            .map_err(io("write job.log"))?;
        Ok((who, log, before))
    })
    .await
    .map_err(|e| SpawnError::Io {
        what: "open job.log",
        source: std::io::Error::other(e),
    })?
}

/// A dataset whose extension a dataloader plugin claims is read by that plugin, in the worker.
pub(super) fn dataloader_for(core: &Core, task: &TrainTask) -> Option<PluginRef> {
    let plugins = core.plugins();
    let d = plugins.dataloader_for(&task.dataset)?;
    Some(PluginRef {
        library: d.lib.path.clone(),
        name: d.lib.name.clone(),
        format: d.format.name,
    })
}

/// Starts `lorad worker [--export|--check]` in its own process group with the control channel on fd
/// 3, as `who` (None: as the daemon) with a minimal environment.
pub(super) fn start_worker(
    core: &Core,
    mode: Mode,
    slot: Option<Slot>,
    who: Option<&Identity>,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<(Child, UnixStream), SpawnError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(io("socketpair"))?;
    let mut cmd = tokio::process::Command::new(&core.config.worker_exe);
    cmd.arg("worker");
    match mode {
        Mode::Train => {}
        Mode::Export => {
            cmd.arg("--export");
        }
        Mode::Check => {
            cmd.arg("--check");
        }
    }
    crate::identity::apply(&mut cmd, who);
    // A CPU job gets its share of the cores. A GPU job's cuda:N is NVML's index N, which is CUDA's N
    // only in PCI bus order (CUDA's default puts the fastest GPU first).
    match slot {
        Some(Slot::Cpu) => {
            cmd.env("RAYON_NUM_THREADS", core.config.cpu_threads.to_string());
        }
        Some(Slot::Gpu(_)) => {
            cmd.env("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
        }
        Some(Slot::Slurm) | None => {}
    }
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .env(
            "RUST_LOG",
            std::env::var("LORAD_WORKER_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env_remove("LORAD_SOCKET")
        .process_group(0)
        .kill_on_drop(true);
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: theirs.into(),
        child_fd: CONTROL_FD,
    }])
    .map_err(|e| SpawnError::Fd(e.to_string()))?;
    let child = cmd.spawn().map_err(io("spawn lorad worker"))?;
    // Drop our copy of the worker's end, so that its exit closes the channel.
    drop(cmd);
    ours.set_nonblocking(true).map_err(io("control channel"))?;
    let control = UnixStream::from_std(ours).map_err(io("control channel"))?;
    Ok((child, control))
}
