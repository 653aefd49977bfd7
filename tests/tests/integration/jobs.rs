//! A job from submit to adapter, and cancel.
use super::*;
use lorad_schema::ErrorCode;
use lorad_tests::{process_alive, tiny_model, write_dataset, TestDaemon};

fn file_digest(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read")
}

#[test]
fn job_trains_to_a_peft_adapter() {
    let d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let weights = tiny_model().join("model.safetensors");
    let before = file_digest(&weights);

    let c = d.client();
    let job = c.submit(spec(tiny_model(), &data, FAST)).expect("submit");
    assert_eq!(job.state, JobState::Queued);
    let (job, seen) = wait_for(&c, job.id, Duration::from_secs(300), |s| s.is_terminal());
    assert_eq!(
        job.state,
        JobState::Completed,
        "reason: {:?}\n{}",
        job.reason,
        d.daemon_log()
    );
    assert_eq!(
        seen,
        vec![
            JobState::Queued,
            JobState::Initializing,
            JobState::Running,
            JobState::Completed
        ]
    );

    // The loss fell: mean of the last 5 steps at least 30% below the first 5.
    let points = c.metrics(job.id, None).expect("metrics");
    assert_eq!(points.len() as u64, job.progress.total_steps);
    assert!(points.len() >= 10, "{} steps", points.len());
    assert!(
        points.windows(2).all(|w| w[1].step == w[0].step + 1),
        "steps in order, once each"
    );
    let mean =
        |p: &[lorad_schema::MetricPoint]| p.iter().map(|p| p.loss).sum::<f64>() / p.len() as f64;
    let (first, last) = (mean(&points[..5]), mean(&points[points.len() - 5..]));
    assert!(
        last < 0.7 * first,
        "loss {first:.3} -> {last:.3} fell by less than 30%"
    );
    assert!(points
        .iter()
        .all(|p| p.tokens_per_s > 0.0 && p.step_ms > 0.0 && p.lr > 0.0));

    // The adapter is in PEFT layout with PEFT's key names and shapes.
    let adapter = Path::new(job.adapter_dir.as_deref().expect("adapter_dir"));
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(adapter.join("adapter_config.json")).expect("adapter_config.json"),
    )
    .expect("json");
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 8);
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors"))
        .expect("adapter_model.safetensors");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let model_cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny_model().join("config.json")).expect("config"))
            .expect("json");
    let hidden = model_cfg["hidden_size"].as_u64().expect("hidden_size") as usize;
    let layers = model_cfg["num_hidden_layers"].as_u64().expect("layers") as usize;
    let kv_dim = hidden / model_cfg["num_attention_heads"].as_u64().expect("heads") as usize
        * model_cfg["num_key_value_heads"].as_u64().expect("kv heads") as usize;
    assert_eq!(
        tensors.len(),
        layers * 2 * 2,
        "A and B for q_proj and v_proj of every layer"
    );
    for i in 0..layers {
        for (module, out) in [("q_proj", hidden), ("v_proj", kv_dim)] {
            let a = tensors
                .tensor(&format!(
                    "base_model.model.model.layers.{i}.self_attn.{module}.lora_A.weight"
                ))
                .expect("lora_A");
            let b = tensors
                .tensor(&format!(
                    "base_model.model.model.layers.{i}.self_attn.{module}.lora_B.weight"
                ))
                .expect("lora_B");
            assert_eq!(a.shape(), &[8, hidden]);
            assert_eq!(b.shape(), &[out, 8]);
            assert!(
                b.data().iter().any(|&x| x != 0),
                "lora_B of layer {i} {module} was trained"
            );
        }
    }
    // The base model was only read.
    assert!(
        file_digest(&weights) == before,
        "base weights changed on disk"
    );
    // One log with the attempt's separator and the worker's lines.
    let log = std::fs::read_to_string(d.state_dir().join(format!("jobs/{}/job.log", job.id)))
        .expect("job.log");
    assert!(
        log.contains("===== lorad: worker started") && log.contains("fresh start; from the start"),
        "{log}"
    );

    // Subscribers get the log and the checkpoints as events too, replayed from the journal.
    let last_seq = c.status().expect("status").last_seq;
    let mut sub = c.subscribe(Some(job.id), 0).expect("subscribe");
    let (mut log_text, mut checkpoints) = (String::new(), Vec::new());
    while let Ok(Some(event)) = sub.next_timeout(Duration::from_secs(10)) {
        match event.body {
            EventBody::Log { text, .. } => log_text.push_str(&text),
            EventBody::Checkpoint { name, .. } => checkpoints.push(name),
            _ => {}
        }
        // The last lines are published when the worker has exited, just after the job completed.
        if event.seq >= last_seq && log_text.len() >= log.len() {
            break;
        }
    }
    assert!(
        log_text.contains("===== lorad: worker started") && log_text.contains("training finished"),
        "{log_text}"
    );
    assert_eq!(log_text, log, "the log events add up to job.log");
    assert_eq!(checkpoints, vec!["step-80".to_string()]);
}

#[test]
fn cancel_stops_the_worker_and_completed_jobs_refuse() {
    let d = TestDaemon::start();
    let data = d.dir.path().join("data.jsonl");
    write_dataset(&data, 64);
    let c = d.client();
    let long = c
        .submit(spec(tiny_model(), &data, &[("max_steps", "100000")]))
        .expect("submit");
    let (running, _) = wait_for(&c, long.id, Duration::from_secs(120), |s| {
        s == JobState::Running
    });
    let pid = running.worker_pid.expect("worker pid");
    assert!(process_alive(pid));

    let cancelled = c.cancel(long.id).expect("cancel");
    assert_eq!(cancelled.state, JobState::Cancelled);
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "worker {pid} still alive 5 s after cancel"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.get(long.id).expect("get").state, JobState::Cancelled);

    // A completed job cannot be cancelled, and the refusal changes nothing.
    let short = c
        .submit(spec(tiny_model(), &data, &[("max_steps", "2")]))
        .expect("submit");
    let (done, _) = wait_for(&c, short.id, Duration::from_secs(120), |s| s.is_terminal());
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    let err = c.cancel(short.id).expect_err("cancel of a completed job");
    assert_eq!(err.code(), Some(ErrorCode::InvalidState), "{err}");
    assert_eq!(c.get(short.id).expect("get"), done);
}
