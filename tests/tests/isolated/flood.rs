//! Connection floods against a system daemon under a 1024-descriptor limit: one user's idle and
//! slow connections do not starve other clients, and a flood that fills every connection slot leaves
//! an admin a way in and a job the descriptors it needs to start.
use super::security::{submit_args, submitted, text};
use super::wait_for;
use lorad_client::blocking::Client;
use lorad_schema::{JobId, JobState};
use lorad_tests::bin;
use lorad_tests::process_alive;
use lorad_tests::system::{
    output_within, p99, root_or_skip, serial, SystemDaemon, SystemOptions, TestGroup, TestUser,
};
use std::io::BufRead;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `calls` status requests on `c`, `pause` apart; their p99 latency must be under `bound`.
fn status_p99_under(c: &Client, calls: usize, pause: Duration, bound: Duration) {
    let mut latencies = Vec::new();
    for _ in 0..calls {
        let t = Instant::now();
        c.status().expect("status during the flood");
        latencies.push(t.elapsed());
        std::thread::sleep(pause);
    }
    let worst = p99(&latencies);
    println!("status p99 {worst:?} over {calls} calls");
    assert!(worst < bound, "status p99 {worst:?}");
}

/// `lorad-hog` as `user`, attempting 2,000 idle and 50 slow connections, once it says it is ready;
/// and the receiver of its further lines.
struct Hog;

impl Hog {
    fn start(user: &TestUser, socket: &std::path::Path) -> (Reaped, mpsc::Receiver<String>) {
        Self::start_with(user, socket, &["--idle", "2000", "--slow", "50"])
    }

    fn start_with(
        user: &TestUser,
        socket: &std::path::Path,
        args: &[&str],
    ) -> (Reaped, mpsc::Receiver<String>) {
        let mut hog = user
            .command(env!("CARGO_BIN_EXE_lorad-hog"))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .args(["--seconds", "400"])
            .arg("--until-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lorad-hog");
        let stdout = hog.stdout.take().expect("stdout");
        let hog = Reaped(hog);
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let line = lines
            .recv_timeout(Duration::from_secs(120))
            .expect("lorad-hog did not get ready in 120 s");
        println!("lorad-hog: {line}");
        assert!(line.starts_with("ready"), "{line}");
        (hog, lines)
    }
}

/// A child process that is stopped on drop: its stdin closes (lorad-hog then exits by itself), then
/// SIGKILL after 10 s.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn idle_and_slow_connections_of_one_user_do_not_starve_the_others() {
    if !root_or_skip() {
        return;
    }
    let _serial = serial();
    let group = TestGroup::new();
    let alice = TestUser::new(&[&group]);
    let bob = TestUser::new(&[&group]);
    let carol = TestUser::new(&[&group]);
    let mut opts = SystemOptions::new(&group);
    opts.nofile = Some(1024);
    let d = SystemDaemon::started(&opts);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).expect("limits");
    let nofile: Vec<u64> = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(nofile, [1024, 1024], "{limits}");
    let (model, data) = (d.model(), d.dataset("data.jsonl", 64));

    // Bob hogs: 2,000 idle connections and 50 slow ones.
    let (hog, lines) = Hog::start(&bob, &d.socket());

    // Root is served, on a new connection, quickly.
    let c = Client::connect(d.socket()).expect("root cannot connect while bob hogs");
    // Spread over ~5 s, so the slow connections send bytes meanwhile.
    status_p99_under(
        &c,
        500,
        Duration::from_millis(10),
        Duration::from_millis(10),
    );

    // So are other users; and a job submitted now starts and completes.
    let mut cmd = carol.command(bin("loractl"));
    cmd.arg("--socket").arg(d.socket()).arg("status");
    let (out, _) = output_within(cmd, Duration::from_secs(30)).expect("carol's status hung");
    assert_eq!(out.status.code(), Some(0), "carol: {}", text(&out.stderr));
    let mut cmd = alice.command(bin("loractl"));
    cmd.arg("--socket")
        .arg(d.socket())
        .args(submit_args(&model, &data, &["--set", "max_steps=5"]));
    let (out, _) = output_within(cmd, Duration::from_secs(60)).expect("alice's submit hung");
    let id = submitted(&out).to_string();
    let mut cmd = alice.command(bin("loractl"));
    cmd.arg("--socket")
        .arg(d.socket())
        .args(["wait", &id, "--timeout", "240"]);
    let (out, _) = output_within(cmd, Duration::from_secs(260)).expect("alice's wait hung");
    assert_eq!(
        out.status.code(),
        Some(0),
        "job {id}: {}\n{}",
        text(&out.stderr),
        d.daemon_log()
    );
    assert!(process_alive(d.pid()), "the daemon died");

    drop(hog);
    if let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
        println!("lorad-hog: {line}");
    }
}

#[test]
fn a_flood_that_fills_every_slot_leaves_an_admin_a_way_in_and_a_job_its_descriptors() {
    if !root_or_skip() {
        return;
    }
    let _serial = serial();
    let group = TestGroup::new();
    let alice = TestUser::new(&[&group]);
    let bob = TestUser::new(&[&group]);
    let carol = TestUser::new(&[&group]);
    // No per-user cap to speak of: the total, which the daemon derives from its descriptor limit,
    // is what stops bob.
    let mut opts = SystemOptions::new(&group);
    opts.nofile = Some(1024);
    opts.config = Some("[limits]\nmax_connections_per_user = 5000\n".into());
    let d = SystemDaemon::started(&opts);
    let (model, data) = (d.model(), d.dataset("data.jsonl", 64));

    // Alice's job is held in the queue until the flood is on.
    let root = d.client();
    let args = submit_args(&model, &data, &["--set", "max_steps=5"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = JobId(submitted(&alice.loractl(&d.socket(), &args)));
    let held = root.pause(id).expect("hold alice's job");
    if held.state != JobState::Paused {
        wait_for(&root, id, Duration::from_secs(120), |s| {
            s == JobState::Paused
        });
    }

    let (hog, _lines) = Hog::start(&bob, &d.socket());

    // The house is full: another user is turned away, with the reason.
    let out = carol.loractl(&d.socket(), &["status"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "carol got in: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("max_connections"),
        "{}",
        text(&out.stderr)
    );

    // An admin still gets in, and is served quickly.
    let admin = Client::connect(d.socket()).expect("root cannot connect to a full daemon");
    status_p99_under(
        &admin,
        200,
        Duration::from_millis(5),
        Duration::from_millis(10),
    );

    // The job starts now, with every client slot taken, and completes: its worker's channel, log and
    // pipes come from the descriptors the daemon keeps for them.
    admin.resume(id, None).expect("resume alice's job");
    let (job, seen) = wait_for(&admin, id, Duration::from_secs(240), |s| s.is_terminal());
    assert_eq!(
        job.state,
        JobState::Completed,
        "{seen:?} {:?}\n{}",
        job.reason,
        d.daemon_log()
    );
    // While the flood arrives, accept() itself may briefly find no descriptor (the daemon retries);
    // from the resume on, nothing may lack one.
    let log = d.daemon_log();
    let after_resume = log.split("resumed by uid 0").nth(1).unwrap_or_default();
    assert!(
        !after_resume.contains("Too many open files"),
        "{after_resume}"
    );
    assert!(process_alive(d.pid()), "the daemon died");
    drop(hog);
}

#[test]
fn half_sent_large_frames_of_one_user_do_not_hold_up_anyone_elses_requests() {
    if !root_or_skip() {
        return;
    }
    let _serial = serial();
    let group = TestGroup::new();
    let alice = TestUser::new(&[&group]);
    let bob = TestUser::new(&[&group]);
    let d = SystemDaemon::started(&SystemOptions::new(&group));
    let (model, data) = (d.model(), d.dataset("data.jsonl", 64));
    // Bob announces 16 MiB frames on six connections (after their handshakes) and sends them a byte
    // a second: more than the whole 64 MiB budget, and four times his share of it.
    let (hog, _lines) = Hog::start_with(
        &bob,
        &d.socket(),
        &["--slow", "12", "--announce", "16777216"],
    );
    std::thread::sleep(Duration::from_millis(500));

    // Alice is served as if bob were not there.
    let t = Instant::now();
    let out = alice.loractl(&d.socket(), &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let args = submit_args(&model, &data, &["--set", "max_steps=2"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    submitted(&alice.loractl(&d.socket(), &args));
    let took = t.elapsed();
    println!("alice's status and submit took {took:?}");
    assert!(took < Duration::from_secs(5), "alice waited {took:?}");
    let root = d.client();
    status_p99_under(
        &root,
        100,
        Duration::from_millis(5),
        Duration::from_millis(10),
    );
    drop(hog);
}
