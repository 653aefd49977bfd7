//! The submit-time checks of a job's files, run in a `lorad worker --check` process with the job
//! owner's identity: the model and dataset must be readable by that user, the dataset a regular file
//! of well-formed lines, the output directory new. The daemon only sees the verdict.
use crate::error::EngineError;
use lorad_schema::{ErrorCode, WireError};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// What a check needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckTask {
    /// HF model directory or .gguf file.
    pub base_model: PathBuf,
    /// Dataset file.
    pub dataset: PathBuf,
    /// The job's max_seq_len, checked against the model's context.
    pub max_seq_len: u32,
    /// The job's max_line_bytes.
    #[serde(default = "default_max_line")]
    pub max_line_bytes: u64,
    /// The adapter directory the user asked for, if any.
    #[serde(default)]
    pub output_dir: Option<PathBuf>,
    /// The dataloader plugin format that reads the dataset (None: lorad reads it as JSONL).
    #[serde(default)]
    pub plugin_format: Option<String>,
    /// The job's resolved settings, for the memory estimate (None: not estimated).
    #[serde(default)]
    pub settings: Option<lorad_schema::TrainSettings>,
    /// The most memory any device the job may use has, bytes, and those devices in words
    /// ("cpu, 23.4 GB"): a job predicted to need more is refused with a way out.
    #[serde(default)]
    pub memory_limit: Option<(u64, String)>,
    /// The user set max_seq_len: a value longer than the model's context is refused. Otherwise
    /// (the template's value) it is lowered to the context.
    #[serde(default = "explicit_by_default")]
    pub max_seq_len_explicit: bool,
}

fn explicit_by_default() -> bool {
    true
}

/// What a passed check found out.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Checked {
    /// Examples in the dataset (None: a plugin reads it).
    pub examples: Option<usize>,
    /// The predicted peak memory, bytes (None: no settings to estimate with).
    pub memory_estimate: Option<u64>,
    /// The estimate in words, with its parts.
    pub memory: Option<String>,
    /// The template's max_seq_len was longer than the model's context: lowered to this.
    #[serde(default)]
    pub lowered_max_seq_len: Option<u32>,
}

fn default_max_line() -> u64 {
    crate::data::jsonl::MAX_LINE_BYTES as u64
}

/// The kind of a file that is not what a path must be, in words.
pub fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a regular file"
    }
}

fn refused(code: ErrorCode, msg: String) -> WireError {
    WireError::new(code, msg)
}

/// An engine error as the client sees it: a permission problem names the path and the uid it was
/// read as.
pub fn wire_error(e: EngineError) -> WireError {
    match &e {
        EngineError::Io { path, source }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            refused(
                ErrorCode::PermissionDenied,
                format!(
                    "permission denied reading {} as uid {}",
                    path.display(),
                    nix::unistd::getuid()
                ),
            )
        }
        _ => refused(ErrorCode::InvalidArgument, e.to_string()),
    }
}

/// `path`'s metadata (following links), or why it cannot be had, naming the field.
fn stat(field: &str, path: &Path) -> Result<std::fs::Metadata, WireError> {
    std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => refused(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied reading {} as uid {}",
                path.display(),
                nix::unistd::getuid()
            ),
        ),
        _ => refused(
            ErrorCode::InvalidArgument,
            format!("{field}: {}: {e}", path.display()),
        ),
    })
}

/// Runs every check: the files, the model's context, the predicted memory against the devices, the
/// dataset's lines.
pub fn check(task: &CheckTask) -> Result<Checked, WireError> {
    let model = stat("base_model", &task.base_model)?;
    if !model.is_dir() && !model.is_file() {
        return Err(refused(
            ErrorCode::InvalidArgument,
            format!(
                "base_model: {} is {}, not a model directory or a .gguf file",
                task.base_model.display(),
                kind_of(model.file_type())
            ),
        ));
    }
    let data = stat("dataset", &task.dataset)?;
    let regular_needed = task.plugin_format.is_none();
    if (regular_needed && !data.is_file()) || (!data.is_file() && !data.is_dir()) {
        return Err(refused(
            ErrorCode::InvalidArgument,
            format!(
                "dataset: {} is {}, not a regular file",
                task.dataset.display(),
                kind_of(data.file_type())
            ),
        ));
    }
    if let Some(out) = &task.output_dir {
        check_output_dir(out)?;
    }
    let config = crate::source::check_model(&task.base_model).map_err(wire_error)?;
    let context = u32::try_from(config.max_position_embeddings).unwrap_or(u32::MAX);
    let lowered = (!task.max_seq_len_explicit && task.max_seq_len > context).then_some(context);
    fits_context(lowered.unwrap_or(task.max_seq_len), &config).map_err(wire_error)?;
    let mut checked = match &task.settings {
        Some(s) => {
            let s = lorad_schema::TrainSettings {
                max_seq_len: lowered.unwrap_or(s.max_seq_len),
                ..s.clone()
            };
            fits_memory(task, &config, &s)?
        }
        None => Checked::default(),
    };
    checked.lowered_max_seq_len = lowered;
    if task.plugin_format.is_none() {
        // A plugin's format is the plugin's to check, in the training worker.
        let lines =
            crate::data::validate_jsonl_limited(&task.dataset, task.max_line_bytes as usize);
        checked.examples = Some(lines.map_err(wire_error)?);
    }
    Ok(checked)
}

/// The job's predicted peak memory (`memory::estimate_with` on its real weight files), refused when
/// it is above `task.memory_limit`, with the figure and a smaller setting that fits.
fn fits_memory(
    task: &CheckTask,
    config: &crate::config::ModelConfig,
    s: &lorad_schema::TrainSettings,
) -> Result<Checked, WireError> {
    use crate::memory::{advice_with, estimate_with, human, WeightFiles};
    let source = crate::source::ModelSource::open(&task.base_model).map_err(wire_error)?;
    let files = WeightFiles::of(&source).map_err(wire_error)?;
    let estimate = estimate_with(config, s, &files);
    if let Some((limit, devices)) = &task.memory_limit {
        if estimate.total() > *limit {
            let way_out = match advice_with(config, s, &files, *limit) {
                Some(advice) => format!("{advice}, or use a device with more memory"),
                None => "even batch_size=1 with a short max_seq_len does not fit: use a device with more memory or a smaller model".into(),
            };
            return Err(refused(
                ErrorCode::InvalidArgument,
                format!(
                    "the job needs about {} of memory at its peak ({estimate}); the most any device it may use has is {} ({devices}): {way_out}",
                    human(estimate.total()),
                    human(*limit)
                ),
            ));
        }
    }
    Ok(Checked {
        examples: None,
        memory_estimate: Some(estimate.total()),
        memory: Some(estimate.to_string()),
        lowered_max_seq_len: None,
    })
}

/// Why a dtype other than f32 is refused.
pub const DTYPE_UNSUPPORTED: &str =
    "only f32 training is implemented yet (bf16/f16 arrive with the CUDA path); use --set dtype=f32";

/// The resolved settings of a job are in range and ask for nothing the engine cannot do: the one
/// check of them, at submit and in the worker, in the same words ("setting 'lr': must be > 0").
pub fn check_settings(s: &lorad_schema::TrainSettings) -> Result<(), EngineError> {
    s.validate().map_err(|e| match e {
        lorad_schema::SettingError::OutOfRange { key, detail } => {
            EngineError::Setting { field: key, detail }
        }
        other => EngineError::Setting {
            field: "settings".into(),
            detail: other.to_string(),
        },
    })?;
    if s.dtype != lorad_schema::DType::F32 {
        // Refuse rather than silently train in another precision than the one asked for.
        return Err(EngineError::Setting {
            field: "dtype".into(),
            detail: DTYPE_UNSUPPORTED.into(),
        });
    }
    Ok(())
}

/// `max_seq_len` fits the model's context: the one check of it, at submit (here) and in the worker
/// (`train`), in the same words.
pub fn fits_context(
    max_seq_len: u32,
    config: &crate::config::ModelConfig,
) -> Result<(), EngineError> {
    if max_seq_len as usize > config.max_position_embeddings {
        return Err(EngineError::Setting {
            field: "max_seq_len".into(),
            // For a GGUF file, max_position_embeddings is its <arch>.context_length.
            detail: format!(
                "{max_seq_len} is longer than the model's max_position_embeddings ({}); set max_seq_len to at most {}",
                config.max_position_embeddings, config.max_position_embeddings
            ),
        });
    }
    Ok(())
}

/// An output directory must not exist (lorad never writes into or replaces what someone already
/// has) and must be creatable by this user: its parent exists and is writable.
pub fn check_output_dir(out: &Path) -> Result<(), WireError> {
    if out.symlink_metadata().is_ok() {
        return Err(refused(
            ErrorCode::InvalidArgument,
            format!(
                "output_dir: {} already exists; lorad writes an adapter only to a new path (choose another, or leave it out for <state_dir>/jobs/<id>/adapter)",
                out.display()
            ),
        ));
    }
    let parent = out.parent().unwrap_or(Path::new("/"));
    let meta = stat("output_dir", parent)?;
    if !meta.is_dir() {
        return Err(refused(
            ErrorCode::InvalidArgument,
            format!("output_dir: {} is not a directory", parent.display()),
        ));
    }
    nix::unistd::access(
        parent,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .map_err(|_| {
        refused(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied writing to {} as uid {}",
                parent.display(),
                nix::unistd::getuid()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(dir: &Path, data: PathBuf) -> CheckTask {
        CheckTask {
            base_model: dir.join("model"),
            dataset: data,
            max_seq_len: 32,
            max_line_bytes: 1 << 20,
            output_dir: None,
            plugin_format: None,
            settings: None,
            memory_limit: None,
            max_seq_len_explicit: true,
        }
    }

    #[test]
    fn special_files_are_refused_by_kind_before_anything_is_read() {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny::make_tiny_model(&dir.path().join("model"), 0).unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        for (path, kind) in [
            (PathBuf::from("/dev/zero"), "character device"),
            (fifo, "FIFO"),
            (dir.path().to_path_buf(), "directory"),
        ] {
            let e = check(&task(dir.path(), path.clone())).unwrap_err();
            assert!(
                e.message.contains(kind) && e.message.contains(&path.display().to_string()),
                "{e:?}"
            );
        }
    }

    #[test]
    fn an_existing_output_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_output_dir(dir.path()).unwrap_err();
        assert!(e.message.contains("already exists"), "{e:?}");
        assert!(check_output_dir(&dir.path().join("new")).is_ok());
        let e = check_output_dir(&dir.path().join("no/such/new")).unwrap_err();
        assert!(e.message.contains("no/such"), "{e:?}");
    }
}
