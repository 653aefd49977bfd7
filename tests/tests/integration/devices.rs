//! The daemon's devices: "no GPU" with the reason, CUDA devices refused at submit, CPU slots running
//! jobs side by side, each step's CPU figures, and energy from an (injected) RAPL counter.
use super::*;
use lorad_tests::{tiny_model, write_dataset, TestDaemon};

#[test]
fn no_gpu_is_said_with_the_reason_and_cuda_is_refused_at_submit() {
    let d = TestDaemon::start();
    let c = d.client();
    let status = c.status().expect("status");
    let cpu = &status.devices[0];
    assert_eq!(cpu.name, "cpu");
    // This machine (and CI) has no NVIDIA driver: the reason, not a failure.
    if status.devices.len() == 1 {
        assert!(cpu.description.contains("no GPU: "), "{}", cpu.description);
    }
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 8);
    let err = c
        .submit(spec(
            tiny_model(),
            &data,
            &fast_with(&[("device", "cuda:0")]),
        ))
        .expect_err("cuda:0 without CUDA support");
    let text = err.to_string();
    assert!(
        text.contains("setting 'device'") && text.contains("cuda:0"),
        "{text}"
    );
    assert!(text.contains("CUDA"), "{text}");
    // Refused means nothing queued.
    assert!(c.list(None, false).expect("list").is_empty());
}

#[test]
fn every_step_carries_the_workers_cpu_figures_and_unmeasured_energy_says_so() {
    let d = TestDaemon::start_with_config("rapl_dir = \"/nonexistent/intel-rapl:0\"\n");
    let c = d.client();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let job = c
        .submit(spec(tiny_model(), &data, FAST))
        .expect("submit")
        .id;
    let (done, _) = wait_for(&c, job, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    let points = c.metrics(job, None).expect("metrics");
    assert!(!points.is_empty());
    for p in &points {
        let cpu = p.cpu.expect("every point has the worker's CPU figures");
        assert!(cpu.rss_mb > 1.0 && cpu.peak_rss_mb >= cpu.rss_mb, "{cpu:?}");
        assert!(cpu.cpu_pct > 0.0, "{cpu:?}");
        assert!(p.gpu.is_none(), "no GPU, no GPU figures");
    }
    assert_eq!(done.progress.device.as_deref(), Some("cpu"));
    assert_eq!(done.progress.energy_j, None);
    let source = done.progress.energy_source.clone().unwrap_or_default();
    assert!(
        source.starts_with("not measured: no readable RAPL counter"),
        "{source}"
    );
    assert!(
        source.contains("/nonexistent/intel-rapl:0/energy_uj"),
        "{source}"
    );
    assert_eq!(done.progress.cost, None, "no price, no cost");
}

#[test]
fn energy_is_the_rapl_counters_difference_and_cost_follows_from_the_price() {
    let rapl = tempfile::tempdir().expect("tempdir");
    let write = |uj: u64| {
        std::fs::write(rapl.path().join("energy_uj"), format!("{uj}\n")).expect("energy_uj");
    };
    write(5_000_000);
    std::fs::write(rapl.path().join("max_energy_range_uj"), "262143328850\n").expect("range");
    // 3.6e6 per kWh makes the cost read in joules: 2.5 J cost 2.5.
    let config = format!(
        "rapl_dir = \"{}\"\nprice_per_kwh = 3600000.0\n",
        rapl.path().display()
    );
    let d = TestDaemon::start_with_config(&config);
    let c = d.client();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let long = fast_with(&[("max_steps", "400")]);
    let job = c
        .submit(spec(tiny_model(), &data, &long))
        .expect("submit")
        .id;
    wait_for(&c, job, Duration::from_secs(120), |s| {
        s == JobState::Running
    });
    // The attempt read 5 J when it started; the package uses 2.5 J more while it trains.
    write(7_500_000);
    let (done, _) = wait_for(&c, job, Duration::from_secs(300), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    let last = c.metrics(job, None).expect("metrics").len();
    assert!(last > 1, "the counter changed before the last step");
    assert_eq!(done.progress.energy_j, Some(2.5));
    assert_eq!(
        done.progress.energy_source.as_deref(),
        Some("rapl (the whole CPU package)")
    );
    assert_eq!(done.progress.cost, Some(2.5));
}

#[test]
fn two_cpu_slots_run_two_jobs_at_once() {
    let d = TestDaemon::start_with_config("cpu_slots = 2\ncpu_threads = 1\n");
    let c = d.client();
    let cpu = c.status().expect("status").devices[0].description.clone();
    assert!(cpu.contains("2 slots x 1 threads"), "{cpu}");
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let long = fast_with(&[("max_steps", "100000")]);
    let a = c
        .submit(spec(tiny_model(), &data, &long))
        .expect("submit")
        .id;
    let b = c
        .submit(spec(tiny_model(), &data, &long))
        .expect("submit")
        .id;
    wait_for(&c, a, Duration::from_secs(60), |s| s == JobState::Running);
    wait_for(&c, b, Duration::from_secs(60), |s| s == JobState::Running);
    // Both run at once, each on a CPU slot; a third waits for a slot.
    let third = c
        .submit(spec(tiny_model(), &data, &long))
        .expect("submit")
        .id;
    let status = c.status().expect("status");
    assert_eq!(status.devices[0].jobs, vec![a, b]);
    assert_eq!(status.running, 2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.get(third).expect("get").state, JobState::Queued);
    // One ends: the waiting job takes its slot.
    c.cancel(a).expect("cancel");
    wait_for(&c, third, Duration::from_secs(60), |s| {
        s == JobState::Running
    });
    for job in [b, third] {
        c.cancel(job).expect("cancel");
    }
}

#[test]
fn dry_run_predicts_memory_and_a_job_above_the_limit_is_refused_with_a_way_out() {
    // The tiny model's job needs some tens of MB; give CPU jobs 40 MB.
    let d = TestDaemon::start_with_config("cpu_memory_gb = 0.04\n");
    let c = d.client();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let small = spec(
        tiny_model(),
        &data,
        &fast_with(&[("batch_size", "1"), ("max_seq_len", "32")]),
    );
    let estimate = c.dry_run(small.clone()).expect("dry run");
    assert!(estimate.memory_estimate > 1_000_000, "{estimate:?}");
    assert!(estimate.memory.contains("weights"), "{estimate:?}");
    assert_eq!(estimate.examples, Some(64));
    assert!(estimate.devices.starts_with("cpu "), "{estimate:?}");
    assert!(
        c.list(None, false).expect("list").is_empty(),
        "a dry run queues nothing"
    );

    // A batch far too big for 40 MB: refused, with the figure and a batch that fits.
    let big = spec(
        tiny_model(),
        &data,
        &fast_with(&[("batch_size", "512"), ("max_seq_len", "512")]),
    );
    let err = c
        .submit(big)
        .expect_err("above the memory limit")
        .to_string();
    assert!(err.contains("the job needs about"), "{err}");
    assert!(err.contains("(cpu 40"), "{err}");
    assert!(
        err.contains("batch_size=") && err.contains("needs about"),
        "{err}"
    );
    assert!(
        c.list(None, false).expect("list").is_empty(),
        "refused means nothing queued"
    );

    // The job that fits is queued with its estimate, and `loractl submit --dry-run` says the same.
    let job = c.submit(small).expect("submit");
    assert_eq!(job.memory_estimate, Some(estimate.memory_estimate));
    let out = std::process::Command::new(lorad_tests::bin("loractl"))
        .arg("--socket")
        .arg(d.socket())
        .args([
            "submit",
            "--template",
            "basic-fine-tune",
            "--dry-run",
            "--model",
        ])
        .arg(tiny_model())
        .arg("--data")
        .arg(&data)
        .args(["--set", "batch_size=1", "--set", "max_seq_len=32"])
        .output()
        .expect("loractl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("dry run, nothing queued: 64 examples; predicted peak memory"),
        "{text}"
    );
}
