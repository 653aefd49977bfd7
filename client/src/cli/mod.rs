//! `loractl`: the command-line client. `main` parses [`Cli`] and calls [`run`]; errors come back to
//! `main`, which prints them as `loractl: <code>: <message>` via [`describe`].
pub mod args;
mod export;
mod follow;
mod output;
mod plot;
mod watch;
pub mod when;

pub use args::Cli;
use args::Command;
use lorad_client::lorad_schema::JobId;
use lorad_client::{Client, ClientError};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// A daemon error or any other failure.
pub const EXIT_FAILURE: u8 = 1;
/// `wait --timeout` ran out.
pub const EXIT_TIMEOUT: u8 = 3;
/// `watch` returned on a paused job.
pub const EXIT_PAUSED: u8 = 4;

/// The name sent in `hello`.
const CLIENT_NAME: &str = concat!("loractl/", env!("CARGO_PKG_VERSION"));

/// What every command needs: where the daemon is and how to print.
pub struct Ctx {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Machine output.
    pub json: bool,
}

impl Ctx {
    /// A new connection to the daemon.
    pub async fn connect(&self) -> Result<Client, ClientError> {
        Client::connect_as(&self.socket, CLIENT_NAME).await
    }
}

/// Runs one command; the exit code on success (wait and watch report the job's outcome through it).
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let socket = cli
        .socket
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(lorad_client::lorad_schema::paths::default_socket);
    let ctx = Ctx {
        socket,
        json: cli.json,
    };
    match cli.command {
        Command::Status => {
            let status = ctx.connect().await?.status().await?;
            show(&ctx, &status, output::status)
        }
        Command::Templates => {
            let templates = ctx.connect().await?.templates().await?;
            show(&ctx, &templates, |t| output::templates(t))
        }
        Command::Submit(args) if args.dry_run => {
            let spec = args.to_spec(&std::env::current_dir()?)?;
            let estimate = ctx.connect().await?.dry_run(spec).await?;
            show(&ctx, &estimate, |e| {
                let examples = e
                    .examples
                    .map(|n| format!("{n} examples; "))
                    .unwrap_or_default();
                format!(
                    "dry run, nothing queued: {examples}predicted peak memory {}\ndevices it may use: {}\n",
                    e.memory, e.devices
                )
            })
        }
        Command::Submit(args) => {
            let spec = args.to_spec(&std::env::current_dir()?)?;
            let record = ctx.connect().await?.submit(spec).await?;
            show(&ctx, &record, |r| format!("{}\n", r.id))
        }
        Command::List { state, all, wide } => {
            let jobs = ctx.connect().await?.list(state, all).await?;
            match wide {
                true => show(&ctx, &jobs, |j| output::job_table_wide(j)),
                false => show(&ctx, &jobs, |j| output::job_table(j)),
            }
        }
        Command::Show { job } => {
            let record = ctx.connect().await?.get(JobId(job)).await?;
            show(&ctx, &record, output::job_details)
        }
        Command::Metrics { job, since } => {
            let mut points = ctx.connect().await?.metrics(JobId(job), since).await?;
            points.sort_by_key(|p| p.step);
            show(&ctx, &points, |p| output::metrics_table(p))
        }
        Command::Cancel { job } => {
            let record = ctx.connect().await?.cancel(JobId(job)).await?;
            show(&ctx, &record, |r| format!("job {} {}\n", r.id, r.state))
        }
        Command::Pause { job } => {
            let record = ctx.connect().await?.pause(JobId(job)).await?;
            show(&ctx, &record, |r| format!("job {} {}\n", r.id, r.state))
        }
        Command::Resume { job, checkpoint } => {
            let record = ctx.connect().await?.resume(JobId(job), checkpoint).await?;
            show(&ctx, &record, |r| match &r.resume_checkpoint {
                Some(c) => format!("job {} {} (from {c})\n", r.id, r.state),
                None => format!("job {} {}\n", r.id, r.state),
            })
        }
        Command::Retry { job } => {
            let record = ctx.connect().await?.retry(JobId(job)).await?;
            show(&ctx, &record, |r| format!("job {} {}\n", r.id, r.state))
        }
        Command::Priority { job, priority } => {
            let record = ctx
                .connect()
                .await?
                .set_priority(JobId(job), priority)
                .await?;
            show(&ctx, &record, |r| {
                format!("job {} priority {}\n", r.id, r.priority)
            })
        }
        Command::Checkpoints { job } => {
            let checkpoints = ctx.connect().await?.checkpoints(JobId(job)).await?;
            show(&ctx, &checkpoints, |c| output::checkpoints_table(c))
        }
        Command::Export {
            job,
            format,
            out,
            checkpoint,
        } => export::export(&ctx, JobId(job), &format, &out, checkpoint).await,
        Command::Logs { job, follow } => follow::logs(&ctx, JobId(job), follow).await,
        Command::Wait { job, timeout } => follow::wait(&ctx, JobId(job), timeout).await,
        Command::Watch { jobs } => watch::watch(&ctx, jobs.into_iter().map(JobId).collect()).await,
        Command::Plot { jobs, out, size } => {
            let jobs: Vec<JobId> = jobs.into_iter().map(JobId).collect();
            plot::plot(&ctx, &jobs, &out, size).await
        }
        Command::Hold { job } => {
            let record = ctx.connect().await?.hold(JobId(job)).await?;
            show(&ctx, &record, |r| format!("job {} held\n", r.id))
        }
        Command::Release { job } => {
            let record = ctx.connect().await?.release(JobId(job)).await?;
            show(&ctx, &record, |r| format!("job {} {}\n", r.id, r.state))
        }
        Command::Delete { job, keep_record } => {
            let (removed, record_removed) =
                ctx.connect().await?.delete(JobId(job), keep_record).await?;
            let answer = serde_json::json!({
                "job": job, "removed": removed, "record_removed": record_removed,
            });
            show(&ctx, &answer, |_| {
                let mut text = format!("job {job} deleted");
                if !record_removed {
                    text.push_str(" (record kept)");
                }
                for path in &removed {
                    text.push_str(&format!("\nremoved {path}"));
                }
                text + "\n"
            })
        }
        Command::Shutdown => {
            ctx.connect().await?.shutdown().await?;
            show(&ctx, &serde_json::json!({"shutdown": true}), |_| {
                "the daemon is stopping\n".to_string()
            })
        }
    }
}

/// Prints `value` as pretty JSON with `--json`, else as `human` renders it.
fn show<T: serde::Serialize + ?Sized>(
    ctx: &Ctx,
    value: &T,
    human: impl Fn(&T) -> String,
) -> anyhow::Result<ExitCode> {
    if ctx.json {
        print_json(value)?;
    } else {
        write_out(&human(value))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to stdout now (no panic on a closed pipe, unlike `print!`).
pub fn write_out(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Pretty JSON and a newline on stdout.
pub fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    Ok(write_out(&format!("{text}\n"))?)
}

/// One line of compact JSON on stdout.
pub fn print_json_line<T: serde::Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string(value)?;
    Ok(write_out(&format!("{text}\n"))?)
}

/// The stderr line for a failed command (without the `loractl: ` prefix): `<code>: <message>`, where
/// code is the daemon's error code, or `error` for local failures. `None` when stdout was closed by
/// the reader (e.g. `loractl logs 1 | head`), which is not worth a message.
pub fn describe(err: &anyhow::Error) -> Option<String> {
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        if io.kind() == std::io::ErrorKind::BrokenPipe {
            return None;
        }
    }
    match err.downcast_ref::<ClientError>() {
        Some(ClientError::Server(wire)) => Some(format!("{}: {}", wire.code, wire.message)),
        // Its message already includes its cause.
        Some(other) => Some(format!("error: {other}")),
        None => Some(format!("error: {err:#}")),
    }
}
