//! Client library for lorad, the LoRA fine-tuning daemon: connect to its socket, submit and control
//! jobs, read metrics and logs, and follow a job's events as they happen.
//!
//! ```no_run
//! use lorad_client::{Client, ClientError};
//! use lorad_client::lorad_schema::{EventBody, JobSpec};
//!
//! # async fn demo() -> Result<(), ClientError> {
//! let client = Client::connect_default().await?;
//! let job = client
//!     .submit(JobSpec {
//!         template: "basic-fine-tune".into(),
//!         base_model: "/models/smollm-135m".into(),
//!         dataset: "/data/train.jsonl".into(),
//!         ..Default::default()
//!     })
//!     .await?;
//! println!("queued job {}", job.id);
//!
//! // Replays the job's history, then streams live events.
//! let mut events = client.subscribe(Some(job.id), 0).await?;
//! while let Some(event) = events.next().await {
//!     match event.body {
//!         EventBody::Metrics { point } => println!("step {} loss {:.4}", point.step, point.loss),
//!         EventBody::StateChanged { to, .. } if to.is_terminal() => break,
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The wire protocol itself (for clients in other languages) is described in `docs/PROTOCOL.md`. For
//! programs without an async runtime, [`blocking::Client`] offers the same calls.
#![deny(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod blocking;
mod client;
mod error;
mod router;
mod subscription;

pub use client::{Client, LogChunk, ServerInfo, DEFAULT_CLIENT_NAME};
pub use error::ClientError;
pub use subscription::Subscription;

/// The wire types, re-exported so users need not depend on `lorad-schema` themselves.
pub use lorad_schema;
