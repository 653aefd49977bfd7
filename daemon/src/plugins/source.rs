//! A dataset read by a dataloader plugin: the engine's `DataSource` over `dataloader.open` /
//! `dataloader.read`. Runs in the worker.
use super::{PluginLib, PluginRef};
use crate::worker::data::{DataSource, RawExample};
use crate::worker::error::EngineError;
use lorad_plugin::{
    methods, DataloaderOpenRequest, DataloaderOpenResponse, DataloaderReadRequest,
    DataloaderReadResponse,
};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A dataset opened through a dataloader plugin.
#[derive(Debug)]
pub struct PluginSource {
    lib: Arc<PluginLib>,
    path: PathBuf,
    len: usize,
}

impl PluginSource {
    /// Opens the plugin and asks it to open `dataset`.
    pub fn open(plugin: &PluginRef, dataset: &Path) -> Result<PluginSource, EngineError> {
        let lib = plugin
            .open()
            .map_err(|e| EngineError::dataset(dataset, None, e))?;
        let reply: DataloaderOpenResponse = lib
            .call(
                methods::DATALOADER_OPEN,
                &DataloaderOpenRequest {
                    path: dataset.display().to_string(),
                },
            )
            .map_err(|e| {
                EngineError::dataset(
                    dataset,
                    None,
                    format!(
                        "plugin {} ({}) cannot open it: {e}",
                        lib.name, plugin.format
                    ),
                )
            })?;
        let len = usize::try_from(reply.len).map_err(|_| {
            EngineError::dataset(
                dataset,
                None,
                format!("plugin {} reports {} records", lib.name, reply.len),
            )
        })?;
        Ok(PluginSource {
            lib,
            path: dataset.to_path_buf(),
            len,
        })
    }
}

impl DataSource for PluginSource {
    fn origin(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> usize {
        self.len
    }

    fn read(&self, range: Range<usize>) -> Result<Vec<RawExample>, EngineError> {
        let bad = |detail: String| EngineError::dataset(&self.path, Some(range.start + 1), detail);
        let reply: DataloaderReadResponse = self
            .lib
            .call(
                methods::DATALOADER_READ,
                &DataloaderReadRequest {
                    path: self.path.display().to_string(),
                    start: range.start as u64,
                    end: range.end as u64,
                },
            )
            .map_err(|e| bad(format!("plugin {}: {e}", self.lib.name)))?;
        if reply.records.len() != range.len() {
            return Err(bad(format!(
                "plugin {} returned {} records for records {}..{}",
                self.lib.name,
                reply.records.len(),
                range.start + 1,
                range.end
            )));
        }
        Ok(reply
            .records
            .into_iter()
            .zip(range)
            .map(|(value, i)| RawExample { line: i + 1, value })
            .collect())
    }
}
