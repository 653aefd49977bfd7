//! Storage-level crash tests of the journal (being written).
