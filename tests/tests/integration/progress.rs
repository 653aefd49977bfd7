//! What users see of a job's progress: a diverging loss stops the job with where to go back to;
//! checkpoints a pause wrote survive pruning.
use super::*;
use lorad_tests::{tiny_model, write_dataset, TestDaemon};

#[test]
fn a_loss_that_becomes_nan_stops_the_job_and_names_the_last_good_checkpoint() {
    let d = TestDaemon::start();
    let c = d.client();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    // A learning rate no model survives: the weights blow up within a few steps.
    let wild = fast_with(&[
        ("lr", "1e9"),
        ("grad_clip", "0"),
        ("max_steps", "200"),
        ("checkpoint_every", "1"),
        ("warmup_steps", "0"),
    ]);
    let job = c
        .submit(spec(tiny_model(), &data, &wild))
        .expect("submit")
        .id;
    let (done, _) = wait_for(&c, job, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Failed, "{:?}", done.reason);
    let reason = done.reason.unwrap_or_default();
    assert!(reason.contains("loss became "), "{reason}");
    let step: u64 = reason
        .split("at step ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no step in {reason}"));
    assert!(step < 200, "{reason}");
    if step > 1 {
        assert!(
            reason.contains(&format!("last good checkpoint step-{}", step - 1)),
            "{reason}"
        );
    }
    // No restart: training on would only repeat it.
    assert_eq!(done.progress.restarts, 0);
}

#[test]
fn the_checkpoint_a_pause_wrote_survives_pruning_and_is_marked() {
    let d = TestDaemon::start();
    let c = d.client();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    // Keep one checkpoint, write one every 3 steps: without pinning the pause's would go at once.
    let settings = fast_with(&[
        ("max_steps", "60"),
        ("checkpoint_every", "3"),
        ("keep_checkpoints", "1"),
    ]);
    let job = c
        .submit(spec(tiny_model(), &data, &settings))
        .expect("submit")
        .id;
    let mut sub = c.subscribe(Some(job), 0).expect("subscribe");
    // Pause once a few steps are done.
    loop {
        match sub.next_timeout(Duration::from_secs(60)) {
            Ok(Some(event)) => {
                if let EventBody::Metrics { point } = event.body {
                    if point.step >= 4 {
                        break;
                    }
                }
            }
            other => panic!("no step 4: {other:?}"),
        }
    }
    c.pause(job).expect("pause");
    // Paused at once; the worker then finishes its step and writes its stop checkpoint.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !c
        .checkpoints(job)
        .expect("checkpoints")
        .iter()
        .any(|k| k.pinned)
    {
        assert!(Instant::now() < deadline, "no stop checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    let at_pause = c.checkpoints(job).expect("checkpoints");
    let pinned: Vec<_> = at_pause.iter().filter(|k| k.pinned).collect();
    let log = || std::fs::read_to_string(d.state_dir().join(format!("jobs/{job}/job.log")));
    assert_eq!(pinned.len(), 1, "{at_pause:?}\n{:?}", log());
    let kept = pinned[0].name.clone();

    c.resume(job, None).expect("resume");
    let (done, _) = wait_for(&c, job, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    let after = c.checkpoints(job).expect("checkpoints");
    let names: Vec<&str> = after.iter().map(|k| k.name.as_str()).collect();
    // The pause's checkpoint, and the newest (keep_checkpoints = 1); nothing else.
    assert_eq!(names, vec![kept.as_str(), "step-60"], "{after:?}");
    assert!(after[0].pinned && !after[1].pinned);
}

#[test]
fn every_template_submits_on_a_model_with_a_short_context() {
    // The tiny model's context is 512 tokens; several templates ask for 1024 or 2048.
    let d = TestDaemon::start();
    let c = d.client();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 8);
    let templates = c.templates().expect("templates");
    assert!(templates.len() >= 8, "{templates:?}");
    let mut lowered = 0;
    for t in &templates {
        let job = JobSpec {
            template: t.name.clone(),
            ..spec(tiny_model(), &data, &[])
        };
        let record = c
            .submit(job)
            .unwrap_or_else(|e| panic!("template {}: {e}", t.name));
        assert!(record.settings.max_seq_len <= 512, "{}", t.name);
        if t.settings.max_seq_len > 512 {
            lowered += 1;
            let reason = record.reason.clone().unwrap_or_default();
            assert_eq!(
                reason,
                format!(
                    "max_seq_len lowered from the template's {} to 512, the model's context",
                    t.settings.max_seq_len
                )
            );
        }
        c.cancel(record.id).expect("cancel");
    }
    assert!(lowered > 0, "no template above the tiny model's context");
    // Asked for explicitly, a length past the context is still refused.
    let explicit = spec(tiny_model(), &data, &[("max_seq_len", "1024")]);
    let err = c
        .submit(explicit)
        .expect_err("explicit max_seq_len past the context");
    assert!(err.to_string().contains("max_seq_len"), "{err}");
}
