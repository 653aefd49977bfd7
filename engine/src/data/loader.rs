//! The `Loader`: deterministic, resumable batches over epochs, prepared by worker threads.
//!
//! Determinism: epoch `e`'s order is a shuffle drawn from stream `e` of a generator seeded from the
//! run seed, and batch `k` of an epoch is rows `order[k*b..(k+1)*b]`. Batches are *planned* (which
//! rows) one after another under a lock, and only *built* (read, tokenized, collated) in parallel, so
//! batch `k` is the same whatever the number of workers and whichever finishes first; the consumer
//! takes them strictly in plan order from a reorder buffer. A position `(epoch, index)` is therefore
//! all a checkpoint needs to resume exactly.
use super::collate::{collate, Batch, HostBatch};
use super::encode::{EncodeError, Encoder, Tokenized};
use super::format::{FileFormat, Format};
use super::pack::pack;
use super::pipeline::Pipeline;
use super::source::{detect_format, read_example, DataSource};
use crate::error::EngineError;
use candle_core::Device;
use lorad_schema::TrainSettings;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Where a loader stands: the epoch and the index of the next row in that epoch's shuffled order
/// (rows are examples, or packed sequences with packing; `index == len` is the end of the epoch, and
/// the next batch starts epoch + 1). Saved in checkpoints; `Loader::seek` restores it in O(epoch
/// length), whatever the step number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DataPosition {
    /// 0-based epoch.
    pub epoch: u64,
    /// Rows of this epoch already handed out.
    pub index: u64,
}

/// A position that cannot exist for this data (a checkpoint of another dataset).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("data position {index} of epoch {epoch} is past the {len} examples of an epoch")]
pub struct SeekError {
    /// The epoch asked for.
    pub epoch: u64,
    /// The index asked for.
    pub index: u64,
    /// Rows per epoch.
    pub len: usize,
}

/// How batches are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// The run seed (the shuffle uses its own stream of it).
    pub seed: u64,
    /// Id written into padding.
    pub pad_id: u32,
    /// Threads reading, tokenizing and collating; 0 does it on the training thread when a batch is
    /// asked for (the slow way, kept for comparison and debugging).
    pub workers: usize,
    /// Batches in flight (being built or built and waiting) at most; at least 1.
    pub prefetch: usize,
    /// Pack examples into max_seq_len sequences (see `pack`).
    pub packing: bool,
}

impl LoaderOptions {
    /// The options a job's settings ask for.
    pub fn from_settings(s: &TrainSettings, pad_id: u32) -> Self {
        LoaderOptions {
            batch_size: s.batch_size as usize,
            seed: s.seed,
            pad_id,
            workers: s.workers as usize,
            prefetch: s.prefetch as usize,
            packing: s.packing,
        }
    }
}

/// Domain-separation constant for the data-order generator (distinct from init and dropout streams).
const SHUFFLE_SALT: u64 = 0x5348_5546_464c_4521;

/// What rows are drawn from.
enum Rows {
    /// Tokenized already: packed sequences, or rows given by a caller.
    Memory(Vec<Tokenized>),
    /// Read and tokenized when a batch needs them.
    Stream {
        source: Arc<dyn DataSource>,
        encoder: Arc<Encoder>,
        format: FileFormat,
    },
}

/// The immutable part of a loader, shared with its workers.
pub(super) struct Core {
    rows: Rows,
    len: usize,
    batch_size: usize,
    seed: u64,
    pad_id: u32,
    /// Examples of the first epoch found with no target, for a bounded number of warnings.
    untrained: AtomicUsize,
}

/// Examples with no target named in the log; past that only a count would be noise.
const UNTRAINED_WARNINGS: usize = 10;

/// An epoch's order.
pub(super) struct Order {
    epoch: u64,
    perm: Vec<usize>,
}

/// One planned batch: rows `order.perm[range]`.
pub(super) struct Plan {
    order: Arc<Order>,
    range: Range<usize>,
    after: DataPosition,
}

/// Hands out batch plans in order; the only sequential step of the pipeline.
pub(super) struct Planner {
    cursor: DataPosition,
    order: Arc<Order>,
}

impl Planner {
    pub(super) fn new(core: &Core, at: DataPosition) -> Self {
        Planner {
            cursor: at,
            order: Arc::new(core.order(at.epoch)),
        }
    }

    pub(super) fn next(&mut self, core: &Core) -> Plan {
        if self.cursor.index as usize >= core.len {
            self.cursor = DataPosition {
                epoch: self.cursor.epoch + 1,
                index: 0,
            };
        }
        if self.order.epoch != self.cursor.epoch {
            self.order = Arc::new(core.order(self.cursor.epoch));
        }
        let start = self.cursor.index as usize;
        let end = (start + core.batch_size).min(core.len);
        self.cursor.index = end as u64;
        Plan {
            order: Arc::clone(&self.order),
            range: start..end,
            after: self.cursor,
        }
    }
}

impl Core {
    fn order(&self, epoch: u64) -> Order {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ SHUFFLE_SALT);
        rng.set_stream(epoch);
        let mut perm: Vec<usize> = (0..self.len).collect();
        perm.shuffle(&mut rng);
        Order { epoch, perm }
    }

    /// Reads, tokenizes and collates one planned batch: a pure function of the plan.
    pub(super) fn build(&self, plan: &Plan) -> Result<HostBatch, EngineError> {
        let picked = &plan.order.perm[plan.range.clone()];
        let rows: Vec<Cow<Tokenized>> = match &self.rows {
            Rows::Memory(rows) => picked.iter().map(|&i| Cow::Borrowed(&rows[i])).collect(),
            Rows::Stream {
                source,
                encoder,
                format,
            } => picked
                .iter()
                .map(|&i| {
                    let (line, t) = encode_at(source.as_ref(), encoder, *format, i)?;
                    if plan.order.epoch == 0 && t.targets() == 0 {
                        let n = self.untrained.fetch_add(1, Ordering::Relaxed) + 1;
                        if n <= UNTRAINED_WARNINGS {
                            tracing::warn!(dataset = %source.origin().display(), line,
                                "example has no token to train on within max_seq_len (its prompt \
                                 fills it); it contributes nothing{}",
                                if n == UNTRAINED_WARNINGS { "; further ones are not logged" } else { "" });
                        }
                    }
                    Ok(Cow::Owned(t))
                })
                .collect::<Result<_, EngineError>>()?,
        };
        let refs: Vec<&Tokenized> = rows.iter().map(|r| r.as_ref()).collect();
        let end = plan.after.index as usize >= self.len;
        Ok(collate(&refs, self.pad_id, plan.after, end))
    }
}

/// Reads record `index` and encodes it; errors name the dataset line, or the tokenizer when the model
/// is at fault.
pub(super) fn encode_at(
    source: &dyn DataSource,
    encoder: &Encoder,
    format: FileFormat,
    index: usize,
) -> Result<(usize, Tokenized), EngineError> {
    let (line, example) = read_example(source, index, Some(format))?;
    let tokenized = encoder.encode_one(&example).map_err(|e| match e {
        EncodeError::Example(d) => EngineError::dataset(source.origin(), Some(line), d),
        EncodeError::Model(d) => EngineError::Tokenizer {
            path: encoder.path().to_path_buf(),
            detail: format!("{d} (dataset {} line {line})", source.origin().display()),
        },
    })?;
    Ok((line, tokenized))
}

enum Engine {
    /// `workers == 0`: batches are built on the caller's thread.
    Inline(Planner),
    Threads(Pipeline),
}

/// Deterministic batches over epochs, built ahead by worker threads.
pub struct Loader {
    core: Arc<Core>,
    engine: Engine,
    pos: DataPosition,
}

impl Loader {
    /// A loader over tokenized rows, built on the calling thread; starts at epoch 0.
    pub fn new(examples: Vec<Tokenized>, batch_size: usize, seed: u64, pad_id: u32) -> Self {
        let core = Core {
            len: examples.len(),
            rows: Rows::Memory(examples),
            batch_size: batch_size.max(1),
            seed,
            pad_id,
            untrained: AtomicUsize::new(0),
        };
        let planner = Planner::new(&core, DataPosition::default());
        Loader {
            core: Arc::new(core),
            engine: Engine::Inline(planner),
            pos: DataPosition::default(),
        }
    }

    /// A loader over a dataset: checks its format against the encoder (a chat dataset needs a chat
    /// template) and encodes its first record, so that such errors come before the model is loaded.
    /// With packing, every example is tokenized now (by `workers` threads) and packed; otherwise rows
    /// are read and tokenized by the workers as batches are needed.
    pub fn from_source(
        source: Arc<dyn DataSource>,
        encoder: Arc<Encoder>,
        opts: &LoaderOptions,
    ) -> Result<Self, EngineError> {
        let format = detect_format(source.as_ref())?;
        if format.format == Format::Chat {
            encoder.check_chat().map_err(|d| {
                EngineError::dataset(
                    source.origin(),
                    Some(format.line),
                    format!("{d} (model tokenizer: {})", encoder.path().display()),
                )
            })?;
        }
        encode_at(source.as_ref(), &encoder, format, 0)?;
        let rows = if opts.packing {
            let examples = super::pipeline::encode_all(&source, &encoder, format, opts.workers)?;
            let n = examples.len();
            let packed = pack(examples, encoder.max_len());
            if packed.is_empty() {
                return Err(EngineError::dataset(
                    source.origin(),
                    None,
                    "no example has a token to train on within max_seq_len",
                ));
            }
            tracing::info!(examples = n, sequences = packed.len(), "examples packed");
            Rows::Memory(packed)
        } else {
            Rows::Stream {
                source,
                encoder,
                format,
            }
        };
        let len = match &rows {
            Rows::Memory(r) => r.len(),
            Rows::Stream { source, .. } => source.len(),
        };
        let core = Arc::new(Core {
            rows,
            len,
            batch_size: opts.batch_size.max(1),
            seed: opts.seed,
            pad_id: opts.pad_id,
            untrained: AtomicUsize::new(0),
        });
        let planner = Planner::new(&core, DataPosition::default());
        let engine = if opts.workers == 0 {
            Engine::Inline(planner)
        } else {
            Engine::Threads(Pipeline::start(
                Arc::clone(&core),
                planner,
                opts.workers,
                opts.prefetch.max(1),
            )?)
        };
        Ok(Loader {
            core,
            engine,
            pos: DataPosition::default(),
        })
    }

    /// Rows per epoch: examples, or packed sequences with packing.
    pub fn len(&self) -> usize {
        self.core.len
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.core.len == 0
    }

    /// Micro-batches per epoch (the last one may be smaller).
    pub fn batches_per_epoch(&self) -> usize {
        self.core.len.div_ceil(self.core.batch_size)
    }

    /// Epochs done, fractional.
    pub fn epoch_progress(&self) -> f64 {
        self.pos.epoch as f64 + self.pos.index as f64 / self.core.len.max(1) as f64
    }

    /// Where the next batch starts: after the last one `next_batch` returned.
    pub fn position(&self) -> DataPosition {
        self.pos
    }

    /// Continues from `pos` (a `position()` of a loader over the same data, seed and batch size)
    /// without reading the rows before it: batches built ahead are dropped and the next batch is the one
    /// that followed `pos`.
    pub fn seek(&mut self, pos: DataPosition) -> Result<(), SeekError> {
        if usize::try_from(pos.index).map_or(true, |i| i > self.core.len) {
            return Err(SeekError {
                epoch: pos.epoch,
                index: pos.index,
                len: self.core.len,
            });
        }
        let planner = Planner::new(&self.core, pos);
        match &mut self.engine {
            Engine::Inline(p) => *p = planner,
            Engine::Threads(pipeline) => pipeline.seek(planner),
        }
        self.pos = pos;
        Ok(())
    }

    /// The next micro-batch on `device`; after an epoch's last batch the next epoch starts with a new
    /// shuffle. With workers this only waits when the workers are behind.
    pub fn next_batch(&mut self, device: &Device) -> Result<Batch, EngineError> {
        let host = match &mut self.engine {
            Engine::Inline(planner) => {
                let plan = planner.next(&self.core);
                self.core.build(&plan)?
            }
            Engine::Threads(pipeline) => pipeline.next()?,
        };
        self.pos = host.after;
        Ok(host.into_batch(device)?)
    }

    /// Batches planned and not yet taken (tests: the prefetch bound).
    #[cfg(test)]
    pub(super) fn in_flight(&self) -> usize {
        match &self.engine {
            Engine::Inline(_) => 0,
            Engine::Threads(p) => p.in_flight(),
        }
    }
}
