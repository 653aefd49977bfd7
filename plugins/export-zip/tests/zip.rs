//! The ZIP exporter through its C entry point, on a job trained by lorad's engine; the archive is read
//! back with the zip crate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../export-merged/tests/support/mod.rs"]
mod support;

use lorad_plugin::{
    call_typed, check_abi, methods, ExportFormatsRequest, ExportFormatsResponse, ExportRequest,
    ExportResponse, LoradPluginV1, PluginCallError,
};
use std::io::Read;
use std::path::{Path, PathBuf};
use support::*;

fn desc() -> &'static LoradPluginV1 {
    unsafe { check_abi(lorad_export_zip::lorad_plugin_v1()) }.unwrap()
}

fn run(req: &ExportRequest) -> Result<ExportResponse, PluginCallError> {
    unsafe { call_typed(desc(), methods::EXPORT_RUN, req) }
}

fn trained() -> (tempfile::TempDir, PathBuf, TrainedJob) {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model(&dir.path().join("model"), 3);
    let job = train_job(dir.path(), &base, short_settings(3, 0.01));
    (dir, base, job)
}

/// Every entry of the archive: name, compression, contents.
fn read_zip(path: &Path) -> Vec<(String, zip::CompressionMethod, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..archive.len())
        .map(|i| {
            let mut f = archive.by_index(i).unwrap();
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).unwrap();
            (f.name().unwrap().to_string(), f.compression(), bytes)
        })
        .collect()
}

fn no_hidden(dir: &Path) {
    let hidden: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}

#[test]
fn formats() {
    let f: ExportFormatsResponse =
        unsafe { call_typed(desc(), methods::EXPORT_FORMATS, &ExportFormatsRequest {}) }.unwrap();
    assert_eq!(f.formats[0].name, "zip");
}

#[test]
fn archive_holds_adapter_state_job_metrics_log_and_manifest() {
    let (dir, base, job) = trained();
    std::fs::write(
        job.job_dir.join("job.log"),
        "== attempt 1\nstep 1 loss 6.9\n",
    )
    .unwrap();
    let out = dir.path().join("job-1.zip");
    let req = export_request(&job, &base, &out, "zip", None);
    let reply = run(&req).unwrap();
    assert_eq!(reply.files, [out.display().to_string()]);

    let entries = read_zip(&out);
    let names: Vec<&str> = entries.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
            "trainer_state.json",
            "job.json",
            "metrics.csv",
            "job.log",
            "MANIFEST.txt"
        ]
    );
    assert!(entries
        .iter()
        .all(|(_, c, _)| *c == zip::CompressionMethod::Deflated));
    let get = |name: &str| &entries.iter().find(|(n, _, _)| n == name).unwrap().2;
    assert_eq!(
        get("adapter/adapter_model.safetensors"),
        &std::fs::read(job.adapter_dir.join("adapter_model.safetensors")).unwrap()
    );
    assert_eq!(
        get("trainer_state.json"),
        &std::fs::read(job.latest_checkpoint().join("trainer_state.json")).unwrap()
    );
    let record: lorad_schema::JobRecord = serde_json::from_slice(get("job.json")).unwrap();
    assert_eq!(record, req.job);
    assert!(String::from_utf8_lossy(get("job.json")).contains("\n  \"settings\": {"));

    let csv = String::from_utf8(get("metrics.csv").clone()).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], lorad_export_zip::contents::METRICS_HEADER);
    assert_eq!(rows.len(), 1 + job.metrics.len());
    for (row, point) in rows[1..].iter().zip(&job.metrics) {
        let cells: Vec<&str> = row.split(',').collect();
        assert_eq!(cells.len(), 10, "{row}");
        assert_eq!(cells[0], point.step.to_string());
        assert_eq!(cells[2].parse::<f64>().unwrap(), point.loss);
        assert_eq!(cells[9], point.at_ms.to_string());
    }
    assert_eq!(get("job.log"), b"== attempt 1\nstep 1 loss 6.9\n");
    let manifest = String::from_utf8(get("MANIFEST.txt").clone()).unwrap();
    assert!(manifest.contains("job: 1 \"export-test\""), "{manifest}");
    assert!(manifest.contains("adapter: final adapter"), "{manifest}");
    assert!(manifest.contains("  metrics.csv  "), "{manifest}");
    no_hidden(dir.path());
}

#[test]
fn checkpoint_without_log_or_state() {
    let (dir, base, job) = trained();
    let checkpoint = job.job_dir.join("checkpoints/step-2");
    let out = dir.path().join("step-2.zip");
    let mut req = export_request(&job, &base, &out, "zip", Some(&checkpoint));
    req.trainer_state = None;
    run(&req).unwrap();
    let entries = read_zip(&out);
    let names: Vec<&str> = entries.iter().map(|(n, _, _)| n.as_str()).collect();
    assert!(!names.contains(&"job.log") && !names.contains(&"trainer_state.json"));
    let manifest = &entries.last().unwrap().2;
    assert!(String::from_utf8_lossy(manifest).contains("adapter: step-2 ("));
}

#[test]
fn failures_leave_nothing_behind() {
    let (dir, base, job) = trained();
    let out = dir.path().join("job.zip");

    let mut req = export_request(&job, &base, &out, "zip", None);
    let adapter = dir.path().join("half");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::copy(
        job.adapter_dir.join("adapter_model.safetensors"),
        adapter.join("adapter_model.safetensors"),
    )
    .unwrap();
    req.adapter_dir = adapter.display().to_string();
    let err = run(&req).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "adapter file {} does not exist",
            adapter.join("adapter_config.json").display()
        )),
        "{err}"
    );
    assert!(!out.exists());

    std::fs::write(
        adapter.join("adapter_config.json"),
        "{\"peft_type\": \"LORA\"}",
    )
    .unwrap();
    std::fs::write(adapter.join("adapter_model.safetensors"), b"garbage").unwrap();
    let err = run(&req).unwrap_err().to_string();
    assert!(err.contains("invalid adapter file"), "{err}");
    assert!(err.contains("half/adapter_model.safetensors"), "{err}");

    let mut req = export_request(&job, &base, &out, "zip", None);
    req.trainer_state = Some(dir.path().join("gone.json").display().to_string());
    let err = run(&req).unwrap_err().to_string();
    assert!(
        err.contains("trainer state") && err.contains("gone.json"),
        "{err}"
    );
    assert!(!out.exists());

    let req = export_request(&job, &base, &dir.path().join("x/y.zip"), "zip", None);
    let err = run(&req).unwrap_err().to_string();
    assert!(err.contains("parent directory"), "{err}");
    no_hidden(dir.path());
}
