//! One plugin library: opened with libloading, its descriptor checked, never unloaded.
//!
//! A library is opened at most once per process and path: a rescan reuses what is already mapped (the
//! C ABI gives no way to unload safely, and a plugin's static descriptor must outlive every call).
use lorad_plugin::{
    check_abi, plugin_name, AbiError, LoradPluginV1, PluginCallError, ENTRY_SYMBOL,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Why a library could not be used as a plugin.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is not there or cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// dlopen failed (not a shared library, missing dependency, wrong architecture).
    #[error("cannot load: {0}")]
    Open(String),
    /// The library has no entry symbol.
    #[error("no `lorad_plugin_v1` symbol: not a lorad plugin ({0})")]
    NoSymbol(String),
    /// The descriptor is missing or of another ABI version.
    #[error(transparent)]
    Abi(#[from] AbiError),
    /// The file changed since this process loaded it; a library cannot be reloaded in place, so the
    /// loaded version (carried here) stays in use.
    #[error("the file changed since lorad loaded it; still using the loaded version; restart lorad to load the new one")]
    Changed(Arc<PluginLib>),
}

/// A loaded, checked plugin library.
#[derive(Debug)]
pub struct PluginLib {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// The name it declares.
    pub name: String,
    /// Its kinds flags.
    pub kinds: u32,
    desc: &'static LoradPluginV1,
    /// (device, inode, mtime) when loaded, to notice a replaced file.
    identity: (u64, u64, i64),
}

// SAFETY: the descriptor is immutable static data of a library that is never unloaded, and the plugin
// contract requires `call` to be callable from any thread at once.
unsafe impl Send for PluginLib {}
// SAFETY: as above.
unsafe impl Sync for PluginLib {}

fn cache() -> &'static Mutex<HashMap<PathBuf, Arc<PluginLib>>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<PluginLib>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

impl PluginLib {
    /// Opens the plugin at `path` (or returns the one this process already opened there). Blocking:
    /// dlopen runs the library's initialisers.
    pub fn open(path: &Path) -> Result<Arc<PluginLib>, LoadError> {
        let path = std::fs::canonicalize(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let meta = std::fs::metadata(&path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        let identity = (meta.dev(), meta.ino(), meta.mtime());
        let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lib) = cache.get(&path) {
            return if lib.identity == identity {
                Ok(lib.clone())
            } else {
                Err(LoadError::Changed(lib.clone()))
            };
        }
        // SAFETY: loading a library runs its initialisers; plugins are trusted code installed by the
        // machine's owner in the plugin directories (the same trust as the lorad binary itself).
        let library = unsafe { libloading::Library::new(&path) }
            .map_err(|e| LoadError::Open(e.to_string()))?;
        // SAFETY: the symbol's type is fixed by the ABI (`EntryFn`).
        let entry = unsafe { library.get::<lorad_plugin::EntryFn>(ENTRY_SYMBOL) }
            .map_err(|e| LoadError::NoSymbol(e.to_string()))?;
        let entry: lorad_plugin::EntryFn = *entry;
        // Never unloaded: the descriptor and its name live as long as the process.
        std::mem::forget(library);
        // SAFETY: the library stays mapped forever (above); the ABI says the entry returns null or a
        // descriptor that lives as long as the library.
        let desc = unsafe { check_abi(entry()) }?;
        // SAFETY: checked descriptor of a library that is never unloaded.
        let name = unsafe { plugin_name(desc) }.into_owned();
        let lib = Arc::new(PluginLib {
            path: path.clone(),
            name,
            kinds: desc.kinds,
            desc,
            identity,
        });
        cache.insert(path, lib.clone());
        Ok(lib)
    }

    /// Calls `method` with a typed request and reply. Blocking (plugin code runs on this thread).
    pub fn call<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        method: &str,
        request: &Req,
    ) -> Result<Resp, PluginCallError> {
        // SAFETY: the descriptor passed `check_abi` and its library is never unloaded.
        unsafe { lorad_plugin::call_typed(self.desc, method, request) }
    }

    /// Whether the plugin declares `kind` (a `lorad_plugin::kinds` flag).
    pub fn has(&self, kind: u32) -> bool {
        self.kinds & kind != 0
    }
}
