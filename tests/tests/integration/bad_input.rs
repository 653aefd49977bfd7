//! Bad input gets a clear error that names the problem, and nothing is queued.
use super::*;
use lorad_schema::ErrorCode;
use lorad_tests::{tiny_model, write_dataset, TestDaemon};

fn refused(c: &Client, spec: JobSpec, needle: &str) {
    let err = c.submit(spec).expect_err("submit must be refused");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    assert!(
        err.to_string().contains(needle),
        "error {err:?} does not mention {needle:?}"
    );
    assert!(
        c.list(None, false).expect("list").is_empty(),
        "a refused submit queued something"
    );
}

#[test]
fn bad_submits_are_refused_with_a_reason() {
    let d = TestDaemon::start();
    let c = d.client();
    let good = d.dir.path().join("good.jsonl");
    write_dataset(&good, 16);

    let mut s = spec(tiny_model(), &good, &[]);
    s.template = "no-such-template".into();
    refused(&c, s, "unknown template 'no-such-template'");

    refused(
        &c,
        spec(&d.dir.path().join("missing-model"), &good, &[]),
        "missing-model",
    );

    let bad_json = d.dir.path().join("bad-json.jsonl");
    let mut text = std::fs::read_to_string(&good).expect("read");
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[6] = "{\"text\": \"unterminated".into();
    text = lines.join("\n");
    std::fs::write(&bad_json, &text).expect("write");
    refused(&c, spec(tiny_model(), &bad_json, &[]), "line 7");

    let no_text = d.dir.path().join("no-text.jsonl");
    lines[6] = "{\"txt\": \"wrong field\"}".into();
    std::fs::write(&no_text, lines.join("\n")).expect("write");
    refused(&c, spec(tiny_model(), &no_text, &[]), "line 7");

    refused(
        &c,
        spec(tiny_model(), &d.dir.path().join("nope.jsonl"), &[]),
        "nope.jsonl",
    );
    refused(&c, spec(tiny_model(), &good, &[("lr", "fast")]), "lr");
    refused(
        &c,
        spec(tiny_model(), &good, &[("no_such_setting", "1")]),
        "no_such_setting",
    );
    refused(
        &c,
        spec(tiny_model(), &good, &[("max_seq_len", "100000")]),
        "max_seq_len",
    );
    refused(&c, spec(tiny_model(), &good, &[("dtype", "bf16")]), "dtype");

    let empty = d.dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").expect("write");
    refused(&c, spec(tiny_model(), &empty, &[]), "empty.jsonl");

    let mixed = d.dir.path().join("mixed.jsonl");
    lines[6] = "{\"prompt\": \"Q\", \"completion\": \"A\"}".into();
    std::fs::write(&mixed, lines.join("\n")).expect("write");
    refused(&c, spec(tiny_model(), &mixed, &[]), "line 7");

    // A model of an architecture lorad does not train.
    let gpt2 = d.dir.path().join("gpt2-model");
    std::fs::create_dir_all(&gpt2).expect("mkdir");
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny_model().join(f), gpt2.join(f)).expect("copy");
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny_model().join("config.json")).expect("read"))
            .expect("json");
    config["model_type"] = "gpt2".into();
    config["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(gpt2.join("config.json"), config.to_string()).expect("write");
    refused(&c, spec(&gpt2, &good, &[]), "gpt2");
}
