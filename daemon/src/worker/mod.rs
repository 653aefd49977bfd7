//! The worker: the process that trains one job, runs one export or checks one submit (`lorad worker`).
//!
//! `process` is the glue to the daemon (control channel on fd 3, log on stderr); everything below it is
//! the engine crate (`lorad-engine`), re-exported here so the daemon names it as `worker::...`.
pub use lorad_engine::*;
pub mod process;
