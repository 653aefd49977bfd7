//! GGUF metadata: the tokenizer rebuilt from it, and errors that name the field or tensor at fault.
use super::fixture::*;
use crate::source::{check_model, ModelSource};
use candle_core::quantized::gguf_file;
use tokenizers::Tokenizer;

#[test]
fn gguf_tokenizer_encodes_like_tokenizer_json() {
    let root = tiny_dir();
    let hf = root.path().join("hf");
    let gguf = root.path().join("tiny.gguf");
    write_gguf(&hf, &gguf, &Fixture::default());
    let want = Tokenizer::from_file(hf.join("tokenizer.json")).unwrap();
    let assets = ModelSource::open(&gguf).unwrap().tokenizer().unwrap();
    let texts = [
        "The quick brown fox jumps over the lazy dog.",
        "<|im_start|>user\nWhat is 1234 + 56?<|im_end|>\n<|im_start|>assistant\n",
        "  leading spaces,\ttabs\n\nand blank lines   ",
        "don't won't I'll we've; Ünïcödé 日本語 🙂",
        "<|endoftext|>",
    ];
    for text in texts {
        for add_special in [false, true] {
            let a = want.encode(text, add_special).unwrap();
            let b = assets.tokenizer.encode(text, add_special).unwrap();
            assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
        }
        let ids = want.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(
            assets.tokenizer.decode(&ids, false).unwrap(),
            want.decode(&ids, false).unwrap()
        );
        assert_eq!(
            assets.tokenizer.decode(&ids, true).unwrap(),
            want.decode(&ids, true).unwrap()
        );
    }
    assert_eq!(assets.special.bos, Some(0));
    assert_eq!(assets.special.eos, Some(0));
    assert_eq!(assets.special.add_bos, Some(false));
    let hf_assets = ModelSource::open(&hf).unwrap().tokenizer().unwrap();
    assert_eq!(assets.chat_template, hf_assets.chat_template);
    assert!(assets.chat_template.unwrap().contains("<|im_start|>"));
}

/// The error `ModelSource::open` gives for the fixture, as text.
fn open_error(fx: Fixture) -> String {
    let root = tiny_dir();
    let gguf = root.path().join("bad.gguf");
    write_gguf(&root.path().join("hf"), &gguf, &fx);
    match ModelSource::open(&gguf) {
        Ok(_) => panic!("opened a bad GGUF file"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn errors_name_the_field_or_tensor() {
    use gguf_file::Value as V;
    let cases: Vec<(Fixture, &[&str])> = vec![
        (
            Fixture {
                meta: vec![("llama.embedding_length", None)],
                ..Fixture::default()
            },
            &["llama.embedding_length", "missing"],
        ),
        (
            Fixture {
                meta: vec![("general.architecture", Some(V::String("gpt2".into())))],
                ..Fixture::default()
            },
            &["general.architecture", "\"gpt2\""],
        ),
        (
            Fixture {
                meta: vec![("llama.block_count", Some(V::String("four".into())))],
                ..Fixture::default()
            },
            &["llama.block_count", "integer"],
        ),
        (
            Fixture {
                meta: vec![("tokenizer.ggml.model", Some(V::String("llama".into())))],
                ..Fixture::default()
            },
            &["tokenizer.ggml.model", "SentencePiece", "not supported yet"],
        ),
        (
            Fixture {
                meta: vec![("tokenizer.ggml.pre", Some(V::String("falcon".into())))],
                ..Fixture::default()
            },
            &["tokenizer.ggml.pre", "\"falcon\""],
        ),
        (
            Fixture {
                meta: vec![("llama.rope.scaling.type", Some(V::String("yarn".into())))],
                ..Fixture::default()
            },
            &["llama.rope.scaling.type", "yarn"],
        ),
        (
            Fixture {
                meta: vec![("llama.attention.head_count_kv", Some(V::U32(3)))],
                ..Fixture::default()
            },
            &["num_key_value_heads 3"],
        ),
        (
            Fixture {
                drop: vec!["blk.1.ffn_down.weight"],
                ..Fixture::default()
            },
            &["GGUF tensor blk.1.ffn_down.weight is missing"],
        ),
    ];
    for (fx, needles) in cases {
        let e = open_error(fx);
        for n in needles {
            assert!(e.contains(n), "{e:?} should contain {n:?}");
        }
        assert!(e.contains("bad.gguf"), "{e}");
    }
}

#[test]
fn unknown_tensor_type_is_named() {
    let root = tiny_dir();
    let gguf = root.path().join("iq.gguf");
    write_gguf(&root.path().join("hf"), &gguf, &Fixture::default());
    // Rewrite blk.3.ffn_down.weight's type id (after its name, rank and dims) to 16 = IQ2_XXS, a type
    // candle cannot read.
    let mut bytes = std::fs::read(&gguf).unwrap();
    let name = b"blk.3.ffn_down.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let rank = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty = at + 4 + 8 * rank;
    assert_eq!(
        u32::from_le_bytes(bytes[ty..ty + 4].try_into().unwrap()),
        0,
        "was F32"
    );
    bytes[ty..ty + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&gguf, &bytes).unwrap();
    let e = ModelSource::open(&gguf).err().unwrap().to_string();
    assert!(
        e.contains("GGUF tensor blk.3.ffn_down.weight has type IQ2_XXS, not supported yet"),
        "{e}"
    );

    let junk = root.path().join("junk.bin");
    std::fs::write(&junk, b"not a model").unwrap();
    let e = check_model(&junk).err().unwrap().to_string();
    assert!(e.contains("not a GGUF file"), "{e}");
}

#[test]
fn pre_tokenizer_follows_tokenizer_ggml_pre() {
    use tokenizers::tokenizer::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let root = tiny_dir();
    let mut map: std::collections::HashMap<String, gguf_file::Value> =
        tokenizer_meta(&root.path().join("hf"))
            .into_iter()
            .collect();
    // How "x 12345" is cut before BPE: SmolLM and Qwen2 split every digit, Llama 3 groups three,
    // GPT-2 keeps the number whole.
    for (pre, want) in [
        ("gpt2", vec!["x", "\u{120}12345"]),
        ("smollm", vec!["x", "\u{120}", "1", "2", "3", "4", "5"]),
        ("llama-bpe", vec!["x", "\u{120}", "123", "45"]),
        ("qwen2", vec!["x", "\u{120}", "1", "2", "3", "4", "5"]),
    ] {
        map.insert(
            "tokenizer.ggml.pre".into(),
            gguf_file::Value::String(pre.into()),
        );
        let meta = super::Meta {
            map: &map,
            path: std::path::Path::new("t.gguf"),
        };
        let assets = super::tokenizer::build(&meta, crate::tiny::VOCAB).unwrap();
        let mut s = PreTokenizedString::from("x 12345");
        assets
            .tokenizer
            .get_pre_tokenizer()
            .unwrap()
            .pre_tokenize(&mut s)
            .unwrap();
        let got: Vec<String> = s
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(piece, _, _)| piece.to_string())
            .collect();
        assert_eq!(got, want, "tokenizer.ggml.pre = {pre}");
    }
}
