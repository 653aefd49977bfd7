//! One client connection: handshake, then requests answered in order, with subscription pushes
//! interleaved by a single writer task.
use super::handlers;
use super::session::{Admission, FrameBudget, Grant, Peer, Slot};
use crate::core::Core;
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::StreamCommon as _;
use lorad_schema::frame::{self, FrameError};
use lorad_schema::{
    ClientFrame, ErrorCode, Handshake, Reply, Request, ServerFrame, WireError, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// Largest handshake frame.
const MAX_HELLO: usize = 64 * 1024;
/// A client that says nothing for this long after connecting is dropped.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-connection state the handlers may change.
pub struct Conn {
    /// Who is on the other end.
    pub peer: Peer,
    /// Frames to send; the writer task drains it.
    pub out: mpsc::Sender<Vec<u8>>,
    /// Live subscriptions by id.
    pub subs: HashMap<u64, AbortHandle>,
}

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

/// Serves one connection until the client leaves, breaks the protocol, or the daemon shuts down.
/// `budget` holds the bytes of large frames being received, shared by every connection.
pub async fn handle(core: Arc<Core>, stream: Stream, peer: Peer, budget: Arc<FrameBudget>) {
    // `&Stream` reads and writes: the connection task reads, the writer task writes.
    let stream = Arc::new(stream);
    let mut rd = &*stream;
    let mut wr = &*stream;

    // Handshake.
    let hello = tokio::time::timeout(
        HELLO_TIMEOUT,
        frame::read_msg_async::<Handshake, _>(&mut rd, MAX_HELLO),
    )
    .await;
    let client = match hello {
        Ok(Ok(Handshake::Hello { protocol, client })) if protocol == PROTOCOL_VERSION => client,
        Ok(Ok(Handshake::Hello { protocol, .. })) => {
            let msg = Handshake::Error {
                code: ErrorCode::Unsupported,
                message: format!("client speaks protocol {protocol}; this daemon speaks protocol {PROTOCOL_VERSION}"),
            };
            let _ = frame::write_msg_async(&mut wr, &msg).await;
            return;
        }
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {
            let msg = Handshake::Error {
                code: ErrorCode::InvalidArgument,
                message: "expected a hello frame: {\"type\": \"hello\", \"protocol\": 1, \"client\": \"...\"}".into(),
            };
            let _ = frame::write_msg_async(&mut wr, &msg).await;
            return;
        }
    };
    let welcome = Handshake::Welcome {
        protocol: PROTOCOL_VERSION,
        daemon_version: env!("CARGO_PKG_VERSION").into(),
        features: vec!["subscribe".into(), "metrics".into(), "logs".into()],
    };
    if frame::write_msg_async(&mut wr, &welcome).await.is_err() {
        return;
    }
    tracing::debug!(uid = peer.uid, pid = peer.pid, %client, "client connected");

    let (out, mut rx) = mpsc::channel::<Vec<u8>>(256);
    let write_half = stream.clone();
    let writer = tokio::spawn(async move {
        let mut wr = &*write_half;
        while let Some(bytes) = rx.recv().await {
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = wr.flush().await;
    });

    let mut conn = Conn {
        peer,
        out,
        subs: HashMap::new(),
    };
    loop {
        let read = tokio::select! {
            r = read_frame(&mut rd, &core, &budget, &peer) => r,
            _ = core.shutdown.cancelled() => break,
        };
        let (bytes, permit) = match read {
            Ok(read) => read,
            Err(ReadError::Frame(FrameError::Closed)) => break,
            Err(ReadError::Busy(message)) => {
                send_reply(
                    &conn,
                    0,
                    Err(WireError::new(ErrorCode::Busy, message.clone())),
                )
                .await;
                tracing::debug!(uid = peer.uid, error = %message, "closing connection");
                break;
            }
            Err(ReadError::Frame(e @ FrameError::TooLarge { .. })) => {
                send_reply(
                    &conn,
                    0,
                    Err(WireError::new(ErrorCode::TooLarge, e.to_string())),
                )
                .await;
                tracing::debug!(uid = peer.uid, error = %e, "closing connection");
                break;
            }
            Err(e) => {
                tracing::debug!(uid = peer.uid, error = %e, "closing connection");
                break;
            }
        };
        let decoded = frame::decode::<ClientFrame>(&bytes);
        let bytes_id = decoded.is_err().then(|| frame::decode::<IdOnly>(&bytes));
        drop(bytes);
        drop(permit);
        let request = match decoded {
            Ok(f) => f,
            Err(e) => {
                // A frame with a readable id but an unknown or malformed request is answered and the
                // connection stays (forward compatibility); anything else is garbage and closes it.
                match bytes_id {
                    Some(Ok(IdOnly { id })) => {
                        send_reply(
                            &conn,
                            id,
                            Err(WireError::new(ErrorCode::InvalidArgument, bad_request(&e))),
                        )
                        .await;
                        continue;
                    }
                    _ => {
                        send_reply(
                            &conn,
                            0,
                            Err(WireError::new(
                                ErrorCode::InvalidArgument,
                                "undecodable frame",
                            )),
                        )
                        .await;
                        break;
                    }
                }
            }
        };
        // An export can take minutes: it runs on its own task and replies when done, so the
        // connection goes on serving (replies carry their request's id).
        if let Request::Export {
            job,
            format,
            out,
            checkpoint,
        } = request.req
        {
            let (core, peer, reply_to) = (core.clone(), conn.peer, conn.out.clone());
            tokio::spawn(async move {
                let result =
                    handlers::export::handle(&core, peer, job, format, out, checkpoint).await;
                send_reply_to(&reply_to, request.id, result).await;
            });
            continue;
        }
        let result = handlers::dispatch(&core, &mut conn, request.req).await;
        send_reply(&conn, request.id, result).await;
    }
    for (_, sub) in conn.subs.drain() {
        sub.abort();
    }
    drop(conn);
    let _ = writer.await;
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

async fn send_reply(conn: &Conn, id: u64, result: Result<lorad_schema::Response, WireError>) {
    send_reply_to(&conn.out, id, result).await
}

async fn send_reply_to(
    out: &mpsc::Sender<Vec<u8>>,
    id: u64,
    result: Result<lorad_schema::Response, WireError>,
) {
    let reply = match result {
        Ok(ok) => Reply {
            id,
            ok: Some(ok),
            err: None,
        },
        Err(err) => Reply {
            id,
            ok: None,
            err: Some(err),
        },
    };
    match frame::encode(&ServerFrame::Reply(reply)).and_then(|b| frame::frame_bytes(&b)) {
        Ok(bytes) => {
            let _ = out.send(bytes).await;
        }
        Err(e) => tracing::error!(error = %e, "cannot encode reply"),
    }
}
