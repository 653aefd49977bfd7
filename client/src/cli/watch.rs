//! `watch [JOB...]`: follow jobs as they train, surviving dropped connections.
//!
//! Followers (one per named job, or one subscription to every job's events) do the I/O and hand
//! [`Feed`]s to one loop, which keeps a [`View`] per job and shows it: progress bars on a terminal,
//! one plain line per update otherwise, or the events as JSON lines with `--json`.
//!
//! A view's state changes only with a record (read after each live state change), so the watch ends on
//! the record that says how the job ended, with its reason.
use super::follow::Follow;
use super::{output, print_json_line, write_out, Ctx, EXIT_FAILURE, EXIT_PAUSED};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use lorad_client::lorad_schema::trend::{self, smooth, Trend, LOSS_WINDOW};
use lorad_client::lorad_schema::{
    ErrorCode, Event, EventBody, JobId, JobRecord, JobState, MetricPoint,
};
use lorad_client::{Client, ClientError, Subscription};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Smoothed loss values the sparkline shows.
const SPARK_WIDTH: usize = 40;
/// Raw losses kept for it: enough before the shown ones for the EMA to have forgotten its seed.
const SPARK_KEEP: usize = SPARK_WIDTH + 3 * LOSS_WINDOW as usize;
/// A job's record is read again at most this often on metric events (for the daemon's step times).
const REFRESH: Duration = Duration::from_secs(1);
/// First and largest pause between reconnection attempts of the every-job subscription.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How often bars are redrawn without news (the ETA counts down).
const TICK: Duration = Duration::from_secs(1);
/// The sparkline's levels, lowest first.
const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// What followers hand the watch loop.
enum Feed {
    /// A job's record, read after (re)subscribing or after a live change.
    Record(Box<JobRecord>),
    /// Every job, listed after subscribing to every job's events.
    Listing(Vec<JobRecord>),
    /// A job's recent points, for the sparkline of a job already under way.
    History(JobId, Vec<MetricPoint>),
    /// An event; not `live` when replayed after a reconnect (the record already covers its state).
    Event { event: Event, live: bool },
    /// Something to tell the user (a lost or regained connection).
    Notice(String),
    /// A follower gave up.
    Failed(anyhow::Error),
}

type Tx = mpsc::UnboundedSender<Feed>;

/// One job as watched: its record's numbers, advanced by each metric point.
#[derive(Debug)]
struct View {
    job: JobId,
    /// None until the first record.
    state: Option<JobState>,
    reason: Option<String>,
    /// The state the last state line was printed for.
    announced: Option<JobState>,
    record: Option<JobRecord>,
    step: u64,
    total: u64,
    loss: Option<f64>,
    tokens_per_s: Option<f64>,
    loss_ema: Option<f64>,
    slope_per_100: Option<f64>,
    step_time_s: Option<f64>,
    checkpoint_s: Option<f64>,
    checkpoint_every: u64,
    /// Seconds left, and when that was estimated.
    eta: Option<(f64, Instant)>,
    /// The newest raw losses, oldest first.
    losses: VecDeque<f64>,
}

impl View {
    fn new(job: JobId) -> View {
        View {
            job,
            state: None,
            reason: None,
            announced: None,
            record: None,
            step: 0,
            total: 0,
            loss: None,
            tokens_per_s: None,
            loss_ema: None,
            slope_per_100: None,
            step_time_s: None,
            checkpoint_s: None,
            checkpoint_every: 0,
            eta: None,
            losses: VecDeque::new(),
        }
    }

    fn record(&mut self, r: &JobRecord, now: Instant) {
        let p = &r.progress;
        self.state = Some(r.state);
        self.reason = r.reason.clone();
        self.total = p.total_steps;
        self.step_time_s = p.step_time_s.or(self.step_time_s);
        self.checkpoint_s = p.checkpoint_s.or(self.checkpoint_s);
        self.checkpoint_every = r.settings.checkpoint_every;
        if p.step >= self.step {
            // The daemon's view is as new as ours: take its numbers and its estimate.
            self.step = p.step;
            self.loss = p.loss.or(self.loss);
            self.loss_ema = p.loss_ema.or(self.loss_ema);
            self.slope_per_100 = p.loss_slope_per_100.or(self.slope_per_100);
            self.eta = p.eta_s.map(|e| (e, now));
        } else {
            self.eta = self.estimate().map(|e| (e, now));
        }
        self.record = Some(r.clone());
    }

    /// Seeds the sparkline with points read at attachment (older than the next live ones).
    fn history(&mut self, points: &[MetricPoint]) {
        if self.losses.is_empty() {
            for p in points {
                self.push_loss(p.loss);
            }
            if let Some(p) = points.last() {
                self.tokens_per_s = self.tokens_per_s.or(Some(p.tokens_per_s));
            }
        }
    }

    /// Takes a point; false when it is not newer than what the view shows (a replay).
    fn point(&mut self, p: &MetricPoint, now: Instant) -> bool {
        if p.step <= self.step && self.loss.is_some() {
            return false;
        }
        let t = Trend {
            level: self.loss_ema,
            slope: self.slope_per_100.map(|s| s / 100.0),
        }
        .update(
            p.loss,
            p.step.saturating_sub(self.step).max(1),
            trend::alpha(LOSS_WINDOW),
        );
        self.loss_ema = t.level;
        self.slope_per_100 = t.slope.map(|s| s * 100.0);
        self.step = p.step;
        self.loss = Some(p.loss);
        self.tokens_per_s = Some(p.tokens_per_s);
        if self.step_time_s.is_none() && p.step_ms > 0.0 {
            self.step_time_s = Some(p.step_ms / 1000.0);
        }
        self.push_loss(p.loss);
        self.eta = self.estimate().map(|e| (e, now));
        true
    }

    fn push_loss(&mut self, loss: f64) {
        if self.losses.len() == SPARK_KEEP {
            self.losses.pop_front();
        }
        self.losses.push_back(loss);
    }

    /// Seconds left after `self.step`, as the daemon computes it (`trend::time_left`).
    fn estimate(&self) -> Option<f64> {
        let per_step = self.step_time_s?;
        Some(lorad_client::lorad_schema::trend::time_left(
            self.step,
            self.total,
            self.checkpoint_every,
            per_step,
            self.checkpoint_s,
        ))
    }

    /// The ETA counted down since it was estimated; only while running.
    fn eta_at(&self, now: Instant) -> Option<f64> {
        if self.state != Some(JobState::Running) {
            return None;
        }
        let (secs, at) = self.eta?;
        Some((secs - now.saturating_duration_since(at).as_secs_f64()).max(0.0))
    }

    fn steps(&self) -> String {
        match self.total {
            0 => format!("step {}", self.step),
            t => format!("step {}/{t}", self.step),
        }
    }

    /// `ema 2.40 (-0.12/100 steps)`, or `ema 2.40` before a slope; empty before a loss.
    fn trend(&self) -> String {
        match (self.loss_ema, self.slope_per_100) {
            (Some(ema), Some(s)) => format!("ema {ema:.2} ({s:+.2}/100 steps)"),
            (Some(ema), None) => format!("ema {ema:.2}"),
            _ => String::new(),
        }
    }

    /// The plain line for the newest point:
    /// `job 3 step 40/200 loss 2.3456 ema 2.40 (-0.12/100 steps) 1234 tok/s ETA 1m 02s`.
    fn line(&self, now: Instant) -> String {
        let mut parts = vec![
            format!("job {}", self.job),
            self.steps(),
            format!("loss {}", output::loss(self.loss)),
            self.trend(),
        ];
        if let Some(tps) = self.tokens_per_s {
            parts.push(format!("{tps:.0} tok/s"));
        }
        if let Some(eta) = self.eta_at(now) {
            parts.push(format!("ETA {}", output::duration(eta)));
        }
        parts.retain(|p| !p.is_empty());
        parts.join(" ")
    }

    /// The bar's message: the loss, its trend and sparkline, the speed and the ETA.
    fn message(&self, now: Instant) -> String {
        let mut parts = vec![format!("loss {}", output::loss(self.loss))];
        if let Some(ema) = self.loss_ema {
            let arrow = match self.slope_per_100 {
                Some(s) => format!(" {}{:.2}/100", arrow(s), s.abs()),
                None => String::new(),
            };
            parts.push(format!("ema {ema:.2}{arrow}"));
        }
        let losses: Vec<f64> = self.losses.iter().copied().collect();
        let smoothed = smooth(&losses, LOSS_WINDOW);
        let spark = sparkline(&smoothed[smoothed.len().saturating_sub(SPARK_WIDTH)..]);
        if !spark.is_empty() {
            parts.push(spark);
        }
        if let Some(tps) = self.tokens_per_s {
            parts.push(format!("{tps:.0} tok/s"));
        }
        if let Some(eta) = self.eta_at(now) {
            parts.push(format!("ETA {}", output::duration(eta)));
        }
        parts.join(" | ")
    }
}

/// `↓` for a falling loss, `↑` for a rising one, `→` when flat (under 0.005 per 100 steps).
fn arrow(slope_per_100: f64) -> char {
    if slope_per_100 < -0.005 {
        '↓'
    } else if slope_per_100 > 0.005 {
        '↑'
    } else {
        '→'
    }
}

/// One block per value, its height scaled between the values' minimum and maximum (a flat series is
/// drawn at mid height; a NaN or infinite value as a space).
fn sparkline(values: &[f64]) -> String {
    let finite = values.iter().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    values
        .iter()
        .map(|&v| {
            if !v.is_finite() {
                ' '
            } else if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
                BLOCKS[3]
            } else {
                let level = ((v - lo) / (hi - lo) * (BLOCKS.len() - 1) as f64).round() as usize;
                BLOCKS[level.min(BLOCKS.len() - 1)]
            }
        })
        .collect()
}

/// `job 3 paused: paused by user`.
fn state_line(job: JobId, state: JobState, reason: Option<&str>) -> String {
    match reason {
        Some(r) if !r.is_empty() => format!("job {job} {state}: {r}"),
        _ => format!("job {job} {state}"),
    }
}

/// Whether the watch is done with a job in `state`.
fn settled(state: JobState, stop_on_pause: bool) -> bool {
    state.is_terminal() || (stop_on_pause && state == JobState::Paused)
}

/// The exit code for jobs that ended in `states`: the worst of failed or cancelled (1), paused (4)
/// and completed (0).
fn exit_code(states: impl IntoIterator<Item = JobState>) -> u8 {
    let rank = |s: JobState| match s {
        JobState::Completed => (0, 0),
        JobState::Failed | JobState::Cancelled => (2, EXIT_FAILURE),
        // Paused, or still going (a terminal watch never returns so).
        _ => (1, EXIT_PAUSED),
    };
    states
        .into_iter()
        .map(rank)
        .max()
        .map_or(0, |(_, code)| code)
}

/// How the watch shows things.
enum Screen {
    /// `--json`: each event as one JSON line, the final records last.
    Json,
    /// Not a terminal: one plain line per update.
    Lines,
    /// A terminal: one bar per job.
    Bars {
        multi: MultiProgress,
        bars: HashMap<JobId, ProgressBar>,
    },
}

impl Screen {
    /// Prints a line above the bars, or on stdout; notices about the connection go to stderr.
    fn say(&self, text: &str) -> anyhow::Result<()> {
        match self {
            Screen::Json => Ok(()),
            Screen::Lines => Ok(write_out(&format!("{text}\n"))?),
            Screen::Bars { multi, .. } => Ok(multi.println(text)?),
        }
    }

    fn notice(&self, text: &str) {
        match self {
            Screen::Bars { multi, .. } => {
                let _ = multi.println(format!("loractl: {text}"));
            }
            _ => eprintln!("loractl: {text}"),
        }
    }

    fn render(&mut self, v: &View, now: Instant) {
        let Screen::Bars { multi, bars } = self else {
            return;
        };
        let bar = bars
            .entry(v.job)
            .or_insert_with(|| multi.add(ProgressBar::new(0)));
        let template = if v.total > 0 {
            "{prefix} [{wide_bar}] {pos}/{len} {msg}"
        } else {
            "{prefix} step {pos} {msg}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_length(v.total.max(v.step));
        bar.set_position(v.step);
        let state = v.state.map_or("?", JobState::as_str);
        bar.set_prefix(format!("job {} {state}", v.job));
        bar.set_message(v.message(now));
    }
}

/// `watch [JOB...]`.
pub async fn watch(ctx: &Ctx, jobs: Vec<JobId>) -> anyhow::Result<ExitCode> {
    // Followers hold a `Follow`, which is not Send: they run as local tasks.
    let local = tokio::task::LocalSet::new();
    local.run_until(watch_local(ctx, jobs)).await
}

async fn watch_local(ctx: &Ctx, jobs: Vec<JobId>) -> anyhow::Result<ExitCode> {
    let tty = !ctx.json && std::io::stdout().is_terminal();
    let stop_on_pause = !tty;
    let mut screen = if ctx.json {
        Screen::Json
    } else if tty {
        Screen::Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
            bars: HashMap::new(),
        }
    } else {
        Screen::Lines
    };
    let every = jobs.is_empty();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    let mut views: BTreeMap<JobId, View> = BTreeMap::new();
    if every {
        tasks.spawn_local(follow_every(copy(ctx), tx.clone()));
    } else {
        for &job in &jobs {
            views.insert(job, View::new(job));
            tasks.spawn_local(follow_one(copy(ctx), job, tx.clone(), tty));
        }
    }
    // Until the first listing, a watch of every job does not know which jobs it follows.
    let mut known = !every;
    let mut tick = tokio::time::interval(TICK);
    loop {
        let feed = tokio::select! {
            feed = rx.recv() => feed,
            _ = tick.tick(), if tty => {
                let now = Instant::now();
                for v in views.values() {
                    screen.render(v, now);
                }
                continue;
            }
        };
        let Some(feed) = feed else {
            anyhow::bail!("lost every connection to lorad");
        };
        let now = Instant::now();
        match feed {
            Feed::Listing(records) => {
                for r in &records {
                    if views.contains_key(&r.id) || r.state.is_active() {
                        update(&mut screen, &mut views, r, now)?;
                    }
                }
                if !known && views.is_empty() {
                    eprintln!("loractl: no job is initializing or running");
                    return Ok(ExitCode::SUCCESS);
                }
                known = true;
            }
            Feed::Record(r) => {
                if views.contains_key(&r.id) || (every && r.state.is_active()) {
                    update(&mut screen, &mut views, &r, now)?;
                }
            }
            Feed::History(job, points) => {
                if let Some(v) = views.get_mut(&job) {
                    v.history(&points);
                    screen.render(v, now);
                }
            }
            Feed::Event { event, live } => {
                let Some(job) = event.job else { continue };
                if let (EventBody::StateChanged { to, .. }, true) = (&event.body, every && live) {
                    // A job that starts while watching every job joins in.
                    if to.is_active() && !views.contains_key(&job) {
                        views.insert(job, View::new(job));
                    }
                }
                let Some(v) = views.get_mut(&job) else {
                    continue;
                };
                if matches!(screen, Screen::Json) {
                    print_json_line(&event)?;
                }
                show_event(&mut screen, v, &event.body, live, now)?;
            }
            Feed::Notice(text) => screen.notice(&text),
            Feed::Failed(e) if every && !known && is_permission_denied(&e) => {
                // Only an admin sees every job's events: follow the user's own active jobs instead.
                screen.notice(
                    "only an admin can follow every job; following your jobs that are active now",
                );
                let mine = ctx.connect().await?.list(None, false).await?;
                for r in mine.into_iter().filter(|r| r.state.is_active()) {
                    views.insert(r.id, View::new(r.id));
                    tasks.spawn_local(follow_one(copy(ctx), r.id, tx.clone(), tty));
                }
                if views.is_empty() {
                    eprintln!("loractl: no job of yours is initializing or running");
                    return Ok(ExitCode::SUCCESS);
                }
                known = true;
            }
            Feed::Failed(e) => return Err(e),
        }
        let done = views
            .values()
            .all(|v| v.state.is_some_and(|s| settled(s, stop_on_pause)));
        if known && done {
            break;
        }
    }
    tasks.abort_all();
    match &screen {
        Screen::Json => {
            for v in views.values() {
                if let Some(r) = &v.record {
                    print_json_line(r)?;
                }
            }
        }
        Screen::Lines => {}
        // The state lines are above the bars already; the bars stay as they were last drawn.
        Screen::Bars { bars, .. } => bars.values().for_each(ProgressBar::abandon),
    }
    let code = exit_code(views.values().filter_map(|v| v.state));
    Ok(ExitCode::from(code))
}

/// Applies a record to its view (made if new), printing a state line when the state is news.
fn update(
    screen: &mut Screen,
    views: &mut BTreeMap<JobId, View>,
    r: &JobRecord,
    now: Instant,
) -> anyhow::Result<()> {
    let v = views.entry(r.id).or_insert_with(|| View::new(r.id));
    v.record(r, now);
    if v.announced != Some(r.state) {
        v.announced = Some(r.state);
        screen.say(&state_line(r.id, r.state, r.reason.as_deref()))?;
    }
    screen.render(v, now);
    Ok(())
}

/// Shows one event of a followed job.
fn show_event(
    screen: &mut Screen,
    v: &mut View,
    body: &EventBody,
    live: bool,
    now: Instant,
) -> anyhow::Result<()> {
    let lines = matches!(screen, Screen::Lines);
    match body {
        EventBody::Metrics { point } => {
            if v.point(point, now) && lines {
                screen.say(&v.line(now))?;
            }
        }
        // The state itself changes with the record that follows; the line can go out now.
        EventBody::StateChanged { to, reason, .. } if live && v.announced != Some(*to) => {
            v.announced = Some(*to);
            screen.say(&state_line(v.job, *to, reason.as_deref()))?;
        }
        EventBody::StateChanged { .. } => {}
        EventBody::Notice { level, text } => {
            screen.say(&format!("job {} {level}: {text}", v.job))?
        }
        EventBody::Checkpoint { name, .. } => {
            screen.say(&format!("job {} checkpoint {name}", v.job))?
        }
        EventBody::Export { format, text } => {
            screen.say(&format!("job {} export {format}: {text}", v.job))?
        }
        EventBody::Log { .. } => {}
    }
    screen.render(v, now);
    Ok(())
}

fn copy(ctx: &Ctx) -> Ctx {
    Ctx {
        socket: ctx.socket.clone(),
        json: ctx.json,
    }
}

fn is_permission_denied(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<ClientError>(),
        Some(ClientError::Server(w)) if w.code == ErrorCode::PermissionDenied
    )
}

/// Follows one job: its record at each attachment (with recent points on a terminal, for the
/// sparkline), its events, and its record again after a live state change or, at most every
/// [`REFRESH`], after a metric point.
async fn follow_one(ctx: Ctx, job: JobId, tx: Tx, seed: bool) {
    let notices = tx.clone();
    let mut follow = Follow::new(&ctx, job, move |m| {
        let _ = notices.send(Feed::Notice(m.to_string()));
    });
    let run = async {
        loop {
            let mut a = follow.attach().await?;
            let step = a.record.progress.step;
            if seed && step > 0 {
                let since = step.saturating_sub(SPARK_KEEP as u64);
                if let Ok(points) = a.client.metrics(job, Some(since)).await {
                    let _ = tx.send(Feed::History(job, points));
                }
            }
            let _ = tx.send(Feed::Record(Box::new(a.record)));
            let mut refresher = Refresher::default();
            while let Some(event) = a.sub.next().await {
                follow.saw(event.seq);
                match forward(&a.client, &a.sub, event, &tx, &mut refresher).await {
                    Ok(()) => {}
                    Err(e) if e.is_disconnect() => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    };
    let result: anyhow::Result<()> = run.await;
    if let Err(e) = result {
        let _ = tx.send(Feed::Failed(e));
    }
}

/// When each job's record was last read on a metric event.
#[derive(Default)]
struct Refresher(HashMap<JobId, Instant>);

/// Hands `event` on, then the job's record when it is due.
async fn forward(
    client: &Client,
    sub: &Subscription,
    event: Event,
    tx: &Tx,
    refresher: &mut Refresher,
) -> Result<(), ClientError> {
    let live = event.seq > sub.replay_until();
    let job = event.job;
    let due = match (&event.body, job) {
        (EventBody::StateChanged { .. }, Some(_)) => live,
        (EventBody::Metrics { .. }, Some(j)) => {
            refresher.0.get(&j).is_none_or(|at| at.elapsed() >= REFRESH)
        }
        _ => false,
    };
    let _ = tx.send(Feed::Event { event, live });
    if let (true, Some(job)) = (due, job) {
        refresher.0.insert(job, Instant::now());
        let record = client.get(job).await?;
        let _ = tx.send(Feed::Record(Box::new(record)));
    }
    Ok(())
}

/// Follows every job's events (admin only), reconnecting with backoff after a lost connection.
async fn follow_every(ctx: Ctx, tx: Tx) {
    let mut seen: Option<u64> = None;
    let mut delay = BACKOFF.0;
    let mut announced = false;
    loop {
        let attempt = async {
            let client = ctx.connect().await?;
            // The first time, only what happens from now on matters: the listing covers the past.
            let since = match seen {
                Some(seq) => seq,
                None => client.status().await?.last_seq,
            };
            let sub = client.subscribe(None, since).await?;
            let jobs = client.list(None, true).await?;
            Ok::<_, ClientError>((client, sub, jobs, since))
        };
        let (client, mut sub, jobs, since) = match attempt.await {
            Ok(a) => a,
            Err(e) if seen.is_some() && e.is_disconnect() => {
                if !announced {
                    let _ = tx.send(Feed::Notice(format!("lost lorad ({e}); reconnecting")));
                    announced = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF.1);
                continue;
            }
            Err(e) => {
                let _ = tx.send(Feed::Failed(e.into()));
                return;
            }
        };
        if announced {
            let _ = tx.send(Feed::Notice("reconnected to lorad".into()));
            announced = false;
        }
        delay = BACKOFF.0;
        seen = Some(seen.unwrap_or(since));
        let _ = tx.send(Feed::Listing(jobs));
        let mut refresher = Refresher::default();
        while let Some(event) = sub.next().await {
            seen = seen.max(Some(event.seq));
            match forward(&client, &sub, event, &tx, &mut refresher).await {
                Ok(()) => {}
                Err(e) if e.is_disconnect() => break,
                Err(e) => {
                    let _ = tx.send(Feed::Failed(e.into()));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: u64, loss: f64, step_ms: f64) -> MetricPoint {
        MetricPoint {
            step,
            epoch: 0.0,
            loss,
            lr: 1e-4,
            grad_norm: None,
            tokens_per_s: 1000.0,
            samples_per_s: 4.0,
            step_ms,
            data_wait_ms: 0.0,
            gpu: None,
            cpu: None,
            at_ms: 0,
        }
    }

    fn running(total: u64) -> View {
        View {
            state: Some(JobState::Running),
            total,
            ..View::new(JobId(3))
        }
    }

    #[test]
    fn a_sparkline_scales_between_the_minimum_and_the_maximum() {
        assert_eq!(
            sparkline(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]),
            "▁▂▃▄▅▆▇█"
        );
        assert_eq!(sparkline(&[3.0, 1.0, 2.0]), "█▁▅");
        assert_eq!(sparkline(&[2.0, 2.0]), "▄▄", "flat: mid height");
        assert_eq!(sparkline(&[1.0, f64::NAN, 2.0]), "▁ █");
        assert_eq!(sparkline(&[]), "");
    }

    #[test]
    fn the_view_keeps_the_newest_step_and_estimates_as_the_daemon_does() {
        let now = Instant::now();
        let mut v = running(200);
        v.step_time_s = Some(0.5);
        v.checkpoint_s = Some(2.0);
        v.checkpoint_every = 50;
        assert!(v.point(&point(40, 2.5, 500.0), now));
        assert!(!v.point(&point(39, 9.0, 500.0), now), "replayed, older");
        assert_eq!(v.step, 40);
        assert_eq!(v.loss, Some(2.5));
        // 160 steps x 0.5 s, and the checkpoints after steps 50, 100 and 150 x 2 s.
        assert_eq!(v.eta_at(now), Some(86.0));
        // Counted down since.
        assert_eq!(v.eta_at(now + Duration::from_secs(10)), Some(76.0));
        assert_eq!(v.eta_at(now + Duration::from_secs(100)), Some(0.0));
        v.state = Some(JobState::Paused);
        assert_eq!(v.eta_at(now), None, "no ETA unless running");
    }

    #[test]
    fn the_plain_line_has_the_step_loss_trend_speed_and_eta() {
        let now = Instant::now();
        let mut v = running(200);
        v.step = 39;
        v.loss = Some(2.6);
        v.loss_ema = Some(2.4);
        v.slope_per_100 = Some(-0.12);
        v.step_time_s = Some(0.39);
        assert!(v.point(&point(40, 2.3456, 390.0), now));
        let ema = v.loss_ema.unwrap();
        let slope = v.slope_per_100.unwrap();
        assert!(ema < 2.4 && slope < -0.12, "{ema} {slope}");
        assert_eq!(
            v.line(now),
            format!("job 3 step 40/200 loss 2.3456 ema {ema:.2} ({slope:+.2}/100 steps) 1000 tok/s ETA 1m 02s")
        );
        let fresh = View::new(JobId(5));
        assert_eq!(fresh.line(now), "job 5 step 0 loss -");
    }

    #[test]
    fn the_bar_message_has_an_arrow_and_a_sparkline() {
        let now = Instant::now();
        let mut v = running(10);
        for (i, loss) in [3.0, 2.0, 1.5, 1.0].into_iter().enumerate() {
            v.point(&point(i as u64 + 1, loss, 0.0), now);
        }
        let m = v.message(now);
        assert!(m.starts_with("loss 1.0000 | ema "), "{m}");
        assert!(m.contains('↓'), "{m}");
        assert!(m.contains("█") && m.contains("▁"), "{m}");
        assert_eq!(arrow(0.0), '→');
        assert_eq!(arrow(0.3), '↑');
    }

    #[test]
    fn a_record_brings_the_daemons_estimate_and_state() {
        let now = Instant::now();
        let mut v = View::new(JobId(1));
        let r = JobRecord {
            id: JobId(1),
            name: "n".into(),
            state: JobState::Running,
            reason: None,
            owner_uid: 0,
            priority: 0,
            template: "t".into(),
            base_model: "m".into(),
            dataset: "d".into(),
            output_dir: "o".into(),
            settings: Default::default(),
            overrides: Default::default(),
            progress: lorad_client::lorad_schema::Progress {
                step: 10,
                total_steps: 100,
                eta_s: Some(45.0),
                ..Default::default()
            },
            created_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            adapter_dir: None,
            worker_pid: None,
            resume_checkpoint: None,
            requeued: false,
            memory_estimate: None,
            first_started_at_ms: None,
            after: Vec::new(),
            not_before_ms: None,
            on_finish: None,
        };
        v.record(&r, now);
        assert_eq!(v.state, Some(JobState::Running));
        assert_eq!(v.eta_at(now), Some(45.0));
    }

    #[test]
    fn the_exit_code_is_the_worst_outcome() {
        use JobState::*;
        assert_eq!(exit_code([Completed]), 0);
        assert_eq!(exit_code([Failed]), EXIT_FAILURE);
        assert_eq!(exit_code([Cancelled]), EXIT_FAILURE);
        assert_eq!(exit_code([Paused]), EXIT_PAUSED);
        assert_eq!(exit_code([Completed, Paused]), EXIT_PAUSED);
        assert_eq!(exit_code([Paused, Failed, Completed]), EXIT_FAILURE);
        assert_eq!(exit_code([]), 0);
        assert!(settled(Paused, true) && !settled(Paused, false));
        assert!(settled(Completed, false) && !settled(Running, true));
    }

    #[test]
    fn state_lines_name_the_reason() {
        assert_eq!(
            state_line(JobId(3), JobState::Paused, Some("paused by user")),
            "job 3 paused: paused by user"
        );
        assert_eq!(
            state_line(JobId(3), JobState::Completed, None),
            "job 3 completed"
        );
    }
}
