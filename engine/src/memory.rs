//! How much memory a LoRA job will need at its peak, before it runs: so that a job that cannot fit is
//! refused (or given a smaller batch) at submit instead of being killed by the kernel half-way.
//!
//! The prediction follows what the CPU engine allocates today, term by term; each term's doc comment
//! says what it holds and why it is alive at the peak. Nothing is fitted per model: the few measured
//! constants (the process itself, the tokenizer's bytes per entry, the heap the allocator cannot
//! reuse) are parts of every job, each measured on its own (`examples/peak.rs`; the table in
//! bench/RESULTS.md, "Memory estimate vs measured peak RSS (issue 15)", comes from `bench/memory.sh`).
//!
//! Where the peak is. A job's resident memory has two high points:
//! - at load, when the base weights are nearly all read and one more tensor is in flight: safetensors
//!   (`tensor_file`) and GGUF tensors are read one at a time with `read(2)` and turned into tensors
//!   (and, widening at load, into f32) before the next is read; the files stay in the page cache,
//!   which is not the process's RSS;
//! - at the end of a micro-batch's forward pass and through its backward, when every activation the
//!   graph keeps for backward is alive together with the gradients being computed.
//!
//! Base weights, the process and the tokenizer are resident through both. The estimate is the sum of
//! the step's parts, plus `loading` for however far the loader's transient goes above the step's own
//! extra memory, so that [`MemoryEstimate::total`] is the higher of the two peaks, not the sum of
//! everything ever allocated.
//!
//! The allocator matters: the worker's `runtime::tune_allocator` keeps freed heap memory (buffers
//! under 32 MiB) instead of returning it, so memory freed by one phase is resident until a later one
//! reuses it. That is why the second step peaks a little higher than the first
//! (`MemoryEstimate::fragmentation`).
//!
//! Not modelled: checkpoint writing and the adapter (copies of the LoRA weights and moments, far
//! below the step's peak), and devices other than the CPU.
use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::source::ModelSource;
use lorad_schema::TrainSettings;
use std::fmt;

/// Bytes of one f32: the engine trains in f32 (base weights are widened on load).
const F32: u64 = 4;

/// The process itself: the binary's and libraries' touched pages, the threads' stacks and the rayon
/// and loader threads' malloc arenas. Measured by `examples/peak.rs` (LORAD_PEAK_SMAPS=1) as
/// everything resident outside the main heap and the model's own large buffers: 12.6 MB with the tiny
/// model after its steps (4.7 MB at start), of which the binary about 8.6 MB. The `lorad` worker is a
/// larger binary with a control channel and tracing: on the same job (`lorad demo`'s) it peaked 2.5 MB
/// above the example (43.9 against 41.4 MB), hence 15.
pub const PROCESS_BYTES: u64 = 15_000_000;

/// Resident bytes per vocabulary entry of the tokenizer (token strings both ways, merges, added
/// tokens) together with what opening the model leaves in the heap (the tokenizer.json text, a GGUF
/// file's metadata arrays). Measured by `examples/peak.rs` as the resident growth of opening the model
/// and building its tokenizer: 0.6 MB for the tiny 1k byte-level BPE, 17.4 MB for a 32k word-level
/// vocabulary, 28.0 MB for SmolLM2's 49k BPE from GGUF metadata: 545-590 bytes per entry.
pub const TOKENIZER_BYTES_PER_TOKEN: u64 = 570;

/// Heap the allocator cannot reuse once a step has run, in activation buffers (see
/// `MemoryEstimate::fragmentation`).
const FRAGMENTATION_BUFFERS: u64 = 4;

/// glibc's mmap threshold as the worker sets it (`runtime::tune_allocator`): larger buffers are
/// mappings of their own, returned whole when freed, so they leave no holes in the heap.
const MMAP_THRESHOLD: u64 = 32 << 20;

/// A job's predicted peak memory, by part (bytes). The parts add up to the peak: see the module
/// documentation for where it is and why each part is alive there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The process and the tokenizer ([`PROCESS_BYTES`], [`TOKENIZER_BYTES_PER_TOKEN`]): resident
    /// from before loading to the end, whatever the model's size.
    pub baseline: u64,
    /// Base weights as held: in f32 (`base_weights=f32`, or a file that is f32 already), or with
    /// `base_weights=stored` at the file's width (2 bytes a parameter for bf16/f16, the GGUF file's
    /// bytes per parameter for quantized blocks); with the untied LM head, Qwen2's q/k/v biases and
    /// the RoPE tables for `max_seq_len` positions.
    pub weights: u64,
    /// Stored weights widened for the step: the pooled scratch buffers a layer's weight is widened
    /// into for each product, and the LM head a vocabulary chunk at a time (two buffers: the size of
    /// the largest layer matrix, one of them the head's chunk if that is larger). 0 for f32 weights.
    pub widening: u64,
    /// The LoRA A/B matrices in f32, and two more copies of their size at the peak: the step's summed
    /// gradients (`Trainer::gradients` starts them as zeros before the first forward pass) and the
    /// gradients the backward pass is storing for every LoRA variable.
    pub lora: u64,
    /// AdamW's first and second moments: two f32 tensors per LoRA matrix.
    pub optimizer: u64,
    /// What one micro-batch's graph keeps alive for backward at its end: per layer the norm outputs,
    /// the q/k/v/o and MLP projections, the RoPE'd q and k, the contiguous v and attention output,
    /// the attention's row log-sum-exp, the residual sums, the SwiGLU output (when down_proj is
    /// adapted; else it is not kept), and with LoRA dropout
    /// one mask per adapted module; plus the embedding lookup, the final norm, the rows of the loss
    /// and their eagerly computed gradient. `grad_accum` does not multiply it: each micro-batch's
    /// graph is dropped before the next forward pass.
    pub activations: u64,
    /// The transient on top of the activations at the step's high point, the largest of: one chunk
    /// of logits of the chunked LM head + cross-entropy (end of forward), the MLP's backward
    /// (SwiGLU's incoming gradient and its two outputs), the attention block's backward (its
    /// gradients in flight, the per-thread tiles, and a LoRA layer's merged weight or dropout
    /// buffers).
    pub workspace: u64,
    /// Heap the allocator cannot reuse once a step has run. With the worker's allocator settings
    /// (freed memory is kept; buffers under 32 MiB come from the heap) the small tensors that outlive
    /// a step (AdamW's new moments, the step's gradient sums) settle in the holes the step's
    /// activations left, and the next step's largest heap buffers partly come from fresh memory:
    /// the second step peaks higher than the first, then stays (measured over 5 steps). Counted as
    /// four of a layer's widest activation buffer (`[n, intermediate]`), at most the mmap threshold
    /// each: the second step's growth measured 52-59 MB on the 162M model at 8x128 (50 by this),
    /// 29 at 4x128 (25), 23-24 MB on SmolLM2 at 4x256 (25), 1-40 MB on the 1.1B shape at 4x512
    /// (134). With every buffer mmap'd instead (`MALLOC_MMAP_THRESHOLD_=65536`, no tuning) the 162M
    /// model's 8x128 step peaks at 1752 MB, which the other parts predict to 1% (1767 MB).
    pub fragmentation: u64,
    /// How far loading the weights goes above the step's own extra (`lora + optimizer +
    /// activations + workspace + fragmentation`); 0 when the step is the higher peak. Tensors are
    /// read one at a time (safetensors and GGUF), so loading costs about one tensor beyond the
    /// weights.
    pub loading: u64,
}

impl MemoryEstimate {
    /// The predicted peak resident memory: the sum of the parts.
    pub fn total(&self) -> u64 {
        self.baseline
            + self.weights
            + self.widening
            + self.lora
            + self.optimizer
            + self.activations
            + self.workspace
            + self.fragmentation
            + self.loading
    }
}

impl fmt::Display for MemoryEstimate {
    /// `5.1 GB (process and tokenizer 30 MB, weights 4.4 GB, LoRA 54 MB, ...)`: the total, then
    /// every non-zero part.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = [
            ("process and tokenizer", self.baseline),
            ("weights", self.weights),
            ("widening", self.widening),
            ("LoRA", self.lora),
            ("optimizer", self.optimizer),
            ("activations", self.activations),
            ("workspace", self.workspace),
            ("fragmentation", self.fragmentation),
            ("loading", self.loading),
        ];
        let shown: Vec<String> = parts
            .iter()
            .filter(|(_, b)| *b > 0)
            .map(|(name, b)| format!("{name} {}", human(*b)))
            .collect();
        write!(f, "{} ({})", human(self.total()), shown.join(", "))
    }
}

/// How the base weights are stored, which decides how much the loader holds at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// HF safetensors files of these sizes in bytes, read a tensor at a time.
    Safetensors(Vec<u64>),
    /// A GGUF file of this size in bytes: tensors read and dequantized one at a time.
    Gguf(u64),
}

impl WeightFiles {
    /// What [`estimate`] assumes without a look at the files: one safetensors file of 16-bit weights,
    /// the usual form of a checkpoint on the HF hub.
    pub fn assumed(cfg: &ModelConfig) -> Self {
        WeightFiles::Safetensors(vec![weight_elems(cfg) * 2])
    }

    /// The weight files of an opened model (their sizes; nothing is read).
    pub fn of(source: &ModelSource) -> Result<Self, EngineError> {
        let size = |p: &std::path::Path| -> Result<u64, EngineError> {
            Ok(std::fs::metadata(p)
                .map_err(|e| EngineError::io(p, e))?
                .len())
        };
        match source {
            ModelSource::HfDir { dir, .. } => {
                let files = crate::weights::weight_files(dir)?;
                Ok(WeightFiles::Safetensors(
                    files.iter().map(|f| size(f)).collect::<Result<_, _>>()?,
                ))
            }
            ModelSource::Gguf(g) => Ok(WeightFiles::Gguf(size(g.path())?)),
        }
    }

    /// Bytes per base parameter as stored (4 for f32 files, ~2 for bf16/f16, less for GGUF blocks).
    fn width(&self, cfg: &ModelConfig) -> f64 {
        let bytes: u64 = match self {
            WeightFiles::Gguf(b) => *b,
            WeightFiles::Safetensors(files) => files.iter().sum(),
        };
        bytes as f64 / weight_elems(cfg).max(1) as f64
    }

    /// The most the loader holds beyond the weights it ends with, in bytes: safetensors and GGUF
    /// tensors are both read one at a time (`tensor_file`, `gguf`), so this is about one tensor.
    fn load_excess(&self, cfg: &ModelConfig, stored: bool) -> u64 {
        let elems = weight_elems(cfg).max(1);
        // The largest tensor: the embedding (or the LM head, of the same shape).
        let largest = tensor_sizes(cfg).iter().map(|&(e, _)| e).max().unwrap_or(0);
        let at = |e: u64, width: f64| (e as f64 * width) as u64;
        match self {
            // Its blocks, read, next to what is kept: the blocks themselves (stored) or their f32
            // values; widened, q and k are also reordered into HF's head layout, a second f32 copy
            // while the first is alive.
            WeightFiles::Gguf(_) if stored => at(largest, self.width(cfg)),
            WeightFiles::Gguf(bytes) => {
                let width = *bytes as f64 / elems as f64;
                let d = cfg.head_dim() as u64;
                let q = (cfg.num_attention_heads as u64 * d) * cfg.hidden_size as u64;
                at(largest, width).max(q * F32 + at(q, width))
            }
            // A tensor's bytes as read, then the tensor made from them (the bytes dropped), then
            // (widening at load) its f32 copy next to it: one stored-width tensor beyond what is
            // kept at every point, at worst the largest one read last.
            WeightFiles::Safetensors(_) => at(largest, self.width(cfg)),
        }
    }
}

/// The shapes every term is computed from.
struct Dims {
    /// Tokens of a micro-batch (`batch_size * max_seq_len`).
    n: u64,
    /// Sequence length.
    t: u64,
    hidden: u64,
    /// Query width (`heads * head_dim`).
    q: u64,
    /// Key/value width (`kv_heads * head_dim`).
    kv: u64,
    inter: u64,
    heads: u64,
    layers: u64,
    vocab: u64,
    /// LoRA dropout is on: every adapted module keeps a mask of its input's size.
    dropout: bool,
    /// Qwen2: q, k and v have biases.
    bias: bool,
    /// down_proj has an adapter: its input (the SwiGLU output) is kept for the adapter's gradients.
    /// Without one it runs fused with the SwiGLU (`lorad_kernels::swiglu_linear`) and is not.
    down_adapted: bool,
}

impl Dims {
    fn new(cfg: &ModelConfig, s: &TrainSettings) -> Self {
        let d = cfg.head_dim() as u64;
        let t = u64::from(s.max_seq_len.max(1));
        Dims {
            n: u64::from(s.batch_size.max(1)) * t,
            t,
            hidden: cfg.hidden_size as u64,
            q: cfg.num_attention_heads as u64 * d,
            kv: cfg.kv_heads() as u64 * d,
            inter: cfg.intermediate_size as u64,
            heads: cfg.num_attention_heads as u64,
            layers: cfg.num_hidden_layers as u64,
            vocab: cfg.vocab_size as u64,
            dropout: s.lora_dropout > 0.0,
            bias: has_qkv_bias(cfg),
            down_adapted: s.target_modules.iter().any(|m| m == "down_proj"),
        }
    }
}

/// Qwen2 checkpoints carry q/k/v biases (the loader takes them when present).
fn has_qkv_bias(cfg: &ModelConfig) -> bool {
    cfg.model_type.as_deref() == Some("qwen2")
}

/// Every base tensor as (elements, how many of that tensor), as the model holds them.
fn tensor_sizes(cfg: &ModelConfig) -> Vec<(u64, u64)> {
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let d = cfg.head_dim() as u64;
    let (q, kv) = (
        cfg.num_attention_heads as u64 * d,
        cfg.kv_heads() as u64 * d,
    );
    let layers = cfg.num_hidden_layers as u64;
    let embed = cfg.vocab_size as u64 * h;
    let heads = if cfg.tie_word_embeddings { 1 } else { 2 };
    let mut out = vec![
        (embed, heads),
        // q and o; k and v; gate, up, down; the two norms; the final norm.
        (h * q, 2 * layers),
        (h * kv, 2 * layers),
        (h * i, 3 * layers),
        (h, 2 * layers + 1),
    ];
    if has_qkv_bias(cfg) {
        out.extend([(q, layers), (kv, 2 * layers)]);
    }
    out
}

/// Elements of the base weights.
fn weight_elems(cfg: &ModelConfig) -> u64 {
    tensor_sizes(cfg).iter().map(|(e, n)| e * n).sum()
}

/// The adapted modules of one layer, as (input width, output width), in `TARGET_MODULES` order.
fn targets(cfg: &ModelConfig, s: &TrainSettings) -> Vec<(u64, u64)> {
    lorad_schema::TARGET_MODULES
        .iter()
        .filter(|m| s.target_modules.iter().any(|t| t == *m))
        .filter_map(|m| cfg.module_dims(m))
        .map(|(i, o)| (i as u64, o as u64))
        .collect()
}

/// LoRA parameters of the whole model: `r * (in + out)` per adapted module and layer.
fn lora_elems(cfg: &ModelConfig, s: &TrainSettings) -> u64 {
    let r = u64::from(s.lora_r.max(1));
    let per_layer: u64 = targets(cfg, s).iter().map(|(i, o)| r * (i + o)).sum();
    per_layer * cfg.num_hidden_layers as u64
}

/// Floats per token that one decoder layer keeps for backward (see `MemoryEstimate::activations`).
fn layer_floats_per_token(d: &Dims, targets: &[(u64, u64)]) -> u64 {
    let (h, q, kv, i) = (d.hidden, d.q, d.kv, d.inter);
    // input norm, o projection, x + attn, post norm, down projection, x + mlp.
    let residual = 6 * h;
    // q/k/v projections, RoPE'd q and k, v made contiguous, the attention's output and its
    // contiguous [b, t, heads * d] copy (o's input).
    let attention = (q + kv + kv) + (q + kv) + kv + 2 * q;
    let lse = d.heads;
    // gate, up, and silu(gate) * up when down_proj's adapter needs it.
    let mlp = if d.down_adapted { 3 * i } else { 2 * i };
    let masks: u64 = match d.dropout {
        true => targets.iter().map(|(input, _)| input).sum(),
        false => 0,
    };
    let bias = if d.bias { q + 2 * kv } else { 0 };
    residual + attention + lse + mlp + masks + bias
}

/// How the fused LM head + cross-entropy cuts its work (`lorad_kernels::ce::default_chunks`): rows of
/// the loss (at most `n`) by vocabulary entries.
fn ce_chunks(d: &Dims) -> lorad_kernels::ce::Chunks {
    lorad_kernels::ce::default_chunks(d.n as usize, d.vocab as usize, d.hidden as usize)
}

/// Query rows per attention tile (`lorad_kernels::attention`'s BLOCK).
const ATTENTION_BLOCK: u64 = 64;

/// Threads assumed for the attention's per-thread tiles (the worker's rayon pool has one per core).
/// Kept fixed so that the estimate is a pure function of the model and the settings; the tiles are
/// under 1.1 MB per thread up to 2048 tokens, so a larger machine changes little.
const ATTENTION_THREADS: u64 = 16;

/// The largest transient above the activations, in bytes (see `MemoryEstimate::workspace`).
fn workspace_bytes(d: &Dims, targets: &[(u64, u64)]) -> u64 {
    let (n, h, q, kv, i) = (d.n, d.hidden, d.q, d.kv, d.inter);
    // End of forward: one block of logits, and the head's row of each row's label.
    let c = ce_chunks(d);
    let ce = (c.rows as u64) * (c.vocab as u64) + (c.rows as u64) * h;
    // MLP backward: dL/d(swiglu) and the [2, n, inter] gradient of gate and up made from it, next
    // to the residual stream's gradient.
    let mlp = 3 * n * i + n * h;
    // A LoRA layer's own transient in either pass: without dropout the merged weight
    // `W + s * B @ A` ([out, in]), with dropout the masked input and its gradient ([n, in] each).
    let lora = targets
        .iter()
        .map(|&(input, out)| match d.dropout {
            true => 2 * n * input,
            false => input * out,
        })
        .max()
        .unwrap_or(0);
    // Attention backward: the residual gradient, dL/d(attention output) made contiguous, dq, dk,
    // dv, and q's gradient on its way back through RoPE and the head transpose, plus each thread's
    // probability and dS tiles; the LoRA layers of o and q run inside it.
    let tiles = ATTENTION_THREADS * (2 * ATTENTION_BLOCK * d.t + d.t);
    let attention = n * h + 2 * n * q + (n * q + 2 * n * kv) + n * q + tiles + lora;
    ce.max(mlp).max(attention) * F32
}

/// See `MemoryEstimate::fragmentation`.
fn fragmentation_bytes(d: &Dims) -> u64 {
    // A layer's widest activation buffer; a hole in the heap is never larger than the mmap
    // threshold, since larger buffers are mappings of their own.
    let widest = d.n * d.inter.max(d.q).max(d.hidden) * F32;
    FRAGMENTATION_BUFFERS * widest.min(MMAP_THRESHOLD)
}

/// Pure: the peak of one training run of `cfg` with `s`, on the CPU engine as it is today (base
/// weights widened to f32 in memory, f32 LoRA, AdamW moments, gradients), for weights stored as
/// [`WeightFiles::assumed`] (16-bit safetensors). [`estimate_with`] takes the real files.
///
/// Micro-batches are taken to be `batch_size` rows of `max_seq_len` tokens: a batch is padded to its
/// longest row, so a dataset of short examples peaks lower. `dtype` does not enter: only f32 is
/// trained today (`preflight` refuses the others).
pub fn estimate(cfg: &ModelConfig, s: &TrainSettings) -> MemoryEstimate {
    estimate_with(cfg, s, &WeightFiles::assumed(cfg))
}

/// Pure: [`estimate`] for weights stored as `files` (see [`WeightFiles::of`]).
pub fn estimate_with(cfg: &ModelConfig, s: &TrainSettings, files: &WeightFiles) -> MemoryEstimate {
    let d = Dims::new(cfg, s);
    let targets = targets(cfg, s);
    let lora = lora_elems(cfg, s);
    let rope = 2 * d.t * cfg.head_dim() as u64;
    // Around the layers: the embedding lookup and the final norm ([n, hidden] each), the loss rows
    // picked from it and their gradient, computed in the forward pass ([rows, hidden] each, rows <= n).
    let outside = 2 * d.n * d.hidden + 2 * d.n * d.hidden;
    // With gradient checkpointing each layer keeps only its input `[n, hidden]`, and one layer's
    // activations live at a time (the one being recomputed), plus its output's gradient.
    let per_layer = layer_floats_per_token(&d, &targets);
    let activations = if checkpointing(cfg, s) {
        (d.n * d.layers * d.hidden + d.n * per_layer + d.n * d.hidden + outside) * F32
    } else {
        (d.n * d.layers * per_layer + outside) * F32
    };
    // Stored weights narrower than f32 stay so (`base_weights=stored`); see `lorad_kernels::frozen`.
    let width = files.width(cfg);
    let stored = s.base_weights == lorad_schema::BaseWeights::Stored && width < F32 as f64 * 0.95;
    let (weights, widening) = if stored {
        let largest = [d.hidden * d.q, d.hidden * d.kv, d.hidden * d.inter]
            .into_iter()
            .max()
            .unwrap_or(0);
        let held = (weight_elems(cfg) as f64 * width) as u64 + rope * F32;
        // The pool keeps two buffers: a product's and a merged copy's, or the head's vocabulary
        // chunk (taken in the cross-entropy) when that is larger.
        let head_chunk = ce_chunks(&d).vocab as u64 * d.hidden;
        (held, (largest.max(head_chunk) + largest) * F32)
    } else {
        ((weight_elems(cfg) + rope) * F32, 0)
    };
    let mut e = MemoryEstimate {
        baseline: PROCESS_BYTES + TOKENIZER_BYTES_PER_TOKEN * d.vocab,
        weights,
        widening,
        lora: 3 * lora * F32,
        optimizer: 2 * lora * F32,
        activations,
        workspace: workspace_bytes(&d, &targets),
        fragmentation: fragmentation_bytes(&d),
        loading: 0,
    };
    let step_extra = e.lora + e.optimizer + e.activations + e.workspace + e.fragmentation;
    let excess = files.load_excess(cfg, stored);
    e.loading = excess.saturating_sub(step_extra + e.widening);
    e
}

/// Whether `s.gradient_checkpointing` is on for this model (`auto`: from
/// `GRADIENT_CHECKPOINTING_AUTO_PARAMS` base parameters), as `Llama::checkpointing` decides it.
pub fn checkpointing(cfg: &ModelConfig, s: &TrainSettings) -> bool {
    checkpointing_for(cfg, s.gradient_checkpointing)
}

/// [`checkpointing`] for the setting alone.
pub fn checkpointing_for(cfg: &ModelConfig, setting: lorad_schema::GradientCheckpointing) -> bool {
    use lorad_schema::GradientCheckpointing::*;
    match setting {
        On => true,
        Off => false,
        Auto => weight_elems(cfg) >= lorad_schema::GRADIENT_CHECKPOINTING_AUTO_PARAMS,
    }
}

/// A way out when `estimate(cfg, s).total() > limit`: the largest batch_size (keeping the other
/// settings) that fits, else with batch_size 1 the largest max_seq_len that fits, as text like
/// `batch_size=2 needs about 17.1 GB`; `None` when nothing fits (the weights alone are too big).
/// When `s` fits already, the text names its own batch_size.
pub fn advice(cfg: &ModelConfig, s: &TrainSettings, limit: u64) -> Option<String> {
    advice_with(cfg, s, &WeightFiles::assumed(cfg), limit)
}

/// [`advice`] for weights stored as `files`.
pub fn advice_with(
    cfg: &ModelConfig,
    s: &TrainSettings,
    files: &WeightFiles,
    limit: u64,
) -> Option<String> {
    let need = |s: &TrainSettings| estimate_with(cfg, s, files).total();
    let with = |batch_size: u32, max_seq_len: u32| TrainSettings {
        batch_size,
        max_seq_len,
        ..s.clone()
    };
    let (batch, seq) = (s.batch_size.max(1), s.max_seq_len.max(1));
    // The estimate grows with the batch: the largest that fits is found by bisection.
    if let Some(b) = largest(1, batch, |b| need(&with(b, seq)) <= limit) {
        let bytes = need(&with(b, seq));
        let total = u64::from(batch) * u64::from(s.grad_accum.max(1));
        let keep = match b < batch && total % u64::from(b) == 0 {
            true => format!(
                " (grad_accum={} keeps the effective batch of {total})",
                total / u64::from(b)
            ),
            false => String::new(),
        };
        return Some(format!("batch_size={b} needs about {}{keep}", human(bytes)));
    }
    let t = largest(1, seq, |t| need(&with(1, t)) <= limit)?;
    // A round length reads better and costs nothing measurable.
    let t = if t >= 64 { t / 64 * 64 } else { t };
    let bytes = need(&with(1, t));
    let batch_note = if batch > 1 { "batch_size=1, " } else { "" };
    Some(format!(
        "{batch_note}max_seq_len={t} needs about {}",
        human(bytes)
    ))
}

/// The largest `x` in `lo..=hi` with `fits(x)`, for a `fits` that holds up to some point and not
/// after it (the estimate grows with batch and length); `None` when even `lo` does not fit.
fn largest(lo: u32, hi: u32, fits: impl Fn(u32) -> bool) -> Option<u32> {
    if !fits(lo) {
        return None;
    }
    // Invariant: fits(ok), and !fits(bad) unless bad is past hi.
    let (mut ok, mut bad) = (lo, u64::from(hi) + 1);
    while bad - u64::from(ok) > 1 {
        let mid = (u64::from(ok) + bad) / 2;
        match fits(mid as u32) {
            true => ok = mid as u32,
            false => bad = mid,
        }
    }
    Some(ok)
}

/// `31.2 GB` style: decimal gigabytes with one decimal, megabytes (whole) below 1 GB.
pub fn human(bytes: u64) -> String {
    // Below 999.5 MB the megabytes round to at most 999.
    if bytes < 999_500_000 {
        format!("{:.0} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.1} GB", bytes as f64 / 1e9)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// TinyLlama-1.1B's shape.
    fn llama_1b() -> ModelConfig {
        serde_json::from_value(serde_json::json!({
            "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
            "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
            "vocab_size": 32000, "tie_word_embeddings": false
        }))
        .unwrap()
    }

    fn settings(batch: u32, seq: u32, r: u32) -> TrainSettings {
        TrainSettings {
            batch_size: batch,
            max_seq_len: seq,
            lora_r: r,
            lora_dropout: 0.0,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
            // These tests are about the f32 path; `stored_weights_...` about the other.
            base_weights: lorad_schema::BaseWeights::F32,
            gradient_checkpointing: lorad_schema::GradientCheckpointing::Off,
            ..TrainSettings::default()
        }
    }

    #[test]
    fn checkpointing_keeps_one_input_per_layer_and_one_layer() {
        let cfg = llama_1b();
        let off = estimate(&cfg, &settings(4, 512, 16));
        let on = TrainSettings {
            gradient_checkpointing: lorad_schema::GradientCheckpointing::On,
            ..settings(4, 512, 16)
        };
        let on = estimate(&cfg, &on);
        assert!(on.activations * 5 < off.activations, "{on} vs {off}");
        assert_eq!(on.weights, off.weights);
        // auto: on for this 1.1B model, off for a small one.
        let auto = TrainSettings {
            gradient_checkpointing: lorad_schema::GradientCheckpointing::Auto,
            ..settings(4, 512, 16)
        };
        assert!(checkpointing(&cfg, &auto));
        let mut small = cfg.clone();
        small.num_hidden_layers = 2;
        assert!(!checkpointing(&small, &auto));
    }

    #[test]
    fn stored_weights_are_held_at_their_width_and_widened_a_layer_and_the_head_at_a_time() {
        let cfg = llama_1b();
        let stored = TrainSettings {
            base_weights: lorad_schema::BaseWeights::Stored,
            ..settings(1, 128, 16)
        };
        let elems = weight_elems(&cfg);
        // bf16 safetensors: 2 bytes a parameter; two scratch buffers in f32 for the step: the widest
        // layer matrix (2048 x 5632) and the head's vocabulary chunk (8192 x 2048), never the head.
        let bf16 = estimate_with(&cfg, &stored, &WeightFiles::Safetensors(vec![elems * 2]));
        assert_eq!(bf16.weights, elems * 2 + 2 * 128 * 64 * 4);
        assert_eq!(bf16.widening, (8192 * 2048 + 2048 * 5632) * 4);
        // Q4_K GGUF, ~4.5 bits a parameter.
        let q4 = estimate_with(&cfg, &stored, &WeightFiles::Gguf(elems * 9 / 16));
        assert!(q4.weights < bf16.weights / 3);
        let f32 = estimate_with(
            &cfg,
            &settings(1, 128, 16),
            &WeightFiles::Gguf(elems * 9 / 16),
        );
        assert!(q4.total() < f32.total() / 2, "{q4} vs {f32}");
        assert_eq!(f32.widening, 0);
        // An f32 file is held as it is either way.
        let f = estimate_with(&cfg, &stored, &WeightFiles::Safetensors(vec![elems * 4]));
        assert_eq!(f.widening, 0);
        assert_eq!(f.weights, (elems + 2 * 128 * 64) * 4);
    }

    #[test]
    fn weights_are_the_f32_parameters() {
        let cfg = llama_1b();
        // TinyLlama-1.1B has 1,100,048,384 parameters.
        assert_eq!(weight_elems(&cfg), 1_100_048_384);
        let e = estimate(&cfg, &settings(1, 128, 16));
        assert_eq!(e.weights, (1_100_048_384 + 2 * 128 * 64) * 4);
    }

    #[test]
    fn grows_with_batch_and_sequence() {
        let cfg = llama_1b();
        let at = |b, t| estimate(&cfg, &settings(b, t, 16));
        for (small, large) in [
            (at(1, 128), at(2, 128)),
            (at(2, 128), at(8, 128)),
            (at(1, 128), at(1, 256)),
            (at(4, 512), at(4, 2048)),
        ] {
            assert!(small.total() < large.total());
            assert!(small.activations < large.activations);
        }
        // Activations are linear in the tokens of a micro-batch: twice the batch, twice as many.
        assert_eq!(at(2, 128).activations, 2 * at(1, 128).activations);
        // The accumulation of micro-batches does not hold several graphs.
        let accum = TrainSettings {
            grad_accum: 8,
            ..settings(1, 128, 16)
        };
        assert_eq!(estimate(&cfg, &accum), at(1, 128));
    }

    #[test]
    fn lora_terms_scale_with_the_rank() {
        let cfg = llama_1b();
        let (r8, r16) = (
            estimate(&cfg, &settings(1, 128, 8)),
            estimate(&cfg, &settings(1, 128, 16)),
        );
        assert_eq!(2 * r8.lora, r16.lora);
        assert_eq!(2 * r8.optimizer, r16.optimizer);
        // q: 16 * (2048 + 2048), k and v: 16 * (2048 + 256), o as q; 22 layers; 3 copies.
        let per_layer = 16 * (2 * 4096 + 2 * 2304);
        assert_eq!(r16.lora, 3 * 22 * per_layer * 4);
        assert_eq!(r16.optimizer, 2 * 22 * per_layer * 4);
        assert_eq!(r8.activations, r16.activations);
        // More targets, more LoRA memory.
        let all = TrainSettings {
            target_modules: lorad_schema::TARGET_MODULES.map(String::from).to_vec(),
            ..settings(1, 128, 16)
        };
        assert!(estimate(&cfg, &all).lora > r16.lora);
    }

    #[test]
    fn dropout_keeps_a_mask_per_adapted_module() {
        let cfg = llama_1b();
        let plain = estimate(&cfg, &settings(2, 64, 16));
        let dropout = estimate(
            &cfg,
            &TrainSettings {
                lora_dropout: 0.05,
                ..settings(2, 64, 16)
            },
        );
        // q, k, v read the hidden state, o the attention output: 4 * 2048 floats per token per layer.
        assert_eq!(
            dropout.activations - plain.activations,
            2 * 64 * 22 * 4 * 2048 * 4
        );
    }

    #[test]
    fn the_loader_holds_one_tensor_beyond_the_weights() {
        let cfg = llama_1b();
        let w = weight_elems(&cfg) * 4;
        let embed: u64 = 32_000 * 2048;
        let s = settings(1, 128, 16);
        let step_extra = |e: &MemoryEstimate| {
            e.lora + e.optimizer + e.activations + e.workspace + e.fragmentation + e.widening
        };
        // The largest tensor (the embedding) at the file's width, whatever the sharding.
        for (files, largest) in [
            (WeightFiles::Safetensors(vec![w]), embed * 4),
            (WeightFiles::Safetensors(vec![w / 2, w / 2]), embed * 4),
            (WeightFiles::assumed(&cfg), embed * 2),
        ] {
            let e = estimate_with(&cfg, &s, &files);
            assert_eq!(
                e.loading,
                largest.saturating_sub(step_extra(&e)),
                "{files:?}: {e}"
            );
        }
        let gguf = estimate_with(&cfg, &s, &WeightFiles::Gguf(w / 6));
        assert!(gguf.loading < w / 10, "{gguf}");
        // With a large batch the step is the peak, and the loader adds nothing.
        let big = estimate_with(
            &cfg,
            &settings(16, 2048, 16),
            &WeightFiles::Safetensors(vec![w]),
        );
        assert_eq!(big.loading, 0);
    }

    #[test]
    fn advice_picks_a_batch_that_fits() {
        let cfg = llama_1b();
        let s = settings(16, 512, 16);
        let limit = estimate(&cfg, &settings(5, 512, 16)).total() + 1;
        assert!(estimate(&cfg, &s).total() > limit);
        let text = advice(&cfg, &s, limit).unwrap();
        let need = human(estimate(&cfg, &settings(5, 512, 16)).total());
        assert_eq!(
            text,
            format!("batch_size=5 needs about {need}"),
            "5 fits, 6 does not"
        );
        assert!(estimate(&cfg, &settings(6, 512, 16)).total() > limit);
        // A divisor keeps the effective batch through accumulation.
        let limit4 = estimate(&cfg, &settings(4, 512, 16)).total();
        assert!(advice(&cfg, &s, limit4)
            .unwrap()
            .ends_with("(grad_accum=4 keeps the effective batch of 16)"));
        // When even one sequence is too long: a shorter one, at batch 1.
        let limit = estimate(&cfg, &settings(1, 300, 16)).total();
        let text = advice(&cfg, &s, limit).unwrap();
        assert!(
            text.starts_with("batch_size=1, max_seq_len=256 needs about"),
            "{text}"
        );
        // Weights alone above the limit: nothing fits.
        assert_eq!(advice(&cfg, &s, 4_000_000_000), None);
        // Already fitting: its own batch size.
        let fits = advice(&cfg, &s, u64::MAX).unwrap();
        assert!(fits.starts_with("batch_size=16 needs about"), "{fits}");
    }

    #[test]
    fn the_total_never_falls_as_batch_or_length_grow() {
        let small: ModelConfig = serde_json::from_value(serde_json::json!({
            "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "vocab_size": 49152, "tie_word_embeddings": true
        }))
        .unwrap();
        for cfg in [llama_1b(), small] {
            let f32_file = WeightFiles::Safetensors(vec![weight_elems(&cfg) * 4]);
            for files in [
                WeightFiles::assumed(&cfg),
                f32_file,
                WeightFiles::Gguf(1 << 28),
            ] {
                let need = |b, t| estimate_with(&cfg, &settings(b, t, 16), &files).total();
                for t in (1..=4096).step_by(7) {
                    assert!(need(1, t) <= need(1, t + 7), "seq {t}");
                }
                for b in 1..64 {
                    assert!(need(b, 512) <= need(b + 1, 512), "batch {b}");
                }
            }
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(31_240_000_000), "31.2 GB");
        assert_eq!(human(1_000_000_000), "1.0 GB");
        assert_eq!(human(999_400_000), "999 MB");
        assert_eq!(human(999_600_000), "1.0 GB");
        assert_eq!(human(17_100_000), "17 MB");
        assert_eq!(human(0), "0 MB");
    }
}
