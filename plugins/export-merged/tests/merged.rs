//! The merged exporter through its C entry point, on the tiny model: the merged weights loaded back
//! through lorad give the logits of lorad's LoRA forward (base + adapter), from an HF directory and
//! from a GGUF file, single-file and sharded; failures leave nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use lorad_engine::source::ModelSource;
use lorad_export_merged::base::BaseTensors;
use lorad_export_merged::{export_merged, Options};
use lorad_plugin::{
    call_typed, check_abi, methods, ExportFormatsRequest, ExportFormatsResponse, ExportResponse,
    LoradPluginV1, PluginCallError,
};
use std::path::{Path, PathBuf};
use support::*;

/// Token ids within the tiny vocabulary, long enough for attention to matter.
const IDS: [u32; 12] = [0, 17, 260, 301, 5, 900, 44, 512, 1000, 3, 77, 640];

fn desc() -> &'static LoradPluginV1 {
    unsafe { check_abi(lorad_export_merged::lorad_plugin_v1()) }.unwrap()
}

fn recipe() -> AdapterRecipe {
    AdapterRecipe {
        seed: 11,
        r: 4,
        alpha: 8.0,
        use_rslora: false,
        targets: ALL_MODULES.map(str::to_owned).to_vec(),
        a_bound: 0.0625,
        b_bound: 0.05,
    }
}

/// An export request for a hand-made adapter (no training run behind it).
fn request(adapter: &Path, base: &Path, out: &Path) -> lorad_plugin::ExportRequest {
    let job = TrainedJob {
        job_dir: adapter.parent().unwrap().to_path_buf(),
        adapter_dir: adapter.to_path_buf(),
        dataset: PathBuf::from("/data/none.jsonl"),
        settings: Default::default(),
        metrics: vec![],
    };
    lorad_plugin::ExportRequest {
        format: "merged".into(),
        job_dir: job.job_dir.display().to_string(),
        adapter_dir: adapter.display().to_string(),
        base_model: base.display().to_string(),
        out: out.display().to_string(),
        checkpoint: None,
        trainer_state: None,
        job: job_record(&job, base),
        metrics: vec![],
    }
}

/// Hidden entries of `dir`: a temporary an export failed to clean up.
fn hidden(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn run(req: &lorad_plugin::ExportRequest) -> Result<ExportResponse, PluginCallError> {
    unsafe { call_typed(desc(), methods::EXPORT_RUN, req) }
}

/// Asserts the merged model in `out` gives lorad's base + adapter logits, and that the adapter
/// changes them by far more than the tolerance (so the check is not vacuous). Returns the error.
fn check_logits(base: &Path, adapter: &Path, out: &Path) -> f64 {
    let want = lorad_logits(base, Some(adapter), &IDS);
    let got = lorad_logits(out, None, &IDS);
    let plain = lorad_logits(base, None, &IDS);
    let err = rel_err(&got, &want);
    let effect = rel_err(&plain, &want);
    assert!(err < 1e-4, "merged vs LoRA forward: relative error {err}");
    assert!(
        effect > 1e-2,
        "the adapter barely changes the logits ({effect})"
    );
    err
}

#[test]
fn formats_and_wrong_format() {
    let formats: ExportFormatsResponse =
        unsafe { call_typed(desc(), methods::EXPORT_FORMATS, &ExportFormatsRequest {}) }.unwrap();
    assert_eq!(formats.formats[0].name, "merged");
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(dir.path(), dir.path(), &dir.path().join("o"));
    req.format = "zip".into();
    let err = run(&req).unwrap_err().to_string();
    assert!(
        err.contains("bad_request") && err.contains("\"zip\""),
        "{err}"
    );
}

#[test]
fn hf_base_merges_to_the_lora_forward() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("model"), 3);
    let adapter = dir.path().join("adapter");
    write_seeded_adapter(&base, &adapter, &recipe());
    let out = dir.path().join("merged");
    let reply = run(&request(&adapter, &base, &out)).unwrap();

    for f in [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
        assert!(
            reply.files.contains(&out.join(f).display().to_string()),
            "{f} not reported: {:?}",
            reply.files
        );
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float32");
    assert_eq!(config["tie_word_embeddings"], true);
    let merged =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(!merged.contains_key("lm_head.weight"), "tied: no lm_head");
    let original =
        candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(merged.len(), original.len());
    for (name, t) in &original {
        let m = &merged[name];
        assert_eq!(m.dtype(), DType::F32);
        let same = rel_err(m, t) == 0.0;
        let adapted = name.ends_with("_proj.weight");
        assert_eq!(same, !adapted, "{name}: changed = {}", !same);
    }
    check_logits(&base, &adapter, &out);
    // Nothing but `out` is left in the parent.
    assert!(hidden(dir.path()).is_empty(), "{:?}", hidden(dir.path()));
}

#[test]
fn rslora_scale_and_subset_of_modules() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("model"), 5);
    let adapter = dir.path().join("adapter");
    let recipe = AdapterRecipe {
        r: 8,
        alpha: 4.0,
        use_rslora: true,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        b_bound: 0.1,
        ..recipe()
    };
    write_seeded_adapter(&base, &adapter, &recipe);
    let out = dir.path().join("merged");
    run(&request(&adapter, &base, &out)).unwrap();
    check_logits(&base, &adapter, &out);
}

#[test]
fn trained_checkpoint_merges_to_the_lora_forward() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("model"), 3);
    let job = train_job(dir.path(), &base, short_settings(3, 0.01));
    let checkpoint = job.latest_checkpoint();
    let out = dir.path().join("merged");
    let req = export_request(&job, &base, &out, "merged", Some(&checkpoint));
    run(&req).unwrap();
    let want = lorad_logits(&base, Some(&checkpoint), &IDS);
    let got = lorad_logits(&out, None, &IDS);
    assert!(rel_err(&got, &want) < 1e-4);
    assert!(rel_err(&lorad_logits(&base, None, &IDS), &want) > 1e-4);
}

#[test]
fn gguf_base_merges_and_writes_config_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny_model(&dir.path().join("model"), 3);
    let gguf = dir.path().join("tiny.Q8_0.gguf");
    write_tiny_gguf(&hf, &gguf, GgmlDType::Q8_0);
    let adapter = dir.path().join("adapter");
    write_seeded_adapter(&gguf, &adapter, &recipe());
    let out = dir.path().join("merged");
    run(&request(&adapter, &gguf, &out)).unwrap();
    check_logits(&gguf, &adapter, &out);

    // The written config and tokenizer are what lorad read from the GGUF.
    let src = ModelSource::open(&gguf).unwrap();
    let back = ModelSource::open(&out).unwrap();
    let (a, b) = (src.config(), back.config());
    assert_eq!(
        (
            a.hidden_size,
            a.num_hidden_layers,
            a.kv_heads(),
            a.vocab_size
        ),
        (
            b.hidden_size,
            b.num_hidden_layers,
            b.kv_heads(),
            b.vocab_size
        )
    );
    assert_eq!(
        (a.rope().rope_theta, a.rms_norm_eps),
        (b.rope().rope_theta, b.rms_norm_eps)
    );
    assert!(b.tie_word_embeddings);
    assert_eq!((b.bos_token_id, b.eos_token_id), (Some(0), Some(0)));
    let (ta, tb) = (src.tokenizer().unwrap(), back.tokenizer().unwrap());
    let text = "Ada keeps 3 of the red kite. <|im_start|>user\nhi<|im_end|>";
    assert_eq!(
        ta.tokenizer.encode(text, false).unwrap().get_ids(),
        tb.tokenizer.encode(text, false).unwrap().get_ids()
    );
    assert_eq!(ta.chat_template, tb.chat_template);
    assert!(tb.chat_template.is_some());
    assert_eq!(ta.special, tb.special);
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["eos_token"], "<|endoftext|>");
}

#[test]
fn gguf_tensors_read_one_by_one_equal_lorads_loader() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny_model(&dir.path().join("model"), 3);
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&hf, &gguf, GgmlDType::Q8_0);
    let source = ModelSource::open(&gguf).unwrap();
    let all = source.tensors(&Device::Cpu).unwrap();
    let mut one_by_one = BaseTensors::open(&source).unwrap();
    let entries = one_by_one.entries();
    assert_eq!(entries.len(), all.len());
    for e in entries {
        let t = one_by_one.load(&e.name).unwrap();
        assert_eq!(t.dims(), e.shape.as_slice(), "{}", e.name);
        assert_eq!(rel_err(&t, &all[&e.name]), 0.0, "{}", e.name);
    }
}

#[test]
fn sharded_output_loads_and_equals_the_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("model"), 3);
    let adapter = dir.path().join("adapter");
    write_seeded_adapter(&base, &adapter, &recipe());
    let out = dir.path().join("sharded");
    // ~9 MB of f32 in 2 MiB shards (the embedding, 1 MiB, fits).
    let files = export_merged(
        &adapter,
        &base,
        &out,
        &Options {
            shard_bytes: 2 << 20,
        },
    )
    .unwrap();
    assert!(!out.join("model.safetensors").exists());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() > 2, "{shards:?}");
    let n = shards.len();
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(*s, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        assert!(files.contains(&out.join(s)));
    }
    check_logits(&base, &adapter, &out);
}

#[test]
fn missing_adapter_file_fails_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("model"), 3);
    let adapter = dir.path().join("adapter");
    write_seeded_adapter(&base, &adapter, &recipe());
    std::fs::remove_file(adapter.join("adapter_model.safetensors")).unwrap();
    let out = dir.path().join("merged");
    let err = run(&request(&adapter, &base, &out))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter/adapter_model.safetensors does not exist"),
        "{err}"
    );
    assert!(!out.exists());
    assert!(hidden(dir.path()).is_empty(), "{:?}", hidden(dir.path()));
}

#[test]
fn corrupt_adapter_and_missing_parent_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("model"), 3);
    let adapter = dir.path().join("adapter");
    write_seeded_adapter(&base, &adapter, &recipe());

    let err = run(&request(&adapter, &base, &dir.path().join("no/such/out")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("parent directory"), "{err}");

    std::fs::write(
        adapter.join("adapter_model.safetensors"),
        b"not safetensors",
    )
    .unwrap();
    let out = dir.path().join("merged");
    let err = run(&request(&adapter, &base, &out))
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    assert!(!out.exists());
    assert!(hidden(dir.path()).is_empty(), "{:?}", hidden(dir.path()));
}

#[test]
fn adapter_of_another_model_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("model"), 3);
    // An adapter made for a deeper model: layer 9 does not exist in the tiny model's 4 layers.
    let adapter = dir.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    let module = "model.layers.9.self_attn.q_proj";
    let t = |r, c| candle_core::Tensor::ones((r, c), DType::F32, &Device::Cpu).unwrap();
    let tensors = std::collections::BTreeMap::from([
        (lorad_engine::adapter::peft_key(module, 'A'), t(2, 256)),
        (lorad_engine::adapter::peft_key(module, 'B'), t(256, 2)),
    ]);
    lorad_engine::weights::save_tensors(&adapter.join("adapter_model.safetensors"), &tensors)
        .unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    let out = dir.path().join("merged");
    let err = run(&request(&adapter, &base, &out))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no tensor model.layers.9.self_attn.q_proj.weight"),
        "{err}"
    );
    assert!(!out.exists());
}
