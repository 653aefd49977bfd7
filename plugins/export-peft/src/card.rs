//! The README.md model card written beside the adapter: what it was trained on and how, in the shape
//! the Hugging Face Hub shows (YAML front matter, then Markdown).
use lorad_engine::adapter::AdapterConfig;
use lorad_plugin::ExportRequest;
use lorad_schema::MetricPoint;
use std::fmt::Write;

/// Where the exported adapter stands in its run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunSummary {
    /// Optimizer steps the adapter has seen.
    pub step: Option<u64>,
    /// Optimizer steps of the whole run.
    pub total_steps: Option<u64>,
    /// Loss of the adapter's last step.
    pub final_loss: Option<f64>,
}

impl RunSummary {
    /// The step from trainer_state.json (`step`, `total_steps`) when given, else from the job's
    /// progress; the loss of that step from the metrics, else the job's last loss.
    pub fn new(req: &ExportRequest, trainer_state: Option<&serde_json::Value>) -> Self {
        let state_u64 = |key: &str| trainer_state.and_then(|s| s.get(key)?.as_u64());
        let progress = &req.job.progress;
        let step = state_u64("step")
            .or(req.metrics.last().map(|m| m.step))
            .or(Some(progress.step).filter(|s| *s > 0));
        let total_steps =
            state_u64("total_steps").or(Some(progress.total_steps).filter(|s| *s > 0));
        let at_step = |s: u64| req.metrics.iter().rev().find(|m| m.step == s);
        let final_loss = match step {
            Some(s) => at_step(s).map(|m: &MetricPoint| m.loss),
            None => None,
        }
        .or(progress.loss);
        RunSummary {
            step,
            total_steps,
            final_loss,
        }
    }
}

/// Renders the card. `base` is the base model as written in adapter_config.json.
pub fn render(
    req: &ExportRequest,
    adapter: &AdapterConfig,
    modules: usize,
    run: &RunSummary,
) -> String {
    let job = &req.job;
    let base = &req.base_model;
    let quoted = serde_json::Value::String(base.clone()).to_string();
    let mut s = String::new();
    // JSON strings are valid YAML scalars, so any path is safe in the front matter.
    let _ = writeln!(
        s,
        "---\nbase_model: {quoted}\nlibrary_name: peft\ntags:\n- lora\n- lorad\n---\n"
    );
    let _ = writeln!(s, "# {} (lorad job {})\n", job.name, job.id.0);
    let what = match &req.checkpoint {
        Some(c) => format!("checkpoint `{c}` of"),
        None => "the final adapter of".to_owned(),
    };
    let _ = writeln!(
        s,
        "A LoRA adapter in Hugging Face PEFT layout: {what} a lorad fine-tuning job \
         (template `{}`).\n",
        job.template
    );
    let steps = match (run.step, run.total_steps) {
        (Some(a), Some(b)) => format!("{a} of {b}"),
        (Some(a), None) => a.to_string(),
        _ => "unknown".to_owned(),
    };
    let loss = run
        .final_loss
        .map(|l| format!("{l:.4}"))
        .unwrap_or_else(|| "unknown".to_owned());
    let _ = writeln!(s, "- Base model: `{base}`");
    let _ = writeln!(s, "- Dataset: `{}`", job.dataset);
    let _ = writeln!(s, "- Optimizer steps: {steps}");
    let _ = writeln!(s, "- Final training loss: {loss}");
    let _ = writeln!(
        s,
        "- LoRA: r = {}, alpha = {}, dropout = {}, rsLoRA = {}, {} adapted modules ({})\n",
        adapter.r,
        adapter.lora_alpha,
        adapter.lora_dropout,
        adapter.use_rslora,
        modules,
        adapter.target_modules.join(", ")
    );
    let path = std::path::Path::new(base);
    let load = match (path.parent(), path.file_name()) {
        // transformers reads a GGUF file from its directory, named by `gguf_file`.
        (Some(dir), Some(file)) if base.ends_with(".gguf") => {
            let q = |s: String| serde_json::Value::String(s).to_string();
            format!(
                "AutoModelForCausalLM.from_pretrained({}, gguf_file={})",
                q(dir.display().to_string()),
                q(file.to_string_lossy().into_owned())
            )
        }
        _ => format!("AutoModelForCausalLM.from_pretrained({quoted})"),
    };
    let _ = writeln!(
        s,
        "## Use\n\n```python\nfrom peft import PeftModel\nfrom transformers import \
         AutoModelForCausalLM\n\nbase = {load}\nmodel = PeftModel.from_pretrained(base, \
         \"<this directory>\")\n```\n"
    );
    let _ = writeln!(s, "## Training settings\n\n| setting | value |\n|---|---|");
    if let Ok(serde_json::Value::Object(settings)) = serde_json::to_value(&job.settings) {
        for (key, value) in settings {
            let value = match value {
                serde_json::Value::String(v) => v,
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(", "),
                serde_json::Value::Null => "-".to_owned(),
                other => other.to_string(),
            };
            let _ = writeln!(s, "| {key} | {} |", value.replace('|', "\\|"));
        }
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use lorad_schema::{JobId, JobRecord, JobState, TrainSettings};

    fn request() -> ExportRequest {
        let job = JobRecord {
            id: JobId(7),
            name: "seven".into(),
            state: JobState::Completed,
            reason: None,
            owner_uid: 1000,
            priority: 0,
            template: "basic-fine-tune".into(),
            base_model: "/models/tiny".into(),
            dataset: "/data/train.jsonl".into(),
            output_dir: "/jobs/7/adapter".into(),
            settings: TrainSettings::default(),
            overrides: Default::default(),
            progress: lorad_schema::Progress {
                step: 30,
                total_steps: 30,
                loss: Some(0.5),
                ..Default::default()
            },
            created_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            adapter_dir: Some("/jobs/7/adapter".into()),
            worker_pid: None,
            resume_checkpoint: None,
            requeued: false,
            memory_estimate: None,
            first_started_at_ms: None,
            after: Vec::new(),
            not_before_ms: None,
            on_finish: None,
        };
        let point = |step: u64, loss: f64| MetricPoint {
            step,
            epoch: 0.0,
            loss,
            lr: 1e-3,
            grad_norm: None,
            tokens_per_s: 0.0,
            samples_per_s: 0.0,
            step_ms: 0.0,
            data_wait_ms: 0.0,
            gpu: None,
            cpu: None,
            at_ms: 0,
        };
        serde_json::from_value(serde_json::json!({
            "job_dir": "/jobs/7", "adapter_dir": "/jobs/7/checkpoints/step-20",
            "base_model": "/models/tiny", "out": "/tmp/out", "checkpoint": "step-20",
            "job": job, "metrics": [point(19, 0.9), point(20, 0.8), point(30, 0.5)],
        }))
        .unwrap()
    }

    #[test]
    fn summary_prefers_the_checkpoint_state() {
        let req = request();
        let state = serde_json::json!({"step": 20, "total_steps": 30});
        let run = RunSummary::new(&req, Some(&state));
        assert_eq!(
            run,
            RunSummary {
                step: Some(20),
                total_steps: Some(30),
                final_loss: Some(0.8)
            }
        );
        let run = RunSummary::new(&req, None);
        assert_eq!((run.step, run.final_loss), (Some(30), Some(0.5)));
    }

    #[test]
    fn card_names_base_steps_loss_and_settings() {
        let req = request();
        let adapter: AdapterConfig = serde_json::from_value(serde_json::json!({
            "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        }))
        .unwrap();
        let run = RunSummary::new(
            &req,
            Some(&serde_json::json!({"step": 20, "total_steps": 30})),
        );
        let card = render(&req, &adapter, 8, &run);
        assert!(
            card.starts_with("---\nbase_model: \"/models/tiny\"\n"),
            "{card}"
        );
        assert!(card.contains("checkpoint `step-20`"), "{card}");
        assert!(card.contains("Optimizer steps: 20 of 30"), "{card}");
        assert!(card.contains("Final training loss: 0.8000"), "{card}");
        assert!(
            card.contains("| target_modules | q_proj, v_proj |"),
            "{card}"
        );
        assert!(card.contains("| lora_r | 8 |"), "{card}");
        assert!(card.contains("from_pretrained(\"/models/tiny\")"), "{card}");

        let mut req = req;
        req.base_model = "/models/smol.Q4_1.gguf".into();
        let card = render(&req, &adapter, 8, &run);
        assert!(
            card.contains("from_pretrained(\"/models\", gguf_file=\"smol.Q4_1.gguf\")"),
            "{card}"
        );
    }
}
