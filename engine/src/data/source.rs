//! The dataloader plugin interface: a `DataSource` hands out raw records by index; everything above it
//! (parsing, tokenizing, masking, shuffling, batching) is the engine's.
//!
//! The interface is deliberately small and made of plain data so that a plugin can implement it across
//! a C ABI: `len` and `read(range)` map onto a `dataloader.read` call whose reply is a MessagePack array
//! of records, each decoding into a `serde_json::Value` (rmp-serde reads straight into one). Random
//! access by range is what lets the pipeline shuffle, run several workers and resume at an exact
//! position without the source keeping any cursor of its own.
use super::format::{Example, FileFormat};
use crate::error::EngineError;
use std::ops::Range;
use std::path::Path;

/// One record as a source hands it over.
#[derive(Debug, Clone, PartialEq)]
pub struct RawExample {
    /// Where it came from, 1-based, for messages: the JSONL line, or the record number of a source
    /// without lines.
    pub line: usize,
    /// The record: a JSON object in one of the formats of `format::Format`.
    pub value: serde_json::Value,
}

/// A dataset with random access to its records, shared by the pipeline's worker threads.
pub trait DataSource: Send + Sync {
    /// The file (or plugin) named in error messages.
    fn origin(&self) -> &Path;

    /// Records in the dataset; fixed for the source's lifetime (the epoch order is a permutation of
    /// `0..len`, and a resume position is an index into it).
    fn len(&self) -> usize;

    /// Whether there is no record.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records `range` (a sub-range of `0..len`), in order. Called concurrently from several threads,
    /// mostly with one-record ranges in shuffled order, so it must be cheap per call.
    fn read(&self, range: Range<usize>) -> Result<Vec<RawExample>, EngineError>;
}

/// Reads record `index` and parses it (checking it against the file's format).
pub fn read_example(
    source: &dyn DataSource,
    index: usize,
    file: Option<FileFormat>,
) -> Result<(usize, Example), EngineError> {
    let raw = source
        .read(index..index + 1)?
        .into_iter()
        .next()
        .ok_or_else(|| {
            EngineError::dataset(
                source.origin(),
                None,
                format!("record {index} of {} could not be read", source.len()),
            )
        })?;
    let example = Example::parse(&raw.value, file)
        .map_err(|d| EngineError::dataset(source.origin(), Some(raw.line), d))?;
    Ok((raw.line, example))
}

/// The source's format, from its first record.
pub fn detect_format(source: &dyn DataSource) -> Result<FileFormat, EngineError> {
    if source.is_empty() {
        return Err(EngineError::dataset(source.origin(), None, NO_EXAMPLES));
    }
    let (line, example) = read_example(source, 0, None)?;
    Ok(FileFormat {
        format: example.format(),
        line,
    })
}

/// The message for a dataset without records.
pub const NO_EXAMPLES: &str = "no examples (the file is empty or only blank lines)";
