//! Export: check the job, the format, the checkpoint and the output path, then run the exporter plugin
//! in a `lorad worker --export` process. Nothing is written unless every check passes.
use super::Peer;
use crate::channel::ExportTask;
use crate::core::Core;
use crate::plugins::PluginRef;
use crate::worker::checkpoint::{latest_checkpoint, list_checkpoints, STATE_FILE};
use lorad_plugin::ExportRequest;
use lorad_schema::{ErrorCode, ExportInfo, JobId, JobState, Response, WireError};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn invalid(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::InvalidArgument, msg)
}

/// Exports job `id` as `format` to `out` (absolute; must not exist; its parent must).
pub async fn handle(
    core: &Core,
    peer: Peer,
    id: JobId,
    format: String,
    out: String,
    checkpoint: Option<String>,
) -> Result<Response, WireError> {
    let job = super::job_for(core, peer, id).await?;
    let plugins = core.plugins();
    let exporter = plugins.exporter(&format).ok_or_else(|| {
        let names = plugins.export_formats();
        invalid(if names.is_empty() {
            format!("unknown export format '{format}': no exporter plugin is loaded (see `loractl status`)")
        } else {
            format!(
                "unknown export format '{format}' (available: {})",
                names.join(", ")
            )
        })
    })?;
    let job_dir = core.config.job_dir(id);
    let (adapter_dir, trainer_state) = match &checkpoint {
        Some(name) => {
            super::resume::validate_checkpoint(core, id, name).await?;
            let dir = core
                .config
                .layout()
                .job(id)
                .checkpoint(name)
                .map_err(|e| invalid(e.to_string()))?;
            let state = dir.join(STATE_FILE);
            (dir, Some(state))
        }
        None => final_adapter(&job, &job_dir).await?,
    };
    check_out(&out).await?;
    crate::supervisor::check::export_out(core, job.owner_uid, &out).await?;

    let metrics = core
        .read(move |j| j.metrics(id, None))
        .await
        .map_err(super::journal_error)?;
    let request = ExportRequest {
        format: format.clone(),
        job_dir: job_dir.display().to_string(),
        adapter_dir: adapter_dir.display().to_string(),
        base_model: job.base_model.clone(),
        out: out.clone(),
        checkpoint: checkpoint.clone(),
        trainer_state: trainer_state.map(|p| p.display().to_string()),
        job,
        metrics,
    };
    let task = ExportTask {
        plugin: PluginRef {
            library: exporter.lib.path.clone(),
            name: exporter.lib.name.clone(),
            format: format.clone(),
        },
        request,
    };
    tracing::info!(job = %id, format, out, uid = peer.uid, "export started");
    let started = Instant::now();
    let files = crate::supervisor::export::run(core, id, task)
        .await
        .map_err(|e| {
            WireError::new(
                ErrorCode::Failed,
                format!("export {format} of job {id}: {e}"),
            )
        })?;
    Ok(Response::Exported(ExportInfo {
        format,
        out,
        checkpoint,
        files,
        elapsed_s: started.elapsed().as_secs_f64(),
    }))
}

/// The final adapter of a completed job and the trainer state of its newest checkpoint.
async fn final_adapter(
    job: &lorad_schema::JobRecord,
    job_dir: &Path,
) -> Result<(PathBuf, Option<PathBuf>), WireError> {
    let id = job.id;
    let adapter = PathBuf::from(job.adapter_dir.as_deref().unwrap_or(&job.output_dir));
    let dir = job_dir.to_path_buf();
    let (exists, trainer_state, names) = {
        let adapter = adapter.clone();
        tokio::task::spawn_blocking(move || {
            let names: Vec<String> = list_checkpoints(&dir)
                .into_iter()
                .map(|(step, _)| lorad_schema::layout::checkpoint_name(step))
                .collect();
            (
                adapter.join(crate::worker::adapter::WEIGHTS_FILE).is_file(),
                latest_checkpoint(&dir)
                    .map(|c| c.join(STATE_FILE))
                    .filter(|p| p.is_file()),
                names,
            )
        })
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
    };
    if job.state != JobState::Completed || !exists {
        let hint = if names.is_empty() {
            "it has no checkpoint yet either".to_string()
        } else {
            format!(
                "export a checkpoint with --checkpoint ({})",
                names.join(", ")
            )
        };
        return Err(WireError::new(
            ErrorCode::InvalidState,
            format!(
                "job {id} has no final adapter (it is {}); {hint}",
                job.state
            ),
        ));
    }
    Ok((adapter, trainer_state))
}

/// `out` must be an absolute path naming a file or directory. Whether it exists and whether its
/// parent is writable is checked by a check worker as the job's owner: the daemon does not look at
/// paths a client names.
async fn check_out(out: &str) -> Result<(), WireError> {
    crate::quota::check_path("out", out)?;
    if Path::new(out).file_name().is_none() {
        return Err(invalid(format!("out: '{out}' names no file or directory")));
    }
    Ok(())
}
