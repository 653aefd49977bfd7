//! The Python client (client/python, module `lorad_client`) against a real daemon.
//!
//! client/python/tests/test_client.py drives a [`TestDaemon`] through the requests a script or
//! notebook makes; this file is its restart coordinator: when the script prints `RESTART stop PID`
//! or `RESTART kill9 PID` it stops the daemon that way (SIGTERM, or SIGKILL), waits until the job's
//! worker PID has exited, starts the daemon again on the same socket and state dir, and answers on
//! the script's stdin. The script checks that its subscription carried on across both restarts with
//! exactly the events the journal replays. The client's unit tests against a scripted fake daemon
//! (client/python/tests/test_fake.py) run here too.
//!
//! Skipped, with a line saying so, when python3 or its msgpack package is missing (.ci/run installs
//! it); `$LORAD_PYTHON` names another interpreter.
use lorad_tests::{process_alive, tiny_model, write_dataset, TestDaemon};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The longest a script may run before it is killed and the test fails with its output so far.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a worker may outlive its daemon (it notices the daemon is gone and exits by itself).
const WORKER_EXIT: Duration = Duration::from_secs(30);

/// client/python: the package's root, put on `PYTHONPATH` (the tests need no `pip install`).
fn package_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../client/python")
}

/// `$LORAD_PYTHON` or `python3`, if it runs and has msgpack; `None` prints the skip line.
fn python() -> Option<String> {
    let python = std::env::var("LORAD_PYTHON").unwrap_or_else(|_| "python3".into());
    let usable = Command::new(&python)
        .args(["-c", "import msgpack"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !usable {
        println!("skipped: python3 with msgpack not installed (pip install msgpack)");
        return None;
    }
    Some(python)
}

/// A Python process with the package importable, its output piped, and no bytecode written into
/// the source tree.
fn python_command(python: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(python);
    cmd.args(args)
        .env("PYTHONPATH", package_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("LORAD_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A running script: its stdout line by line, its stderr collected at the end.
struct Script {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Option<JoinHandle<String>>,
    /// Every stdout line so far.
    transcript: String,
}

impl Script {
    fn spawn(mut cmd: Command) -> Script {
        let mut child = cmd.spawn().expect("spawn python");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Script {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr: Some(stderr),
            transcript: String::new(),
        }
    }

    /// The next stdout line; `None` at the end of the output. Kills the script and fails the test
    /// after `deadline`.
    fn next_line(&mut self, deadline: Instant, context: &dyn Fn() -> String) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.transcript.push_str(&line);
                self.transcript.push('\n');
                Some(line)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                self.fail(
                    &format!("did not finish within {} s", SCRIPT_TIMEOUT.as_secs()),
                    context,
                )
            }
        }
    }

    /// Writes `line` to the script's stdin.
    fn answer(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write to the script's stdin");
        stdin.flush().expect("flush the script's stdin");
    }

    /// Waits for the script to exit; fails the test with everything it printed unless it succeeded.
    /// Returns its stdout and stderr.
    fn finish(mut self, context: &dyn Fn() -> String) -> (String, String) {
        self.stdin.take();
        let status = self.child.wait().expect("wait for python");
        if !status.success() {
            self.fail(&format!("exited with {status}"), context);
        }
        let stderr = self.take_stderr();
        (self.transcript, stderr)
    }

    fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    fn fail(&mut self, why: &str, context: &dyn Fn() -> String) -> ! {
        let _ = self.child.wait();
        while let Ok(line) = self.lines.try_recv() {
            self.transcript.push_str(&line);
            self.transcript.push('\n');
        }
        let stderr = self.take_stderr();
        panic!(
            "the Python script {why}\n--- its stdout:\n{}--- its stderr:\n{stderr}{}",
            self.transcript,
            context()
        );
    }
}

/// The end of the daemon's log, for failure messages.
fn log_tail(d: &TestDaemon) -> String {
    let log = d.daemon_log();
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.len().saturating_sub(80);
    format!(
        "--- the daemon's log (end):\n{}\n",
        lines[start..].join("\n")
    )
}

/// Stops the daemon as `how` says, waits until the worker `pid` has exited, and starts it again.
fn restart(d: &mut TestDaemon, how: &str, worker: u32) {
    match how {
        "stop" => d.stop(),
        "kill9" => d.kill9(),
        other => panic!("the script asked for an unknown restart '{other}'"),
    }
    let deadline = Instant::now() + WORKER_EXIT;
    while process_alive(worker) {
        assert!(
            Instant::now() < deadline,
            "worker {worker} still alive {} s after its daemon ({how})\n{}",
            WORKER_EXIT.as_secs(),
            log_tail(d)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.restart();
}

#[test]
fn python_client_drives_a_real_daemon_and_its_subscription_survives_restarts() {
    let Some(python) = python() else { return };
    let mut d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let script = package_dir().join("tests/test_client.py");
    let socket = d.socket();
    let mut run = Script::spawn(python_command(
        &python,
        &[
            script.to_str().expect("utf-8 path"),
            socket.to_str().expect("utf-8 path"),
            tiny_model().to_str().expect("utf-8 path"),
            data.to_str().expect("utf-8 path"),
        ],
    ));

    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let mut restarts = Vec::new();
    while let Some(line) = run.next_line(deadline, &|| log_tail(&d)) {
        let Some(request) = line.strip_prefix("RESTART ") else {
            continue;
        };
        let (how, pid) = request
            .split_once(' ')
            .unwrap_or_else(|| panic!("a malformed request from the script: {line}"));
        let worker: u32 = pid
            .parse()
            .unwrap_or_else(|_| panic!("a malformed worker pid from the script: {line}"));
        restart(&mut d, how, worker);
        restarts.push(how.to_string());
        run.answer("restarted");
    }
    let (transcript, stderr) = run.finish(&|| log_tail(&d));
    println!("{transcript}{stderr}");
    assert!(transcript.contains("all ok"), "{transcript}");
    assert_eq!(restarts, ["stop", "kill9"], "{transcript}");

    // What the script did is what the daemon holds.
    let jobs = d.client().list(None, false).expect("list");
    let trained = jobs
        .iter()
        .find(|j| j.name == "py-fast")
        .unwrap_or_else(|| panic!("no job py-fast in {jobs:?}"));
    assert_eq!(
        trained.state,
        lorad_schema::JobState::Completed,
        "{trained:?}"
    );
    assert_eq!(trained.dataset, data.display().to_string());
}

#[test]
fn python_client_unit_tests_against_a_fake_daemon() {
    let Some(python) = python() else { return };
    let tests = package_dir().join("tests");
    let tests = tests.to_str().expect("utf-8 path");
    let args = [
        "-m",
        "unittest",
        "discover",
        "-v",
        "-s",
        tests,
        "-p",
        "test_fake.py",
    ];
    let mut run = Script::spawn(python_command(&python, &args));
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    while run.next_line(deadline, &String::new).is_some() {}
    // unittest reports on stderr.
    let (_, report) = run.finish(&String::new);
    println!("{report}");
}
