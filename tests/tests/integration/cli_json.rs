//! `loractl --json`, every subcommand against a real daemon, checked against the examples of
//! PROTOCOL.md's "loractl --json" section, so the documentation and the CLI cannot drift apart.
//!
//! Convention of that section: each example is a ```console block after a line
//! `<!-- loractl-json: NAME [subset] -->`; NAME is the subcommand (with a flag where one changes the
//! output: `submit --dry-run`, `logs -f`), the block's first line is `$ loractl --json NAME ...`, and
//! the rest is what it prints: one JSON document, or one value per line. The real output must have the
//! example's top-level keys (of the first element, for an array): exactly those, or at least those
//! with `subset` (examples of wire types, which are abridged). Every value the command printed must
//! match one of the example's values, and each of the example's values must be matched.
use super::*;
use lorad_schema::{
    CheckpointInfo, DaemonStatus, Estimate, Event, ExportInfo, MetricPoint, Template,
};
use lorad_tests::{bin, tiny_model, write_dataset, TestDaemon};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Output, Stdio};

/// One documented example.
#[derive(Debug)]
struct Example {
    /// The `$ loractl --json ...` line.
    command: String,
    /// What it prints.
    values: Vec<Value>,
    /// The real output may have more keys.
    subset: bool,
}

fn protocol_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Every JSON value in `text` (one document, or one per line).
fn values(text: &str) -> Result<Vec<Value>, serde_json::Error> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect()
}

/// The examples of the "loractl --json" section, by NAME.
fn documented(doc: &str) -> BTreeMap<String, Example> {
    let start = doc
        .find("\n## loractl --json\n")
        .expect("PROTOCOL.md has a '## loractl --json' section");
    let section = &doc[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |i| i + 1)];
    let mut examples = BTreeMap::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        let Some(args) = line
            .trim()
            .strip_prefix("<!-- loractl-json:")
            .and_then(|l| l.strip_suffix("-->"))
        else {
            continue;
        };
        let mut words: Vec<&str> = args.split_whitespace().collect();
        let subset = words.last() == Some(&"subset");
        if subset {
            words.pop();
        }
        let name = words.join(" ");
        let fence = lines.next().unwrap_or_default();
        assert_eq!(
            fence.trim(),
            "```console",
            "{name}: the marker must precede a console block"
        );
        let command = lines.next().unwrap_or_default().to_string();
        let mut output = String::new();
        for l in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            output.push_str(l);
            output.push('\n');
        }
        // The command line names the command, and the flags of the name.
        let args: Vec<&str> = command
            .strip_prefix("$ loractl --json ")
            .unwrap_or_else(|| panic!("{name}: the block must start with `$ loractl --json`"))
            .split_whitespace()
            .collect();
        assert_eq!(
            args.first(),
            words.first(),
            "{name}: example runs {command}"
        );
        for flag in &words[1..] {
            assert!(args.contains(flag), "{name}: example runs {command}");
        }
        let values = values(&output)
            .unwrap_or_else(|e| panic!("{name}: example is not JSON ({e}):\n{output}"));
        assert!(!values.is_empty(), "{name}: example prints nothing");
        let previous = examples.insert(
            name.clone(),
            Example {
                command,
                values,
                subset,
            },
        );
        assert!(previous.is_none(), "{name} is documented twice");
    }
    examples
}

/// A value's top-level shape: object or array, and the keys of it (or of its first element).
fn shape(v: &Value) -> (&'static str, BTreeSet<String>) {
    let keys = |v: &Value| {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    match v {
        Value::Array(a) => ("array", a.first().map(keys).unwrap_or_default()),
        Value::Object(_) => ("object", keys(v)),
        _ => ("scalar", BTreeSet::new()),
    }
}

/// Whether `real` has the shape of the documented `doc`.
fn fits(doc: &Value, real: &Value, subset: bool) -> bool {
    let ((dk, dkeys), (rk, rkeys)) = (shape(doc), shape(real));
    dk == rk
        && if subset {
            dkeys.is_subset(&rkeys)
        } else {
            dkeys == rkeys
        }
}

/// Checks the real output of `name` against its example; returns the problems.
fn check(name: &str, ex: &Example, stdout: &str) -> Vec<String> {
    let real = match values(stdout) {
        Ok(v) if !v.is_empty() => v,
        Ok(_) => return vec![format!("{name}: printed nothing")],
        Err(e) => return vec![format!("{name}: not JSON ({e}): {stdout}")],
    };
    let mut problems = Vec::new();
    for r in &real {
        if !ex.values.iter().any(|d| fits(d, r, ex.subset)) {
            problems.push(format!(
                "{name}: printed {:?} but `{}` documents {:?}",
                shape(r),
                ex.command,
                ex.values.iter().map(shape).collect::<Vec<_>>()
            ));
        }
    }
    for d in &ex.values {
        if !real.iter().any(|r| fits(d, r, ex.subset)) {
            problems.push(format!(
                "{name}: `{}` documents {:?} but it printed only {:?}",
                ex.command,
                shape(d),
                real.iter().map(shape).collect::<BTreeSet<_>>()
            ));
        }
    }
    problems
}

/// The subcommands `loractl --help` lists.
fn subcommands() -> BTreeSet<String> {
    let out = Command::new(bin("loractl"))
        .arg("--help")
        .output()
        .expect("loractl --help");
    let help = String::from_utf8_lossy(&out.stdout);
    help.split("Commands:")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .expect("a Commands: section in --help")
        .lines()
        .filter_map(|l| l.strip_prefix("  ").filter(|c| !c.starts_with(' ')))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Runs loractl and keeps what each subcommand printed first, by its documented name.
struct Cli<'a> {
    d: &'a TestDaemon,
    outputs: BTreeMap<String, String>,
}

impl Cli<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("loractl"));
        c.arg("--socket")
            .arg(self.d.socket())
            .arg("--json")
            .args(args);
        c
    }

    /// Runs `args`, expecting exit `code`; records stdout under `name` (first time only).
    fn run_as(&mut self, name: &str, args: &[&str], code: i32) -> String {
        let out: Output = self.command(args).output().expect("run loractl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "loractl --json {}: stdout {stdout}\nstderr {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        self.outputs
            .entry(name.to_string())
            .or_insert_with(|| stdout.clone());
        stdout
    }

    /// Runs `args` (named by its first word), expecting success.
    fn run(&mut self, args: &[&str]) -> String {
        self.run_as(args[0], args, 0)
    }

    /// Starts `args` in the background with stdout to `file`.
    fn spawn(&self, args: &[&str], file: &Path) -> Child {
        let out = std::fs::File::create(file).expect("output file");
        self.command(args)
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn loractl")
    }
}

/// Waits for `child` up to `timeout`; its exit code.
fn finish(mut child: Child, timeout: Duration, what: &str) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not return within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `text` decoded as the wire type the binding names (a macro: this crate does not depend on serde,
/// whose `DeserializeOwned` a function would need).
macro_rules! decodes {
    ($what:expr, $text:expr $(,)?) => {{
        let text: &str = &$text;
        serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{}: not the wire type ({e}): {text}", $what))
    }};
}

#[test]
fn every_subcommand_prints_the_json_protocol_md_documents() {
    let doc = protocol_md();
    let examples = documented(&doc);
    let names: BTreeSet<String> = examples
        .keys()
        .map(|n| n.split_whitespace().next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        names,
        subcommands(),
        "PROTOCOL.md's loractl --json section must show every subcommand of loractl --help"
    );

    let d = TestDaemon::start();
    let dir = d.dir.path();
    let data = dir.join("data.jsonl");
    write_dataset(&data, 64);
    let (model, data) = (
        tiny_model().display().to_string(),
        data.display().to_string(),
    );
    let mut cli = Cli {
        d: &d,
        outputs: BTreeMap::new(),
    };

    let status: DaemonStatus = decodes!("status", &cli.run(&["status"]));
    assert_eq!(status.jobs, 0);
    let templates: Vec<Template> = decodes!("templates", &cli.run(&["templates"]));
    assert!(templates.iter().any(|t| t.name == "basic-fine-tune"));

    let mut submit = vec![
        "submit".to_string(),
        "--template".into(),
        "basic-fine-tune".into(),
        "--model".into(),
        model,
        "--data".into(),
        data,
    ];
    for (k, v) in fast_with(&[("max_steps", "30"), ("checkpoint_every", "10")]) {
        submit.extend(["--set".to_string(), format!("{k}={v}")]);
    }
    let submit: Vec<&str> = submit.iter().map(String::as_str).collect();
    let dry = [&submit[..], &["--dry-run"][..]].concat();
    let estimate: Estimate = decodes!("dry run", &cli.run_as("submit --dry-run", &dry, 0));
    assert_eq!(estimate.examples, Some(64));

    // Job a trains to the end, 2 s from now: time for watch and logs -f to be following it.
    let a_args = [
        &submit[..],
        &["--not-before", "+2s", "--on-finish", "echo done"][..],
    ]
    .concat();
    let a: JobRecord = decodes!("submit", &cli.run(&a_args));
    assert_eq!(
        (a.state, a.on_finish.as_deref()),
        (JobState::Queued, Some("echo done"))
    );
    let a_id = a.id.to_string();
    let a_id = a_id.as_str();
    let (watch_out, logs_out) = (dir.join("watch.jsonl"), dir.join("logs.jsonl"));
    let watch = cli.spawn(&["watch", a_id], &watch_out);
    let logs_f = cli.spawn(&["logs", "-f", a_id], &logs_out);
    let done: JobRecord = decodes!("wait", &cli.run(&["wait", a_id, "--timeout", "120"]));
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    assert_eq!(finish(watch, Duration::from_secs(30), "watch"), 0);
    assert_eq!(finish(logs_f, Duration::from_secs(30), "logs -f"), 0);
    let read = |p: &Path| std::fs::read_to_string(p).expect("output");
    let watched = read(&watch_out);
    for line in watched.lines() {
        match serde_json::from_str::<Value>(line).map(|v| v.get("seq").is_some()) {
            Ok(true) => {
                let _: Event = decodes!("watch event", line);
            }
            _ => {
                let _: JobRecord = decodes!("watch record", line);
            }
        }
    }
    assert!(
        watched
            .lines()
            .last()
            .is_some_and(|l| l.contains("\"completed\"")),
        "watch ends with the final record: {watched}"
    );
    cli.outputs.insert("watch".into(), watched);
    cli.outputs.insert("logs -f".into(), read(&logs_out));

    let list: Vec<JobRecord> = decodes!("list", &cli.run(&["list"]));
    assert_eq!(list.len(), 1);
    let shown: JobRecord = decodes!("show", &cli.run(&["show", a_id]));
    assert!(shown.progress.loss_ema.is_some() && shown.first_started_at_ms.is_some());
    let points: Vec<MetricPoint> = decodes!("metrics", &cli.run(&["metrics", a_id]));
    assert_eq!(points.len(), 30);
    let tail: Vec<MetricPoint> = decodes!(
        "metrics --since",
        &cli.run(&["metrics", a_id, "--since", "29"])
    );
    assert_eq!(tail.len(), 1);
    let checkpoints: Vec<CheckpointInfo> =
        decodes!("checkpoints", &cli.run(&["checkpoints", a_id]));
    assert!(!checkpoints.is_empty());
    let lines: Vec<Value> = decodes!("logs", &cli.run(&["logs", a_id]));
    assert!(
        lines
            .iter()
            .any(|l| l["source"] == "hook" && l["text"] == "done"),
        "the hook's output is in the log: {lines:?}"
    );
    let zip = dir.join("a.zip").display().to_string();
    let exported: ExportInfo = decodes!(
        "export",
        &cli.run(&["export", a_id, "--format", "zip", "--out", &zip]),
    );
    assert_eq!(exported.out, zip);
    let svg = dir.join("a.svg").display().to_string();
    let plotted: Value = decodes!("plot", &cli.run(&["plot", a_id, "--out", &svg]));
    assert_eq!(plotted["points"][0], 30);

    // Job b waits an hour: every queue command on it, and the exit codes of wait and watch.
    let b_args = [&submit[..], &["--not-before", "+1h"][..]].concat();
    let b: JobRecord = decodes!("submit", &cli.run(&b_args));
    let b_id = b.id.to_string();
    let b_id = b_id.as_str();
    let held: JobRecord = decodes!("hold", &cli.run(&["hold", b_id]));
    assert_eq!(held.state, JobState::Paused);
    let timed_out = cli.run_as("wait (timeout)", &["wait", b_id, "--timeout", "0.3"], 3);
    assert_eq!(
        timed_out, "",
        "a wait that times out prints nothing on stdout"
    );
    let paused = cli.run_as("watch (paused)", &["watch", b_id], 4);
    let last: JobRecord = decodes!("watch", paused.lines().last().unwrap_or_default());
    assert_eq!(last.state, JobState::Paused);
    let queue: [&[&str]; 5] = [
        &["release", b_id],
        &["priority", b_id, "5"],
        &["pause", b_id],
        &["resume", b_id],
        &["cancel", b_id],
    ];
    for args in queue {
        let r: JobRecord = decodes!(args[0], &cli.run(args));
        assert_eq!(r.id, b.id);
    }
    let cancelled: JobRecord =
        decodes!("wait", &cli.run_as("wait (cancelled)", &["wait", b_id], 1));
    assert_eq!(
        (cancelled.state, cancelled.priority),
        (JobState::Cancelled, 5)
    );
    let retried: JobRecord = decodes!("retry", &cli.run(&["retry", b_id]));
    assert_eq!(retried.state, JobState::Queued);
    cli.run_as("cancel (again)", &["cancel", b_id], 0);
    let deleted: Value = decodes!("delete", &cli.run(&["delete", b_id]));
    assert_eq!(deleted["record_removed"], true);
    let kept: Value = decodes!(
        "delete",
        &cli.run_as("delete (kept)", &["delete", a_id, "--keep-record"], 0)
    );
    assert_eq!(kept["record_removed"], false);

    // Errors: nothing on stdout, `loractl: <code>: <message>` on stderr; usage errors exit 2.
    let missing = cli.command(&["show", "999"]).output().expect("show 999");
    assert_eq!(missing.status.code(), Some(1));
    assert!(missing.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.starts_with("loractl: not_found: "), "{stderr}");
    let usage = cli.command(&["bogus"]).output().expect("bogus");
    assert_eq!(usage.status.code(), Some(2));

    let stopped: Value = decodes!("shutdown", &cli.run(&["shutdown"]));
    assert_eq!(stopped["shutdown"], true);

    let mut problems = Vec::new();
    for (name, ex) in &examples {
        match cli.outputs.get(name) {
            Some(stdout) => problems.extend(check(name, ex, stdout)),
            None => problems.push(format!("{name}: documented, but this test did not run it")),
        }
    }
    assert!(
        problems.is_empty(),
        "loractl --json and PROTOCOL.md disagree:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_shape_check_catches_a_missing_or_extra_key() {
    let doc = serde_json::json!({"job": 1, "removed": [], "record_removed": true});
    let extra = serde_json::json!({"job": 1, "removed": [], "record_removed": true, "x": 0});
    let short = serde_json::json!({"job": 1, "removed": []});
    assert!(fits(&doc, &doc, false));
    assert!(!fits(&doc, &extra, false));
    assert!(fits(&doc, &extra, true));
    assert!(!fits(&doc, &short, true));
    assert!(!fits(&doc, &serde_json::json!([doc.clone()]), true));
    let ex = Example {
        command: "$ loractl --json delete 1".into(),
        values: vec![doc],
        subset: false,
    };
    assert!(check(
        "delete",
        &ex,
        "{\"job\": 1, \"removed\": [], \"record_removed\": true}"
    )
    .is_empty());
    assert_eq!(check("delete", &ex, "{\"job\": 1}\n{\"job\": 2}").len(), 3);
    assert_eq!(check("delete", &ex, "").len(), 1);
}
