//! The daemon's configuration: defaults, the TOML file, and flags on top.
use crate::plugins::{Pick, PluginDir};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything `run` needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the socket is bound.
    pub socket: PathBuf,
    /// Journal and job directories.
    pub state_dir: PathBuf,
    /// The executable started as `<exe> worker`.
    pub worker_exe: PathBuf,
    /// Largest frame accepted from a client.
    pub max_frame: usize,
    /// Time between SIGTERM and SIGKILL when a worker is stopped.
    pub kill_grace: Duration,
    /// Socket permissions: 0o600 for a user daemon, 0o660 for the system daemon.
    pub socket_mode: u32,
    /// Where plugins are looked for, in order (scanned at start and on SIGHUP).
    pub plugin_dirs: Vec<PluginDir>,
    /// The system service (not `--user`): plugins must be root-owned, the socket has a group.
    pub system: bool,
    /// The socket's group (system mode; default `lorad`). None: the daemon's own group.
    pub socket_group: Option<String>,
    /// Members of this group are admins (besides root and the daemon's own user).
    pub admin_group: Option<String>,
    /// What one user and all clients together may hold.
    pub limits: Limits,
    /// Jobs that may train on the CPU at once.
    pub cpu_slots: usize,
    /// Threads of each CPU job (RAYON_NUM_THREADS of its worker).
    pub cpu_threads: usize,
    /// `device=auto` may run on the CPU when no GPU is free.
    pub auto_cpu: bool,
    /// The RAPL energy counter of the CPU package (`energy_uj`, `max_energy_range_uj`).
    pub rapl_dir: PathBuf,
    /// Price of a kWh, for a job's cost (no currency: the admin's).
    pub price_per_kwh: Option<f64>,
    /// Price of an hour of training, for a job's cost.
    pub price_per_hour: Option<f64>,
    /// Memory CPU jobs may use, bytes (None: the machine's MemTotal).
    pub cpu_memory: Option<u64>,
    /// Commands run when jobs complete, fail, are cancelled, paused or restarted.
    pub hooks: Vec<crate::hooks::HookConfig>,
    /// Where jobs with `executor=default` run: here, or as Slurm jobs.
    pub executor: Executor,
    /// How to reach Slurm (used by jobs that run there).
    pub slurm: SlurmConfig,
}

/// The daemon's executor (`executor` in lorad.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Executor {
    /// Worker processes on this machine.
    #[default]
    Local,
    /// One Slurm job per attempt.
    Slurm,
}

/// `[slurm]` in lorad.toml: the commands, and what every Slurm job of this daemon gets.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmConfig {
    /// `sbatch` (a name looked up in PATH, or a path).
    pub sbatch: PathBuf,
    /// `scontrol`.
    pub scontrol: PathBuf,
    /// `scancel`.
    pub scancel: PathBuf,
    /// The partition of jobs that name none (None: the cluster's default).
    pub partition: Option<String>,
    /// Seconds before a time limit at which Slurm signals the worker to checkpoint and stop
    /// (`--signal=B:TERM@N`).
    pub signal_grace_s: u64,
    /// How often the events file and the job's state are read, in milliseconds (the channel is a
    /// file on shared storage: there is no event to wait on across nodes).
    pub poll_ms: u64,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            sbatch: PathBuf::from("sbatch"),
            scontrol: PathBuf::from("scontrol"),
            scancel: PathBuf::from("scancel"),
            partition: None,
            signal_grace_s: 120,
            poll_ms: 500,
        }
    }
}

/// The CPU package's RAPL counter, where Linux puts it.
pub const RAPL_DIR: &str = "/sys/class/powercap/intel-rapl:0";

/// Threads per CPU job by default: the machine's cores shared among the slots.
pub fn default_cpu_threads(slots: usize) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (cores / slots.max(1)).max(1)
}

/// Per-user quotas and the bounds on what clients may hold in the daemon. Every value has a default
/// that fits a shared workstation; `[limits]` in the config file changes them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Jobs one user may have queued or paused (not yet running) at once.
    pub max_queued_per_user: usize,
    /// Jobs of one user that may be initializing or running at once.
    pub max_running_per_user: usize,
    /// The highest priority a non-admin may give a job.
    pub max_priority: i32,
    /// Open client connections in total (lowered at start to what the fd limit allows).
    pub max_connections: usize,
    /// Open client connections of one uid.
    pub max_connections_per_user: usize,
    /// Bytes of partly received frames across all connections.
    pub max_pending_frame_bytes: usize,
    /// Seconds a frame may take to arrive once it has started.
    pub frame_timeout_s: u64,
    /// Seconds the submit-time check of a model and dataset may take.
    pub check_timeout_s: u64,
    /// Submit-time checks running at once (all users); more wait.
    pub max_checks: usize,
    /// Submit-time checks of one user running at once; more are refused as busy.
    pub max_checks_per_user: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queued_per_user: 100,
            max_running_per_user: 4,
            max_priority: 100,
            max_connections: 1024,
            max_connections_per_user: 128,
            max_pending_frame_bytes: 64 << 20,
            frame_timeout_s: 30,
            check_timeout_s: 300,
            max_checks: 8,
            max_checks_per_user: 4,
        }
    }
}

/// The subset of settings the TOML file may hold; flags override them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Socket path.
    pub socket: Option<PathBuf>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Largest client frame in bytes.
    pub max_frame: Option<usize>,
    /// Seconds between SIGTERM and SIGKILL for a worker.
    pub kill_grace_s: Option<u64>,
    /// Extra plugin directories, searched after the default ones.
    pub plugin_dirs: Option<Vec<PathBuf>>,
    /// Search the default plugin directories (default true).
    pub default_plugins: Option<bool>,
    /// The socket's group (system mode; default `lorad`).
    pub socket_group: Option<String>,
    /// The socket's permissions (default 0o660 system, 0o600 user).
    pub socket_mode: Option<u32>,
    /// Members of this group may see and control every job.
    pub admin_group: Option<String>,
    /// Quotas and client bounds.
    pub limits: Option<Limits>,
    /// Rolling log files here when not under systemd (default: none, `<state_dir>/logs` when
    /// daemonized).
    pub log_dir: Option<PathBuf>,
    /// How often a new log file starts (default daily).
    pub log_rotation: Option<crate::logging::Rotation>,
    /// Log files kept, the current one included (default 7).
    pub log_keep: Option<usize>,
    /// Log filter, e.g. "info" or "lorad=debug" (default "info"; RUST_LOG wins).
    pub log_level: Option<String>,
    /// The pid file of a daemonized lorad (default `<state_dir>/lorad.pid`).
    pub pidfile: Option<PathBuf>,
    /// Jobs that may train on the CPU at once (default 1).
    pub cpu_slots: Option<usize>,
    /// Threads of each CPU job (default: the cores divided among the CPU slots).
    pub cpu_threads: Option<usize>,
    /// `device=auto` may run on the CPU when no GPU is free (default true).
    pub auto_cpu: Option<bool>,
    /// The RAPL counter directory (default /sys/class/powercap/intel-rapl:0).
    pub rapl_dir: Option<PathBuf>,
    /// Price of a kWh, for jobs' cost (default: none).
    pub price_per_kwh: Option<f64>,
    /// Price of an hour of training, for jobs' cost (default: none).
    pub price_per_hour: Option<f64>,
    /// Memory CPU jobs may use, GB (default: the machine's memory).
    pub cpu_memory_gb: Option<f64>,
    /// `[[hooks]]`: commands run as the job's owner on job events.
    pub hooks: Option<Vec<crate::hooks::HookConfig>>,
    /// `local` or `slurm`.
    pub executor: Option<Executor>,
    /// `[slurm]`.
    pub slurm: Option<SlurmConfig>,
}

/// Why the configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("config {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error, with line and column.
        detail: String,
    },
    /// A group named in the configuration does not exist.
    #[error("group '{name}' ({what}) does not exist: create it (groupadd {name}, or systemd-sysusers with lorad.sysusers) or name another in the config")]
    NoGroup {
        /// The group.
        name: String,
        /// The setting that names it.
        what: &'static str,
    },
    /// No place for user-mode state.
    #[error("cannot find a state directory: set --state-dir, XDG_STATE_HOME or HOME")]
    NoStateDir,
}

impl FileConfig {
    /// Reads a TOML config file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            detail: e.to_string(),
        })
    }
}

/// The gid of the socket group `name` (start-up: a missing group is an error, not a silent default).
pub fn group_id(name: &str) -> Result<u32, ConfigError> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(ConfigError::NoGroup {
            name: name.to_string(),
            what: "socket_group",
        }),
    }
}

/// Default paths for a user daemon (`--user`) or the system daemon.
pub fn default_paths(user: bool) -> Result<(PathBuf, PathBuf), ConfigError> {
    if !user {
        return Ok((
            PathBuf::from(lorad_schema::paths::SYSTEM_SOCKET),
            PathBuf::from("/var/lib/lorad"),
        ));
    }
    let env_dir = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let state = env_dir("XDG_STATE_HOME")
        .or_else(|| env_dir("HOME").map(|h| h.join(".local/state")))
        .ok_or(ConfigError::NoStateDir)?
        .join("lorad");
    let socket = match env_dir("XDG_RUNTIME_DIR") {
        Some(run) => run.join("lorad.sock"),
        None => state.join("lorad.sock"),
    };
    Ok((socket, state))
}

impl Config {
    /// A config for `socket` and `state_dir` with every other value at its default; the worker is this
    /// executable.
    pub fn new(socket: PathBuf, state_dir: PathBuf) -> Config {
        let worker_exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("lorad"));
        Config {
            socket,
            state_dir,
            plugin_dirs: crate::plugins::default_dirs(&worker_exe),
            worker_exe,
            max_frame: lorad_schema::MAX_FRAME,
            kill_grace: Duration::from_secs(3),
            socket_mode: 0o600,
            system: false,
            socket_group: None,
            admin_group: None,
            limits: Limits::default(),
            cpu_slots: 1,
            cpu_threads: default_cpu_threads(1),
            auto_cpu: true,
            rapl_dir: PathBuf::from(RAPL_DIR),
            price_per_kwh: None,
            price_per_hour: None,
            cpu_memory: None,
            hooks: Vec::new(),
            executor: Executor::Local,
            slurm: SlurmConfig::default(),
        }
    }

    /// Sets the plugin search path: the default directories (unless `defaults` is false), then
    /// `extra`, in order.
    pub fn set_plugin_dirs(&mut self, defaults: bool, extra: &[PathBuf]) {
        self.plugin_dirs = if defaults {
            crate::plugins::default_dirs(&self.worker_exe)
        } else {
            Vec::new()
        };
        self.plugin_dirs.extend(extra.iter().map(|path| PluginDir {
            path: path.clone(),
            pick: Pick::All,
        }));
    }

    /// The state directory's layout.
    pub fn layout(&self) -> lorad_schema::layout::StateDir {
        lorad_schema::layout::StateDir::new(&self.state_dir)
    }

    /// `<state_dir>/journal.redb`
    pub fn journal_path(&self) -> PathBuf {
        self.layout().journal()
    }

    /// `<state_dir>/jobs/<id>`
    pub fn job_dir(&self, id: lorad_schema::JobId) -> PathBuf {
        self.layout().job(id).path().to_path_buf()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `systemd/lorad.toml` documents every key: uncommented, it must load, and name them all.
    #[test]
    fn the_example_config_loads_with_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/lorad.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| {
                l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))
            })
            .collect();
        let file: FileConfig = toml::from_str(&keys.join("\n")).unwrap();
        assert_eq!(file.log_keep, Some(7));
        assert_eq!(file.log_rotation, Some(crate::logging::Rotation::Daily));
        assert_eq!(file.limits, Some(Limits::default()));
        for key in [
            "socket",
            "state_dir",
            "max_frame",
            "kill_grace_s",
            "plugin_dirs",
            "default_plugins",
            "socket_group",
            "socket_mode",
            "admin_group",
            "log_dir",
            "log_rotation",
            "log_keep",
            "log_level",
            "pidfile",
            "cpu_slots",
            "cpu_threads",
            "auto_cpu",
            "rapl_dir",
            "price_per_kwh",
            "price_per_hour",
            "cpu_memory_gb",
            "executor",
            "sbatch",
            "scontrol",
            "scancel",
            "partition",
            "signal_grace_s",
            "poll_ms",
            "events",
            "command",
            "timeout_s",
        ] {
            assert!(
                keys.iter().any(|l| l.starts_with(&format!("{key} = "))),
                "{key} is not in lorad.toml"
            );
        }
    }
}
