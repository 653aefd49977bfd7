//! The worker threads: batches built ahead, at most `prefetch` in flight, handed over in plan order.
//!
//! One mutex guards the planner, the sequence counters and the reorder buffer; workers hold it only to
//! take a plan or to file a result, never while building. A worker takes the next plan when fewer than
//! `prefetch` batches are planned and not yet consumed, so memory stays bounded however fast the
//! workers are; the consumer waits for exactly the next sequence number. A `seek` bumps a generation
//! so that results still being built for the old position are dropped when they arrive.
use super::collate::HostBatch;
use super::encode::{Encoder, Tokenized};
use super::format::FileFormat;
use super::loader::{encode_at, Core, Planner};
use super::source::DataSource;
use crate::error::EngineError;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

struct State {
    planner: Planner,
    /// Bumped by `seek`; results of an older generation are discarded.
    generation: u64,
    /// Sequence number of the next plan handed to a worker.
    next_seq: u64,
    /// Sequence number the consumer takes next.
    want: u64,
    ready: BTreeMap<u64, Result<HostBatch, EngineError>>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Workers wait here for room in the prefetch window (or shutdown).
    room: Condvar,
    /// The consumer waits here for its batch.
    filed: Condvar,
    prefetch: u64,
}

impl Shared {
    /// A worker that panicked holds no invariant of `State` half-updated (the lock is never held while
    /// building), so a poisoned lock is still consistent.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Running worker threads; stopped and joined on drop.
pub(super) struct Pipeline {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

impl Pipeline {
    pub(super) fn start(
        core: Arc<Core>,
        planner: Planner,
        workers: usize,
        prefetch: usize,
    ) -> Result<Self, EngineError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                planner,
                generation: 0,
                next_seq: 0,
                want: 0,
                ready: BTreeMap::new(),
                shutdown: false,
            }),
            room: Condvar::new(),
            filed: Condvar::new(),
            prefetch: prefetch.max(1) as u64,
        });
        let mut pipeline = Pipeline {
            shared,
            handles: Vec::with_capacity(workers),
        };
        for i in 0..workers {
            let (core, shared) = (Arc::clone(&core), Arc::clone(&pipeline.shared));
            let handle = std::thread::Builder::new()
                .name(format!("lorad-data-{i}"))
                .spawn(move || work(&core, &shared))
                .map_err(|e| EngineError::Pipeline(format!("cannot start data worker: {e}")))?;
            pipeline.handles.push(handle);
        }
        Ok(pipeline)
    }

    /// The next batch in plan order, waiting for it if needed.
    pub(super) fn next(&self) -> Result<HostBatch, EngineError> {
        let mut st = self.shared.lock();
        loop {
            let want = st.want;
            if let Some(result) = st.ready.remove(&want) {
                st.want += 1;
                self.shared.room.notify_all();
                return result;
            }
            st = self
                .shared
                .filed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Restarts planning from `planner`; everything in flight is dropped.
    pub(super) fn seek(&self, planner: Planner) {
        let mut st = self.shared.lock();
        st.planner = planner;
        st.generation += 1;
        st.ready.clear();
        st.next_seq = st.want;
        self.shared.room.notify_all();
    }

    /// Planned and not yet consumed.
    #[cfg(test)]
    pub(super) fn in_flight(&self) -> usize {
        let st = self.shared.lock();
        (st.next_seq - st.want) as usize
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.room.notify_all();
        for h in self.handles.drain(..) {
            // A worker's panic was already turned into an error result; nothing left to report.
            let _ = h.join();
        }
    }
}

fn work(core: &Core, shared: &Shared) {
    loop {
        let (seq, generation, plan) = {
            let mut st = shared.lock();
            while !st.shutdown && st.next_seq >= st.want + shared.prefetch {
                st = shared.room.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            if st.shutdown {
                return;
            }
            let plan = st.planner.next(core);
            st.next_seq += 1;
            (st.next_seq - 1, st.generation, plan)
        };
        // A panic (a tokenizer bug on some input) must not leave the consumer waiting forever for
        // this sequence number: it becomes this batch's error.
        let built = catch_unwind(AssertUnwindSafe(|| core.build(&plan)))
            .unwrap_or_else(|p| Err(EngineError::Pipeline(panic_message(p.as_ref()))));
        let mut st = shared.lock();
        if st.generation == generation {
            st.ready.insert(seq, built);
            shared.filed.notify_all();
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("a data worker panicked: {msg}")
}

/// Examples tokenized per unit of work in `encode_all`.
const CHUNK: usize = 256;

/// Every record of `source`, tokenized in file order by `threads` threads (for packing, which needs
/// all lengths up front). Chunks are claimed in increasing order, so the first error in file order is
/// the one reported, whatever the thread count.
pub(super) fn encode_all(
    source: &Arc<dyn DataSource>,
    encoder: &Encoder,
    format: FileFormat,
    threads: usize,
) -> Result<Vec<Tokenized>, EngineError> {
    let n = source.len();
    let chunks = n.div_ceil(CHUNK);
    let claimed = AtomicUsize::new(0);
    let encode_chunk = |c: usize| -> Result<Vec<Tokenized>, EngineError> {
        (c * CHUNK..((c + 1) * CHUNK).min(n))
            .map(|i| encode_at(source.as_ref(), encoder, format, i).map(|(_, t)| t))
            .collect()
    };
    let run = || {
        let mut done = Vec::new();
        loop {
            let c = claimed.fetch_add(1, Ordering::Relaxed);
            if c >= chunks {
                return done;
            }
            let result = catch_unwind(AssertUnwindSafe(|| encode_chunk(c)))
                .unwrap_or_else(|p| Err(EngineError::Pipeline(panic_message(p.as_ref()))));
            let failed = result.is_err();
            done.push((c, result));
            if failed {
                return done;
            }
        }
    };
    let mut parts: Vec<Option<Result<Vec<Tokenized>, EngineError>>> =
        (0..chunks).map(|_| None).collect();
    std::thread::scope(|scope| -> Result<(), EngineError> {
        let mut handles = Vec::new();
        for i in 0..threads.clamp(1, chunks.max(1)) {
            let handle = std::thread::Builder::new()
                .name(format!("lorad-pack-{i}"))
                .spawn_scoped(scope, run)
                .map_err(|e| EngineError::Pipeline(format!("cannot start data worker: {e}")))?;
            handles.push(handle);
        }
        for h in handles {
            let done = h
                .join()
                .map_err(|p| EngineError::Pipeline(panic_message(p.as_ref())))?;
            for (c, result) in done {
                parts[c] = Some(result);
            }
        }
        Ok(())
    })?;
    let mut out = Vec::with_capacity(n);
    for part in parts {
        match part {
            Some(Ok(rows)) => out.extend(rows),
            Some(Err(e)) => return Err(e),
            // Unclaimed chunks only follow a failed one, which was returned above.
            None => break,
        }
    }
    Ok(out)
}
