//! # lorad-export-zip
//!
//! The `zip` exporter: one archive with everything about a job's adapter, to hand over or keep:
//!
//! | entry | from |
//! |---|---|
//! | `adapter/adapter_config.json`, `adapter/adapter_model.safetensors` | the adapter (final or checkpoint) |
//! | `trainer_state.json` | the checkpoint's trainer state, when there is one |
//! | `job.json` | the job record (spec, resolved settings, state, progress), pretty JSON |
//! | `metrics.csv` | one row per optimizer step |
//! | `job.log` | the job's log, when it exists |
//! | `MANIFEST.txt` | what was exported and the entries with their sizes |
//!
//! Entry names are fixed here, never taken from the request, so nothing in the archive can point
//! outside the directory it is unpacked into. Entries are deflated. The archive is written to a
//! temporary sibling of `out` and renamed into place.
#![deny(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod contents;
pub mod error;

use error::ZipExportError;
use lorad_plugin::staging::{Kind, Staging};
use lorad_plugin::{export_plugin, ExportRequest, Exporter, OneFormat, PluginError};
use std::io::Write;
use std::path::{Path, PathBuf};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipWriter};

/// The plugin's name, as `loractl status` lists it.
pub const PLUGIN_NAME: &str = "lorad-export-zip";
/// The export format it writes (`loractl export --format zip`).
pub const FORMAT: &str = "zip";
/// The adapter's config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The manifest entry.
pub const MANIFEST: &str = "MANIFEST.txt";

/// The exporter.
#[derive(Debug, Default)]
pub struct ZipExporter;

impl Exporter for ZipExporter {
    const NAME: &'static str = PLUGIN_NAME;
    const FORMAT: &'static str = FORMAT;
    const DESCRIPTION: &'static str =
        "one .zip: adapter, trainer_state.json, job.json, metrics.csv, job.log";

    fn write(&self, request: &ExportRequest) -> Result<Vec<PathBuf>, PluginError> {
        Ok(vec![export_zip(request)?])
    }
}

export_plugin!(OneFormat<ZipExporter>, OneFormat(ZipExporter));

/// Writes the archive at `request.out`; returns its path.
pub fn export_zip(request: &ExportRequest) -> Result<PathBuf, ZipExportError> {
    let adapter_dir = Path::new(&request.adapter_dir);
    let config = read_required(&adapter_dir.join(ADAPTER_CONFIG), "adapter file")?;
    let weights = read_required(&adapter_dir.join(ADAPTER_WEIGHTS), "adapter file")?;
    check_adapter(adapter_dir, &config, &weights)?;
    let trainer_state = match &request.trainer_state {
        Some(p) => Some(read_required(Path::new(p), "trainer state")?),
        None => None,
    };
    let job_json = serde_json::to_string_pretty(&request.job).unwrap_or_default() + "\n";
    let metrics = contents::metrics_csv(&request.metrics);
    let log_path = lorad_schema::layout::JobDir::new(&request.job_dir).log();
    let log = log_path.is_file().then_some(log_path);

    let out = Path::new(&request.out);
    let staging = Staging::new(out, Kind::File)?;
    let tmp = staging.path().to_path_buf();
    let zip_err = |source| ZipExportError::Zip {
        path: tmp.clone(),
        source,
    };
    let file = std::fs::File::create(&tmp).map_err(|e| ZipExportError::io(&tmp, e))?;
    let mut zip = ZipWriter::new(std::io::BufWriter::new(file));
    let (now, created) = now();
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .last_modified_time(now)
        .unix_permissions(0o644);
    let mut entries: Vec<(String, u64)> = Vec::new();
    let mut add = |zip: &mut ZipWriter<_>, name: &str, bytes: &[u8]| {
        eprintln!("zip: adding {name} ({} bytes)", bytes.len());
        let large = bytes.len() as u64 >= u64::from(u32::MAX);
        zip.start_file(name, options.large_file(large))
            .map_err(zip_err)?;
        zip.write_all(bytes)
            .map_err(|e| ZipExportError::io(&tmp, e))?;
        entries.push((name.to_owned(), bytes.len() as u64));
        Ok::<(), ZipExportError>(())
    };
    add(&mut zip, &format!("adapter/{ADAPTER_CONFIG}"), &config)?;
    add(&mut zip, &format!("adapter/{ADAPTER_WEIGHTS}"), &weights)?;
    if let Some(state) = &trainer_state {
        add(&mut zip, "trainer_state.json", state)?;
    }
    add(&mut zip, "job.json", job_json.as_bytes())?;
    add(&mut zip, "metrics.csv", metrics.as_bytes())?;
    if let Some(log) = &log {
        // The log is the one entry that can grow large: streamed, not read whole.
        let mut f = std::fs::File::open(log).map_err(|e| ZipExportError::io(log, e))?;
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        eprintln!("zip: adding job.log ({size} bytes)");
        zip.start_file(
            lorad_schema::layout::JobDir::LOG,
            options.large_file(size >= u64::from(u32::MAX)),
        )
        .map_err(zip_err)?;
        let copied = std::io::copy(&mut f, &mut zip).map_err(|e| ZipExportError::io(log, e))?;
        entries.push((lorad_schema::layout::JobDir::LOG.to_owned(), copied));
    }
    let manifest = contents::manifest(request, &entries, &created);
    eprintln!("zip: adding {MANIFEST}");
    zip.start_file(MANIFEST, options).map_err(zip_err)?;
    zip.write_all(manifest.as_bytes())
        .map_err(|e| ZipExportError::io(&tmp, e))?;
    let mut inner = zip.finish().map_err(zip_err)?;
    inner.flush().map_err(|e| ZipExportError::io(&tmp, e))?;
    drop(inner);
    let out = staging.commit()?;
    eprintln!(
        "zip: wrote {} ({} entries)",
        out.display(),
        entries.len() + 1
    );
    Ok(out)
}

/// Reads a file that must exist; a missing one is named as `what`.
fn read_required(path: &Path, what: &'static str) -> Result<Vec<u8>, ZipExportError> {
    if !path.is_file() {
        return Err(ZipExportError::Missing {
            what,
            path: path.to_path_buf(),
        });
    }
    std::fs::read(path).map_err(|e| ZipExportError::io(path, e))
}

/// The adapter is what PEFT loads: a JSON config with `peft_type` and safetensors weights that parse
/// and hold LoRA matrices. Checked before anything is written.
fn check_adapter(dir: &Path, config: &[u8], weights: &[u8]) -> Result<(), ZipExportError> {
    let invalid = |file: &str, detail: String| ZipExportError::Invalid {
        path: dir.join(file),
        detail,
    };
    let cfg: serde_json::Value = serde_json::from_slice(config)
        .map_err(|e| invalid(ADAPTER_CONFIG, format!("not valid JSON: {e}")))?;
    if cfg.get("peft_type").and_then(|t| t.as_str()).is_none() {
        return Err(invalid(ADAPTER_CONFIG, "no \"peft_type\"".into()));
    }
    let st = safetensors::SafeTensors::deserialize(weights)
        .map_err(|e| invalid(ADAPTER_WEIGHTS, format!("not a safetensors file: {e}")))?;
    if !st.names().iter().any(|n| n.contains(".lora_A.")) {
        return Err(invalid(ADAPTER_WEIGHTS, "no lora_A weights".into()));
    }
    Ok(())
}

/// The entries' timestamp (ZIP stores local-less DOS time; UTC is written) and its text.
fn now() -> (DateTime, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, mo, d, h, mi, s) = contents::utc(secs);
    let text = format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC");
    (
        DateTime::from_date_and_time(y, mo, d, h, mi, s).unwrap_or_default(),
        text,
    )
}
