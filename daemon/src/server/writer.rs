//! The one task that writes to a connection: replies and subscription pushes, in the order they are
//! queued, so frames never interleave.
use interprocess::local_socket::tokio::Stream;
use lorad_schema::{frame, Reply, Response, ServerFrame, WireError};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Frames queued for one connection at most; a client that does not read holds up only itself.
const QUEUE: usize = 256;

/// Starts the writer of `stream`: the sender of its queue, and the task (done when every sender is
/// dropped or the client stops reading).
pub fn spawn(stream: Arc<Stream>) -> (mpsc::Sender<Vec<u8>>, JoinHandle<()>) {
    let (out, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let task = tokio::spawn(async move {
        let mut wr = &*stream;
        while let Some(bytes) = rx.recv().await {
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = wr.flush().await;
    });
    (out, task)
}

/// Queues the reply to request `id`.
pub async fn reply(out: &mpsc::Sender<Vec<u8>>, id: u64, result: Result<Response, WireError>) {
    let (ok, err) = match result {
        Ok(ok) => (Some(ok), None),
        Err(err) => (None, Some(err)),
    };
    let reply = ServerFrame::Reply(Reply { id, ok, err });
    match frame::encode(&reply).and_then(|b| frame::frame_bytes(&b)) {
        Ok(bytes) => {
            let _ = out.send(bytes).await;
        }
        Err(e) => tracing::error!(error = %e, "cannot encode reply"),
    }
}
