//! System mode (lorad started as root, without `--user`) as unprivileged users meet it: their workers
//! run as them, what they cannot read or write is refused naming the path, hostile files and connections
//! do not stall other clients, the socket is the group's, and quotas hold.
//!
//! Each test creates its users and groups (dropped, and deleted, even on panic) and needs root; as
//! another user it prints "skipped: needs root (creates users)" and returns. Users act through
//! `runuser -u USER -- loractl ...`; the test process itself (root) is an admin.
use super::*;
use lorad_tests::system::{
    copy_dir, output_within, owners, p99, proc_status, reset_peak_rss, root_or_skip, serial,
    set_mode, snapshot, vm_kib, SystemDaemon, SystemOptions, TestGroup, TestUser,
};
use lorad_tests::{bin, plugin_lib, process_alive, write_dataset};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `submit` arguments for `model` and `data`, then `extra`.
pub(crate) fn submit_args(model: &Path, data: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "submit",
        "--template",
        "basic-fine-tune",
        "--model",
        &model.display().to_string(),
        "--data",
        &data.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

pub(crate) fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The job id `loractl submit` printed (it must have succeeded).
pub(crate) fn submitted(out: &Output) -> u64 {
    assert!(out.status.success(), "submit failed: {}", text(&out.stderr));
    text(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("submit printed {:?}, not a job id", text(&out.stdout)))
}

/// Asserts loractl failed (exit 1) with every needle in its stderr; returns the stderr.
fn refused(out: &Output, needles: &[&str]) -> String {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a refusal (exit 1); stdout {:?}, stderr {err:?}",
        text(&out.stdout)
    );
    for needle in needles {
        assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
    }
    err
}

/// Every user's jobs (root is an admin), as (id, state): what a refused request must not change.
fn jobs_of_all(c: &Client) -> Vec<(JobId, JobState)> {
    c.list(None, true)
        .expect("list --all")
        .into_iter()
        .map(|j| (j.id, j.state))
        .collect()
}

/// The numbers of a /proc status line such as "Uid:\t1002\t1002\t1002\t1002".
fn numbers(line: &str) -> Vec<u32> {
    line.split_whitespace()
        .map(|n| n.parse().expect("number"))
        .collect()
}

/// A completed two-step job of `user`'s, submitted and awaited through loractl; its id.
fn completed_job(d: &SystemDaemon, user: &TestUser, model: &Path, data: &Path) -> String {
    let sock = d.socket();
    let args = submit_args(model, data, &["--set", "max_steps=2"]);
    let id = submitted(&user.loractl(&sock, &strs(&args))).to_string();
    let out = user.loractl(&sock, &["wait", &id, "--timeout", "300"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "job {id}: {}\n{}",
        text(&out.stderr),
        d.daemon_log()
    );
    id
}

#[test]
fn inputs_and_targets_out_of_the_users_reach_are_refused_naming_the_path() {
    if !root_or_skip() {
        return;
    }
    let _serial = serial();
    let group = TestGroup::new();
    let alice = TestUser::new(&[&group]);
    let bob = TestUser::new(&[&group]);
    let d = SystemDaemon::started(&SystemOptions::new(&group));
    let c = d.client();
    let sock = d.socket();
    let model = d.model();
    let data = d.dataset("data.jsonl", 64);
    let b_home = d.home(&bob);
    let uid = alice.uid.to_string();

    // A root-only dataset and bob's private model: alice can read neither (the daemon, root, could).
    let secret = d.dir.path().join("secret.jsonl");
    write_dataset(&secret, 16);
    set_mode(&secret, 0o600);
    let b_model = b_home.join("model");
    copy_dir(&model, &b_model);
    bob.chown_r(&b_model);
    for (m, data, named) in [(&model, &secret, &secret), (&b_model, &data, &b_model)] {
        let out = alice.loractl(&sock, &strs(&submit_args(m, data, &[])));
        let named = named.display().to_string();
        refused(&out, &["permission_denied", &named, &uid]);
        assert!(jobs_of_all(&c).is_empty(), "a refused submit queued a job");
    }

    // Export targets alice cannot write: in a root-owned dir, in bob's private dir. Nothing created.
    let id = completed_job(&d, &alice, &model, &data);
    let root_dir = d.dir.path().join("root-only");
    std::fs::create_dir(&root_dir).expect("mkdir");
    set_mode(&root_dir, 0o755);
    for target in [root_dir.join("peft"), b_home.join("peft")] {
        let t = target.display().to_string();
        let out = alice.loractl(&sock, &["export", &id, "--format", "peft", "--out", &t]);
        let err = refused(&out, &["permission_denied", &uid]);
        // loractl's own error line names the target, or the directory it cannot write in.
        let parent = target.parent().expect("parent").display().to_string();
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.contains(&t) || last.contains(&parent),
            "{last:?} names neither {t} nor {parent}"
        );
        assert!(!target.exists(), "{t} was created by a refused export");
    }
}

#[test]
fn outputs_onto_existing_paths_of_anyone_are_refused_and_leave_them_alone() {
    if !root_or_skip() {
        return;
    }
    let _serial = serial();
    let group = TestGroup::new();
    let alice = TestUser::new(&[&group]);
    let bob = TestUser::new(&[&group]);
    let d = SystemDaemon::started(&SystemOptions::new(&group));
    let c = d.client();
    let sock = d.socket();
    let model = d.model();
    let data = d.dataset("data.jsonl", 64);
    let a_home = d.home(&alice);
    let id = completed_job(&d, &alice, &model, &data);
    let root_dir = d.dir.path().join("root-dir");
    std::fs::create_dir(&root_dir).expect("mkdir");
    set_mode(&root_dir, 0o755);
    std::fs::write(root_dir.join("keep.txt"), "root's").expect("write");

    // Outputs onto what exists, of anyone: alice's own dir and file, bob's dir, root's dir. Refused,
    // and nothing in them (nor beside alice's) changes.
    let a_dir = a_home.join("existing-dir");
    std::fs::create_dir(&a_dir).expect("mkdir");
    std::fs::write(a_dir.join("keep.txt"), "alice's").expect("write");
    alice.chown_r(&a_dir);
    let a_file = a_home.join("existing-file");
    std::fs::write(&a_file, "alice's file").expect("write");
    alice.chown(&a_file);
    let b_shared = d.dir.path().join("bob-shared");
    std::fs::create_dir(&b_shared).expect("mkdir");
    std::fs::write(b_shared.join("keep.txt"), "bob's").expect("write");
    set_mode(&b_shared, 0o755);
    bob.chown_r(&b_shared);
    let watched = [a_home.clone(), b_shared.clone(), root_dir.clone()];
    let before: Vec<_> = watched.iter().map(|p| snapshot(p)).collect();
    let jobs_before = jobs_of_all(&c);
    for target in [&a_dir, &a_file, &b_shared, &root_dir] {
        let t = target.display().to_string();
        let out = alice.loractl(&sock, &strs(&submit_args(&model, &data, &["--out", &t])));
        refused(&out, &[&t, "already exists"]);
        assert_eq!(
            jobs_of_all(&c),
            jobs_before,
            "a refused submit changed the jobs"
        );
        let format = if target.is_file() { "zip" } else { "peft" };
        let out = alice.loractl(&sock, &["export", &id, "--format", format, "--out", &t]);
        refused(&out, &[&t, "already exists"]);
    }
    for (path, was) in watched.iter().zip(&before) {
        assert_eq!(
            &snapshot(path),
            was,
            "{} changed after refused outputs",
            path.display()
        );
    }
    assert_eq!(jobs_of_all(&c), jobs_before);

    // What alice may do still works, and the files are hers.
    let exported = a_home.join("exported");
    let e = exported.display().to_string();
    let out = alice.loractl(&sock, &["export", &id, "--format", "peft", "--out", &e]);
    assert!(out.status.success(), "export: {}", text(&out.stderr));
    let files = owners(&exported);
    assert!(files.len() > 1, "export wrote nothing: {files:?}");
    for (path, owner) in files {
        assert_eq!(
            owner,
            alice.uid,
            "{} is owned by uid {owner}",
            path.display()
        );
    }
}

#[test]
fn a_users_worker_runs_as_that_user_and_its_job_files_are_private() {
    if !root_or_skip() {
        return;
    }
    let _serial = serial();
    let group = TestGroup::new();
    let alice = TestUser::new(&[&group]);
    let bob = TestUser::new(&[&group]);
    let d = SystemDaemon::started(&SystemOptions::new(&group));
    let c = d.client();
    let sock = d.socket();
    let (model, data) = (d.model(), d.dataset("data.jsonl", 64));

    let out = alice.loractl(
        &sock,
        &strs(&submit_args(
            &model,
            &data,
            &["--set", "max_steps=100000", "--set", "checkpoint_every=2"],
        )),
    );
    let id = JobId(submitted(&out));
    // Wait for a checkpoint: by then the worker has written the files a job dir holds.
    let mut sub = c.subscribe(Some(id), 0).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sub.next_timeout(left) {
            Ok(Some(event)) => match event.body {
                EventBody::Checkpoint { .. } => break,
                EventBody::StateChanged { to, .. } if to.is_terminal() => panic!(
                    "job ended ({to:?}): {:?}\n{}",
                    c.get(id).ok().and_then(|j| j.reason),
                    d.daemon_log()
                ),
                _ => {}
            },
            _ => panic!("no checkpoint of job {id} in 180 s\n{}", d.daemon_log()),
        }
    }
    let job = c.get(id).expect("get");
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.owner_uid, alice.uid);
    let pid = job.worker_pid.expect("a running job's worker_pid");

    // The worker is alice: every uid and gid, and her groups only.
    let uid = proc_status(pid, "Uid").expect("worker alive");
    assert_eq!(numbers(&uid), vec![alice.uid; 4], "worker {pid} Uid: {uid}");
    let gid = proc_status(pid, "Gid").expect("worker alive");
    assert_eq!(numbers(&gid), vec![alice.gid; 4], "worker {pid} Gid: {gid}");
    let groups = numbers(&proc_status(pid, "Groups").expect("worker alive"));
    assert!(groups.contains(&group.gid), "worker groups {groups:?}");
    assert!(
        groups.iter().all(|g| *g == alice.gid || *g == group.gid),
        "worker groups {groups:?} beyond alice's {} and {}",
        alice.gid,
        group.gid
    );

    // Her job dir and everything in it are hers, and private.
    let job_dir = d.job_dir(id);
    let log = job_dir.join("job.log");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").mode() & 0o777;
    assert_eq!(mode(&job_dir), 0o700, "{}", job_dir.display());
    assert_eq!(mode(&log), 0o600, "{}", log.display());
    let files = owners(&job_dir);
    assert!(files.len() > 2, "job dir holds only {files:?}");
    for (path, owner) in &files {
        assert_eq!(
            *owner,
            alice.uid,
            "{} is owned by uid {owner}",
            path.display()
        );
    }
    for (what, out) in [
        ("cat job.log", bob.command("cat").arg(&log).output()),
        ("ls the job dir", bob.command("ls").arg(&job_dir).output()),
    ] {
        let out = out.expect("runuser");
        assert!(
            !out.status.success(),
            "bob could {what}: {}",
            text(&out.stdout)
        );
    }
    let out = bob.loractl(&sock, &["logs", &id.to_string()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "bob read alice's log: {}",
        text(&out.stdout)
    );
    let out = bob.loractl(&sock, &["cancel", &id.to_string()]);
    assert_eq!(out.status.code(), Some(1), "bob cancelled alice's job");
    assert_eq!(c.get(id).expect("get").state, JobState::Running);

    c.cancel(id).expect("cancel");
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "worker {pid} alive 10 s after cancel"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn special_files_as_datasets_are_refused_quickly_while_others_are_served() {
    if !root_or_skip() {
        return;
    }
    let _serial = serial();
    let group = TestGroup::new();
    let alice = TestUser::new(&[&group]);
    let d = SystemDaemon::started(&SystemOptions::new(&group));
    let c = d.client();
    let model = d.model();
    let fifo = d.dir.path().join("data.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    alice.chown(&fifo);
    let dir = d.dir.path().join("dir.jsonl");
    std::fs::create_dir(&dir).expect("mkdir");
    set_mode(&dir, 0o755);
    // 100 MB of one JSON line.
    let long = d.dir.path().join("one-line.jsonl");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&long).expect("create"));
        f.write_all(b"{\"text\": \"").expect("write");
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..100 {
            f.write_all(&chunk).expect("write");
        }
        f.write_all(b"\"}\n").expect("write");
        f.flush().expect("flush");
    }
    set_mode(&long, 0o644);

    // Another client asks for status all along (from before the first attempt to after the last).
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (started, running) = mpsc::channel();
    let pinger = {
        let (stop, socket, answered) = (stop.clone(), d.socket(), answered.clone());
        std::thread::spawn(move || {
            let c = Client::connect(socket).expect("connect");
            let mut latencies = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                c.status().expect("status during the attempts");
                latencies.push(t.elapsed());
                answered.fetch_add(1, Ordering::SeqCst);
                if latencies.len() == 1 {
                    let _ = started.send(());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            latencies
        })
    };
    running
        .recv_timeout(Duration::from_secs(10))
        .expect("the status thread got no answer");
    let pid = d.pid();
    let peak_reset = reset_peak_rss(pid);
    let rss_before = vm_kib(pid, "VmRSS");

    let dev_zero = PathBuf::from("/dev/zero");
    let cases: [(&Path, &[&str], &[&str]); 4] = [
        (&dev_zero, &["not a regular file", "device"], &[]),
        (&fifo, &["FIFO", "fifo", "not a regular file"], &[]),
        (&dir, &["directory", "not a regular file"], &[]),
        (&long, &[], &["line 1", "longer than"]),
    ];
    // Rounds of the four attempts until the other client has had at least 200 answers meanwhile.
    let mut rounds = 0;
    while rounds < 3 || (answered.load(Ordering::SeqCst) < 200 && rounds < 100) {
        rounds += 1;
        for (path, any, all) in cases {
            let p = path.display().to_string();
            let mut cmd = alice.command(bin("loractl"));
            cmd.arg("--socket")
                .arg(d.socket())
                .args(submit_args(&model, path, &[]));
            let (out, took) = output_within(cmd, Duration::from_secs(30))
                .unwrap_or_else(|t| panic!("submit of {p} hung ({t:?})\n{}", d.daemon_log()));
            let err = refused(&out, &[&p]);
            assert!(
                any.is_empty() || any.iter().any(|n| err.contains(n)),
                "{err:?} mentions none of {any:?}"
            );
            for needle in all {
                assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
            }
            assert!(took < Duration::from_secs(5), "refusing {p} took {took:?}");
            if rounds == 1 {
                println!("{p}: refused in {took:?}: {}", err.trim());
            }
        }
    }
    println!("{rounds} rounds of attempts");
    assert!(jobs_of_all(&c).is_empty(), "a refused submit queued a job");

    stop.store(true, Ordering::SeqCst);
    let latencies = pinger.join().expect("status thread");
    let worst = p99(&latencies);
    println!("status p99 {worst:?} over {} calls", latencies.len());
    assert!(worst < Duration::from_millis(50), "status p99 {worst:?}");
    let peak = vm_kib(pid, if peak_reset { "VmHWM" } else { "VmRSS" });
    let grown = peak.saturating_sub(rss_before);
    println!("daemon RSS {rss_before} KiB before, peak {peak} KiB (reset: {peak_reset})");
    assert!(grown < 64 * 1024, "daemon RSS grew by {grown} KiB");
}

#[test]
fn the_socket_is_0660_with_its_group_under_any_umask() {
    if !root_or_skip() {
        return;
    }
    let _serial = serial();
    let group = TestGroup::new();
    let insider = TestUser::new(&[&group]);
    let outsider = TestUser::new(&[]);
    for mask in [0o000, 0o077] {
        let mut opts = SystemOptions::new(&group);
        opts.umask = Some(mask);
        let d = SystemDaemon::started(&opts);
        let meta = std::fs::metadata(d.socket()).expect("stat socket");
        assert!(meta.file_type().is_socket());
        assert_eq!(
            meta.mode() & 0o777,
            0o660,
            "socket mode under umask {mask:03o}"
        );
        assert_eq!(meta.gid(), group.gid, "socket group under umask {mask:03o}");

        let out = outsider.loractl(&d.socket(), &["status"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "outsider: {err}");
        assert!(
            err.to_lowercase().contains("permission denied"),
            "outsider got {err:?}"
        );
        let out = insider.loractl(&d.socket(), &["status"]);
        assert_eq!(out.status.code(), Some(0), "insider: {}", text(&out.stderr));
    }

    // A socket group that does not exist stops the start, naming it.
    let missing = format!("lt{}nosuchgroup", std::process::id() % 100_000);
    assert!(nix::unistd::Group::from_name(&missing)
        .expect("getgrnam")
        .is_none());
    let mut opts = SystemOptions::new(&group);
    opts.socket_group = missing.clone();
    let mut d = SystemDaemon::new();
    let log = d
        .try_start(&opts)
        .expect_err("lorad started with a missing socket group");
    assert!(log.contains(&missing), "{log}");
}

#[test]
fn plugin_dirs_and_files_a_user_can_write_are_rejected_in_system_mode() {
    if !root_or_skip() {
        return;
    }
    let _serial = serial();
    let group = TestGroup::new();
    let alice = TestUser::new(&[&group]);
    let mut d = SystemDaemon::new();
    let acme = plugin_lib("acme_plugin");
    let mkdir = |name: &str, mode: u32| {
        let dir = d.dir.path().join(name);
        std::fs::create_dir(&dir).expect("mkdir");
        set_mode(&dir, mode);
        dir
    };
    // Alice's own dir; a root dir anyone may write; a root dir holding a library of alice's.
    let owned = mkdir("plugins-alice", 0o755);
    std::os::unix::fs::symlink(&acme, owned.join("libacme_plugin.so")).expect("link");
    alice.chown(&owned);
    let open = mkdir("plugins-open", 0o777);
    std::os::unix::fs::symlink(&acme, open.join("libacme_plugin.so")).expect("link");
    let user_file = mkdir("plugins-userfile", 0o755);
    let lib = user_file.join("libacme_plugin.so");
    std::fs::copy(&acme, &lib).expect("copy");
    set_mode(&lib, 0o755);
    alice.chown(&lib);

    let mut opts = SystemOptions::new(&group);
    opts.extra_plugin_dirs = vec![owned.clone(), open.clone(), user_file.clone()];
    d.start(&opts);
    let plugins = d.client().status().expect("status").plugins;
    for dir in [&owned, &open, &user_file] {
        let rejected = plugins
            .rejected
            .iter()
            .find(|r| Path::new(&r.path).starts_with(dir))
            .unwrap_or_else(|| panic!("{} not rejected: {plugins:#?}", dir.display()));
        let reason = rejected.reason.to_lowercase();
        assert!(
            ["owned", "owner", "writable"]
                .iter()
                .any(|w| reason.contains(w)),
            "{}: reason {:?} says nothing of ownership or writability",
            dir.display(),
            rejected.reason
        );
    }
    let from_user_dirs = |path: &str| {
        [&owned, &open, &user_file]
            .iter()
            .any(|dir| Path::new(path).starts_with(dir))
    };
    assert!(
        !plugins.loaded.iter().any(|p| from_user_dirs(&p.path)),
        "{plugins:#?}"
    );
    assert!(
        plugins.loaded.iter().any(|p| p.name == "lorad-templates"),
        "the root-owned plugin dir still loads: {plugins:#?}"
    );

    // `loractl status --json` shows the same.
    let out = Command::new(bin("loractl"))
        .arg("--socket")
        .arg(d.socket())
        .args(["--json", "status"])
        .output()
        .expect("loractl");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let paths: Vec<&str> = status["plugins"]["rejected"]
        .as_array()
        .expect("plugins.rejected")
        .iter()
        .filter_map(|r| r["path"].as_str())
        .collect();
    for dir in [&owned, &open, &user_file] {
        assert!(
            paths.iter().any(|p| Path::new(p).starts_with(dir)),
            "{} not in {paths:?}",
            dir.display()
        );
    }
}

#[test]
fn quotas_refuse_with_quota_exceeded_and_change_nothing() {
    if !root_or_skip() {
        return;
    }
    let _serial = serial();
    let group = TestGroup::new();
    let alice = TestUser::new(&[&group]);
    let bob = TestUser::new(&[&group]);
    let carol = TestUser::new(&[&group]);
    let mut opts = SystemOptions::new(&group);
    opts.config = Some(
        "[limits]\nmax_queued_per_user = 2\nmax_running_per_user = 1\nmax_priority = 10\n".into(),
    );
    let d = SystemDaemon::started(&opts);
    let c = d.client();
    let sock = d.socket();
    let (model, data) = (d.model(), d.dataset("data.jsonl", 64));
    let long = submit_args(&model, &data, &["--set", "max_steps=100000"]);

    // Bob's job holds the (one) device, so what others submit stays queued.
    let b1 = JobId(submitted(&bob.loractl(&sock, &strs(&long))));
    let (job, _) = wait_for(&c, b1, Duration::from_secs(120), |s| {
        s == JobState::Running || s.is_terminal()
    });
    assert_eq!(
        job.state,
        JobState::Running,
        "{:?}\n{}",
        job.reason,
        d.daemon_log()
    );

    // max_running_per_user = 1: bob's second job is refused, or queued and not started beside the
    // first.
    let before = jobs_of_all(&c);
    let out = bob.loractl(&sock, &strs(&long));
    let b2 = if out.status.success() {
        let b2 = JobId(submitted(&out));
        println!("max_running_per_user: bob's second job {b2} was queued, not refused");
        Some(b2)
    } else {
        refused(&out, &["quota_exceeded"]);
        assert_eq!(jobs_of_all(&c), before, "a refused submit changed the jobs");
        None
    };

    // max_queued_per_user = 2: alice's third queued job is refused.
    let mut queued = Vec::new();
    let (out, before) = loop {
        let before = jobs_of_all(&c);
        let out = alice.loractl(&sock, &strs(&long));
        if !out.status.success() || queued.len() == 3 {
            break (out, before);
        }
        queued.push(JobId(submitted(&out)));
    };
    assert_eq!(
        queued.len(),
        2,
        "alice queued {queued:?} under max_queued_per_user = 2"
    );
    refused(&out, &["quota_exceeded"]);
    assert_eq!(jobs_of_all(&c), before, "a refused submit changed the jobs");

    // max_priority = 10: above it, at submit and later; at it, fine.
    let high = submit_args(&model, &data, &["--priority", "11"]);
    let out = carol.loractl(&sock, &strs(&high));
    refused(&out, &["quota_exceeded"]);
    assert_eq!(jobs_of_all(&c), before, "a refused submit changed the jobs");
    let a1 = queued[0];
    let out = alice.loractl(&sock, &["priority", &a1.to_string(), "11"]);
    refused(&out, &["quota_exceeded"]);
    assert_eq!(c.get(a1).expect("get").priority, 0);
    let ok = submit_args(&model, &data, &["--priority", "10"]);
    let c1 = JobId(submitted(&carol.loractl(&sock, &strs(&ok))));
    assert_eq!(c.get(c1).expect("get").priority, 10);

    if let Some(b2) = b2 {
        assert_eq!(c.get(b2).expect("get").state, JobState::Queued);
    }
    assert_eq!(c.get(b1).expect("get").state, JobState::Running);
    for job in c.list(None, true).expect("list") {
        if !job.state.is_terminal() {
            c.cancel(job.id).expect("cancel");
        }
    }
}

#[test]
fn a_ten_megabyte_job_name_is_refused_and_the_daemon_keeps_answering() {
    if !root_or_skip() {
        return;
    }
    let _serial = serial();
    let group = TestGroup::new();
    let d = SystemDaemon::started(&SystemOptions::new(&group));
    let (model, data) = (d.model(), d.dataset("data.jsonl", 64));
    let mut s = spec(&model, &data, &[("max_steps", "2")]);
    s.name = Some("n".repeat(10 << 20));
    let err = d
        .client()
        .submit(s)
        .expect_err("a 10 MB job name must be refused");
    let msg: String = err.to_string().chars().take(200).collect();
    println!("refused: {msg}");
    // A new connection is answered, and nothing was queued.
    let c = d.client();
    c.status().expect("status after the refusal");
    assert!(jobs_of_all(&c).is_empty(), "the job was queued");
}

/// A job's hooks (the admin's `[[hooks]]` and the user's `--on-finish`) run as the job's owner: what
/// they write is the owner's, and they cannot write where the owner cannot.
#[test]
fn hooks_run_as_the_jobs_owner() {
    if !root_or_skip() {
        return;
    }
    let _serial = serial();
    let group = TestGroup::new();
    let alice = TestUser::new(&[&group]);
    let mut opts = SystemOptions::new(&group);
    let root_only = tempfile::tempdir().expect("tempdir");
    let forbidden = root_only.path().join("written-by-hook");
    opts.config = Some(format!(
        "[[hooks]]\nevents = [\"completed\"]\ncommand = 'id -u > {} 2>&1 || echo refused'\n",
        forbidden.display()
    ));
    let d = SystemDaemon::started(&opts);
    let c = d.client();
    let home = d.home(&alice);
    let mine = home.join("hook-uid");
    let (model, data) = (d.model(), d.dataset("data.jsonl", 64));
    let on_finish = format!("id -u > {}; id -g >> {}", mine.display(), mine.display());
    let out = alice.loractl(
        &d.socket(),
        &strs(&submit_args(
            &model,
            &data,
            &["--set", "max_steps=3", "--on-finish", &on_finish],
        )),
    );
    let id = JobId(submitted(&out));
    let (done, _) = wait_for(&c, id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    // Two hooks: wait for both notices.
    let mut sub = c.subscribe(Some(id), 0).expect("subscribe");
    let mut notices = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while notices.len() < 2 && Instant::now() < deadline {
        if let Ok(Some(e)) = sub.next_timeout(Duration::from_secs(1)) {
            if let EventBody::Notice { text, .. } = e.body {
                if text.starts_with("hook") {
                    notices.push(text);
                }
            }
        }
    }
    assert_eq!(notices.len(), 2, "{notices:?}");
    let written = std::fs::read_to_string(&mine).expect("the on_finish hook wrote");
    assert_eq!(
        written.split_whitespace().collect::<Vec<_>>(),
        vec![alice.uid.to_string(), alice.gid.to_string()],
        "the hook ran as alice"
    );
    let meta = std::fs::metadata(&mine).expect("stat");
    assert_eq!((meta.uid(), meta.gid()), (alice.uid, alice.gid));
    // The admin's hook ran as alice too, so the root-only directory stayed closed to it.
    assert!(!forbidden.exists(), "a hook wrote where only root may");
    let log = std::fs::read_to_string(d.job_dir(id).join("job.log")).expect("job.log");
    assert!(
        log.contains("refused") || log.contains("Permission denied"),
        "{log}"
    );
}
