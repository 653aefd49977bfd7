//! A `tokenizers::Tokenizer` rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! llama.cpp stores the vocabulary, the merges and per-token types, and names the pre-tokenizer
//! (`tokenizer.ggml.pre`) instead of storing it; each supported name maps to the pipeline of the HF
//! `tokenizer.json` it was converted from, so both encode text to the same ids. Only byte-level BPE
//! (`tokenizer.ggml.model` = `gpt2`) is rebuilt; SentencePiece (`llama`) models are refused by name.
use super::header::Meta;
use crate::error::EngineError;
use crate::source::{SpecialTokens, TokenizerAssets};
use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Llama 3's split pattern (its tokenizer.json), digits in groups of up to three.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split pattern (its tokenizer.json), one digit per piece.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer families we rebuild, by the HF pipeline they stand for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pre {
    /// GPT-2's ByteLevel with its built-in regex, no prefix space.
    Gpt2,
    /// SmolLM / StarCoder: every digit split off, then GPT-2's ByteLevel.
    DigitsGpt2,
    /// Llama 3: its own split regex, then ByteLevel without regex.
    Llama3,
    /// Qwen2: NFC, its own split regex, then ByteLevel without regex.
    Qwen2,
}

/// `tokenizer.ggml.pre` values supported (an absent value is llama.cpp's `default`, GPT-2's).
const PRE_NAMES: [(&str, Pre); 10] = [
    ("default", Pre::Gpt2),
    ("gpt2", Pre::Gpt2),
    ("gpt-2", Pre::Gpt2),
    ("smollm", Pre::DigitsGpt2),
    ("starcoder", Pre::DigitsGpt2),
    ("llama3", Pre::Llama3),
    ("llama-bpe", Pre::Llama3),
    ("smaug-bpe", Pre::Llama3),
    ("qwen2", Pre::Qwen2),
    ("deepseek-r1-qwen", Pre::Qwen2),
];

/// llama.cpp's token types (`llama_token_type`).
const TYPE_UNKNOWN: usize = 2;
const TYPE_CONTROL: usize = 3;
const TYPE_USER_DEFINED: usize = 4;

fn pre_kind(meta: &Meta) -> Result<Pre, EngineError> {
    let name = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    PRE_NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| *p)
        .ok_or_else(|| {
            meta.error(
                "tokenizer.ggml.pre",
                format!(
                    "is \"{name}\", not supported yet (supported: {})",
                    PRE_NAMES.map(|(n, _)| n).join(", ")
                ),
            )
        })
}

/// Cheap checks for the daemon's submit: a supported tokenizer kind and pre-tokenizer, and a token
/// list that fits the `vocab_rows` embedding rows. Builds nothing.
pub fn check(meta: &Meta, vocab_rows: usize) -> Result<(), EngineError> {
    match meta.str("tokenizer.ggml.model")? {
        "gpt2" => {}
        "llama" => {
            return Err(meta.error(
                "tokenizer.ggml.model",
                "is \"llama\" (SentencePiece), not supported yet: only byte-level BPE (\"gpt2\") tokenizers are rebuilt from GGUF",
            ))
        }
        other => {
            return Err(meta.error(
                "tokenizer.ggml.model",
                format!("is \"{other}\", not supported (supported: gpt2)"),
            ))
        }
    }
    pre_kind(meta)?;
    let n = meta.array("tokenizer.ggml.tokens")?.len();
    if n > vocab_rows {
        return Err(meta.error(
            "tokenizer.ggml.tokens",
            format!("has {n} tokens, more than the {vocab_rows} rows of token_embd.weight"),
        ));
    }
    meta.array("tokenizer.ggml.merges")?;
    Ok(())
}

/// Rebuilds the tokenizer, its special token ids and chat template. `vocab_rows` is the embedding's
/// row count.
pub fn build(meta: &Meta, vocab_rows: usize) -> Result<TokenizerAssets, EngineError> {
    check(meta, vocab_rows)?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let id = |key: &str| -> Result<Option<u32>, EngineError> {
        match meta.opt_id(key)? {
            Some(i) if i as usize >= tokens.len() => {
                Err(meta.error(key, format!("is {i}, outside the {} tokens", tokens.len())))
            }
            other => Ok(other),
        }
    };
    let special = SpecialTokens {
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
        add_bos: meta.opt_bool("tokenizer.ggml.add_bos_token")?,
    };
    let unk = id("tokenizer.ggml.unknown_token_id")?;

    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges(meta)?);
    if let Some(u) = unk {
        bpe = bpe.unk_token(tokens[u as usize].to_string());
    }
    let bpe = bpe.build().map_err(|e| {
        meta.error(
            "tokenizer.ggml.merges",
            format!("do not fit the tokens: {e}"),
        )
    })?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = pre_kind(meta)?;
    if pre == Pre::Qwen2 {
        tokenizer.with_normalizer(Some(NFC));
    }
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(meta, pre)?));
    tokenizer.with_decoder(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_post_processor(Some(ByteLevel::new(false, true, true)));
    let named = [special.bos, special.eos, special.pad, unk];
    let (specials, added) = added_tokens(meta, &tokens, named.into_iter().flatten())?;
    tokenizer.add_special_tokens(&specials);
    tokenizer.add_tokens(&added);
    Ok(TokenizerAssets {
        tokenizer,
        chat_template: meta.opt_str("tokenizer.chat_template")?.map(str::to_string),
        special,
        path: meta.path.to_path_buf(),
    })
}

/// The BPE merges, each "a b".
fn merges(meta: &Meta) -> Result<Vec<(String, String)>, EngineError> {
    meta.strings("tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(meta.error(
                "tokenizer.ggml.merges",
                format!("entry {i} \"{m}\" is not two tokens separated by a space"),
            )),
        })
        .collect()
}

/// The pre-tokenizer of `pre`: how text is cut into words before BPE.
fn pre_tokenizer(meta: &Meta, pre: Pre) -> Result<PreTokenizerWrapper, EngineError> {
    let split = |regex: &str| {
        Split::new(
            SplitPattern::Regex(regex.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| meta.error("tokenizer.ggml.pre", format!("regex: {e}")))
    };
    Ok(match pre {
        Pre::Gpt2 => ByteLevel::new(false, true, true).into(),
        Pre::DigitsGpt2 => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        Pre::Llama3 => Sequence::new(vec![
            split(LLAMA3_REGEX)?.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        Pre::Qwen2 => Sequence::new(vec![
            split(QWEN2_REGEX)?.into(),
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
    })
}

/// Control and unknown tokens (and the `named` ids: BOS, EOS, pad, unknown) are special: matched
/// whole before pre-tokenization and skipped when decoding with skip_special_tokens. User-defined
/// tokens are matched whole too but decode as text. Returns (special, user-defined).
fn added_tokens(
    meta: &Meta,
    tokens: &[&str],
    named: impl Iterator<Item = u32>,
) -> Result<(Vec<AddedToken>, Vec<AddedToken>), EngineError> {
    let types = match meta.map.get("tokenizer.ggml.token_type") {
        Some(_) => meta.array("tokenizer.ggml.token_type")?,
        None => &[],
    };
    let mut specials = Vec::new();
    let mut added = Vec::new();
    for (i, v) in types.iter().enumerate() {
        let t = match v {
            Value::I32(t) => usize::try_from(*t).unwrap_or(0),
            Value::U32(t) => *t as usize,
            _ => 0,
        };
        let Some(content) = tokens.get(i) else { break };
        match t {
            TYPE_UNKNOWN | TYPE_CONTROL => {
                specials.push(AddedToken::from(content.to_string(), true))
            }
            TYPE_USER_DEFINED => {
                added.push(AddedToken::from(content.to_string(), false).normalized(false))
            }
            _ => {}
        }
    }
    for i in named {
        let content = tokens[i as usize].to_string();
        if !specials.iter().any(|s| s.content == content) {
            specials.push(AddedToken::from(content, true));
        }
    }
    Ok((specials, added))
}
