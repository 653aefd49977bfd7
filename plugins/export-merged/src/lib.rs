//! # lorad-export-merged
//!
//! The `merged` exporter: the base model with the adapter folded into its weights,
//! `W' = W + scale * B @ A` for every adapted module (scale `alpha / r`, or `alpha / sqrt(r)` with
//! rsLoRA, as lorad trains and PEFT merges), written as an HF model directory in f32:
//! `model.safetensors` (or `model-0000k-of-0000n.safetensors` shards and
//! `model.safetensors.index.json` past 2 GiB), `config.json` and the tokenizer files. It loads with
//! `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`, and in lorad as
//! a base model.
//!
//! The base is an HF directory (its config and tokenizer files are copied, config.json's dtype set to
//! float32) or a GGUF file (dequantized and un-permuted like lorad loads it; config.json, tokenizer.json
//! and tokenizer_config.json are written from its metadata). Tensors are read, merged and written one
//! at a time. With tied embeddings no separate `lm_head.weight` is written. Progress goes to stderr;
//! the directory is assembled in a temporary sibling of `out` and renamed into place.
#![deny(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod base;
pub mod error;
pub mod hf_files;
pub mod merge;
pub mod writer;

use base::BaseTensors;
use error::MergeError;
use lorad_engine::adapter::{load_adapter, CONFIG_FILE, WEIGHTS_FILE};
use lorad_engine::source::ModelSource;
use lorad_plugin::staging::{Kind, Staging};
use lorad_plugin::{export_plugin, ExportRequest, Exporter, OneFormat, PluginError};
use merge::Deltas;
use std::path::{Path, PathBuf};
use writer::{plan_shards, ShardWriter, DEFAULT_SHARD_BYTES, INDEX};

/// The plugin's name, as `loractl status` lists it.
pub const PLUGIN_NAME: &str = "lorad-export-merged";
/// The export format it writes (`loractl export --format merged`).
pub const FORMAT: &str = "merged";

/// The exporter.
#[derive(Debug, Default)]
pub struct MergedExporter;

impl Exporter for MergedExporter {
    const NAME: &'static str = PLUGIN_NAME;
    const FORMAT: &'static str = FORMAT;
    const DESCRIPTION: &'static str =
        "base model with the adapter merged in: HF directory, f32 safetensors, \
                          config and tokenizer";

    fn write(&self, request: &ExportRequest) -> Result<Vec<PathBuf>, PluginError> {
        let (adapter, base) = (&request.adapter_dir, &request.base_model);
        let (adapter, base, out) = (Path::new(adapter), Path::new(base), Path::new(&request.out));
        Ok(export_merged(adapter, base, out, &Options::default())?)
    }
}

export_plugin!(OneFormat<MergedExporter>, OneFormat(MergedExporter));

/// Knobs of the merge that the plugin call leaves at their defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Largest shard in bytes (f32 data); the whole model goes in `model.safetensors` when it fits.
    pub shard_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            shard_bytes: DEFAULT_SHARD_BYTES,
        }
    }
}

/// Merges the adapter in `adapter_dir` into the base model `base` and writes the HF directory `out`.
/// Returns the files written (under `out`).
pub fn export_merged(
    adapter_dir: &Path,
    base: &Path,
    out: &Path,
    options: &Options,
) -> Result<Vec<PathBuf>, MergeError> {
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        let path = adapter_dir.join(file);
        if !path.is_file() {
            return Err(MergeError::Missing(path));
        }
    }
    // Checked before the (possibly long) load of the base: a bad `out` fails at once.
    let staging = Staging::new(out, Kind::Dir)?;
    let adapter = load_adapter(adapter_dir)?;
    eprintln!(
        "merged: adapter {} ({} modules, r {}, scale {})",
        adapter_dir.display(),
        adapter.weights.len(),
        adapter.config.r,
        adapter.lora_config().scale()
    );
    let source = ModelSource::open(base)?;
    let cfg = source.config().clone();
    let mut tensors = BaseTensors::open(&source)?;
    let mut entries = tensors.entries();
    // Tied: the LM head is the embedding; transformers ties it again on load.
    if cfg.tie_word_embeddings {
        entries.retain(|e| e.name != "lm_head.weight");
    }
    entries.sort_by_cached_key(|e| order_key(&e.name));
    let deltas = Deltas::new(&adapter, &entries).map_err(|detail| MergeError::Mismatch {
        adapter: adapter_dir.to_path_buf(),
        base: base.to_path_buf(),
        detail,
    })?;
    let attention_bias = entries.iter().any(|e| e.name.ends_with("q_proj.bias"));
    eprintln!(
        "merged: base {} ({} tensors, {} layers)",
        base.display(),
        entries.len(),
        cfg.num_hidden_layers
    );

    let shards = plan_shards(entries, options.shard_bytes);
    let layers = cfg.num_hidden_layers;
    let written = write_shards(&shards, &mut tensors, &deltas, &staging, layers)?;
    let mut files: Vec<PathBuf> = written.iter().map(|f| out.join(f)).collect();
    let written = match &source {
        ModelSource::HfDir { dir, .. } => hf_files::copy_from_hf_dir(dir, staging.path())?,
        ModelSource::Gguf(_) => {
            hf_files::write_for_gguf(&cfg, &source.tokenizer()?, attention_bias, staging.path())?
        }
    };
    eprintln!("merged: wrote {}", written.join(", "));
    files.extend(written.iter().map(|f| out.join(f)));
    staging.commit()?;
    eprintln!(
        "merged: {} ({} weights merged, f32)",
        out.display(),
        deltas.len()
    );
    Ok(files)
}

/// Writes the merged tensors, shard by shard (and the index when there are several); returns the
/// names of the files written.
fn write_shards(
    shards: &[(String, Vec<base::BaseEntry>)],
    tensors: &mut BaseTensors,
    deltas: &Deltas,
    staging: &Staging,
    layers: usize,
) -> Result<Vec<String>, MergeError> {
    let mut files = Vec::new();
    let mut progress = Progress::new(layers);
    for (name, shard) in shards {
        let path = staging.path().join(name);
        let mut w = ShardWriter::create(&path, shard.clone())?;
        for entry in shard {
            let t = tensors.load(&entry.name)?;
            let merged = deltas
                .apply(&entry.name, t)
                .map_err(|e| MergeError::tensor(&entry.name, tensors.path(), e))?;
            w.write(&entry.name, &merged)?;
            progress.done(&entry.name, deltas.adapts(&entry.name));
        }
        w.finish()?;
        progress.flush();
        if shards.len() > 1 {
            eprintln!("merged: wrote {name}");
        }
        files.push(name.clone());
    }
    if shards.len() > 1 {
        let path = staging.path().join(INDEX);
        let text = serde_json::to_string_pretty(&writer::index_json(shards)).unwrap_or_default();
        std::fs::write(&path, text + "\n").map_err(|e| MergeError::io(&path, e))?;
        files.push(INDEX.to_string());
    }
    Ok(files)
}

/// Write order: embeddings, then layer by layer (numerically), then the final norm and LM head.
fn order_key(name: &str) -> (u8, usize, String) {
    match name
        .strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next()?.parse::<usize>().ok())
    {
        Some(layer) => (1, layer, name.to_owned()),
        None if name.contains("embed") => (0, 0, name.to_owned()),
        None => (2, 0, name.to_owned()),
    }
}

/// Progress lines on stderr: one per layer (and one for the tensors around the layers).
struct Progress {
    layers: usize,
    group: Option<(u8, usize)>,
    tensors: usize,
    merged: usize,
}

impl Progress {
    fn new(layers: usize) -> Self {
        Progress {
            layers,
            group: None,
            tensors: 0,
            merged: 0,
        }
    }

    fn done(&mut self, name: &str, merged: bool) {
        let (rank, layer, _) = order_key(name);
        if self.group.is_some_and(|g| g != (rank, layer)) {
            self.flush();
        }
        self.group = Some((rank, layer));
        self.tensors += 1;
        self.merged += usize::from(merged);
    }

    fn flush(&mut self) {
        let Some((rank, layer)) = self.group.take() else {
            return;
        };
        let what = match rank {
            0 => "embeddings".to_owned(),
            1 => format!("layer {}/{}", layer + 1, self.layers),
            _ => "final norm and head".to_owned(),
        };
        eprintln!(
            "merged: {what} ({} tensors, {} with the adapter merged)",
            self.tensors, self.merged
        );
        self.tensors = 0;
        self.merged = 0;
    }
}
