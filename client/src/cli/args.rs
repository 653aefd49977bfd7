//! Command-line arguments and the pure helpers that turn them into requests.
use clap::{Args, Parser, Subcommand};
use lorad_schema::{JobSpec, JobState};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Control lorad, the LoRA fine-tuning daemon.
#[derive(Debug, Parser)]
#[command(name = "loractl", version, max_term_width = 100)]
pub struct Cli {
    /// The daemon's socket [default: $LORAD_SOCKET, else $XDG_RUNTIME_DIR/lorad.sock if it exists,
    /// else /run/lorad/lorad.sock]
    // Not clap's `env`: it treats an empty LORAD_SOCKET as a missing value; default_socket() skips it.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Daemon version, uptime, devices and queue.
    Status,
    /// List the templates and their settings.
    Templates,
    /// Queue a new training job; prints its id.
    Submit(SubmitArgs),
    /// List jobs, oldest first.
    List {
        /// Only jobs in this state (queued, initializing, running, paused, completed, failed, cancelled).
        #[arg(long, value_name = "STATE")]
        state: Option<JobState>,
        /// Every user's jobs (admin only).
        #[arg(long)]
        all: bool,
        /// Also the device, energy and cost of each job.
        #[arg(long)]
        wide: bool,
    },
    /// Show one job.
    Show {
        /// Job id.
        job: u64,
    },
    /// A job's metric points.
    Metrics {
        /// Job id.
        job: u64,
        /// Only steps after this one.
        #[arg(long, value_name = "STEP")]
        since: Option<u64>,
    },
    /// Print a job's log.
    Logs {
        /// Job id.
        job: u64,
        /// Keep printing new output until the job ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Wait for a job to end: exit 0 if it completed, 1 if it failed or was cancelled, 3 on timeout.
    Wait {
        /// Job id.
        job: u64,
        /// Give up after this many seconds.
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        timeout: Option<f64>,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        job: u64,
    },
    /// Hold a queued job, or checkpoint and stop a running one.
    Pause {
        /// Job id.
        job: u64,
    },
    /// Put a paused job back in the queue.
    Resume {
        /// Job id.
        job: u64,
        /// Continue from this checkpoint (`step-N`, see `checkpoints`) [default: the newest].
        #[arg(long, value_name = "NAME")]
        checkpoint: Option<String>,
    },
    /// Put a failed or cancelled job back in the queue, resuming from its newest checkpoint.
    Retry {
        /// Job id.
        job: u64,
    },
    /// Change a job's priority (higher runs first).
    Priority {
        /// Job id.
        job: u64,
        /// The new priority.
        #[arg(allow_negative_numbers = true)]
        priority: i32,
    },
    /// List a job's checkpoints.
    Checkpoints {
        /// Job id.
        job: u64,
    },
    /// Export a job's adapter with an exporter plugin (peft, merged, zip), showing its progress.
    Export {
        /// Job id.
        job: u64,
        /// Export format, as `loractl status` lists the exporters (peft, merged, zip).
        #[arg(long)]
        format: String,
        /// Where to write (a directory, or a file for zip); must not exist yet.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Export this checkpoint (step-N, see `loractl checkpoints`) instead of the final adapter.
        #[arg(long)]
        checkpoint: Option<String>,
    },
    /// Follow jobs as they train: a progress bar with the ETA, the loss, its trend and a sparkline on a
    /// terminal; one plain line per step or state change otherwise (--json: one event per line).
    ///
    /// With no job id, follows every job that is initializing or running (admin: everyone's; jobs that
    /// start while watching join in). Returns when every followed job has ended, or, when stdout is
    /// not a terminal, has ended or been paused (a terminal keeps waiting for a paused job to resume).
    ///
    /// Exit codes: 0 completed; 1 failed or cancelled (or an error); 4 paused. With several jobs, the
    /// worst of them: failed or cancelled, then paused, then completed.
    Watch {
        /// Job ids [default: every active job].
        jobs: Vec<u64>,
    },
    /// Draw jobs' loss curves (raw and smoothed) and learning rate over steps into an SVG or PNG file;
    /// several jobs are overlaid to compare runs.
    Plot {
        /// Job ids.
        #[arg(required = true)]
        jobs: Vec<u64>,
        /// The image to write: FILE.svg or FILE.png (the extension picks the format).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The image's size in pixels.
        #[arg(long, value_name = "WxH", default_value = "1000x600", value_parser = crate::cli::plot::parse_size)]
        size: (u32, u32),
    },
    /// Keep a queued job from starting until `release` (it shows as paused, "held").
    Hold {
        /// Job id.
        job: u64,
    },
    /// Let a held job start: it goes back to the queue.
    Release {
        /// Job id.
        job: u64,
    },
    /// Remove a job that has ended: its files in the state directory, and its record unless
    /// --keep-record. An adapter written to a directory you chose (--out) is kept.
    Delete {
        /// Job id.
        job: u64,
        /// Keep the job's history row (record, metrics, events); remove only its files.
        #[arg(long)]
        keep_record: bool,
    },
    /// Stop the daemon (admin only); running jobs checkpoint and resume at its next start.
    Shutdown,
}

/// Arguments of `submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Template to start from (`loractl templates` lists them).
    #[arg(long, short)]
    pub template: String,
    /// Base model: an HF model directory or a .gguf file.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Training data (JSONL).
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// A name for people [default: the dataset's file stem].
    #[arg(long)]
    pub name: Option<String>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Where to write the adapter [default: in the daemon's state directory].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Override a template setting; repeatable. Lists are comma-separated.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
    /// Check everything and print the predicted peak memory; queue nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Start only after these jobs complete (comma-separated ids); if one fails or is cancelled,
    /// this job is cancelled too.
    #[arg(long, value_name = "ID[,ID]", value_delimiter = ',')]
    pub after: Vec<u64>,
    /// Do not start before TIME: `2026-12-24T06:00:00Z` or with an offset (`+01:00`), a local
    /// `2026-12-24 06:00` or `06:00` (the next one), or a delay (`+90m`, `+2h 30m`).
    #[arg(long, value_name = "TIME", value_parser = crate::cli::when::parse_time)]
    pub not_before: Option<u64>,
    /// Run this shell command, as you, when the job completes, fails or is cancelled; the job's
    /// LORAD_JOB_ID, LORAD_JOB_NAME, LORAD_JOB_STATE, LORAD_JOB_REASON and LORAD_ADAPTER_DIR are in
    /// its environment and its output goes to the job's log.
    #[arg(long, value_name = "CMD")]
    pub on_finish: Option<String>,
}

/// Parses `key=value` (the value may itself contain '=').
pub fn parse_set(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        Some(_) => Err(format!("'{s}' has no key before '='")),
        None => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

/// Parses a non-negative number of seconds.
pub fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1e12).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds")),
    }
}

/// `path` made absolute against `cwd` (not canonicalised: the daemon checks the file).
pub fn absolutize(path: &Path, cwd: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path.strip_prefix(".").unwrap_or(path))
    }
}

fn path_string(what: &str, path: &Path, cwd: &Path) -> anyhow::Result<String> {
    let abs = absolutize(path, cwd);
    abs.to_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{what} path {} is not valid UTF-8", abs.display()))
}

impl SubmitArgs {
    /// The job spec to send, with paths made absolute against `cwd` (the daemon does not share it).
    pub fn to_spec(&self, cwd: &Path) -> anyhow::Result<JobSpec> {
        let overrides: BTreeMap<String, String> = self.set.iter().cloned().collect();
        Ok(JobSpec {
            name: self.name.clone(),
            template: self.template.clone(),
            base_model: path_string("model", &self.model, cwd)?,
            dataset: path_string("data", &self.data, cwd)?,
            output_dir: self
                .out
                .as_deref()
                .map(|p| path_string("output", p, cwd))
                .transpose()?,
            priority: self.priority,
            overrides,
            dry_run: self.dry_run,
            after: self
                .after
                .iter()
                .map(|&id| lorad_schema::JobId(id))
                .collect(),
            not_before_ms: self.not_before,
            on_finish: self.on_finish.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("loractl").chain(args.iter().copied()))
    }

    #[test]
    fn set_splits_at_the_first_equals() {
        assert_eq!(parse_set("lr=1e-3"), Ok(("lr".into(), "1e-3".into())));
        assert_eq!(
            parse_set("target_modules=q_proj,v_proj"),
            Ok(("target_modules".into(), "q_proj,v_proj".into()))
        );
        assert_eq!(parse_set("name=a=b"), Ok(("name".into(), "a=b".into())));
        assert_eq!(parse_set("max_steps="), Ok(("max_steps".into(), "".into())));
        assert!(parse_set("lr").is_err());
        assert!(parse_set("=3").is_err());
    }

    #[test]
    fn malformed_set_is_a_usage_error_with_exit_code_2() {
        let err = parse(&[
            "submit", "-t", "x", "--model", "m", "--data", "d", "--set", "lr",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn relative_paths_become_absolute_against_cwd() {
        let cwd = Path::new("/home/u/work");
        assert_eq!(
            absolutize(Path::new("data/train.jsonl"), cwd),
            Path::new("/home/u/work/data/train.jsonl")
        );
        assert_eq!(
            absolutize(Path::new("./m"), cwd),
            Path::new("/home/u/work/m")
        );
        assert_eq!(
            absolutize(Path::new("../m"), cwd),
            Path::new("/home/u/work/../m")
        );
        assert_eq!(absolutize(Path::new("/abs/m"), cwd), Path::new("/abs/m"));
    }

    #[test]
    fn submit_builds_the_spec() {
        let cli = parse(&[
            "submit",
            "--template",
            "basic-fine-tune",
            "--model",
            "models/tiny",
            "--data",
            "/d/train.jsonl",
            "--name",
            "n",
            "--priority",
            "-3",
            "--out",
            "out",
            "--set",
            "lr=1e-3",
            "--set",
            "max_steps=30",
            "--set",
            "lr=2e-3",
        ])
        .unwrap();
        let Command::Submit(args) = cli.command else {
            panic!("not submit")
        };
        let spec = args.to_spec(Path::new("/cwd")).unwrap();
        assert_eq!(spec.template, "basic-fine-tune");
        assert_eq!(spec.base_model, "/cwd/models/tiny");
        assert_eq!(spec.dataset, "/d/train.jsonl");
        assert_eq!(spec.output_dir.as_deref(), Some("/cwd/out"));
        assert_eq!(spec.name.as_deref(), Some("n"));
        assert_eq!(spec.priority, -3);
        assert_eq!(
            spec.overrides.get("lr").map(String::as_str),
            Some("2e-3"),
            "the last --set wins"
        );
        assert_eq!(
            spec.overrides.get("max_steps").map(String::as_str),
            Some("30")
        );
    }

    #[test]
    fn global_flags_and_states() {
        let cli = parse(&[
            "list",
            "--state",
            "running",
            "--json",
            "--socket",
            "/tmp/x.sock",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.socket.as_deref(), Some(Path::new("/tmp/x.sock")));
        assert!(matches!(
            cli.command,
            Command::List {
                state: Some(JobState::Running),
                all: false,
                wide: false
            }
        ));
        assert_eq!(
            parse(&["list", "--state", "sleeping"])
                .unwrap_err()
                .exit_code(),
            2
        );
        assert_eq!(parse(&["show"]).unwrap_err().exit_code(), 2);
        assert_eq!(
            parse(&["wait", "4", "--timeout", "-1"])
                .unwrap_err()
                .exit_code(),
            2
        );
        assert!(matches!(
            parse(&["logs", "-f", "7"]).unwrap().command,
            Command::Logs {
                job: 7,
                follow: true
            }
        ));
    }

    #[test]
    fn watch_takes_any_number_of_jobs_and_plot_at_least_one() {
        assert!(
            matches!(parse(&["watch"]).unwrap().command, Command::Watch { jobs } if jobs.is_empty())
        );
        assert!(
            matches!(parse(&["watch", "3", "4"]).unwrap().command, Command::Watch { jobs } if jobs == [3, 4])
        );
        let Command::Plot { jobs, out, size } =
            parse(&["plot", "1", "2", "--out", "l.png", "--size", "640x480"])
                .unwrap()
                .command
        else {
            panic!("not plot")
        };
        assert_eq!(
            (jobs, out, size),
            (vec![1, 2], PathBuf::from("l.png"), (640, 480))
        );
        assert_eq!(
            parse(&["plot", "--out", "l.svg"]).unwrap_err().exit_code(),
            2
        );
        assert_eq!(parse(&["plot", "1"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
