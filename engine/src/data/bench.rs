//! The data pipeline benchmark (`bench/data_pipeline.sh`): real training steps on a ~24M-parameter
//! random Llama with a tokenization-heavy dataset (long texts cut to max_seq_len, so every step pays
//! for tokenizing far more text than it trains on), once per `workers` value; reports step time and
//! the time `next_batch` blocked (data_wait_ms).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use super::{DataSource, Encoder, Example, JsonlSource};
use crate::tiny::make_tiny_model;
use crate::train::train;
use crate::weights::{save_tensors, write_text};
use crate::{TrainEvent, TrainTask};
use candle_core::{Device, Tensor};
use lorad_schema::{JobId, TrainSettings};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The tiny model's tokenizer files with a bigger body: hidden 512, 8 layers, MLP 1408, 8 heads
/// (4 KV heads): ~24M parameters.
fn write_model(dir: &Path) {
    make_tiny_model(dir, 7).unwrap();
    let (h, i, layers, heads, kv) = (512, 1408, 8, 8, 4);
    let d = h / heads;
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    for (k, v) in [
        ("hidden_size", h),
        ("intermediate_size", i),
        ("num_hidden_layers", layers),
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv),
        ("head_dim", d),
        ("max_position_embeddings", 4096),
    ] {
        cfg[k] = v.into();
    }
    write_text(&cfg_path, &cfg.to_string()).unwrap();
    let vocab = cfg["vocab_size"].as_u64().unwrap() as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut w = BTreeMap::new();
    let mut mat = |rows: usize, cols: usize| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-0.035f32..0.035))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    };
    w.insert("model.embed_tokens.weight".to_string(), mat(vocab, h));
    for l in 0..layers {
        for (name, rows, cols) in [
            ("self_attn.q_proj", heads * d, h),
            ("self_attn.k_proj", kv * d, h),
            ("self_attn.v_proj", kv * d, h),
            ("self_attn.o_proj", h, heads * d),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            w.insert(format!("model.layers.{l}.{name}.weight"), mat(rows, cols));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(
                format!("model.layers.{l}.{norm}.weight"),
                Tensor::ones(h, candle_core::DType::F32, &Device::Cpu).unwrap(),
            );
        }
    }
    w.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(h, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let params: usize = w.values().map(|t| t.elem_count()).sum();
    eprintln!("bench model: {params} parameters");
    save_tensors(&dir.join("model.safetensors"), &w).unwrap();
}

const WORDS: [&str; 48] = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "a",
    "dog",
    "ran",
    "in",
    "park",
    "my",
    "friend",
    "reads",
    "good",
    "book",
    "birds",
    "sing",
    "morning",
    "we",
    "drink",
    "tea",
    "after",
    "lunch",
    "sun",
    "is",
    "warm",
    "today",
    "she",
    "writes",
    "long",
    "letter",
    "children",
    "play",
    "by",
    "river",
    "quantum",
    "chromodynamics",
    "Zürich",
    "naïve",
    "1987",
    "e-mail",
    "x86_64",
    "(",
    ")",
    ",",
    ".",
    "?",
    "\n",
];

/// `lines` records of `bytes` bytes of text each.
fn write_dataset(path: &Path, lines: usize, bytes: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut out = String::with_capacity(lines * (bytes + 16));
    for _ in 0..lines {
        let mut text = String::with_capacity(bytes + 16);
        while text.len() < bytes {
            text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
            text.push(' ');
        }
        out.push_str(&serde_json::json!({ "text": text }).to_string());
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

#[test]
#[ignore = "benchmark: bench/data_pipeline.sh"]
fn data_pipeline() {
    let (lines, bytes) = (
        env("LORAD_BENCH_LINES", 3000),
        env("LORAD_BENCH_BYTES", 64_000),
    );
    let (steps, warmup) = (env("LORAD_BENCH_STEPS", 12), env("LORAD_BENCH_WARMUP", 2));
    let (batch, seq) = (env("LORAD_BENCH_BATCH", 8), env("LORAD_BENCH_SEQ", 256));
    let workers: Vec<usize> = std::env::var("LORAD_BENCH_WORKERS")
        .unwrap_or_else(|_| format!("0,{}", TrainSettings::default().workers))
        .split(',')
        .map(|w| w.trim().parse().unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_model(&dir.path().join("model"));
    let data = dir.path().join("data.jsonl");
    let t = std::time::Instant::now();
    write_dataset(&data, lines, bytes);
    eprintln!(
        "dataset: {lines} lines x {bytes} bytes ({:.0} MB) in {:.1?}",
        (lines * bytes) as f64 / 1e6,
        t.elapsed()
    );
    // What one batch costs to build on one thread: what workers=0 adds to every step.
    let cfg = crate::config::ModelConfig::load(&dir.path().join("model")).unwrap();
    let encoder = Encoder::load_hf(&dir.path().join("model"), &cfg, seq).unwrap();
    let source = JsonlSource::open(&data).unwrap();
    let t = std::time::Instant::now();
    let probe_batches = 5;
    for raw in source.read(0..probe_batches * batch).unwrap() {
        let ex = Example::parse(&raw.value, None).unwrap();
        encoder.encode_one(&ex).unwrap();
    }
    let build_ms = t.elapsed().as_secs_f64() * 1000.0 / probe_batches as f64;
    eprintln!("one batch ({batch} x {bytes} bytes) tokenizes in {build_ms:.1} ms on one thread");
    let mut rows = Vec::new();
    for &w in &workers {
        let mut s = TrainSettings::default();
        for (k, v) in [
            ("lr", "1e-4".to_string()),
            ("max_steps", steps.to_string()),
            ("batch_size", batch.to_string()),
            ("max_seq_len", seq.to_string()),
            ("device", "cpu".into()),
            ("workers", w.to_string()),
            ("seed", "1".into()),
        ] {
            s.set(k, &v).unwrap();
        }
        let task = TrainTask {
            job: JobId(1),
            base_model: dir.path().join("model"),
            dataset: data.clone(),
            adapter_dir: dir.path().join(format!("adapter-{w}")),
            job_dir: dir.path().join(format!("job-{w}")),
            settings: s.clone(),
            resume_from: None,
            pin_resume: false,
        };
        let mut points = Vec::new();
        train(&task, &mut |e| {
            if let TrainEvent::Step { point } = e {
                points.push(point);
            }
        })
        .unwrap();
        let measured = &points[warmup.min(points.len().saturating_sub(1))..];
        let n = measured.len() as f64;
        let step_ms = measured.iter().map(|p| p.step_ms).sum::<f64>() / n;
        let wait_ms = measured.iter().map(|p| p.data_wait_ms).sum::<f64>() / n;
        let max_wait = measured.iter().map(|p| p.data_wait_ms).fold(0.0, f64::max);
        let tps = measured.iter().map(|p| p.tokens_per_s).sum::<f64>() / n;
        eprintln!(
            "workers={w} prefetch={}: step {step_ms:.1} ms, data wait {wait_ms:.2} ms \
             (max {max_wait:.2}) = {:.2}% of the step, {tps:.0} tokens/s",
            s.prefetch,
            100.0 * wait_ms / step_ms
        );
        rows.push(serde_json::json!({
            "workers": w, "prefetch": s.prefetch, "steps_measured": measured.len(),
            "step_ms": step_ms, "data_wait_ms": wait_ms, "data_wait_max_ms": max_wait,
            "data_wait_pct": 100.0 * wait_ms / step_ms, "tokens_per_s": tps,
        }));
    }
    let report = serde_json::json!({
        "lines": lines, "bytes_per_line": bytes, "batch_size": batch, "max_seq_len": seq,
        "steps": steps, "warmup_steps_excluded": warmup, "tokenize_ms_per_batch_one_thread": build_ms, "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "runs": rows,
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    if let Ok(out) = std::env::var("LORAD_BENCH_OUT") {
        std::fs::write(out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
}
