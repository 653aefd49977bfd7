//! The golden check (no Python needed): PEFT's and transformers' logits for a seeded adapter on the
//! tiny model, committed in tests/golden/reference.json by `bench/export_check.sh --update-golden`,
//! against lorad's LoRA forward and against the merged export loaded back through lorad.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use candle_core::{Device, Tensor};
use lorad_plugin::{call_typed, check_abi, methods, ExportRequest, ExportResponse};
use support::golden::{golden_dir, lorad_lora, read_recipe, select, setup, Reference};
use support::{job_record, lorad_logits, rel_err, TrainedJob};

const TOLERANCE: f64 = 1e-4;

fn reference() -> Reference {
    let path = golden_dir().join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run bench/export_check.sh --update-golden",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn tensor(rows: &[Vec<f32>]) -> Tensor {
    Tensor::new(rows.to_vec(), &Device::Cpu).unwrap()
}

#[test]
fn lorad_matches_peft_and_transformers() {
    let recipe = read_recipe();
    let reference = reference();
    assert_eq!(
        reference.recipe, recipe,
        "recipe.json changed since reference.json was generated: run bench/export_check.sh \
         --update-golden"
    );
    let dir = tempfile::tempdir().unwrap();
    let model = setup(dir.path(), &recipe);
    let desc = unsafe { check_abi(lorad_export_merged::lorad_plugin_v1()) }.unwrap();
    let plain = select(
        &lorad_logits(&model, None, &recipe.tokens),
        recipe.vocab_stride,
    );
    for name in recipe.adapters.keys() {
        let peft = tensor(&reference.peft[name]);
        let lora = lorad_lora(dir.path(), &recipe, name);
        let err = rel_err(&lora, &peft);
        assert!(err < TOLERANCE, "{name}: lorad LoRA forward vs PEFT: {err}");
        let effect = rel_err(&plain, &peft);
        assert!(
            effect > 1e-2,
            "{name}: the adapter changes too little ({effect})"
        );

        let adapter = dir.path().join(name).join("adapter");
        let out = dir.path().join(name).join("merged");
        let job = TrainedJob {
            job_dir: dir.path().to_path_buf(),
            adapter_dir: adapter.clone(),
            dataset: dir.path().join("none.jsonl"),
            settings: Default::default(),
            metrics: vec![],
        };
        let req = ExportRequest {
            format: "merged".into(),
            job_dir: dir.path().display().to_string(),
            adapter_dir: adapter.display().to_string(),
            base_model: model.display().to_string(),
            out: out.display().to_string(),
            checkpoint: None,
            trainer_state: None,
            job: job_record(&job, &model),
            metrics: vec![],
        };
        let _: ExportResponse = unsafe { call_typed(desc, methods::EXPORT_RUN, &req) }.unwrap();
        let merged = select(
            &lorad_logits(&out, None, &recipe.tokens),
            recipe.vocab_stride,
        );
        let reference_merged = tensor(&reference.merged[name]);
        let err = rel_err(&merged, &reference_merged);
        assert!(
            err < TOLERANCE,
            "{name}: merged export in lorad vs transformers: {err}"
        );
        let err = rel_err(&reference_merged, &peft);
        assert!(
            err < TOLERANCE,
            "{name}: transformers on the merged export vs PEFT: {err}"
        );
    }
}
