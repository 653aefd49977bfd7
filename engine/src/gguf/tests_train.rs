//! Training on a GGUF base model is training on the model it was converted from: same losses step for
//! step, and an adapter with the same PEFT keys.
use super::fixture::*;
use crate::adapter::load_adapter;
use crate::train::train;
use crate::TrainTask;
use candle_core::quantized::GgmlDType;
use lorad_schema::{BaseWeights, JobId, TrainSettings};

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

/// Trains `model` with the base held as `base`; the losses and the adapter's tensors.
fn run_with(
    root: &std::path::Path,
    model: &std::path::Path,
    data: &std::path::Path,
    base: BaseWeights,
    out: &str,
) -> (Vec<f64>, std::collections::BTreeMap<String, Vec<f32>>) {
    let mut settings = settings();
    settings.base_weights = base;
    let task = TrainTask {
        job: JobId(1),
        base_model: model.to_path_buf(),
        dataset: data.to_path_buf(),
        adapter_dir: root.join(out),
        job_dir: root.join(format!("job-{out}")),
        settings,
        resume_from: None,
        pin_resume: false,
    };
    let summary = train(&task, &mut |_| {}).unwrap();
    let adapter = load_adapter(&summary.adapter_dir).unwrap();
    let weights = adapter
        .weights
        .into_iter()
        .map(|(k, (a, b))| {
            let mut v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.extend(b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            (k, v)
        })
        .collect();
    (summary.losses, weights)
}

fn write_data(root: &std::path::Path) -> std::path::PathBuf {
    let data = root.join("data.jsonl");
    let lines: String = (0..16)
        .map(|i| format!("{{\"text\": \"the cat number {i} sat on the mat.\"}}\n"))
        .collect();
    std::fs::write(&data, lines).unwrap();
    data
}

/// A GGUF base kept quantized trains exactly as the same file widened to f32 at load: the blocks are
/// widened per product by the same `to_float` the load uses. Every type people download, with the
/// Q/K rows reordered as blocks (the `llama` permutation) and the embedding (the tied head) quantized.
#[test]
fn a_quantized_base_kept_quantized_trains_exactly_as_widened_at_load() {
    let root = tiny_dir();
    let hf = root.path().join("hf");
    let data = write_data(root.path());
    for q in [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let gguf = root.path().join(format!("tiny-{q:?}.gguf"));
        write_gguf(
            &hf,
            &gguf,
            &Fixture {
                matrices: q,
                embedding: q,
                meta: vec![("tokenizer.ggml.add_bos_token", None)],
                ..Fixture::default()
            },
        );
        let (l32, a32) = run_with(
            root.path(),
            &gguf,
            &data,
            BaseWeights::F32,
            &format!("{q:?}-f32"),
        );
        let (lst, ast) = run_with(
            root.path(),
            &gguf,
            &data,
            BaseWeights::Stored,
            &format!("{q:?}-stored"),
        );
        assert_eq!(l32.len(), 4);
        assert!(l32.iter().all(|l| l.is_finite()), "{q:?}: {l32:?}");
        assert_eq!(l32, lst, "{q:?}: the loss curves differ");
        assert_eq!(a32, ast, "{q:?}: the adapters differ");
        // And it really is kept: the projections hold blocks, a fraction of f32's bytes.
        let source = crate::source::ModelSource::open(&gguf).unwrap();
        let lora = crate::lora::LoraConfig::from_settings(&settings());
        let model = crate::model::Llama::from_source_with(
            &source,
            &lora,
            &mut crate::rng::rng_for(0, 0),
            32,
            &candle_core::Device::Cpu,
            BaseWeights::Stored,
        )
        .unwrap();
        let q_proj = model
            .base_tensors()
            .into_iter()
            .find(|(n, _)| n == "model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .1;
        assert_eq!(q_proj.stored_type(), format!("{q:?}").to_lowercase());
        assert!(q_proj.stored_bytes() * 3 < q_proj.elem_count() * 4, "{q:?}");
    }
}

/// An HF model in bf16 (and f16) kept so trains exactly as the same weights widened at load.
#[test]
fn a_half_precision_base_kept_so_trains_exactly_as_widened_at_load() {
    let root = tiny_dir();
    let hf = root.path().join("hf");
    let data = write_data(root.path());
    for dtype in [candle_core::DType::BF16, candle_core::DType::F16] {
        let dir = root.path().join(format!("hf-{dtype:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&hf).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_owned();
            if path.extension().is_some_and(|e| e == "safetensors") {
                let tensors =
                    candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
                let half: std::collections::HashMap<String, candle_core::Tensor> = tensors
                    .into_iter()
                    .map(|(k, t)| (k, t.to_dtype(dtype).unwrap()))
                    .collect();
                candle_core::safetensors::save(&half, dir.join(&name)).unwrap();
            } else {
                std::fs::copy(&path, dir.join(&name)).unwrap();
            }
        }
        let (l32, a32) = run_with(
            root.path(),
            &dir,
            &data,
            BaseWeights::F32,
            &format!("{dtype:?}-f32"),
        );
        let (lst, ast) = run_with(
            root.path(),
            &dir,
            &data,
            BaseWeights::Stored,
            &format!("{dtype:?}-stored"),
        );
        assert!(l32.iter().all(|l| l.is_finite()), "{dtype:?}: {l32:?}");
        assert_eq!(l32, lst, "{dtype:?}: the loss curves differ");
        assert_eq!(a32, ast, "{dtype:?}: the adapters differ");
    }
}
