//! A full disk under the state directory is an ordinary condition: the job pauses saying where space
//! ran out, never stays `running` without a worker; once space is freed, `resume` continues it with
//! every metric point once, and submits work again, all without restarting the daemon.
//!
//! Each case mounts a small tmpfs over a fresh daemon's state directory (root only; skipped otherwise).
use super::*;
use lorad_tests::{process_alive, write_dataset, TestDaemon};
use std::io::Write;
use std::path::PathBuf;

/// A tmpfs mounted at a directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size_mb: u32) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mb}m,mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .expect("mount");
        assert!(status.success(), "mount tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system of `dir` with one file; returns it.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0xa5u8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    let small = vec![0x5au8; 4096];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    path
}

fn full_disk_case(label: &str, steps: u64, extra: &[(&'static str, &'static str)]) {
    let mut d = TestDaemon::start();
    d.stop();
    let _fs = Tmpfs::mount(&d.state_dir(), 48);
    d.restart();
    let c = d.client();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let settings = fast_with(extra);
    let job = c
        .submit(spec(lorad_tests::tiny_model(), &data, &settings))
        .expect("submit");
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.get(job.id).expect("get").progress.step < 3 {
        assert!(Instant::now() < deadline, "{label}: no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = Instant::now();
    let filler = fill(&d.state_dir());
    println!(
        "{label}: filled at step {} in {:?}",
        c.get(job.id).expect("get").progress.step,
        t0.elapsed()
    );

    let (paused, seen) = wait_for(&c, job.id, Duration::from_secs(120), |s| {
        s != JobState::Running && s != JobState::Initializing
    });
    println!("{label}: {seen:?}: {:?}", paused.reason);
    assert_eq!(
        paused.state,
        JobState::Paused,
        "{label}: {:?}\n{}",
        paused.reason,
        d.daemon_log()
    );
    let reason = paused.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("no space left on device in")
            && reason.contains(&d.state_dir().display().to_string()),
        "{label}: {reason}"
    );
    if let Some(pid) = paused.worker_pid {
        let gone = Instant::now() + Duration::from_secs(30);
        while process_alive(pid) {
            assert!(
                Instant::now() < gone,
                "{label}: the worker {pid} is still there"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // Space back, the same daemon: the job continues and loses nothing; submit works again.
    println!("{label}: paused after {:?}", t0.elapsed());
    std::fs::remove_file(&filler).expect("free the space");
    c.resume(job.id, None).expect("resume after freeing space");
    let (done, _) = wait_for(&c, job.id, Duration::from_secs(240), |s| s.is_terminal());
    assert_eq!(
        done.state,
        JobState::Completed,
        "{label}: {:?}\n{}",
        done.reason,
        d.daemon_log()
    );
    println!("{label}: completed after {:?}", t0.elapsed());
    assert_matches_uninterrupted(&c, &data, &settings, job.id, steps);
    println!("{label}: checked after {:?}", t0.elapsed());
}

#[test]
fn a_full_disk_pauses_the_job_and_resume_after_freeing_space_loses_nothing() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: needs root (mounts a tmpfs)");
        return;
    }
    full_disk_case(
        "checkpoint due",
        60,
        &[("max_steps", "60"), ("checkpoint_every", "5")],
    );
    // Without a checkpoint, only the journal notices the full disk, and redb may commit a few dozen
    // steps into pages its file already has before it needs more: enough steps that the job cannot
    // end first on a busy machine.
    full_disk_case(
        "no checkpoint due",
        300,
        &[("max_steps", "300"), ("checkpoint_every", "100000")],
    );
}
