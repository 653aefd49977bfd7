//! lorad as a service: systemd readiness and status (a test-owned NOTIFY_SOCKET), socket activation by
//! systemd's own `systemd-socket-activate`, `--daemonize`, and rolling log files.
use super::*;
use lorad_tests::{bin, tiny_model, write_dataset, TestDaemon};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};

/// The service manager's side of sd_notify: a datagram socket lorad reports to.
struct Notify {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    socket: UnixDatagram,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        Notify {
            _dir: dir,
            path,
            socket,
        }
    }

    /// Every line received until a notification with a line that `until` matches, within `timeout`.
    fn until(&self, timeout: Duration, until: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no matching notification in {timeout:?}; got {lines:?}"
            );
            self.socket.set_read_timeout(Some(left)).expect("timeout");
            let Ok(n) = self.socket.recv(&mut buf) else {
                continue;
            };
            // One datagram is one notification: its lines all count (READY=1 comes with STATUS=).
            let mut matched = false;
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                matched |= until(line);
                lines.push(line.to_string());
            }
            if matched {
                return lines;
            }
        }
    }
}

#[test]
fn ready_comes_after_recovery_status_follows_the_job_and_stop_is_announced() {
    let notify = Notify::new();
    let path = notify.path.display().to_string();
    let mut d = TestDaemon::start_with_env(&[("NOTIFY_SOCKET", &path)]);
    let first = notify.until(Duration::from_secs(10), |l| l == "READY=1");
    assert!(first.iter().any(|l| l == "STATUS=idle"), "{first:?}");

    // A job that is running when the daemon is killed: the next daemon must requeue it first.
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let long = fast_with(&[("max_steps", "100000"), ("checkpoint_every", "5")]);
    let c = d.client();
    let job = c
        .submit(spec(tiny_model(), &data, &long))
        .expect("submit")
        .id;
    wait_for(&c, job, Duration::from_secs(60), |s| s == JobState::Running);
    notify.until(Duration::from_secs(30), |l| {
        l.starts_with("STATUS=job") && l.contains("step")
    });
    drop(c);
    d.kill9();

    d.restart();
    notify.until(Duration::from_secs(10), |l| l == "READY=1");
    // READY=1 came after the requeue: the journal already holds it.
    let c = d.client();
    let mut sub = c.subscribe(Some(job), 0).expect("subscribe");
    let mut requeued = false;
    while sub.last_seq() < sub.replay_until() && !requeued {
        let Ok(Some(event)) = sub.next_timeout(Duration::from_secs(5)) else {
            break;
        };
        if let EventBody::StateChanged { to, reason, .. } = event.body {
            requeued |= to == JobState::Queued && reason.as_deref() == Some("daemon restarted");
        }
    }
    assert!(requeued, "READY=1 before the running job was requeued");

    // STATUS= follows the job as it runs again.
    let seen = notify.until(Duration::from_secs(60), |l| {
        l.starts_with(&format!("STATUS=job {job} step "))
    });
    let statuses: Vec<&String> = seen.iter().filter(|l| l.starts_with("STATUS=")).collect();
    let step_line = statuses.last().expect("a status");
    let later = notify.until(Duration::from_secs(60), |l| {
        l.starts_with("STATUS=") && l != step_line.as_str()
    });
    assert!(
        later.last().is_some_and(|l| l.contains("step")),
        "{later:?}"
    );

    // SIGTERM with a worker running: STOPPING=1, then more time asked while it checkpoints.
    drop((sub, c));
    let pid = d.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let stopping = notify.until(Duration::from_secs(30), |l| {
        l.starts_with("EXTEND_TIMEOUT_USEC=")
    });
    let at = |what: &str| stopping.iter().position(|l| l.starts_with(what));
    assert!(at("STOPPING=1").is_some(), "{stopping:?}");
    assert!(
        at("STOPPING=1") < at("EXTEND_TIMEOUT_USEC="),
        "{stopping:?}"
    );
    d.stop();
}

#[test]
fn sighup_reload_is_announced_with_its_monotonic_time() {
    let notify = Notify::new();
    let path = notify.path.display().to_string();
    let d = TestDaemon::start_with_env(&[("NOTIFY_SOCKET", &path)]);
    notify.until(Duration::from_secs(10), |l| l == "READY=1");
    d.sighup();
    let lines = notify.until(Duration::from_secs(10), |l| l == "READY=1");
    let at = |what: &str| lines.iter().position(|l| l.starts_with(what));
    assert!(
        at("RELOADING=1").is_some() && at("MONOTONIC_USEC=").is_some(),
        "{lines:?}"
    );
    assert!(at("RELOADING=1") < at("READY=1"), "{lines:?}");
}

/// `systemd-socket-activate` (systemd's own tool) as the service manager: it holds the socket and
/// starts lorad on the first connection.
fn activate(socket: &Path, state: &Path, plugins: &Path, log: &Path) -> std::process::Child {
    let log = std::fs::File::create(log).expect("log");
    Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(socket)
        .arg(bin("lorad"))
        .arg("--user")
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state)
        .arg("--no-default-plugins")
        .arg("--plugin-dir")
        .arg(plugins)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn systemd-socket-activate")
}

#[test]
fn socket_activation_serves_the_first_request_and_keeps_the_socket() {
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-socket-activate not installed (apt-get install systemd)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (socket, state) = (dir.path().join("lorad.sock"), dir.path().join("state"));
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugin dir");
    for name in lorad_tests::BUNDLED_PLUGINS {
        let link = plugins.join(format!("lib{name}.so"));
        std::os::unix::fs::symlink(lorad_tests::plugin_lib(name), link).expect("link plugin");
    }
    let log = dir.path().join("activate.log");
    let mut activator = activate(&socket, &state, &plugins, &log);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts lorad, which answers it.
    let c = Client::connect(&socket).expect("connect");
    let status = c.status().expect("status");
    assert_eq!(
        status.pid,
        activator.id(),
        "lorad runs in the activator's process"
    );
    let daemon_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        daemon_log().contains("listening on the socket systemd passed"),
        "{}",
        daemon_log()
    );
    // A job to find again.
    let data = dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let job = c
        .submit(spec(tiny_model(), &data, FAST))
        .expect("submit")
        .id;
    wait_for(&c, job, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(c.get(job).expect("get").state, JobState::Completed);
    drop(c);

    // Stopped, lorad leaves the socket file to its owner.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(activator.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let _ = activator.wait();
    assert!(socket.exists(), "lorad unlinked the socket systemd owns");
    assert!(daemon_log().contains("lorad stopped"), "{}", daemon_log());

    // Activated again on the same socket, with the same state.
    let again = activate(&socket, &state, &plugins, &dir.path().join("activate2.log"));
    let c = (0..500)
        .find_map(|_| {
            let c = Client::connect(&socket).ok();
            if c.is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            c
        })
        .expect("connect again");
    let status = c.status().expect("status");
    assert_eq!(status.pid, again.id());
    assert_eq!(status.state_dir, state.display().to_string());
    let found = c.get(job).expect("the job survives");
    assert_eq!(found.state, JobState::Completed);
    drop(c);
    lorad_tests::stop_child(again);
}

/// `lorad --user --daemonize` with these extra arguments; its exit status and stderr.
fn daemonize(args: &[&std::ffi::OsStr]) -> (std::process::ExitStatus, String) {
    let out = Command::new(bin("lorad"))
        .args(["--user", "--daemonize", "--no-default-plugins"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run lorad --daemonize");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn daemonize_returns_once_serving_or_says_why_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (socket, state) = (dir.path().join("lorad.sock"), dir.path().join("state"));
    let (status, err) = daemonize(&[
        "--socket".as_ref(),
        socket.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
    ]);
    assert!(status.success(), "{status}: {err}");
    // Exit 0 means serving: no retry needed.
    let c = Client::connect(&socket).expect("the socket answers once --daemonize returned");
    let pid = c.status().expect("status").pid;
    let pidfile = std::fs::read_to_string(state.join("lorad.pid")).expect("pid file");
    assert_eq!(pidfile.trim(), pid.to_string());
    let logs: Vec<_> = std::fs::read_dir(state.join("logs"))
        .expect("log dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .collect();
    assert_eq!(logs.len(), 1, "one log file");
    let log = std::fs::read_to_string(logs[0].path()).expect("log");
    assert!(log.contains("lorad ready"), "{log}");

    // A second lorad on the same state directory: refused before detaching, the owner named.
    let other = dir.path().join("other.sock");
    let (status, err) = daemonize(&[
        "--socket".as_ref(),
        other.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
    ]);
    assert!(!status.success());
    assert!(
        err.contains(&format!(
            "another lorad (pid {pid}) owns the state directory"
        )),
        "{err}"
    );
    // A socket in use: found by the detached daemon, reported by the waiting parent.
    let (status, err) = daemonize(&[
        "--socket".as_ref(),
        socket.as_os_str(),
        "--state-dir".as_ref(),
        dir.path().join("state2").as_os_str(),
    ]);
    assert!(!status.success());
    assert!(
        err.contains("cannot listen on") && err.contains("another daemon is listening"),
        "{err}"
    );
    // A bad config file: the file and the key.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "log_keep = 3\nlog_rotaton = \"hourly\"\n").expect("config");
    let (status, err) = daemonize(&[
        "--config".as_ref(),
        bad.as_os_str(),
        "--state-dir".as_ref(),
        dir.path().join("state3").as_os_str(),
    ]);
    assert!(!status.success());
    assert!(
        err.contains(&bad.display().to_string()) && err.contains("log_rotaton"),
        "{err}"
    );

    drop(c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    while lorad_tests::process_alive(pid) {
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn log_files_rotate_and_only_the_newest_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    // Files of an earlier run, named as the appender names them.
    for minute in 0..4 {
        let old = logs.join(format!("lorad.2026-01-01-00-0{minute}.log"));
        std::fs::write(old, "old\n").expect("old log");
    }
    let config = dir.path().join("lorad.toml");
    std::fs::write(&config, "log_rotation = \"minutely\"\nlog_keep = 2\n").expect("config");
    let socket = dir.path().join("lorad.sock");
    let mut child = Command::new(bin("lorad"))
        .args(["--user", "--no-default-plugins", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--log-dir")
        .arg(&logs)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn lorad");
    lorad_tests::wait_until_serving(&socket, &mut child, Duration::from_secs(30)).expect("serving");
    let names = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&logs)
            .expect("log dir")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        v.sort();
        v
    };
    let first = names();
    assert_eq!(
        first.len(),
        2,
        "the newest old file and the current one: {first:?}"
    );
    let current = first.last().cloned().expect("current file");
    assert!(!current.starts_with("lorad.2026-01-01"), "{first:?}");

    // Into the next minute, then a log line (a SIGHUP's): a new file, still two in all.
    let deadline = Instant::now() + Duration::from_secs(75);
    loop {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP");
        std::thread::sleep(Duration::from_millis(500));
        let now = names();
        if now.last() != Some(&current) {
            assert_eq!(now.len(), 2, "{now:?}");
            assert_eq!(now[0], current, "the previous file is kept: {now:?}");
            let text = std::fs::read_to_string(logs.join(&now[1])).expect("new log");
            assert!(text.contains("SIGHUP"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no rotation within a minute: {now:?}"
        );
    }
    lorad_tests::stop_child(child);
}

#[test]
fn the_watchdog_is_fed_at_half_the_interval_systemd_gives() {
    let notify = Notify::new();
    let path = notify.path.display().to_string();
    // WatchdogSec=0.4s as systemd passes it (no WATCHDOG_PID: meant for whoever reads it).
    let d = TestDaemon::start_with_env(&[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "400000")]);
    notify.until(Duration::from_secs(10), |l| l == "READY=1");
    let started = Instant::now();
    for _ in 0..3 {
        notify.until(Duration::from_secs(2), |l| l == "WATCHDOG=1");
    }
    // Three pings at ~0.2 s apart (the first may come at once).
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(d);
}

#[test]
fn under_the_journal_lines_carry_their_priority_and_no_timestamp() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let meta = stderr.metadata().expect("metadata");
    // What systemd sets when stderr is its journal stream: the stream's device and inode.
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let socket = dir.path().join("lorad.sock");
    let mut child = Command::new(bin("lorad"))
        .args(["--user", "--no-default-plugins", "--log-dir"])
        .arg(dir.path().join("unused-logs"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("JOURNAL_STREAM", &stream)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn lorad");
    lorad_tests::wait_until_serving(&socket, &mut child, Duration::from_secs(30)).expect("serving");
    lorad_tests::stop_child(child);
    let text = std::fs::read_to_string(&stderr_path).expect("stderr");
    assert!(
        text.lines().any(|l| l.starts_with("<6>lorad ready")),
        "{text}"
    );
    assert!(text.lines().all(|l| l.starts_with('<')), "{text}");
    assert!(
        !text.contains(" INFO "),
        "no level words or timestamps: {text}"
    );
    // The journal wins over log_dir.
    assert!(!dir.path().join("unused-logs").exists());
}
