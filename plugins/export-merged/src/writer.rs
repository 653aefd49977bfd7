//! Writing f32 safetensors one tensor at a time, and splitting a model into shards the way
//! transformers does (`model-00001-of-00003.safetensors` + `model.safetensors.index.json`).
//!
//! The header (names, shapes, offsets) is known from the plan before any data is read, so it is
//! written first and each tensor's bytes follow as soon as that tensor is merged: only one tensor is
//! ever held in memory.
use crate::base::BaseEntry;
use candle_core::{DType, Tensor};
use serde_json::{json, Map, Value};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The single-file weights name.
pub const SINGLE: &str = "model.safetensors";
/// The shard index name.
pub const INDEX: &str = "model.safetensors.index.json";
/// Shards are cut at this size (transformers' `max_shard_size` default is 5 GB; 2 GiB keeps each
/// shard well inside what 32-bit tooling and one mmap handle comfortably).
pub const DEFAULT_SHARD_BYTES: u64 = 2 << 30;

/// Bytes of a tensor of `shape` in f32.
pub fn f32_bytes(shape: &[usize]) -> u64 {
    shape.iter().map(|d| *d as u64).product::<u64>() * 4
}

/// Splits `entries` (in write order) into consecutive shards of at most `max_bytes` each (a tensor
/// larger than that gets a shard of its own), and names them: one shard is `model.safetensors`.
pub fn plan_shards(entries: Vec<BaseEntry>, max_bytes: u64) -> Vec<(String, Vec<BaseEntry>)> {
    let mut shards: Vec<Vec<BaseEntry>> = Vec::new();
    let mut size = 0u64;
    for e in entries {
        let bytes = f32_bytes(&e.shape);
        match shards.last_mut() {
            Some(shard) if size + bytes <= max_bytes || shard.is_empty() => {
                size += bytes;
                shard.push(e);
            }
            _ => {
                size = bytes;
                shards.push(vec![e]);
            }
        }
    }
    let n = shards.len();
    shards
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let name = if n == 1 {
                SINGLE.to_owned()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", i + 1)
            };
            (name, s)
        })
        .collect()
}

/// `model.safetensors.index.json` for the shards.
pub fn index_json(shards: &[(String, Vec<BaseEntry>)]) -> Value {
    let mut map = Map::new();
    let mut total = 0u64;
    for (file, entries) in shards {
        for e in entries {
            total += f32_bytes(&e.shape);
            map.insert(e.name.clone(), Value::String(file.clone()));
        }
    }
    json!({"metadata": {"total_size": total}, "weight_map": map})
}

/// Why writing a shard failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The OS refused.
    #[error("{}: {source}", path.display())]
    Io {
        /// The shard.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor came in another order or shape than the header announced (a bug, or a base file
    /// whose header lies about its shapes).
    #[error("{}: tensor {name}: {detail}", path.display())]
    Plan {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What differs.
        detail: String,
    },
    /// Converting the tensor to bytes failed.
    #[error("{}: tensor {name}: {source}", path.display())]
    Tensor {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// candle's error (boxed: it is large).
        #[source]
        source: Box<candle_core::Error>,
    },
}

/// One safetensors file being written: header first, then tensors in the planned order.
pub struct ShardWriter {
    path: PathBuf,
    out: BufWriter<std::fs::File>,
    entries: Vec<BaseEntry>,
    next: usize,
}

impl ShardWriter {
    /// Creates `path` and writes the header for `entries` (f32, `{"format": "pt"}` metadata).
    pub fn create(path: &Path, entries: Vec<BaseEntry>) -> Result<Self, WriteError> {
        let io = |source| WriteError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0u64;
        for e in &entries {
            let end = offset + f32_bytes(&e.shape);
            header.insert(
                e.name.clone(),
                json!({"dtype": "F32", "shape": e.shape, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        let mut text = Value::Object(header).to_string().into_bytes();
        // The data starts 8-byte aligned, as the safetensors writer pads it.
        text.resize(text.len().div_ceil(8) * 8, b' ');
        let file = std::fs::File::create(path).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(text.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(&text))
            .map_err(io)?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            out,
            entries,
            next: 0,
        })
    }

    /// The entries of this shard, in write order.
    pub fn entries(&self) -> &[BaseEntry] {
        &self.entries
    }

    /// Appends the next planned tensor, which must be `name` with the planned shape.
    pub fn write(&mut self, name: &str, t: &Tensor) -> Result<(), WriteError> {
        let plan = |detail: String| WriteError::Plan {
            path: self.path.clone(),
            name: name.to_owned(),
            detail,
        };
        let Some(expected) = self.entries.get(self.next) else {
            return Err(plan("more tensors than the header lists".into()));
        };
        if expected.name != name {
            return Err(plan(format!("expected {} here", expected.name)));
        }
        if expected.shape != t.dims() {
            return Err(plan(format!(
                "shape {:?}, the header says {:?}",
                t.dims(),
                expected.shape
            )));
        }
        let values = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|source| WriteError::Tensor {
                path: self.path.clone(),
                name: name.to_owned(),
                source: Box::new(source),
            })?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.out
            .write_all(&bytes)
            .map_err(|source| WriteError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every planned tensor was written and flushes the file.
    pub fn finish(mut self) -> Result<(), WriteError> {
        if let Some(missing) = self.entries.get(self.next) {
            return Err(WriteError::Plan {
                path: self.path.clone(),
                name: missing.name.clone(),
                detail: "planned but never written".into(),
            });
        }
        self.out.flush().map_err(|source| WriteError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn entry(name: &str, shape: &[usize]) -> BaseEntry {
        BaseEntry {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn written_file_reads_back_with_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE);
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[7f32], &Device::Cpu).unwrap();
        let mut w =
            ShardWriter::create(&path, vec![entry("b", &[1]), entry("a", &[2, 3])]).unwrap();
        let e = w.write("a", &a).unwrap_err();
        assert!(e.to_string().contains("expected b here"), "{e}");
        w.write("b", &b).unwrap();
        w.write("a", &a).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().shape(), &[2, 3]);
        let back = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(
            back["a"].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(back["b"].to_vec1::<f32>().unwrap(), [7.0]);
    }

    #[test]
    fn unfinished_shard_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let w = ShardWriter::create(&dir.path().join("x"), vec![entry("a", &[1])]).unwrap();
        let e = w.finish().unwrap_err();
        assert!(e.to_string().contains("never written"), "{e}");
    }

    #[test]
    fn shards_are_cut_by_size_and_named_like_transformers() {
        let entries = vec![
            entry("a", &[10]),
            entry("b", &[10]),
            entry("c", &[30]),
            entry("d", &[5]),
        ];
        let one = plan_shards(entries.clone(), 1 << 20);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].0, SINGLE);
        // 80 bytes per shard: a+b (80), c alone (120 > 80), d.
        let many = plan_shards(entries, 80);
        let names: Vec<_> = many.iter().map(|(n, e)| (n.as_str(), e.len())).collect();
        assert_eq!(
            names,
            [
                ("model-00001-of-00003.safetensors", 2),
                ("model-00002-of-00003.safetensors", 1),
                ("model-00003-of-00003.safetensors", 1)
            ]
        );
        let index = index_json(&many);
        assert_eq!(index["metadata"]["total_size"], 220);
        assert_eq!(index["weight_map"]["c"], "model-00002-of-00003.safetensors");
    }
}
