//! `loractl` against a real daemon: the JSON shapes scripts rely on, and the exit codes.
use super::*;
use lorad_tests::{bin, tiny_model, write_dataset, TestDaemon};
use std::process::{Command, Output};

fn loractl(d: &TestDaemon, args: &[&str]) -> Output {
    Command::new(bin("loractl"))
        .arg("--socket")
        .arg(d.socket())
        .args(args)
        .output()
        .expect("run loractl")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "loractl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn loractl_scripts_a_job_end_to_end() {
    let d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let model = tiny_model().display().to_string();
    let data_s = data.display().to_string();

    // submit prints the id (human) or the record (--json).
    let mut args = vec![
        "submit",
        "--template",
        "basic-fine-tune",
        "--model",
        &model,
        "--data",
        &data_s,
    ];
    let sets: Vec<String> = FAST.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for s in &sets {
        args.extend(["--set", s]);
    }
    let out = loractl(&d, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("submit prints the job id");

    // wait: exit 0 when completed.
    let out = loractl(&d, &["wait", &id.to_string(), "--timeout", "300"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let show = json(&loractl(&d, &["--json", "show", &id.to_string()]));
    assert_eq!(show["id"], id);
    assert_eq!(show["state"], "completed");
    assert_eq!(show["progress"]["step"], 80);
    assert_eq!(show["progress"]["total_steps"], 80);
    assert_eq!(show["settings"]["lr"], 0.01);

    let list = json(&loractl(&d, &["--json", "list"]));
    assert_eq!(list.as_array().map(|a| a.len()), Some(1));
    assert_eq!(list[0]["state"], "completed");

    let metrics = json(&loractl(&d, &["--json", "metrics", &id.to_string()]));
    let points = metrics.as_array().expect("array of points");
    assert_eq!(points.len(), 80);
    for (i, p) in points.iter().enumerate() {
        assert_eq!(p["step"], i as u64 + 1, "step order");
        assert!(p["loss"].as_f64().is_some() && p["lr"].as_f64().is_some());
    }

    let logs = loractl(&d, &["logs", &id.to_string()]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("training finished"));

    // A type error in --set: exit 1 with the daemon's message naming the field; nothing queued.
    let out = loractl(
        &d,
        &[
            "submit",
            "--template",
            "basic-fine-tune",
            "--model",
            &model,
            "--data",
            &data_s,
            "--set",
            "lr=fast",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("'lr'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Usage errors exit 2.
    assert_eq!(
        loractl(&d, &["submit", "--set", "no-equals-sign"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(loractl(&d, &["frobnicate"]).status.code(), Some(2));
    // Unknown job: exit 1.
    assert_eq!(loractl(&d, &["show", "999"]).status.code(), Some(1));
    // cancel of a completed job: exit 1, invalid_state.
    let out = loractl(&d, &["cancel", &id.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_state"));

    // wait on a job that does not end in time: exit 3; a cancelled job: exit 1.
    let long = c_submit(&d, &model, &data_s, "max_steps=100000");
    assert_eq!(
        loractl(&d, &["wait", &long, "--timeout", "1"])
            .status
            .code(),
        Some(3)
    );
    assert!(loractl(&d, &["cancel", &long]).status.success());
    assert_eq!(
        loractl(&d, &["wait", &long, "--timeout", "30"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        json(&loractl(&d, &["--json", "list"]))
            .as_array()
            .map(|a| a.len()),
        Some(2)
    );

    // LORAD_SOCKET picks the daemon when --socket is absent.
    let out = Command::new(bin("loractl"))
        .env("LORAD_SOCKET", d.socket())
        .args(["--json", "status"])
        .output()
        .expect("run");
    assert_eq!(json(&out)["protocol"], 1);
}

fn c_submit(d: &TestDaemon, model: &str, data: &str, set: &str) -> String {
    let out = loractl(
        d,
        &[
            "submit",
            "--template",
            "basic-fine-tune",
            "--model",
            model,
            "--data",
            data,
            "--set",
            set,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
