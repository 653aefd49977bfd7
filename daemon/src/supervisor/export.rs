//! One export: `lorad worker --export` opens the exporter plugin and runs `export.run`. Its output is
//! appended to the job's log (after a separator) and published line by line as the job's `export`
//! events, which is how `loractl export` shows progress. Exports run beside training, never in the
//! daemon: a crashing exporter takes down only its worker.
use super::attempt::{io, start_worker, SpawnError};
use crate::channel::{ExportTask, FromWorker, ToWorker};
use crate::core::Core;
use crate::logs;
use lorad_schema::{frame, EventBody, JobId};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

/// Runs `task` for job `id` and returns the files written, or why the export failed.
pub async fn run(core: &Core, id: JobId, task: ExportTask) -> Result<Vec<String>, String> {
    let format = task.plugin.format.clone();
    let what = match &task.request.checkpoint {
        Some(name) => format!("checkpoint {name} -> {}", task.request.out),
        None => format!("final adapter -> {}", task.request.out),
    };
    let log_path = logs::log_path(&core.config.job_dir(id));
    append_log(&log_path, logs::export_separator(&format, &what)).await;
    publish(core, id, &format, format!("started: {what}")).await;
    let result = run_worker(core, id, &format, &log_path, task).await;
    let text = match &result {
        Ok(files) => format!("done: {} files", files.len()),
        Err(e) => format!("failed: {e}"),
    };
    append_log(&log_path, format!("lorad: export {format} {text}\n")).await;
    publish(core, id, &format, text).await;
    result
}

async fn run_worker(
    core: &Core,
    id: JobId,
    format: &str,
    log_path: &std::path::Path,
    task: ExportTask,
) -> Result<Vec<String>, String> {
    let spawned = async {
        let owner = core
            .read(move |j| j.job(id))
            .await
            .map(|job| job.owner_uid)
            .map_err(|e| io("read the job")(std::io::Error::other(e.to_string())))?;
        let who = tokio::task::spawn_blocking(move || crate::identity::for_owner(owner))
            .await
            .map_err(|e| io("look up the job's owner")(std::io::Error::other(e)))??;
        let (mut child, mut control) = start_worker(
            core,
            crate::worker::process::Mode::Export,
            None,
            who.as_ref(),
            Stdio::piped(),
            Stdio::piped(),
        )?;
        frame::write_msg_async(&mut control, &ToWorker::Export { task }).await?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| io("worker stdout")(missing()))?;
        let err = child
            .stderr
            .take()
            .ok_or_else(|| io("worker stderr")(missing()))?;
        Ok::<_, SpawnError>((child, control, out, err))
    };
    let (mut child, mut control, out, err) = spawned
        .await
        .map_err(|e| format!("cannot start the export worker: {e}"))?;
    tracing::info!(job = %id, format, pid = child.id().unwrap_or(0), "export worker started");

    let lines = async {
        tokio::join!(
            forward(core, id, format, log_path, out),
            forward(core, id, format, log_path, err)
        )
    };
    let reports = async {
        let mut outcome: Option<Result<Vec<String>, String>> = None;
        while let Ok(msg) =
            frame::read_msg_async::<FromWorker, _>(&mut control, frame::MAX_FRAME).await
        {
            match msg {
                FromWorker::Exported { files } => outcome = Some(Ok(files)),
                FromWorker::Failed { message } => outcome = Some(Err(message)),
                _ => {}
            }
        }
        outcome
    };
    let (_, outcome) = tokio::join!(lines, reports);
    let status = child
        .wait()
        .await
        .map_err(|e| format!("export worker: {e}"))?;
    match outcome {
        Some(result) => result,
        None => Err(match (status.code(), status.signal()) {
            (_, Some(sig)) => format!("the export worker was killed by signal {sig}"),
            (Some(code), _) => {
                format!("the export worker exited with code {code} without a result")
            }
            _ => "the export worker ended without a result".into(),
        }),
    }
}

fn missing() -> std::io::Error {
    std::io::Error::other("not captured")
}

/// Appends each line of the worker's output to job.log and publishes it as an `export` event.
async fn forward(
    core: &Core,
    id: JobId,
    format: &str,
    log_path: &std::path::Path,
    stream: impl AsyncRead + Unpin,
) {
    // Lines are cut at MAX_LINE: the worker runs as the job's owner, and its output must not grow
    // the daemon's memory.
    const MAX_LINE: u64 = 16 * 1024;
    let mut reader = BufReader::new(stream);
    loop {
        let mut buf = Vec::new();
        match (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf)
            .trim_end_matches('\n')
            .to_string();
        append_log(log_path, format!("{line}\n")).await;
        publish(core, id, format, line).await;
    }
}

async fn append_log(path: &std::path::Path, text: String) {
    let path: PathBuf = path.to_path_buf();
    let written = tokio::task::spawn_blocking(move || logs::append(&path, text.as_bytes())).await;
    if !matches!(written, Ok(Ok(()))) {
        tracing::warn!("cannot append the export's output to job.log");
    }
}

async fn publish(core: &Core, id: JobId, format: &str, text: String) {
    let format = format.to_string();
    let result = core
        .write(move |j| {
            Ok((
                (),
                vec![j.append_event(Some(id), EventBody::Export { format, text })?],
            ))
        })
        .await;
    if let Err(e) = result {
        tracing::warn!(job = %id, error = %e, "cannot record an export event");
    }
}
