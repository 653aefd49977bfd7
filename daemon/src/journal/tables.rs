//! The journal's tables. Values are MessagePack (named maps) of the lorad-schema types, so fields can be
//! added without a migration; keys are integers so ranges scan in order.
use redb::TableDefinition;

/// Counters and the schema version: `next_job`, `next_seq`, `schema_version`.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Job id -> JobRecord.
pub const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
/// Event seq -> Event. Seqs are journal-wide and strictly increasing.
pub const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// (job id, step) -> MetricPoint. Keyed by step so a point is stored exactly once.
pub const METRICS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("metrics");

/// Version of the on-disk layout; bump it with a migration when a key or table changes meaning.
pub const SCHEMA_VERSION: u64 = 1;

/// META keys.
pub mod meta {
    /// The next job id to hand out.
    pub const NEXT_JOB: &str = "next_job";
    /// The next event seq.
    pub const NEXT_SEQ: &str = "next_seq";
    /// SCHEMA_VERSION of the file.
    pub const SCHEMA_VERSION: &str = "schema_version";
}
