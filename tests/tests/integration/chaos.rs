//! Chaos: kills of the daemon or the worker at random (seeded, replayable) moments over one job.
use super::*;
use lorad_tests::{process_alive, tiny_model, write_dataset, TestDaemon};

/// A tiny seeded generator (xorshift64*), so a failing run can be replayed with its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn twenty_kills_lose_nothing() {
    let seed: u64 = std::env::var("LORAD_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261123);
    let mut rng = Rng(seed);
    let mut d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let settings = fast_with(&[
        ("max_steps", "120"),
        ("checkpoint_every", "3"),
        ("max_restarts", "100"),
    ]);
    let job = d
        .client()
        .submit(spec(tiny_model(), &data, &settings))
        .expect("submit")
        .id;

    let mut kills = Vec::new();
    while kills.len() < 20 {
        std::thread::sleep(Duration::from_millis(100 + rng.next() % 900));
        let record = d.client().get(job).expect("get");
        if record.state.is_terminal() {
            break;
        }
        let worker = record
            .worker_pid
            .filter(|p| record.state.is_active() && process_alive(*p));
        match (rng.next() % 2, worker) {
            (0, Some(pid)) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                kills.push(format!("worker {pid} at step {}", record.progress.step));
            }
            _ => {
                d.kill9();
                kills.push(format!("daemon at step {}", record.progress.step));
                d.restart();
            }
        }
    }
    let c = d.client();
    let (done, _) = wait_for(&c, job, Duration::from_secs(300), |s| s.is_terminal());
    assert_eq!(
        done.state,
        JobState::Completed,
        "seed {seed}, kills {kills:?}: {:?}",
        done.reason
    );

    // Every step's metric point exactly once, in order.
    let steps: Vec<u64> = c
        .metrics(job, None)
        .expect("metrics")
        .iter()
        .map(|p| p.step)
        .collect();
    assert_eq!(
        steps,
        (1..=120).collect::<Vec<_>>(),
        "seed {seed}, kills {kills:?}"
    );
    // One log with every attempt, in order: separators with non-decreasing times, each attempt after
    // the first resuming from a checkpoint no older than the previous attempt's.
    let log =
        std::fs::read_to_string(d.state_dir().join(format!("jobs/{job}/job.log"))).expect("log");
    let separators: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("===== lorad: worker started"))
        .collect();
    assert!(separators.len() >= 2, "seed {seed}: {separators:?}");
    let times: Vec<&str> = separators
        .iter()
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{separators:?}");
    let resumed: Vec<u64> = separators
        .iter()
        .filter_map(|l| l.split("resuming from step-").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        resumed.windows(2).all(|w| w[0] <= w[1]),
        "checkpoints go forward: {resumed:?}"
    );
    eprintln!(
        "seed {seed}: {} kills, {} attempts: {kills:?}",
        kills.len(),
        separators.len()
    );
}
