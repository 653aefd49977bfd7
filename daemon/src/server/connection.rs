//! One client connection: admission, then the read-and-dispatch loop. The handshake and the writer
//! task are in their own modules; the connection's state is `session::Conn`.
use super::handlers::{self, Dispatched};
use super::handshake::handshake;
use super::session::{Admission, Conn, FrameBudget, Grant, Peer, Slot};
use super::writer;
use crate::core::Core;
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::StreamCommon as _;
use lorad_schema::frame::{self, FrameError};
use lorad_schema::{ClientFrame, ErrorCode, Handshake, Request, WireError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Who is on the other end of `stream`, and its place among the open connections; `None` (after telling
/// the client why) when the caps are reached or the peer has no credentials.
pub async fn admit(
    core: &Arc<Core>,
    admission: &Arc<Admission>,
    stream: &Stream,
) -> Option<(Peer, Slot)> {
    let (uid, pid) = match stream.peer_creds() {
        Ok(creds) => (
            creds.euid().unwrap_or(u32::MAX),
            creds.pid().unwrap_or(0) as u32,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "no peer credentials; dropping connection");
            return None;
        }
    };
    let peer = match core.config.admin_group.clone() {
        Some(group) => tokio::task::spawn_blocking(move || Peer::resolve(uid, pid, Some(&group)))
            .await
            .unwrap_or_else(|_| Peer::new(uid, pid)),
        None => Peer::new(uid, pid),
    };
    let daemon_uid = nix::unistd::geteuid().as_raw();
    let served = super::session::may_serve(core.config.system, daemon_uid, uid)
        .map_err(|why| (ErrorCode::PermissionDenied, why));
    let slot = served.and_then(|()| {
        admission
            .enter(&peer, &core.config)
            .map_err(|r| (ErrorCode::Busy, r.to_string()))
    });
    let slot = match slot {
        Ok(slot) => slot,
        Err((code, refusal)) => {
            tracing::debug!(uid, %refusal, "connection refused");
            let msg = Handshake::Error {
                code,
                message: refusal,
            };
            let mut wr = stream;
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                frame::write_msg_async(&mut wr, &msg),
            )
            .await;
            return None;
        }
    };
    Some((peer, slot))
}

/// Serves one connection until the client leaves, breaks the protocol, or the daemon shuts down:
/// the handshake, then requests answered in order (a long-running one, such as export, on its own
/// task), with subscription pushes interleaved by the writer task.
/// `budget` holds the bytes of large frames being received, shared by every connection.
pub async fn handle(core: Arc<Core>, stream: Stream, peer: Peer, budget: Arc<FrameBudget>) {
    if handshake(&stream, &peer).await.is_none() {
        return;
    }
    // `&Stream` reads and writes: this task reads, the writer task writes.
    let stream = Arc::new(stream);
    let (out, writer) = writer::spawn(stream.clone());
    let mut conn = Conn {
        peer,
        out,
        subs: HashMap::new(),
    };
    let mut rd = &*stream;
    loop {
        let read = tokio::select! {
            r = read_frame(&mut rd, &core, &budget, &peer) => r,
            _ = core.shutdown.cancelled() => break,
        };
        let (id, request) = match next_request(read) {
            Next::Request(id, request) => (id, request),
            Next::Answer(id, error) => {
                writer::reply(&conn.out, id, Err(error)).await;
                continue;
            }
            Next::Close(last) => {
                if let Some(error) = last {
                    tracing::debug!(uid = peer.uid, error = %error.message, "closing connection");
                    writer::reply(&conn.out, 0, Err(error)).await;
                }
                break;
            }
        };
        match handlers::dispatch(&core, &mut conn, request).await {
            Dispatched::Now(result) => writer::reply(&conn.out, id, result).await,
            Dispatched::Later(work) => {
                // Replies carry their request's id, so this one may come after later requests'.
                let out = conn.out.clone();
                tokio::spawn(async move { writer::reply(&out, id, work.await).await });
            }
        }
    }
    for (_, sub) in conn.subs.drain() {
        sub.abort();
    }
    drop(conn);
    let _ = writer.await;
}

/// What one read frame means for the connection.
enum Next {
    /// A request to answer.
    Request(u64, Request),
    /// A frame with a readable id but a bad request: answered, and the connection stays (forward
    /// compatibility: an unknown request type is `invalid_argument`, not a closed connection).
    Answer(u64, WireError),
    /// The end: the client left, or broke the protocol (answered with this error, id 0, first).
    Close(Option<WireError>),
}

/// Decodes what [`read_frame`] got into the next step.
fn next_request(read: Result<(Vec<u8>, Grant), ReadError>) -> Next {
    let bytes = match read {
        Ok((bytes, _grant)) => bytes,
        Err(ReadError::Frame(FrameError::Closed)) => return Next::Close(None),
        Err(ReadError::Busy(message)) => {
            return Next::Close(Some(WireError::new(ErrorCode::Busy, message)))
        }
        Err(ReadError::Frame(e @ FrameError::TooLarge { .. })) => {
            return Next::Close(Some(WireError::new(ErrorCode::TooLarge, e.to_string())))
        }
        Err(e) => {
            tracing::debug!(error = %e, "closing connection");
            return Next::Close(None);
        }
    };
    match frame::decode::<ClientFrame>(&bytes) {
        Ok(f) => Next::Request(f.id, f.req),
        Err(e) => match frame::decode::<IdOnly>(&bytes) {
            Ok(IdOnly { id }) => Next::Answer(
                id,
                WireError::new(ErrorCode::InvalidArgument, bad_request(&e)),
            ),
            Err(_) => Next::Close(Some(WireError::new(
                ErrorCode::InvalidArgument,
                "undecodable frame",
            ))),
        },
    }
}

/// Why no frame came.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    /// The stream or the frame failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// No budget for the frame in time.
    #[error("{0}")]
    Busy(String),
    /// The frame stopped arriving.
    #[error("a frame of {0} bytes did not arrive within frame_timeout_s")]
    TimedOut(usize),
}

/// Reads one frame: the header, then a share of the global budget for its length, then the body,
/// which must arrive within `frame_timeout_s`. Waiting for a header has no deadline: idle clients are
/// fine, half-sent frames are not.
async fn read_frame(
    rd: &mut &Stream,
    core: &Core,
    budget: &Arc<FrameBudget>,
    peer: &Peer,
) -> Result<(Vec<u8>, Grant), ReadError> {
    let len = frame::read_len_async(rd, core.config.max_frame).await?;
    let limits = &core.config.limits;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(limits.frame_timeout_s);
    let grant = loop {
        if let Some(grant) = budget.try_take(peer, len) {
            break grant;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ReadError::Busy(format!(
                "the daemon is receiving too many large frames (max_pending_frame_bytes, a quarter of it per user); a frame of {len} bytes waited {} s",
                limits.frame_timeout_s
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    match tokio::time::timeout_at(deadline, frame::read_body_async(rd, len)).await {
        Ok(body) => Ok((body?, grant)),
        Err(_) => Err(ReadError::TimedOut(len)),
    }
}

#[derive(serde::Deserialize)]
struct IdOnly {
    id: u64,
}

fn bad_request(e: &FrameError) -> String {
    let text = e.to_string();
    if text.contains("unknown variant") {
        format!("unsupported request: {text}")
    } else {
        format!("malformed request: {text}")
    }
}
