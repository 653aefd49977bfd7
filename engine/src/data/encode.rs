//! Tokenizing an example and marking which of its tokens the loss counts.
//!
//! Every format is first rendered to one text plus the byte ranges that are trained (the completion,
//! the Alpaca output, the assistant replies; the whole text for `{"text"}`). The text is tokenized in
//! one piece, as the model will see it at inference, and a token is trained when its bytes overlap a
//! trained range. Tokenizing the pieces separately would be simpler but would tokenize the boundary
//! differently from inference (`"Answer:" + " Paris"` is one token ` Paris` either way here, but a
//! prompt ending in a space is not); the overlap rule trains such a straddling token, which is the one
//! that predicts the completion's first word.
use super::chat::{ChatError, ChatTemplate};
use super::format::{alpaca_prompt, Example};
use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::source::{ModelSource, SpecialTokens, TokenizerAssets};
use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::Tokenizer;

/// A tokenized example (or packed sequence): `ids`, and for each position whether predicting `ids[t]`
/// (from the tokens before it) counts in the loss. `trained[0]` is always false: the first token has
/// no context.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    /// Token ids, BOS/EOS included, at most max_seq_len of them.
    pub ids: Vec<u32>,
    /// Per position: is this token a training target.
    pub trained: Vec<bool>,
}

impl Tokenized {
    /// Positions the loss counts.
    pub fn targets(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }
}

/// Why an example could not be encoded.
#[derive(Debug, Clone, PartialEq)]
pub enum EncodeError {
    /// Something about this example (its conversation fails the template's checks): reported with
    /// the dataset's file and line.
    Example(String),
    /// The tokenizer or chat template cannot encode it (no template, a template that does not
    /// compile or is not incremental, ids past the model's vocabulary): reported against the model.
    Model(String),
}

/// Turns examples into token ids and loss masks, with the model's tokenizer and chat template.
/// Shared by the pipeline's worker threads (`Tokenizer` and the compiled template are `Sync`).
#[derive(Debug)]
pub struct Encoder {
    tokenizer: Tokenizer,
    special: SpecialTokens,
    bos_text: String,
    eos_text: String,
    chat: Option<Result<ChatTemplate, String>>,
    max_len: usize,
    vocab_size: Option<usize>,
    train_on_inputs: bool,
    path: PathBuf,
}

impl Encoder {
    /// An encoder from parts: the tokenizer, the special tokens (from config.json /
    /// tokenizer_config.json, or GGUF metadata) and the chat template, if the model has one.
    /// Sequences are cut to `max_len` tokens. A template that does not compile is reported when a chat
    /// example needs it, so that a text dataset still trains on such a model.
    pub fn new(
        mut tokenizer: Tokenizer,
        special: SpecialTokens,
        chat_template: Option<String>,
        max_len: usize,
    ) -> Self {
        // The ids must come from the model's vocabulary and our framing alone: no padding or
        // truncation configured in tokenizer.json, and no post-processor. With add_special_tokens off a
        // post-processor adds nothing, but a byte-level one trims whitespace out of the offsets, and
        // the masking needs the untrimmed ones.
        tokenizer.with_post_processor(None::<PostProcessorWrapper>);
        tokenizer.with_padding(None);
        // Removing truncation cannot fail (only setting a stride larger than max_length can).
        if tokenizer.with_truncation(None).is_err() {
            tracing::debug!("tokenizer truncation could not be disabled");
        }
        let text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let (bos_text, eos_text) = (text(special.bos), text(special.eos));
        Encoder {
            chat: chat_template.map(|t| ChatTemplate::new(&t)),
            tokenizer,
            special,
            bos_text,
            eos_text,
            max_len: max_len.max(1),
            vocab_size: None,
            train_on_inputs: false,
            path: PathBuf::new(),
        }
    }

    /// An encoder for a model's tokenizer assets (HF directory or GGUF), named by their path in errors.
    pub fn from_assets(assets: TokenizerAssets, max_len: usize) -> Self {
        let path = assets.path;
        Encoder {
            path,
            ..Encoder::new(
                assets.tokenizer,
                assets.special,
                assets.chat_template,
                max_len,
            )
        }
    }

    /// The tokenizer of an HF model directory (tokenizer.json, tokenizer_config.json), checked against
    /// the model's vocabulary size.
    pub fn load_hf(
        model_dir: &Path,
        cfg: &ModelConfig,
        max_len: usize,
    ) -> Result<Self, EngineError> {
        let source = ModelSource::HfDir {
            dir: model_dir.to_path_buf(),
            config: cfg.clone(),
        };
        Ok(Encoder::from_assets(source.tokenizer()?, max_len).with_vocab_size(cfg.vocab_size))
    }

    /// Rejects token ids at or past `vocab_size` (the model's embedding rows): a tokenizer from
    /// another model would otherwise fail deep inside the forward pass.
    pub fn with_vocab_size(mut self, vocab_size: usize) -> Self {
        self.vocab_size = Some(vocab_size);
        self
    }

    /// Train on every token (prompts, user turns, templates) instead of completions only.
    pub fn with_train_on_inputs(mut self, on: bool) -> Self {
        self.train_on_inputs = on;
        self
    }

    /// The longest sequence produced.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Where the tokenizer came from (empty for one built from parts).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether chat examples can be encoded; the error says why not.
    pub fn check_chat(&self) -> Result<&ChatTemplate, String> {
        match &self.chat {
            Some(Ok(t)) => Ok(t),
            Some(Err(e)) => Err(format!("the model's chat template does not compile: {e}")),
            None => Err("a chat dataset needs the model's chat template, and this model has none \
                         (no chat_template in tokenizer_config.json, no chat_template.jinja, no GGUF \
                         tokenizer.chat_template)"
                .into()),
        }
    }

    /// Whether BOS is prepended to non-chat examples: when the model has one and does not say
    /// otherwise (`add_bos_token` / `tokenizer.ggml.add_bos_token`). Chat templates write their own.
    fn bos(&self) -> Option<u32> {
        self.special
            .bos
            .filter(|_| self.special.add_bos != Some(false))
    }

    /// Tokenizes one example: BOS + text + EOS for text, prompt/completion and alpaca (the EOS is
    /// trained: it teaches the model to stop), the rendered conversation as-is for chat. Cut to
    /// `max_len` keeping the start, so an over-long completion loses its end and its EOS.
    // The trained byte ranges are a list that has one element for every format but chat.
    #[allow(clippy::single_range_in_vec_init)]
    pub fn encode_one(&self, example: &Example) -> Result<Tokenized, EncodeError> {
        let whole = |t: &str| vec![0..t.len()];
        let (text, spans, framed): (Cow<str>, Vec<Range<usize>>, bool) = match example {
            Example::Text(t) => (Cow::Borrowed(t), whole(t), true),
            Example::PromptCompletion { prompt, completion } => {
                let text = format!("{prompt}{completion}");
                let spans = vec![prompt.len()..text.len()];
                (Cow::Owned(text), spans, true)
            }
            Example::Alpaca {
                instruction,
                input,
                output,
            } => {
                let prompt = alpaca_prompt(instruction, input.as_deref());
                let text = format!("{prompt}{output}");
                let spans = vec![prompt.len()..text.len()];
                (Cow::Owned(text), spans, true)
            }
            Example::Chat(messages) => {
                let template = self.check_chat().map_err(EncodeError::Model)?;
                let (text, spans) = template
                    .render_with_spans(
                        messages,
                        !self.train_on_inputs,
                        &self.bos_text,
                        &self.eos_text,
                    )
                    .map_err(|e| match e {
                        ChatError::Render(_) => EncodeError::Example(e.to_string()),
                        ChatError::NotIncremental { .. } => EncodeError::Model(e.to_string()),
                    })?;
                (Cow::Owned(text), spans, false)
            }
        };
        let enc = self
            .tokenizer
            .encode(text.as_ref(), false)
            .map_err(|e| EncodeError::Model(format!("tokenizer: {e}")))?;
        let n = enc.get_ids().len() + 2;
        let (mut ids, mut trained) = (Vec::with_capacity(n), Vec::with_capacity(n));
        if let Some(bos) = self.bos().filter(|_| framed) {
            ids.push(bos);
            trained.push(false);
        }
        for (&id, &(start, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            ids.push(id);
            trained.push(self.train_on_inputs || overlaps(&spans, start, end));
        }
        if let Some(eos) = self.special.eos.filter(|_| framed) {
            ids.push(eos);
            trained.push(true);
        }
        ids.truncate(self.max_len);
        trained.truncate(self.max_len);
        if let Some(first) = trained.first_mut() {
            *first = false;
        }
        if let Some(vocab) = self.vocab_size {
            if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(EncodeError::Model(format!(
                    "token id {id} is outside the model's vocab_size {vocab}: the tokenizer does not \
                     belong to this model"
                )));
            }
        }
        Ok(Tokenized { ids, trained })
    }

    /// Tokenizes `examples` in order on the calling thread (tests and evaluation; training goes
    /// through the `Loader`'s workers). Errors name the tokenizer and the 1-based example.
    pub fn encode(&self, examples: &[Example]) -> Result<Vec<Tokenized>, EngineError> {
        examples
            .iter()
            .enumerate()
            .map(|(i, e)| {
                self.encode_one(e).map_err(|e| {
                    let (EncodeError::Example(d) | EncodeError::Model(d)) = e;
                    EngineError::Tokenizer {
                        path: self.path.clone(),
                        detail: format!("example {}: {d}", i + 1),
                    }
                })
            })
            .collect()
    }
}

/// Whether the token at bytes `start..end` overlaps a trained range. Tokens with empty offsets (some
/// added tokens) count when they sit inside one.
fn overlaps(spans: &[Range<usize>], start: usize, end: usize) -> bool {
    spans.iter().any(|r| {
        if start == end {
            r.start <= start && start < r.end
        } else {
            start < r.end && end > r.start
        }
    })
}
