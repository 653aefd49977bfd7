//! Built-in templates. A later issue moves them into the templates plugin; the table's shape (name,
//! description, a full TrainSettings) is what the plugin will return.
use lorad_schema::{Schedule, Template, TrainSettings};

fn targets(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Every built-in template.
pub fn builtin() -> Vec<Template> {
    let base = TrainSettings::default();
    vec![
        Template {
            name: "basic-fine-tune".into(),
            description: "General-purpose LoRA on attention q/v: r=8, lr 2e-4, cosine, 3 epochs"
                .into(),
            settings: TrainSettings {
                lora_r: 8,
                lora_alpha: 16.0,
                lora_dropout: 0.05,
                target_modules: targets(&["q_proj", "v_proj"]),
                lr: 2e-4,
                schedule: Schedule::Cosine,
                warmup_steps: 10,
                epochs: 3,
                batch_size: 4,
                grad_accum: 1,
                max_seq_len: 512,
                ..base.clone()
            },
        },
        Template {
            name: "efficient-fine-tune".into(),
            description:
                "Smallest adapter for quick experiments: r=4 on q/v, short sequences, 1 epoch"
                    .into(),
            settings: TrainSettings {
                lora_r: 4,
                lora_alpha: 8.0,
                lora_dropout: 0.0,
                target_modules: targets(&["q_proj", "v_proj"]),
                lr: 3e-4,
                warmup_steps: 5,
                epochs: 1,
                batch_size: 8,
                max_seq_len: 256,
                ..base.clone()
            },
        },
        Template {
            name: "advanced-fine-tune".into(),
            description: "Higher-capacity LoRA on all attention and MLP projections: r=32, rsLoRA"
                .into(),
            settings: TrainSettings {
                lora_r: 32,
                lora_alpha: 64.0,
                lora_dropout: 0.05,
                target_modules: targets(&[
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ]),
                use_rslora: true,
                lr: 1e-4,
                weight_decay: 0.01,
                warmup_steps: 50,
                epochs: 3,
                batch_size: 4,
                grad_accum: 4,
                max_seq_len: 1024,
                checkpoint_every: 200,
                ..base
            },
        },
    ]
}

/// The template called `name`.
pub fn find(name: &str) -> Option<Template> {
    builtin().into_iter().find(|t| t.name == name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn builtins_are_valid_and_unique() {
        let all = super::builtin();
        for t in &all {
            t.settings.validate().unwrap();
        }
        let mut names: Vec<_> = all.iter().map(|t| t.name.clone()).collect();
        names.dedup();
        assert_eq!(names.len(), all.len());
        assert!(super::find("basic-fine-tune").is_some());
    }
}
