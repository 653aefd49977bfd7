//! `lorad make-tiny-model`: a random-initialised tiny Llama in HF layout, for tests and the demo.
//!
//! Everything is generated here (no download): weights normal(0, 0.02) from a seeded ChaCha generator,
//! and a byte-level BPE tokenizer trained on a small built-in English corpus. The directory loads in
//! transformers' `AutoModelForCausalLM` / `AutoTokenizer` as-is, and in lorad through the same code
//! path as a real model. The same seed gives byte-identical files.
use super::error::EngineError;
use super::weights::{save_tensors, write_text};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The tiny model's shape: ~2.2M parameters. Hidden 256 rather than 128 because with tied embeddings
/// of std 0.02 and a unit final norm the largest reachable logit is about 0.02 * hidden: at 128 even a
/// perfect adapter could lower the loss by only ~35%, which would make "does training work" checks
/// (tests, the demo) fragile.
pub const HIDDEN: usize = 256;
/// MLP width.
pub const INTERMEDIATE: usize = 384;
/// Decoder layers.
pub const LAYERS: usize = 4;
/// Query heads (head_dim 64).
pub const HEADS: usize = 4;
/// KV heads (grouped-query attention, 2 query heads per KV head).
pub const KV_HEADS: usize = 2;
/// Embedding rows; the trained tokenizer has at most this many tokens.
pub const VOCAB: usize = 1024;
/// Context length.
pub const MAX_POS: usize = 512;
/// Special tokens, ids 0, 1, 2. `<|endoftext|>` is bos, eos and pad.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A minimal ChatML template (role lines between `<|im_start|>` and `<|im_end|>`).
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Writes the tiny model to `dir` (created if missing): config.json, generation_config.json,
/// model.safetensors, tokenizer.json, tokenizer_config.json, special_tokens_map.json.
pub fn make_tiny_model(dir: &Path, seed: u64) -> Result<(), EngineError> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let tokenizer = train_tokenizer(dir)?;
    let tok_path = dir.join("tokenizer.json");
    let text = tokenizer
        .to_string(true)
        .map_err(|e| EngineError::Tokenizer {
            path: tok_path.clone(),
            detail: e.to_string(),
        })?;
    write_text(&tok_path, &text)?;

    save_tensors(&dir.join("model.safetensors"), &random_weights(seed)?)?;
    let json = |v: serde_json::Value| serde_json::to_string_pretty(&v).unwrap_or_default() + "\n";
    write_text(&dir.join("config.json"), &json(config_json()))?;
    write_text(
        &dir.join("generation_config.json"),
        &json(
            json!({"_from_model_config": true, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}),
        ),
    )?;
    let special = |i: usize| {
        json!({"content": SPECIAL_TOKENS[i], "lstrip": false, "normalized": false,
                                    "rstrip": false, "single_word": false, "special": true})
    };
    let eot = SPECIAL_TOKENS[0];
    write_text(
        &dir.join("tokenizer_config.json"),
        &json(json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": eot, "eos_token": eot, "pad_token": eot, "unk_token": null,
            "additional_special_tokens": [SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]],
            "added_tokens_decoder": {"0": special(0), "1": special(1), "2": special(2)},
            "model_max_length": MAX_POS,
            "clean_up_tokenization_spaces": false,
            "chat_template": CHAT_TEMPLATE,
        })),
    )?;
    write_text(
        &dir.join("special_tokens_map.json"),
        &json(json!({"bos_token": eot, "eos_token": eot, "pad_token": eot,
                     "additional_special_tokens": [SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]]})),
    )?;
    tracing::info!(dir = %dir.display(), seed, "tiny model written");
    Ok(())
}

/// HF config.json; both RoPE spellings (`rope_theta` for transformers 4, `rope_parameters` for 5)
/// and both dtype spellings.
fn config_json() -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN / HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POS,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": null,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "pretraining_tp": 1,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "dtype": "float32",
        "use_cache": true,
        "vocab_size": VOCAB,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    })
}

/// A byte-level BPE (GPT-2 / Qwen2 style) trained on `CORPUS`, all 256 bytes in the initial alphabet so
/// that any text encodes without unknown tokens.
fn train_tokenizer(dir: &Path) -> Result<Tokenizer, EngineError> {
    let err = |e: tokenizers::Error| EngineError::Tokenizer {
        path: dir.join("tokenizer.json"),
        detail: e.to_string(),
    };
    let specials = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(VOCAB)
        .min_frequency(1)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_post_processor(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    tok.train(&mut trainer, CORPUS.lines()).map_err(err)?;
    let size = tok.get_vocab_size(true);
    if size > VOCAB {
        return Err(EngineError::Tokenizer {
            path: dir.join("tokenizer.json"),
            detail: format!(
                "trained vocabulary has {size} tokens, more than the {VOCAB} embedding rows"
            ),
        });
    }
    Ok(tok)
}

/// normal(0, 0.02) for every matrix (Box-Muller on the seeded generator), ones for the norms, in HF names.
/// No lm_head.weight: the embeddings are tied, as transformers saves them.
fn random_weights(seed: u64) -> Result<BTreeMap<String, Tensor>, EngineError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut normal = |rows: usize, cols: usize| -> candle_core::Result<Tensor> {
        let n = rows * cols;
        let mut v = Vec::with_capacity(n + 1);
        while v.len() < n {
            let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
            let u2: f64 = rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt() * 0.02;
            let theta = 2.0 * std::f64::consts::PI * u2;
            v.push((r * theta.cos()) as f32);
            v.push((r * theta.sin()) as f32);
        }
        v.truncate(n);
        Tensor::from_vec(v, (rows, cols), &dev)
    };
    let (h, i, d) = (HIDDEN, INTERMEDIATE, HIDDEN / HEADS);
    let mut w = BTreeMap::new();
    w.insert("model.embed_tokens.weight".to_string(), normal(VOCAB, h)?);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let shapes = [
            ("self_attn.q_proj", HEADS * d, h),
            ("self_attn.k_proj", KV_HEADS * d, h),
            ("self_attn.v_proj", KV_HEADS * d, h),
            ("self_attn.o_proj", h, HEADS * d),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ];
        for (name, rows, cols) in shapes {
            w.insert(format!("{p}.{name}.weight"), normal(rows, cols)?);
        }
        w.insert(
            format!("{p}.input_layernorm.weight"),
            Tensor::ones(h, candle_core::DType::F32, &dev)?,
        );
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            Tensor::ones(h, candle_core::DType::F32, &dev)?,
        );
    }
    w.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(h, candle_core::DType::F32, &dev)?,
    );
    Ok(w)
}

/// The tokenizer's training text: a few KB of plain English, enough distinct words for ~760 merges.
const CORPUS: &str = "\
The quick brown fox jumps over the lazy dog. A small model learns to read one word at a time.
Once upon a time there was a little village by the sea. The people of the village were fishermen and farmers.
Every morning the fishermen went out in their boats, and every evening they came back with fish for the market.
The farmers grew wheat, apples, potatoes and beans in the green fields behind the hills.
Children walked to school along the river. They learned to read, to write and to count to one hundred.
The teacher said that reading is the key to every door, and that a good question is worth more than a quick answer.
In the winter the days were short and cold. Snow covered the roofs, and the wind blew from the north.
In the summer the days were long and warm. The children swam in the river and played in the sun until night.
The cat sat on the mat and watched the birds. The dog slept by the fire. The horse stood quietly in the stable.
My friend has a red bicycle and a blue kite. On windy days we fly the kite on the hill near the old mill.
She opened the window and looked at the garden. The flowers were yellow, white and purple after the rain.
He made a cup of tea, sat down at the table and wrote a long letter to his brother in the city.
Computers follow instructions written by people. A program reads input, does some work, and writes output.
Training a language model means showing it many examples and slowly changing its weights to predict the next token.
A learning rate that is too large makes the loss jump around; one that is too small makes training very slow.
The daemon runs jobs in the background, writes checkpoints to disk and reports the loss after every step.
Questions and answers: What is the capital of France? The capital of France is Paris.
What is two plus two? Two plus two is four. What color is the sky on a clear day? The sky is blue.
How many days are in a week? There are seven days in a week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
The months of the year are January, February, March, April, May, June, July, August, September, October, November and December.
Numbers: zero, one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty, thirty, forty, fifty.
The user asked the assistant for help, and the assistant answered politely and clearly.
Please write a short poem about the moon. The moon is bright, the night is long, the stars above all sing their song.
Water boils at one hundred degrees and freezes at zero degrees. Ice is lighter than water, so it floats.
The scientist measured the results twice before she wrote them down, because careful work saves time later.
Good code is simple to read. Functions should be small, names should be clear, and errors should say what went wrong.
The train left the station at nine o'clock and arrived in the mountains before noon.
We walked through the forest, crossed a wooden bridge and found a quiet lake where ducks were swimming.
Bread, butter, cheese, milk, eggs, honey, rice, soup, salt, sugar and coffee were on the shopping list.
The library was open every day except Sunday, and anyone could borrow three books at a time.
History tells us about kings and queens, about wars and peace, about inventions that changed the world.
The sun rises in the east and sets in the west. The earth turns around the sun once every year.
Doctors help people who are sick, and nurses take care of them in the hospital day and night.
If you want to learn something well, practice a little every day and do not be afraid of mistakes.
Thank you very much for your help. You are welcome. Good morning, good evening, good night and goodbye.
The old man told stories about the sea, about storms and whales and islands far away.
Music filled the room when the band began to play, and soon everyone was dancing.
It is important to drink water, eat vegetables, sleep well and walk outside when the weather is nice.
The price of the book was ten dollars, but the shop gave a discount to students and teachers.
A B C D E F G H I J K L M N O P Q R S T U V W X Y Z a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9
Punctuation matters: commas, periods, question marks? exclamation marks! colons: semicolons; quotes \"like this\" and (parentheses).
";

/// The demo's dataset: 64 short, regular sentences, enough for a tiny model to visibly learn.
pub fn demo_dataset() -> Vec<String> {
    let names = ["Ada", "Bram", "Chen", "Dara", "Emil", "Fia", "Gus", "Hana"];
    let things = [
        "red kite",
        "blue boat",
        "green lamp",
        "gold ring",
        "old map",
        "tin drum",
        "silk fan",
        "oak desk",
    ];
    let mut lines = Vec::new();
    for (i, name) in names.iter().enumerate() {
        for (k, thing) in things.iter().enumerate() {
            let count = (i + k) % 5 + 2;
            lines.push(format!(
                "{name} keeps {count} of the {thing} in the lorad lab."
            ));
        }
    }
    lines
}

/// Writes the first `lines` lines of the demo dataset as `{"text": ...}` JSONL.
pub fn write_dataset(path: &Path, lines: usize) -> std::io::Result<()> {
    let mut text = String::new();
    for line in demo_dataset().into_iter().take(lines) {
        text.push_str(&serde_json::json!({ "text": line }).to_string());
        text.push('\n');
    }
    std::fs::write(path, text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn tiny_model_is_deterministic_and_complete() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        make_tiny_model(a.path(), 7).unwrap();
        make_tiny_model(b.path(), 7).unwrap();
        for f in [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            let (x, y) = (
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap(),
            );
            assert!(x == y, "{f} differs between two runs with the same seed");
        }
        let cfg = super::super::model::check_model_dir(a.path()).unwrap();
        assert_eq!(cfg.vocab_size, VOCAB);
        assert!(cfg.tie_word_embeddings);

        let tok = Tokenizer::from_file(a.path().join("tokenizer.json")).unwrap();
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
        let enc = tok
            .encode("The cat sat on the mat. Ünïcödé too!", false)
            .unwrap();
        assert!(
            enc.get_ids().len() < 30,
            "the trained merges compress English: {:?}",
            enc.get_ids()
        );
        assert_eq!(
            tok.decode(enc.get_ids(), false).unwrap(),
            "The cat sat on the mat. Ünïcödé too!"
        );
    }
}
