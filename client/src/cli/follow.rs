//! Following one job across dropped connections: `wait`, `logs -f` and the session they share.
//!
//! Each (re)attachment subscribes to the job's events first and reads its record second, so the record
//! reflects every event up to the subscription's start and every later change arrives as an event.
//! After a dropped connection the next subscription starts after the newest event seen: nothing is
//! missed, even across a daemon restart.
use super::{print_json, print_json_line, write_out, Ctx, EXIT_FAILURE, EXIT_TIMEOUT};
use lorad_client::lorad_schema::{EventBody, JobId, JobRecord, JobState};
use lorad_client::{Client, ClientError, Subscription};
use std::process::ExitCode;
use std::time::Duration;

/// First and largest pause between reconnection attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// `logs -f` also polls this often, in case output arrives without an event.
const LOG_POLL: Duration = Duration::from_secs(2);

/// A live view of one job: a connection, a subscription to its events, and its record.
pub struct Attached {
    /// The connection.
    pub client: Client,
    /// The job's events after the last one seen.
    pub sub: Subscription,
    /// The record, read after subscribing.
    pub record: JobRecord,
}

/// Attaches to a job, and re-attaches with backoff after the connection drops.
pub struct Follow<'a> {
    ctx: &'a Ctx,
    job: JobId,
    /// A connection to use for the first attachment.
    first: Option<Client>,
    /// Newest event seq handled; `None` before the first attachment.
    seen: Option<u64>,
    notice: Box<dyn Fn(&str) + 'a>,
}

impl<'a> Follow<'a> {
    /// Follows `job`, reporting reconnections through `notice`.
    pub fn new(ctx: &'a Ctx, job: JobId, notice: impl Fn(&str) + 'a) -> Self {
        Follow {
            ctx,
            job,
            first: None,
            seen: None,
            notice: Box::new(notice),
        }
    }

    /// Uses `client` for the first attachment instead of a new connection.
    pub fn with_client(mut self, client: Client) -> Self {
        self.first = Some(client);
        self
    }

    /// Records that the event with `seq` was handled.
    pub fn saw(&mut self, seq: u64) {
        self.seen = Some(self.seen.map_or(seq, |s| s.max(seq)));
    }

    /// Subscribes and reads the record. Failures of the first attachment are returned; later, lost
    /// connections are retried with backoff until the daemon is back.
    pub async fn attach(&mut self) -> anyhow::Result<Attached> {
        let mut delay = BACKOFF.0;
        let mut announced = false;
        loop {
            match self.try_attach().await {
                Ok(attached) => {
                    if announced {
                        (self.notice)("reconnected to lorad");
                    }
                    return Ok(attached);
                }
                Err(e) if self.seen.is_some() && e.is_disconnect() => {
                    if !announced {
                        (self.notice)(&format!("lost lorad ({e}); reconnecting"));
                        announced = true;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF.1);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn try_attach(&mut self) -> Result<Attached, ClientError> {
        let client = match self.first.take() {
            Some(c) => c,
            None => self.ctx.connect().await?,
        };
        // The first time, only what happens from now on matters: the record covers the past.
        let since = match self.seen {
            Some(seq) => seq,
            None => client.status().await?.last_seq,
        };
        let sub = client.subscribe(Some(self.job), since).await?;
        let record = client.get(self.job).await?;
        self.saw(since);
        Ok(Attached {
            client,
            sub,
            record,
        })
    }
}

/// True when `e` is a lost connection, after which re-attaching may help.
pub fn is_disconnect(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ClientError>()
        .is_some_and(ClientError::is_disconnect)
}

/// Waits for the next event of `a` that ends the job live (not replayed history, which the record
/// already covers). `None` when the connection dropped.
async fn next_live_end(a: &mut Attached, follow: &mut Follow<'_>) -> Option<JobState> {
    while let Some(event) = a.sub.next().await {
        follow.saw(event.seq);
        if let EventBody::StateChanged { to, .. } = event.body {
            if to.is_terminal() && event.seq > a.sub.replay_until() {
                return Some(to);
            }
        }
    }
    None
}

/// `wait JOB [--timeout SECS]`.
pub async fn wait(ctx: &Ctx, job: JobId, timeout: Option<f64>) -> anyhow::Result<ExitCode> {
    let mut follow = Follow::new(ctx, job, |m| eprintln!("loractl: {m}"));
    let run = async {
        loop {
            let mut a = follow.attach().await?;
            loop {
                if a.record.state.is_terminal() {
                    return anyhow::Ok(a.record);
                }
                if next_live_end(&mut a, &mut follow).await.is_none() {
                    break;
                }
                // Read the record that goes with the end (it may already have been retried).
                match a.client.get(job).await {
                    Ok(record) => a.record = record,
                    Err(e) if e.is_disconnect() => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    };
    let record = match timeout {
        None => run.await?,
        Some(secs) => match tokio::time::timeout(Duration::from_secs_f64(secs), run).await {
            Ok(record) => record?,
            Err(_) => {
                eprintln!("loractl: timeout: job {job} did not finish within {secs}s");
                return Ok(ExitCode::from(EXIT_TIMEOUT));
            }
        },
    };
    finish(ctx, &record, false)
}

/// Prints how a finished job ended; exit 0 if it completed, 1 otherwise. With `--json` the record is
/// printed pretty, or as one line when `jsonl` (after a stream of JSON lines).
pub fn finish(ctx: &Ctx, record: &JobRecord, jsonl: bool) -> anyhow::Result<ExitCode> {
    if ctx.json && jsonl {
        print_json_line(record)?;
    } else if ctx.json {
        print_json(record)?;
    } else {
        let reason = record
            .reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        write_out(&format!("job {} {}{reason}\n", record.id, record.state))?;
    }
    Ok(if record.state == JobState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    })
}

/// One line of job.log as `logs --json` prints it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LogLine {
    /// The worker attempt it belongs to: 1 for the first, +1 at each "worker started" separator (0:
    /// before any worker started).
    pub attempt: u32,
    /// Who wrote it: `worker` (training output), `export` or `hook` (their sections of the log), or
    /// `lorad` (the separators and the daemon's own lines).
    pub source: &'static str,
    /// The line, without its newline.
    pub text: String,
}

/// Splits job.log into [`LogLine`]s as it arrives in chunks: a line cut by a chunk's end waits for the
/// rest; the attempt and section follow the daemon's separators (`===== lorad: worker started ...`,
/// `===== lorad: export ...`, `===== lorad: hook ...`).
#[derive(Debug, Default)]
pub struct LogLines {
    attempt: u32,
    section: &'static str,
    partial: String,
}

impl LogLines {
    /// The complete lines in `text` (with what was left over before it).
    pub fn feed(&mut self, text: &str) -> Vec<LogLine> {
        self.partial.push_str(text);
        let mut out = Vec::new();
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            out.push(self.line(line.trim_end_matches('\n').to_string()));
        }
        out
    }

    /// What is left: a last line without a newline.
    pub fn finish(&mut self) -> Option<LogLine> {
        let rest = std::mem::take(&mut self.partial);
        (!rest.is_empty()).then(|| self.line(rest))
    }

    fn line(&mut self, text: String) -> LogLine {
        let source = if let Some(sep) = text.strip_prefix("===== lorad: ") {
            if sep.starts_with("worker started") {
                self.attempt += 1;
                self.section = "worker";
            } else if sep.starts_with("export") {
                self.section = "export";
            } else if sep.starts_with("hook") {
                self.section = "hook";
            }
            "lorad"
        } else if text.starts_with("lorad: ") || self.section.is_empty() {
            "lorad"
        } else {
            self.section
        };
        LogLine {
            attempt: self.attempt,
            source,
            text,
        }
    }
}

/// How `logs` prints what it reads.
enum Printer {
    /// The text as it is.
    Text,
    /// `--json` without `--follow`: one array of every line, at the end. Blank lines are left out
    /// (the daemon writes one before each separator).
    Array(LogLines, Vec<LogLine>),
    /// `--json --follow`: one JSON object per line, as lines arrive.
    Lines(LogLines),
}

impl Printer {
    fn print(&mut self, text: &str) -> anyhow::Result<()> {
        match self {
            Printer::Text => Ok(write_out(text)?),
            Printer::Array(split, all) => {
                all.extend(split.feed(text).into_iter().filter(|l| !l.text.is_empty()));
                Ok(())
            }
            Printer::Lines(split) => {
                for line in split.feed(text).into_iter().filter(|l| !l.text.is_empty()) {
                    super::print_json_line(&line)?;
                }
                Ok(())
            }
        }
    }

    fn finish(self) -> anyhow::Result<()> {
        match self {
            Printer::Text => Ok(()),
            Printer::Array(mut split, mut all) => {
                all.extend(split.finish());
                super::print_json(&all)
            }
            Printer::Lines(mut split) => match split.finish() {
                Some(line) => super::print_json_line(&line),
                None => Ok(()),
            },
        }
    }
}

/// Prints the log from `offset` up to its current end; returns the new offset.
async fn page(
    client: &Client,
    job: JobId,
    mut offset: u64,
    out: &mut Printer,
) -> anyhow::Result<u64> {
    loop {
        let chunk = client.logs(job, offset, None).await?;
        out.print(&chunk.text)?;
        let caught_up =
            chunk.text.is_empty() || chunk.next_offset >= chunk.size || chunk.next_offset <= offset;
        offset = chunk.next_offset.max(offset);
        if caught_up {
            return Ok(offset);
        }
    }
}

/// `logs JOB [-f]`.
pub async fn logs(ctx: &Ctx, job: JobId, follow_on: bool) -> anyhow::Result<ExitCode> {
    let mut out = match (ctx.json, follow_on) {
        (false, _) => Printer::Text,
        (true, false) => Printer::Array(LogLines::default(), Vec::new()),
        (true, true) => Printer::Lines(LogLines::default()),
    };
    let client = ctx.connect().await?;
    let mut offset = page(&client, job, 0, &mut out).await?;
    if !follow_on {
        out.finish()?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut follow = Follow::new(ctx, job, |m| eprintln!("loractl: {m}")).with_client(client);
    loop {
        let mut a = follow.attach().await?;
        let mut ended = a.record.state.is_terminal();
        loop {
            match page(&a.client, job, offset, &mut out).await {
                Ok(next) => offset = next,
                Err(e) if is_disconnect(&e) => break,
                Err(e) => return Err(e),
            }
            if ended {
                out.finish()?;
                return Ok(ExitCode::SUCCESS);
            }
            tokio::select! {
                event = a.sub.next() => {
                    let Some(mut event) = event else { break };
                    // Handle everything already queued, then read the log once.
                    loop {
                        follow.saw(event.seq);
                        if let EventBody::StateChanged { to, .. } = event.body {
                            ended |= to.is_terminal() && event.seq > a.sub.replay_until();
                        }
                        match a.sub.try_next() {
                            Some(e) => event = e,
                            None => break,
                        }
                    }
                }
                _ = tokio::time::sleep(LOG_POLL) => {}
            }
        }
    }
}

#[cfg(test)]
mod log_tests {
    use super::*;

    #[test]
    fn lines_carry_their_attempt_and_source_across_chunks() {
        let mut split = LogLines::default();
        let log = "\n===== lorad: worker started 2026-12-07T10:00:00Z: fresh start; from the start; on cpu =====\n\
                   step 1\nstep 2\n\n===== lorad: worker started 2026-12-07T10:01:00Z: resumed; resuming from step-2; on cpu =====\n\
                   step 3\n\n===== lorad: hook (on_finish) for completed started 2026-12-07T10:02:00Z: echo hi =====\nhi\n\
                   lorad: hook (on_finish) for completed exited with code 0 after 0.0 s: echo hi\npart";
        let mut lines = Vec::new();
        // Cut in awkward places: mid-line, mid-separator.
        for chunk in [&log[..30], &log[30..95], &log[95..]] {
            lines.extend(split.feed(chunk));
        }
        lines.extend(split.finish());
        let got: Vec<(u32, &str, &str)> = lines
            .iter()
            .filter(|l| !l.text.is_empty())
            .map(|l| (l.attempt, l.source, l.text.as_str()))
            .collect();
        assert_eq!(got[0].0, 1);
        assert_eq!(got[0].1, "lorad");
        assert_eq!(got[1], (1, "worker", "step 1"));
        assert_eq!(got[2], (1, "worker", "step 2"));
        assert_eq!(got[3].0, 2);
        assert_eq!(got[4], (2, "worker", "step 3"));
        assert_eq!(got[6], (2, "hook", "hi"));
        assert_eq!(got[7].1, "lorad");
        assert_eq!(got[8], (2, "hook", "part"));
    }
}
