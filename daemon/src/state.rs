//! The job state machine: the one place that says which transitions are allowed.
use lorad_schema::JobState;
use JobState::*;

/// A transition the state machine forbids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("job is {from}; cannot go to {to}")]
pub struct InvalidTransition {
    /// Current state.
    pub from: JobState,
    /// Requested state.
    pub to: JobState,
}

/// Checks `from -> to` against DESIGN.md section 4.
pub fn check(from: JobState, to: JobState) -> Result<(), InvalidTransition> {
    let ok = match (from, to) {
        (Queued, Initializing | Paused | Cancelled) => true,
        // Back to the queue: a restart after a crash or a daemon restart.
        (Initializing, Running | Queued | Paused | Cancelled | Failed) => true,
        (Running, Completed | Failed | Cancelled | Paused | Queued) => true,
        (Paused, Queued | Cancelled) => true,
        // retry
        (Failed | Cancelled, Queued) => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(InvalidTransition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_paths() {
        for (a, b) in [
            (Queued, Initializing),
            (Initializing, Running),
            (Running, Completed),
        ] {
            check(a, b).unwrap();
        }
        check(Running, Cancelled).unwrap();
        check(Queued, Cancelled).unwrap();
        check(Failed, Queued).unwrap();
    }

    #[test]
    fn terminal_states_stay_put() {
        for to in JobState::ALL {
            assert!(check(Completed, to).is_err(), "completed -> {to}");
        }
        assert!(check(Cancelled, Completed).is_err());
        assert!(check(Cancelled, Failed).is_err());
        assert!(check(Failed, Completed).is_err());
        assert!(
            check(Queued, Running).is_err(),
            "a job initializes before it runs"
        );
        assert!(check(Queued, Completed).is_err());
    }

    #[test]
    fn no_self_transitions() {
        for s in JobState::ALL {
            assert!(check(s, s).is_err(), "{s} -> {s}");
        }
    }
}
