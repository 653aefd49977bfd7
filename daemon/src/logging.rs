//! Where the daemon's own log goes: journald (stderr in its format) under systemd, rolling files with
//! `log_dir`, else plain stderr. Workers log into their job's job.log and are not concerned.
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How often a rolling log file is started (`log_rotation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rotation {
    /// Every minute (for tests and busy debugging).
    Minutely,
    /// Every hour.
    Hourly,
    /// Every day.
    #[default]
    Daily,
    /// One file, never rotated.
    Never,
}

/// Where the log goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// stderr is connected to the journal: one line per event, its level as a `<N>` priority prefix,
    /// no timestamp (journald adds its own).
    Journald,
    /// `<dir>/lorad.<date>.log`, a new file every `rotation`, the newest `keep` kept.
    Files {
        /// The directory.
        dir: PathBuf,
        /// How often.
        rotation: Rotation,
        /// Files kept, the current one included.
        keep: usize,
    },
    /// stderr with timestamps.
    Stderr,
}

/// Where the log goes: under systemd (`JOURNAL_STREAM` names the device and inode that stderr is)
/// the journal wins over `log_dir`, so a unit's log is where `journalctl -u lorad` looks. Pure.
pub fn target(
    journal_stream: Option<&str>,
    stderr_dev_ino: Option<(u64, u64)>,
    log_dir: Option<PathBuf>,
    rotation: Rotation,
    keep: usize,
) -> Target {
    let on_journal = journal_stream
        .and_then(|s| s.split_once(':'))
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        .is_some_and(|stream| Some(stream) == stderr_dev_ino);
    match log_dir {
        _ if on_journal => Target::Journald,
        Some(dir) => Target::Files {
            dir,
            rotation,
            keep: keep.max(1),
        },
        None => Target::Stderr,
    }
}

/// The device and inode of stderr, to compare with `JOURNAL_STREAM`.
pub fn stderr_dev_ino() -> Option<(u64, u64)> {
    let st = nix::sys::stat::fstat(std::io::stderr()).ok()?;
    Some((st.st_dev, st.st_ino))
}

/// The sd-daemon priority of a level (`<3>` error ... `<7>` debug).
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// journald's line format: `<6>message key=value`.
struct JournaldFormat;

impl<S, N> FormatEvent<S, N> for JournaldFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the global subscriber for `target` at `filter` (`RUST_LOG` wins over it). The guard
/// flushes the file writer's buffered lines when dropped: keep it for the daemon's lifetime.
pub fn init(
    target: &Target,
    filter: &str,
) -> std::io::Result<Option<tracing_appender::non_blocking::WorkerGuard>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        // A log line that cannot be written (a full disk) is dropped, never reported on stderr.
        .log_internal_errors(false);
    match target {
        Target::Journald => {
            builder
                .with_writer(std::io::stderr)
                .event_format(JournaldFormat)
                .init();
            Ok(None)
        }
        Target::Stderr => {
            builder.with_writer(std::io::stderr).init();
            Ok(None)
        }
        Target::Files {
            dir,
            rotation,
            keep,
        } => {
            std::fs::create_dir_all(dir)?;
            let rotation = match rotation {
                Rotation::Minutely => tracing_appender::rolling::Rotation::MINUTELY,
                Rotation::Hourly => tracing_appender::rolling::Rotation::HOURLY,
                Rotation::Daily => tracing_appender::rolling::Rotation::DAILY,
                Rotation::Never => tracing_appender::rolling::Rotation::NEVER,
            };
            let appender = tracing_appender::rolling::RollingFileAppender::builder()
                .rotation(rotation)
                .filename_prefix("lorad")
                .filename_suffix("log")
                .max_log_files(*keep)
                .build(dir)
                .map_err(std::io::Error::other)?;
            let (writer, guard) = tracing_appender::non_blocking(appender);
            builder.with_writer(writer).init();
            Ok(Some(guard))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_wins_only_when_stderr_is_the_journal_stream() {
        let dir = Some(PathBuf::from("/var/log/lorad"));
        let files = Target::Files {
            dir: PathBuf::from("/var/log/lorad"),
            rotation: Rotation::Daily,
            keep: 7,
        };
        let t = |js, ino, dir| target(js, ino, dir, Rotation::Daily, 7);
        assert_eq!(
            t(Some("8:42"), Some((8, 42)), dir.clone()),
            Target::Journald
        );
        assert_eq!(t(Some("8:42"), Some((8, 42)), None), Target::Journald);
        // Inherited by something that redirected stderr elsewhere: not the journal.
        assert_eq!(t(Some("8:42"), Some((8, 43)), dir.clone()), files);
        assert_eq!(t(Some("garbage"), Some((8, 42)), None), Target::Stderr);
        assert_eq!(t(None, Some((8, 42)), dir), files);
        assert_eq!(t(None, None, None), Target::Stderr);
        let zero = target(None, None, Some("/l".into()), Rotation::Never, 0);
        assert!(matches!(zero, Target::Files { keep: 1, .. }));
    }

    #[test]
    fn levels_map_to_sd_daemon_priorities() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
    }
}
