//! One client connection: handshake, then requests answered in order, with subscription pushes
//! interleaved by a single writer task.
use super::handlers::{self, Peer};
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

/// Serves one connection until the client leaves, breaks the protocol, or the daemon shuts down.
pub async fn handle(core: Arc<Core>, stream: Stream) {
    let peer = match stream.peer_creds() {
        Ok(creds) => Peer::new(
            creds.euid().unwrap_or(u32::MAX),
            creds.pid().unwrap_or(0) as u32,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "no peer credentials; dropping connection");
            return;
        }
    };
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
            r = frame::read_frame_async(&mut rd, core.config.max_frame) => r,
            _ = core.shutdown.cancelled() => break,
        };
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(FrameError::Closed) => break,
            Err(e @ FrameError::TooLarge { .. }) => {
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
        let request = match frame::decode::<ClientFrame>(&bytes) {
            Ok(f) => f,
            Err(e) => {
                // A frame with a readable id but an unknown or malformed request is answered and the
                // connection stays (forward compatibility); anything else is garbage and closes it.
                match frame::decode::<IdOnly>(&bytes) {
                    Ok(IdOnly { id }) => {
                        send_reply(
                            &conn,
                            id,
                            Err(WireError::new(ErrorCode::InvalidArgument, bad_request(&e))),
                        )
                        .await;
                        continue;
                    }
                    Err(_) => {
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
