//! The PEFT exporter through its C entry point, on an adapter trained by lorad's engine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../export-merged/tests/support/mod.rs"]
mod support;

use lorad_plugin::{
    call_typed, check_abi, methods, ExportFormatsRequest, ExportFormatsResponse, ExportRequest,
    ExportResponse, LoradPluginV1, PluginCallError,
};
use std::path::{Path, PathBuf};
use support::*;

fn desc() -> &'static LoradPluginV1 {
    unsafe { check_abi(lorad_export_peft::lorad_plugin_v1()) }.unwrap()
}

fn run(req: &ExportRequest) -> Result<ExportResponse, PluginCallError> {
    unsafe { call_typed(desc(), methods::EXPORT_RUN, req) }
}

struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    job: TrainedJob,
}

fn trained() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("model"), 3);
    let job = train_job(dir.path(), &base, short_settings(3, 0.01));
    Fixture { dir, base, job }
}

fn hidden_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn formats() {
    let f: ExportFormatsResponse =
        unsafe { call_typed(desc(), methods::EXPORT_FORMATS, &ExportFormatsRequest {}) }.unwrap();
    assert_eq!(f.formats.len(), 1);
    assert_eq!(f.formats[0].name, "peft");
}

#[test]
fn final_adapter_is_copied_with_a_model_card() {
    let fx = trained();
    let out = fx.dir.path().join("export");
    let req = export_request(&fx.job, &fx.base, &out, "peft", None);
    let reply = run(&req).unwrap();
    let names = [
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    ];
    assert_eq!(
        reply.files,
        names.map(|n| out.join(n).display().to_string()).to_vec()
    );
    for f in &names[..2] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(fx.job.adapter_dir.join(f)).unwrap(),
            "{f} is copied byte for byte"
        );
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["base_model_name_or_path"],
        fx.base.display().to_string()
    );
    // What lorad (and so PEFT, checked in bench/export_check.sh) computes with it is unchanged.
    let ids = [0u32, 40, 300, 7, 900];
    let a = lorad_logits(&fx.base, Some(&out), &ids);
    let b = lorad_logits(&fx.base, Some(&fx.job.adapter_dir), &ids);
    assert_eq!(rel_err(&a, &b), 0.0);

    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let last = fx.job.metrics.last().unwrap();
    assert!(
        card.contains(&format!("base_model: \"{}\"", fx.base.display())),
        "{card}"
    );
    assert!(card.contains("library_name: peft"), "{card}");
    assert!(card.contains("Optimizer steps: 3 of 3"), "{card}");
    assert!(
        card.contains(&format!("Final training loss: {:.4}", last.loss)),
        "{card}"
    );
    assert!(card.contains("the final adapter"), "{card}");
    assert!(card.contains("| lora_r | 4 |"), "{card}");
    assert!(hidden_entries(fx.dir.path()).is_empty());
}

#[test]
fn checkpoint_card_names_its_step_and_loss() {
    let fx = trained();
    let checkpoint = fx.job.job_dir.join("checkpoints/step-2");
    assert!(checkpoint.is_dir());
    let out = fx.dir.path().join("export-step-2");
    let req = export_request(&fx.job, &fx.base, &out, "peft", Some(&checkpoint));
    run(&req).unwrap();
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(checkpoint.join("adapter_model.safetensors")).unwrap()
    );
    assert!(!out.join("optimizer.safetensors").exists());
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("checkpoint `step-2`"), "{card}");
    assert!(card.contains("Optimizer steps: 2 of 3"), "{card}");
    let loss = fx.job.metrics[1].loss;
    assert!(
        card.contains(&format!("Final training loss: {loss:.4}")),
        "{card}"
    );
}

#[test]
fn missing_or_corrupt_adapter_fails_and_leaves_nothing() {
    let fx = trained();
    let out = fx.dir.path().join("export");
    let mut req = export_request(&fx.job, &fx.base, &out, "peft", None);

    let adapter = fx.dir.path().join("broken");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::copy(
        fx.job.adapter_dir.join("adapter_config.json"),
        adapter.join("adapter_config.json"),
    )
    .unwrap();
    req.adapter_dir = adapter.display().to_string();
    let err = run(&req).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "adapter file {} does not exist",
            adapter.join("adapter_model.safetensors").display()
        )),
        "{err}"
    );
    assert!(!out.exists());

    std::fs::write(adapter.join("adapter_model.safetensors"), [1u8, 2, 3]).unwrap();
    let err = run(&req).unwrap_err().to_string();
    assert!(err.contains("invalid adapter"), "{err}");
    assert!(err.contains("broken/adapter_model.safetensors"), "{err}");
    assert!(!out.exists());
    assert!(hidden_entries(fx.dir.path()).is_empty());
}

#[test]
fn existing_output_or_missing_parent_is_refused() {
    let fx = trained();
    let out = fx.dir.path().join("taken");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let req = export_request(&fx.job, &fx.base, &out, "peft", None);
    let err = run(&req).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");

    let req = export_request(&fx.job, &fx.base, &fx.dir.path().join("a/b"), "peft", None);
    let err = run(&req).unwrap_err().to_string();
    assert!(err.contains("parent directory"), "{err}");
}
