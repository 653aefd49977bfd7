//! # lorad-export-peft
//!
//! The `peft` exporter: writes a job's adapter (the final one or a checkpoint's) as a Hugging Face PEFT
//! adapter directory, `adapter_config.json` + `adapter_model.safetensors` + a `README.md` model card,
//! loadable with `PeftModel.from_pretrained(base, out)`.
//!
//! The two adapter files are copied byte for byte (so `base_model_name_or_path` stays the base model
//! path the job trained on) after the adapter has been loaded with lorad's own reader, so a corrupt
//! adapter fails the export with a message naming the file instead of producing a broken directory.
//! The output is assembled in a temporary sibling of `out` and renamed into place.
#![deny(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod card;
pub mod error;

use card::RunSummary;
use error::PeftError;
use lorad_engine::adapter::{load_adapter, CONFIG_FILE, WEIGHTS_FILE};
use lorad_plugin::staging::{Kind, Staging};
use lorad_plugin::{export_plugin, ExportRequest, Exporter, OneFormat, PluginError};
use std::path::{Path, PathBuf};

/// The plugin's name, as `loractl status` lists it.
pub const PLUGIN_NAME: &str = "lorad-export-peft";
/// The export format it writes (`loractl export --format peft`).
pub const FORMAT: &str = "peft";
/// The model card's file name.
pub const CARD_FILE: &str = "README.md";

/// The exporter.
#[derive(Debug, Default)]
pub struct PeftExporter;

impl Exporter for PeftExporter {
    const NAME: &'static str = PLUGIN_NAME;
    const FORMAT: &'static str = FORMAT;
    const DESCRIPTION: &'static str = "HF PEFT adapter directory (adapter_config.json, \
                          adapter_model.safetensors, README.md)";

    fn write(&self, request: &ExportRequest) -> Result<Vec<PathBuf>, PluginError> {
        Ok(export_peft(request)?)
    }
}

export_plugin!(OneFormat<PeftExporter>, OneFormat(PeftExporter));

/// Writes the PEFT directory at `request.out`; returns the files written (under `out`).
pub fn export_peft(request: &ExportRequest) -> Result<Vec<PathBuf>, PeftError> {
    let adapter_dir = Path::new(&request.adapter_dir);
    let out = Path::new(&request.out);
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        let path = adapter_dir.join(file);
        if !path.is_file() {
            return Err(PeftError::Missing(path));
        }
    }
    eprintln!("peft: checking adapter {}", adapter_dir.display());
    let adapter = load_adapter(adapter_dir)?;
    if adapter.weights.is_empty() {
        return Err(PeftError::Empty(adapter_dir.join(WEIGHTS_FILE)));
    }
    let trainer_state = read_trainer_state(request.trainer_state.as_deref());

    let staging = Staging::new(out, Kind::Dir)?;
    let mut files = Vec::new();
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        eprintln!("peft: copying {file}");
        let (from, to) = (adapter_dir.join(file), staging.path().join(file));
        std::fs::copy(&from, &to).map_err(|e| PeftError::io(&from, e))?;
        files.push(out.join(file));
    }
    eprintln!("peft: writing {CARD_FILE}");
    let run = RunSummary::new(request, trainer_state.as_ref());
    let text = card::render(request, &adapter.config, adapter.weights.len(), &run);
    let card = staging.path().join(CARD_FILE);
    std::fs::write(&card, text).map_err(|e| PeftError::io(&card, e))?;
    files.push(out.join(CARD_FILE));
    staging.commit()?;
    eprintln!(
        "peft: wrote {} ({} adapted modules)",
        out.display(),
        adapter.weights.len()
    );
    Ok(files)
}

/// trainer_state.json as JSON, for the card's step count. It is optional there, so an unreadable one
/// is reported on stderr and the card falls back to the job's metrics.
fn read_trainer_state(path: Option<&str>) -> Option<serde_json::Value> {
    let path = path?;
    let parsed = std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()));
    match parsed {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("peft: warning: ignoring trainer state {path}: {e}");
            None
        }
    }
}
