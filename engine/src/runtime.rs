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

/// The process's peak resident set size in MiB (getrusage; Linux reports KiB).
pub fn peak_rss_mb() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| u.max_rss() as f64 / 1024.0)
        .unwrap_or(0.0)
}
