//! A frozen base weight in the form its file stores it, widened to f32 only while a product needs it.
//!
//! LoRA uses a frozen weight `W` for two products per layer, `x W^T` forward and `dy W` backward.
//! Widening it to f32 costs O(weights) against O(tokens x weights) of gemm, so a weight can stay in
//! bf16/f16 (2 bytes a parameter) or in GGUF's quantized blocks (~0.56 bytes for Q4_K) and be widened
//! one layer at a time into a scratch buffer that is reused from product to product. The widened
//! values are exactly what widening at load gives (bf16/f16 -> f32 is exact; blocks go through the
//! same `to_float` as `QTensor::dequantize`), so the products, and the training they feed, are the
//! same bit for bit.
use candle_core::quantized::{k_quants, GgmlDType, QTensor};
use candle_core::{bail, DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// A frozen weight: a tensor (f32, bf16 or f16) or quantized blocks.
#[derive(Debug, Clone)]
pub enum Frozen {
    /// A plain tensor. f32 is used as it is; bf16 and f16 are widened per use.
    Dense(Tensor),
    /// GGUF blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q8_K), rows in the model's order.
    Quantized(Arc<QTensor>),
}

impl From<Tensor> for Frozen {
    fn from(t: Tensor) -> Self {
        Frozen::Dense(t)
    }
}

impl Frozen {
    /// The logical shape.
    pub fn dims(&self) -> &[usize] {
        match self {
            Frozen::Dense(t) => t.dims(),
            Frozen::Quantized(q) => q.shape().dims(),
        }
    }

    /// `(rows, cols)` of a matrix.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.dims() {
            &[r, c] => Ok((r, c)),
            d => bail!("frozen weight: expected a matrix, got shape {d:?}"),
        }
    }

    /// Elements.
    pub fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }

    /// Bytes it takes as stored.
    pub fn stored_bytes(&self) -> usize {
        match self {
            Frozen::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Frozen::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// How it is stored: `f32`, `bf16`, `f16`, or the GGUF type (`q4k`, `q8_0`, ...).
    pub fn stored_type(&self) -> String {
        match self {
            Frozen::Dense(t) => t.dtype().as_str().to_string(),
            Frozen::Quantized(q) => format!("{:?}", q.dtype()).to_lowercase(),
        }
    }

    /// Whether it is a `Var` (never, for a frozen weight built by the engine: a check for tests).
    pub fn is_variable(&self) -> bool {
        matches!(self, Frozen::Dense(t) if t.is_variable())
    }

    /// Whether it is already a plain f32 tensor (no widening needed).
    pub fn is_f32(&self) -> bool {
        matches!(self, Frozen::Dense(t) if t.dtype() == DType::F32)
    }

    /// The device its data lives on.
    pub fn device(&self) -> Device {
        match self {
            Frozen::Dense(t) => t.device().clone(),
            Frozen::Quantized(q) => q.device(),
        }
    }

    /// A widened f32 copy as a tensor on `device` (the f32 tensor itself when it is one). For the
    /// paths that need a tensor: off the CPU, the LM head, merging an adapter.
    pub fn to_f32(&self, device: &Device) -> Result<Tensor> {
        match self {
            Frozen::Dense(t) if t.dtype() == DType::F32 => t.to_device(device),
            Frozen::Dense(t) => t.to_dtype(DType::F32)?.to_device(device),
            Frozen::Quantized(q) => q.dequantize(device),
        }
    }

    /// Rows `ids` (an embedding lookup) as f32 `[ids.len(), cols]`.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Frozen::Dense(t) => {
                let r = t.index_select(ids, 0)?;
                if r.dtype() == DType::F32 {
                    Ok(r)
                } else {
                    r.to_dtype(DType::F32)
                }
            }
            Frozen::Quantized(q) => q.embedding(ids),
        }
    }

    /// Calls `f` with the weight's elements as f32, row-major: the tensor's own storage for an f32
    /// tensor, else a scratch buffer widened in parallel (and given back to the pool afterwards).
    pub fn with_f32<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        if let Frozen::Dense(t) = self {
            if t.dtype() == DType::F32 {
                let r = crate::cpu::Read::new(t);
                return f(r.f32("frozen weight")?);
            }
        }
        let mut buf = Scratch::take(self.elem_count());
        self.widen_into(buf.as_mut())?;
        f(buf.as_ref())
    }

    /// Calls `f` with rows `rows` of a matrix as f32, row-major (`rows.len() x cols`): a slice of the
    /// tensor's own storage for an f32 tensor, else those rows widened into a pooled scratch buffer.
    /// The values are those [`Frozen::with_f32`] gives for the same rows (GGUF rows are whole blocks).
    pub fn with_f32_rows<R>(
        &self,
        rows: std::ops::Range<usize>,
        f: impl FnOnce(&[f32]) -> Result<R>,
    ) -> Result<R> {
        let (total, cols) = self.dims2()?;
        if rows.start > rows.end || rows.end > total {
            bail!("frozen weight: rows {rows:?} of a [{total}, {cols}] matrix");
        }
        let (a, b) = (rows.start * cols, rows.end * cols);
        match self {
            Frozen::Dense(t) => {
                let t = t.contiguous()?;
                let (storage, layout) = t.storage_and_layout();
                let Storage::Cpu(s) = &*storage else {
                    bail!("frozen weight: widening rows needs a CPU tensor");
                };
                let Some((start, _)) = layout.contiguous_offsets() else {
                    bail!("frozen weight: not contiguous");
                };
                let (a, b) = (start + a, start + b);
                if t.dtype() == DType::F32 {
                    return f(&s.as_slice::<f32>()?[a..b]);
                }
                let mut buf = Scratch::take(b - a);
                match t.dtype() {
                    DType::BF16 => widen(&s.as_slice::<half::bf16>()?[a..b], buf.as_mut(), |v| {
                        v.to_f32()
                    }),
                    DType::F16 => widen(&s.as_slice::<half::f16>()?[a..b], buf.as_mut(), |v| {
                        v.to_f32()
                    }),
                    other => bail!("frozen weight: cannot widen {other:?}"),
                }
                f(buf.as_ref())
            }
            Frozen::Quantized(q) => {
                let bs = q.dtype().block_size();
                if cols % bs != 0 {
                    bail!("frozen weight: rows of {cols} values are not whole {bs}-value blocks");
                }
                let row_bytes = cols / bs * q.dtype().type_size();
                let data = q.data()?;
                let bytes = &data[rows.start * row_bytes..rows.end * row_bytes];
                let mut buf = Scratch::take(b - a);
                dequantize_bytes(q.dtype(), bytes, buf.as_mut())?;
                f(buf.as_ref())
            }
        }
    }

    /// Calls `f` with a widened, writable copy (for `weight + update` merged in place).
    pub fn with_f32_mut<R>(&self, f: impl FnOnce(&mut [f32]) -> Result<R>) -> Result<R> {
        let mut buf = Scratch::take(self.elem_count());
        match self {
            Frozen::Dense(t) if t.dtype() == DType::F32 => {
                let r = crate::cpu::Read::new(t);
                let src = r.f32("frozen weight")?;
                buf.as_mut()
                    .par_chunks_mut(CHUNK)
                    .zip(src.par_chunks(CHUNK))
                    .for_each(|(d, s)| d.copy_from_slice(s));
            }
            _ => self.widen_into(buf.as_mut())?,
        }
        f(buf.as_mut())
    }

    /// Writes the f32 elements into `out` (its length is the element count), in parallel.
    fn widen_into(&self, out: &mut [f32]) -> Result<()> {
        if out.len() != self.elem_count() {
            bail!(
                "frozen weight: {} elements into a buffer of {}",
                self.elem_count(),
                out.len()
            );
        }
        match self {
            Frozen::Dense(t) => {
                let t = t.contiguous()?;
                let (storage, layout) = t.storage_and_layout();
                let Storage::Cpu(s) = &*storage else {
                    bail!("frozen weight: widening in place needs a CPU tensor");
                };
                let Some((start, end)) = layout.contiguous_offsets() else {
                    bail!("frozen weight: not contiguous");
                };
                match t.dtype() {
                    DType::BF16 => widen(&s.as_slice::<half::bf16>()?[start..end], out, |v| {
                        v.to_f32()
                    }),
                    DType::F16 => {
                        widen(&s.as_slice::<half::f16>()?[start..end], out, |v| v.to_f32())
                    }
                    DType::F32 => widen(&s.as_slice::<f32>()?[start..end], out, |v| v),
                    other => bail!("frozen weight: cannot widen {other:?}"),
                }
                Ok(())
            }
            Frozen::Quantized(q) => dequantize_into(q, out),
        }
    }
}

/// Elements per rayon task when widening.
const CHUNK: usize = 1 << 16;

fn widen<T: Copy + Send + Sync>(src: &[T], out: &mut [f32], f: impl Fn(T) -> f32 + Sync) {
    out.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(o, s)| {
            for (o, s) in o.iter_mut().zip(s) {
                *o = f(*s);
            }
        });
}

/// `QTensor::dequantize`'s values, computed in parallel into `out`.
fn dequantize_into(q: &QTensor, out: &mut [f32]) -> Result<()> {
    match q.dtype() {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
            // Loaded as dense tensors, never kept as blocks; widened whole if one turns up here.
            let t = q.dequantize(&Device::Cpu)?.flatten_all()?;
            let v = t.to_vec1::<f32>()?;
            if v.len() != out.len() {
                bail!(
                    "frozen weight: {:?} tensor has {} elements",
                    q.dtype(),
                    v.len()
                );
            }
            out.copy_from_slice(&v);
            Ok(())
        }
        dtype => dequantize_bytes(dtype, &q.data()?, out),
    }
}

/// The values of whole blocks of type `dtype` (`data`), computed in parallel into `out`.
fn dequantize_bytes(dtype: GgmlDType, data: &[u8], out: &mut [f32]) -> Result<()> {
    macro_rules! blocks {
        ($t:ty) => {
            dequantize_blocks::<$t>(data, out)
        };
    }
    match dtype {
        GgmlDType::Q4_0 => blocks!(k_quants::BlockQ4_0),
        GgmlDType::Q4_1 => blocks!(k_quants::BlockQ4_1),
        GgmlDType::Q5_0 => blocks!(k_quants::BlockQ5_0),
        GgmlDType::Q5_1 => blocks!(k_quants::BlockQ5_1),
        GgmlDType::Q8_0 => blocks!(k_quants::BlockQ8_0),
        GgmlDType::Q8_1 => blocks!(k_quants::BlockQ8_1),
        GgmlDType::Q2K => blocks!(k_quants::BlockQ2K),
        GgmlDType::Q3K => blocks!(k_quants::BlockQ3K),
        GgmlDType::Q4K => blocks!(k_quants::BlockQ4K),
        GgmlDType::Q5K => blocks!(k_quants::BlockQ5K),
        GgmlDType::Q6K => blocks!(k_quants::BlockQ6K),
        GgmlDType::Q8K => blocks!(k_quants::BlockQ8K),
        other => bail!("frozen weight: {other:?} is not a block type"),
    }
}

fn dequantize_blocks<T: k_quants::GgmlType + Send + Sync>(
    data: &[u8],
    out: &mut [f32],
) -> Result<()> {
    let size = std::mem::size_of::<T>();
    if size == 0
        || !data.len().is_multiple_of(size)
        || data.len() / size * T::BLCK_SIZE != out.len()
    {
        bail!(
            "frozen weight: {} bytes of {}-byte blocks for {} values",
            data.len(),
            size,
            out.len()
        );
    }
    if !(data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        bail!("frozen weight: quantized blocks are not aligned");
    }
    // SAFETY: the bytes are a QTensor's CPU storage, a `Vec<T>` of these very blocks (checked:
    // whole blocks, aligned for T); block types are plain `repr(C)` structs of numbers, valid for
    // any bytes.
    let blocks: &[T] =
        unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<T>(), data.len() / size) };
    // Whole blocks per task, so each task's output slice starts at a block boundary.
    let per_task = (CHUNK / T::BLCK_SIZE).max(1);
    out.par_chunks_mut(per_task * T::BLCK_SIZE)
        .zip(blocks.par_chunks(per_task))
        .for_each(|(o, b)| T::to_float(b, o));
    Ok(())
}

/// Reused f32 buffers for widened weights: a layer's widened copy lives only for one product, and
/// taking the same buffer back saves the allocator a fresh, zeroed mapping of that size per product.
/// The pool keeps at most two buffers (a product and the merged copy of the next), the largest ones.
struct Scratch {
    buf: Vec<f32>,
}

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
const POOL_KEEP: usize = 2;

impl Scratch {
    fn take(n: usize) -> Scratch {
        let found = POOL.lock().ok().and_then(|mut pool| {
            // The smallest buffer that is big enough, else the biggest (it will grow).
            let fit = pool
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= n)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
                .or_else(|| {
                    pool.iter()
                        .enumerate()
                        .max_by_key(|(_, b)| b.capacity())
                        .map(|(i, _)| i)
                });
            fit.map(|i| pool.swap_remove(i))
        });
        let mut buf = found.unwrap_or_default();
        if buf.capacity() < n {
            buf = Vec::with_capacity(n);
        }
        // Every element is written before it is read (widen_into writes all `n`).
        buf.resize(n, 0.0);
        Scratch { buf }
    }

    fn as_ref(&self) -> &[f32] {
        &self.buf
    }

    fn as_mut(&mut self) -> &mut [f32] {
        &mut self.buf
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if let Ok(mut pool) = POOL.lock() {
            pool.push(buf);
            if pool.len() > POOL_KEEP {
                // Drop the smallest.
                if let Some(i) = pool
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, b)| b.capacity())
                    .map(|(i, _)| i)
                {
                    pool.swap_remove(i);
                }
            }
        }
    }
}

/// Frees the pooled buffers (after training, or between models).
pub fn release_scratch() {
    if let Ok(mut pool) = POOL.lock() {
        pool.clear();
    }
}

/// A GGUF weight's rows reordered: row `i` of the result is row `order[i]` of `q` (llama.cpp's Q/K
/// permutation undone without widening). Rows are whole blocks, so this moves bytes only.
pub fn permute_rows(q: &QTensor, order: &[usize]) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let bs = q.dtype().block_size();
    if order.len() != rows || cols % bs != 0 {
        bail!(
            "permute rows: {} rows of {cols} ({bs}-value blocks), order of {}",
            rows,
            order.len()
        );
    }
    let row_bytes = cols / bs * q.dtype().type_size();
    let data = q.data()?;
    let mut out = Vec::with_capacity(data.len());
    for &src in order {
        if src >= rows {
            bail!("permute rows: row {src} of {rows}");
        }
        out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(out),
        &Device::Cpu,
        q.dtype(),
    )?;
    QTensor::new(storage, (rows, cols))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn values(n: usize) -> Tensor {
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        Tensor::from_vec(v, (n / 512, 512), &Device::Cpu).unwrap()
    }

    #[test]
    fn widened_copies_equal_widening_at_load() {
        let t = values(512 * 40);
        for dtype in [DType::BF16, DType::F16] {
            let stored = Frozen::Dense(t.to_dtype(dtype).unwrap());
            let want = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            stored
                .with_f32(|w| {
                    assert_eq!(w, want.as_slice(), "{dtype:?}");
                    Ok(())
                })
                .unwrap();
            Frozen::Dense(t.to_dtype(dtype).unwrap())
                .with_f32_rows(2..7, |w| {
                    assert_eq!(w, &want[2 * 512..7 * 512], "{dtype:?} rows");
                    Ok(())
                })
                .unwrap();
        }
        for q in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let qt = Arc::new(QTensor::quantize(&t, q).unwrap());
            let want = qt
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let stored = Frozen::Quantized(qt);
            stored
                .with_f32(|w| {
                    assert_eq!(w, want.as_slice(), "{q:?}");
                    Ok(())
                })
                .unwrap();
            stored
                .with_f32_rows(5..9, |w| {
                    assert_eq!(w, &want[5 * 512..9 * 512], "{q:?} rows");
                    Ok(())
                })
                .unwrap();
            assert!(stored.with_f32_rows(39..41, |_| Ok(())).is_err());
            let ids = Tensor::from_vec(vec![3u32, 0, 39], 3, &Device::Cpu).unwrap();
            let rows = stored.rows(&ids).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(rows[1], want[..512].to_vec());
            assert_eq!(rows[0], want[3 * 512..4 * 512].to_vec());
        }
    }

    #[test]
    fn rows_permute_as_blocks() {
        let t = values(512 * 4);
        let qt = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let p = permute_rows(&qt, &[2, 0, 3, 1]).unwrap();
        let a = qt
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = p
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(
            b,
            vec![a[2].clone(), a[0].clone(), a[3].clone(), a[1].clone()]
        );
        assert!(permute_rows(&qt, &[0, 1]).is_err());
    }
}
