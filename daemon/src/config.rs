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

    /// `<state_dir>/journal.redb`
    pub fn journal_path(&self) -> PathBuf {
        self.state_dir.join("journal.redb")
    }

    /// `<state_dir>/jobs/<id>`
    pub fn job_dir(&self, id: lorad_schema::JobId) -> PathBuf {
        self.state_dir.join("jobs").join(id.0.to_string())
    }
}
