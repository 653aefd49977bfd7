//! Subscriptions: replay what the client missed from the journal, then stream live events.
use super::super::session::Conn;
use crate::core::Core;
use lorad_schema::{frame, ErrorCode, Event, JobId, Push, Response, ServerFrame, WireError};
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

/// Events read from the journal per batch while catching up.
const REPLAY_BATCH: usize = 512;

pub async fn subscribe(
    core: &Arc<Core>,
    conn: &mut Conn,
    job: Option<JobId>,
    since_seq: u64,
) -> Result<Response, WireError> {
    if let Some(id) = job {
        super::job_for(core, conn.peer, id).await?;
    } else if !conn.peer.is_admin() {
        return Err(WireError::new(
            ErrorCode::PermissionDenied,
            "only an admin may subscribe to every job; name a job",
        ));
    }
    // Listen before reading the journal, so no event falls between the replay and the live stream.
    let live = core.live_events();
    let last_seq = core
        .read(|j| j.last_seq())
        .await
        .map_err(super::journal_error)?;
    let sub = core.next_sub_id();
    let forward = Forwarder {
        sub,
        job,
        out: conn.out.clone(),
        last: since_seq,
    };
    let handle = tokio::spawn(forward.run(core.clone(), live));
    conn.subs.insert(sub, handle.abort_handle());
    Ok(Response::Subscribed { sub, last_seq })
}

pub fn unsubscribe(conn: &mut Conn, sub: u64) -> Result<Response, WireError> {
    match conn.subs.remove(&sub) {
        Some(handle) => {
            handle.abort();
            Ok(Response::Done)
        }
        None => Err(WireError::new(
            ErrorCode::NotFound,
            format!("no subscription {sub} on this connection"),
        )),
    }
}

struct Forwarder {
    sub: u64,
    job: Option<JobId>,
    out: mpsc::Sender<Vec<u8>>,
    /// The newest seq sent; every event after it is sent exactly once, in order.
    last: u64,
}

impl Forwarder {
    async fn run(mut self, core: Arc<Core>, mut live: tokio::sync::broadcast::Receiver<Event>) {
        if self.catch_up(&core).await.is_err() {
            return;
        }
        loop {
            match live.recv().await {
                Ok(event) => {
                    if event.seq <= self.last || (self.job.is_some() && event.job != self.job) {
                        continue;
                    }
                    // Events are published in seq order (Core::write), so only a lag can open a gap.
                    if self.send(event).await.is_err() {
                        return;
                    }
                }
                // Fell behind the live buffer: the journal has everything.
                Err(RecvError::Lagged(_)) => {
                    if self.catch_up(&core).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// Sends every journal event after `last` (for this job).
    async fn catch_up(&mut self, core: &Core) -> Result<(), ()> {
        loop {
            let (since, job) = (self.last, self.job);
            let batch = core
                .read(move |j| j.events_since(since, job, REPLAY_BATCH))
                .await
                .map_err(|_| ())?;
            let done = batch.len() < REPLAY_BATCH;
            for event in batch {
                self.send(event).await?;
            }
            if done {
                return Ok(());
            }
        }
    }

    async fn send(&mut self, event: Event) -> Result<(), ()> {
        let seq = event.seq;
        let push = ServerFrame::Push(Push {
            sub: self.sub,
            event,
        });
        let bytes = frame::encode(&push)
            .and_then(|b| frame::frame_bytes(&b))
            .map_err(|_| ())?;
        self.out.send(bytes).await.map_err(|_| ())?;
        self.last = seq;
        Ok(())
    }
}
