use crate::core::Core;
use lorad_schema::{DaemonStatus, DeviceInfo, JobState, Response, WireError, PROTOCOL_VERSION};

pub async fn handle(core: &Core) -> Result<Response, WireError> {
    let jobs = core
        .read(|j| j.jobs())
        .await
        .map_err(super::journal_error)?;
    let last_seq = core
        .read(|j| j.last_seq())
        .await
        .map_err(super::journal_error)?;
    let running = jobs.iter().find(|j| j.state.is_active()).map(|j| j.id);
    Ok(Response::Status(DaemonStatus {
        daemon_version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL_VERSION,
        uptime_s: core.uptime_s(),
        pid: std::process::id(),
        state_dir: core.config.state_dir.display().to_string(),
        devices: vec![DeviceInfo {
            name: "cpu".into(),
            description: format!(
                "CPU, {} threads (no GPU)",
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            ),
            job: running,
        }],
        queued: jobs.iter().filter(|j| j.state == JobState::Queued).count() as u64,
        running: jobs.iter().filter(|j| j.state.is_active()).count() as u64,
        jobs: jobs.len() as u64,
        last_seq,
        plugins: core.plugins().status(),
    }))
}
