//! A daemon killed with SIGKILL loses nothing it acknowledged.
use super::*;
use lorad_client::blocking::Client;
use lorad_tests::{process_alive, tiny_model, write_dataset, TestDaemon};

#[test]
fn kill9_of_the_daemon_keeps_every_job_and_resumes_the_running_one() {
    let mut d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let c = d.client();
    let resumable = fast_with(&[("max_steps", "40"), ("checkpoint_every", "5")]);

    let done = c
        .submit(spec(tiny_model(), &data, &[("max_steps", "6")]))
        .expect("submit");
    let (done, _) = wait_for(&c, done.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    let done_metrics = c.metrics(done.id, None).expect("metrics");
    assert_eq!(done_metrics.len(), 6);

    let running = c
        .submit(spec(tiny_model(), &data, &resumable))
        .expect("submit");
    let queued = c
        .submit(spec(tiny_model(), &data, &[("max_steps", "3")]))
        .expect("submit");
    let (running, _) = wait_for(&c, running.id, Duration::from_secs(120), |s| {
        s == JobState::Running
    });
    let worker = running.worker_pid.expect("worker pid");
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.get(running.id).expect("get").progress.step < 12 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
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
    assert_eq!(jobs[0].state, JobState::Completed);
    assert_eq!(
        c.metrics(done.id, None).expect("metrics"),
        done_metrics,
        "every metric point kept"
    );

    // The interrupted job goes first, resumes from its checkpoint and completes; then the queued one.
    let (resumed, _) = wait_for(&c, running.id, Duration::from_secs(120), |s| {
        s.is_terminal()
    });
    assert_eq!(
        resumed.state,
        JobState::Completed,
        "{:?}\n{}",
        resumed.reason,
        d.daemon_log()
    );
    let (after, _) = wait_for(&c, queued.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(after.state, JobState::Completed, "{:?}", after.reason);
    let log = std::fs::read_to_string(d.state_dir().join(format!("jobs/{}/job.log", running.id)))
        .expect("log");
    assert_eq!(
        log.matches("===== lorad: worker started").count(),
        2,
        "{log}"
    );
    assert!(
        log.contains("daemon restarted; resuming from step-"),
        "{log}"
    );

    // Every step once, and the same losses as an uninterrupted run of the same job.
    let straight = assert_matches_uninterrupted(&c, &data, &resumable, running.id, 40);
    // New ids continue after the old ones.
    assert_eq!(straight.0, queued.id.0 + 1);
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

    // The worker checkpointed the step it was on before exiting: after `systemctl restart`, nothing is
    // recomputed, and the job continues from there.
    d.restart();
    let c = d.client();
    let record = c.get(job.id).expect("get");
    let last = c
        .checkpoints(job.id)
        .expect("checkpoints")
        .last()
        .map(|k| k.step)
        .expect("a checkpoint on SIGTERM");
    assert_eq!(
        last,
        c.metrics(job.id, None).expect("metrics").len() as u64,
        "no step lost"
    );
    assert!(
        record.state == JobState::Queued || record.state.is_active(),
        "{record:?}"
    );
    c.cancel(job.id).expect("cancel");
}

/// Waits until the job runs in a worker other than `not`, returns its pid.
fn running_worker(c: &Client, job: JobId, not: Option<u32>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c.get(job).expect("get");
        if r.state == JobState::Running && r.progress.step >= 2 {
            if let Some(pid) = r.worker_pid.filter(|p| Some(*p) != not) {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "job {job} never ran in a new worker: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_worker_is_restarted_until_max_restarts() {
    let d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let c = d.client();
    let settings = fast_with(&[
        ("max_steps", "30"),
        ("checkpoint_every", "2"),
        ("max_restarts", "1"),
    ]);
    let kill = |pid: u32| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill")
    };

    // One crash: restarted from its checkpoint, completes, every step once.
    let job = c
        .submit(spec(tiny_model(), &data, &settings))
        .expect("submit");
    let first = running_worker(&c, job.id, None);
    kill(first);
    let (done, seen) = wait_for(&c, job.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    assert!(
        seen.windows(2)
            .any(|w| w == [JobState::Running, JobState::Queued]),
        "{seen:?}"
    );
    assert_eq!(done.progress.restarts, 1);
    let steps: Vec<u64> = c
        .metrics(job.id, None)
        .expect("metrics")
        .iter()
        .map(|p| p.step)
        .collect();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>());
    let log = std::fs::read_to_string(d.state_dir().join(format!("jobs/{}/job.log", job.id)))
        .expect("log");
    assert!(
        log.contains("crashed: worker was killed by signal 9"),
        "{log}"
    );

    // Two crashes in a row with max_restarts=1: failed, naming the cause.
    let job = c
        .submit(spec(tiny_model(), &data, &settings))
        .expect("submit");
    let first = running_worker(&c, job.id, None);
    kill(first);
    let second = running_worker(&c, job.id, Some(first));
    kill(second);
    let (failed, _) = wait_for(&c, job.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(failed.state, JobState::Failed);
    let reason = failed.reason.unwrap_or_default();
    assert!(
        reason.contains("killed by signal 9") && reason.contains("gave up after 1 restarts"),
        "{reason}"
    );
}

#[test]
fn a_hung_worker_is_killed_and_the_job_completes() {
    let d = TestDaemon::start_with_env(&[("LORAD_TEST_HANG_AT_STEP", "7")]);
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let c = d.client();
    let settings = fast_with(&[
        ("max_steps", "12"),
        ("checkpoint_every", "3"),
        ("stall_timeout", "2"),
    ]);
    let job = c
        .submit(spec(tiny_model(), &data, &settings))
        .expect("submit");
    let hung = running_worker(&c, job.id, None);
    let started = Instant::now();
    // Killed within stall_timeout + the kill grace (3 s), plus scheduling slack.
    while process_alive(hung) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "hung worker {hung} not killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (done, _) = wait_for(&c, job.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    assert_eq!(done.progress.restarts, 1);
    let steps: Vec<u64> = c
        .metrics(job.id, None)
        .expect("metrics")
        .iter()
        .map(|p| p.step)
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    let log = std::fs::read_to_string(d.state_dir().join(format!("jobs/{}/job.log", job.id)))
        .expect("log");
    let separators: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("===== lorad:"))
        .collect();
    assert_eq!(separators.len(), 2, "{log}");
    assert!(
        separators[1].contains("stalled") && separators[1].contains("resuming from step-6"),
        "{log}"
    );
}

#[test]
fn pause_checkpoints_and_resume_continues_the_same_loss_curve() {
    let d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let c = d.client();
    let settings = fast_with(&[("max_steps", "40")]);
    let job = c
        .submit(spec(tiny_model(), &data, &settings))
        .expect("submit");
    let worker = running_worker(&c, job.id, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.get(job.id).expect("get").progress.step < 8 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let paused = c.pause(job.id).expect("pause");
    assert_eq!(paused.state, JobState::Paused);
    let k = paused.progress.step;
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(worker) {
        assert!(Instant::now() < deadline, "worker still alive after pause");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The worker checkpointed at or after the step it was at when paused.
    let checkpoints = c.checkpoints(job.id).expect("checkpoints");
    let last = checkpoints.last().expect("a checkpoint written on pause");
    assert!(
        last.step >= k && last.step < 40,
        "checkpoint {} for pause at {k}",
        last.step
    );
    assert_eq!(c.get(job.id).expect("get").state, JobState::Paused);

    c.resume(job.id, None).expect("resume");
    let (done, _) = wait_for(&c, job.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    assert_eq!(done.id, job.id);
    let log = std::fs::read_to_string(d.state_dir().join(format!("jobs/{}/job.log", job.id)))
        .expect("log");
    assert!(
        log.contains(&format!("resuming from {}", last.name)),
        "{log}"
    );

    assert_matches_uninterrupted(&c, &data, &settings, job.id, 40);
}
