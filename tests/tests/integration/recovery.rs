//! A daemon killed with SIGKILL loses nothing it acknowledged.
use super::*;
use lorad_tests::{process_alive, tiny_model, write_dataset, TestDaemon};

#[test]
fn kill9_of_the_daemon_keeps_every_job() {
    let mut d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let c = d.client();

    let done = c
        .submit(spec(tiny_model(), &data, &[("max_steps", "6")]))
        .expect("submit");
    let (done, _) = wait_for(&c, done.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    let done_metrics = c.metrics(done.id, None).expect("metrics");
    assert_eq!(done_metrics.len(), 6);

    let running = c
        .submit(spec(tiny_model(), &data, &[("max_steps", "100000")]))
        .expect("submit");
    let queued = c
        .submit(spec(tiny_model(), &data, &[("max_steps", "3")]))
        .expect("submit");
    let (running, _) = wait_for(&c, running.id, Duration::from_secs(120), |s| {
        s == JobState::Running
    });
    let worker = running.worker_pid.expect("worker pid");
    assert_eq!(
        c.get(queued.id).expect("get").state,
        JobState::Queued,
        "one job at a time"
    );
    drop(c);

    d.kill9();
    // The orphaned worker notices that its daemon is gone and exits by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(worker) {
        assert!(
            Instant::now() < deadline,
            "orphaned worker {worker} still alive"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    d.restart();
    let c = d.client();
    let jobs = c.list(None, false).expect("list");
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    assert_eq!(
        ids,
        vec![done.id, running.id, queued.id],
        "same ids after the restart"
    );
    let by_id = |id: JobId| jobs.iter().find(|j| j.id == id).expect("job").clone();
    assert_eq!(by_id(done.id).state, JobState::Completed);
    assert_eq!(
        c.metrics(done.id, None).expect("metrics"),
        done_metrics,
        "every metric point kept"
    );
    let interrupted = by_id(running.id);
    assert_eq!(interrupted.state, JobState::Failed);
    assert_eq!(
        interrupted.reason.as_deref(),
        Some("interrupted: daemon restarted")
    );

    // The queued job runs after the restart.
    let (after, _) = wait_for(&c, queued.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(after.state, JobState::Completed, "{:?}", after.reason);
    // New ids continue after the old ones.
    let next = c
        .submit(spec(tiny_model(), &data, &[("max_steps", "1")]))
        .expect("submit");
    assert_eq!(next.id.0, queued.id.0 + 1);
}

#[test]
fn sigterm_stops_the_daemon_and_its_worker() {
    let mut d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let c = d.client();
    let job = c
        .submit(spec(tiny_model(), &data, &[("max_steps", "100000")]))
        .expect("submit");
    let (running, _) = wait_for(&c, job.id, Duration::from_secs(120), |s| {
        s == JobState::Running
    });
    let worker = running.worker_pid.expect("worker pid");
    drop(c);

    let started = Instant::now();
    let daemon = d.pid();
    d.stop();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "graceful stop took {:?}",
        started.elapsed()
    );
    assert!(!process_alive(daemon));
    assert!(!process_alive(worker), "the worker outlived its daemon");
    assert!(
        !d.socket().exists(),
        "the socket file is removed on a clean exit"
    );
    assert!(d.daemon_log().contains("SIGTERM"), "{}", d.daemon_log());
}
