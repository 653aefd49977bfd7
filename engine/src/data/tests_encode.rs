//! Tokenization and loss masking for each format, on the tiny model's byte-level BPE tokenizer; chat
//! masking with a ChatML template and a Llama-3 template.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use super::*;
use crate::chat_template::ChatMessage;
use crate::config::ModelConfig;
use crate::source::{ModelSource, SpecialTokens, TokenizerAssets};
use crate::tiny::make_tiny_model;
use std::sync::OnceLock;
use tokenizers::{AddedToken, Tokenizer};

/// The tiny model's tokenizer assets (ChatML template; `<|endoftext|>` = 0 is BOS, EOS and pad),
/// made once per test binary.
pub(super) fn tiny_assets() -> TokenizerAssets {
    static ASSETS: OnceLock<TokenizerAssets> = OnceLock::new();
    ASSETS
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            make_tiny_model(dir.path(), 3).unwrap();
            let config = ModelConfig::load(dir.path()).unwrap();
            ModelSource::HfDir {
                dir: dir.path().to_path_buf(),
                config,
            }
            .tokenizer()
            .unwrap()
        })
        .clone()
}

pub(super) fn tiny_encoder(max_len: usize) -> Encoder {
    Encoder::from_assets(tiny_assets(), max_len)
}

/// The trained tokens as text, one string per run of consecutive trained positions.
pub(super) fn segments(tok: &Tokenizer, t: &Tokenized) -> Vec<String> {
    assert_eq!(t.ids.len(), t.trained.len());
    assert!(!t.trained[0], "the first token is never a target");
    let mut out = Vec::new();
    let mut run: Vec<u32> = Vec::new();
    for (&id, &trained) in t.ids.iter().zip(&t.trained).chain([(&u32::MAX, &false)]) {
        if trained {
            run.push(id);
        } else if !run.is_empty() {
            out.push(tok.decode(&run, false).unwrap());
            run.clear();
        }
    }
    out
}

fn chat(pairs: &[(&str, &str)]) -> Example {
    Example::Chat(
        pairs
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect(),
    )
}

const EOT: &str = "<|endoftext|>";

#[test]
fn text_trains_every_token_and_the_eos() {
    let enc = tiny_encoder(64);
    let t = enc
        .encode_one(&Example::Text("the cat sat on the mat.".into()))
        .unwrap();
    assert_eq!(t.ids[0], 0, "BOS first");
    assert_eq!(*t.ids.last().unwrap(), 0, "EOS last");
    assert_eq!(
        segments(&tiny_assets().tokenizer, &t),
        [format!("the cat sat on the mat.{EOT}")]
    );
}

#[test]
fn prompt_completion_trains_the_completion_and_the_eos() {
    let tok = tiny_assets().tokenizer;
    let enc = tiny_encoder(64);
    let ex = |p: &str, c: &str| Example::PromptCompletion {
        prompt: p.into(),
        completion: c.into(),
    };
    let t = enc
        .encode_one(&ex(
            "Question: where does the cat sit?\nAnswer:",
            " on the mat.",
        ))
        .unwrap();
    assert_eq!(segments(&tok, &t), [format!(" on the mat.{EOT}")]);
    assert_eq!(
        t.targets(),
        t.ids.len() - enc_prompt_len(&enc, "Question: where does the cat sit?\nAnswer:")
    );

    // A prompt ending in a space: byte-level BPE puts the space into the completion's first token,
    // which is trained (it is the token that predicts the first word), taking at most that space.
    let t = enc.encode_one(&ex("Answer: ", "on the mat.")).unwrap();
    let seg = segments(&tok, &t);
    assert_eq!(seg.len(), 1);
    assert_eq!(seg[0].trim_start(), format!("on the mat.{EOT}"));
    assert!(seg[0].len() <= format!(" on the mat.{EOT}").len());
}

/// Tokens of BOS + `prompt`.
fn enc_prompt_len(enc: &Encoder, prompt: &str) -> usize {
    let t = enc.encode_one(&Example::Text(prompt.into())).unwrap();
    t.ids.len() - 1
}

#[test]
fn alpaca_renders_the_standard_prompt_and_trains_the_output() {
    assert_eq!(
        alpaca_prompt("Name a color.", None),
        "Below is an instruction that describes a task. Write a response that appropriately \
         completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
    );
    assert_eq!(
        alpaca_prompt("Translate.", Some("chat")),
        "Below is an instruction that describes a task, paired with an input that provides further \
         context. Write a response that appropriately completes the request.\n\n### Instruction:\n\
         Translate.\n\n### Input:\nchat\n\n### Response:\n"
    );
    let tok = tiny_assets().tokenizer;
    let enc = tiny_encoder(256);
    for input in [None, Some("a warm day".to_string())] {
        let t = enc
            .encode_one(&Example::Alpaca {
                instruction: "Describe the weather.".into(),
                input: input.clone(),
                output: "The sun is warm today.".into(),
            })
            .unwrap();
        assert_eq!(
            segments(&tok, &t),
            [format!("The sun is warm today.{EOT}")],
            "{input:?}"
        );
    }
}

/// SmolLM2-Instruct's ChatML template: it adds a default system prompt when there is none.
const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Meta-Llama-3-8B-Instruct's template.
const LLAMA3: &str = r#"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"#;

#[test]
fn chatml_masks_exactly_the_assistant_replies() {
    let assets = tiny_assets();
    let tok = assets.tokenizer.clone();
    let enc = Encoder::new(assets.tokenizer, assets.special, Some(CHATML.into()), 256);
    let ex = chat(&[
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "What is 2+2?"),
        ("assistant", "4."),
    ]);
    let Example::Chat(msgs) = &ex else {
        unreachable!()
    };
    let (text, spans) = enc
        .check_chat()
        .unwrap()
        .render_with_spans(msgs, true, EOT, EOT)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
    );
    let spans: Vec<&str> = spans.iter().map(|r| &text[r.clone()]).collect();
    assert_eq!(spans, ["Hello!<|im_end|>\n", "4.<|im_end|>\n"]);
    let t = enc.encode_one(&ex).unwrap();
    assert_eq!(segments(&tok, &t), ["Hello!<|im_end|>\n", "4.<|im_end|>\n"]);
    assert_ne!(
        t.ids[0], 0,
        "no BOS added to chat: the template writes its own"
    );
    assert_eq!(tok.id_to_token(t.ids[0]).unwrap(), "<|im_start|>");

    let all = Encoder::new(tok.clone(), assets.special, Some(CHATML.into()), 256)
        .with_train_on_inputs(true)
        .encode_one(&ex)
        .unwrap();
    assert_eq!(all.ids, t.ids);
    assert!(all.trained[1..].iter().all(|&b| b));
}

#[test]
fn llama3_masks_exactly_the_assistant_replies() {
    let mut tok = tiny_assets().tokenizer;
    let specials = [
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ];
    tok.add_special_tokens(&specials.map(|s| AddedToken::from(s, true)));
    let id = |s: &str| tok.token_to_id(s).unwrap();
    let special = SpecialTokens {
        bos: Some(id("<|begin_of_text|>")),
        eos: Some(id("<|eot_id|>")),
        pad: None,
        add_bos: Some(true),
    };
    let enc = Encoder::new(tok.clone(), special, Some(LLAMA3.into()), 256);
    let ex = chat(&[
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", " Hello! "),
        ("user", "2+2?"),
        ("assistant", "4"),
    ]);
    let Example::Chat(msgs) = &ex else {
        unreachable!()
    };
    let text = enc
        .check_chat()
        .unwrap()
        .render(msgs, false, "<|begin_of_text|>", "<|eot_id|>")
        .unwrap();
    assert_eq!(
        text,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    );
    let t = enc.encode_one(&ex).unwrap();
    assert_eq!(
        t.ids[0],
        id("<|begin_of_text|>"),
        "BOS once, from the template"
    );
    assert_ne!(t.ids[1], t.ids[0]);
    assert_eq!(segments(&tok, &t), ["Hello!<|eot_id|>", "4<|eot_id|>"]);
}

#[test]
fn train_on_inputs_trains_all_but_the_first_token() {
    let enc = tiny_encoder(256).with_train_on_inputs(true);
    for ex in [
        Example::Text("a dog ran.".into()),
        Example::PromptCompletion {
            prompt: "Q: x\nA:".into(),
            completion: " y".into(),
        },
        Example::Alpaca {
            instruction: "Say hi.".into(),
            input: Some("now".into()),
            output: "hi".into(),
        },
        chat(&[("user", "Hi"), ("assistant", "Hello!")]),
    ] {
        let t = enc.encode_one(&ex).unwrap();
        assert!(!t.trained[0]);
        assert!(t.trained[1..].iter().all(|&b| b), "{ex:?}");
        let masked = tiny_encoder(256).encode_one(&ex).unwrap();
        assert_eq!(t.ids, masked.ids, "same tokens either way");
    }
}

#[test]
fn truncation_keeps_the_start() {
    let long = "the cat sat on the mat. ".repeat(20);
    let t = tiny_encoder(7)
        .encode_one(&Example::Text(long.clone()))
        .unwrap();
    let full = tiny_encoder(1000).encode_one(&Example::Text(long)).unwrap();
    assert_eq!(t.ids, full.ids[..7]);
    assert_eq!(t.trained, full.trained[..7]);
    // A prompt that fills max_len leaves nothing to train.
    let t = tiny_encoder(4)
        .encode_one(&Example::PromptCompletion {
            prompt: "a long question with many words".into(),
            completion: " yes".into(),
        })
        .unwrap();
    assert_eq!((t.ids.len(), t.targets()), (4, 0));
}

#[test]
fn bos_follows_the_model() {
    let mut assets = tiny_assets();
    assets.special.add_bos = Some(false);
    let t = Encoder::from_assets(assets, 64)
        .encode_one(&Example::Text("hi".into()))
        .unwrap();
    assert_ne!(t.ids[0], 0, "add_bos_token false: no BOS");
    assert_eq!(*t.ids.last().unwrap(), 0, "EOS still ends the text");
}

#[test]
fn model_problems_are_model_errors() {
    let assets = tiny_assets();
    let ex = chat(&[("user", "Hi"), ("assistant", "Hello!")]);
    let none = Encoder::new(assets.tokenizer.clone(), assets.special, None, 64);
    let Err(EncodeError::Model(msg)) = none.encode_one(&ex) else {
        panic!()
    };
    assert!(
        msg.contains("needs the model's chat template, and this model has none"),
        "{msg}"
    );
    let broken = Encoder::new(
        assets.tokenizer.clone(),
        assets.special,
        Some("{% for %}".into()),
        64,
    );
    let Err(EncodeError::Model(msg)) = broken.encode_one(&ex) else {
        panic!()
    };
    assert!(msg.contains("does not compile"), "{msg}");
    // ...but a text dataset still trains on a model whose template does not compile.
    assert!(broken.encode_one(&Example::Text("hi".into())).is_ok());

    let Err(EncodeError::Model(msg)) = tiny_encoder(64)
        .with_vocab_size(40)
        .encode_one(&Example::Text("the cat".into()))
    else {
        panic!()
    };
    assert!(msg.contains("outside the model's vocab_size 40"), "{msg}");
}

#[test]
fn templates_that_rewrite_earlier_turns_are_reported() {
    // Renders a reply as "[earlier]" once it is no longer the last message (as Qwen3 drops old
    // reasoning): the prefix rendering cannot locate it.
    let rewriting = "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<|im_start|>assistant\n[earlier]<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let assets = tiny_assets();
    let ex = chat(&[
        ("user", "a"),
        ("assistant", "b"),
        ("user", "c"),
        ("assistant", "d"),
    ]);
    let enc = Encoder::new(
        assets.tokenizer.clone(),
        assets.special,
        Some(rewriting.into()),
        64,
    );
    let Err(EncodeError::Model(msg)) = enc.encode_one(&ex) else {
        panic!()
    };
    assert!(
        msg.contains("through messages[1]") && msg.contains("train_on_inputs=true"),
        "{msg}"
    );
    assert!(enc.with_train_on_inputs(true).encode_one(&ex).is_ok());

    // The template's own checks reject the example, not the model.
    let strict = format!("{{% if messages[0].role == 'assistant' %}}{{{{ raise_exception('Conversations must start with a user message') }}}}{{% endif %}}{CHATML}");
    let enc = Encoder::new(assets.tokenizer, assets.special, Some(strict), 64);
    let Err(EncodeError::Example(msg)) = enc.encode_one(&chat(&[("assistant", "x")])) else {
        panic!()
    };
    assert!(
        msg.contains("Conversations must start with a user message"),
        "{msg}"
    );
}

#[test]
fn load_hf_checks_the_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny_model(dir.path(), 3).unwrap();
    let cfg = ModelConfig::load(dir.path()).unwrap();
    let enc = Encoder::load_hf(dir.path(), &cfg, 64).unwrap();
    assert_eq!(enc.path(), dir.path().join("tokenizer.json"));
    assert!(
        enc.check_chat().is_ok(),
        "the tiny model has a ChatML template"
    );
    let examples = [
        Example::Text("a".into()),
        chat(&[("user", "q"), ("assistant", "a")]),
    ];
    assert_eq!(enc.encode(&examples).unwrap().len(), 2);
}
