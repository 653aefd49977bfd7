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

/// `dest` gets a copy of every file of the model directory `src`.
fn copy_model(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).expect("mkdir");
    for entry in std::fs::read_dir(src).expect("model dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dest.join(entry.file_name())).expect("copy");
    }
}

#[test]
fn runaway_lines_and_truncated_weights_are_refused_at_submit_and_in_the_worker() {
    let d = TestDaemon::start();
    let c = d.client();
    let good = d.dir.path().join("good.jsonl");
    write_dataset(&good, 16);

    // A 50 MB line: refused at submit, reading no more than the limit.
    let long = d.dir.path().join("long.jsonl");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&long).expect("create"));
        f.write_all(std::fs::read(&good).expect("read").as_slice())
            .expect("write");
        f.write_all(b"{\"text\": \"").expect("write");
        f.write_all(&vec![b'a'; 50 << 20]).expect("write");
        f.write_all(b"\"}\n").expect("write");
        f.flush().expect("flush");
    }
    let t = Instant::now();
    refused(
        &c,
        spec(tiny_model(), &long, &[]),
        "line 17: the line is longer than 8 MiB",
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    // A lower limit is a setting.
    refused(
        &c,
        spec(tiny_model(), &long, &[("max_line_bytes", "1024")]),
        "line 17: the line is longer than 1 KiB",
    );

    // A truncated safetensors file: refused at submit, naming the file and both sizes.
    let model = d.dir.path().join("truncated-model");
    copy_model(tiny_model(), &model);
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("read");
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).expect("truncate");
    refused(&c, spec(&model, &good, &[]), "truncated");

    // A dataset that grows a runaway line after submit: the worker refuses it too, by line. The job
    // waits behind a long one (one job runs at a time), held, while its dataset grows.
    let busy = c
        .submit(spec(tiny_model(), &good, &[("max_steps", "100000")]))
        .expect("submit");
    let later = d.dir.path().join("later.jsonl");
    std::fs::copy(&good, &later).expect("copy");
    let job = c
        .submit(spec(tiny_model(), &later, &[("max_steps", "2")]))
        .expect("submit");
    let held = c.pause(job.id).expect("hold");
    assert_eq!(held.state, JobState::Paused, "held while queued");
    std::fs::copy(&long, &later).expect("grow");
    c.resume(job.id, None).expect("resume");
    c.cancel(busy.id).expect("cancel the long job");
    let (done, _) = wait_for(&c, job.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Failed, "{:?}", done.reason);
    let reason = done.reason.unwrap_or_default();
    assert!(
        reason.contains("line 17: the line is longer than 8 MiB"),
        "{reason}"
    );
}
