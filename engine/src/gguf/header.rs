//! Reading a GGUF file's header (metadata and tensor directory) with candle's reader, plus what candle
//! does not give: typed metadata accessors whose errors name the field, and, when candle rejects a
//! tensor type it does not know (IQ2_XXS, TQ1_0, ...), the name of the tensor that has it.
use crate::error::EngineError;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

/// The ggml name of a tensor type id (ggml.h `enum ggml_type`), for messages.
pub fn ggml_type_name(id: u32) -> String {
    let name = match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        other => return format!("type id {other}"),
    };
    name.to_string()
}

/// The ggml name of a type candle can read (every one of them candle can also dequantize to f32).
pub fn dtype_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Type ids candle 0.11 reads; anything else makes `Content::read` fail for the whole file.
const CANDLE_TYPES: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

/// Reads the header of the GGUF file at `path` (no tensor data). A tensor of a type candle cannot read
/// is reported by name.
pub fn read_content(path: &Path) -> Result<Content, EngineError> {
    let open = || std::fs::File::open(path).map_err(|e| EngineError::io(path, e));
    let mut reader = std::io::BufReader::new(open()?);
    match Content::read(&mut reader) {
        Ok(content) => Ok(content),
        Err(e) => {
            // candle's message for an unknown type does not say which tensor has it: find it ourselves.
            if let Ok(Some((name, id))) =
                first_unreadable_tensor(&mut std::io::BufReader::new(open()?))
            {
                return Err(EngineError::model(
                    path,
                    format!(
                        "GGUF tensor {name} has type {}, not supported yet (supported: {})",
                        ggml_type_name(id),
                        CANDLE_TYPES.map(ggml_type_name).join(", ")
                    ),
                ));
            }
            Err(EngineError::model(
                path,
                format!("cannot read the GGUF header: {e}"),
            ))
        }
    }
}

/// Walks the header like candle does, without interpreting values, and returns the first tensor whose
/// type id candle does not know.
fn first_unreadable_tensor<R: Read + Seek>(r: &mut R) -> std::io::Result<Option<(String, u32)>> {
    let _magic = read_u32(r)?;
    let version = read_u32(r)?;
    let wide = version >= 2; // v1 used 32-bit lengths and counts
    let n_tensors = read_len(r, wide)?;
    let n_kv = read_len(r, wide)?;
    for _ in 0..n_kv {
        skip_string(r, wide)?;
        let ty = read_u32(r)?;
        skip_value(r, ty, wide, 0)?;
    }
    for _ in 0..n_tensors {
        let len = read_len(r, wide)?;
        let mut name = vec![0u8; bounded(len)?];
        r.read_exact(&mut name)?;
        let n_dims = read_u32(r)?;
        for _ in 0..n_dims.min(8) {
            read_len(r, wide)?;
        }
        let ty = read_u32(r)?;
        let _offset = read_u64(r)?;
        if !CANDLE_TYPES.contains(&ty) {
            return Ok(Some((String::from_utf8_lossy(&name).into_owned(), ty)));
        }
    }
    Ok(None)
}

fn read_u32<R: Read>(r: &mut R) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64<R: Read>(r: &mut R) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_len<R: Read>(r: &mut R, wide: bool) -> std::io::Result<u64> {
    if wide {
        read_u64(r)
    } else {
        read_u32(r).map(u64::from)
    }
}

/// Rejects lengths no sane header has, so a corrupt file cannot make us allocate gigabytes.
fn bounded(len: u64) -> std::io::Result<usize> {
    if len > 1 << 30 {
        return Err(std::io::Error::other(format!(
            "length {len} is implausible"
        )));
    }
    Ok(len as usize)
}

fn skip<R: Read + Seek>(r: &mut R, n: u64) -> std::io::Result<()> {
    let n = i64::try_from(n).map_err(std::io::Error::other)?;
    r.seek(std::io::SeekFrom::Current(n)).map(|_| ())
}

fn skip_string<R: Read + Seek>(r: &mut R, wide: bool) -> std::io::Result<()> {
    let len = read_len(r, wide)?;
    skip(r, len)
}

fn skip_value<R: Read + Seek>(r: &mut R, ty: u32, wide: bool, depth: usize) -> std::io::Result<()> {
    let fixed = |ty: u32| match ty {
        0 | 1 | 7 => Some(1u64),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    };
    match ty {
        8 => skip_string(r, wide),
        9 if depth < 8 => {
            let elem = read_u32(r)?;
            let count = read_len(r, wide)?;
            match fixed(elem) {
                Some(size) => skip(r, size.saturating_mul(count)),
                None => (0..count).try_for_each(|_| skip_value(r, elem, wide, depth + 1)),
            }
        }
        other => match fixed(other) {
            Some(size) => skip(r, size),
            None => Err(std::io::Error::other(format!("bad value type {other}"))),
        },
    }
}

/// A metadata value for a message: arrays by length, long strings cut, so an error never quotes a whole
/// vocabulary.
fn show(v: &Value) -> String {
    match v {
        Value::Array(items) => format!("an array of {} entries", items.len()),
        Value::String(s) if s.len() > 40 => format!("a string ({} bytes)", s.len()),
        other => format!("{other:?}"),
    }
}

/// Typed access to GGUF metadata; every error names the field and the file.
pub struct Meta<'a> {
    /// The metadata.
    pub map: &'a HashMap<String, Value>,
    /// The file, for messages.
    pub path: &'a Path,
}

impl Meta<'_> {
    /// A `Model` error about metadata field `key`.
    pub fn error(&self, key: &str, detail: impl std::fmt::Display) -> EngineError {
        EngineError::model(self.path, format!("GGUF metadata field {key} {detail}"))
    }

    /// The value of `key`, or an error saying it is missing.
    pub fn get(&self, key: &str) -> Result<&Value, EngineError> {
        self.map
            .get(key)
            .ok_or_else(|| self.error(key, "is missing"))
    }

    /// An unsigned integer of any width, if present.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, EngineError> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        let n: Option<u64> = match v {
            Value::U8(n) => Some(u64::from(*n)),
            Value::U16(n) => Some(u64::from(*n)),
            Value::U32(n) => Some(u64::from(*n)),
            Value::U64(n) => Some(*n),
            Value::I8(n) => u64::try_from(*n).ok(),
            Value::I16(n) => u64::try_from(*n).ok(),
            Value::I32(n) => u64::try_from(*n).ok(),
            Value::I64(n) => u64::try_from(*n).ok(),
            _ => None,
        };
        match n.and_then(|n| usize::try_from(n).ok()) {
            Some(n) => Ok(Some(n)),
            None => Err(self.error(
                key,
                format!("must be a non-negative integer, got {}", show(v)),
            )),
        }
    }

    /// A required unsigned integer.
    pub fn usize(&self, key: &str) -> Result<usize, EngineError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.error(key, "is missing"))
    }

    /// A token id (u32), if present.
    pub fn opt_id(&self, key: &str) -> Result<Option<u32>, EngineError> {
        match self.opt_usize(key)? {
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| self.error(key, format!("{n} is not a token id"))),
            None => Ok(None),
        }
    }

    /// A float, if present.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, EngineError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => self.opt_usize(key).map(|n| n.map(|n| n as f64)),
        }
    }

    /// A string, if present.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, EngineError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.error(key, format!("must be a string, got {}", show(v)))),
        }
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str, EngineError> {
        self.opt_str(key)?
            .ok_or_else(|| self.error(key, "is missing"))
    }

    /// A boolean, if present.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, EngineError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.error(key, format!("must be a boolean, got {}", show(v)))),
        }
    }

    /// A required array.
    pub fn array(&self, key: &str) -> Result<&[Value], EngineError> {
        match self.get(key)? {
            Value::Array(items) => Ok(items),
            v => Err(self.error(key, format!("must be an array, got {}", show(v)))),
        }
    }

    /// A required array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, EngineError> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                other => {
                    Err(self.error(key, format!("entry {i} is not a string: {}", show(other))))
                }
            })
            .collect()
    }
}
