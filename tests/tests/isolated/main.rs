//! Tests that measure latency or hold the machine's connections: in their own test binary, which cargo
//! runs after the others, so no training from other tests competes with them for the CPU. They start
//! real system-mode daemons as root with users they create (skipped when not root).
mod eta;
mod flood;
#[path = "../integration/helpers.rs"]
mod helpers;
mod security;
mod slurm;

pub use helpers::*;
pub use lorad_client::blocking::Client;
pub use lorad_schema::{EventBody, JobId, JobRecord, JobSpec, JobState};
pub use std::path::Path;
pub use std::time::{Duration, Instant};
