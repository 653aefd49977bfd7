//! `lorad check`, `lorad recover-journal`, `lorad backup`: what an admin runs on a state directory
//! (part of the `lorad` binary, not the library).
use anyhow::{bail, Context};
use lorad::journal::{maintenance, recover, Journal, JournalError};
use lorad_schema::layout::StateDir;
use std::path::{Path, PathBuf};

/// `lorad check`: redb's integrity check and every record decoded. Exit 0 clean, 1 not.
pub fn check(state_dir: &Path) -> anyhow::Result<i32> {
    let path = StateDir::new(state_dir).journal();
    let report = maintenance::check(&path)?;
    println!("journal {}", path.display());
    match &report.integrity {
        Ok(true) => println!("  integrity: ok"),
        Ok(false) => {
            println!("  integrity: repaired on open (the last transactions were not durable)")
        }
        Err(e) => println!("  integrity: FAILED: {e}"),
    }
    for t in &report.tables {
        println!(
            "  {:8} {} readable, {} damaged{}",
            t.table,
            t.readable,
            t.damaged.len(),
            if t.damaged.is_empty() {
                String::new()
            } else {
                format!(": {}", t.damaged.join(", "))
            }
        );
    }
    if report.clean() {
        println!("clean");
        Ok(0)
    } else {
        println!(
            "damaged: restore a backup (`lorad backup`), or rebuild with `lorad recover-journal`"
        );
        Ok(1)
    }
}

/// `lorad recover-journal`: for a missing, empty or damaged journal only.
pub fn recover_journal(state_dir: &Path) -> anyhow::Result<i32> {
    let layout = StateDir::new(state_dir);
    let (path, jobs) = (layout.journal(), layout.jobs());
    let usable = std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
    if usable {
        match Journal::open(&path) {
            Ok(j) => bail!(
                "journal {} opens fine ({} jobs); recover-journal is for a journal that is missing, empty or damaged",
                path.display(),
                j.job_count()?
            ),
            Err(JournalError::Damaged { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let report = recover::rebuild(&path, &jobs)
        .with_context(|| format!("cannot rebuild {}", path.display()))?;
    if let Some(old) = &report.old_journal {
        println!("the old journal is kept as {}", old.display());
    }
    println!(
        "rebuilt {}: {} jobs restored from {}",
        path.display(),
        report.restored.len(),
        jobs.display()
    );
    for (id, why) in &report.skipped {
        println!("  job {id} not restored (its id stays taken): {why}");
    }
    println!("metric points and events are not kept in job directories and start afresh");
    Ok(0)
}

/// `lorad backup DIR`: from the running daemon (a `backup` request) when one answers on `socket`,
/// else straight from the journal. The copy lands in `DIR` under a new name.
pub fn backup(socket: &Path, state_dir: &Path, dir: &Path) -> anyhow::Result<i32> {
    // A copy of the journal is as private as the journal.
    // SAFETY: umask only sets this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let dest = dir.join(format!("journal-{when}.redb"));
    let from_daemon = lorad_client::blocking::Client::connect(socket)
        .ok()
        .map(|c| c.backup());
    let records = match from_daemon {
        Some(reply) => {
            let (path, records) = reply.context("the daemon refused the backup")?;
            let path = PathBuf::from(path);
            copy_new(&path, &dest)?;
            // Remove the daemon's copy only if it is one: a file named journal-*.redb in its
            // backups directory.
            let ours = path.parent() == Some(StateDir::new(state_dir).backups().as_path())
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("journal-") && n.ends_with(".redb"))
                && std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
            if ours {
                let _ = std::fs::remove_file(&path);
            }
            records.into_iter().collect::<Vec<_>>()
        }
        None => {
            let journal = StateDir::new(state_dir).journal();
            if !std::fs::metadata(&journal).is_ok_and(|m| m.len() > 0) {
                bail!(
                    "{} does not exist or is empty: nothing to back up",
                    journal.display()
                );
            }
            let j = Journal::open(&journal)?;
            j.copy_to(&dest)?
                .into_iter()
                .map(|(t, n)| (t.to_string(), n))
                .collect()
        }
    };
    let counts: Vec<String> = records.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!("{} ({})", dest.display(), counts.join(", "));
    Ok(0)
}

/// Copies `from` to the new file `to` (never over an existing one).
fn copy_new(from: &Path, to: &PathBuf) -> anyhow::Result<()> {
    let mut src =
        std::fs::File::open(from).with_context(|| format!("cannot read {}", from.display()))?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .with_context(|| format!("cannot create {}", to.display()))?;
    std::io::copy(&mut src, &mut dst)?;
    dst.sync_all()?;
    Ok(())
}
