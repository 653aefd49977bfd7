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

/// Prints the log from `offset` up to its current end; returns the new offset.
async fn page(client: &Client, job: JobId, mut offset: u64) -> anyhow::Result<u64> {
    loop {
        let chunk = client.logs(job, offset, None).await?;
        write_out(&chunk.text)?;
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
    let client = ctx.connect().await?;
    let mut offset = page(&client, job, 0).await?;
    if !follow_on {
        return Ok(ExitCode::SUCCESS);
    }
    let mut follow = Follow::new(ctx, job, |m| eprintln!("loractl: {m}")).with_client(client);
    loop {
        let mut a = follow.attach().await?;
        let mut ended = a.record.state.is_terminal();
        loop {
            match page(&a.client, job, offset).await {
                Ok(next) => offset = next,
                Err(e) if is_disconnect(&e) => break,
                Err(e) => return Err(e),
            }
            if ended {
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
