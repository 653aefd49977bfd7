use crate::core::Core;
use crate::scheduler::Slot;
use lorad_schema::JobId;

/// The CPU (its slots, threads, and why there is no GPU when there is none) and every GPU, each with
/// the jobs running on it.
fn devices(core: &Core) -> Vec<DeviceInfo> {
    let on = |slot: Slot| -> Vec<JobId> {
        let mut jobs: Vec<JobId> = core
            .workers
            .lock()
            .map(|w| {
                w.iter()
                    .filter(|(_, h)| h.slot == slot)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        jobs.sort();
        jobs
    };
    let (c, d) = (&core.config, &core.devices);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut cpu = format!(
        "CPU, {cores} cores: {} slot{} x {} threads",
        c.cpu_slots,
        if c.cpu_slots == 1 { "" } else { "s" },
        c.cpu_threads
    );
    if let Some(why) = &d.no_gpu {
        cpu.push_str(&format!("; no GPU: {why}"));
    }
    let jobs = on(Slot::Cpu);
    let mut out = vec![DeviceInfo {
        name: "cpu".into(),
        description: cpu,
        job: jobs.first().copied(),
        jobs,
        memory_mb: None,
    }];
    for g in &d.gpus {
        let jobs = on(Slot::Gpu(g.index));
        let (major, minor) = g.compute_capability;
        out.push(DeviceInfo {
            name: format!("cuda:{}", g.index),
            description: format!(
                "{}, {:.1} GB, compute {major}.{minor}, driver {}",
                g.name,
                g.memory_total as f64 / 1e9,
                d.driver.as_deref().unwrap_or("?")
            ),
            job: jobs.first().copied(),
            jobs,
            memory_mb: Some(g.memory_total >> 20),
        });
    }
    out
}
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
    Ok(Response::Status(DaemonStatus {
        daemon_version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL_VERSION,
        uptime_s: core.uptime_s(),
        pid: std::process::id(),
        state_dir: core.config.state_dir.display().to_string(),
        devices: devices(core),
        queued: jobs.iter().filter(|j| j.state == JobState::Queued).count() as u64,
        running: jobs.iter().filter(|j| j.state.is_active()).count() as u64,
        jobs: jobs.len() as u64,
        last_seq,
        plugins: core.plugins().status(),
    }))
}
