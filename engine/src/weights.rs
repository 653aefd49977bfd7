//! safetensors files: the base model's weights (single file or sharded index) and the files lorad writes
//! (adapters, the tiny model). One reader and one writer, so the tiny model exercises exactly the code
//! path a real model goes through.
use super::error::EngineError;
use super::tensor_file::{for_each_tensor, Header};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Single-file weights.
pub const SINGLE: &str = "model.safetensors";
/// Index of sharded weights (`weight_map`: tensor name -> shard file).
pub const INDEX: &str = "model.safetensors.index.json";

/// The weight files of a model directory, or a `Model` error naming what is missing.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let single = dir.join(SINGLE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX);
    if !index.is_file() {
        return Err(EngineError::model(
            dir,
            format!("no weights: neither {SINGLE} nor {INDEX} exists"),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::model(&index, format!("not valid JSON: {e}")))?;
    let Some(map) = value.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(EngineError::model(
            &index,
            "missing object field \"weight_map\"",
        ));
    };
    let mut files = BTreeSet::new();
    for (name, file) in map {
        let Some(file) = file.as_str() else {
            return Err(EngineError::model(
                &index,
                format!("weight_map[\"{name}\"] is not a file name"),
            ));
        };
        // A shard name is a plain file name inside the model directory, never a path elsewhere.
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(EngineError::model(
                &index,
                format!("weight_map[\"{name}\"]: bad shard name \"{file}\""),
            ));
        }
        files.insert(file.to_string());
    }
    let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(EngineError::model(
            missing,
            "shard listed in the index does not exist",
        ));
    }
    Ok(files)
}

/// Loads every tensor of the model in `dir` onto `device` as plain tensors (never `Var`s: base weights
/// are frozen by construction), converted to `dtype`.
pub fn load_weights(
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>, EngineError> {
    let mut all = HashMap::new();
    for file in weight_files(dir)? {
        // One tensor at a time: the load never holds a file's bytes and its tensors together.
        for_each_tensor(&file, device, |name, t| {
            let t = if t.dtype() == dtype {
                t
            } else {
                t.to_dtype(dtype)?
            };
            all.insert(name, t);
            Ok(())
        })?;
    }
    Ok(all)
}

/// Like [`load_weights`] with f32, but matrices stored in bf16 or f16 stay so (frozen weights widened
/// per use, see `lorad_kernels::frozen`); vectors and other dtypes become f32.
pub fn load_weights_stored(
    dir: &Path,
    device: &Device,
) -> Result<HashMap<String, lorad_kernels::frozen::Frozen>, EngineError> {
    let mut all = HashMap::new();
    for file in weight_files(dir)? {
        for_each_tensor(&file, device, |name, t| {
            let keep = t.rank() == 2 && matches!(t.dtype(), DType::BF16 | DType::F16);
            let t = if keep || t.dtype() == DType::F32 {
                t
            } else {
                t.to_dtype(DType::F32)?
            };
            all.insert(name, lorad_kernels::frozen::Frozen::Dense(t));
            Ok(())
        })?;
    }
    Ok(all)
}

/// A tensor's bytes prepared for writing (little-endian f32 on the CPU), so that serialization cannot
/// fail half-way through a file.
struct F32View {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &F32View {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` as f32 to `path` with the `{"format": "pt"}` metadata transformers expects, through
/// a temporary file renamed into place.
pub fn save_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<(), EngineError> {
    save_tensors_with_metadata(path, tensors, &[])
}

/// `save_tensors` with extra header metadata (e.g. the optimizer step count in a checkpoint).
pub fn save_tensors_with_metadata(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    extra: &[(&str, String)],
) -> Result<(), EngineError> {
    let mut views = BTreeMap::new();
    for (name, t) in tensors {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        views.insert(
            name.clone(),
            F32View {
                shape: t.dims().to_vec(),
                bytes,
            },
        );
    }
    let mut metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    metadata.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let tmp = tmp_sibling(path);
    safetensors::serialize_to_file(
        views.iter().map(|(k, v)| (k.as_str(), v)),
        Some(metadata),
        &tmp,
    )
    .map_err(|e| {
        let io = match e {
            // Keep the OS error (a full disk must stay recognisable as one).
            safetensors::SafeTensorError::IoError(io) => io,
            other => std::io::Error::other(other.to_string()),
        };
        EngineError::io(&tmp, io)
    })?;
    std::fs::rename(&tmp, path).map_err(|e| EngineError::io(path, e))
}

/// Checks that a safetensors file is complete without reading its tensors: the header parses, and
/// the file is exactly as long as the header and the tensors it declares (so a truncated download or
/// copy is refused at submit, naming the file and the sizes).
pub fn check_complete(path: &Path) -> Result<(), EngineError> {
    let mut file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let header = Header::read(path, &mut file)?;
    let (expected, len) = (header.declared_len(), header.file_len);
    if expected != len {
        return Err(EngineError::model(
            path,
            format!(
                "{}: the header declares {expected} bytes of header and tensors, the file has {len}",
                if len < expected {
                    "truncated"
                } else {
                    "longer than its header says"
                }
            ),
        ));
    }
    Ok(())
}

/// Writes `text` to `path` through a temporary file renamed into place.
pub fn write_text(path: &Path, text: &str) -> Result<(), EngineError> {
    let tmp = tmp_sibling(path);
    std::fs::write(&tmp, text).map_err(|e| EngineError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| EngineError::io(path, e))
}

/// `dir/.name.tmp-<pid>`: hidden, in the same directory (so rename is atomic), unique per process.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_safetensors_file_is_refused_with_its_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let t =
            candle_core::Tensor::ones((4, 4), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        save_tensors(
            &path,
            &std::collections::BTreeMap::from([("w".to_string(), t)]),
        )
        .unwrap();
        check_complete(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let e = check_complete(&path).unwrap_err().to_string();
        assert!(
            e.contains("truncated") && e.contains(&format!("the file has {}", bytes.len() - 5)),
            "{e}"
        );
        std::fs::write(&path, &bytes[..6]).unwrap();
        assert!(check_complete(&path)
            .unwrap_err()
            .to_string()
            .contains("too short"));
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let map = BTreeMap::from([("w".to_string(), t.clone())]);
        save_tensors(&dir.path().join(SINGLE), &map).unwrap();
        let loaded = load_weights(dir.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(
            loaded["w"].to_vec2::<f32>().unwrap(),
            t.to_vec2::<f32>().unwrap()
        );
        let err = weight_files(&dir.path().join("nowhere"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no weights"), "{err}");
    }
}
