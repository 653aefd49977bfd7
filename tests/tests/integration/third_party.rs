//! placeholder: a third-party plugin job
