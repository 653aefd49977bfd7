//! `loractl watch` with stdout piped (plain lines, returning on pause or end with its exit code) and
//! `loractl plot` (the SVG's curves, the PNG's size), against a real daemon.
use super::*;
use lorad_tests::{bin, tiny_model, write_dataset, TestDaemon};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;

/// `watch`'s exit code for a paused job (client/src/cli/mod.rs EXIT_PAUSED).
const EXIT_PAUSED: i32 = 4;

fn loractl(d: &TestDaemon, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin("loractl"))
        .arg("--socket")
        .arg(d.socket())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run loractl")
}

/// A `loractl watch` whose stdout is a pipe, read line by line as it prints.
struct Watch {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    /// Every line read so far, for messages.
    seen: Vec<String>,
}

impl Watch {
    fn start(d: &TestDaemon, jobs: &[JobId]) -> Watch {
        let mut child = Command::new(bin("loractl"))
            .arg("--socket")
            .arg(d.socket())
            .arg("watch")
            .args(jobs.iter().map(|j| j.to_string()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run loractl watch");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watch {
            child: Some(child),
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one satisfies `want`; returns it.
    fn until(&mut self, timeout: Duration, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                Err(e) => panic!("no such line ({e:?}); watch printed {:#?}", self.seen),
            }
        }
    }

    /// Reads to the end of its output (it exits) and returns its exit code.
    fn end(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("watch did not return; it printed {:#?}", self.seen)
                }
            }
        }
        let status = self.child.take().expect("child").wait().expect("wait");
        status.code().expect("exit code")
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `job 3 step 40/200 loss ...`: the step, if the line is a step line of `job`.
fn step_of(line: &str, job: JobId) -> Option<u64> {
    let rest = line.strip_prefix(&format!("job {job} step "))?;
    rest.split(['/', ' ']).next()?.parse().ok()
}

#[test]
fn watch_prints_a_line_per_step_and_returns_when_the_job_is_paused() {
    let d = TestDaemon::start();
    let c = d.client();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let long = fast_with(&[("max_steps", "100000")]);
    let job = c
        .submit(spec(tiny_model(), &data, &long))
        .expect("submit")
        .id;
    let mut w = Watch::start(&d, &[job]);
    // Several steps, one line each, in order, with the loss, its trend and (once timed) the ETA.
    let first = w.until(Duration::from_secs(120), |l| step_of(l, job).is_some());
    let eta_line = w.until(Duration::from_secs(60), |l| {
        step_of(l, job).is_some() && l.contains(" ETA ")
    });
    assert!(first.contains("/100000 loss "), "{first}");
    assert!(
        eta_line.contains(" ema ") && eta_line.contains("/100 steps)"),
        "{eta_line}"
    );
    assert!(eta_line.contains(" tok/s "), "{eta_line}");
    c.pause(job).expect("pause");
    let code = w.end(Duration::from_secs(60));
    assert_eq!(code, EXIT_PAUSED, "{:#?}", w.seen);
    let steps: Vec<u64> = w.seen.iter().filter_map(|l| step_of(l, job)).collect();
    assert!(steps.len() >= 2, "{:#?}", w.seen);
    assert!(steps.windows(2).all(|s| s[0] < s[1]), "{steps:?}");
    let last = w.seen.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with(&format!("job {job} paused")),
        "{:#?}",
        w.seen
    );
}

#[test]
fn watch_returns_0_with_a_final_line_when_the_job_completes() {
    let d = TestDaemon::start();
    let c = d.client();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    // The one CPU slot is busy, so the short job waits in the queue while the watch attaches.
    let blocker = c
        .submit(spec(
            tiny_model(),
            &data,
            &fast_with(&[("max_steps", "100000")]),
        ))
        .expect("submit")
        .id;
    wait_for(&c, blocker, Duration::from_secs(120), |s| {
        s == JobState::Running
    });
    let job = c
        .submit(spec(
            tiny_model(),
            &data,
            &fast_with(&[("max_steps", "12")]),
        ))
        .expect("submit")
        .id;
    let mut w = Watch::start(&d, &[job]);
    w.until(Duration::from_secs(30), |l| {
        l.starts_with(&format!("job {job} queued"))
    });
    c.cancel(blocker).expect("cancel");
    let code = w.end(Duration::from_secs(120));
    assert_eq!(code, 0, "{:#?}", w.seen);
    let steps: Vec<u64> = w.seen.iter().filter_map(|l| step_of(l, job)).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>(), "{:#?}", w.seen);
    assert!(w
        .seen
        .iter()
        .any(|l| l.starts_with(&format!("job {job} step 12/12 loss "))));
    let last = w.seen.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with(&format!("job {job} completed")),
        "{:#?}",
        w.seen
    );
}

#[test]
fn watch_with_no_id_follows_every_running_job() {
    let d = TestDaemon::start_with_config("cpu_slots = 2\ncpu_threads = 1\n");
    let c = d.client();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let long = fast_with(&[("max_steps", "100000")]);
    let a = c
        .submit(spec(tiny_model(), &data, &long))
        .expect("submit")
        .id;
    wait_for(&c, a, Duration::from_secs(120), |s| s == JobState::Running);
    let mut w = Watch::start(&d, &[]);
    w.until(Duration::from_secs(60), |l| step_of(l, a).is_some());
    // A job that starts while watching joins in.
    let b = c
        .submit(spec(tiny_model(), &data, &long))
        .expect("submit")
        .id;
    w.until(Duration::from_secs(120), |l| step_of(l, b).is_some());
    c.pause(a).expect("pause");
    c.cancel(b).expect("cancel");
    // The worst of paused and cancelled: failed.
    assert_eq!(w.end(Duration::from_secs(60)), 1, "{:#?}", w.seen);
    assert!(w
        .seen
        .iter()
        .any(|l| l.starts_with(&format!("job {a} paused"))));
    assert!(w
        .seen
        .iter()
        .any(|l| l.starts_with(&format!("job {b} cancelled"))));
}

/// The number of points of each `<polyline>` in `svg`.
fn polylines(svg: &str) -> Vec<usize> {
    svg.split("<polyline")
        .skip(1)
        .filter_map(|rest| {
            let tag = rest.split('>').next()?;
            let points = tag.split("points=\"").nth(1)?.split('"').next()?;
            Some(points.split_whitespace().count())
        })
        .collect()
}

#[test]
fn plot_draws_one_or_two_jobs_to_svg_and_png() {
    let d = TestDaemon::start();
    let c = d.client();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let mut jobs = Vec::new();
    for steps in ["12", "8"] {
        let job = c
            .submit(spec(
                tiny_model(),
                &data,
                &fast_with(&[("max_steps", steps)]),
            ))
            .expect("submit")
            .id;
        let (done, _) = wait_for(&c, job, Duration::from_secs(120), |s| s.is_terminal());
        assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
        jobs.push(job.to_string());
    }
    let out = |name: &str| d.dir.path().join(name).display().to_string();

    // One job: the raw and the smoothed curve, 12 points each.
    let one = out("one.svg");
    let o = loractl(&d, &["plot", &jobs[0], "--out", &one], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), one);
    let svg = std::fs::read_to_string(&one).expect("svg");
    let counts = polylines(&svg);
    assert_eq!(counts.iter().filter(|&&n| n == 12).count(), 2, "{counts:?}");
    assert!(svg.contains(&format!("job {}: test", jobs[0])), "legend");

    // Two overlaid: both curves with their own lengths, both in the legend.
    let two = out("two.svg");
    let o = loractl(
        &d,
        &["--json", "plot", &jobs[0], &jobs[1], "--out", &two],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(answer["out"], two.as_str());
    assert_eq!(answer["points"], serde_json::json!([12, 8]));
    assert_eq!(answer["jobs"].as_array().map(Vec::len), Some(2));
    let svg = std::fs::read_to_string(&two).expect("svg");
    let counts = polylines(&svg);
    assert_eq!(counts.iter().filter(|&&n| n == 12).count(), 2, "{counts:?}");
    assert_eq!(counts.iter().filter(|&&n| n == 8).count(), 2, "{counts:?}");
    for job in &jobs {
        assert!(svg.contains(&format!("job {job}: test")), "legend of {job}");
    }

    // An SVG needs no font file: its text is text.
    let bare = out("nofont.svg");
    let o = loractl(
        &d,
        &["plot", &jobs[0], "--out", &bare],
        &[("LORAD_PLOT_FONT", "/nonexistent.ttf")],
    );
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let svg = std::fs::read_to_string(&bare).expect("svg");
    assert!(svg.contains(&format!("job {}: test", jobs[0])), "legend");

    // PNG, with and without a font: the size asked for; without, a warning and no text.
    for (name, font) in [("two.png", None), ("nofont.png", Some("/nonexistent.ttf"))] {
        let png = out(name);
        let env: Vec<(&str, &str)> = font.map(|f| ("LORAD_PLOT_FONT", f)).into_iter().collect();
        let o = loractl(
            &d,
            &[
                "plot", &jobs[0], &jobs[1], "--out", &png, "--size", "640x480",
            ],
            &env,
        );
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        assert_eq!(font.is_some(), stderr.contains("without text"), "{stderr}");
        let bytes = std::fs::read(&png).expect("png");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[12..16], b"IHDR");
        let dim = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        assert_eq!((dim(16), dim(20)), (640, 480));
    }

    // Errors: another extension, a job with no points yet, an unknown job.
    let o = loractl(&d, &["plot", &jobs[0], "--out", &out("loss.jpg")], &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("loss.jpg"),
        "{stderr}"
    );
    let in_an_hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
        + 3_600_000;
    let waiting = c
        .submit(JobSpec {
            not_before_ms: Some(in_an_hour),
            ..spec(tiny_model(), &data, FAST)
        })
        .expect("submit")
        .id;
    let o = loractl(
        &d,
        &["plot", &waiting.to_string(), "--out", &out("x.svg")],
        &[],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!("job {waiting} has no metric points yet")),
        "{stderr}"
    );
    let o = loractl(&d, &["plot", "999", "--out", &out("x.svg")], &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("not_found"),
        "{stderr}"
    );
}
