//! Reading a safetensors file one tensor at a time.
//!
//! `candle_core::safetensors::load` reads the whole file into memory and then builds every tensor
//! from it, so loading a model peaks at twice its size (a 2.5 GB bf16 Llama-3.2-1B: 5 GB). Here the
//! header is parsed first and each tensor's bytes are read, turned into a tensor and handed to the
//! caller before the next is read: the peak is what the caller keeps plus one tensor in flight.
use super::error::EngineError;
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The largest safetensors header lorad reads (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// One tensor as the header declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    /// The format's dtype name (`BF16`, `F32`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range in the data section (after the 8-byte length and the header).
    pub begin: u64,
    pub end: u64,
}

/// A parsed header: where the data section starts and the tensors in file order.
#[derive(Debug)]
pub struct Header {
    pub data_start: u64,
    pub entries: Vec<Entry>,
    /// The file's length in bytes.
    pub file_len: u64,
}

impl Header {
    /// Reads and checks the header of `path`: valid JSON, every tensor's offsets in order and of the
    /// size its dtype and shape call for, all inside the file. Errors name the file and the tensor.
    pub fn read(path: &Path, file: &mut File) -> Result<Header, EngineError> {
        let bad = |detail: String| EngineError::model(path, detail);
        let file_len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(|_| {
            bad(format!(
                "truncated: {file_len} bytes, too short for a safetensors header"
            ))
        })?;
        let header_len = u64::from_le_bytes(n);
        if header_len > MAX_HEADER || 8 + header_len > file_len {
            return Err(bad(format!(
                "truncated or not safetensors: the header declares {header_len} bytes, the file has {file_len}"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| EngineError::io(path, e))?;
        let value: serde_json::Value = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("the safetensors header is not valid JSON: {e}")))?;
        let Some(map) = value.as_object() else {
            return Err(bad("the safetensors header is not a JSON object".into()));
        };
        let mut entries = Vec::with_capacity(map.len());
        for (name, info) in map.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
            let field = |detail: &str| bad(format!("tensor {name}: {detail} in the header"));
            let offsets = info
                .get("data_offsets")
                .and_then(|o| o.as_array())
                .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)));
            let Some((begin, end)) = offsets.filter(|(a, b)| a <= b) else {
                return Err(field("bad data_offsets"));
            };
            let dtype = info
                .get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| field("no dtype"))?
                .to_string();
            let shape = info
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|s| {
                    s.iter()
                        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                        .collect::<Option<Vec<usize>>>()
                })
                .ok_or_else(|| field("bad shape"))?;
            entries.push(Entry {
                name: name.clone(),
                dtype,
                shape,
                begin,
                end,
            });
        }
        entries.sort_by_key(|e| e.begin);
        Ok(Header {
            data_start: 8 + header_len,
            entries,
            file_len,
        })
    }

    /// Where the header says the file ends.
    pub fn declared_len(&self) -> u64 {
        self.data_start + self.entries.iter().map(|e| e.end).max().unwrap_or(0)
    }
}

/// The candle dtype of a safetensors dtype name, or None for one lorad does not load.
fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

/// Reads every tensor of `path` onto `device`, one at a time, calling `each(name, tensor)` before
/// the next is read. A tensor whose bytes do not match its dtype and shape, a dtype lorad does not
/// load, or a file shorter than its header says is an error naming the file and the tensor.
pub fn for_each_tensor(
    path: &Path,
    device: &Device,
    mut each: impl FnMut(String, Tensor) -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let header = Header::read(path, &mut file)?;
    if header.declared_len() > header.file_len {
        return Err(EngineError::model(
            path,
            format!(
                "truncated: the header declares {} bytes of header and tensors, the file has {}",
                header.declared_len(),
                header.file_len
            ),
        ));
    }
    for e in header.entries {
        let bad = |detail: String| EngineError::model(path, format!("tensor {}: {detail}", e.name));
        let dtype =
            dtype_of(&e.dtype).ok_or_else(|| bad(format!("dtype {} is not supported", e.dtype)))?;
        let want = e.shape.iter().product::<usize>() * dtype.size_in_bytes();
        let len = usize::try_from(e.end - e.begin).map_err(|_| bad("too large".into()))?;
        if len != want {
            return Err(bad(format!(
                "{len} bytes for a {:?} {} tensor, which takes {want}",
                e.shape, e.dtype
            )));
        }
        let mut bytes = vec![0u8; len];
        file.seek(SeekFrom::Start(header.data_start + e.begin))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|err| EngineError::io(path, err))?;
        let t = Tensor::from_raw_buffer(&bytes, dtype, &e.shape, device)
            .map_err(|err| bad(err.to_string()))?;
        drop(bytes);
        each(e.name, t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn reads_what_candle_reads_in_every_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let base = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 6))
            .unwrap();
        let mut tensors = HashMap::new();
        for dt in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            tensors.insert(format!("w.{dt:?}"), base.to_dtype(dt).unwrap());
        }
        tensors.insert(
            "ids".into(),
            Tensor::new(&[3i64, 1, 2], &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&tensors, &path).unwrap();

        let want = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let mut got = BTreeMap::new();
        for_each_tensor(&path, &Device::Cpu, |name, t| {
            got.insert(name, t);
            Ok(())
        })
        .unwrap();
        assert_eq!(got.len(), want.len());
        for (name, t) in &want {
            let g = &got[name];
            assert_eq!((g.dtype(), g.dims()), (t.dtype(), t.dims()), "{name}");
            let diff = g
                .to_dtype(DType::F64)
                .unwrap()
                .sub(&t.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }
    }

    #[test]
    fn a_truncated_file_and_a_bad_dtype_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let mut tensors = HashMap::new();
        tensors.insert(
            "w".to_string(),
            Tensor::zeros((8, 8), DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = for_each_tensor(&path, &Device::Cpu, |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("truncated") && err.contains("t.safetensors"),
            "{err}"
        );

        // The header claims F8_E4M3 for the same bytes.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(bytes[8..8 + n].to_vec())
            .unwrap()
            .replace("\"F32\"", "\"F8_E4M3\"");
        let mut patched = (header.len() as u64).to_le_bytes().to_vec();
        patched.extend_from_slice(header.as_bytes());
        patched.extend_from_slice(&bytes[8 + n..]);
        std::fs::write(&path, &patched).unwrap();
        let err = for_each_tensor(&path, &Device::Cpu, |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor w") && err.contains("F8_E4M3"), "{err}");
    }
}
