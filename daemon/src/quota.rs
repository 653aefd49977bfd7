//! Per-user quotas and the bounds on what a client may ask for: pure decisions on the journal's jobs
//! and the request, with the limit named in every refusal. Admins have no quota.
use crate::config::Limits;
use lorad_schema::{ErrorCode, JobRecord, JobSpec, JobState, WireError};

/// Longest job name, in bytes.
pub const MAX_NAME: usize = 256;
/// Longest template name.
pub const MAX_TEMPLATE: usize = 128;
/// Longest path (Linux PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Most `--set` overrides in one submit.
pub const MAX_OVERRIDES: usize = 64;
/// Longest override key and value.
pub const MAX_KEY: usize = 64;
/// Longest override value.
pub const MAX_VALUE: usize = 4096;

fn too_large(field: &str, len: usize, max: usize) -> WireError {
    WireError::new(
        ErrorCode::TooLarge,
        format!("{field} is {len} bytes long; the limit is {max}"),
    )
}

/// The lengths of a submit's strings, and its paths' shapes: absolute, no `..`, no NUL.
pub fn check_spec(spec: &JobSpec) -> Result<(), WireError> {
    if let Some(name) = &spec.name {
        if name.len() > MAX_NAME {
            return Err(too_large("name", name.len(), MAX_NAME));
        }
    }
    if spec.template.len() > MAX_TEMPLATE {
        return Err(too_large("template", spec.template.len(), MAX_TEMPLATE));
    }
    let paths = [
        ("base_model", Some(&spec.base_model)),
        ("dataset", Some(&spec.dataset)),
        ("output_dir", spec.output_dir.as_ref()),
    ];
    for (field, path) in paths {
        if let Some(path) = path {
            check_path(field, path)?;
        }
    }
    if let Some(cmd) = &spec.on_finish {
        if cmd.len() > MAX_VALUE {
            return Err(too_large("on_finish", cmd.len(), MAX_VALUE));
        }
        if cmd.contains('\0') || cmd.trim().is_empty() {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                "on_finish must be a non-empty shell command without NUL bytes",
            ));
        }
    }
    if spec.overrides.len() > MAX_OVERRIDES {
        return Err(too_large("overrides", spec.overrides.len(), MAX_OVERRIDES));
    }
    for (k, v) in &spec.overrides {
        if k.len() > MAX_KEY {
            return Err(too_large("a setting's name", k.len(), MAX_KEY));
        }
        if v.len() > MAX_VALUE {
            return Err(too_large(&format!("setting '{k}'"), v.len(), MAX_VALUE));
        }
    }
    Ok(())
}

/// A path a client names: absolute, at most PATH_MAX, no NUL, no `..` component (it would let a
/// name that looks like one place mean another).
pub fn check_path(field: &str, path: &str) -> Result<(), WireError> {
    if path.len() > MAX_PATH {
        return Err(too_large(field, path.len(), MAX_PATH));
    }
    let invalid = |why: &str| {
        WireError::new(
            ErrorCode::InvalidArgument,
            format!("{field}: '{path}' {why}"),
        )
    };
    if !path.starts_with('/') {
        return Err(invalid("must be an absolute path"));
    }
    if path.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(invalid("contains '..'; give the path without it"));
    }
    Ok(())
}

fn quota(msg: String) -> WireError {
    WireError::new(ErrorCode::QuotaExceeded, msg)
}

/// Whether `uid` may have one more job waiting (a submit, a resume, a retry).
pub fn may_queue(jobs: &[JobRecord], uid: u32, limits: &Limits) -> Result<(), WireError> {
    let waiting = jobs
        .iter()
        .filter(|j| j.owner_uid == uid && matches!(j.state, JobState::Queued | JobState::Paused))
        .count();
    if waiting >= limits.max_queued_per_user {
        return Err(quota(format!(
            "uid {uid} has {waiting} queued or paused jobs; max_queued_per_user is {}",
            limits.max_queued_per_user
        )));
    }
    if limits.max_running_per_user == 0 {
        return Err(quota(format!(
            "uid {uid} may run no jobs: max_running_per_user is 0"
        )));
    }
    Ok(())
}

/// Whether a non-admin may give a job `priority`.
pub fn may_prioritise(priority: i32, uid: u32, limits: &Limits) -> Result<(), WireError> {
    if priority > limits.max_priority {
        return Err(quota(format!(
            "priority {priority} for uid {uid} is above max_priority {}",
            limits.max_priority
        )));
    }
    Ok(())
}

/// Jobs of `uid` initializing or running.
pub fn running(jobs: &[JobRecord], uid: u32) -> usize {
    jobs.iter()
        .filter(|j| {
            j.owner_uid == uid && matches!(j.state, JobState::Initializing | JobState::Running)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            template: "basic-fine-tune".into(),
            base_model: "/m".into(),
            dataset: "/d.jsonl".into(),
            ..JobSpec::default()
        }
    }

    #[test]
    fn long_strings_and_odd_paths_are_refused_with_the_field() {
        assert!(check_spec(&spec()).is_ok());
        let mut s = spec();
        s.name = Some("x".repeat(10 << 20));
        let e = check_spec(&s).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        assert!(e.message.starts_with("name is 10485760 bytes"), "{e}");
        let mut s = spec();
        s.dataset = "/home/b/../a/private.jsonl".into();
        assert!(check_spec(&s).unwrap_err().message.contains("'..'"));
        let mut s = spec();
        s.output_dir = Some("rel/out".into());
        assert!(check_spec(&s).unwrap_err().message.contains("output_dir"));
        let mut s = spec();
        s.overrides.insert("lr".into(), "1".repeat(5000));
        assert!(check_spec(&s).unwrap_err().message.contains("'lr'"));
    }

    #[test]
    fn quotas_name_their_limit() {
        let limits = Limits {
            max_queued_per_user: 1,
            max_priority: 5,
            ..Limits::default()
        };
        let job = |uid, state| {
            let mut j: JobRecord = serde_json::from_value(serde_json::json!({
                "id": 1, "name": "n", "state": "queued", "owner_uid": uid, "priority": 0,
                "template": "t", "base_model": "/m", "dataset": "/d", "output_dir": "/o",
                "settings": lorad_schema::TrainSettings::default(), "overrides": {},
                "progress": {"step": 0, "total_steps": 0, "epoch": 0.0}, "created_at_ms": 0
            }))
            .unwrap();
            j.state = state;
            j
        };
        assert!(may_queue(&[job(7, JobState::Running)], 7, &limits).is_ok());
        assert!(may_queue(&[job(8, JobState::Queued)], 7, &limits).is_ok());
        let e = may_queue(&[job(7, JobState::Paused)], 7, &limits).unwrap_err();
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        assert!(e.message.contains("max_queued_per_user is 1"), "{e}");
        assert!(may_prioritise(5, 7, &limits).is_ok());
        assert!(may_prioritise(6, 7, &limits)
            .unwrap_err()
            .message
            .contains("max_priority 5"));
        assert_eq!(
            running(&[job(7, JobState::Running), job(7, JobState::Queued)], 7),
            1
        );
    }
}
