//! The plugin host: libraries found in the plugin directories, loaded with libloading behind the
//! versioned C ABI of `lorad-plugin`.
//!
//! The daemon calls only the cheap, descriptive methods itself (`templates.list`, `export.formats`,
//! `dataloader.formats`, at scan time). Exporters and dataloaders do their real work inside worker
//! processes, which open the library again by path ([`PluginRef`]), so a crashing plugin takes down a
//! worker, never the daemon.
pub mod library;
pub mod registry;
pub mod source;
pub mod trust;

pub use library::{LoadError, PluginLib};
pub use registry::{default_dirs, Dataloader, Exporter, Pick, PluginDir, Registry};

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A plugin as a worker task names it: the library to open and the name it must declare.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginRef {
    /// The library file.
    pub library: PathBuf,
    /// The plugin's declared name (checked after opening, in case the file changed).
    pub name: String,
    /// The format used (an export format, or a dataset format).
    pub format: String,
}

impl PluginRef {
    /// Opens the library and checks it is still the plugin named here. Blocking.
    pub fn open(&self) -> Result<std::sync::Arc<PluginLib>, String> {
        let lib = PluginLib::open(&self.library)
            .map_err(|e| format!("plugin {}: {}: {e}", self.name, self.library.display()))?;
        if lib.name != self.name {
            return Err(format!(
                "{}: declares plugin {}, expected {}",
                self.library.display(),
                lib.name,
                self.name
            ));
        }
        Ok(lib)
    }
}
