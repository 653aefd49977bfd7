//! Helpers shared by the integration test binaries: job specs, waiting on a job's state, loss curves.
#![allow(dead_code)]
use lorad_client::blocking::Client;
use lorad_schema::{EventBody, JobId, JobRecord, JobSpec, JobState};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Overrides that make the tiny model learn the 64-line dataset fast: the demo's job.
pub const FAST: &[(&str, &str)] = lorad::demo::DEMO_OVERRIDES;

/// A job spec for `model` and `data` with `overrides`.
pub fn spec(model: &Path, data: &Path, overrides: &[(&str, &str)]) -> JobSpec {
    JobSpec {
        name: Some("test".into()),
        template: "basic-fine-tune".into(),
        base_model: model.display().to_string(),
        dataset: data.display().to_string(),
        overrides: overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        ..JobSpec::default()
    }
}

/// Waits, on a subscription, until `job` reaches a state `until` accepts; returns the record and the
/// states seen on the way (from the start of the job's history).
pub fn wait_for(
    client: &Client,
    job: JobId,
    timeout: Duration,
    until: impl Fn(JobState) -> bool,
) -> (JobRecord, Vec<JobState>) {
    let deadline = Instant::now() + timeout;
    let mut sub = client.subscribe(Some(job), 0).expect("subscribe");
    let mut seen = vec![JobState::Queued];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "job {job} did not reach the expected state in {timeout:?}; saw {seen:?}"
        );
        match sub.next_timeout(left) {
            Ok(Some(event)) => {
                if let EventBody::StateChanged { to, .. } = event.body {
                    seen.push(to);
                    if until(to) {
                        return (client.get(job).expect("get"), seen);
                    }
                }
            }
            Ok(None) => panic!("subscription ended while waiting for job {job}"),
            Err(_) => {
                panic!("job {job} did not reach the expected state in {timeout:?}; saw {seen:?}")
            }
        }
    }
}

/// The demo job's overrides (`FAST`) with `extra` added or replacing the same keys.
pub fn fast_with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    FAST.iter()
        .copied()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
        .chain(extra.iter().copied())
        .collect()
}

/// Checks that `job` recorded every step 1..=steps once and that its losses equal those of the same job
/// run again without interruption (1e-6 relative); returns the id of that reference job.
pub fn assert_matches_uninterrupted(
    c: &Client,
    data: &Path,
    settings: &[(&str, &str)],
    job: JobId,
    steps: u64,
) -> JobId {
    let points = c.metrics(job, None).expect("metrics");
    let order: Vec<u64> = points.iter().map(|p| p.step).collect();
    assert_eq!(
        order,
        (1..=steps).collect::<Vec<_>>(),
        "every step once, in order"
    );
    let straight = c
        .submit(spec(lorad_tests::tiny_model(), data, settings))
        .expect("submit");
    let (straight, _) = wait_for(c, straight.id, Duration::from_secs(120), |s| {
        s.is_terminal()
    });
    assert_eq!(straight.state, JobState::Completed, "{:?}", straight.reason);
    let reference = c.metrics(straight.id, None).expect("metrics");
    for (a, b) in points.iter().zip(&reference) {
        let rel = (a.loss - b.loss).abs() / b.loss.abs().max(1e-12);
        assert!(
            rel < 1e-6,
            "step {}: loss {} vs uninterrupted {}",
            a.step,
            a.loss,
            b.loss
        );
    }
    straight.id
}
