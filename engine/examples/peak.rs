//! lorad's side of the memory benchmark (`bench/memory.sh`): the peak resident memory of a real
//! training run, next to what `lorad_engine::memory` predicts for it.
//!
//! ```text
//! cargo run --release -p lorad-engine --example peak -- --model PATH --batch 1 --seq 128 \
//!     [--steps 2] [--r 16] [--dropout 0.0] --json OUT.json
//! ```
//!
//! The run is the worker's: the allocator tuned as the worker tunes it, `Trainer::open` on a task
//! (the model, and a JSONL dataset written here of `batch * steps` `{"text"}` examples longer than
//! `seq` tokens, so every micro-batch is `batch x seq`), then `steps` optimizer steps and `finish`
//! (checkpoint and adapter). LoRA r 16 (`--r`), alpha 2r on q,k,v,o (`--targets`); f32; CPU;
//! threads from RAYON_NUM_THREADS; the loader's default workers and prefetch. `--dataset` trains on
//! a given JSONL file instead (to compare with a job the daemon ran on it).
//!
//! Measured (decimal MB, from /proc/self/status): the resident size at start; the growth of opening
//! the model and building its tokenizer once (the tokenizer's part); the high-water mark (VmHWM) once
//! the trainer is open (the load's peak); then, the mark reset each time (`/proc/self/clear_refs`),
//! its value after each step and after `finish`. The run's peak is the largest of them: what
//! getrusage's `ru_maxrss` (a job's `peak_rss_mb`) would say without the resets. The diagnostics flags
//! (`--no-tune`, LORAD_PEAK_SMAPS=1) show where the memory is: see `smaps` and `--no-tune`.
use anyhow::{Context, Result};
use lorad_engine::memory::{estimate_with, WeightFiles};
use lorad_engine::source::ModelSource;
use lorad_engine::trainer::Trainer;
use lorad_engine::TrainTask;
use lorad_schema::{JobId, Schedule, TrainSettings};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Parser)]
#[command(about = "lorad's side of bench/memory.sh")]
struct Args {
    /// HF model directory or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Sequences per micro-batch.
    #[arg(long)]
    batch: u32,
    /// Tokens per sequence (max_seq_len).
    #[arg(long)]
    seq: u32,
    /// Optimizer steps.
    #[arg(long, default_value_t = 2)]
    steps: u64,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    r: u32,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Adapted modules, comma-separated.
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj",
        value_delimiter = ','
    )]
    targets: Vec<String>,
    /// Train on this JSONL dataset instead of generated rows of `seq` tokens (to compare with a job
    /// the daemon ran on it).
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Write the tiny fixture model (`lorad make-tiny-model`, seed 0) at `--model` first, unless
    /// it is there.
    #[arg(long)]
    make_tiny_model: bool,
    /// Leave glibc's allocator as it is (diagnostics: with MALLOC_MMAP_THRESHOLD_ set low, every
    /// activation is its own mapping and the peak is the live memory, without heap fragmentation).
    #[arg(long)]
    no_tune: bool,
    /// Where the job's files go (a temporary directory if absent).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Where the results go.
    #[arg(long)]
    json: PathBuf,
}

/// A field of /proc/self/status in MB (the kernel reports kB).
fn status_mb(field: &str) -> f64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb * 1024.0 / 1e6)
}

/// With LORAD_PEAK_SMAPS set, the mappings holding the most resident memory (diagnostics).
fn smaps(when: &str) {
    if std::env::var_os("LORAD_PEAK_SMAPS").is_none() {
        return;
    }
    let text = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (mut maps, mut name) = (Vec::new(), String::new());
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            name = format!("{} {}", fields[0], fields.get(5).unwrap_or(&"[anon]"));
        } else if fields.first() == Some(&"Rss:") {
            let kb: u64 = fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            maps.push((kb, name.clone()));
        }
    }
    maps.sort_by(|a, b| b.cmp(a));
    let total: u64 = maps.iter().map(|m| m.0).sum();
    eprintln!("smaps {when}: {total} kB resident");
    for (kb, name) in maps.iter().take(12) {
        eprintln!("  {kb:>9} kB  {name}");
    }
}

/// Resets the high-water mark of the resident size (VmHWM) to the current size.
fn reset_hwm() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("cannot reset VmHWM")
}

/// `examples` lines of `{"text": ...}`, each of `words` space-separated words `t<N>` (in the
/// vocabulary of the word-level benchmark tokenizers, a few byte-level tokens each otherwise).
fn write_dataset(path: &std::path::Path, examples: usize, words: usize) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = 12345u64;
    for _ in 0..examples {
        let text: Vec<String> = (0..words)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                format!("t{}", 3 + (x >> 33) % 997)
            })
            .collect();
        writeln!(out, "{}", json!({ "text": text.join(" ") }))?;
    }
    Ok(out.flush()?)
}

fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    if !args.no_tune {
        lorad_engine::runtime::tune_allocator();
    }
    let start_mb = status_mb("VmRSS");
    if args.make_tiny_model && !args.model.join("config.json").is_file() {
        lorad_engine::tiny::make_tiny_model(&args.model, 0)?;
    }
    let tmp = tempfile::tempdir()?;
    let work = args
        .workdir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
    let dataset = match &args.dataset {
        Some(path) => path.clone(),
        None => {
            let path = work.join("data.jsonl");
            let examples = (args.batch as u64 * args.steps) as usize;
            write_dataset(&path, examples, 2 * args.seq as usize)?;
            path
        }
    };
    let settings = TrainSettings {
        lora_r: args.r,
        lora_alpha: 2.0 * args.r as f64,
        lora_dropout: args.dropout,
        target_modules: args.targets.clone(),
        max_seq_len: args.seq,
        batch_size: args.batch,
        grad_accum: 1,
        schedule: Schedule::Constant,
        max_steps: Some(args.steps),
        device: "cpu".into(),
        ..TrainSettings::default()
    };

    // The tokenizer's part: the resident growth of opening the model and building its tokenizer
    // (freed again; the trainer builds its own).
    smaps("at start");
    let before_tok_mb = status_mb("VmRSS");
    let source = ModelSource::open(&args.model)?;
    let tokenizer = source.tokenizer()?;
    let vocab = tokenizer.tokenizer.get_vocab_size(true);
    let tokenizer_mb = status_mb("VmRSS") - before_tok_mb;
    drop(tokenizer);
    let cfg = source.config().clone();
    let files = WeightFiles::of(&source)?;
    drop(source);

    let task = TrainTask {
        job: JobId(1),
        base_model: args.model.clone(),
        dataset: dataset.clone(),
        adapter_dir: work.join("adapter"),
        job_dir: work.join("job"),
        settings: settings.clone(),
        resume_from: None,
        pin_resume: false,
    };
    let max_line = settings.max_line_bytes as usize;
    let open = |p: &std::path::Path| lorad_engine::data::open_jsonl(p, max_line);
    let mut trainer = Trainer::open(&task, &open)?;
    let (open_rss_mb, load_peak_mb) = (status_mb("VmRSS"), status_mb("VmHWM"));
    smaps("after open");
    eprintln!("opened: rss {open_rss_mb:.1} MB, load peak {load_peak_mb:.1} MB");

    reset_hwm()?;
    let mut step_peaks = Vec::new();
    while !trainer.is_done() {
        let p = trainer.step()?;
        step_peaks.push(status_mb("VmHWM"));
        eprintln!(
            "step {}: loss {:.4}, {:.0} ms, peak {:.1} MB",
            p.step,
            p.loss,
            p.step_ms,
            status_mb("VmHWM")
        );
    }
    let step_peak_mb = status_mb("VmHWM");
    smaps("after the steps");
    reset_hwm()?;
    trainer.finish()?;
    let finish_peak_mb = status_mb("VmHWM");

    let e = estimate_with(&cfg, &settings, &files);
    let mb = |b: u64| b as f64 / 1e6;
    let measured = load_peak_mb.max(step_peak_mb).max(finish_peak_mb);
    let out = json!({
        "model": args.model.display().to_string(),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "r": args.r,
        "dropout": args.dropout,
        "threads": rayon::current_num_threads(),
        "vocab": vocab,
        "weight_files": format!("{files:?}"),
        "estimate_mb": {
            "baseline": mb(e.baseline), "weights": mb(e.weights), "lora": mb(e.lora),
            "optimizer": mb(e.optimizer), "activations": mb(e.activations),
            "workspace": mb(e.workspace), "fragmentation": mb(e.fragmentation),
            "loading": mb(e.loading), "total": mb(e.total()),
        },
        "estimate": e.to_string(),
        "measured_mb": {
            "start_rss": start_mb,
            "tokenizer": tokenizer_mb,
            "open_rss": open_rss_mb,
            "load_peak": load_peak_mb,
            "step_peaks": step_peaks,
            "step_peak": step_peak_mb,
            "finish_peak": finish_peak_mb,
            "peak": measured,
        },
        "ratio": mb(e.total()) / measured,
    });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&out)? + "\n")
        .with_context(|| format!("cannot write {}", args.json.display()))?;
    eprintln!("estimate {e}; measured peak {measured:.1} MB");
    Ok(())
}
