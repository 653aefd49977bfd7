//! Exporters that write one format: implement [`Exporter`] and export `OneFormat<YourExporter>` with
//! [`export_plugin!`](crate::export_plugin); the `Plugin` side (kinds, the format list, refusing a
//! request for another format) is written once, here.
use crate::abi::kinds;
use crate::{ExportFormatDef, ExportRequest, ExportResponse, Plugin, PluginError};
use std::path::PathBuf;

/// A plugin that writes one export format.
pub trait Exporter: Send + Sync + 'static {
    /// The plugin's name, as `loractl status` lists it. Must not contain NUL.
    const NAME: &'static str;
    /// The format it writes (`loractl export --format FORMAT`).
    const FORMAT: &'static str;
    /// What the format holds, one line for `loractl status`.
    const DESCRIPTION: &'static str;

    /// Writes the export at `request.out`; returns the files written.
    fn write(&self, request: &ExportRequest) -> Result<Vec<PathBuf>, PluginError>;
}

/// An [`Exporter`] as a [`Plugin`].
#[derive(Debug, Default)]
pub struct OneFormat<E>(pub E);

impl<E: Exporter> Plugin for OneFormat<E> {
    fn name(&self) -> &'static str {
        E::NAME
    }

    fn kinds(&self) -> u32 {
        kinds::EXPORT
    }

    fn export_formats(&self) -> Result<Vec<ExportFormatDef>, PluginError> {
        Ok(vec![ExportFormatDef {
            name: E::FORMAT.into(),
            description: E::DESCRIPTION.into(),
        }])
    }

    /// Refuses a request that names another format (an empty one means this one), then writes.
    fn export(&self, request: ExportRequest) -> Result<ExportResponse, PluginError> {
        if !request.format.is_empty() && request.format != E::FORMAT {
            return Err(PluginError::BadRequest(format!(
                "format \"{}\" is not written by {} (it writes \"{}\")",
                request.format,
                E::NAME,
                E::FORMAT
            )));
        }
        let files = self.0.write(&request)?;
        Ok(ExportResponse {
            files: files.iter().map(|f| f.display().to_string()).collect(),
        })
    }
}
