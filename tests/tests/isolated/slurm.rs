//! The Slurm executor against a real single-node Slurm (tests/slurm/up.sh: munge, slurmctld and slurmd
//! from Debian's packages, configured for this host). As root these bring the cluster up themselves;
//! where that cannot be done (not root, no apt) they print why they were skipped, unless
//! `LORAD_REQUIRE_SLURM=1` (CI) makes that a failure.
use super::*;
use lorad_tests::system::{is_root, serial};
use lorad_tests::{bin, tiny_model, write_dataset, TestDaemon};
use std::process::Command;
use std::sync::OnceLock;

/// Whether the cluster is up (brought up once per test process).
fn cluster_or_skip() -> bool {
    static UP: OnceLock<Result<(), String>> = OnceLock::new();
    let up = UP.get_or_init(|| {
        if !is_root() {
            return Err("needs root (installs and starts Slurm)".into());
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("slurm/up.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    });
    match up {
        Ok(()) => true,
        Err(why) if std::env::var("LORAD_REQUIRE_SLURM").as_deref() == Ok("1") => {
            panic!("Slurm is required (LORAD_REQUIRE_SLURM=1): {why}")
        }
        Err(why) => {
            println!("skipped: no Slurm: {why}");
            false
        }
    }
}

fn scontrol(args: &[&str]) -> String {
    let out = Command::new("scontrol")
        .args(args)
        .output()
        .expect("scontrol");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `scontrol -o show job ID`'s `JobState`, or None once Slurm forgot the job.
fn slurm_state(slurm_id: u64) -> Option<String> {
    let line = scontrol(&["-o", "show", "job", &slurm_id.to_string()]);
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix("JobState="))
        .map(str::to_string)
}

/// Slurm jobs of lorad job `id` that are pending or running (by name, lorad-ID).
fn live_slurm_jobs(id: JobId) -> Vec<String> {
    let out = Command::new("squeue")
        .args(["-h", "-n", &format!("lorad-{id}"), "-o", "%i %T"])
        .output()
        .expect("squeue");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until the job runs on Slurm and has done at least `step` steps; returns the Slurm job id.
fn running_on_slurm(c: &Client, id: JobId, step: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let job = c.get(id).expect("get");
        if let Some(s) = &job.progress.slurm {
            if job.progress.step >= step {
                return s.job_id;
            }
        }
        assert!(
            !job.state.is_terminal(),
            "job {id} ended before step {step}: {:?} {:?}",
            job.state,
            job.reason
        );
        assert!(
            Instant::now() < deadline,
            "job {id} not at step {step} on Slurm: {job:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `scontrol requeue`, then, once Slurm has put the job back (it holds a requeued job back for its
/// cred_expire), `update starttime=now`, as an admin would, so that it runs again at once.
fn requeue(slurm_id: u64) {
    let out = scontrol(&["requeue", &slurm_id.to_string()]);
    assert!(!out.contains("error"), "requeue: {out}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let shown = scontrol(&["-o", "show", "job", &slurm_id.to_string()]);
        if shown.contains("Restarts=1") && shown.contains("JobState=PENDING") {
            scontrol(&["update", &format!("jobid={slurm_id}"), "starttime=now"]);
            return;
        }
        if shown.contains("Restarts=1") && shown.contains("JobState=RUNNING") {
            return;
        }
        assert!(Instant::now() < deadline, "not requeued: {shown}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A daemon and the 64-line dataset in its directory.
fn daemon_and_data() -> (TestDaemon, std::path::PathBuf) {
    let d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    (d, data)
}

/// A settings list: `FAST` plus these, on Slurm.
fn on_slurm(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut s = fast_with(extra);
    s.push(("executor", "slurm"));
    s
}

#[test]
fn a_slurm_job_streams_to_watch_and_equals_the_same_job_run_here() {
    if !cluster_or_skip() {
        return;
    }
    let _serial = serial();
    let (d, data) = daemon_and_data();
    let c = d.client();
    let settings = on_slurm(&[("max_steps", "30"), ("checkpoint_every", "10")]);
    let job = c
        .submit(spec(tiny_model(), &data, &settings))
        .expect("submit");
    // `loractl watch`, piped: one line per update until the job ends.
    let watch = Command::new(bin("loractl"))
        .args(["--socket", &d.socket().display().to_string(), "watch"])
        .arg(job.id.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("loractl watch");
    let slurm_id = running_on_slurm(&c, job.id, 0);
    let shown = scontrol(&["-o", "show", "job", &slurm_id.to_string()]);
    assert!(
        shown.contains(&format!("JobName=lorad-{}", job.id)),
        "Slurm knows the job: {shown}"
    );
    let (done, _) = wait_for(&c, job.id, Duration::from_secs(180), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    assert_eq!(done.progress.device.as_deref(), Some("slurm"));
    let out = watch.wait_with_output().expect("watch output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "watch: {text}");
    assert!(
        text.lines().filter(|l| l.contains("step")).count() >= 2,
        "watch streamed the steps: {text}"
    );
    assert_eq!(slurm_state(slurm_id).as_deref(), Some("COMPLETED"));

    // The same job here: the same loss curve and the same adapter.
    let local = assert_matches_uninterrupted(
        &c,
        &data,
        &fast_with(&[("max_steps", "30"), ("checkpoint_every", "10")]),
        job.id,
        30,
    );
    let adapter = |id: JobId| {
        let j = c.get(id).expect("get");
        std::fs::read(Path::new(&j.output_dir).join("adapter_model.safetensors")).expect("adapter")
    };
    assert!(
        adapter(job.id) == adapter(local),
        "the adapters are the same bytes"
    );
    assert!(
        c.get(local).expect("get").progress.slurm.is_none(),
        "the reference ran here"
    );
}

#[test]
fn a_requeued_slurm_job_resumes_from_its_newest_checkpoint() {
    if !cluster_or_skip() {
        return;
    }
    let _serial = serial();
    let (d, data) = daemon_and_data();
    let c = d.client();
    let settings = on_slurm(&[("max_steps", "400"), ("checkpoint_every", "20")]);
    let job = c
        .submit(spec(tiny_model(), &data, &settings))
        .expect("submit");
    let slurm_id = running_on_slurm(&c, job.id, 30);
    requeue(slurm_id);
    let (done, _) = wait_for(&c, job.id, Duration::from_secs(300), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    assert_eq!(
        done.progress.slurm.as_ref().map(|s| s.job_id),
        Some(slurm_id),
        "one Slurm job; the daemon's log:\n{}",
        d.daemon_log()
    );
    assert_eq!(
        done.progress.restarts, 0,
        "a requeue after a checkpoint is no crash"
    );
    let log = std::fs::read_to_string(d.state_dir().join(format!("jobs/{}/job.log", job.id)))
        .expect("job.log");
    assert!(log.contains("resuming"), "the second run resumed: {log}");
    assert_matches_uninterrupted(
        &c,
        &data,
        &fast_with(&[("max_steps", "400"), ("checkpoint_every", "20")]),
        job.id,
        400,
    );
}

#[test]
fn a_killed_daemon_follows_its_slurm_job_again() {
    if !cluster_or_skip() {
        return;
    }
    let _serial = serial();
    let (mut d, data) = daemon_and_data();
    let c = d.client();
    let settings = on_slurm(&[("max_steps", "400"), ("checkpoint_every", "50")]);
    let job = c
        .submit(spec(tiny_model(), &data, &settings))
        .expect("submit");
    let slurm_id = running_on_slurm(&c, job.id, 5);
    drop(c);
    d.kill9();
    d.restart();
    let c = d.client();
    let (done, _) = wait_for(&c, job.id, Duration::from_secs(300), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    assert_eq!(
        done.progress.slurm.as_ref().map(|s| s.job_id),
        Some(slurm_id),
        "followed the same Slurm job, submitted no second"
    );
    assert!(
        std::fs::read_dir(d.state_dir().join(format!("jobs/{}/slurm", job.id)))
            .expect("attempts")
            .count()
            == 1,
        "one attempt"
    );
    let points = c.metrics(job.id, None).expect("metrics");
    assert_eq!(
        points.iter().map(|p| p.step).collect::<Vec<_>>(),
        (1..=400).collect::<Vec<_>>(),
        "every step once"
    );
}

#[test]
fn pause_resume_and_cancel_of_a_slurm_job() {
    if !cluster_or_skip() {
        return;
    }
    let _serial = serial();
    let (d, data) = daemon_and_data();
    let c = d.client();
    let settings = on_slurm(&[("max_steps", "400"), ("checkpoint_every", "100")]);
    let job = c
        .submit(spec(tiny_model(), &data, &settings))
        .expect("submit");
    let first = running_on_slurm(&c, job.id, 20);
    let paused = c.pause(job.id).expect("pause");
    assert_eq!(paused.state, JobState::Paused);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !live_slurm_jobs(job.id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the Slurm job outlived the pause"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let checkpoints = c.checkpoints(job.id).expect("checkpoints");
    let last = checkpoints.last().expect("a checkpoint written on pause");
    assert!(last.step >= paused.progress.step.min(20), "{last:?}");
    c.resume(job.id, None).expect("resume");
    let (done, _) = wait_for(&c, job.id, Duration::from_secs(300), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    let second = done.progress.slurm.as_ref().map(|s| s.job_id);
    assert!(
        second.is_some_and(|s| s != first),
        "resumed as a new Slurm job"
    );
    assert_matches_uninterrupted(
        &c,
        &data,
        &fast_with(&[("max_steps", "400"), ("checkpoint_every", "100")]),
        job.id,
        400,
    );

    // Cancel a running one: no Slurm job is left behind.
    let job = c
        .submit(spec(
            tiny_model(),
            &data,
            &on_slurm(&[("max_steps", "100000")]),
        ))
        .expect("submit");
    running_on_slurm(&c, job.id, 1);
    let cancelled = c.cancel(job.id).expect("cancel");
    assert_eq!(cancelled.state, JobState::Cancelled);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !live_slurm_jobs(job.id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "a Slurm job left behind: {:?}",
            live_slurm_jobs(job.id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn slurm_errors_are_clear_at_submit_or_as_the_jobs_reason() {
    if !cluster_or_skip() {
        return;
    }
    let _serial = serial();
    let files = tempfile::tempdir().expect("tempdir");
    let data = files.path().join("data.jsonl");
    write_dataset(&data, 64);
    let d = TestDaemon::start();
    let c = d.client();
    // A partition the cluster does not have: the job fails with sbatch's words.
    let job = c
        .submit(spec(
            tiny_model(),
            &data,
            &on_slurm(&[("partition", "nope")]),
        ))
        .expect("submit");
    let (done, seen) = wait_for(&c, job.id, Duration::from_secs(60), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Failed, "{seen:?}");
    let reason = done.reason.unwrap_or_default();
    assert!(
        reason.contains("partition") && reason.contains("nope"),
        "{reason}"
    );
    // A bad option value never reaches sbatch.
    let err = c
        .submit(spec(
            tiny_model(),
            &data,
            &on_slurm(&[("gres", "gpu:1 --uid=0")]),
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("gres"), "{err}");
    drop(c);
    drop(d);

    // No sbatch: refused at submit.
    let d = TestDaemon::start_with_config("[slurm]\nsbatch = \"/nonexistent/sbatch\"\n");
    let c = d.client();
    let err = c
        .submit(spec(tiny_model(), &data, &on_slurm(&[])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/sbatch"), "{err}");
    assert!(
        c.list(None, true).expect("list").is_empty(),
        "nothing queued"
    );
    drop(c);
    drop(d);

    // A controller that does not answer: the job fails with that reason, not stuck initializing.
    let conf = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string("/etc/slurm/slurm.conf").expect("slurm.conf");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("SlurmctldPort") || l.starts_with("MessageTimeout") {
                String::new()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\nSlurmctldPort=1\nMessageTimeout=2\n";
    let path = conf.path().join("slurm.conf");
    std::fs::write(&path, text).expect("slurm.conf copy");
    let d = TestDaemon::start_with_env(&[("SLURM_CONF", &path.display().to_string())]);
    let c = d.client();
    let job = c
        .submit(spec(tiny_model(), &data, &on_slurm(&[])))
        .expect("submit");
    let (done, seen) = wait_for(&c, job.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Failed, "{seen:?}");
    let reason = done.reason.unwrap_or_default();
    assert!(
        reason.contains("Slurm") && reason.contains("controller"),
        "{reason}"
    );
}

#[test]
fn a_run_that_dies_without_a_checkpoint_counts_as_a_restart() {
    if !cluster_or_skip() {
        return;
    }
    let _serial = serial();
    let (d, data) = daemon_and_data();
    let c = d.client();
    let settings = on_slurm(&[("max_steps", "400"), ("checkpoint_every", "20")]);
    let job = c
        .submit(spec(tiny_model(), &data, &settings))
        .expect("submit");
    let slurm_id = running_on_slurm(&c, job.id, 30);
    let dir = c
        .get(job.id)
        .expect("get")
        .progress
        .slurm
        .expect("slurm")
        .dir;
    // The worker dies as on a lost node (no signal it could act on), and Slurm runs the job again.
    let killed = Command::new("pkill")
        .args(["-KILL", "-f", &format!("worker --channel-dir {dir}")])
        .status()
        .expect("pkill");
    assert!(killed.success(), "the worker was running");
    requeue(slurm_id);
    let (done, _) = wait_for(&c, job.id, Duration::from_secs(300), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    assert_eq!(
        done.progress.restarts, 1,
        "the lost run counted as a restart"
    );
    assert_eq!(
        done.progress.slurm.as_ref().map(|s| s.job_id),
        Some(slurm_id),
        "Slurm's requeue, no second Slurm job; the daemon's log:\n{}",
        d.daemon_log()
    );
    assert_matches_uninterrupted(
        &c,
        &data,
        &fast_with(&[("max_steps", "400"), ("checkpoint_every", "20")]),
        job.id,
        400,
    );
}
