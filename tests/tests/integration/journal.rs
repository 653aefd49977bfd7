//! A journal that is lost, emptied or damaged: the daemon says so (naming the file and what to do)
//! instead of starting over or panicking; `lorad recover-journal` rebuilds the jobs from their
//! directories; `lorad check` reports damage; `lorad backup` copies a live journal.
use super::*;
use lorad_tests::{bin, tiny_model, write_dataset, TestDaemon};
use std::process::{Command, Output};

/// Runs `lorad ARGS --user --socket S --state-dir D` for `d`'s files (not as a daemon: a command that
/// ends, or a daemon start that must fail), with a time limit.
fn lorad(d: &TestDaemon, args: &[&str]) -> Output {
    let daemon_only: &[&str] = if args.is_empty() {
        &["--no-default-plugins"]
    } else {
        &[]
    };
    let mut child = Command::new(bin("lorad"))
        .args(args)
        .arg("--user")
        .arg("--socket")
        .arg(d.socket())
        .arg("--state-dir")
        .arg(d.state_dir())
        .args(daemon_only)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run lorad");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "lorad {args:?} did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A daemon with one completed job (6 steps) and one paused job.
fn two_jobs() -> (TestDaemon, JobRecord, JobRecord) {
    let d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let c = d.client();
    let done = c
        .submit(spec(tiny_model(), &data, &[("max_steps", "6")]))
        .expect("submit");
    let (done, _) = wait_for(&c, done.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    let held = c
        .submit(spec(tiny_model(), &data, &[("max_steps", "6")]))
        .expect("submit");
    let held = c.pause(held.id).expect("pause");
    let (held, _) = wait_for(&c, held.id, Duration::from_secs(120), |s| {
        s == JobState::Paused
    });
    (d, done, held)
}

#[test]
fn an_empty_journal_beside_job_dirs_is_refused_and_recover_journal_restores_the_jobs() {
    let (mut d, done, held) = two_jobs();
    d.stop();
    let journal = d.state_dir().join("journal.redb");
    std::fs::write(&journal, b"").expect("empty the journal");

    let out = lorad(&d, &[]);
    assert!(
        !out.status.success(),
        "the daemon started on an empty journal"
    );
    let said = text(&out);
    assert!(
        said.contains(&journal.display().to_string())
            && said.contains("missing or empty")
            && said.contains("recover-journal"),
        "{said}"
    );

    let out = lorad(&d, &["recover-journal"]);
    assert!(out.status.success(), "{}", text(&out));
    println!("{}", text(&out));
    d.restart();
    let c = d.client();
    let jobs = c.list(None, false).expect("list");
    let got: Vec<(JobId, JobState, String)> = jobs
        .iter()
        .map(|j| (j.id, j.state, j.name.clone()))
        .collect();
    assert!(
        got.contains(&(done.id, JobState::Completed, done.name.clone())),
        "{got:?}"
    );
    // The held job has a directory from its submit on, so it is restored too, still held.
    assert!(
        got.contains(&(held.id, JobState::Paused, held.name.clone())),
        "{got:?}"
    );
    // The held job had a directory only if it ever started; either way its id is never reused.
    let data = d.dir.path().join("data.jsonl");
    let new = c
        .submit(spec(tiny_model(), &data, &[("max_steps", "2")]))
        .expect("submit");
    assert!(new.id > held.id && new.id > done.id, "id {} reused", new.id);
    // The restored job's adapter is still its own: export works.
    let out_dir = d.dir.path().join("exported");
    c.export(done.id, "peft", &out_dir.display().to_string(), None)
        .expect("export of a restored job");
}

#[test]
fn a_damaged_journal_is_named_not_a_panic_and_lorad_check_reports_it() {
    let (mut d, _, _) = two_jobs();
    d.stop();
    let journal = d.state_dir().join("journal.redb");
    let clean = std::fs::read(&journal).expect("read");
    let out = lorad(&d, &["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("clean"), "{}", text(&out));

    // 64 KiB of garbage in the middle of the file.
    let mut bad = clean.clone();
    let mid = bad.len() / 2;
    let mut x = 0x2545f4914f6cdd1du64;
    for b in bad.iter_mut().skip(mid).take(64 * 1024) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&journal, &bad).expect("write");
    let out = lorad(&d, &["check"]);
    let said = text(&out);
    println!("check of garbage: {said}");
    // Said as an error naming the file; no panic report of the process itself.
    assert!(
        !said.contains("thread '") && !said.contains("unreachable"),
        "{said}"
    );
    assert!(
        said.contains(&journal.display().to_string()) && said.contains("damaged"),
        "{said}"
    );
    let started = lorad_start_or_error(&mut d);
    if let Err(said) = started {
        assert!(
            said.contains(&journal.display().to_string()) && said.contains("damaged"),
            "{said}"
        );
        assert!(!said.contains("thread '"), "{said}");
    }
    d.stop();
    std::fs::write(&journal, &clean).expect("restore");

    // One metric point's bytes made undecodable: only that point is lost. The same bytes also sit in
    // the point's `metrics` event; try each place until `lorad check` names a metric record.
    let needle = b"data_wait_ms";
    let places: Vec<usize> = clean
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert!(!places.is_empty(), "no metric point in the journal");
    let hit = places.iter().find_map(|&at| {
        let mut flipped = clean.clone();
        flipped[at - 1] = 0xc1; // the key's string marker becomes a byte MessagePack never uses
        std::fs::write(&journal, &flipped).expect("write");
        let out = lorad(&d, &["check"]);
        let said = text(&out);
        said.contains("metrics  5 readable, 1 damaged")
            .then_some((out, said))
    });
    let (out, said) = hit.expect("no place of a metric record changed one metric point");
    println!("check of a flipped byte: {said}");
    assert_eq!(out.status.code(), Some(1), "{said}");
    d.restart();
    let c = d.client();
    let jobs = c.list(None, false).expect("list still works");
    assert_eq!(jobs.len(), 2);
    let points: usize = jobs
        .iter()
        .map(|j| c.metrics(j.id, None).expect("metrics still work").len())
        .sum();
    assert_eq!(
        points, 5,
        "one of the six points is damaged, the others are served"
    );
}

/// Starts the daemon; `Err(output)` if it exits instead (within 10 s).
fn lorad_start_or_error(d: &mut TestDaemon) -> Result<(), String> {
    let out = {
        let mut child = Command::new(bin("lorad"))
            .arg("--user")
            .arg("--socket")
            .arg(d.socket())
            .arg("--state-dir")
            .arg(d.state_dir())
            .arg("--no-default-plugins")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run lorad");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait().expect("wait").is_some() {
                break child.wait_with_output().expect("output");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    Err(text(&out))
}

#[test]
fn a_backup_of_a_live_journal_opens_with_every_job() {
    let (d, done, held) = two_jobs();
    let dir = d.dir.path().join("backups");
    let out = lorad(&d, &["backup", &dir.display().to_string()]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let copy = std::fs::read_dir(&dir)
        .expect("backup dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "redb"))
        .expect("a .redb copy");
    // The daemon kept serving meanwhile, and the copy is a journal with both jobs.
    assert!(d.client().status().is_ok());
    let j = lorad::journal::Journal::open(&copy).expect("the copy opens");
    assert_eq!(j.job(done.id).expect("job").state, JobState::Completed);
    assert_eq!(j.job(held.id).expect("job").state, JobState::Paused);
    assert_eq!(j.metrics(done.id, None).expect("metrics").len(), 6);
}
