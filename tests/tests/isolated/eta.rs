//! The ETA a user sees after a pause: here, in the binary cargo runs after the others and one test
//! at a time (`serial`), because "within 10% of the time left" needs a job whose speed no other test's
//! training changes halfway.
use super::*;
use lorad_schema::now_ms;
use lorad_tests::system::serial;
use lorad_tests::{tiny_model, write_dataset, TestDaemon};

/// The ETA after a pause: from smoothed step times over active time, so the pause and the reload do
/// not bend it; checked against when the job really ended.
#[test]
fn the_eta_after_a_pause_is_within_ten_percent_of_the_time_left() {
    let _serial = serial();
    let d = TestDaemon::start_with_config("cpu_threads = 1\n");
    let c = d.client();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let steps: u64 = 600;
    let settings = fast_with(&[
        ("max_steps", "600"),
        ("checkpoint_every", "50"),
        ("keep_checkpoints", "2"),
    ]);
    let job = c
        .submit(spec(tiny_model(), &data, &settings))
        .expect("submit")
        .id;
    let mut sub = c.subscribe(Some(job), 0).expect("subscribe");
    let step_at = |sub: &mut lorad_client::blocking::Subscription, want: u64| loop {
        match sub.next_timeout(Duration::from_secs(120)) {
            Ok(Some(e)) => {
                if let EventBody::Metrics { point } = e.body {
                    if point.step >= want {
                        return point;
                    }
                }
            }
            other => panic!("no step {want}: {other:?}"),
        }
    };
    step_at(&mut sub, 50);
    c.pause(job).expect("pause");
    wait_for(&c, job, Duration::from_secs(60), |s| s == JobState::Paused);
    std::thread::sleep(Duration::from_secs(2));
    c.resume(job, None).expect("resume");
    let mut sub = c.subscribe(Some(job), d_last_seq(&c)).expect("subscribe");
    // Well after the resume (the EMA has seen the new attempt), ask three times; each estimate is
    // checked against the time the job then really took.
    let mut estimates = Vec::new();
    let mut probe = 0;
    for frac in [0.3, 0.5, 0.7] {
        let target = (steps as f64 * frac) as u64;
        let point = step_at(&mut sub, target.max(probe + 1));
        probe = point.step;
        let r = c.get(job).expect("get");
        // The record's ETA is as of its last step; count down to now.
        let eta =
            r.progress.eta_s.expect("eta") - (now_ms().saturating_sub(point.at_ms)) as f64 / 1000.0;
        estimates.push((now_ms(), eta, r.progress.step));
    }
    let (done, _) = wait_for(&c, job, Duration::from_secs(600), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed);
    let last = c.metrics(job, Some(steps - 1)).expect("metrics");
    let end = last.last().expect("last step").at_ms;
    let mut errors = Vec::new();
    for (at, eta, step) in &estimates {
        let actual = end.saturating_sub(*at) as f64 / 1000.0;
        let err = (eta - actual).abs() / actual;
        eprintln!(
            "step {step}: eta {eta:.2} s, actual {actual:.2} s, error {:.1}%",
            err * 100.0
        );
        errors.push(err);
    }
    errors.sort_by(f64::total_cmp);
    // The median of three: one estimate thrown by a burst of load on a shared machine does not decide.
    assert!(errors[1] <= 0.10, "ETA errors {errors:?}");
    let p = &done.progress;
    // Paused for 2 s from the moment the pause was committed; the old worker's wind-down (its last
    // step and stop checkpoint) falls inside those 2 s, so the gap between steps is a bit shorter.
    assert!(
        p.wall_s >= p.active_s + 1.0,
        "wall {} s vs active {} s: the pause is not active",
        p.wall_s,
        p.active_s
    );
    assert!(
        p.loss_ema.is_some() && p.loss_slope_per_100.is_some(),
        "{p:?}"
    );
}

fn d_last_seq(c: &Client) -> u64 {
    c.status().expect("status").last_seq
}
