//! Datasets: formats, loss masking, the dataloader plugin interface and the parallel batch pipeline.
//!
//! # Formats (JSONL, one per file, detected from the first non-blank line)
//! - `{"text"}`: BOS + text + EOS, every token trained.
//! - `{"prompt","completion"}`: BOS + prompt + completion + EOS (no separator added); the completion
//!   and the EOS are trained.
//! - alpaca `{"instruction","input"?,"output"}`: rendered with the Stanford Alpaca prompt
//!   (`format::alpaca_prompt`, the no-input variant when input is absent or empty); output and EOS
//!   trained.
//! - chat `{"messages":[{"role","content"}]}` (roles system/user/assistant, at least one assistant):
//!   rendered with the model's own chat template (`chat`), BOS/EOS only as the template writes them;
//!   each assistant reply with its end-of-turn marker is trained.
//!
//! A record with the keys of several formats is read as the most specific (messages, then alpaca, then
//! prompt/completion, then text). A line in another format than the file's, bad JSON, a missing or
//! ill-typed field, an unknown role and an empty file are errors naming the file and 1-based line.
//!
//! # Masking
//! Only completion / assistant tokens (and the EOS that ends them) are targets, unless
//! `train_on_inputs`, which trains everything but the first token. How token positions are matched to
//! the trained text: `encode`; how assistant replies are located: `chat`.
//!
//! # Truncation and packing
//! Sequences longer than max_seq_len are cut keeping the start (the prompt survives, the end of the
//! completion and its EOS do not); an example left with no target contributes nothing and is logged.
//! With `packing`, whole examples are packed greedily into max_seq_len sequences with per-example
//! masks; attention still crosses example boundaries in this version (`pack`).
//!
//! # Pipeline
//! `DataSource` (`source`) is the plugin boundary: `len` and `read(range)` of raw JSON records; the
//! built-in one is `JsonlSource` (`jsonl`), which checks and indexes the file once and then reads
//! records by offset. Above it the `Loader` (`loader`, `pipeline`) shuffles per epoch from the seed,
//! and `workers` threads read, tokenize and collate batches with at most `prefetch` in flight; batch
//! `k` is the same for any thread count, and `position()`/`seek()` resume exactly.
mod chat;
mod collate;
mod encode;
mod format;
pub mod jsonl;
mod loader;
mod pack;
mod pipeline;
mod source;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_encode;
#[cfg(test)]
mod tests_loader;

pub use chat::{ChatError, ChatTemplate};
pub use collate::Batch;
pub use encode::{EncodeError, Encoder, Tokenized};
pub use format::{alpaca_prompt, Example, FileFormat, Format, CHAT_ROLES};
pub use jsonl::JsonlSource;
pub use loader::{DataPosition, Loader, LoaderOptions, SeekError};
pub use pack::pack;
pub use source::{DataSource, RawExample};

use crate::error::EngineError;
use std::path::Path;
use std::sync::Arc;

/// Opens the dataset of a task: lorad's JSONL reader (`open_jsonl`), or a dataloader plugin's source.
pub type OpenSource<'a> = dyn Fn(&Path) -> Result<Arc<dyn DataSource>, EngineError> + 'a;

/// The dataset as lorad reads it itself: JSONL, lines of at most `max_line` bytes.
pub fn open_jsonl(path: &Path, max_line: usize) -> Result<Arc<dyn DataSource>, EngineError> {
    Ok(Arc::new(JsonlSource::open_limited(path, max_line)?))
}

/// Checks every line of a JSONL dataset (JSON, format, fields; no tokenizer needed) and returns the
/// number of examples. Used by the daemon at submit, so a malformed line is rejected before anything
/// is queued.
pub fn validate_jsonl(path: &Path) -> Result<usize, EngineError> {
    JsonlSource::open(path).map(|s| s.len())
}

/// [`validate_jsonl`] with lines of at most `max_line` bytes.
pub fn validate_jsonl_limited(path: &Path, max_line: usize) -> Result<usize, EngineError> {
    JsonlSource::open_limited(path, max_line).map(|s| s.len())
}

/// Reads every example of a JSONL dataset into memory (tests and tools; training streams them).
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>, EngineError> {
    let source = JsonlSource::open(path)?;
    let format = Some(source.format());
    source
        .read(0..source.len())?
        .iter()
        .map(|raw| {
            Example::parse(&raw.value, format)
                .map_err(|d| EngineError::dataset(path, Some(raw.line), d))
        })
        .collect()
}
