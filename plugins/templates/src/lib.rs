//! # lorad-templates
//!
//! The built-in training templates of lorad, shipped as a plugin (`liblorad_templates.so`, kind
//! `TEMPLATES`) so they are loaded and listed exactly like a third party's.
//!
//! Every template sets every hyper-parameter that shapes a run explicitly rather than inheriting
//! [`TrainSettings::default`], so a change of a default never silently changes a template. The
//! fields left to the default are the ones that describe the machine or the supervision rather than
//! the recipe (AdamW betas and epsilon, gradient clipping, seed, dtype, device, stall timeout,
//! restarts, `max_steps`).
//!
//! Choices common to all of them:
//! - `workers` is never 0: with the dataloader on the training thread the GPU waits for every batch
//!   (the pipeline these presets come from ran 15-23x slower with `dataloader_num_workers: 0`).
//! - `packing` is only on where examples are documents rather than prompt/answer pairs: in this
//!   version of lorad attention crosses the boundaries of packed examples, so an answer could attend
//!   to an unrelated question packed before it.
//! - The effective batch (`batch_size * grad_accum`) stays around 16 for the longer sequences, with
//!   the micro-batch shrunk as sequences grow so that a 24 GB card holds it.
#![deny(clippy::unwrap_used)]
#![warn(missing_docs)]

use lorad_plugin::{export_plugin, kinds, Plugin, PluginError, TemplateDef};
use lorad_schema::{Schedule, TrainSettings};

/// The plugin's name as `loractl status` lists it.
pub const PLUGIN_NAME: &str = "lorad-templates";

/// Attention projections only, the classic LoRA target set.
const QV: &[&str] = &["q_proj", "v_proj"];
/// All four attention projections.
const ATTENTION: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj"];
/// Attention and MLP projections: every module lorad can adapt.
const ALL_PROJECTIONS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The templates plugin.
#[derive(Debug, Default)]
pub struct Templates;

impl Plugin for Templates {
    fn name(&self) -> &'static str {
        PLUGIN_NAME
    }

    fn kinds(&self) -> u32 {
        kinds::TEMPLATES
    }

    fn templates(&self) -> Result<Vec<TemplateDef>, PluginError> {
        Ok(builtin())
    }
}

export_plugin!(Templates, Templates);

/// Every built-in template, in the order `loractl templates` lists them.
pub fn builtin() -> Vec<TemplateDef> {
    vec![
        basic_fine_tune(),
        advanced_fine_tune(),
        qa_optimized(),
        coding_assistant(),
        chatbot_personality(),
        domain_expert(),
        multilingual(),
        efficient_fine_tune(),
    ]
}

fn template(name: &str, description: &str, settings: TrainSettings) -> TemplateDef {
    TemplateDef {
        name: name.into(),
        description: description.into(),
        settings,
    }
}

fn modules(list: &[&str]) -> Vec<String> {
    list.iter().map(|m| (*m).to_owned()).collect()
}

/// The everyday default: the original LoRA recipe (q/v, r=8, alpha=2r). Values unchanged since
/// lorad's first release.
fn basic_fine_tune() -> TemplateDef {
    template(
        "basic-fine-tune",
        "General-purpose LoRA on attention q/v: r=8, lr 2e-4, cosine, 3 epochs",
        TrainSettings {
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: modules(QV),
            use_rslora: false,
            lr: 2e-4,
            weight_decay: 0.0,
            schedule: Schedule::Cosine,
            warmup_steps: 10,
            epochs: 3,
            batch_size: 4,
            grad_accum: 1,
            max_seq_len: 512,
            packing: false,
            train_on_inputs: false,
            workers: 2,
            prefetch: 4,
            checkpoint_every: 0,
            keep_checkpoints: 3,
            ..TrainSettings::default()
        },
    )
}

/// Higher capacity on every projection. rsLoRA keeps the update's scale from shrinking as r grows,
/// which is what makes r=32 learn faster than r=8 instead of slower; the lower lr and the
/// effective batch of 16 compensate for the larger step it gives. Values unchanged since lorad's
/// first release.
fn advanced_fine_tune() -> TemplateDef {
    template(
        "advanced-fine-tune",
        "Higher-capacity LoRA on all attention and MLP projections: r=32, rsLoRA, lr 1e-4, seq 1024, 3 epochs",
        TrainSettings {
            lora_r: 32,
            lora_alpha: 64.0,
            lora_dropout: 0.05,
            target_modules: modules(ALL_PROJECTIONS),
            use_rslora: true,
            lr: 1e-4,
            weight_decay: 0.01,
            schedule: Schedule::Cosine,
            warmup_steps: 50,
            epochs: 3,
            batch_size: 4,
            grad_accum: 4,
            max_seq_len: 1024,
            packing: false,
            train_on_inputs: false,
            workers: 2,
            prefetch: 4,
            checkpoint_every: 200,
            keep_checkpoints: 3,
            ..TrainSettings::default()
        },
    )
}

/// Question/answer pairs. 384 tokens is the SQuAD-era sequence length that holds a question with a
/// paragraph of context; short sequences make epochs cheap, so it trains 5 of them. QA sets are
/// small and get memorised, hence the doubled dropout and some weight decay. Only answers are
/// trained, and no packing, so an answer never attends to someone else's question.
fn qa_optimized() -> TemplateDef {
    template(
        "qa-optimized",
        "Question answering on short pairs: r=16 on q/k/v/o, seq 384, lr 2e-4, 5 epochs, answers only",
        TrainSettings {
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.1,
            target_modules: modules(ATTENTION),
            use_rslora: false,
            lr: 2e-4,
            weight_decay: 0.01,
            schedule: Schedule::Cosine,
            warmup_steps: 20,
            epochs: 5,
            batch_size: 8,
            grad_accum: 2,
            max_seq_len: 384,
            packing: false,
            train_on_inputs: false,
            workers: 2,
            prefetch: 4,
            checkpoint_every: 200,
            keep_checkpoints: 3,
            ..TrainSettings::default()
        },
    )
}

/// Code generation and explanation. Functions with their context need 2048 tokens. Code is exact:
/// one wrong token breaks a program, and code sets are large (tens of thousands of examples), so
/// dropout is off and 2 epochs suffice. The MLP projections are adapted too: syntax and API
/// knowledge live there as much as in attention. More dataloader workers because tokenizing 2048-token
/// examples costs more per batch.
fn coding_assistant() -> TemplateDef {
    template(
        "coding-assistant",
        "Code generation on all attention+MLP projections: r=16, no dropout, seq 2048, lr 2e-4, 2 epochs",
        TrainSettings {
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            target_modules: modules(ALL_PROJECTIONS),
            use_rslora: false,
            lr: 2e-4,
            weight_decay: 0.0,
            schedule: Schedule::Cosine,
            warmup_steps: 50,
            epochs: 2,
            batch_size: 2,
            grad_accum: 8,
            max_seq_len: 2048,
            packing: false,
            train_on_inputs: false,
            workers: 4,
            prefetch: 4,
            checkpoint_every: 250,
            keep_checkpoints: 3,
            ..TrainSettings::default()
        },
    )
}

/// A persona or house style on multi-turn chats. Persona sets are small and style is learnt slowly,
/// so a higher rank, 5 epochs at a lower lr, and doubled dropout against memorising the few
/// conversations. Attention only: the MLP, where most facts are stored, is left alone so the persona
/// does not trade away what the base model knows. Only the assistant's replies are trained: the model
/// should answer like the persona, not talk like its users.
fn chatbot_personality() -> TemplateDef {
    template(
        "chatbot-personality",
        "Persona/style on multi-turn chats: r=32 on q/k/v/o, seq 1024, lr 1e-4, 5 epochs, replies only",
        TrainSettings {
            lora_r: 32,
            lora_alpha: 64.0,
            lora_dropout: 0.1,
            target_modules: modules(ATTENTION),
            use_rslora: false,
            lr: 1e-4,
            weight_decay: 0.01,
            schedule: Schedule::Cosine,
            warmup_steps: 30,
            epochs: 5,
            batch_size: 4,
            grad_accum: 4,
            max_seq_len: 1024,
            packing: false,
            train_on_inputs: false,
            workers: 2,
            prefetch: 4,
            checkpoint_every: 200,
            keep_checkpoints: 3,
            ..TrainSettings::default()
        },
    )
}

/// Knowledge of a field (medicine, law, an internal codebase's docs). Facts are stored mostly in
/// the MLP, so every projection is adapted; a lower lr over 4 epochs absorbs the domain with less
/// forgetting of general ability than a short, hot run. Domain corpora are usually documents
/// (`{"text"}`), where packing is how pretraining itself reads text, so it is on. More checkpoints
/// are kept because the best one of a long run is often not the last.
fn domain_expert() -> TemplateDef {
    template(
        "domain-expert",
        "Domain knowledge on all projections: r=16, lr 1e-4, seq 1024 packed, 4 epochs",
        TrainSettings {
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: modules(ALL_PROJECTIONS),
            use_rslora: false,
            lr: 1e-4,
            weight_decay: 0.01,
            schedule: Schedule::Cosine,
            warmup_steps: 100,
            epochs: 4,
            batch_size: 4,
            grad_accum: 4,
            max_seq_len: 1024,
            packing: true,
            train_on_inputs: false,
            workers: 4,
            prefetch: 4,
            checkpoint_every: 250,
            keep_checkpoints: 5,
            ..TrainSettings::default()
        },
    )
}

/// Teaching or strengthening other languages. Adapters only, never the embeddings (lorad adapts
/// projections, not `embed_tokens`/`lm_head`): the base model's tokenizer must already cover the
/// scripts. New languages need capacity, hence r=64 on every projection; with rsLoRA, alpha=16 gives
/// the update scale 16/sqrt(64) = 2, the same as alpha=2r without it, and keeps that scale sane if
/// r is overridden. Non-Latin scripts take 2-4x more tokens per word, hence 2048-token sequences.
fn multilingual() -> TemplateDef {
    template(
        "multilingual",
        "Other languages, embedding-free: r=64 rsLoRA on all projections, seq 2048, lr 1e-4, 3 epochs",
        TrainSettings {
            lora_r: 64,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: modules(ALL_PROJECTIONS),
            use_rslora: true,
            lr: 1e-4,
            weight_decay: 0.01,
            schedule: Schedule::Cosine,
            warmup_steps: 100,
            epochs: 3,
            batch_size: 2,
            grad_accum: 8,
            max_seq_len: 2048,
            packing: false,
            train_on_inputs: false,
            workers: 4,
            prefetch: 4,
            checkpoint_every: 250,
            keep_checkpoints: 3,
            ..TrainSettings::default()
        },
    )
}

/// The cheapest useful run, for trying a dataset or a pipeline: tiny rank, no dropout (one epoch
/// cannot overfit), a hotter lr to get somewhere in one pass. Values unchanged since lorad's first
/// release.
fn efficient_fine_tune() -> TemplateDef {
    template(
        "efficient-fine-tune",
        "Smallest adapter for quick experiments: r=4 on q/v, lr 3e-4, seq 256, 1 epoch",
        TrainSettings {
            lora_r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: modules(QV),
            use_rslora: false,
            lr: 3e-4,
            weight_decay: 0.0,
            schedule: Schedule::Cosine,
            warmup_steps: 5,
            epochs: 1,
            batch_size: 8,
            grad_accum: 1,
            max_seq_len: 256,
            packing: false,
            train_on_inputs: false,
            workers: 2,
            prefetch: 4,
            checkpoint_every: 0,
            keep_checkpoints: 3,
            ..TrainSettings::default()
        },
    )
}

#[cfg(test)]
mod tests;
