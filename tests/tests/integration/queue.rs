//! Queue control as users drive it: `--after` chains, a failed prerequisite cancelling its
//! dependants, `--not-before`, hold/release, delete; hooks on job events; an ETA that holds after a
//! pause.
use super::*;
use lorad_schema::{now_ms, ErrorCode};
use lorad_tests::{tiny_model, write_dataset, TestDaemon};

fn data(d: &TestDaemon) -> std::path::PathBuf {
    let path = d.dir.path().join("data.jsonl");
    write_dataset(&path, 64);
    path
}

fn submit(
    c: &Client,
    data: &Path,
    extra: &[(&'static str, &'static str)],
    edit: impl FnOnce(&mut JobSpec),
) -> JobId {
    let mut s = spec(tiny_model(), data, &fast_with(extra));
    edit(&mut s);
    c.submit(s).expect("submit").id
}

fn server_error(e: lorad_client::ClientError) -> lorad_schema::WireError {
    match e {
        lorad_client::ClientError::Server(w) => w,
        other => panic!("not a daemon error: {other}"),
    }
}

#[test]
fn after_runs_jobs_in_order_even_with_free_slots() {
    // Two CPU slots: without --after, B and C would start beside A.
    let d = TestDaemon::start_with_config("cpu_slots = 3\ncpu_threads = 1\n");
    let c = d.client();
    let data = data(&d);
    let a = submit(&c, &data, &[("max_steps", "20")], |_| {});
    let b = submit(&c, &data, &[("max_steps", "10")], |s| s.after = vec![a]);
    let cc = submit(&c, &data, &[("max_steps", "10")], |s| s.after = vec![a, b]);
    let (rc, _) = wait_for(&c, cc, Duration::from_secs(180), |s| s.is_terminal());
    assert_eq!(rc.state, JobState::Completed, "{:?}", rc.reason);
    let (ra, rb) = (c.get(a).expect("a"), c.get(b).expect("b"));
    assert_eq!(ra.state, JobState::Completed);
    assert_eq!(rb.state, JobState::Completed);
    let start = |r: &JobRecord| r.first_started_at_ms.expect("started");
    let end = |r: &JobRecord| r.finished_at_ms.expect("finished");
    assert!(start(&rb) >= end(&ra), "b started before a ended");
    assert!(start(&rc) >= end(&rb), "c started before b ended");
    assert_eq!(rc.after, vec![a, b]);
}

#[test]
fn a_failed_or_cancelled_prerequisite_cancels_its_dependants_with_the_reason() {
    let d = TestDaemon::start();
    let c = d.client();
    let data = data(&d);
    // Diverges at once: fails with "loss became ...".
    let bad = submit(
        &c,
        &data,
        &[("lr", "1e9"), ("grad_clip", "0"), ("max_steps", "200")],
        |_| {},
    );
    let dep = submit(&c, &data, &[], |s| s.after = vec![bad]);
    let chained = submit(&c, &data, &[], |s| s.after = vec![dep]);
    let (r, _) = wait_for(&c, chained, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(r.state, JobState::Cancelled);
    let rd = c.get(dep).expect("dep");
    assert_eq!(rd.state, JobState::Cancelled);
    let why = rd.reason.unwrap_or_default();
    assert!(
        why.starts_with(&format!("prerequisite job {bad} failed: loss became")),
        "{why}"
    );
    assert!(
        r.reason
            .unwrap_or_default()
            .starts_with(&format!("prerequisite job {dep} cancelled")),
        "the chain unwinds"
    );
    assert!(rd.first_started_at_ms.is_none(), "never started");

    // A prerequisite cancelled while still queued (held behind a start time) does the same.
    let later = submit(&c, &data, &[], |s| {
        s.not_before_ms = Some(now_ms() + 3_600_000)
    });
    let dep2 = submit(&c, &data, &[], |s| s.after = vec![later]);
    c.cancel(later).expect("cancel");
    let (r2, _) = wait_for(&c, dep2, Duration::from_secs(30), |s| s.is_terminal());
    assert_eq!(r2.state, JobState::Cancelled);
    assert!(r2.reason.unwrap_or_default().starts_with(&format!(
        "prerequisite job {later} cancelled: cancelled by uid"
    )),);

    // Naming a failed job, an unknown one, or the same one twice is refused; nothing is queued.
    let before = c.list(None, false).expect("list").len();
    let e = server_error(
        c.submit({
            let mut s = spec(tiny_model(), &data, FAST);
            s.after = vec![bad];
            s
        })
        .unwrap_err(),
    );
    assert_eq!(e.code, ErrorCode::InvalidState);
    assert!(
        e.message.contains(&format!("job {bad} is failed")),
        "{}",
        e.message
    );
    let e = server_error(
        c.submit({
            let mut s = spec(tiny_model(), &data, FAST);
            s.after = vec![JobId(999)];
            s
        })
        .unwrap_err(),
    );
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(c.list(None, false).expect("list").len(), before);
}

#[test]
fn not_before_holds_a_job_until_its_time() {
    let d = TestDaemon::start();
    let c = d.client();
    let data = data(&d);
    let at = now_ms() + 2_500;
    let job = submit(&c, &data, &[("max_steps", "5")], |s| {
        s.not_before_ms = Some(at)
    });
    std::thread::sleep(Duration::from_millis(1_500));
    let r = c.get(job).expect("get");
    assert_eq!(r.state, JobState::Queued, "started before its time");
    assert_eq!(r.not_before_ms, Some(at));
    let (r, _) = wait_for(&c, job, Duration::from_secs(60), |s| s.is_terminal());
    assert_eq!(r.state, JobState::Completed);
    let started = r.first_started_at_ms.expect("started");
    assert!(started >= at, "started {} ms early", at - started);
    assert!(
        started < at + 3_000,
        "started {} ms late: the supervisor did not wake",
        started - at
    );
}

#[test]
fn hold_keeps_a_queued_job_and_release_lets_it_run() {
    let d = TestDaemon::start();
    let c = d.client();
    let data = data(&d);
    // Behind a start time, so it stays queued while the test holds it.
    let job = submit(&c, &data, &[("max_steps", "5")], |s| {
        s.not_before_ms = Some(now_ms() + 1_000)
    });
    let held = c.hold(job).expect("hold");
    assert_eq!(held.state, JobState::Paused);
    assert!(held.reason.unwrap_or_default().starts_with("held by uid"));
    std::thread::sleep(Duration::from_millis(2_000));
    assert_eq!(
        c.get(job).expect("get").state,
        JobState::Paused,
        "a held job waits"
    );
    let e = server_error(c.hold(job).unwrap_err());
    assert_eq!(e.code, ErrorCode::InvalidState);
    assert_eq!(c.release(job).expect("release").state, JobState::Queued);
    let (r, _) = wait_for(&c, job, Duration::from_secs(60), |s| s.is_terminal());
    assert_eq!(r.state, JobState::Completed);
    // Hold is for queued jobs only: a completed one is refused and unchanged.
    let e = server_error(c.hold(job).unwrap_err());
    assert_eq!(e.code, ErrorCode::InvalidState);
    assert!(
        e.message.contains("only queued jobs can be held"),
        "{}",
        e.message
    );
}

#[test]
fn delete_removes_files_and_record_and_refuses_active_jobs() {
    let d = TestDaemon::start();
    let c = d.client();
    let data = data(&d);
    let long = submit(&c, &data, &[("max_steps", "100000")], |_| {});
    wait_for(&c, long, Duration::from_secs(60), |s| {
        s == JobState::Running
    });
    let e = server_error(c.delete(long, false).unwrap_err());
    assert_eq!(e.code, ErrorCode::InvalidState);
    assert!(e.message.contains("cancel it first"), "{}", e.message);
    let dir = d.state_dir().join("jobs").join(long.to_string());
    assert!(dir.join("job.log").is_file(), "refused: files stay");
    assert_eq!(c.get(long).expect("get").state, JobState::Running);
    c.cancel(long).expect("cancel");

    let job = submit(&c, &data, &[("max_steps", "5")], |_| {});
    let (r, _) = wait_for(&c, job, Duration::from_secs(60), |s| s.is_terminal());
    assert_eq!(r.state, JobState::Completed);
    let dir = d.state_dir().join("jobs").join(job.to_string());
    assert!(dir.join("adapter").is_dir());
    let (removed, record) = c.delete(job, false).expect("delete");
    assert!(record);
    assert_eq!(removed, vec![dir.display().to_string()]);
    assert!(!dir.exists());
    assert_eq!(
        server_error(c.get(job).unwrap_err()).code,
        ErrorCode::NotFound
    );
    assert!(c.metrics(job, None).map(|m| m.is_empty()).unwrap_or(true));
    assert!(
        c.list(None, false)
            .expect("list")
            .iter()
            .all(|j| j.id != job),
        "gone from the list"
    );

    // --keep-record: the files go, the history row stays.
    let kept = submit(&c, &data, &[("max_steps", "5")], |_| {});
    wait_for(&c, kept, Duration::from_secs(60), |s| s.is_terminal());
    let steps = c.metrics(kept, None).expect("metrics").len();
    let (_, record) = c.delete(kept, true).expect("delete --keep-record");
    assert!(!record);
    assert!(!d.state_dir().join("jobs").join(kept.to_string()).exists());
    assert_eq!(c.get(kept).expect("get").state, JobState::Completed);
    assert_eq!(c.metrics(kept, None).expect("metrics").len(), steps);
}

/// A hook that appends its variables to a file; one that fails; one that hangs past its timeout.
#[test]
fn hooks_run_once_per_event_with_the_jobs_variables_and_never_hurt_the_job() {
    let out = tempfile::tempdir().expect("tempdir");
    let seen = out.path().join("seen");
    let config = format!(
        r#"
[[hooks]]
events = ["completed", "failed"]
command = 'echo "config $LORAD_EVENT $LORAD_JOB_ID $LORAD_JOB_NAME $LORAD_JOB_STATE $LORAD_ADAPTER_DIR|$LORAD_JOB_REASON" >> {seen}'

[[hooks]]
events = ["completed"]
command = "echo failing hook output; exit 3"

[[hooks]]
events = ["completed"]
command = "sleep 600"
timeout_s = 1
"#,
        seen = seen.display()
    );
    let d = TestDaemon::start_with_config(&config);
    let c = d.client();
    let data = data(&d);
    let own = format!(
        "echo \"own $LORAD_EVENT $LORAD_JOB_ID\" >> {}",
        seen.display()
    );
    let good = submit(&c, &data, &[("max_steps", "5")], |s| {
        s.name = Some("good-run".into());
        s.on_finish = Some(own.clone());
    });
    let (r, _) = wait_for(&c, good, Duration::from_secs(60), |s| s.is_terminal());
    assert_eq!(r.state, JobState::Completed);
    let bad = submit(
        &c,
        &data,
        &[("lr", "1e9"), ("grad_clip", "0"), ("max_steps", "200")],
        |s| s.name = Some("bad-run".into()),
    );
    let (rb, _) = wait_for(&c, bad, Duration::from_secs(60), |s| s.is_terminal());
    assert_eq!(rb.state, JobState::Failed);

    // The hanging hook is killed after its second; give everything time to finish.
    let mut sub = c.subscribe(Some(good), 0).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut notices = Vec::new();
    while notices.len() < 4 && Instant::now() < deadline {
        if let Ok(Some(e)) = sub.next_timeout(Duration::from_secs(1)) {
            if let EventBody::Notice { text, .. } = e.body {
                if text.starts_with("hook") {
                    notices.push(text);
                }
            }
        }
    }
    assert_eq!(
        notices.len(),
        4,
        "three config hooks and on_finish: {notices:?}"
    );
    std::thread::sleep(Duration::from_millis(1_500));
    let text = std::fs::read_to_string(&seen).expect("the hook wrote");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    let adapter = r.adapter_dir.clone().expect("adapter");
    assert_eq!(
        lines,
        vec![
            format!(
                "config completed {good} good-run completed {adapter}|{}",
                r.reason.clone().unwrap_or_default()
            )
            .as_str(),
            format!(
                "config failed {bad} bad-run failed |{}",
                rb.reason.clone().unwrap_or_default()
            )
            .as_str(),
            format!("own completed {good}").as_str(),
        ],
        "each hook once per event, with the job's variables"
    );
    // The failing and the hanging hook: in the job's log and told to subscribers; the daemon serves.
    let log = std::fs::read_to_string(
        d.state_dir()
            .join("jobs")
            .join(good.to_string())
            .join("job.log"),
    )
    .expect("job.log");
    assert!(log.contains("failing hook output"), "{log}");
    assert!(log.contains("exited with code 3"), "{log}");
    assert!(log.contains("timed out after 1 s"), "{log}");
    c.status().expect("the daemon still answers");
    assert_eq!(c.get(good).expect("get").state, JobState::Completed);
}
