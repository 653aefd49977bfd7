//! lorad's side of the memory benchmark (`bench/memory.sh`): the peak resident memory of a real
//! training run, next to what `lorad_engine::memory` predicts for it.
//!
//! ```text
//! cargo run --release -p lorad-engine --example peak -- --model PATH --batch 1 --seq 128 \
//!     [--steps 2] [--r 16] [--dropout 0.0] [--base-weights stored|f32] \
//!     [--gradient-checkpointing auto|on|off] --json OUT.json
//! ```
//!
//! The run is the worker's: the allocator tuned as the worker tunes it, `Trainer::open` on a task
//! (the model, and a JSONL dataset written here of `batch * steps` `{"text"}` examples longer than
//! `seq` tokens, so every micro-batch is `batch x seq`), then `steps` optimizer steps and `finish`
//! (checkpoint and adapter). LoRA r 16 (`--r`), alpha 2r on q,k,v,o (`--targets`); f32 math; the
//! frozen base held as `--base-weights` says and `--gradient-checkpointing` as given (each absent:
//! `TrainSettings`' default, what a job gets); CPU;
//! threads from RAYON_NUM_THREADS; the loader's default workers and prefetch. `--dataset` trains on
//! a given JSONL file instead (to compare with a job the daemon ran on it).
//!
//! Measured (decimal MB, from /proc/self/status): the resident size at start; the growth of opening
//! the model and building its tokenizer once (the tokenizer's part); the high-water mark (VmHWM) once
//! the trainer is open (the load's peak); then, the mark reset each time (`/proc/self/clear_refs`),
//! its value after each step and after `finish`. The run's peak is the largest of them: what
//! getrusage's `ru_maxrss` (a job's `peak_rss_mb`) would say without the resets. Step times too
//! (`bench/scale.sh`): each step's `step_ms`, and `s_per_step`, their median leaving out the first
//! step (the warm-up) when there are several, with `tokens_per_s` = batch x seq / `s_per_step`. The diagnostics flags
//! (`--no-tune`, LORAD_PEAK_SMAPS=1) show where the memory is: see `smaps` and `--no-tune`.
use anyhow::{Context, Result};
use lorad_engine::memory::{estimate_with, WeightFiles};
use lorad_engine::source::ModelSource;
use lorad_engine::trainer::Trainer;
use lorad_engine::TrainTask;
use lorad_schema::{BaseWeights, GradientCheckpointing, JobId, Schedule, TrainSettings};
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
    /// How the frozen base is held: `stored` (as the file stores it, widened a layer at a time) or
    /// `f32` (widened at load). Absent: the settings' default.
    #[arg(long, value_parser = parse_base_weights)]
    base_weights: Option<BaseWeights>,
    /// Gradient checkpointing: `auto`, `on` or `off`. Absent: the settings' default.
    #[arg(long, value_parser = parse_checkpointing)]
    gradient_checkpointing: Option<GradientCheckpointing>,
    /// Write the tiny fixture model (`lorad make-tiny-model`, seed 0) at `--model` first, unless
    /// it is there.
    #[arg(long)]
    make_tiny_model: bool,
    /// Only write the memory estimate (`estimate_mb`, `estimate`) and stop before loading the
    /// model: what bench/scale.sh checks against the machine's memory before a run.
    #[arg(long)]
    estimate_only: bool,
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

/// A settings enum from its wire spelling (`stored`, `on`, ...), as a job's settings file writes it.
fn parse_setting<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|e| e.to_string())
}

fn parse_base_weights(s: &str) -> Result<BaseWeights, String> {
    parse_setting(s)
}

fn parse_checkpointing(s: &str) -> Result<GradientCheckpointing, String> {
    parse_setting(s)
}

/// The wire spelling of a settings enum.
fn spelling<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// The median of the step times, leaving out the first (warm-up) step when there are several.
fn median_step_ms(steps: &[f64]) -> f64 {
    let mut timed: Vec<f64> = match steps {
        [] => return f64::NAN,
        [one] => vec![*one],
        [_, rest @ ..] => rest.to_vec(),
    };
    timed.sort_by(f64::total_cmp);
    let n = timed.len();
    if n % 2 == 1 {
        timed[n / 2]
    } else {
        (timed[n / 2 - 1] + timed[n / 2]) / 2.0
    }
}

/// The estimate's parts in decimal MB.
fn estimate_parts(e: &lorad_engine::memory::MemoryEstimate) -> serde_json::Value {
    let mb = |b: u64| b as f64 / 1e6;
    json!({
        "baseline": mb(e.baseline), "weights": mb(e.weights), "lora": mb(e.lora),
        "optimizer": mb(e.optimizer), "activations": mb(e.activations),
        "workspace": mb(e.workspace), "fragmentation": mb(e.fragmentation),
        "widening": mb(e.widening),
        "loading": mb(e.loading), "total": mb(e.total()),
    })
}

fn write_json(path: &std::path::Path, out: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(out)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
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
    let defaults = TrainSettings::default();
    let settings = TrainSettings {
        base_weights: args.base_weights.unwrap_or(defaults.base_weights),
        gradient_checkpointing: args
            .gradient_checkpointing
            .unwrap_or(defaults.gradient_checkpointing),
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
        ..defaults
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

    if args.estimate_only {
        let e = estimate_with(&cfg, &settings, &files);
        let out = json!({
            "model": args.model.display().to_string(),
            "batch": args.batch,
            "seq": args.seq,
            "base_weights": spelling(&settings.base_weights),
            "gradient_checkpointing": spelling(&settings.gradient_checkpointing),
            "estimate_mb": estimate_parts(&e),
            "estimate": e.to_string(),
        });
        return write_json(&args.json, &out);
    }

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
    let (mut step_peaks, mut step_ms, mut losses) = (Vec::new(), Vec::new(), Vec::new());
    while !trainer.is_done() {
        let p = trainer.step()?;
        step_peaks.push(status_mb("VmHWM"));
        step_ms.push(p.step_ms);
        losses.push(p.loss);
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
    let s_per_step = median_step_ms(&step_ms) / 1000.0;
    let tokens_per_s = (args.batch as f64 * args.seq as f64) / s_per_step;
    let out = json!({
        "model": args.model.display().to_string(),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "r": args.r,
        "dropout": args.dropout,
        "base_weights": spelling(&settings.base_weights),
        "gradient_checkpointing": spelling(&settings.gradient_checkpointing),
        "step_ms": step_ms,
        "s_per_step": s_per_step,
        "tokens_per_s": tokens_per_s,
        "losses": losses,
        "threads": rayon::current_num_threads(),
        "vocab": vocab,
        "weight_files": format!("{files:?}"),
        "estimate_mb": estimate_parts(&e),
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
    write_json(&args.json, &out)?;
    eprintln!(
        "estimate {e}; measured peak {measured:.1} MB; {s_per_step:.2} s/step, {tokens_per_s:.1} tokens/s"
    );
    Ok(())
}
