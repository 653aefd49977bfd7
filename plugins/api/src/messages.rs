//! Method names and their request/response types. Every payload is MessagePack with named fields
//! (`rmp_serde::to_vec_named`), so fields can be added later without breaking older peers.
use lorad_schema::TrainSettings;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::PluginError;

/// The method names a plugin may be called with.
pub mod methods {
    /// [`TemplatesListRequest`](super::TemplatesListRequest) -> `Vec<`[`TemplateDef`](super::TemplateDef)`>`.
    pub const TEMPLATES_LIST: &str = "templates.list";
    /// [`ExportRequest`](super::ExportRequest) -> [`ExportResponse`](super::ExportResponse).
    pub const EXPORT_RUN: &str = "export.run";
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

/// One training template: a named, complete set of settings that `--set` overrides can then change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateDef {
    /// Template name as users type it (`coding-assistant`).
    pub name: String,
    /// One line saying what the template is for.
    pub description: String,
    /// Every setting; fields a plugin leaves out take lorad's defaults.
    pub settings: TrainSettings,
}

/// Request of `export.run`. Paths are absolute UTF-8 strings chosen by the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportRequest {
    /// The job's directory (job.log, trainer_state, metrics).
    pub job_dir: String,
    /// The directory holding the adapter to export.
    pub adapter_dir: String,
    /// The base model the adapter was trained on (a directory or model id as the job recorded it).
    pub base_model: String,
    /// Where the export should be written (a file or directory, by exporter).
    pub out: String,
    /// A checkpoint name inside the job to export instead of the final adapter. The daemon validates it
    /// against path traversal before calling; plugins must still treat it as a single path component.
    #[serde(default)]
    pub checkpoint: Option<String>,
}

/// Response of `export.run`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportResponse {
    /// The files the exporter wrote.
    pub files: Vec<String>,
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
