//! Method names and their request/response types. Every payload is MessagePack with named fields
//! (`rmp_serde::to_vec_named`), so fields can be added later without breaking older peers.
use lorad_schema::{JobRecord, MetricPoint, TrainSettings};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::PluginError;

/// The method names a plugin may be called with.
pub mod methods {
    /// [`TemplatesListRequest`](super::TemplatesListRequest) ->
    /// [`TemplatesListResponse`](super::TemplatesListResponse).
    pub const TEMPLATES_LIST: &str = "templates.list";
    /// [`ExportFormatsRequest`](super::ExportFormatsRequest) ->
    /// [`ExportFormatsResponse`](super::ExportFormatsResponse).
    pub const EXPORT_FORMATS: &str = "export.formats";
    /// [`ExportRequest`](super::ExportRequest) -> [`ExportResponse`](super::ExportResponse).
    pub const EXPORT_RUN: &str = "export.run";
    /// [`DataloaderFormatsRequest`](super::DataloaderFormatsRequest) ->
    /// [`DataloaderFormatsResponse`](super::DataloaderFormatsResponse).
    pub const DATALOADER_FORMATS: &str = "dataloader.formats";
    /// [`DataloaderOpenRequest`](super::DataloaderOpenRequest) ->
    /// [`DataloaderOpenResponse`](super::DataloaderOpenResponse).
    pub const DATALOADER_OPEN: &str = "dataloader.open";
    /// [`DataloaderReadRequest`](super::DataloaderReadRequest) ->
    /// [`DataloaderReadResponse`](super::DataloaderReadResponse).
    pub const DATALOADER_READ: &str = "dataloader.read";
}

/// Request of `templates.list` (an empty map today).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TemplatesListRequest {}

/// Response of `templates.list`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TemplatesListResponse {
    /// The templates.
    pub templates: Vec<TemplateDef>,
}

/// One training template: a named, complete set of settings that `--set` overrides can then change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateDef {
    /// Template name as users type it (`coding-assistant`).
    pub name: String,
    /// One line saying what the template is for.
    pub description: String,
    /// Every setting; fields a plugin leaves out (or the whole map) take lorad's defaults.
    #[serde(default)]
    pub settings: TrainSettings,
}

/// Request of `export.formats` (an empty map today).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExportFormatsRequest {}

/// Response of `export.formats`: the export formats an exporter plugin writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportFormatsResponse {
    /// The formats.
    pub formats: Vec<ExportFormatDef>,
}

/// One export format (`loractl export --format NAME`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportFormatDef {
    /// The name users type (`peft`, `merged`, `zip`).
    pub name: String,
    /// One line on what it writes.
    pub description: String,
}

/// Request of `export.run`. The daemon resolves and validates every path before the call (the job's
/// own directories, a checkpoint name checked against traversal); exporters run in a `lorad worker
/// --export` process, never in the daemon, and may print progress lines on stderr (they go to the job's
/// log and to the client that asked for the export).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportRequest {
    /// The format to write, one of those `export.formats` listed (a plugin may write several).
    #[serde(default)]
    pub format: String,
    /// The job's directory (`job.log`, `checkpoints/`, `adapter/`).
    pub job_dir: String,
    /// The adapter to export, in HF PEFT layout (`adapter_config.json` + `adapter_model.safetensors`):
    /// the job's final `adapter/`, or the checkpoint directory the user named.
    pub adapter_dir: String,
    /// The base model the adapter was trained on, as the job recorded it: an HF model directory or a
    /// GGUF file.
    pub base_model: String,
    /// Where to write: a directory (`peft`, `merged`) or a file (`zip`). It does not exist yet; its
    /// parent does. Exporters write into a temporary sibling and rename, so a failed export leaves
    /// nothing behind.
    pub out: String,
    /// The checkpoint exported (`step-N`), or `None` for the final adapter.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// `trainer_state.json` that goes with the adapter (the checkpoint's, or the newest checkpoint's for
    /// the final adapter), if there is one.
    #[serde(default)]
    pub trainer_state: Option<String>,
    /// The job's record: id, name, spec, resolved settings, state, progress.
    pub job: JobRecord,
    /// Every metric point of the job, in step order.
    #[serde(default)]
    pub metrics: Vec<MetricPoint>,
}

/// Response of `export.run`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportResponse {
    /// The files the exporter wrote.
    pub files: Vec<String>,
}

/// Request of `dataloader.formats` (an empty map today).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataloaderFormatsRequest {}

/// Response of `dataloader.formats`: the dataset formats a dataloader plugin reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataloaderFormatsResponse {
    /// The formats.
    pub formats: Vec<DataFormatDef>,
}

/// One dataset format a dataloader plugin reads, chosen by the dataset's file extension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataFormatDef {
    /// Short name (`tsv`, `parquet`).
    pub name: String,
    /// File extensions, without the dot, lower case (`["tsv", "tab"]`). An extension lorad reads itself
    /// (`jsonl`, `json`) cannot be taken over.
    pub extensions: Vec<String>,
    /// One line on the format (`prompt<TAB>completion per line`).
    pub description: String,
}

/// Request of `dataloader.open`: open (or index) a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataloaderOpenRequest {
    /// The dataset path as the user gave it.
    pub path: String,
}

/// Response of `dataloader.open`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataloaderOpenResponse {
    /// Number of records in the dataset.
    pub len: u64,
}

/// Request of `dataloader.read`: records `start..end` (end exclusive) of a dataset opened before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataloaderReadRequest {
    /// The same path given to `dataloader.open`.
    pub path: String,
    /// First record, counted from 0.
    pub start: u64,
    /// One past the last record.
    pub end: u64,
}

/// Response of `dataloader.read`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataloaderReadResponse {
    /// The records, each a JSON-like value (object with `text`, or `messages`, or `prompt`/`completion`,
    /// as for a JSONL dataset) carried as plain MessagePack maps/arrays/strings/numbers. MessagePack
    /// binary and extension values cannot be represented and are a decode error.
    pub records: Vec<serde_json::Value>,
}

/// Encodes a payload as MessagePack with named fields.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, PluginError> {
    rmp_serde::to_vec_named(value)
        .map_err(|e| PluginError::Internal(format!("cannot encode reply: {e}")))
}

/// Decodes a MessagePack request; a malformed one is a [`PluginError::BadRequest`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, PluginError> {
    rmp_serde::from_slice(bytes).map_err(|e| PluginError::BadRequest(e.to_string()))
}
