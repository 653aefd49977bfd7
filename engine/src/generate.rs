//! `lorad generate`: greedy completion of one prompt with a base model (HF directory or GGUF file),
//! optionally with a LoRA adapter. A check and benchmark tool, not a serving path: it shows that a model
//! loads with the right weights, tokenizer and chat template (a wrong Q/K permutation or tokenizer gives
//! gibberish, not a crash), and what an adapter changes.
//!
//! No KV cache: every step runs the whole sequence, which is fine for the few dozen tokens a check needs.
use crate::adapter::load_adapter;
use crate::chat_template::ChatMessage;
use crate::device::select_device;
use crate::error::EngineError;
use crate::lora::LoraConfig;
use crate::model::Llama;
use crate::source::ModelSource;
use candle_core::Tensor;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Instant;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// HF model directory or GGUF file.
    pub model: PathBuf,
    /// The user's message (or, with `raw`, the whole prompt text).
    pub prompt: String,
    /// Tokens to generate at most.
    pub max_new: usize,
    /// Use the prompt as-is instead of rendering it with the model's chat template.
    pub raw: bool,
    /// A PEFT LoRA adapter directory to apply.
    pub adapter: Option<PathBuf>,
    /// `cpu`, `auto`, `cuda:N`.
    pub device: String,
}

/// What came out.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The text the model was given (after the chat template).
    pub prompt_text: String,
    /// The prompt's token ids (BOS included when the model wants one).
    pub prompt_ids: Vec<u32>,
    /// The generated text (special tokens skipped).
    pub completion: String,
    /// Generated token ids (the stop token included when one was produced).
    pub completion_ids: Vec<u32>,
    /// The five largest logits at the prompt's last position (id, logit): to compare with a reference
    /// implementation, which greedy ids alone do only coarsely.
    pub first_top5: Vec<(u32, f32)>,
    /// Seconds spent loading the model.
    pub load_s: f64,
    /// Generated tokens per second.
    pub tokens_per_s: f64,
}

/// Loads the model and greedily completes the prompt until EOS or `max_new` tokens.
pub fn generate(req: &GenerateRequest) -> Result<Generated, EngineError> {
    let started = Instant::now();
    let device = select_device(&req.device)?;
    let source = ModelSource::open(&req.model)?;
    let tok = source.tokenizer()?;
    let tok_err = |detail: String| EngineError::Tokenizer {
        path: tok.path.clone(),
        detail,
    };
    let prompt_text = match (
        req.raw,
        tok.render_chat(&[ChatMessage::new("user", &req.prompt)], true),
    ) {
        (true, _) | (false, None) => req.prompt.clone(),
        (false, Some(rendered)) => rendered.map_err(|e| tok_err(format!("chat template: {e}")))?,
    };
    let mut ids: Vec<u32> = Vec::new();
    if let (Some(true), Some(bos)) = (tok.special.add_bos, tok.special.bos) {
        ids.push(bos);
    }
    ids.extend(
        tok.tokenizer
            .encode(prompt_text.as_str(), false)
            .map_err(|e| tok_err(e.to_string()))?
            .get_ids(),
    );
    let prompt_ids = ids.clone();
    let max_len = (prompt_ids.len() + req.max_new).min(source.config().max_position_embeddings);

    let adapter = req.adapter.as_deref().map(load_adapter).transpose()?;
    let lora = match &adapter {
        Some(a) => a.lora_config(),
        None => LoraConfig {
            r: 1,
            alpha: 1.0,
            dropout: 0.0,
            targets: vec![],
            use_rslora: false,
        },
    };
    let mut init = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let model = Llama::from_source(&source, &lora, &mut init, max_len.max(1), &device)?;
    if let (Some(a), Some(dir)) = (&adapter, &req.adapter) {
        model.set_lora_weights(&a.weights, dir)?;
    }
    let load_s = started.elapsed().as_secs_f64();

    let stop = [tok.special.eos].into_iter().flatten().collect::<Vec<_>>();
    let gen_started = Instant::now();
    let mut completion_ids = Vec::new();
    let mut first_top5 = Vec::new();
    while ids.len() < max_len {
        let input = Tensor::from_slice(&ids, (1, ids.len()), &device)?;
        let logits = model.last_logits(&input)?;
        if first_top5.is_empty() {
            first_top5 = top_k(&logits, 5)?;
        }
        let next = logits.argmax(1)?.to_vec1::<u32>()?;
        let Some(&next) = next.first() else { break };
        ids.push(next);
        completion_ids.push(next);
        if stop.contains(&next) {
            break;
        }
    }
    let secs = gen_started.elapsed().as_secs_f64().max(1e-9);
    let completion = tok
        .tokenizer
        .decode(&completion_ids, true)
        .map_err(|e| tok_err(e.to_string()))?;
    Ok(Generated {
        prompt_text,
        prompt_ids,
        tokens_per_s: completion_ids.len() as f64 / secs,
        completion,
        completion_ids,
        first_top5,
        load_s,
    })
}

/// The `k` largest entries of logits `[1, vocab]`, largest first.
fn top_k(logits: &Tensor, k: usize) -> Result<Vec<(u32, f32)>, EngineError> {
    let row = logits.flatten_all()?.to_vec1::<f32>()?;
    let mut pairs: Vec<(u32, f32)> = (0u32..).zip(row).collect();
    pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
    pairs.truncate(k);
    Ok(pairs)
}
