//! Request handlers, one file per request, dispatched from one exhaustive match.
mod backup;
mod cancel;
mod checkpoints;
mod delete;
mod export;
mod get;
mod hold;
mod list;
mod logs;
mod metrics;
mod pause;
mod priority;
mod resume;
mod retry;
mod shutdown;
mod status;
mod submit;
mod subscribe;
mod templates;

use super::session::Conn;
use crate::core::Core;
use crate::journal::JournalError;
use lorad_schema::{ErrorCode, JobId, JobRecord, Request, Response, WireError};

pub use super::session::Peer;

/// A request's answer: now, or a long-running piece of work (an export) whose result is the reply.
/// One per request, moved once: the size difference of the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Dispatched {
    /// The reply.
    Now(Result<Response, WireError>),
    /// Work to run on its own task; its result is the reply.
    Later(std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, WireError>> + Send>>),
}

/// Answers one request.
pub async fn dispatch(core: &std::sync::Arc<Core>, conn: &mut Conn, req: Request) -> Dispatched {
    let kind = req.kind();
    let peer = conn.peer;
    let result = match req {
        // An export can take minutes: the connection goes on serving meanwhile.
        Request::Export {
            job,
            format,
            out,
            checkpoint,
        } => {
            let core = core.clone();
            return Dispatched::Later(Box::pin(async move {
                let result = export::handle(&core, peer, job, format, out, checkpoint).await;
                log_refusal("export", peer, &result);
                result
            }));
        }
        Request::Status => status::handle(core).await,
        Request::Templates => templates::handle(core),
        Request::Submit(spec) => submit::handle(core, conn.peer, spec).await,
        Request::List { state, all, after } => {
            list::handle(core, conn.peer, state, all, after).await
        }
        Request::Get { job } => get::handle(core, conn.peer, job).await,
        Request::Cancel { job } => cancel::handle(core, conn.peer, job).await,
        Request::Pause { job } => pause::handle(core, conn.peer, job).await,
        Request::Resume { job, checkpoint } => {
            resume::handle(core, conn.peer, job, checkpoint).await
        }
        Request::Retry { job } => retry::handle(core, conn.peer, job).await,
        Request::SetPriority { job, priority } => {
            priority::handle(core, conn.peer, job, priority).await
        }
        Request::Checkpoints { job } => checkpoints::handle(core, conn.peer, job).await,
        Request::Metrics { job, since_step } => {
            metrics::handle(core, conn.peer, job, since_step).await
        }
        Request::Logs {
            job,
            offset,
            max_bytes,
        } => logs::handle(core, conn.peer, job, offset, max_bytes).await,
        Request::Subscribe { job, since_seq } => {
            subscribe::subscribe(core, conn, job, since_seq).await
        }
        Request::Unsubscribe { sub } => subscribe::unsubscribe(conn, sub),
        Request::Hold { job } => hold::hold(core, conn.peer, job).await,
        Request::Release { job } => hold::release(core, conn.peer, job).await,
        Request::Delete { job, keep_record } => {
            delete::handle(core, conn.peer, job, keep_record).await
        }
        Request::Shutdown => shutdown::handle(core, conn.peer),
        Request::Backup => backup::handle(core, conn.peer).await,
    };
    log_refusal(kind, peer, &result);
    Dispatched::Now(result)
}

fn log_refusal(kind: &str, peer: Peer, result: &Result<Response, WireError>) {
    if let Err(e) = result {
        tracing::debug!(request = kind, uid = peer.uid, code = %e.code, message = %e.message, "request refused");
    }
}

/// Maps a journal error onto the wire's closed codes.
pub fn journal_error(e: JournalError) -> WireError {
    match e {
        JournalError::NotFound(id) => WireError::new(ErrorCode::NotFound, format!("no job {id}")),
        JournalError::Transition(t) => WireError::new(ErrorCode::InvalidState, t.to_string()),
        JournalError::Refused(e) => e,
        ref storage if crate::journal::is_storage_error(storage) => WireError::new(
            ErrorCode::Busy,
            format!("the journal cannot be written now (is the disk full?): {storage}; nothing was changed, try again once there is space"),
        ),
        other => {
            tracing::error!(error = %other, "journal failure");
            WireError::new(ErrorCode::Internal, other.to_string())
        }
    }
}

/// The job `id` if it exists and `peer` may access it. Another user's job reads as not found, so ids
/// leak nothing.
pub async fn job_for(core: &Core, peer: Peer, id: JobId) -> Result<JobRecord, WireError> {
    let job = core.read(move |j| j.job(id)).await.map_err(journal_error)?;
    if peer.may_access(&job) {
        Ok(job)
    } else {
        Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!("job {id} belongs to another user"),
        ))
    }
}
