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
