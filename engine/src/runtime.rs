//! Process settings and measurements for whoever runs the engine (the worker, the speed example).

/// Keeps the large buffers of a training step in the heap between steps. glibc's defaults hand every
/// buffer over 128 KiB-32 MiB (the threshold adapts) back to the kernel on free, and the kernel zeroes
/// the pages again when the next step faults them in: measured at about a quarter of a LoRA step's time
/// on CPU (CANDLE-NOTES). A fixed 32 MiB mmap threshold and no trimming make those buffers reused
/// instead; the peak RSS is the same (the step needs them all at once anyway).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        };
        if !ok {
            tracing::warn!("mallopt refused the allocator settings; training may be slower");
        }
    }
}

/// The process's resident set size now, MiB (/proc/self/statm); None off Linux.
pub fn rss_mb() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page as f64 / (1u64 << 20) as f64)
}

/// CPU time this process has used (user + system, all threads), seconds.
pub fn cpu_time_s() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}

/// Samples the process on the CPU between two calls: resident memory and CPU use over the interval.
#[derive(Debug)]
pub struct CpuMeter {
    since: std::time::Instant,
    cpu_s: f64,
}

impl Default for CpuMeter {
    fn default() -> Self {
        CpuMeter {
            since: std::time::Instant::now(),
            cpu_s: cpu_time_s(),
        }
    }
}

impl CpuMeter {
    /// The sample since the last one (or since the meter was made); None where RSS is unreadable.
    pub fn sample(&mut self) -> Option<lorad_schema::CpuSample> {
        let (now, cpu_s) = (std::time::Instant::now(), cpu_time_s());
        let wall = now.duration_since(self.since).as_secs_f64();
        let used = cpu_s - self.cpu_s;
        (self.since, self.cpu_s) = (now, cpu_s);
        let rss = rss_mb()?;
        Some(lorad_schema::CpuSample {
            rss_mb: rss,
            // The kernel updates the high-water mark lazily: it can trail the RSS just read.
            peak_rss_mb: peak_rss_mb().max(rss),
            cpu_pct: if wall > 0.0 { 100.0 * used / wall } else { 0.0 },
        })
    }
}

/// The process's peak resident set size in MiB (getrusage; Linux reports KiB).
pub fn peak_rss_mb() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| u.max_rss() as f64 / 1024.0)
        .unwrap_or(0.0)
}
