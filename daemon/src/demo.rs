//! `lorad demo`: a private daemon on a temp socket, the tiny model and a small built-in dataset; submits
//! one job, shows its progress until it completes, and prints where the adapter is.
use crate::config::Config;
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use lorad_schema::{EventBody, JobId, JobSpec, JobState};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Overrides of `basic-fine-tune` that make the tiny random model learn the demo dataset in seconds:
/// a constant, high learning rate and short sequences. The integration tests submit the same job.
pub const DEMO_OVERRIDES: &[(&str, &str)] = &[
    ("lr", "0.01"),
    ("max_steps", "80"),
    ("batch_size", "8"),
    ("warmup_steps", "0"),
    ("schedule", "constant"),
    ("lora_dropout", "0"),
    ("max_seq_len", "64"),
];

pub use lorad_engine::tiny::{demo_dataset, write_dataset};

/// Runs the demo in `dir` (a new temp dir if None), keeping its files.
pub fn run(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => tempfile::Builder::new()
            .prefix("lorad-demo-")
            .tempdir()?
            .keep(),
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();

    let model = dir.join("tiny-model");
    let data = dir.join("demo.jsonl");
    println!("lorad demo in {}", dir.display());
    crate::worker::tiny::make_tiny_model(&model, 0).context("cannot make the tiny model")?;
    write_dataset(&data, 64)?;
    println!("  model:   {} (random tiny Llama)", model.display());
    println!(
        "  dataset: {} ({} lines)",
        data.display(),
        demo_dataset().len()
    );

    let config = Config::new(dir.join("lorad.sock"), dir.join("state"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = crate::server::bind(&config.socket, config.socket_mode, None)?;
        let socket = config.socket.clone();
        let shutdown = CancellationToken::new();
        let daemon = tokio::spawn(crate::run(config, listener, shutdown.clone()));
        let result = drive(&socket, &model, &data, &dir).await;
        shutdown.cancel();
        let _ = daemon.await;
        let _ = std::fs::remove_file(&socket);
        result
    })?;
    println!("demo finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn drive(socket: &Path, model: &Path, data: &Path, dir: &Path) -> anyhow::Result<()> {
    let client = lorad_client::Client::connect(socket).await?;
    require_templates(&client).await?;
    let overrides: BTreeMap<String, String> = DEMO_OVERRIDES
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let spec = JobSpec {
        name: Some("demo".into()),
        template: "basic-fine-tune".into(),
        base_model: model.display().to_string(),
        dataset: data.display().to_string(),
        overrides,
        ..JobSpec::default()
    };
    let job = client.submit(spec).await?;
    println!(
        "submitted job {} (template {}, {} overrides)",
        job.id,
        job.template,
        job.overrides.len()
    );
    let final_state = watch(&client, job.id).await?;
    let job = client.get(job.id).await?;
    if final_state != JobState::Completed {
        bail!(
            "job {} ended {}: {}",
            job.id,
            final_state,
            job.reason.unwrap_or_default()
        );
    }
    let points = client.metrics(job.id, None).await?;
    if let (Some(first), Some(last)) = (points.first(), points.last()) {
        println!(
            "loss {:.3} -> {:.3} over {} steps",
            first.loss,
            last.loss,
            points.len()
        );
    }
    println!(
        "adapter (HF PEFT layout): {}",
        job.adapter_dir.clone().unwrap_or(job.output_dir.clone())
    );
    // Export through the bundled exporter plugins, as `loractl export` does.
    for (format, name) in [("zip", "demo-adapter.zip"), ("merged", "demo-merged")] {
        let out = dir.join(name);
        let info = client
            .export(job.id, format, &out.display().to_string(), None)
            .await
            .with_context(|| format!("export {format}"))?;
        println!(
            "export {format}: {} ({} files, {:.2} s)",
            info.out,
            info.files.len(),
            info.elapsed_s
        );
    }
    Ok(())
}

/// The demo's template comes from the bundled templates plugin: say where it was looked for when
/// it is not loaded.
async fn require_templates(client: &lorad_client::Client) -> anyhow::Result<()> {
    let templates = client.templates().await?;
    if templates.iter().any(|t| t.name == "basic-fine-tune") {
        return Ok(());
    }
    let plugins = client.status().await?.plugins;
    let rejected: Vec<String> = plugins
        .rejected
        .iter()
        .map(|r| format!("\n  rejected {}: {}", r.path, r.reason))
        .collect();
    bail!(
        "the templates plugin is not loaded (searched {}){}\nbuild the bundled plugins next to lorad: cargo build --release --workspace",
        plugins.dirs.join(", "),
        rejected.concat()
    )
}

/// Shows the job's progress as a bar and its state changes as lines, until it ends; returns how.
async fn watch(client: &lorad_client::Client, job: JobId) -> anyhow::Result<JobState> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("  [{bar:30}] {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut sub = client.subscribe(Some(job), 0).await?;
    let final_state = loop {
        let Some(event) = sub.next().await else {
            bail!("the daemon closed the connection")
        };
        match event.body {
            EventBody::Metrics { point } => {
                if bar.length() == Some(0) {
                    let total = client.get(job).await?.progress.total_steps;
                    bar.set_length(total);
                }
                bar.set_position(point.step);
                bar.set_message(format!(
                    "loss {:.3}  {:.0} tok/s",
                    point.loss, point.tokens_per_s
                ));
            }
            EventBody::StateChanged { to, reason, .. } => {
                let line = format!(
                    "  state: {to}{}",
                    reason.map(|r| format!(" ({r})")).unwrap_or_default()
                );
                bar.suspend(|| println!("{line}"));
                if to.is_terminal() {
                    break to;
                }
            }
            _ => {}
        }
    };
    bar.finish_and_clear();
    Ok(final_state)
}
