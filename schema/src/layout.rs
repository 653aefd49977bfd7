//! The state directory's layout, in one place: every path of the journal, a job's directory, its log,
//! record copy, checkpoints and adapter is spelled here and nowhere else (DESIGN §5).
//!
//! ```text
//! <state_dir>/journal.redb
//! <state_dir>/backups/                       journal copies (`lorad backup`)
//! <state_dir>/jobs/<id>/job.log              one log across all attempts
//! <state_dir>/jobs/<id>/job.json             a copy of the job's record (`lorad recover-journal`)
//! <state_dir>/jobs/<id>/checkpoints/step-N/  complete checkpoints
//! <state_dir>/jobs/<id>/adapter/             the final adapter, unless the job names another place
//! ```
use crate::JobId;
use std::path::{Path, PathBuf};

/// A daemon's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir(PathBuf);

impl StateDir {
    /// The state directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> StateDir {
        StateDir(path.into())
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `journal.redb`.
    pub fn journal(&self) -> PathBuf {
        self.0.join("journal.redb")
    }

    /// `lorad.lock`: held (flock) by the daemon that owns this state directory; holds its pid.
    pub fn lock(&self) -> PathBuf {
        self.0.join("lorad.lock")
    }

    /// `logs/`: rolling log files of a daemonized lorad (unless `log_dir` says otherwise).
    pub fn logs(&self) -> PathBuf {
        self.0.join("logs")
    }

    /// `lorad.pid`: the pid file of a daemonized lorad (unless `pidfile` says otherwise).
    pub fn pidfile(&self) -> PathBuf {
        self.0.join("lorad.pid")
    }

    /// `jobs/`, the parent of every job directory.
    pub fn jobs(&self) -> PathBuf {
        self.0.join("jobs")
    }

    /// `backups/`, where the daemon writes journal copies.
    pub fn backups(&self) -> PathBuf {
        self.0.join("backups")
    }

    /// `jobs/<id>/`.
    pub fn job(&self, id: JobId) -> JobDir {
        JobDir(self.jobs().join(id.0.to_string()))
    }
}

/// One job's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDir(PathBuf);

/// A checkpoint name that is not `step-<digits>` (as `checkpoints` lists them): never a path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid checkpoint name '{0}' (expected step-N, as listed by `checkpoints`)")]
pub struct BadCheckpointName(pub String);

impl JobDir {
    /// The log's file name inside a job directory (exporters bundle it).
    pub const LOG: &'static str = "job.log";
    /// The record copy's file name.
    pub const RECORD: &'static str = "job.json";
    /// The checkpoints' directory name.
    pub const CHECKPOINTS: &'static str = "checkpoints";

    /// The job directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> JobDir {
        JobDir(path.into())
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `job.log`.
    pub fn log(&self) -> PathBuf {
        self.0.join(Self::LOG)
    }

    /// `job.json`.
    pub fn record(&self) -> PathBuf {
        self.0.join(Self::RECORD)
    }

    /// `checkpoints/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.0.join(Self::CHECKPOINTS)
    }

    /// `checkpoints/step-<step>/`.
    pub fn checkpoint_at(&self, step: u64) -> PathBuf {
        self.checkpoints().join(checkpoint_name(step))
    }

    /// `checkpoints/<name>/` for a name a client gave, checked to be `step-<digits>` first.
    pub fn checkpoint(&self, name: &str) -> Result<PathBuf, BadCheckpointName> {
        if valid_checkpoint_name(name) {
            Ok(self.checkpoints().join(name))
        } else {
            Err(BadCheckpointName(name.to_string()))
        }
    }

    /// `adapter/`, the final adapter's default place.
    pub fn adapter(&self) -> PathBuf {
        self.0.join("adapter")
    }
}

/// `step-<step>`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step}")
}

/// Whether `name` is `step-<1 to 20 digits>`: no separators, no `..`, nothing but a checkpoint.
pub fn valid_checkpoint_name(name: &str) -> bool {
    name.strip_prefix("step-")
        .is_some_and(|d| !d.is_empty() && d.len() <= 20 && d.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_and_checkpoint_names() {
        let s = StateDir::new("/var/lib/lorad");
        let j = s.job(JobId(42));
        assert_eq!(j.path(), Path::new("/var/lib/lorad/jobs/42"));
        assert_eq!(j.log(), Path::new("/var/lib/lorad/jobs/42/job.log"));
        assert_eq!(
            j.checkpoint_at(7),
            Path::new("/var/lib/lorad/jobs/42/checkpoints/step-7")
        );
        assert_eq!(j.checkpoint("step-7"), Ok(j.checkpoint_at(7)));
        for bad in [
            "../../etc",
            "step-5/../../x",
            "/etc/passwd",
            "..",
            "step-5/",
            "step-",
            "step-1a",
        ] {
            assert_eq!(
                j.checkpoint(bad),
                Err(BadCheckpointName(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(s.journal(), Path::new("/var/lib/lorad/journal.redb"));
    }
}
