//! Collating tokenized rows into a batch: plain vectors built by the worker threads, turned into
//! tensors on the training device by the training thread (a device handle is not something to share
//! with helper threads, and the copy is cheap next to a step).
use super::encode::Tokenized;
use super::loader::DataPosition;
use candle_core::{Device, Tensor};

/// A micro-batch on the training device.
#[derive(Debug)]
pub struct Batch {
    /// Token ids `[b, t]` (u32), right-padded to the longest row.
    pub ids: Tensor,
    /// Flat indices into `b * t` of the positions whose next token is a target (u32).
    pub positions: Tensor,
    /// The target token for each of `positions` (u32).
    pub labels: Tensor,
    /// Rows in the batch (examples, or packed sequences).
    pub examples: usize,
    /// Non-padding tokens.
    pub tokens: usize,
    /// Number of targets (the loss is averaged over these).
    pub targets: usize,
    /// This is the last batch of its epoch.
    pub epoch_end: bool,
}

/// A batch before it goes to the device, with where the loader stands after it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// `rows * width` ids, right-padded.
    pub ids: Vec<u32>,
    /// Rows.
    pub rows: usize,
    /// Longest row.
    pub width: usize,
    /// See `Batch::positions`.
    pub positions: Vec<u32>,
    /// See `Batch::labels`.
    pub labels: Vec<u32>,
    /// Non-padding tokens.
    pub tokens: usize,
    /// The loader's position once this batch is taken.
    pub after: DataPosition,
    /// Last batch of its epoch.
    pub epoch_end: bool,
}

/// Pads `rows` to the longest with `pad_id` and lists the (position, next token) pairs the loss
/// counts. Padding is never a target, and with causal attention right-padding does not change what
/// the real positions see.
pub fn collate(
    rows: &[&Tokenized],
    pad_id: u32,
    after: DataPosition,
    epoch_end: bool,
) -> HostBatch {
    let width = rows.iter().map(|r| r.ids.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![pad_id; rows.len() * width];
    let (mut positions, mut labels) = (Vec::new(), Vec::new());
    for (b, row) in rows.iter().enumerate() {
        ids[b * width..b * width + row.ids.len()].copy_from_slice(&row.ids);
        for p in 1..row.ids.len() {
            if row.trained[p] {
                positions.push((b * width + p - 1) as u32);
                labels.push(row.ids[p]);
            }
        }
    }
    HostBatch {
        ids,
        rows: rows.len(),
        width,
        positions,
        labels,
        tokens: rows.iter().map(|r| r.ids.len()).sum(),
        after,
        epoch_end,
    }
}

impl HostBatch {
    /// The tensors on `device`.
    pub fn into_batch(self, device: &Device) -> candle_core::Result<Batch> {
        let targets = self.labels.len();
        Ok(Batch {
            ids: Tensor::from_vec(self.ids, (self.rows, self.width), device)?,
            positions: Tensor::from_vec(self.positions, targets, device)?,
            labels: Tensor::from_vec(self.labels, targets, device)?,
            examples: self.rows,
            tokens: self.tokens,
            targets,
            epoch_end: self.epoch_end,
        })
    }
}
