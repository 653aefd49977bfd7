//! The first exchange on a connection: the client's `hello`, the daemon's `welcome` (or an error naming
//! both protocol versions, after which the connection closes).
use super::session::Peer;
use interprocess::local_socket::tokio::Stream;
use lorad_schema::{frame, ErrorCode, Handshake, PROTOCOL_VERSION};
use std::time::Duration;

/// Largest handshake frame.
const MAX_HELLO: usize = 64 * 1024;
/// A client that says nothing for this long after connecting is dropped.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads `hello` and answers it; the client's name when the connection may go on.
pub async fn handshake(stream: &Stream, peer: &Peer) -> Option<String> {
    let (mut rd, mut wr) = (stream, stream);
    let hello = tokio::time::timeout(
        HELLO_TIMEOUT,
        frame::read_msg_async::<Handshake, _>(&mut rd, MAX_HELLO),
    )
    .await;
    let refusal = match hello {
        Ok(Ok(Handshake::Hello { protocol, client })) if protocol == PROTOCOL_VERSION => {
            let welcome = Handshake::Welcome {
                protocol: PROTOCOL_VERSION,
                daemon_version: env!("CARGO_PKG_VERSION").into(),
                features: vec!["subscribe".into(), "metrics".into(), "logs".into()],
            };
            frame::write_msg_async(&mut wr, &welcome).await.ok()?;
            tracing::debug!(uid = peer.uid, pid = peer.pid, %client, "client connected");
            return Some(client);
        }
        Ok(Ok(Handshake::Hello { protocol, .. })) => Handshake::Error {
            code: ErrorCode::Unsupported,
            message: format!(
                "client speaks protocol {protocol}; this daemon speaks protocol {PROTOCOL_VERSION}"
            ),
        },
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => Handshake::Error {
            code: ErrorCode::InvalidArgument,
            message: "expected a hello frame: {\"type\": \"hello\", \"protocol\": 1, \"client\": \"...\"}"
                .into(),
        },
    };
    let _ = frame::write_msg_async(&mut wr, &refusal).await;
    None
}
