//! The routing table shared by the callers and the connection's two background tasks.
//!
//! The reader task decodes every frame from the daemon and hands a reply to the caller waiting on its
//! id, and a push to the channel of its subscription. The writer task is the only one that writes to
//! the socket, so a caller that is cancelled mid-call can never leave half a frame behind.
use crate::error::ClientError;
use lorad_schema::frame::{self, FrameError};
use lorad_schema::{ClientFrame, Event, Push, Reply, Request, Response, ServerFrame, MAX_FRAME};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// The receiving end of one subscription's events.
pub(crate) type EventRx = mpsc::UnboundedReceiver<Event>;

/// What a caller gets back: the response and, for `subscribed`, the subscription's event channel.
pub(crate) type Routed = Result<(Response, Option<EventRx>), ClientError>;

/// A caller waiting for the reply to its request.
struct Waiter {
    tx: oneshot::Sender<Routed>,
    /// The request was `subscribe`: pushes for a not-yet-known subscription may belong to it.
    subscribe: bool,
}

#[derive(Default)]
struct Table {
    /// Set once the connection is gone; nothing new is registered after that.
    closed: bool,
    pending: HashMap<u64, Waiter>,
    subs: HashMap<u64, mpsc::UnboundedSender<Event>>,
    /// Pushes that arrived before the `subscribed` reply that names their subscription. The daemon
    /// starts replaying as soon as it has made the subscription, so replayed events can overtake the
    /// reply on the wire.
    early: HashMap<u64, Vec<Event>>,
    /// Subscriptions this client has given up: late pushes for them are dropped.
    dead: HashSet<u64>,
}

/// State shared by the [`crate::Client`] handles, subscriptions and the background tasks.
pub(crate) struct Shared {
    next_id: AtomicU64,
    out: mpsc::UnboundedSender<Vec<u8>>,
    table: Mutex<Table>,
}

impl Shared {
    /// A table whose frames go to the writer task through `out`.
    pub(crate) fn new(out: mpsc::UnboundedSender<Vec<u8>>) -> Self {
        Shared {
            next_id: AtomicU64::new(1),
            out,
            table: Mutex::new(Table::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // No code panics while holding the lock, and the table stays consistent between statements.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `req` and waits for its reply.
    pub(crate) async fn request(&self, req: Request) -> Routed {
        let subscribe = matches!(req, Request::Subscribe { .. });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode_frame(&ClientFrame { id, req })?;
        let (tx, rx) = oneshot::channel();
        {
            let mut t = self.lock();
            if t.closed {
                return Err(ClientError::Closed);
            }
            t.pending.insert(id, Waiter { tx, subscribe });
        }
        if self.out.send(bytes).is_err() {
            self.lock().pending.remove(&id);
            return Err(ClientError::Closed);
        }
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    /// Forgets subscription `sub` locally and tells the daemon without waiting for its answer.
    pub(crate) fn drop_sub(&self, sub: u64) {
        {
            let mut t = self.lock();
            t.subs.remove(&sub);
            t.early.remove(&sub);
            t.dead.insert(sub);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Its reply finds no waiter and is ignored.
        if let Ok(bytes) = encode_frame(&ClientFrame {
            id,
            req: Request::Unsubscribe { sub },
        }) {
            let _ = self.out.send(bytes);
        }
    }

    /// Marks subscription `sub` as ended here (after an explicit `unsubscribe`).
    pub(crate) fn forget_sub(&self, sub: u64) {
        let mut t = self.lock();
        t.subs.remove(&sub);
        t.early.remove(&sub);
        t.dead.insert(sub);
    }

    /// Fails every waiting call with [`ClientError::Closed`] and ends every subscription.
    pub(crate) fn close(&self) {
        let (pending, subs) = {
            let mut t = self.lock();
            t.closed = true;
            t.early.clear();
            (std::mem::take(&mut t.pending), std::mem::take(&mut t.subs))
        };
        for (_, w) in pending {
            let _ = w.tx.send(Err(ClientError::Closed));
        }
        drop(subs);
    }

    fn route_reply(&self, reply: Reply) {
        let mut t = self.lock();
        let Some(waiter) = t.pending.remove(&reply.id) else {
            if let Some(err) = reply.err {
                tracing::warn!(id = reply.id, %err, "lorad sent an error for no pending request");
            }
            return;
        };
        let result = match (reply.ok, reply.err) {
            (_, Some(err)) => Err(ClientError::Server(err)),
            (Some(Response::Subscribed { sub, last_seq }), None) => {
                let (tx, rx) = mpsc::unbounded_channel();
                for event in t.early.remove(&sub).unwrap_or_default() {
                    let _ = tx.send(event);
                }
                t.subs.insert(sub, tx);
                Ok((Response::Subscribed { sub, last_seq }, Some(rx)))
            }
            (Some(ok), None) => Ok((ok, None)),
            (None, None) => Err(ClientError::Unexpected {
                expected: "ok or err",
                got: "an empty reply".into(),
            }),
        };
        drop(t);
        if let Err(Ok((Response::Subscribed { sub, .. }, _))) = waiter.tx.send(result) {
            // The caller gave up before the answer came: nobody will read this subscription.
            self.drop_sub(sub);
        }
    }

    fn route_push(&self, push: Push) {
        let mut t = self.lock();
        if let Some(tx) = t.subs.get(&push.sub) {
            if tx.send(push.event).is_err() {
                drop(t);
                self.drop_sub(push.sub);
            }
        } else if t.dead.contains(&push.sub) {
            // A straggler sent before the daemon saw our unsubscribe.
        } else if t.pending.values().any(|w| w.subscribe) {
            t.early.entry(push.sub).or_default().push(push.event);
        } else {
            tracing::debug!(sub = push.sub, "push for an unknown subscription dropped");
        }
    }

    /// A frame that is not a valid [`ServerFrame`] (e.g. a response or event type from a newer
    /// daemon): fail the call it answers, if it names one; skip it otherwise.
    fn route_undecodable(&self, bytes: &[u8], err: FrameError) {
        #[derive(serde::Deserialize)]
        struct Probe {
            #[serde(default)]
            id: Option<u64>,
            #[serde(default)]
            sub: Option<u64>,
        }
        match frame::decode::<Probe>(bytes) {
            Ok(Probe { id: Some(id), .. }) => {
                let waiter = self.lock().pending.remove(&id);
                if let Some(w) = waiter {
                    let _ = w.tx.send(Err(ClientError::Frame(err)));
                }
            }
            Ok(Probe { sub: Some(sub), .. }) => {
                tracing::warn!(sub, error = %err, "skipping an event this client cannot decode");
            }
            _ => tracing::warn!(error = %err, "skipping an undecodable frame from lorad"),
        }
    }
}

/// Encodes a request frame, refusing one the daemon would reject as too large.
fn encode_frame(msg: &ClientFrame) -> Result<Vec<u8>, ClientError> {
    let payload = frame::encode(msg)?;
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: MAX_FRAME,
        }
        .into());
    }
    Ok(frame::frame_bytes(&payload)?)
}

/// Reads frames until the connection ends, routing each; then closes the table.
pub(crate) async fn read_loop<R: AsyncRead + Unpin>(shared: std::sync::Arc<Shared>, mut rd: R) {
    let why = loop {
        let bytes = match frame::read_frame_async(&mut rd, MAX_FRAME).await {
            Ok(bytes) => bytes,
            Err(e) => break e,
        };
        match frame::decode::<ServerFrame>(&bytes) {
            Ok(ServerFrame::Reply(reply)) => shared.route_reply(reply),
            Ok(ServerFrame::Push(push)) => shared.route_push(push),
            Err(e) => shared.route_undecodable(&bytes, e),
        }
    };
    tracing::debug!(reason = %why, "connection to lorad ended");
    shared.close();
}

/// Writes queued frames in order until the connection breaks or every sender is gone.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    shared: std::sync::Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    mut wr: W,
) {
    while let Some(bytes) = rx.recv().await {
        let written = async {
            wr.write_all(&bytes).await?;
            wr.flush().await
        };
        if let Err(e) = written.await {
            tracing::debug!(error = %e, "cannot write to lorad");
            shared.close();
            return;
        }
    }
}
