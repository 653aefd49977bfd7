//! Integration tests: each starts real `lorad` processes and drives them through lorad-client.
mod bad_input;
mod chaos;
mod cli;
mod cli_json;
mod control;
mod devices;
mod disk_full;
mod export;
mod helpers;
mod jobs;
mod journal;
mod plugins;
mod progress;
mod protocol;
mod queue;
mod recovery;
mod service;
mod third_party;
mod watch_plot;

pub use helpers::*;
pub use lorad_client::blocking::Client;
pub use lorad_schema::{EventBody, JobId, JobRecord, JobSpec, JobState};
pub use std::path::Path;
pub use std::time::{Duration, Instant};
