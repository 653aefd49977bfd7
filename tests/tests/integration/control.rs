//! Job control: pause (hold), resume, retry, set_priority, checkpoints, and the refusals.
use super::*;
use lorad_schema::ErrorCode;
use lorad_tests::{tiny_model, write_dataset, TestDaemon};

/// The demo's overrides with `extra` on top (later keys win).
fn fast(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut o: Vec<_> = FAST
        .iter()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
        .copied()
        .collect();
    o.extend_from_slice(extra);
    o
}

fn code(err: lorad_client::ClientError) -> ErrorCode {
    match err {
        lorad_client::ClientError::Server(w) => w.code,
        other => panic!("expected a daemon error, got {other}"),
    }
}

/// A job that runs until cancelled, started and running: it keeps later jobs queued.
fn blocker(c: &Client, data: &Path) -> JobId {
    let long = c
        .submit(spec(tiny_model(), data, &[("max_steps", "100000")]))
        .expect("submit");
    wait_for(c, long.id, Duration::from_secs(120), |s| {
        s == JobState::Running
    });
    long.id
}

#[test]
fn pause_holds_a_queued_job_and_priority_reorders_the_queue() {
    let d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let c = d.client();
    let long = blocker(&c, &data);

    let short = fast(&[("max_steps", "3")]);
    let held = c.submit(spec(tiny_model(), &data, &short)).expect("submit");
    let low = c.submit(spec(tiny_model(), &data, &short)).expect("submit");
    let high = c.submit(spec(tiny_model(), &data, &short)).expect("submit");

    let paused = c.pause(held.id).expect("pause");
    assert_eq!(paused.state, JobState::Paused);
    assert_eq!(
        code(c.pause(held.id).expect_err("pause of a paused job")),
        ErrorCode::InvalidState
    );
    let raised = c.set_priority(high.id, 5).expect("set_priority");
    assert_eq!((raised.priority, raised.state), (5, JobState::Queued));

    // Bad checkpoint names are refused and the job stays paused.
    assert_eq!(
        code(
            c.resume(held.id, Some("../x".into()))
                .expect_err("resume ../x")
        ),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(
            c.resume(held.id, Some("step-99".into()))
                .expect_err("resume step-99")
        ),
        ErrorCode::NotFound
    );
    let still = c.get(held.id).expect("get");
    assert_eq!(still.state, JobState::Paused);
    assert_eq!(still.resume_checkpoint, None);

    c.cancel(long).expect("cancel");
    let (high_done, _) = wait_for(&c, high.id, Duration::from_secs(120), |s| s.is_terminal());
    let (low_done, _) = wait_for(&c, low.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(
        high_done.state,
        JobState::Completed,
        "{:?}",
        high_done.reason
    );
    assert_eq!(low_done.state, JobState::Completed, "{:?}", low_done.reason);
    assert!(
        high_done.started_at_ms < low_done.started_at_ms,
        "the raised job starts first: {:?} vs {:?}",
        high_done.started_at_ms,
        low_done.started_at_ms
    );

    // The held job never started while the queue drained.
    let held_now = c.get(held.id).expect("get");
    assert_eq!(held_now.state, JobState::Paused);
    assert_eq!(held_now.started_at_ms, None);
    assert_eq!(held_now.progress.step, 0);

    let resumed = c.resume(held.id, None).expect("resume");
    assert_eq!(resumed.state, JobState::Queued);
    let (done, seen) = wait_for(&c, held.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    assert_eq!(
        seen,
        vec![
            JobState::Queued,
            JobState::Paused,
            JobState::Queued,
            JobState::Initializing,
            JobState::Running,
            JobState::Completed
        ]
    );

    // A completed job refuses pause, resume, retry and set_priority, and nothing changes.
    let before = c.get(done.id).expect("get");
    assert_eq!(
        code(c.pause(done.id).expect_err("pause")),
        ErrorCode::InvalidState
    );
    assert_eq!(
        code(c.resume(done.id, None).expect_err("resume")),
        ErrorCode::InvalidState
    );
    assert_eq!(
        code(c.retry(done.id).expect_err("retry")),
        ErrorCode::InvalidState
    );
    assert_eq!(
        code(c.set_priority(done.id, 9).expect_err("set_priority")),
        ErrorCode::InvalidState
    );
    assert_eq!(c.get(done.id).expect("get"), before);
    assert_eq!(
        code(c.pause(JobId(999)).expect_err("pause of no job")),
        ErrorCode::NotFound
    );
}

#[test]
fn retry_requeues_a_cancelled_job_and_checkpoints_are_listed() {
    let d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let c = d.client();

    // checkpoint_every=2 over 6 steps: step-2 and step-4 during training, step-6 at the end.
    let job = c
        .submit(spec(
            tiny_model(),
            &data,
            &fast(&[("max_steps", "6"), ("checkpoint_every", "2")]),
        ))
        .expect("submit");
    let (done, _) = wait_for(&c, job.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    // A temporary directory of a checkpoint being written is never listed.
    let ckpt_root = d.state_dir().join(format!("jobs/{}/checkpoints", job.id));
    std::fs::create_dir_all(ckpt_root.join(".tmp-step-8-1")).expect("mkdir");
    let list = c.checkpoints(job.id).expect("checkpoints");
    let names: Vec<&str> = list.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["step-2", "step-4", "step-6"]);
    for ck in &list {
        assert_eq!(ck.name, format!("step-{}", ck.step));
        assert!(
            Path::new(&ck.path).join("trainer_state.json").is_file(),
            "{ck:?}"
        );
        assert!(ck.created_at_ms > 0);
    }

    // Retry: a queued job cancelled before it ran comes back to the queue and completes.
    let long = blocker(&c, &data);
    let x = c
        .submit(spec(tiny_model(), &data, &fast(&[("max_steps", "3")])))
        .expect("submit");
    assert_eq!(c.cancel(x.id).expect("cancel").state, JobState::Cancelled);
    assert_eq!(
        code(
            c.set_priority(x.id, 1)
                .expect_err("set_priority of a cancelled job")
        ),
        ErrorCode::InvalidState
    );
    let retried = c.retry(x.id).expect("retry");
    assert_eq!(retried.state, JobState::Queued);
    assert_eq!(retried.resume_checkpoint, None);
    assert_eq!(
        code(c.retry(x.id).expect_err("retry of a queued job")),
        ErrorCode::InvalidState
    );
    assert_eq!(c.checkpoints(x.id).expect("checkpoints"), vec![]);
    c.cancel(long).expect("cancel");
    let (x_done, _) = wait_for(&c, x.id, Duration::from_secs(120), |s| {
        s == JobState::Completed || s == JobState::Failed
    });
    assert_eq!(x_done.state, JobState::Completed, "{:?}", x_done.reason);
}

fn loractl(d: &TestDaemon, args: &[&str]) -> std::process::Output {
    std::process::Command::new(lorad_tests::bin("loractl"))
        .arg("--socket")
        .arg(d.socket())
        .args(args)
        .output()
        .expect("run loractl")
}

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "loractl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn loractl_job_control_commands() {
    let d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let c = d.client();
    let long = blocker(&c, &data);
    let x = c
        .submit(spec(
            tiny_model(),
            &data,
            &fast(&[("max_steps", "4"), ("checkpoint_every", "2")]),
        ))
        .expect("submit");
    let id = x.id.to_string();

    assert_eq!(
        stdout(&loractl(&d, &["pause", &id])),
        format!("job {id} paused\n")
    );
    let rec: serde_json::Value =
        serde_json::from_str(&stdout(&loractl(&d, &["--json", "priority", &id, "-3"])))
            .expect("json");
    assert_eq!(
        (rec["priority"].as_i64(), rec["state"].as_str()),
        (Some(-3), Some("paused"))
    );
    let bad = loractl(&d, &["resume", &id, "--checkpoint", "../x"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid_argument"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert_eq!(
        stdout(&loractl(&d, &["resume", &id])),
        format!("job {id} queued\n")
    );
    assert_eq!(
        stdout(&loractl(&d, &["checkpoints", &id])),
        "no checkpoints\n"
    );
    c.cancel(long).expect("cancel");
    let (done, _) = wait_for(&c, x.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);

    let list: serde_json::Value =
        serde_json::from_str(&stdout(&loractl(&d, &["--json", "checkpoints", &id]))).expect("json");
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["step-2", "step-4"]);
    let human = stdout(&loractl(&d, &["checkpoints", &id]));
    assert!(
        human.starts_with("NAME") && human.contains("step-4"),
        "{human}"
    );
    assert_eq!(loractl(&d, &["retry", &id]).status.code(), Some(1));
    assert_eq!(loractl(&d, &["pause", "999"]).status.code(), Some(1));
    assert_eq!(loractl(&d, &["priority", &id]).status.code(), Some(2));
}
