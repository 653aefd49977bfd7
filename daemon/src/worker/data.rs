//! Datasets: JSONL parsing and validation, tokenization, per-epoch shuffling and batching.
//!
//! Only `{"text": ...}` lines exist for now. A line parses into an `Example`; tokenizing it yields ids
//! plus, per position, whether predicting that token counts in the loss. Other formats (prompt /
//! completion, alpaca, chat) slot in as new `Example` variants whose tokenization masks the prompt.
use super::config::ModelConfig;
use super::error::EngineError;
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::io::BufRead;
use std::path::Path;
use tokenizers::Tokenizer;

/// One raw training example.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// `{"text": ...}`: plain text, every token trained on.
    Text(String),
}

/// Parses one JSONL line; the error says what is wrong with it (the caller adds path and line).
fn parse_line(line: &str) -> Result<Example, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(obj) = value.as_object() else {
        return Err("expected a JSON object".into());
    };
    match obj.get("text") {
        Some(serde_json::Value::String(s)) => Ok(Example::Text(s.clone())),
        Some(other) => Err(format!(
            "field \"text\" must be a string, got {}",
            json_kind(other)
        )),
        None => Err("missing string field \"text\"".into()),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Calls `f` with each example of the JSONL file; blank lines are skipped. Errors name the 1-based line.
fn scan_jsonl(path: &Path, mut f: impl FnMut(Example)) -> Result<usize, EngineError> {
    let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut count = 0;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => {
                EngineError::dataset(path, Some(line_no), "not valid UTF-8")
            }
            _ => EngineError::io(path, e),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        f(parse_line(&line).map_err(|d| EngineError::dataset(path, Some(line_no), d))?);
        count += 1;
    }
    if count == 0 {
        return Err(EngineError::dataset(
            path,
            None,
            "no examples (the file is empty or only blank lines)",
        ));
    }
    Ok(count)
}

/// Checks every line of a JSONL dataset without keeping it; returns the number of examples.
/// Used by the daemon at submit, so a malformed line is rejected before anything is queued.
pub fn validate_jsonl(path: &Path) -> Result<usize, EngineError> {
    scan_jsonl(path, |_| {})
}

/// Reads every example of a JSONL dataset.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>, EngineError> {
    let mut out = Vec::new();
    scan_jsonl(path, |e| out.push(e))?;
    Ok(out)
}

/// A tokenized example: `ids`, and for each position whether predicting `ids[t]` (from the tokens
/// before it) counts in the loss. `trained[0]` is always false: the first token has no context.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    /// Token ids, BOS/EOS included, at most max_seq_len of them.
    pub ids: Vec<u32>,
    /// Per position: is this token a training target.
    pub trained: Vec<bool>,
}

/// Turns examples into token ids with the model's tokenizer.json.
pub struct Encoder {
    tokenizer: Tokenizer,
    path: std::path::PathBuf,
    bos: Option<u32>,
    eos: Option<u32>,
    max_len: usize,
    vocab_size: usize,
}

impl Encoder {
    /// Loads `model_dir/tokenizer.json`. BOS is prepended when the model has one and EOS appended,
    /// explicitly (not through the tokenizer's post-processor), so every tokenizer behaves alike.
    pub fn load(model_dir: &Path, cfg: &ModelConfig, max_len: usize) -> Result<Self, EngineError> {
        let path = model_dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| EngineError::Tokenizer {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        Ok(Encoder {
            tokenizer,
            path,
            bos: cfg.bos_token_id,
            eos: cfg.eos_token_id,
            max_len,
            vocab_size: cfg.vocab_size,
        })
    }

    /// Tokenizes `examples` (in parallel inside the tokenizers crate; the result is in input order).
    pub fn encode(&self, examples: &[Example]) -> Result<Vec<Tokenized>, EngineError> {
        let texts: Vec<&str> = examples.iter().map(|Example::Text(t)| t.as_str()).collect();
        let encodings =
            self.tokenizer
                .encode_batch(texts, false)
                .map_err(|e| EngineError::Tokenizer {
                    path: self.path.clone(),
                    detail: e.to_string(),
                })?;
        // A token id past the embedding matrix would fail deep inside the forward pass; name it here.
        if let Some(id) = encodings
            .iter()
            .flat_map(|e| e.get_ids())
            .chain(self.bos.iter())
            .chain(self.eos.iter())
            .find(|&&id| id as usize >= self.vocab_size)
        {
            return Err(EngineError::Tokenizer {
                path: self.path.clone(),
                detail: format!(
                    "token id {id} is outside the model's vocab_size {}",
                    self.vocab_size
                ),
            });
        }
        Ok(encodings
            .iter()
            .map(|enc| {
                let mut ids = Vec::with_capacity(enc.get_ids().len() + 2);
                ids.extend(self.bos);
                ids.extend_from_slice(enc.get_ids());
                ids.extend(self.eos);
                ids.truncate(self.max_len);
                let trained = (0..ids.len()).map(|t| t > 0).collect();
                Tokenized { ids, trained }
            })
            .collect())
    }
}

/// A micro-batch on the training device.
#[derive(Debug)]
pub struct Batch {
    /// Token ids `[b, t]` (u32), right-padded to the longest example.
    pub ids: Tensor,
    /// Flat indices into `b * t` of the positions whose next token is a target (u32).
    pub positions: Tensor,
    /// The target token for each of `positions` (u32).
    pub labels: Tensor,
    /// Examples in the batch.
    pub examples: usize,
    /// Non-padding tokens.
    pub tokens: usize,
    /// Number of targets (the loss is averaged over these).
    pub targets: usize,
    /// This is the last batch of its epoch.
    pub epoch_end: bool,
}

/// Where a loader stands: the epoch and the index of the next example in that epoch's shuffled order.
/// Saved in checkpoints; `Loader::seek` restores it in O(epoch length), whatever the step number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    /// 0-based epoch.
    pub epoch: u64,
    /// Examples of this epoch already handed out.
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
    /// Examples per epoch.
    pub len: usize,
}

/// Domain-separation constant for the data-order generator (distinct from init and dropout streams).
const SHUFFLE_SALT: u64 = 0x5348_5546_464c_4521;

/// Deterministic batches over epochs. Epoch `e`'s order is a shuffle drawn from stream `e` of a
/// generator seeded from the run seed, so a position (epoch, index) is enough to resume exactly.
pub struct Loader {
    examples: Vec<Tokenized>,
    batch_size: usize,
    seed: u64,
    pad_id: u32,
    epoch: u64,
    order: Vec<usize>,
    pos: usize,
}

impl Loader {
    /// A loader at the start of epoch 0. `examples` must not be empty.
    pub fn new(examples: Vec<Tokenized>, batch_size: usize, seed: u64, pad_id: u32) -> Self {
        let mut loader = Loader {
            examples,
            batch_size: batch_size.max(1),
            seed,
            pad_id,
            epoch: 0,
            order: Vec::new(),
            pos: 0,
        };
        loader.order = loader.shuffled(0);
        loader
    }

    fn shuffled(&self, epoch: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ SHUFFLE_SALT);
        rng.set_stream(epoch);
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        order.shuffle(&mut rng);
        order
    }

    /// Examples per epoch.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Micro-batches per epoch (the last one may be smaller).
    pub fn batches_per_epoch(&self) -> usize {
        self.examples.len().div_ceil(self.batch_size)
    }

    /// Epochs done, fractional.
    pub fn epoch_progress(&self) -> f64 {
        self.epoch as f64 + self.pos as f64 / self.examples.len().max(1) as f64
    }

    /// The position of the next example to be handed out.
    pub fn position(&self) -> DataPosition {
        DataPosition {
            epoch: self.epoch,
            index: self.pos as u64,
        }
    }

    /// Moves to `to` without reading the examples before it: the epoch's order is recomputed from the
    /// seed, so the cost does not grow with the step number.
    pub fn seek(&mut self, to: DataPosition) -> Result<(), SeekError> {
        let index = usize::try_from(to.index).unwrap_or(usize::MAX);
        if index > self.examples.len() {
            return Err(SeekError {
                epoch: to.epoch,
                index: to.index,
                len: self.examples.len(),
            });
        }
        self.order = self.shuffled(to.epoch);
        self.epoch = to.epoch;
        self.pos = index;
        Ok(())
    }

    /// The next micro-batch; after an epoch's last batch the next epoch starts with a new shuffle.
    pub fn next_batch(&mut self, device: &Device) -> candle_core::Result<Batch> {
        if self.pos >= self.order.len() {
            self.epoch += 1;
            self.pos = 0;
            self.order = self.shuffled(self.epoch);
        }
        let end = (self.pos + self.batch_size).min(self.order.len());
        let picked: Vec<&Tokenized> = self.order[self.pos..end]
            .iter()
            .map(|&i| &self.examples[i])
            .collect();
        self.pos = end;
        let t = picked.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
        let mut ids = vec![self.pad_id; picked.len() * t];
        let (mut positions, mut labels) = (Vec::new(), Vec::new());
        for (b, ex) in picked.iter().enumerate() {
            ids[b * t..b * t + ex.ids.len()].copy_from_slice(&ex.ids);
            for p in 1..ex.ids.len() {
                if ex.trained[p] {
                    positions.push((b * t + p - 1) as u32);
                    labels.push(ex.ids[p]);
                }
            }
        }
        let targets = labels.len();
        Ok(Batch {
            ids: Tensor::from_vec(ids, (picked.len(), t), device)?,
            positions: Tensor::from_vec(positions, targets, device)?,
            labels: Tensor::from_vec(labels, targets, device)?,
            examples: picked.len(),
            tokens: picked.iter().map(|e| e.ids.len()).sum(),
            targets,
            epoch_end: self.pos >= self.order.len(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(lines: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(lines.as_bytes()).unwrap();
        f
    }

    #[test]
    fn validate_counts_and_skips_blank_lines() {
        let f = file("{\"text\": \"a\"}\n\n  \n{\"text\": \"b\", \"extra\": 1}\n");
        assert_eq!(validate_jsonl(f.path()).unwrap(), 2);
        assert_eq!(
            read_jsonl(f.path()).unwrap(),
            vec![Example::Text("a".into()), Example::Text("b".into())]
        );
    }

    #[test]
    fn validate_names_the_bad_line() {
        let good = "{\"text\": \"ok\"}\n";
        let f = file(&format!("{}{{\"text\": oops}}\n", good.repeat(6)));
        let e = validate_jsonl(f.path()).unwrap_err();
        assert!(
            matches!(e, EngineError::Dataset { line: Some(7), .. }),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "dataset {} line 7: not valid JSON: ",
                f.path().display()
            )),
            "{msg}"
        );

        let f = file(&format!("{good}{good}{{\"prompt\": \"x\"}}\n"));
        let msg = validate_jsonl(f.path()).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "dataset {} line 3: missing string field \"text\"",
                f.path().display()
            )
        );

        let f = file("{\"text\": 5}\n");
        assert!(validate_jsonl(f.path())
            .unwrap_err()
            .to_string()
            .contains("line 1: field \"text\" must be a string"));
        let f = file("[1, 2]\n");
        assert!(validate_jsonl(f.path())
            .unwrap_err()
            .to_string()
            .contains("line 1: expected a JSON object"));
    }

    #[test]
    fn validate_rejects_empty_and_missing_files() {
        let f = file("");
        let msg = validate_jsonl(f.path()).unwrap_err().to_string();
        assert!(msg.contains("no examples"), "{msg}");
        let f = file("\n\n");
        assert!(validate_jsonl(f.path()).is_err());
        let e = validate_jsonl(Path::new("/nonexistent/d.jsonl")).unwrap_err();
        assert!(matches!(e, EngineError::Io { .. }));
    }

    fn ex(ids: &[u32]) -> Tokenized {
        Tokenized {
            ids: ids.to_vec(),
            trained: (0..ids.len()).map(|t| t > 0).collect(),
        }
    }

    #[test]
    fn batches_pad_right_and_label_next_tokens() {
        let mut loader = Loader::new(vec![ex(&[0, 5, 6, 0]), ex(&[0, 7, 0])], 2, 1, 99);
        assert_eq!(loader.batches_per_epoch(), 1);
        let b = loader.next_batch(&Device::Cpu).unwrap();
        assert!(b.epoch_end);
        assert_eq!((b.examples, b.tokens, b.targets), (2, 7, 5));
        let ids = b.ids.to_vec2::<u32>().unwrap();
        let rows: Vec<Vec<u32>> = ids.iter().filter(|r| r.len() == 4).cloned().collect();
        assert_eq!(rows.len(), 2);
        let long = rows.iter().position(|r| r[1] == 5).unwrap();
        let short = 1 - long;
        assert_eq!(rows[short], vec![0, 7, 0, 99]);
        let pos = b.positions.to_vec1::<u32>().unwrap();
        let lab = b.labels.to_vec1::<u32>().unwrap();
        let pairs: Vec<(u32, u32)> = pos.into_iter().zip(lab).collect();
        let l = long as u32 * 4;
        let s = short as u32 * 4;
        for p in [(l, 5), (l + 1, 6), (l + 2, 0), (s, 7), (s + 1, 0)] {
            assert!(pairs.contains(&p), "{p:?} in {pairs:?}");
        }
        assert!(
            !pairs.iter().any(|(p, _)| *p == s + 2),
            "no target at padding"
        );
    }

    #[test]
    fn shuffle_is_seeded_per_epoch() {
        let data: Vec<Tokenized> = (0..20).map(|i| ex(&[0, i + 1])).collect();
        let order = |seed| {
            let mut l = Loader::new(data.clone(), 4, seed, 0);
            let mut firsts = Vec::new();
            for _ in 0..10 {
                let b = l.next_batch(&Device::Cpu).unwrap();
                firsts.push(b.ids.to_vec2::<u32>().unwrap()[0][1]);
            }
            (firsts, l.epoch_progress())
        };
        let (a, progress) = order(3);
        assert_eq!(a, order(3).0);
        assert_ne!(a, order(4).0);
        assert_ne!(a[..5], a[5..], "epochs are shuffled differently");
        assert!((progress - 2.0).abs() < 1e-9);
    }
}
