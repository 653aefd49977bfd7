//! `loractl export` with the bundled exporters (peft, merged, zip), and the requests it must refuse
//! without writing anything.
use super::*;
use lorad_schema::ErrorCode;
use lorad_tests::{bin, tiny_model, write_dataset, TestDaemon};
use std::io::Read;
use std::process::Command;

/// A completed 10-step job with checkpoints at steps 5 and 10.
fn trained(d: &TestDaemon) -> JobRecord {
    let c = d.client();
    let data = d.dir.path().join("train.jsonl");
    write_dataset(&data, 32);
    let overrides = fast_with(&[("max_steps", "10"), ("checkpoint_every", "5")]);
    let job = c
        .submit(spec(tiny_model(), &data, &overrides))
        .expect("submit");
    let (done, _) = wait_for(&c, job.id, Duration::from_secs(120), JobState::is_terminal);
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    done
}

fn loractl_export(
    d: &TestDaemon,
    job: JobId,
    format: &str,
    out: &Path,
    extra: &[&str],
) -> std::process::Output {
    Command::new(bin("loractl"))
        .arg("--socket")
        .arg(d.socket())
        .args(["export", &job.to_string(), "--format", format, "--out"])
        .arg(out)
        .args(extra)
        .output()
        .expect("run loractl")
}

#[test]
fn zip_peft_and_merged_exports_of_a_trained_job() {
    let d = TestDaemon::start();
    let job = trained(&d);
    let c = d.client();

    // zip through loractl, of a checkpoint: the archive lists its files and unpacks.
    let out = d.dir.path().join("job.zip");
    let run = loractl_export(
        &d,
        job.id,
        "zip",
        &out,
        &["--checkpoint", "step-5", "--json"],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&run.stdout).expect("json");
    assert_eq!(info["format"], "zip");
    assert_eq!(info["checkpoint"], "step-5");
    let mut archive =
        zip::ZipArchive::new(std::fs::File::open(&out).expect("zip")).expect("archive");
    let names: Vec<String> = archive
        .file_names()
        .map(|n| n.expect("utf-8 name").into_owned())
        .collect();
    for expected in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "trainer_state.json",
        "job.json",
        "metrics.csv",
        "job.log",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }
    let mut csv = String::new();
    archive
        .by_name("metrics.csv")
        .expect("metrics.csv")
        .read_to_string(&mut csv)
        .expect("read");
    assert_eq!(csv.lines().count(), 1 + 10, "{csv}");
    let mut state = String::new();
    archive
        .by_name("trainer_state.json")
        .expect("state")
        .read_to_string(&mut state)
        .expect("read");
    let state: serde_json::Value = serde_json::from_str(&state).expect("trainer_state");
    assert_eq!(state["step"], 5);
    let unpacked = d.dir.path().join("unpacked");
    archive.extract(&unpacked).expect("unpack");
    lorad::worker::adapter::load_adapter(&unpacked.join("adapter"))
        .expect("the zipped adapter loads");

    // peft, of the final adapter: the same tensors as the job's adapter.
    let peft = d.dir.path().join("peft");
    let info = c
        .export(job.id, "peft", &peft.display().to_string(), None)
        .expect("peft export");
    assert!(
        info.files
            .iter()
            .any(|f| f.ends_with("adapter_model.safetensors")),
        "{info:?}"
    );
    let ours = lorad::worker::adapter::load_adapter(Path::new(
        job.adapter_dir.as_deref().expect("adapter"),
    ))
    .expect("job adapter");
    let exported = lorad::worker::adapter::load_adapter(&peft).expect("exported adapter");
    assert_eq!(ours.weights.len(), exported.weights.len());
    for (module, (a, b)) in &ours.weights {
        let (ea, eb) = &exported.weights[module];
        assert_eq!(
            a.to_vec2::<f32>().expect("a"),
            ea.to_vec2::<f32>().expect("a")
        );
        assert_eq!(
            b.to_vec2::<f32>().expect("b"),
            eb.to_vec2::<f32>().expect("b")
        );
    }

    // merged: an HF model directory lorad itself (and any HF loader) can open.
    let merged = d.dir.path().join("merged");
    c.export(job.id, "merged", &merged.display().to_string(), None)
        .expect("merged export");
    lorad::worker::source::check_model(&merged).expect("the merged model opens as an HF model dir");
    assert!(merged.join("tokenizer.json").is_file());

    // Progress went to the job's events and log.
    let log = std::fs::read_to_string(d.state_dir().join(format!("jobs/{}/job.log", job.id)))
        .expect("log");
    for format in ["zip", "peft", "merged"] {
        assert!(
            log.contains(&format!("===== lorad: export {format} started")),
            "{log}"
        );
    }
}

#[test]
fn bad_exports_are_refused_and_write_nothing() {
    let d = TestDaemon::start();
    let job = trained(&d);
    let c = d.client();
    let log_path = d.state_dir().join(format!("jobs/{}/job.log", job.id));
    let log_before = std::fs::read_to_string(&log_path).expect("log");
    let out = d.dir.path().join("never");
    let out_s = out.display().to_string();
    let refused =
        |format: &str, out: &str, checkpoint: Option<&str>, code: ErrorCode, needle: &str| {
            let err = c
                .export(job.id, format, out, checkpoint.map(str::to_string))
                .expect_err("must be refused");
            assert_eq!(err.code(), Some(code), "{err}");
            assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
        };
    for name in [
        "../../etc",
        "step-5/../../x",
        "/etc/passwd",
        "..",
        "step-5/",
    ] {
        refused(
            "zip",
            &out_s,
            Some(name),
            ErrorCode::InvalidArgument,
            "invalid checkpoint name",
        );
    }
    refused(
        "zip",
        &out_s,
        Some("step-999"),
        ErrorCode::NotFound,
        "no checkpoint 'step-999'",
    );
    refused(
        "tar",
        &out_s,
        None,
        ErrorCode::InvalidArgument,
        "unknown export format 'tar' (available:",
    );
    refused(
        "zip",
        "relative/out.zip",
        None,
        ErrorCode::InvalidArgument,
        "must be an absolute path",
    );
    let missing_parent = d.dir.path().join("no/such/dir/out.zip");
    refused(
        "zip",
        &missing_parent.display().to_string(),
        None,
        ErrorCode::InvalidArgument,
        "does not exist",
    );
    let existing = d.dir.path().join("train.jsonl");
    refused(
        "zip",
        &existing.display().to_string(),
        None,
        ErrorCode::InvalidArgument,
        "already exists",
    );

    // loractl says so too, with exit code 1.
    let run = loractl_export(&d, job.id, "zip", &out, &["--checkpoint", "../x"]);
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("invalid checkpoint name"));

    assert!(!out.exists());
    assert!(!missing_parent.exists());
    assert_eq!(
        std::fs::read_to_string(&log_path).expect("log"),
        log_before,
        "refusals must not log an export"
    );
    assert!(c.status().is_ok());
}
