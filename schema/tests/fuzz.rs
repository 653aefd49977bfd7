//! Fuzzing of frame reading and decoding on the stable toolchain: random bytes, mutated valid
//! frames, deep nesting and huge or lying lengths go through the blocking and async readers and
//! through `decode` of `ClientFrame`, `Handshake` and `ServerFrame`. Each case must end in a value
//! or a `FrameError` (never a panic, never a stack overflow on a 2 MiB thread), the readers must
//! agree with a reference model, and a counting allocator checks that no case allocates beyond what
//! its bytes justify: never the announced length of a frame whose bytes did not arrive.
//!
//! By default each of the three properties runs 100,000 cases (~6 s in all in the dev profile on
//! two cores). For a longer run, set the cases per property (random and mutated frames go at ~60,000
//! cases a second, deep nesting at ~20,000; `--release` gains little, as the dev profile already
//! optimises dependencies):
//!
//! ```text
//! LORAD_FUZZ_CASES=10000000 cargo test -p lorad-schema --test fuzz -- --nocapture
//! ```
//!
//! A failure prints the smallest input proptest found; `PROPTEST_RNG_SEED=<n>` fixes the seed.
//! Inputs worth keeping go in `tests/corpus/` (`corpus_regressions` checks every `*.bin` there). The
//! named corpus files are written by `write_corpus`:
//!
//! ```text
//! LORAD_WRITE_CORPUS=1 cargo test -p lorad-schema --test fuzz -- --ignored write_corpus
//! ```
use lorad_schema::frame::{self, FrameError, MAX_DEPTH, MAX_FRAME};
use lorad_schema::{
    ClientFrame, ErrorCode, Event, EventBody, Handshake, JobId, JobRecord, JobSpec, JobState,
    Progress, Reply, Request, Response, ServerFrame, TrainSettings, WireError,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A thread-local counting allocator: `meter::measure` reports the largest single allocation and
/// the peak of bytes live that its closure caused on the calling thread.
mod meter {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ON: Cell<bool> = const { Cell::new(false) };
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    /// The test binary's allocator: `System`, counting while a `measure` is running on the thread.
    pub struct Counting;

    fn note(change: isize, size: usize) {
        // `try_with`: allocations while the thread's locals are torn down are not counted.
        let _ = ON.try_with(|on| {
            if on.get() {
                let live = LIVE.get() + change;
                LIVE.set(live);
                PEAK.set(PEAK.get().max(live));
                LARGEST.set(LARGEST.get().max(size));
            }
        });
    }

    // SAFETY: every call is forwarded unchanged to `System`; counting touches only
    // const-initialised thread-locals, which never allocate.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size() as isize, layout.size());
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size() as isize, layout.size());
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            note(-(layout.size() as isize), 0);
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size as isize - layout.size() as isize, new_size);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// What one `measure` saw.
    #[derive(Debug, Clone, Copy)]
    pub struct Usage {
        /// The largest single allocation or reallocation, bytes.
        pub largest: usize,
        /// The most bytes live at once, counted from the start of the closure.
        pub peak: usize,
    }

    /// Stops counting even if the closure panics (proptest catches the panic and goes on
    /// shrinking).
    struct Off;
    impl Drop for Off {
        fn drop(&mut self) {
            ON.set(false);
        }
    }

    /// Runs `f`, counting its allocations on this thread.
    pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
        LIVE.set(0);
        PEAK.set(0);
        LARGEST.set(0);
        ON.set(true);
        let off = Off;
        let r = f();
        drop(off);
        let usage = Usage {
            largest: LARGEST.get(),
            peak: PEAK.get().max(0) as usize,
        };
        (r, usage)
    }
}

#[global_allocator]
static ALLOCATOR: meter::Counting = meter::Counting;

/// Cases per property; `LORAD_FUZZ_CASES` overrides.
fn cases() -> u32 {
    std::env::var("LORAD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// The readers' growth step (`frame::CHUNK`).
const CHUNK: usize = 64 * 1024;

/// Decoding may allocate this many bytes per payload byte, plus `DECODE_SLACK`. `decode` has
/// checked that the lengths announced add up to fewer than the payload's bytes, so serde's
/// preallocation of a buffered container is at most 32 bytes (a `Content`) per byte, and a
/// `ServerFrame` is buffered twice (the untagged frame, then the tagged response inside it).
/// Strings are borrowed or copied once, and error messages quote at most 512 bytes of them.
const DECODE_FACTOR: usize = 64;
/// Fixed overhead of a decode: error messages, small boxes.
const DECODE_SLACK: usize = 4096;

/// The outcome the readers must give, computed from the bytes alone.
fn model(input: &[u8], max: usize) -> Result<&[u8], FrameError> {
    let Some(header) = input.get(..4) else {
        return Err(if input.is_empty() {
            FrameError::Closed
        } else {
            FrameError::Truncated
        });
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    input.get(4..4 + len).ok_or(FrameError::Truncated)
}

/// The most a reader may allocate at once for `input`: the announced length only as the bytes that
/// carry it arrive (never more than 9/8 of them plus a chunk), nothing for a refused header.
fn read_budget(input: &[u8], max: usize) -> usize {
    if input.len() < 4 {
        return 0;
    }
    let len = u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
    if len > max {
        return 0;
    }
    let arrived = len.min(input.len() - 4);
    len.min(arrived + arrived / 8 + CHUNK)
}

/// Hands out `data` a few bytes at a time (1 to 4099 by a fixed pattern) and, for the blocking
/// reader, an `Interrupted` error before every third read; the async one returns `Pending` instead.
struct Dribble<'a> {
    data: &'a [u8],
    calls: usize,
}

impl<'a> Dribble<'a> {
    fn new(data: &'a [u8]) -> Self {
        Dribble { data, calls: 0 }
    }

    /// The next piece, or None for a pause (interrupt or pending).
    fn next(&mut self, want: usize) -> Option<&'a [u8]> {
        self.calls += 1;
        if self.calls.is_multiple_of(3) {
            return None;
        }
        let n = [1, 3, 4099, 17, 2][self.calls % 5]
            .min(want)
            .min(self.data.len());
        let (piece, rest) = self.data.split_at(n);
        self.data = rest;
        Some(piece)
    }
}

impl Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.next(buf.len()) {
            None => Err(std::io::ErrorKind::Interrupted.into()),
            Some(piece) => {
                buf[..piece.len()].copy_from_slice(piece);
                Ok(piece.len())
            }
        }
    }
}

impl tokio::io::AsyncRead for Dribble<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match this.next(buf.remaining()) {
            None => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(piece) => {
                buf.put_slice(piece);
                Poll::Ready(Ok(()))
            }
        }
    }
}

/// A current-thread runtime for the async readers: one per property, so each case stays cheap.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

/// Two outcomes of a read are the same: equal payloads, or errors that print the same.
fn same(got: &Result<Vec<u8>, FrameError>, want: &Result<&[u8], FrameError>) -> bool {
    match (got, want) {
        (Ok(a), Ok(b)) => a.as_slice() == *b,
        (Err(a), Err(b)) => a.to_string() == b.to_string(),
        _ => false,
    }
}

/// Decodes `payload` as `T`, checking the allocations; returns the outcome for comparison.
fn decode_checked<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    let (r, usage) = meter::measure(|| frame::decode::<T>(payload));
    let budget = payload.len() * DECODE_FACTOR + DECODE_SLACK;
    assert!(
        usage.peak <= budget && usage.largest <= budget,
        "decoding {} bytes as {} used {usage:?}, budget {budget}",
        payload.len(),
        std::any::type_name::<T>()
    );
    r.map_err(|e| e.to_string())
}

/// Feeds `input` (a byte stream: header, then body) to every reader with limit `max` and decodes
/// the frame read as each message type. Panics (a failed case) on a wrong outcome or too much
/// memory.
fn check(input: &[u8], max: usize, rt: &tokio::runtime::Runtime) {
    let want = model(input, max);
    let budget = read_budget(input, max);

    let (got, usage) = meter::measure(|| frame::read_frame(&mut &input[..], max));
    assert!(same(&got, &want), "read_frame: {got:?}, want {want:?}");
    assert!(
        usage.largest <= budget && usage.peak <= budget,
        "read_frame used {usage:?}, budget {budget}"
    );
    let (got, usage) = meter::measure(|| frame::read_frame(&mut Dribble::new(input), max));
    assert!(
        same(&got, &want),
        "dribbled read_frame: {got:?}, want {want:?}"
    );
    assert!(
        usage.largest <= budget,
        "dribbled read_frame used {usage:?}, budget {budget}"
    );
    let (got, usage) =
        meter::measure(|| rt.block_on(frame::read_frame_async(&mut Dribble::new(input), max)));
    assert!(
        same(&got, &want),
        "read_frame_async: {got:?}, want {want:?}"
    );
    assert!(
        usage.largest <= budget,
        "read_frame_async used {usage:?}, budget {budget}"
    );

    let Ok(payload) = want else {
        // The composed readers fail the same way without decoding.
        let got = frame::read_msg::<Handshake, _>(&mut &input[..], max);
        assert_eq!(
            got.map_err(|e| e.to_string()),
            Err(want.unwrap_err().to_string())
        );
        return;
    };
    let client = decode_checked::<ClientFrame>(payload);
    let handshake = decode_checked::<Handshake>(payload);
    let server = decode_checked::<ServerFrame>(payload);
    let got = frame::read_msg::<Handshake, _>(&mut Dribble::new(input), max);
    assert_eq!(got.map_err(|e| e.to_string()), handshake);
    let got = rt.block_on(frame::read_msg_async::<ClientFrame, _>(
        &mut &input[..],
        max,
    ));
    assert_eq!(got.map_err(|e| e.to_string()), client);
    // A value that decodes must encode to something that decodes to it again.
    if let Ok(server) = server {
        let again = frame::encode(&server).expect("encode");
        assert_eq!(frame::decode::<ServerFrame>(&again).ok(), Some(server));
    }
}

/// Prefixes `payload` with its length.
fn framed(payload: &[u8]) -> Vec<u8> {
    frame::frame_bytes(payload).expect("small payload")
}

/// One of each request (a new variant fails to compile in `kind_is_covered` until it is added).
fn requests() -> Vec<Request> {
    let job = JobId(u64::MAX);
    let spec = JobSpec {
        name: Some("n".into()),
        template: "basic".into(),
        base_model: "/m".into(),
        dataset: "/d.jsonl".into(),
        output_dir: Some("/o".into()),
        priority: -3,
        overrides: [("lr".to_string(), "1e-4".to_string())].into(),
        dry_run: true,
        after: vec![JobId(1), JobId(u64::MAX)],
        not_before_ms: Some(u64::MAX),
        on_finish: Some("echo $LORAD_JOB_ID".into()),
    };
    vec![
        Request::Status,
        Request::Templates,
        Request::Submit(spec),
        Request::List {
            state: Some(JobState::Paused),
            all: true,
            after: Some(JobId(3)),
        },
        Request::Get { job },
        Request::Cancel { job },
        Request::Pause { job },
        Request::Resume {
            job,
            checkpoint: Some("step-5".into()),
        },
        Request::Retry { job },
        Request::SetPriority {
            job,
            priority: i32::MIN,
        },
        Request::Checkpoints { job },
        Request::Export {
            job,
            format: "peft".into(),
            out: "/x".into(),
            checkpoint: None,
        },
        Request::Metrics {
            job,
            since_step: Some(3),
        },
        Request::Logs {
            job,
            offset: 9,
            max_bytes: Some(1 << 40),
        },
        Request::Subscribe {
            job: None,
            since_seq: 0,
        },
        Request::Unsubscribe { sub: 4 },
        Request::Hold { job },
        Request::Release { job },
        Request::Delete {
            job,
            keep_record: true,
        },
        Request::Shutdown,
        Request::Backup,
    ]
}

/// Compile-time reminder: add a new request to `requests`.
#[allow(dead_code)]
fn kind_is_covered(r: &Request) {
    match r {
        Request::Status
        | Request::Templates
        | Request::Submit(_)
        | Request::List { .. }
        | Request::Get { .. }
        | Request::Cancel { .. }
        | Request::Pause { .. }
        | Request::Resume { .. }
        | Request::Retry { .. }
        | Request::SetPriority { .. }
        | Request::Checkpoints { .. }
        | Request::Export { .. }
        | Request::Metrics { .. }
        | Request::Logs { .. }
        | Request::Subscribe { .. }
        | Request::Unsubscribe { .. }
        | Request::Hold { .. }
        | Request::Release { .. }
        | Request::Delete { .. }
        | Request::Shutdown
        | Request::Backup => {}
    }
}

/// Valid payloads of every request, handshake, and a few server frames.
fn valid_payloads() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = requests()
        .into_iter()
        .enumerate()
        .map(|(i, req)| frame::encode(&ClientFrame { id: i as u64, req }).expect("encode"))
        .collect();
    let handshakes = [
        Handshake::Hello {
            protocol: 1,
            client: "loractl".into(),
        },
        Handshake::Welcome {
            protocol: 1,
            daemon_version: "0.1.0".into(),
            features: vec!["export".into(), "plugins".into()],
        },
        Handshake::Error {
            code: ErrorCode::Unsupported,
            message: "protocol 9; daemon speaks 1".into(),
        },
    ];
    out.extend(handshakes.iter().map(|h| frame::encode(h).expect("encode")));
    let record = JobRecord {
        id: JobId(2),
        name: "j".into(),
        state: JobState::Running,
        reason: None,
        owner_uid: 1000,
        priority: 0,
        template: "basic".into(),
        base_model: "/m".into(),
        dataset: "/d".into(),
        output_dir: "/o".into(),
        settings: TrainSettings::default(),
        overrides: Default::default(),
        progress: Progress::default(),
        created_at_ms: 1,
        started_at_ms: Some(2),
        finished_at_ms: None,
        adapter_dir: None,
        worker_pid: Some(77),
        resume_checkpoint: None,
        requeued: false,
        memory_estimate: None,
        first_started_at_ms: None,
        after: Vec::new(),
        not_before_ms: None,
        on_finish: None,
    };
    let server = [
        ServerFrame::Reply(Reply {
            id: 1,
            ok: Some(Response::Done),
            err: None,
        }),
        ServerFrame::Reply(Reply {
            id: 2,
            ok: Some(Response::Job(record)),
            err: None,
        }),
        ServerFrame::Reply(Reply {
            id: 3,
            ok: None,
            err: Some(WireError::new(ErrorCode::NotFound, "job 9")),
        }),
        ServerFrame::Push(lorad_schema::Push {
            sub: 1,
            event: Event {
                seq: 5,
                job: Some(JobId(2)),
                at_ms: 6,
                body: EventBody::Log {
                    offset: 0,
                    text: "step 1".into(),
                },
            },
        }),
    ];
    out.extend(server.iter().map(|s| frame::encode(s).expect("encode")));
    out
}

/// Bytes a mutation likes to write: every length-carrying marker, and 0xff (huge lengths, -1).
const MARKERS: &[u8] = &[
    0x00, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9,
    0xcf, 0xd3, 0xd4, 0xd8, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xe0, 0xff,
];

/// One edit of a payload; positions are taken modulo the payload's length.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    /// Writes a marker followed by 0xff 0xff 0xff 0xff (a length or count of 2^32 - 1).
    Huge(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let byte = prop_oneof![any::<u8>(), proptest::sample::select(MARKERS)];
    prop_oneof![
        (any::<usize>(), 0..8u8).prop_map(|(i, bit)| Edit::Flip(i, bit)),
        (any::<usize>(), byte.clone()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), byte).prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<usize>(), proptest::sample::select(MARKERS)).prop_map(|(i, b)| Edit::Huge(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(payload: &mut Vec<u8>, edit: &Edit) {
    let at = |i: usize| i % (payload.len() + 1);
    match *edit {
        Edit::Flip(i, bit) if !payload.is_empty() => {
            let i = i % payload.len();
            payload[i] ^= 1 << bit;
        }
        Edit::Set(i, b) if !payload.is_empty() => {
            let i = i % payload.len();
            payload[i] = b;
        }
        Edit::Insert(i, b) => payload.insert(at(i), b),
        Edit::Huge(i, b) => {
            let i = at(i);
            payload.splice(i..i, [b, 0xff, 0xff, 0xff, 0xff]);
        }
        Edit::Delete(i) if !payload.is_empty() => {
            payload.remove(i % payload.len());
        }
        Edit::Truncate(i) => payload.truncate(at(i)),
        _ => {}
    }
}

/// The length prefix to put before a payload: mostly its own length, sometimes a lie.
#[derive(Debug, Clone)]
enum Prefix {
    Exact,
    Longer(u32),
    Shorter(u32),
    U32Max,
    Any(u32),
}

fn prefix() -> impl Strategy<Value = Prefix> {
    prop_oneof![
        6 => Just(Prefix::Exact),
        1 => (1..100_000u32).prop_map(Prefix::Longer),
        1 => (1..64u32).prop_map(Prefix::Shorter),
        1 => Just(Prefix::U32Max),
        1 => any::<u32>().prop_map(Prefix::Any),
    ]
}

/// The limit a reader is given: usually the default, sometimes small so lengths exceed it.
fn limit() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(MAX_FRAME), 1 => Just(64usize), 1 => Just(4096usize)]
}

fn with_prefix(payload: &[u8], prefix: &Prefix) -> Vec<u8> {
    let len = payload.len() as u32;
    let announced = match *prefix {
        Prefix::Exact => len,
        Prefix::Longer(k) => len.saturating_add(k),
        Prefix::Shorter(k) => len.saturating_sub(k),
        Prefix::U32Max => u32::MAX,
        Prefix::Any(n) => n,
    };
    let mut out = announced.to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// Runs `property` for `cases()` cases on a thread with tokio's 2 MiB worker stack.
fn fuzz<S>(name: &'static str, strategy: S, property: fn(&S::Value, &tokio::runtime::Runtime))
where
    S: Strategy + Send + 'static,
    S::Value: std::fmt::Debug,
{
    let worker = std::thread::Builder::new()
        .name(name.into())
        .stack_size(2 << 20)
        .spawn(move || {
            let rt = runtime();
            let config = Config {
                cases: cases(),
                // Failures print the smallest input; nothing is written into the source tree.
                failure_persistence: None,
                ..Config::default()
            };
            let started = std::time::Instant::now();
            let mut runner = TestRunner::new(config);
            let result = runner.run(&strategy, |value| {
                property(&value, &rt);
                Ok(())
            });
            eprintln!("{name}: {} cases in {:.1?}", cases(), started.elapsed());
            result.map_err(|e| e.to_string())
        })
        .expect("spawn");
    if let Err(e) = worker
        .join()
        .expect("the fuzz thread panicked outside a case")
    {
        panic!("{name}: {e}");
    }
}

#[test]
fn random_bytes() {
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..300),
        any::<bool>(),
        prefix(),
        limit(),
    );
    fuzz(
        "random_bytes",
        strategy,
        |(bytes, as_payload, prefix, max), rt| {
            if *as_payload {
                check(&with_prefix(bytes, prefix), *max, rt);
            } else {
                // A raw stream: the header is random too.
                check(bytes, *max, rt);
            }
        },
    );
}

#[test]
fn mutated_frames() {
    let seeds = valid_payloads();
    let strategy = (
        proptest::sample::select(seeds),
        proptest::collection::vec(edit(), 0..6),
        prefix(),
        limit(),
    );
    fuzz(
        "mutated_frames",
        strategy,
        |(seed, edits, prefix, max), rt| {
            let mut payload = seed.clone();
            for e in edits {
                apply(&mut payload, e);
            }
            check(&with_prefix(&payload, prefix), *max, rt);
        },
    );
}

/// A container opening per level: [one element], {"k": ...}, array16 of one, or (lying) array32 and
/// map32 of 2^32 - 1.
const OPENERS: &[&[u8]] = &[
    &[0x91],
    &[0x81, 0xa1, b'k'],
    &[0xdc, 0x00, 0x01],
    &[0xdd, 0xff, 0xff, 0xff, 0xff],
    &[0xdf, 0xff, 0xff, 0xff, 0xff, 0xa0],
];

/// `depth` levels of containers, cycling through `pattern` (indices into `OPENERS`), around nil.
fn nest(depth: usize, pattern: &[usize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(depth * 2 + 1);
    for level in 0..depth {
        out.extend_from_slice(OPENERS[pattern[level % pattern.len()]]);
    }
    out.push(0xc0);
    out
}

fn str8(out: &mut Vec<u8>, s: &str) {
    out.push(0xa0 | s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// `value` placed where each message type buffers it: an unknown field of a request, of a hello, of
/// a reply's response, or as the whole payload.
fn wrap(value: &[u8], place: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 32);
    match place % 4 {
        0 => {
            out.push(0x82);
            str8(&mut out, "id");
            out.push(1);
            str8(&mut out, "req");
            out.push(0x82);
            str8(&mut out, "x");
            out.extend_from_slice(value);
            str8(&mut out, "type");
            str8(&mut out, "status");
        }
        1 => {
            out.push(0x83);
            str8(&mut out, "x");
            out.extend_from_slice(value);
            str8(&mut out, "type");
            str8(&mut out, "hello");
            str8(&mut out, "protocol");
            out.push(1);
        }
        2 => {
            out.push(0x82);
            str8(&mut out, "id");
            out.push(1);
            str8(&mut out, "ok");
            out.push(0x82);
            str8(&mut out, "x");
            out.extend_from_slice(value);
            str8(&mut out, "type");
            str8(&mut out, "done");
        }
        _ => out.extend_from_slice(value),
    }
    out
}

#[test]
fn deep_nesting() {
    // Mostly around the limit, where decoding recurses deepest; rarely huge (the bytes cost time).
    let depth = prop_oneof![
        40 => 0..(MAX_DEPTH + 8),
        5 => 0..2_000usize,
        1 => Just(100_000usize),
    ];
    let strategy = (
        depth,
        proptest::collection::vec(0..OPENERS.len(), 1..4),
        any::<u8>(),
        prefix(),
    );
    fuzz(
        "deep_nesting",
        strategy,
        |(depth, pattern, place, prefix), rt| {
            let payload = wrap(&nest(*depth, pattern), *place);
            check(&with_prefix(&payload, prefix), MAX_FRAME, rt);
        },
    );
}

/// Runs `f` on a thread with tokio's default worker stack; a stack overflow aborts the test binary.
fn on_worker_stack<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("no panic")
}

#[test]
fn nesting_at_the_limit_fits_a_worker_stack_and_deeper_is_refused() {
    on_worker_stack(|| {
        for pattern in [&[0][..], &[1], &[0, 1]] {
            for place in 0..4u8 {
                // The deepest value accepted: MAX_DEPTH levels in all, the message's own included.
                let own = [2, 1, 2, 0][usize::from(place)];
                let at_limit = wrap(&nest(MAX_DEPTH - own, pattern), place);
                let deeper = wrap(&nest(MAX_DEPTH - own + 1, pattern), place);
                let huge = wrap(&nest(100_000, pattern), place);
                let _ = frame::decode::<ClientFrame>(&at_limit);
                let _ = frame::decode::<Handshake>(&at_limit);
                let _ = frame::decode::<ServerFrame>(&at_limit);
                for payload in [&deeper, &huge] {
                    for err in [
                        frame::decode::<ClientFrame>(payload).map(drop),
                        frame::decode::<Handshake>(payload).map(drop),
                        frame::decode::<ServerFrame>(payload).map(drop),
                    ] {
                        let err = err.expect_err("too deep").to_string();
                        assert!(err.contains("nested deeper than"), "{err}");
                    }
                }
            }
        }
        // An unknown field nested to the limit is still ignored.
        let ok = wrap(&nest(MAX_DEPTH - 2, &[0, 1]), 0);
        assert!(matches!(
            frame::decode::<ClientFrame>(&ok),
            Ok(ClientFrame {
                req: Request::Status,
                ..
            })
        ));
    });
}

#[test]
fn every_valid_payload_round_trips_through_the_readers() {
    let rt = runtime();
    for payload in valid_payloads() {
        check(&framed(&payload), MAX_FRAME, &rt);
    }
}

/// A frame announcing 16 MiB that brings 8 costs about 8, whatever the reader.
#[test]
fn a_lying_length_costs_only_what_arrived() {
    let rt = runtime();
    let body = vec![0x90u8; 8 << 20];
    let mut input = (16u32 << 20).to_be_bytes().to_vec();
    input.extend_from_slice(&body);
    let (got, usage) = meter::measure(|| frame::read_frame(&mut &input[..], MAX_FRAME));
    assert!(matches!(got, Err(FrameError::Truncated)));
    assert!(usage.largest <= (9 << 20) + CHUNK, "{usage:?}");
    let (got, usage) =
        meter::measure(|| rt.block_on(frame::read_frame_async(&mut &input[..], MAX_FRAME)));
    assert!(matches!(got, Err(FrameError::Truncated)));
    assert!(usage.largest <= (9 << 20) + CHUNK, "{usage:?}");
    // The header alone costs nothing.
    let (got, usage) = meter::measure(|| frame::read_frame(&mut &input[..4], MAX_FRAME));
    assert!(matches!(got, Err(FrameError::Truncated)));
    assert!(usage.largest <= CHUNK, "{usage:?}");
}

// ---- The corpus ----

/// The directory of nasty frames kept as a regression test.
fn corpus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// What a corpus frame must decode to: Ok or an error, as ClientFrame, Handshake, ServerFrame (the
/// frame read with `MAX_FRAME`; `None` when reading it fails). A reply needs only an `id`, so every
/// well-formed map with an unsigned `id` decodes as a `ServerFrame`.
type Expect = Option<[bool; 3]>;

/// The named corpus: file name, bytes as sent (header included), expected decoding.
fn corpus() -> Vec<(&'static str, Vec<u8>, Expect)> {
    let hello = frame::encode(&Handshake::Hello {
        protocol: 1,
        client: "c".into(),
    })
    .expect("encode");
    let status = frame::encode(&ClientFrame {
        id: 1,
        req: Request::Status,
    })
    .expect("encode");
    let raw = |bytes: &[u8]| bytes.to_vec();
    // A map with the given entries, keys and values already encoded.
    let map = |entries: &[(&str, &[u8])]| {
        let mut out = vec![0x80 | entries.len() as u8];
        for (k, v) in entries {
            str8(&mut out, k);
            out.extend_from_slice(v);
        }
        out
    };
    let request = |req: &[u8]| framed(&map(&[("id", &[1]), ("req", req)]));
    let type_status = map(&[("type", &[0xa6, b's', b't', b'a', b't', b'u', b's'])]);
    let mut lying_nest = Vec::new();
    for _ in 0..(MAX_DEPTH - 3) {
        lying_nest.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
    }
    vec![
        ("empty-stream.bin", raw(&[]), None),
        ("header-only.bin", raw(&[0, 0, 0, 16]), None),
        ("half-header.bin", raw(&[0, 0]), None),
        (
            "u32-max-length.bin",
            raw(&[0xff, 0xff, 0xff, 0xff, 0x80]),
            None,
        ),
        ("over-max-length.bin", raw(&[0x01, 0x00, 0x00, 0x01]), None),
        ("zero-length.bin", raw(&[0, 0, 0, 0]), Some([false; 3])),
        (
            "length-longer-than-data.bin",
            with_prefix(&hello, &Prefix::Longer(1000)),
            None,
        ),
        (
            "length-16mib-brings-hello.bin",
            with_prefix(&hello, &Prefix::Any(MAX_FRAME as u32)),
            None,
        ),
        (
            "length-shorter-than-data.bin",
            with_prefix(&status, &Prefix::Shorter(3)),
            Some([false; 3]),
        ),
        (
            "two-frames.bin",
            [framed(&hello), framed(&status)].concat(),
            Some([false, true, false]),
        ),
        (
            "valid-status.bin",
            framed(&status),
            Some([true, false, true]),
        ),
        (
            "deep-arrays-100k.bin",
            framed(&wrap(&nest(100_000, &[0]), 0)),
            Some([false; 3]),
        ),
        (
            "deep-maps-at-limit.bin",
            framed(&wrap(&nest(MAX_DEPTH - 2, &[1]), 0)),
            Some([true, false, true]),
        ),
        (
            "deep-maps-over-limit.bin",
            framed(&wrap(&nest(MAX_DEPTH - 1, &[1]), 0)),
            Some([false; 3]),
        ),
        (
            "lying-array32-nest.bin",
            framed(&wrap(&lying_nest, 0)),
            Some([false; 3]),
        ),
        (
            "map32-2pow32-entries.bin",
            framed(&[0xdf, 0xff, 0xff, 0xff, 0xff, 0xa2, b'i', b'd', 1]),
            Some([false; 3]),
        ),
        (
            "str32-no-bytes.bin",
            request(&map(&[("type", &[0xdb, 0xff, 0xff, 0xff, 0xff])])),
            Some([false; 3]),
        ),
        (
            "bin32-no-bytes-as-name.bin",
            framed(&map(&[
                ("type", &[0xa5, b'h', b'e', b'l', b'l', b'o']),
                ("protocol", &[1]),
                ("client", &[0xc6, 0x7f, 0xff, 0xff, 0xff]),
            ])),
            Some([false; 3]),
        ),
        (
            "invalid-utf8-client-name.bin",
            framed(&map(&[
                ("type", &[0xa5, b'h', b'e', b'l', b'l', b'o']),
                ("protocol", &[1]),
                ("client", &[0xa2, 0xc3, 0x28]),
            ])),
            Some([false; 3]),
        ),
        (
            "negative-id.bin",
            framed(&map(&[("id", &[0xff]), ("req", &type_status)])),
            Some([false; 3]),
        ),
        (
            "u64-overflow-protocol.bin",
            framed(&map(&[
                ("type", &[0xa5, b'h', b'e', b'l', b'l', b'o']),
                (
                    "protocol",
                    &[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                ),
                ("client", &[0xa1, b'c']),
            ])),
            Some([false; 3]),
        ),
        (
            "unknown-request.bin",
            request(&map(&[(
                "type",
                &[
                    0xaf, b'l', b'a', b'u', b'n', b'c', b'h', b'_', b'm', b'i', b's', b's', b'i',
                    b'l', b'e', b's',
                ],
            )])),
            Some([false, false, true]),
        ),
        ("reserved-marker.bin", framed(&[0xc1]), Some([false; 3])),
        (
            "ext32-huge.bin",
            request(&map(&[("type", &[0xc9, 0xff, 0xff, 0xff, 0xff, 0x01])])),
            Some([false; 3]),
        ),
        (
            "float-as-job-id.bin",
            request(&map(&[
                ("type", &[0xa3, b'g', b'e', b't']),
                ("job", &[0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0]),
            ])),
            Some([false, false, true]),
        ),
    ]
}

/// Writes the named corpus. Ignored: run it (with `LORAD_WRITE_CORPUS=1`) after changing `corpus`.
#[test]
#[ignore]
fn write_corpus() {
    if std::env::var_os("LORAD_WRITE_CORPUS").is_none() {
        eprintln!(
            "set LORAD_WRITE_CORPUS=1 to rewrite {}",
            corpus_dir().display()
        );
        return;
    }
    std::fs::create_dir_all(corpus_dir()).expect("mkdir");
    for (name, bytes, _) in corpus() {
        std::fs::write(corpus_dir().join(name), bytes).expect("write");
    }
}

/// Every `*.bin` in the corpus goes through every reader and decoder (no panic, bounded memory,
/// readers agreeing with the model); the named ones must also decode as expected.
#[test]
fn corpus_regressions() {
    let named = corpus();
    let mut seen = 0;
    let mut wrong = Vec::new();
    for entry in std::fs::read_dir(corpus_dir()).expect("tests/corpus") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "bin") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // Run on a worker-sized stack, with a small limit too.
        let input = bytes.clone();
        on_worker_stack(move || {
            let rt = runtime();
            check(&input, MAX_FRAME, &rt);
            check(&input, 64, &rt);
        });
        let Some((_, _, expect)) = named.iter().find(|(n, _, _)| *n == name) else {
            continue;
        };
        seen += 1;
        let read = frame::read_frame(&mut bytes.as_slice(), MAX_FRAME);
        let got = read.ok().map(|payload| {
            [
                frame::decode::<ClientFrame>(&payload).is_ok(),
                frame::decode::<Handshake>(&payload).is_ok(),
                frame::decode::<ServerFrame>(&payload).is_ok(),
            ]
        });
        if &got != expect {
            wrong.push(format!("{name}: {got:?}, want {expect:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "decoded as [client, handshake, server]: {wrong:#?}"
    );
    assert_eq!(
        seen,
        named.len(),
        "a named corpus file is missing; run write_corpus"
    );
}
