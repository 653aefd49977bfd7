//! Submit: resolve the template and overrides, validate model and dataset, then queue. Nothing is
//! written unless every check passes.
use super::Peer;
use crate::core::Core;
use lorad_schema::{now_ms, ErrorCode, JobRecord, JobSpec, Progress, Response, WireError};
use std::path::Path;

fn invalid(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::InvalidArgument, msg)
}

pub async fn handle(core: &Core, peer: Peer, spec: JobSpec) -> Result<Response, WireError> {
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
    settings.validate().map_err(|e| invalid(e.to_string()))?;
    if settings.dtype != lorad_schema::DType::F32 {
        return Err(invalid(format!(
            "setting 'dtype': {}",
            crate::worker::train::DTYPE_UNSUPPORTED
        )));
    }

    for (field, path) in [("base_model", &spec.base_model), ("dataset", &spec.dataset)] {
        if !Path::new(path).is_absolute() {
            return Err(invalid(format!(
                "{field}: '{path}' must be an absolute path"
            )));
        }
    }
    if let Some(out) = &spec.output_dir {
        if !Path::new(out).is_absolute() {
            return Err(invalid(format!(
                "output_dir: '{out}' must be an absolute path"
            )));
        }
    }

    // Reading the model's config and every dataset line is file I/O: keep it off the runtime.
    let (model, dataset, max_seq_len) = (
        spec.base_model.clone(),
        spec.dataset.clone(),
        settings.max_seq_len,
    );
    // A dataset whose extension a dataloader plugin claims is read by that plugin, in the worker (the
    // daemon runs no plugin on user data); lorad checks the rest of it here.
    let plugin_format = plugins
        .dataloader_for(Path::new(&dataset))
        .map(|d| d.format.name);
    let examples = tokio::task::spawn_blocking(move || -> Result<Option<usize>, String> {
        let config = crate::worker::source::check_model(Path::new(&model)).map_err(|e| e.to_string())?;
        if max_seq_len as usize > config.max_position_embeddings {
            return Err(format!(
                "setting 'max_seq_len': {max_seq_len} is longer than the model's context ({} tokens: max_position_embeddings in config.json, <arch>.context_length in a GGUF file; {model})",
                config.max_position_embeddings
            ));
        }
        if let Some(format) = plugin_format {
            return match std::fs::metadata(&dataset) {
                Ok(_) => Ok(None),
                Err(e) => Err(format!("dataset {dataset} ({format}, read by a plugin): {e}")),
            };
        }
        crate::worker::data::validate_jsonl(Path::new(&dataset))
            .map(Some)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
    .map_err(invalid)?;

    let state_dir = core.config.state_dir.clone();
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
    let job = core
        .write(move |j| {
            let (job, event) = j.insert_job(|id| JobRecord {
                id,
                name,
                state: lorad_schema::JobState::Queued,
                reason: None,
                owner_uid: peer.uid,
                priority: spec.priority,
                template: spec.template,
                base_model: spec.base_model,
                dataset: spec.dataset,
                output_dir: spec.output_dir.unwrap_or_else(|| {
                    state_dir
                        .join("jobs")
                        .join(id.0.to_string())
                        .join("adapter")
                        .display()
                        .to_string()
                }),
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
            })?;
            Ok((job, vec![event]))
        })
        .await
        .map_err(super::journal_error)?;
    tracing::info!(job = %job.id, uid = peer.uid, examples = ?examples, template = %job.template, "job queued");
    core.kick.notify_one();
    Ok(Response::Job(job))
}
