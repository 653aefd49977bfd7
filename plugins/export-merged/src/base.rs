//! The base model's tensors one at a time, by HF name, as f32: memory-mapped safetensors for an HF
//! directory, read and dequantized one by one for a GGUF file. lorad's `ModelSource::tensors` loads
//! everything at once; a merge only ever needs the tensor it is writing.
//!
//! The GGUF side repeats lorad's renaming and Q/K un-permutation (`lorad_engine::gguf::{hf_name,
//! permute_qk}`) tensor by tensor; a test checks it against `ModelSource::tensors`.
use crate::error::MergeError;
use candle_core::quantized::gguf_file::Content;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use lorad_engine::gguf::{self, hf_name, permute_qk};
use lorad_engine::source::ModelSource;
use lorad_engine::weights::weight_files;
use std::collections::HashMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// One tensor of the base model: HF name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseEntry {
    /// HF name (`model.layers.3.self_attn.q_proj.weight`).
    pub name: String,
    /// Shape, HF order (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
}

/// A GGUF tensor to read: its GGUF name and, for llama's Q and K, the head count to un-permute with.
struct GgufTensor {
    gguf: String,
    unpermute_heads: Option<usize>,
}

/// The base model's tensors, opened for reading one at a time.
pub struct BaseTensors(Inner);

enum Inner {
    /// safetensors files of an HF directory (for messages), memory-mapped.
    Hf {
        dir: PathBuf,
        files: MmapedSafetensors,
    },
    /// A GGUF file: its header, the open file, and where each HF-named tensor is.
    Gguf {
        path: PathBuf,
        content: Content,
        reader: BufReader<std::fs::File>,
        by_name: HashMap<String, GgufTensor>,
    },
}

impl BaseTensors {
    /// Opens the tensors of `source` (already checked by `ModelSource::open`).
    pub fn open(source: &ModelSource) -> Result<Self, MergeError> {
        match source {
            ModelSource::HfDir { dir, .. } => {
                let paths = weight_files(dir)?;
                // SAFETY: the files are mapped read-only for the export's duration. Like every
                // mmap-based loader (candle's VarBuilder included) this assumes nobody truncates
                // the base model's files while it is being read.
                let files =
                    unsafe { MmapedSafetensors::multi(&paths) }.map_err(|e| MergeError::Base {
                        path: dir.clone(),
                        detail: format!("cannot map safetensors: {e}"),
                    })?;
                Ok(BaseTensors(Inner::Hf {
                    dir: dir.clone(),
                    files,
                }))
            }
            ModelSource::Gguf(model) => {
                let path = model.path().to_path_buf();
                let content = gguf::read_content(&path)?;
                let cfg = model.config();
                // llama.cpp permutes Q/K rows for `llama` only (qwen2 keeps HF's order).
                let llama = cfg.model_type.as_deref() == Some("llama");
                let mut by_name = HashMap::new();
                for name in content.tensor_infos.keys() {
                    let Some(hf) = hf_name(name) else { continue };
                    let unpermute_heads = match (llama, name.split('.').nth(2)) {
                        (true, Some("attn_q")) => Some(cfg.num_attention_heads),
                        (true, Some("attn_k")) => Some(cfg.kv_heads()),
                        _ => None,
                    };
                    by_name.insert(
                        hf,
                        GgufTensor {
                            gguf: name.clone(),
                            unpermute_heads,
                        },
                    );
                }
                let file = std::fs::File::open(&path).map_err(|e| MergeError::io(&path, e))?;
                Ok(BaseTensors(Inner::Gguf {
                    path,
                    content,
                    reader: BufReader::new(file),
                    by_name,
                }))
            }
        }
    }

    /// The file (or directory) the tensors come from, for messages.
    pub fn path(&self) -> &Path {
        match &self.0 {
            Inner::Hf { dir, .. } => dir,
            Inner::Gguf { path, .. } => path,
        }
    }

    /// Every tensor the model has, in no particular order.
    pub fn entries(&self) -> Vec<BaseEntry> {
        match &self.0 {
            Inner::Hf { files, .. } => files
                .tensors()
                .into_iter()
                .map(|(name, view)| BaseEntry {
                    name,
                    shape: view.shape().to_vec(),
                })
                .collect(),
            Inner::Gguf {
                content, by_name, ..
            } => by_name
                .iter()
                .filter_map(|(hf, t)| {
                    let info = content.tensor_infos.get(&t.gguf)?;
                    Some(BaseEntry {
                        name: hf.clone(),
                        shape: info.shape.dims().to_vec(),
                    })
                })
                .collect(),
        }
    }

    /// Reads one tensor as f32 on the CPU (dequantized and un-permuted for GGUF).
    pub fn load(&mut self, name: &str) -> Result<Tensor, MergeError> {
        match &mut self.0 {
            Inner::Hf { dir, files } => files
                .load(name, &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| MergeError::tensor(name, dir.as_path(), e)),
            Inner::Gguf {
                path,
                content,
                reader,
                by_name,
            } => {
                let Some(t) = by_name.get(name) else {
                    return Err(MergeError::Base {
                        path: path.clone(),
                        detail: format!("no GGUF tensor for {name}"),
                    });
                };
                let Some(info) = content.tensor_infos.get(&t.gguf) else {
                    return Err(MergeError::Base {
                        path: path.clone(),
                        detail: format!("GGUF tensor {} is missing", t.gguf),
                    });
                };
                info.read(reader, content.tensor_data_offset, &Device::Cpu)
                    .and_then(|q| q.dequantize(&Device::Cpu))
                    .and_then(|w| match t.unpermute_heads {
                        Some(heads) => permute_qk(&w, heads, true),
                        None => Ok(w),
                    })
                    .map_err(|e| MergeError::tensor(&t.gguf, path.as_path(), e))
            }
        }
    }
}
