//! The plugins in use: found in the plugin directories, loaded, asked what they provide, checked for
//! clashes. Built by a scan (at start and on SIGHUP) and then read-only; a rescan builds a new one.
use super::library::{LoadError, PluginLib};
use lorad_plugin::{
    kinds, methods, DataFormatDef, DataloaderFormatsRequest, DataloaderFormatsResponse,
    ExportFormatDef, ExportFormatsRequest, ExportFormatsResponse, TemplateDef,
    TemplatesListRequest, TemplatesListResponse,
};
use lorad_schema::{PluginInfo, PluginKind, PluginsStatus, RejectedPlugin, Template};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Dataset extensions lorad reads itself; a dataloader plugin cannot take them over.
pub const BUILTIN_DATA_EXTENSIONS: [&str; 2] = ["jsonl", "json"];

/// Which files of a directory are plugins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Every `*.so`.
    All,
    /// Only `liblorad_*.so`: the plugins bundled next to the `lorad` binary, whose directory may hold
    /// other libraries (a cargo target dir does).
    Bundled,
}

/// A directory searched for plugins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginDir {
    /// The directory.
    pub path: PathBuf,
    /// Which files count.
    pub pick: Pick,
}

/// The default search path, in order: next to the binary (bundled), `<prefix>/lib/lorad/plugins`,
/// `/etc/lorad/plugins.d`, `~/.local/share/lorad/plugins`.
pub fn default_dirs(exe: &Path) -> Vec<PluginDir> {
    let mut dirs = Vec::new();
    if let Some(bin) = exe.parent() {
        dirs.push(PluginDir {
            path: bin.to_path_buf(),
            pick: Pick::Bundled,
        });
        if let Some(prefix) = bin.parent() {
            dirs.push(PluginDir {
                path: prefix.join("lib/lorad/plugins"),
                pick: Pick::All,
            });
        }
    }
    dirs.push(PluginDir {
        path: PathBuf::from("/etc/lorad/plugins.d"),
        pick: Pick::All,
    });
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        dirs.push(PluginDir {
            path: PathBuf::from(home).join(".local/share/lorad/plugins"),
            pick: Pick::All,
        });
    }
    dirs
}

/// A plugin in use and what it provides.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The library.
    pub lib: Arc<PluginLib>,
    /// Its templates.
    pub templates: Vec<TemplateDef>,
    /// Its export formats.
    pub export_formats: Vec<ExportFormatDef>,
    /// Its dataset formats.
    pub data_formats: Vec<DataFormatDef>,
}

/// The exporter of a format.
#[derive(Debug, Clone)]
pub struct Exporter {
    /// The plugin.
    pub lib: Arc<PluginLib>,
    /// The format.
    pub format: ExportFormatDef,
}

/// The dataloader plugin that reads a dataset.
#[derive(Debug, Clone)]
pub struct Dataloader {
    /// The plugin.
    pub lib: Arc<PluginLib>,
    /// The format it claimed the file for.
    pub format: DataFormatDef,
}

/// The result of a scan.
#[derive(Debug, Default)]
pub struct Registry {
    dirs: Vec<PluginDir>,
    loaded: Vec<Loaded>,
    rejected: Vec<RejectedPlugin>,
}

impl Registry {
    /// Scans `dirs` in order (files sorted by name within a directory), loading every plugin that
    /// passes; the others are recorded as rejected with their reason. With `strict` (the system
    /// daemon), a directory or file that anyone but root could have written is rejected unopened
    /// ([`super::trust`]). Blocking; never fails.
    pub fn scan(dirs: &[PluginDir], strict: bool) -> Registry {
        let mut reg = Registry {
            dirs: dirs.to_vec(),
            ..Registry::default()
        };
        for dir in dirs {
            let files = plugin_files(dir);
            if strict && !files.is_empty() {
                if let Err(why) = super::trust::check_dir(&dir.path) {
                    let reason = format!("plugin directory not trusted: {why}; a system daemon loads plugins only from places no one but root can write");
                    tracing::warn!(path = %dir.path.display(), %reason, "plugin directory rejected");
                    reg.rejected.push(RejectedPlugin {
                        path: dir.path.display().to_string(),
                        reason,
                    });
                    continue;
                }
            }
            for file in files {
                if strict {
                    if let Err(why) = super::trust::check_file(&file) {
                        let reason = format!("plugin file not trusted: {why}");
                        tracing::warn!(path = %file.display(), %reason, "plugin rejected");
                        reg.rejected.push(RejectedPlugin {
                            path: file.display().to_string(),
                            reason,
                        });
                        continue;
                    }
                }
                let lib = match PluginLib::open(&file) {
                    Err(LoadError::Changed(loaded)) => {
                        let reason = LoadError::Changed(loaded.clone()).to_string();
                        tracing::warn!(path = %file.display(), %reason, "plugin file replaced");
                        reg.rejected.push(RejectedPlugin {
                            path: file.display().to_string(),
                            reason,
                        });
                        Ok(loaded)
                    }
                    other => other.map_err(|e| e.to_string()),
                };
                let verdict = lib.and_then(|lib| reg.describe(lib));
                match verdict {
                    Ok(loaded) => {
                        tracing::info!(plugin = %loaded.lib.name, path = %file.display(), "plugin loaded");
                        reg.loaded.push(loaded);
                    }
                    Err(reason) => {
                        tracing::warn!(path = %file.display(), %reason, "plugin rejected");
                        reg.rejected.push(RejectedPlugin {
                            path: file.display().to_string(),
                            reason,
                        });
                    }
                }
            }
        }
        reg
    }

    /// Asks a library what it provides and checks that against the plugins loaded before it.
    fn describe(&self, lib: Arc<PluginLib>) -> Result<Loaded, String> {
        if let Some(other) = self.loaded.iter().find(|l| l.lib.name == lib.name) {
            return Err(format!(
                "plugin {} is already loaded from {}",
                lib.name,
                other.lib.path.display()
            ));
        }
        let failed =
            |method: &str, e: lorad_plugin::PluginCallError| format!("{method} failed: {e}");
        let templates: Vec<TemplateDef> = if lib.has(kinds::TEMPLATES) {
            lib.call::<_, TemplatesListResponse>(methods::TEMPLATES_LIST, &TemplatesListRequest {})
                .map_err(|e| failed(methods::TEMPLATES_LIST, e))?
                .templates
        } else {
            Vec::new()
        };
        let export_formats = if lib.has(kinds::EXPORT) {
            lib.call::<_, ExportFormatsResponse>(methods::EXPORT_FORMATS, &ExportFormatsRequest {})
                .map_err(|e| failed(methods::EXPORT_FORMATS, e))?
                .formats
        } else {
            Vec::new()
        };
        let data_formats = if lib.has(kinds::DATALOADER) {
            lib.call::<_, DataloaderFormatsResponse>(
                methods::DATALOADER_FORMATS,
                &DataloaderFormatsRequest {},
            )
            .map_err(|e| failed(methods::DATALOADER_FORMATS, e))?
            .formats
        } else {
            Vec::new()
        };
        let loaded = Loaded {
            lib,
            templates,
            export_formats,
            data_formats,
        };
        self.check_clashes(&loaded)?;
        Ok(loaded)
    }

    /// A name or extension already provided by a loaded plugin (or by lorad) rejects the newcomer.
    fn check_clashes(&self, new: &Loaded) -> Result<(), String> {
        let mut seen = BTreeMap::new();
        for t in &new.templates {
            if t.name.trim().is_empty() {
                return Err("a template has an empty name".into());
            }
            if let Err(e) = t.settings.validate() {
                return Err(format!("template {}: {e}", t.name));
            }
            if seen.insert(("template", t.name.clone()), ()).is_some() {
                return Err(format!("template {} is listed twice", t.name));
            }
            if let Some(owner) = self.template_owner(&t.name) {
                return Err(format!(
                    "template {} is already provided by plugin {owner}",
                    t.name
                ));
            }
        }
        for f in &new.export_formats {
            if f.name.trim().is_empty() {
                return Err("an export format has an empty name".into());
            }
            if let Some(owner) = self.exporter(&f.name) {
                return Err(format!(
                    "export format {} is already provided by plugin {}",
                    f.name, owner.lib.name
                ));
            }
        }
        for f in &new.data_formats {
            for ext in &f.extensions {
                let ext = ext.to_ascii_lowercase();
                if ext.is_empty() || ext.contains('.') || ext.contains('/') {
                    return Err(format!(
                        "dataset format {}: extension {ext:?} must be a bare name like \"tsv\"",
                        f.name
                    ));
                }
                if BUILTIN_DATA_EXTENSIONS.contains(&ext.as_str()) {
                    return Err(format!(
                        "dataset format {}: .{ext} files are read by lorad itself",
                        f.name
                    ));
                }
                if let Some(owner) = self.dataloader_for_extension(&ext) {
                    return Err(format!(
                        "dataset format {}: .{ext} files are already read by plugin {}",
                        f.name, owner.lib.name
                    ));
                }
            }
        }
        Ok(())
    }

    fn template_owner(&self, name: &str) -> Option<&str> {
        self.loaded
            .iter()
            .find(|l| l.templates.iter().any(|t| t.name == name))
            .map(|l| l.lib.name.as_str())
    }

    /// Every template, in load order.
    pub fn templates(&self) -> Vec<Template> {
        self.loaded
            .iter()
            .flat_map(|l| l.templates.iter())
            .map(|t| Template {
                name: t.name.clone(),
                description: t.description.clone(),
                settings: t.settings.clone(),
            })
            .collect()
    }

    /// The template called `name`.
    pub fn template(&self, name: &str) -> Option<Template> {
        self.templates().into_iter().find(|t| t.name == name)
    }

    /// The exporter of `format`.
    pub fn exporter(&self, format: &str) -> Option<Exporter> {
        self.loaded.iter().find_map(|l| {
            l.export_formats
                .iter()
                .find(|f| f.name == format)
                .map(|f| Exporter {
                    lib: l.lib.clone(),
                    format: f.clone(),
                })
        })
    }

    /// Every export format's name.
    pub fn export_formats(&self) -> Vec<String> {
        self.loaded
            .iter()
            .flat_map(|l| l.export_formats.iter().map(|f| f.name.clone()))
            .collect()
    }

    fn dataloader_for_extension(&self, ext: &str) -> Option<Dataloader> {
        self.loaded.iter().find_map(|l| {
            l.data_formats
                .iter()
                .find(|f| f.extensions.iter().any(|e| e.eq_ignore_ascii_case(ext)))
                .map(|f| Dataloader {
                    lib: l.lib.clone(),
                    format: f.clone(),
                })
        })
    }

    /// The dataloader plugin that reads `dataset` (by its extension); None means lorad reads it
    /// itself, as JSONL.
    pub fn dataloader_for(&self, dataset: &Path) -> Option<Dataloader> {
        let ext = dataset.extension()?.to_str()?.to_ascii_lowercase();
        self.dataloader_for_extension(&ext)
    }

    /// What `status` reports.
    pub fn status(&self) -> PluginsStatus {
        PluginsStatus {
            loaded: self
                .loaded
                .iter()
                .map(|l| PluginInfo {
                    name: l.lib.name.clone(),
                    path: l.lib.path.display().to_string(),
                    kinds: kind_list(l.lib.kinds),
                    provides: l
                        .templates
                        .iter()
                        .map(|t| format!("template {}", t.name))
                        .chain(
                            l.export_formats
                                .iter()
                                .map(|f| format!("export {}", f.name)),
                        )
                        .chain(
                            l.data_formats.iter().map(|f| {
                                format!("dataset {} (.{})", f.name, f.extensions.join(", ."))
                            }),
                        )
                        .collect(),
                })
                .collect(),
            rejected: self.rejected.clone(),
            dirs: self
                .dirs
                .iter()
                .map(|d| d.path.display().to_string())
                .collect(),
        }
    }
}

fn kind_list(flags: u32) -> Vec<PluginKind> {
    [
        (kinds::TEMPLATES, PluginKind::Templates),
        (kinds::EXPORT, PluginKind::Export),
        (kinds::DATALOADER, PluginKind::Dataloader),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, kind)| kind)
    .collect()
}

/// The plugin files of `dir`, sorted by name; a missing directory has none.
fn plugin_files(dir: &PluginDir) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(&dir.path) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                return false;
            };
            let wanted = match dir.pick {
                Pick::All => name.ends_with(".so"),
                Pick::Bundled => name.starts_with("liblorad_") && name.ends_with(".so"),
            };
            wanted && p.is_file()
        })
        .collect();
    files.sort();
    files
}
