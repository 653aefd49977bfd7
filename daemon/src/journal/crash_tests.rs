//! Storage-level crash tests of the journal, in the style of redb's own: the journal runs on a
//! [`CrashBackend`], an in-memory disk that records every write, resize and sync, under a seeded
//! workload that uses every write transaction of the journal (`insert_job`, `transition`,
//! `update_job`, `record_metric`, `append_event`). A reference model ([`State`]: jobs by id, events
//! by seq, metric points by (job, step), and the two counters) predicts each call's answer and is
//! updated only when a call is acknowledged (returns Ok).
//!
//! The crashes:
//! - a power cut at the Nth sync, for every N: the disk holds what the earlier syncs made durable
//!   (one sound run is recorded, and the image at each sync rebuilt from its calls);
//! - the same with torn writes: any subset of the 512-byte sectors written since the last sync, and
//!   of the resizes, reached the disk too (redb assumes no more than single-byte atomicity, and
//!   relies on checksums to roll a torn commit back);
//! - a full or failing disk: from the Kth write (or the Kth sync) on, every write, resize and sync
//!   fails; the journal call must return an error (not panic) and no later call may be acknowledged.
//!
//! After each crash the durable image is reopened on a fresh backend (redb repairs it on open),
//! `Database::check_integrity` must pass, and the journal must hold exactly the acknowledged
//! transactions plus at most the one in flight, whole (its job record, event and metric point
//! together, or none of them), with counters that never hand out a stored id or seq again; the
//! reopened journal must then take new writes of every kind. One exception, redb's: a crash while
//! the journal file is first created can leave a file redb refuses to open (see [`check_recovery`]).
//!
//! One seed runs by default (`cargo test -p lorad --lib journal::crash_tests`). For more:
//! `LORAD_CRASH_SEEDS=50` runs seeds 0..50, and `LORAD_CRASH_SEED=17` seed 17 alone (a failure names
//! its seed and crash point).
use super::tables::{meta, EVENTS, JOBS, META, METRICS};
use super::{decode, Journal, JournalError};
use crate::state;
use lorad_schema::{Event, EventBody, JobId, JobRecord, JobState, MetricPoint, Progress};
use redb::{Builder, ReadableTable, StorageBackend};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// Write transactions per workload.
const OPS: usize = 100;
/// Torn images checked per crash point.
const TEARS: usize = 8;
/// At most this many fault positions per failing-disk test and seed (spread over all of them).
const FAULTS: u64 = 1000;
/// What a real disk writes atomically, as far as these tests go.
const SECTOR: u64 = 512;
/// The first bytes of every redb file.
const REDB_MAGIC: &[u8] = b"redb\x1a\x0a\xa9\x0d\x0a";

// ---------------------------------------------------------------------------------------------
// The disk

/// One mutating call that succeeded.
#[derive(Clone, Debug)]
enum Io {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    SetLen(u64),
    /// A `sync_data`, made during workload step `step` (see [`Run::states`]).
    Sync {
        step: usize,
    },
}

/// Which calls a fault counts down on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FailOn {
    /// `write` and `set_len` (a full disk).
    Writes,
    /// `sync_data` (an I/O error at fsync).
    Syncs,
}

#[derive(Debug, Default)]
struct Disk {
    /// The file as redb sees it: writes land here at once, and reads are served from here.
    live: Vec<u8>,
    /// Every mutating call that succeeded, in order; the image a crash leaves is rebuilt from it.
    trace: Vec<Io>,
    /// The workload step running now, stamped on syncs.
    step: usize,
    /// `(on, n)`: `n` more calls of kind `on` succeed, then every write, resize and sync fails.
    fault: Option<(FailOn, u64)>,
    failing: bool,
}

impl Disk {
    /// Whether this call, of kind `kind`, fails.
    fn fails(&mut self, kind: FailOn) -> bool {
        if let Some((on, left)) = &mut self.fault {
            if *on == kind {
                if *left == 0 {
                    self.failing = true;
                } else {
                    *left -= 1;
                }
            }
        }
        self.failing
    }
}

/// A redb storage backend on a [`Disk`]; clones share the disk, so a test keeps one to inspect it.
#[derive(Clone, Debug, Default)]
struct CrashBackend(Arc<Mutex<Disk>>);

impl CrashBackend {
    fn with_image(image: Vec<u8>) -> Self {
        let backend = Self::default();
        backend.disk().live = image;
        backend
    }

    fn failing_after(on: FailOn, calls: u64) -> Self {
        let backend = Self::default();
        backend.disk().fault = Some((on, calls));
        backend
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.0.lock().unwrap()
    }

    fn set_step(&self, step: usize) {
        self.disk().step = step;
    }

    fn failing(&self) -> bool {
        self.disk().failing
    }

    fn trace(&self) -> Vec<Io> {
        self.disk().trace.clone()
    }
}

fn disk_failure() -> io::Error {
    io::Error::other("simulated disk failure")
}

fn write_at(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = usize::try_from(offset).unwrap();
    if image.len() < start + data.len() {
        image.resize(start + data.len(), 0);
    }
    image[start..start + data.len()].copy_from_slice(data);
}

/// Applies one call to an image (the live file, or a durable image being rebuilt).
fn apply(image: &mut Vec<u8>, io: &Io) {
    match io {
        Io::Write { offset, data } => write_at(image, *offset, data),
        Io::SetLen(len) => image.resize(usize::try_from(*len).unwrap(), 0),
        Io::Sync { .. } => {}
    }
}

impl StorageBackend for CrashBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.disk().live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let disk = self.disk();
        let start = usize::try_from(offset).unwrap();
        let bytes = disk
            .live
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut disk = self.disk();
        if disk.fails(FailOn::Writes) {
            return Err(disk_failure());
        }
        let io = Io::SetLen(len);
        apply(&mut disk.live, &io);
        disk.trace.push(io);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut disk = self.disk();
        if disk.fails(FailOn::Syncs) {
            return Err(disk_failure());
        }
        let step = disk.step;
        disk.trace.push(Io::Sync { step });
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut disk = self.disk();
        if disk.fails(FailOn::Writes) {
            return Err(disk_failure());
        }
        write_at(&mut disk.live, offset, data);
        disk.trace.push(Io::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }
}

/// Splits a trace at its last sync: the image that sync made durable, and the calls after it.
fn durable_and_pending(trace: &[Io]) -> (Vec<u8>, &[Io]) {
    let synced = trace
        .iter()
        .rposition(|io| matches!(io, Io::Sync { .. }))
        .map_or(0, |i| i + 1);
    let mut image = Vec::new();
    for io in &trace[..synced] {
        apply(&mut image, io);
    }
    (image, &trace[synced..])
}

/// The image a crash leaves when some of the calls since the last sync reached the disk: each
/// sector of each write, and each resize, independently kept or lost.
fn tear(durable: &[u8], pending: &[Io], rng: &mut Rng) -> Vec<u8> {
    let keep = 10 + rng.below(81);
    let mut image = durable.to_vec();
    for io in pending {
        match io {
            Io::Write { offset, data } => {
                let end = offset + data.len() as u64;
                let mut at = *offset;
                while at < end {
                    let next = ((at / SECTOR + 1) * SECTOR).min(end);
                    if rng.percent(keep) {
                        let part = &data[(at - offset) as usize..(next - offset) as usize];
                        write_at(&mut image, at, part);
                    }
                    at = next;
                }
            }
            Io::SetLen(_) if rng.percent(keep) => apply(&mut image, io),
            Io::SetLen(_) => {}
            Io::Sync { .. } => unreachable!("pending calls end at a sync"),
        }
    }
    image
}

// ---------------------------------------------------------------------------------------------
// The model

/// The journal's contents: what the model expects, or what a reopened journal holds.
#[derive(Clone, Debug, PartialEq)]
struct State {
    jobs: BTreeMap<u64, JobRecord>,
    events: BTreeMap<u64, Event>,
    metrics: BTreeMap<(u64, u64), MetricPoint>,
    next_job: u64,
    next_seq: u64,
}

/// What one write transaction stores.
#[derive(Clone, Debug, Default, PartialEq)]
struct Effect {
    job: Option<JobRecord>,
    event: Option<Event>,
    metric: Option<((u64, u64), MetricPoint)>,
}

/// A journal call's answer (or the model's prediction of it).
// One per call, never stored in bulk: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    Wrote(Effect),
    /// The state machine refused the transition.
    Refused,
    /// `record_metric` ignored the point (a replayed step, or an ended job).
    Ignored,
}

impl State {
    fn empty() -> Self {
        State {
            jobs: BTreeMap::new(),
            events: BTreeMap::new(),
            metrics: BTreeMap::new(),
            next_job: 1,
            next_seq: 1,
        }
    }

    fn apply(&mut self, effect: Effect) {
        if let Some(job) = effect.job {
            self.next_job = self.next_job.max(job.id.0 + 1);
            self.jobs.insert(job.id.0, job);
        }
        if let Some(event) = effect.event {
            self.next_seq = self.next_seq.max(event.seq + 1);
            self.events.insert(event.seq, event);
        }
        if let Some((key, point)) = effect.metric {
            self.metrics.insert(key, point);
        }
    }

    fn scrubbed(&self) -> State {
        State {
            jobs: self
                .jobs
                .iter()
                .map(|(&id, job)| (id, scrub_job(job.clone())))
                .collect(),
            events: self
                .events
                .iter()
                .map(|(&seq, event)| (seq, scrub_event(event.clone())))
                .collect(),
            ..self.clone()
        }
    }
}

impl Effect {
    fn scrubbed(&self) -> Effect {
        Effect {
            job: self.job.clone().map(scrub_job),
            event: self.event.clone().map(scrub_event),
            metric: self.metric.clone(),
        }
    }
}

// What the journal takes from the clock (event and job times) and its progress arithmetic
// (`active_s`, `eta_s`, the smoothed times and loss) are not modelled: predictions leave them blank and are compared with them
// blanked. Everything else is predicted exactly.
fn scrub_job(mut job: JobRecord) -> JobRecord {
    job.started_at_ms = job.started_at_ms.map(|_| 0);
    job.finished_at_ms = job.finished_at_ms.map(|_| 0);
    job.first_started_at_ms = job.first_started_at_ms.map(|_| 0);
    let p = &mut job.progress;
    p.active_s = 0.0;
    p.eta_s = None;
    p.wall_s = 0.0;
    p.step_time_s = None;
    p.checkpoint_s = None;
    p.loss_ema = None;
    p.loss_slope_per_100 = None;
    job
}

fn scrub_event(mut event: Event) -> Event {
    event.at_ms = 0;
    event
}

/// A change to a job record, applied by `update_job` or with a transition.
#[derive(Clone, Copy, Debug)]
enum Edit {
    Nothing,
    Priority(i32),
    WorkerPid(Option<u32>),
    Restarted,
}

impl Edit {
    fn apply(self, job: &mut JobRecord) {
        match self {
            Edit::Nothing => {}
            Edit::Priority(p) => job.priority = p,
            Edit::WorkerPid(pid) => job.worker_pid = pid,
            Edit::Restarted => job.progress.restarts += 1,
        }
    }
}

/// One write transaction of the workload.
#[derive(Clone, Debug)]
enum Op {
    Insert {
        priority: i32,
        total_steps: u64,
    },
    Transition {
        job: JobId,
        to: JobState,
        reason: Option<String>,
        edit: Edit,
    },
    Update {
        job: JobId,
        edit: Edit,
    },
    Metric {
        job: JobId,
        point: MetricPoint,
    },
    Event {
        job: Option<JobId>,
        body: EventBody,
    },
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::Insert { .. } => "insert_job",
            Op::Transition { .. } => "transition",
            Op::Update { .. } => "update_job",
            Op::Metric { .. } => "record_metric",
            Op::Event { .. } => "append_event",
        }
    }
}

const KINDS: [&str; 5] = [
    "insert_job",
    "transition",
    "update_job",
    "record_metric",
    "append_event",
];

fn new_job(id: JobId, priority: i32, total_steps: u64) -> JobRecord {
    JobRecord {
        id,
        name: format!("job{id}"),
        state: JobState::Queued,
        reason: None,
        owner_uid: 1000,
        priority,
        template: "basic-fine-tune".into(),
        base_model: "/m".into(),
        dataset: "/d.jsonl".into(),
        output_dir: format!("/o/{id}"),
        settings: Default::default(),
        overrides: Default::default(),
        progress: Progress {
            total_steps,
            ..Progress::default()
        },
        created_at_ms: 1,
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
    }
}

fn point(step: u64, loss: f64) -> MetricPoint {
    MetricPoint {
        step,
        epoch: step as f64 / 8.0,
        loss,
        lr: 1e-3,
        grad_norm: Some(1.5),
        tokens_per_s: 900.0,
        samples_per_s: 4.0,
        step_ms: 250.0,
        data_wait_ms: 0.5,
        gpu: None,
        cpu: None,
        at_ms: 5 + step,
    }
}

/// The model's prediction of `op`'s answer on a journal holding `s`.
fn predict(s: &State, op: &Op) -> Answer {
    let event = |job: Option<JobId>, body: EventBody| Event {
        seq: s.next_seq,
        job,
        at_ms: 0,
        body,
    };
    match op {
        Op::Insert {
            priority,
            total_steps,
        } => {
            let id = JobId(s.next_job);
            let job = new_job(id, *priority, *total_steps);
            let text = format!("job {id} submitted: {}", job.name);
            let body = EventBody::Notice {
                level: "info".into(),
                text,
            };
            Answer::Wrote(Effect {
                job: Some(job),
                event: Some(event(Some(id), body)),
                metric: None,
            })
        }
        Op::Transition {
            job,
            to,
            reason,
            edit,
        } => {
            let mut record = s.jobs[&job.0].clone();
            let from = record.state;
            if state::check(from, *to).is_err() {
                return Answer::Refused;
            }
            record.state = *to;
            record.reason = reason.clone();
            if *to == JobState::Initializing {
                record.started_at_ms = Some(0);
                record.first_started_at_ms = Some(0);
            } else if to.is_terminal() {
                record.finished_at_ms = Some(0);
            }
            edit.apply(&mut record);
            let body = EventBody::StateChanged {
                from,
                to: *to,
                reason: reason.clone(),
            };
            Answer::Wrote(Effect {
                job: Some(record),
                event: Some(event(Some(*job), body)),
                metric: None,
            })
        }
        Op::Update { job, edit } => {
            let mut record = s.jobs[&job.0].clone();
            edit.apply(&mut record);
            Answer::Wrote(Effect {
                job: Some(record),
                ..Effect::default()
            })
        }
        Op::Metric { job, point } => {
            let mut record = s.jobs[&job.0].clone();
            if record.state.is_terminal() || s.metrics.contains_key(&(job.0, point.step)) {
                return Answer::Ignored;
            }
            record.progress.step = point.step;
            record.progress.epoch = point.epoch;
            record.progress.loss = Some(point.loss);
            let body = EventBody::Metrics {
                point: point.clone(),
            };
            Answer::Wrote(Effect {
                job: Some(record),
                event: Some(event(Some(*job), body)),
                metric: Some(((job.0, point.step), point.clone())),
            })
        }
        Op::Event { job, body } => Answer::Wrote(Effect {
            event: Some(event(*job, body.clone())),
            ..Effect::default()
        }),
    }
}

/// Runs `op` on the journal. Errors other than the state machine's refusal are passed on.
fn call(journal: &Journal, op: &Op) -> Result<Answer, JournalError> {
    let wrote = |job, event, metric| Answer::Wrote(Effect { job, event, metric });
    Ok(match op {
        Op::Insert {
            priority,
            total_steps,
        } => {
            let (job, event) = journal.insert_job(|id| new_job(id, *priority, *total_steps))?;
            wrote(Some(job), Some(event), None)
        }
        Op::Transition {
            job,
            to,
            reason,
            edit,
        } => match journal.transition(*job, *to, reason.clone(), |r| edit.apply(r)) {
            Ok((job, event)) => wrote(Some(job), Some(event), None),
            Err(JournalError::Transition(_)) => Answer::Refused,
            Err(e) => return Err(e),
        },
        Op::Update { job, edit } => wrote(
            Some(journal.update_job(*job, |r| edit.apply(r))?),
            None,
            None,
        ),
        Op::Metric { job, point } => match journal.record_metric(*job, point.clone())? {
            Some((record, event)) => wrote(
                Some(record),
                Some(event),
                Some(((job.0, point.step), point.clone())),
            ),
            None => Answer::Ignored,
        },
        Op::Event { job, body } => {
            wrote(None, Some(journal.append_event(*job, body.clone())?), None)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The workload

/// splitmix64: small, seedable, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// `OPS` write transactions drawn from `seed`, each valid for the model state its predecessors
/// leave (a few transitions are refused and a few metric points ignored, on purpose).
fn workload(seed: u64) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    let mut model = State::empty();
    let mut ops = Vec::with_capacity(OPS);
    while ops.len() < OPS {
        let op = next_op(&model, &mut rng);
        if let Answer::Wrote(effect) = predict(&model, &op) {
            model.apply(effect);
        }
        ops.push(op);
    }
    ops
}

fn next_op(s: &State, rng: &mut Rng) -> Op {
    let ids: Vec<u64> = s.jobs.keys().copied().collect();
    if ids.is_empty() || rng.percent(15) {
        return Op::Insert {
            priority: rng.below(5) as i32,
            total_steps: 10 + rng.below(50),
        };
    }
    let job = &s.jobs[&rng.pick(&ids)];
    let edit = match rng.below(4) {
        0 => Edit::Nothing,
        1 => Edit::Priority(rng.below(10) as i32),
        2 => Edit::WorkerPid(Some(1000 + rng.below(1000) as u32)),
        _ => Edit::Restarted,
    };
    match rng.below(100) {
        0..=34 => {
            let allowed: Vec<JobState> = JobState::ALL
                .into_iter()
                .filter(|&to| state::check(job.state, to).is_ok())
                .collect();
            let to = if allowed.is_empty() || rng.percent(10) {
                rng.pick(&JobState::ALL)
            } else {
                rng.pick(&allowed)
            };
            let reason = rng
                .percent(50)
                .then(|| format!("reason {}", rng.below(100)));
            Op::Transition {
                job: job.id,
                to,
                reason,
                edit,
            }
        }
        35..=64 => {
            let last = job.progress.step;
            let step = if last > 0 && rng.percent(10) {
                1 + rng.below(last)
            } else {
                last + 1
            };
            let loss = 1.0 + rng.below(1000) as f64 / 250.0;
            Op::Metric {
                job: job.id,
                point: point(step, loss),
            }
        }
        65..=74 => Op::Update { job: job.id, edit },
        _ => {
            let body = match rng.below(4) {
                0 => EventBody::Notice {
                    level: "warn".into(),
                    text: format!("note {}", rng.below(1000)),
                },
                1 => EventBody::Checkpoint {
                    step: job.progress.step,
                    name: format!("step-{}", job.progress.step),
                },
                2 => EventBody::Export {
                    format: "peft".into(),
                    text: "exporting".into(),
                },
                // Now and then a long one, so the file grows.
                _ => {
                    let len = if rng.percent(25) {
                        2000 + rng.below(10_000)
                    } else {
                        10 + rng.below(200)
                    };
                    let text = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
                    EventBody::Log {
                        offset: rng.below(1 << 20),
                        text,
                    }
                }
            };
            let job = (!rng.percent(20)).then_some(job.id);
            Op::Event { job, body }
        }
    }
}

/// One run of a workload.
struct Run {
    /// `states[i]`: the acknowledged contents before step `i`. Step 0 opens the journal, step `i`
    /// runs `ops[i - 1]`, and step `ops.len() + 1` closes the journal (drops the database).
    states: Vec<State>,
    /// The step whose call failed, and the contents it would have left (as predicted).
    failed: Option<(usize, State)>,
}

/// Runs `ops` on a journal created on `backend`, until the end or the first failed call.
fn run(ops: &[Op], backend: &CrashBackend) -> Run {
    let mut states = vec![State::empty()];
    backend.set_step(0);
    let opened = Builder::new()
        .create_with_backend(backend.clone())
        .map_err(JournalError::from)
        .and_then(Journal::init);
    let journal = match opened {
        Ok(journal) => journal,
        Err(e) => {
            assert!(backend.failing(), "opening failed on a sound disk: {e}");
            return Run {
                states,
                failed: Some((0, State::empty())),
            };
        }
    };
    states.push(State::empty());
    for (i, op) in ops.iter().enumerate() {
        let step = i + 1;
        backend.set_step(step);
        let before = &states[step];
        let predicted = predict(before, op);
        match call(&journal, op) {
            Ok(answer) => {
                let same = match (&predicted, &answer) {
                    (Answer::Wrote(p), Answer::Wrote(a)) => p.scrubbed() == a.scrubbed(),
                    (p, a) => p == a,
                };
                assert!(
                    same,
                    "step {step} {op:?}: the journal answered {answer:?}, the model predicted {predicted:?}"
                );
                let mut after = before.clone();
                if let Answer::Wrote(effect) = answer {
                    after.apply(effect);
                }
                states.push(after);
            }
            Err(e) => {
                assert!(
                    backend.failing(),
                    "step {step} {op:?} failed on a sound disk: {e}"
                );
                assert!(matches!(e, JournalError::Db(_)), "step {step}: {e:?}");
                let mut after = before.clone();
                if let Answer::Wrote(effect) = predicted {
                    after.apply(effect);
                }
                // The disk stays broken: nothing more may be acknowledged as written.
                for later in &ops[step..] {
                    let answer = call(&journal, later);
                    assert!(
                        !matches!(answer, Ok(Answer::Wrote(_))),
                        "{later:?} was acknowledged after the disk failed"
                    );
                }
                drop(journal);
                return Run {
                    states,
                    failed: Some((step, after)),
                };
            }
        }
    }
    backend.set_step(ops.len() + 1);
    drop(journal);
    states.push(states[ops.len() + 1].clone());
    Run {
        states,
        failed: None,
    }
}

fn step_name(ops: &[Op], step: usize) -> String {
    match step {
        0 => "open".into(),
        s if s > ops.len() => "close".into(),
        s => format!("{} {:?}", ops[s - 1].kind(), ops[s - 1]),
    }
}

fn seeds() -> Vec<u64> {
    let var = |name| std::env::var(name).ok().map(|v: String| v.parse::<u64>());
    match (var("LORAD_CRASH_SEED"), var("LORAD_CRASH_SEEDS")) {
        (Some(seed), _) => vec![seed.expect("LORAD_CRASH_SEED: a number")],
        (None, Some(n)) => (0..n.expect("LORAD_CRASH_SEEDS: a number")).collect(),
        (None, None) => vec![0],
    }
}

// ---------------------------------------------------------------------------------------------
// The checks

/// Reads everything the journal holds, straight from its tables, and checks that the journal's
/// own reads agree.
fn read_state(journal: &Journal) -> State {
    let txn = journal.db.begin_read().unwrap();
    let counters = txn.open_table(META).unwrap();
    let counter = |key| counters.get(key).unwrap().map_or(1, |v| v.value());
    let mut s = State {
        next_job: counter(meta::NEXT_JOB),
        next_seq: counter(meta::NEXT_SEQ),
        ..State::empty()
    };
    for row in txn.open_table(JOBS).unwrap().iter().unwrap() {
        let (id, bytes) = row.unwrap();
        let job: JobRecord = decode(|| format!("job {}", id.value()), bytes.value()).unwrap();
        assert_eq!(job.id.0, id.value(), "job stored under another id");
        s.jobs.insert(id.value(), job);
    }
    for row in txn.open_table(EVENTS).unwrap().iter().unwrap() {
        let (seq, bytes) = row.unwrap();
        let event: Event = decode(|| format!("event {}", seq.value()), bytes.value()).unwrap();
        assert_eq!(event.seq, seq.value(), "event stored under another seq");
        s.events.insert(seq.value(), event);
    }
    for row in txn.open_table(METRICS).unwrap().iter().unwrap() {
        let (key, bytes) = row.unwrap();
        let point: MetricPoint =
            decode(|| format!("metric {:?}", key.value()), bytes.value()).unwrap();
        s.metrics.insert(key.value(), point);
    }

    fn values<K, V: Clone>(m: &BTreeMap<K, V>) -> Vec<V> {
        m.values().cloned().collect()
    }
    assert_eq!(journal.jobs().unwrap(), values(&s.jobs));
    assert_eq!(journal.job_count().unwrap(), s.jobs.len() as u64);
    assert_eq!(journal.last_seq().unwrap(), s.next_seq - 1);
    assert_eq!(
        journal.events_since(0, None, usize::MAX).unwrap(),
        values(&s.events)
    );
    for &id in s.jobs.keys() {
        let points: Vec<_> = s
            .metrics
            .range((id, 0)..=(id, u64::MAX))
            .map(|(_, p)| p.clone())
            .collect();
        assert_eq!(journal.metrics(JobId(id), None).unwrap(), points);
    }
    s
}

/// What any journal must satisfy, model or no model: each transaction's writes are all there or
/// all missing, and the counters are past everything stored.
fn check_whole(s: &State, what: &str) {
    let fail = |msg: String| -> ! { panic!("{what}: {msg}") };
    if s.jobs.keys().any(|&id| id >= s.next_job) || s.events.keys().any(|&seq| seq >= s.next_seq) {
        fail("a stored id or seq is not below its counter".into());
    }
    let mut metric_events = 0;
    for (&id, job) in &s.jobs {
        let events: Vec<&Event> = s
            .events
            .values()
            .filter(|e| e.job == Some(job.id))
            .collect();
        // insert_job: the record and its notice.
        if !matches!(
            events.first(),
            Some(Event {
                body: EventBody::Notice { .. },
                ..
            })
        ) {
            fail(format!("job {id} has no submission notice"));
        }
        // transition: the record's state and its state_changed events.
        let mut state = JobState::Queued;
        let mut last_step = 0;
        for event in &events {
            match &event.body {
                EventBody::StateChanged { from, to, .. } => {
                    if *from != state {
                        fail(format!(
                            "job {id}: event {} leaves {from}, the job was {state}",
                            event.seq
                        ));
                    }
                    state = *to;
                }
                // record_metric: the point, its event and the record's progress.
                EventBody::Metrics { point } => {
                    metric_events += 1;
                    last_step = point.step;
                    if s.metrics.get(&(id, point.step)) != Some(point) {
                        fail(format!("job {id}: event {} has no stored point", event.seq));
                    }
                }
                _ => {}
            }
        }
        if job.state != state {
            fail(format!("job {id} is {}, its events say {state}", job.state));
        }
        if job.progress.step != last_step {
            fail(format!(
                "job {id} is at step {}, its events say {last_step}",
                job.progress.step
            ));
        }
    }
    if let Some(event) = s
        .events
        .values()
        .find(|e| e.job.is_some_and(|j| !s.jobs.contains_key(&j.0)))
    {
        fail(format!(
            "event {} is of a job that is not stored",
            event.seq
        ));
    }
    if metric_events != s.metrics.len() {
        fail(format!(
            "{} metric points, {metric_events} metrics events",
            s.metrics.len()
        ));
    }
}

/// The reopened journal hands out the next id and seqs and takes every kind of write.
fn check_writable(journal: &Journal, s: &State, what: &str) {
    let (job, submitted) = journal.insert_job(|id| new_job(id, 1, 10)).unwrap();
    assert_eq!(
        (job.id.0, submitted.seq),
        (s.next_job, s.next_seq),
        "{what}: the reopened journal's first id and seq"
    );
    let (_, started) = journal
        .transition(job.id, JobState::Initializing, None, |_| {})
        .unwrap();
    let (_, measured) = journal
        .record_metric(job.id, point(1, 2.0))
        .unwrap()
        .unwrap();
    journal.update_job(job.id, |r| r.priority = 3).unwrap();
    let body = EventBody::Notice {
        level: "info".into(),
        text: "reopened".into(),
    };
    let noted = journal.append_event(None, body).unwrap();
    let seqs = [started.seq, measured.seq, noted.seq];
    assert_eq!(seqs, [1, 2, 3].map(|n| s.next_seq + n), "{what}");
    assert_eq!(
        journal.job_count().unwrap(),
        s.jobs.len() as u64 + 1,
        "{what}"
    );
}

/// What a crash image held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Recovered {
    /// The acknowledged transactions (the one in flight rolled back, or there was none).
    Acknowledged,
    /// Those and the transaction in flight, whole.
    InFlightToo,
    /// No journal: the crash came while the journal file was first created (see below).
    Unfinished,
}

/// Reopens a crash image and checks it holds `before`, or `after` whole (`after` is a prediction,
/// compared blanked, when the step's call failed; else the acknowledged contents).
fn check_recovery(
    image: Vec<u8>,
    before: &State,
    after: &State,
    predicted: bool,
    what: &str,
) -> Recovered {
    if !image.is_empty() && !image.starts_with(REDB_MAGIC) {
        // redb writes the magic number last when it creates a file, and refuses a non-empty file
        // without one: a crash while the journal file is first created leaves a file that does
        // not open (and held nothing). Anything later must open.
        assert!(
            *before == State::empty() && *after == State::empty(),
            "{what}: no magic number"
        );
        let refused = Builder::new().create_with_backend(CrashBackend::with_image(image));
        assert!(
            refused.is_err(),
            "{what}: a file without magic number opened"
        );
        return Recovered::Unfinished;
    }
    let mut db = Builder::new()
        .create_with_backend(CrashBackend::with_image(image))
        .unwrap_or_else(|e| panic!("{what}: the crash image does not open: {e}"));
    match db.check_integrity() {
        Ok(true) => {}
        other => panic!("{what}: integrity check after the repairing open: {other:?}"),
    }
    let journal = Journal::init(db).unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = read_state(&journal);
    check_whole(&got, what);
    let recovered = if got == *before {
        Recovered::Acknowledged
    } else if got == *after || (predicted && got.scrubbed() == after.scrubbed()) {
        Recovered::InFlightToo
    } else {
        panic!(
            "{what}: the reopened journal is neither the acknowledged state nor that plus the \
             step in flight.\nagainst acknowledged: {}\nagainst in-flight: {}",
            diff(&got, before),
            diff(&got, after)
        )
    };
    check_writable(&journal, &got, what);
    recovered
}

fn diff(got: &State, want: &State) -> String {
    fn keys<K: Ord + Copy + Debug, V: PartialEq>(
        name: &str,
        a: &BTreeMap<K, V>,
        b: &BTreeMap<K, V>,
        out: &mut Vec<String>,
    ) {
        for k in a
            .keys()
            .chain(b.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            match (a.get(k), b.get(k)) {
                (Some(_), None) => out.push(format!("{name} {k:?} extra")),
                (None, Some(_)) => out.push(format!("{name} {k:?} missing")),
                (Some(x), Some(y)) if x != y => out.push(format!("{name} {k:?} differs")),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    if got.next_job != want.next_job || got.next_seq != want.next_seq {
        out.push(format!(
            "counters (job, seq) ({}, {}), want ({}, {})",
            got.next_job, got.next_seq, want.next_job, want.next_seq
        ));
    }
    keys("job", &got.jobs, &want.jobs, &mut out);
    keys("event", &got.events, &want.events, &mut out);
    keys("metric", &got.metrics, &want.metrics, &mut out);
    out.join("; ")
}

/// A sound run of `seed`'s workload: its ops, the states it went through, and its disk's calls.
fn record(seed: u64) -> (Vec<Op>, Run, Vec<Io>) {
    let ops = workload(seed);
    for kind in KINDS {
        assert!(
            ops.iter().any(|op| op.kind() == kind),
            "seed {seed}: the workload has no {kind}"
        );
    }
    let backend = CrashBackend::default();
    let run = run(&ops, &backend);
    assert!(run.failed.is_none());
    (ops, run, backend.trace())
}

/// Crashes at every sync of a sound run: the clean image, or `tears` torn ones.
fn crash_at_every_sync(seed: u64, tears: usize) {
    let (ops, run, trace) = record(seed);
    let mut rng = Rng::new(seed ^ 0x7ea5);
    let mut tally = BTreeMap::new();
    let mut in_flight = std::collections::BTreeSet::new();
    let mut durable = Vec::new();
    let mut synced = 0;
    let mut n = 0;
    for (at, io) in trace.iter().enumerate() {
        let Io::Sync { step } = *io else { continue };
        n += 1;
        let (before, after) = (&run.states[step], &run.states[step + 1]);
        let what = format!(
            "seed {seed}, crash at sync {n} in step {step} ({})",
            step_name(&ops, step)
        );
        let images: Vec<_> = match tears {
            0 => vec![durable.clone()],
            _ => (0..tears)
                .map(|_| tear(&durable, &trace[synced..at], &mut rng))
                .collect(),
        };
        for (t, image) in images.into_iter().enumerate() {
            let what = format!("{what}, image {t}");
            *tally
                .entry(check_recovery(image, before, after, false, &what))
                .or_insert(0) += 1;
        }
        if let Some(op) = ops.get(step.wrapping_sub(1)) {
            in_flight.insert(op.kind());
        }
        for io in &trace[synced..at] {
            apply(&mut durable, io);
        }
        synced = at + 1;
    }
    let (image, _) = durable_and_pending(&trace);
    let last = run.states.last().unwrap();
    let what = format!("seed {seed}, after the clean close");
    check_recovery(image, last, last, false, &what);
    for kind in KINDS {
        assert!(
            in_flight.contains(kind),
            "seed {seed}: no crash during a {kind}"
        );
    }
    eprintln!("seed {seed}: {n} syncs, {tears} torn images each: {tally:?}");
}

/// A disk that fails from the kth call of kind `on` on, for every k (or `FAULTS` of them, spread).
fn failing_disk(seed: u64, on: FailOn) {
    let (ops, _, trace) = record(seed);
    let calls = trace
        .iter()
        .filter(|io| matches!(io, Io::Sync { .. }) == (on == FailOn::Syncs))
        .count() as u64;
    let stride = calls.div_ceil(FAULTS).max(1);
    let mut rng = Rng::new(seed ^ 0xfa11);
    let mut tally = BTreeMap::new();
    for k in (0..calls).step_by(stride as usize) {
        let k = (k + rng.below(stride)).min(calls - 1);
        let backend = CrashBackend::failing_after(on, k);
        let run = run(&ops, &backend);
        assert!(
            backend.failing(),
            "seed {seed}: fault {on:?} {k} never fired"
        );
        // The step whose call failed; or the close, whose errors nobody sees.
        let close = ops.len() + 1;
        let (step, after, predicted) = match &run.failed {
            Some((step, after)) => (*step, after, true),
            None => (close, &run.states[close + 1], false),
        };
        let what = format!(
            "seed {seed}, {on:?} fail from call {k}, in step {step} ({})",
            step_name(&ops, step)
        );
        let trace = backend.trace();
        let (durable, pending) = durable_and_pending(&trace);
        let torn = tear(&durable, pending, &mut rng);
        for (image, what) in [(durable, what.clone()), (torn, format!("{what}, torn"))] {
            let recovered = check_recovery(image, &run.states[step], after, predicted, &what);
            *tally.entry(recovered).or_insert(0) += 1;
        }
    }
    eprintln!(
        "seed {seed}: {on:?} failing from {} of {calls} calls: {tally:?}",
        calls.div_ceil(stride)
    );
}

#[test]
fn a_power_cut_at_any_sync_keeps_the_acknowledged_transactions_whole() {
    for seed in seeds() {
        crash_at_every_sync(seed, 0);
    }
}

#[test]
fn torn_writes_at_a_power_cut_roll_the_transaction_in_flight_back_or_forward() {
    for seed in seeds() {
        crash_at_every_sync(seed, TEARS);
    }
}

#[test]
fn a_full_disk_fails_the_call_and_loses_no_acknowledged_transaction() {
    for seed in seeds() {
        failing_disk(seed, FailOn::Writes);
    }
}

#[test]
fn a_failing_sync_fails_the_call_and_loses_no_acknowledged_transaction() {
    for seed in seeds() {
        failing_disk(seed, FailOn::Syncs);
    }
}
