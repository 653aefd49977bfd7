//! lorad's side of the speed benchmark (`bench/speed.sh`): real LoRA training steps through the
//! engine's public API, timed per phase (forward loss, backward, optimizer), then the forward and
//! backward of each op class timed in isolation at the model's shapes.
//!
//! ```text
//! cargo run --release -p lorad-engine --example speed -- --model PATH --batch 8 --seq 128 \
//!     [--steps 5] [--warmup 2] [--ids IDS.json] [--reps 5] [--dropout 0.0] --json OUT.json
//! ```
//!
//! The step is the worker's own: `Trainer::step` (forward, backward, gradients summed, clipping,
//! AdamW), on a model loaded by `Llama::from_source` with the worker's allocator settings, the batch
//! coming from an in-memory `Loader` over the given rows (one batch per step, every row in it). LoRA
//! r 16, alpha 32, dropout 0 on q,k,v,o; constant learning rate; f32; CPU; threads from
//! RAYON_NUM_THREADS. Every position but the last of each row predicts the next token. The JSON has
//! the same keys as `bench/speed/torch_speed.py`'s.
use anyhow::{Context, Result};
use candle_core::{Device, Tensor, Var};
use clap::Parser;
use lorad_engine::data::{Loader, Tokenized};
use lorad_engine::lora::{LoraConfig, LoraLinear};
use lorad_engine::model::{Llama, Rope};
use lorad_engine::rng::{rng_for, INIT_STREAM};
use lorad_engine::source::ModelSource;
use lorad_engine::trainer::Trainer;
use lorad_schema::{Schedule, TrainSettings, TARGET_MODULES};
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// Which lorad function implements each op class. The op-class timings call only these, so when the
/// model switches a class to another function (a fused kernel), the matching line here follows it.
mod impls {
    use candle_core::{Result, Tensor};
    use lorad_engine::lora::LoraLinear;

    pub use lorad_engine::ops::apply_rope as rope; // attention: rotary embedding
    pub use lorad_engine::ops::causal_attention as attend; // attention: scores, softmax, values
    pub use lorad_engine::ops::lm_head_nll_sum as cross_entropy; // cross-entropy: LM head + NLL
    pub use lorad_engine::ops::rms_norm; // norms
    pub use lorad_engine::ops::swiglu; // elementwise: the MLP's silu(gate) * up

    /// matmul: one projection (frozen weight, plus the LoRA update where adapted).
    pub fn projection(lin: &LoraLinear, x: &Tensor) -> Result<Tensor> {
        lin.forward(x, None)
    }

    /// elementwise: a residual add.
    pub fn residual(x: &Tensor, y: &Tensor) -> Result<Tensor> {
        x + y
    }
}

#[derive(Parser)]
#[command(about = "lorad's side of bench/speed.sh")]
struct Args {
    /// HF model directory or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Sequences per step.
    #[arg(long)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long)]
    seq: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Token ids, JSON `{"ids": [[..], ..]}` of `batch` rows of `seq` ids (random ids if absent).
    #[arg(long)]
    ids: Option<PathBuf>,
    /// Timed repetitions of each op-class measurement (after one untimed).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// LoRA dropout on the adapters' input.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Where the results go.
    #[arg(long)]
    json: PathBuf,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The batch: ids `[b, t]`; for every position but each row's last, its flat index and the next id;
/// and the rows, for the trainer's loader.
struct Batch {
    ids: Tensor,
    positions: Tensor,
    labels: Tensor,
    rows: Vec<Vec<u32>>,
}

/// Reads (or, without `--ids`, draws) the token ids and makes the batch.
fn batch(args: &Args, vocab: usize, device: &Device) -> Result<Batch> {
    let (b, t) = (args.batch, args.seq);
    let rows: Vec<Vec<u32>> = match &args.ids {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            serde_json::from_value(v["ids"].clone()).context("expected {\"ids\": [[u32]]}")?
        }
        None => {
            let mut rng = rng_for(0, 7);
            let mut id = || rand::Rng::random_range(&mut rng, 0..vocab as u32);
            (0..b).map(|_| (0..t).map(|_| id()).collect()).collect()
        }
    };
    let ok = t >= 2 && rows.len() == b && rows.iter().all(|r| r.len() == t);
    anyhow::ensure!(ok, "ids must be {b} rows of {t} tokens (at least 2)");
    let in_vocab = rows.iter().flatten().all(|&id| (id as usize) < vocab);
    anyhow::ensure!(in_vocab, "an id is not below the vocabulary size {vocab}");
    let (positions, labels): (Vec<u32>, Vec<u32>) = (0..b)
        .flat_map(|r| (0..t - 1).map(move |p| ((r * t + p) as u32, p)))
        .map(|(pos, p)| (pos, rows[pos as usize / t][p + 1]))
        .unzip();
    let targets = labels.len();
    Ok(Batch {
        ids: Tensor::from_vec(rows.concat(), (b, t), device)?,
        positions: Tensor::from_vec(positions, targets, device)?,
        labels: Tensor::from_vec(labels, targets, device)?,
        rows,
    })
}

/// Per phase (fwd, bwd, opt, step) the ms of each timed step, and every step's loss.
type Phases = ([Vec<f64>; 4], Vec<f64>);

/// `Trainer::step`, `steps[0]` untimed then `steps[1]` timed, with the trainer's own phase times.
fn run_steps(trainer: &mut Trainer, steps: [usize; 2]) -> Result<Phases> {
    let (mut times, mut losses): Phases = Default::default();
    for step in 1..=steps[0] + steps[1] {
        let point = trainer.step()?;
        let t = trainer.last_step_times();
        // The step's total also holds the in-memory loader's collation (t.data_wait_ms, well under
        // a millisecond), which no phase column shows.
        let fwd = t.forward_ms;
        let (bwd, optim, total, loss) = (t.backward_ms, t.optimizer_ms, t.step_ms, point.loss);
        let phases = format!("fwd {fwd:.0}, bwd {bwd:.0}, opt {optim:.1}");
        eprintln!("step {step}: loss {loss:.4}, {total:.0} ms ({phases})");
        losses.push(loss);
        if step > steps[0] {
            let timed = times.iter_mut().zip([fwd, bwd, optim, total]);
            timed.for_each(|(v, x)| v.push(x));
        }
    }
    Ok((times, losses))
}

type RunFn = Box<dyn Fn(&[Var]) -> candle_core::Result<Tensor>>;

/// One op timed in isolation: its class, name, how many times a training step runs it, its inputs
/// (tracked, so backward reaches them as it reaches the layers below in the model), the op.
struct Case(&'static str, &'static str, usize, Vec<Var>, RunFn);

/// The op cases of one step at the model's shapes, on layer 0's weights and LoRA pairs.
fn cases(model: &Llama, b: &Batch) -> Result<Vec<Case>> {
    let (cfg, dev) = (model.config().clone(), model.device().clone());
    let ((bs, t), layers) = (b.ids.dims2()?, cfg.num_hidden_layers);
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let (mut base, mut lora) = (HashMap::new(), HashMap::new());
    for (name, w) in model.base_tensors() {
        base.insert(name, w.to_f32(&dev)?);
    }
    for (name, pair) in model.lora_modules() {
        lora.insert(name, pair.clone());
    }
    let weight = |name: &str| base.get(name).cloned().context(format!("no tensor {name}"));
    let act = |width: usize| Var::from_tensor(&Tensor::randn(0f32, 1.0, (bs, t, width), &dev)?);
    let mut out = Vec::new();
    let mut add = |class, name, n, x, run: RunFn| out.push(Case(class, name, n, x, run));

    for (k, module) in TARGET_MODULES.iter().enumerate() {
        // TARGET_MODULES lists the four attention projections first, then the three MLP ones.
        let group = if k < 4 { "self_attn" } else { "mlp" };
        let path = format!("model.layers.0.{group}.{module}");
        let bias = base.get(&format!("{path}.bias")).cloned();
        let (weight, lora) = (weight(&format!("{path}.weight"))?, lora.get(&path).cloned());
        let x = vec![act(weight.dim(1)?)?];
        let lin = LoraLinear {
            weight: weight.into(),
            bias,
            lora,
        };
        let run = Box::new(move |x: &[Var]| impls::projection(&lin, &x[0]));
        add("matmul", module, layers, x, run);
    }

    // Attention without its projections: the model's `Attention::forward` between q/k/v and o.
    let (heads, kv, d) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
    let window = cfg.window();
    let rope = Rope::new(&cfg, t, &dev)?;
    let attention = move |x: &[Var]| -> candle_core::Result<Tensor> {
        let split = |y: &Tensor, h: usize| y.reshape((bs, t, h, d))?.transpose(1, 2)?.contiguous();
        let q = impls::rope(&split(&x[0], heads)?, &rope.cos, &rope.sin)?;
        let k = impls::rope(&split(&x[1], kv)?, &rope.cos, &rope.sin)?;
        let out = impls::attend(&q, &k, &split(&x[2], kv)?, 1.0 / (d as f64).sqrt(), window)?;
        let out = out.transpose(1, 2)?.contiguous()?;
        out.reshape((bs, t, heads * d))
    };
    let qkv = vec![act(heads * d)?, act(kv * d)?, act(kv * d)?];
    add("attention", "attention", layers, qkv, Box::new(attention));

    let (norm, eps) = (
        weight("model.layers.0.input_layernorm.weight")?,
        cfg.rms_norm_eps,
    );
    let rms = Box::new(move |x: &[Var]| impls::rms_norm(&x[0], &norm, eps));
    add("norms", "rms_norm", 2 * layers + 1, vec![act(h)?], rms);
    let residual = Box::new(|x: &[Var]| impls::residual(&x[0], &x[1]));
    let xs = vec![act(h)?, act(h)?];
    add("elementwise", "residual_add", 2 * layers, xs, residual);
    let swiglu = Box::new(|x: &[Var]| impls::swiglu(&x[0], &x[1]));
    let xs = vec![act(inter)?, act(inter)?];
    add("elementwise", "silu_mul", layers, xs, swiglu);

    // As `Llama::loss_sum`: the loss rows picked from the final hidden states, then head and loss.
    let head = match base.get("lm_head.weight") {
        Some(w) => w.clone(),
        None => weight("model.embed_tokens.weight")?,
    };
    let (positions, labels) = (b.positions.clone(), b.labels.clone());
    let ce = Box::new(move |x: &[Var]| {
        let rows = x[0].reshape(((), h))?.index_select(&positions, 0)?;
        impls::cross_entropy(&rows, &head.clone().into(), &labels)
    });
    add("cross_entropy", "lm_head_nll_sum", 1, vec![act(h)?], ce);
    Ok(out)
}

/// Median forward and backward ms of one case: an untimed run, then at least `reps` timed ones,
/// more (up to 50) until a quarter second is spent, so that small ops are not all noise. Backward
/// starts from a gradient of ones, as `Tensor::backward` does for a non-scalar output.
fn time_case(c: &Case, reps: usize) -> candle_core::Result<(f64, f64)> {
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for rep in 0.. {
        if rep > reps && (rep > 50 || started.elapsed().as_secs_f64() > 0.25) {
            break;
        }
        let t = Instant::now();
        let y = (c.4)(&c.3)?;
        let f = ms(t);
        let t = Instant::now();
        let grads = y.backward()?;
        let b = ms(t);
        drop((grads, y));
        if rep > 0 {
            fwd.push(f);
            bwd.push(b);
        }
    }
    Ok((median(&fwd), median(&bwd)))
}

/// Each op case timed, and per class (in the order of first appearance) the forward and backward ms
/// per step.
fn time_op_classes(
    model: &Llama,
    b: &Batch,
    reps: usize,
) -> Result<(
    Vec<serde_json::Value>,
    serde_json::Map<String, serde_json::Value>,
)> {
    let (mut ops, mut classes) = (Vec::new(), Vec::<(&str, [f64; 2])>::new());
    for c in cases(model, b)? {
        let (f, bw) = time_case(&c, reps)?;
        let Case(class, name, n, ..) = c;
        match classes.iter_mut().find(|(k, _)| *k == class) {
            Some((_, sum)) => *sum = [sum[0] + f * n as f64, sum[1] + bw * n as f64],
            None => classes.push((class, [f * n as f64, bw * n as f64])),
        }
        eprintln!("op {class:<13} {name:<15} x{n:<3} fwd {f:8.2} ms  bwd {bw:8.2} ms");
        ops.push(json!({"class": class, "name": name, "per_step": n, "fwd_ms": f, "bwd_ms": bw}));
    }
    let by_class = classes
        .into_iter()
        .map(|(c, [f, b])| (c.to_string(), json!({"fwd": f, "bwd": b})))
        .collect();
    Ok((ops, by_class))
}

fn main() -> Result<()> {
    lorad_engine::runtime::tune_allocator();
    let args = Args::parse();
    let settings = TrainSettings {
        lora_r: 16,
        lora_alpha: 32.0,
        lora_dropout: args.dropout,
        target_modules: TARGET_MODULES[..4].iter().map(|m| m.to_string()).collect(),
        max_seq_len: args.seq as u32,
        batch_size: args.batch as u32,
        grad_accum: 1,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        max_steps: Some((args.warmup + args.steps) as u64),
        device: "cpu".into(),
        ..TrainSettings::default()
    };
    let (device, started) = (Device::Cpu, Instant::now());
    let source = ModelSource::open(&args.model)?;
    let lora = LoraConfig::from_settings(&settings);
    let mut init_rng = rng_for(settings.seed, INIT_STREAM);
    let model = Llama::from_source(&source, &lora, &mut init_rng, args.seq, &device)?;
    let load_s = started.elapsed().as_secs_f64();
    let b = batch(&args, model.config().vocab_size, &device)?;
    let params: usize = model.base_tensors().iter().map(|w| w.1.elem_count()).sum();
    let trainable: usize = model.trainable_vars().iter().map(|v| v.elem_count()).sum();
    let threads = candle_core::utils::get_num_threads();
    let loaded = format!("loaded in {load_s:.1} s, {threads} threads");
    eprintln!("lorad: {params} base + {trainable} LoRA parameters, {loaded}");

    // Every row trained from its second token on, all rows in the one batch of each epoch.
    let trained = |row: &Vec<u32>| (0..row.len()).map(|p| p > 0).collect();
    let rows = b.rows.iter().map(|r| Tokenized {
        ids: r.clone(),
        trained: trained(r),
    });
    let loader = Loader::new(rows.collect(), args.batch, settings.seed, 0);
    let mut trainer = Trainer::new(model, lora, loader, &settings)?;
    let steps = [args.warmup, args.steps];
    let ([fwd, bwd, opt, step], losses) = run_steps(&mut trainer, steps)?;
    let (peak_rss, step_ms) = (lorad_engine::runtime::peak_rss_mb(), median(&step));
    let model = trainer.model();

    let (ops, by_class) = time_op_classes(model, &b, args.reps)?;
    let out = json!({
        "engine": "lorad",
        "version": format!("lorad {} (candle 0.11)", env!("CARGO_PKG_VERSION")),
        "model": args.model.display().to_string(),
        "params": params,
        "trainable_params": trainable,
        "batch": args.batch,
        "seq": args.seq,
        "dropout": args.dropout,
        "threads": threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "load_s": load_s,
        "phases_ms": {"fwd": median(&fwd), "bwd": median(&bwd), "opt": median(&opt),
                      "step": step_ms},
        "step_ms_all": step,
        "tokens_per_s": (args.batch * args.seq) as f64 / (step_ms / 1000.0),
        "peak_rss_mb": peak_rss,
        "peak_rss_mb_after_ops": lorad_engine::runtime::peak_rss_mb(),
        "losses": losses,
        "op_reps": args.reps,
        "ops": ops,
        "op_classes_ms": by_class,
    });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(&out)? + "\n";
    std::fs::write(&args.json, text)
        .with_context(|| format!("cannot write {}", args.json.display()))
}
