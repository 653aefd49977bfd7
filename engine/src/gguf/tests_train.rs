//! Training on a GGUF base model is training on the model it was converted from: same losses step for
//! step, and an adapter with the same PEFT keys.
use super::fixture::*;
use crate::adapter::load_adapter;
use crate::train::train;
use crate::TrainTask;
use lorad_schema::{JobId, TrainSettings};

fn settings() -> TrainSettings {
    let mut s = TrainSettings::default();
    for (k, v) in [
        ("lr", "0.003"),
        ("max_steps", "4"),
        ("target_modules", "q_proj,k_proj,v_proj,down_proj"),
        ("batch_size", "4"),
        ("lora_r", "4"),
        ("lora_alpha", "8"),
        ("lora_dropout", "0.1"),
        ("warmup_steps", "0"),
        ("max_seq_len", "32"),
        ("device", "cpu"),
    ] {
        s.set(k, v).unwrap();
    }
    s
}

#[test]
fn training_on_gguf_matches_training_on_the_hf_model() {
    let root = tiny_dir();
    let hf = root.path().join("hf");
    let gguf = root.path().join("tiny.gguf");
    // Like the HF tokenizer_config.json, say nothing about BOS, so both prepend it alike.
    write_gguf(
        &hf,
        &gguf,
        &Fixture {
            meta: vec![("tokenizer.ggml.add_bos_token", None)],
            ..Fixture::default()
        },
    );
    let data = root.path().join("data.jsonl");
    let lines: String = (0..16)
        .map(|i| format!("{{\"text\": \"the cat number {i} sat on the mat.\"}}\n"))
        .collect();
    std::fs::write(&data, lines).unwrap();
    let run = |model: &std::path::Path, out: &str| {
        let task = TrainTask {
            job: JobId(1),
            base_model: model.to_path_buf(),
            dataset: data.clone(),
            adapter_dir: root.path().join(out),
            job_dir: root.path().join(format!("job-{out}")),
            settings: settings(),
            resume_from: None,
            pin_resume: false,
        };
        train(&task, &mut |_| {}).unwrap()
    };
    let from_hf = run(&hf, "hf-adapter");
    let from_gguf = run(&gguf, "gguf-adapter");
    assert_eq!(from_gguf.steps, 4);
    for (a, b) in from_hf.losses.iter().zip(&from_gguf.losses) {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs(),
            "{:?} vs {:?}",
            from_hf.losses,
            from_gguf.losses
        );
    }
    let (a, b) = (
        load_adapter(&from_hf.adapter_dir).unwrap(),
        load_adapter(&from_gguf.adapter_dir).unwrap(),
    );
    let mut keys_a: Vec<_> = a.weights.keys().collect();
    let mut keys_b: Vec<_> = b.weights.keys().collect();
    keys_a.sort();
    keys_b.sort();
    assert_eq!(keys_a, keys_b);
}
