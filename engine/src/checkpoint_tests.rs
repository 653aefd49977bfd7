//! Checkpoints and exact resume on the tiny model. The acceptance test resumes in a separate process:
//! it re-executes this test binary, running the ignored `resume_child` test with an environment
//! variable saying what to do.
use super::*;
use crate::adapter::{load_adapter, CONFIG_FILE};
use crate::data::Tokenized;
use crate::tiny::make_tiny_model;
use crate::train::tests::SENTENCES;
use crate::train::train;
use crate::trainer::TrainSummary;
use crate::{Phase, TrainEvent, TrainTask};
use lorad_schema::{JobId, TrainSettings};
use rand::Rng;
use std::process::Command;

/// Tells a child run of this binary what to do: `interrupt:<root>` or `resume:<root>`.
const CHILD_ENV: &str = "LORAD_CHECKPOINT_CHILD";
/// Exit status of the child that stops right after its mid-run checkpoint.
const INTERRUPTED: i32 = 42;

/// 20 examples in micro-batches of 4 with grad_accum 2: 5 micro-batches and 3 optimizer steps
/// (2 + 2 + 1 batches) per epoch. 8 steps span three epochs; the checkpoint after step 4 falls in the
/// middle of epoch 1 (8 of its 20 examples done). Dropout, weight decay, warmup + cosine: every piece
/// of state that a resume must restore is in play.
pub(super) fn settings() -> TrainSettings {
    let mut s = TrainSettings::default();
    for (k, v) in [
        ("lr", "0.003"),
        ("max_steps", "8"),
        ("target_modules", "q_proj,v_proj,down_proj"),
        ("batch_size", "4"),
        ("grad_accum", "2"),
        ("lora_r", "4"),
        ("lora_alpha", "8"),
        ("lora_dropout", "0.1"),
        ("weight_decay", "0.1"),
        ("warmup_steps", "2"),
        ("schedule", "cosine"),
        ("max_seq_len", "64"),
        ("seed", "7"),
        ("checkpoint_every", "4"),
        ("keep_checkpoints", "5"),
        ("device", "cpu"),
    ] {
        s.set(k, v).unwrap();
    }
    s
}

/// Writes the tiny model and a 20-line dataset under `root`.
pub(super) fn setup(root: &Path) {
    make_tiny_model(&root.join("model"), 3).unwrap();
    write_dataset(root, 20);
}

pub(super) fn write_dataset(root: &Path, lines: usize) {
    let text: String = (0..lines)
        .map(|i| serde_json::json!({ "text": SENTENCES[i % 8] }).to_string() + "\n")
        .collect();
    std::fs::write(root.join("data.jsonl"), text).unwrap();
}

pub(super) fn task(root: &Path, settings: TrainSettings, job: &str) -> TrainTask {
    TrainTask {
        job: JobId(1),
        base_model: root.join("model"),
        dataset: root.join("data.jsonl"),
        adapter_dir: root.join(job).join("adapter"),
        job_dir: root.join(job),
        settings,
        resume_from: None,
        pin_resume: false,
    }
}

pub(super) fn steps_of(events: &[TrainEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step { point } => Some(point.step),
            _ => None,
        })
        .collect()
}

/// Runs `resume_child` in a new process of this test binary; returns its exit code and output.
fn run_child(mode: &str, root: &Path) -> (Option<i32>, String) {
    let module = module_path!();
    let name = format!(
        "{}::resume_child",
        module.split_once("::").map_or(module, |(_, rest)| rest)
    );
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name.as_str(), "--exact", "--ignored", "--nocapture"])
        .env(CHILD_ENV, format!("{mode}:{}", root.display()))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// The child side of `resume_in_a_new_process_matches_the_uninterrupted_run`.
#[test]
#[ignore = "run as a child process by resume_in_a_new_process_matches_the_uninterrupted_run"]
fn resume_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        eprintln!("{CHILD_ENV} is not set: nothing to do");
        return;
    };
    let (mode, root) = spec.split_once(':').unwrap();
    let root = PathBuf::from(root);
    let mut t = task(&root, settings(), "half");
    match mode {
        // Trains like the full run and dies right after the step-4 checkpoint, as a crash would.
        "interrupt" => {
            train(&t, &mut |e| {
                if matches!(e, TrainEvent::Checkpoint { step: 4, .. }) {
                    std::process::exit(INTERRUPTED);
                }
            })
            .unwrap();
            panic!("the run was not interrupted");
        }
        "resume" => {
            t.resume_from = latest_checkpoint(&t.job_dir);
            let mut events = Vec::new();
            let summary = train(&t, &mut |e| events.push(e)).unwrap();
            let report = serde_json::json!({"losses": summary.losses, "steps": steps_of(&events)});
            std::fs::write(root.join("resumed.json"), report.to_string()).unwrap();
        }
        other => panic!("unknown mode {other}"),
    }
}

pub(super) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn resume_in_a_new_process_matches_the_uninterrupted_run() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let full_task = task(root, settings(), "full");
    let full: TrainSummary = train(&full_task, &mut |_| {}).unwrap();
    assert_eq!(full.losses.len(), 8);

    let (code, out) = run_child("interrupt", root);
    assert_eq!(code, Some(INTERRUPTED), "interrupted child:\n{out}");
    let half_dir = root.join("half");
    assert_eq!(
        latest_checkpoint(&half_dir),
        Some(checkpoint_dir(&half_dir, 4))
    );
    let state: TrainerState = serde_json::from_str(
        &std::fs::read_to_string(checkpoint_dir(&half_dir, 4).join(STATE_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(state.data, DataPosition { epoch: 1, index: 8 }, "mid-epoch");

    let (code, out) = run_child("resume", root);
    assert_eq!(code, Some(0), "resuming child:\n{out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("resumed.json")).unwrap()).unwrap();
    assert_eq!(
        report["steps"],
        serde_json::json!([5, 6, 7, 8]),
        "continues at step 5 without replaying"
    );
    let resumed: Vec<f64> = serde_json::from_value(report["losses"].clone()).unwrap();
    assert_eq!(resumed.len(), 8);
    for (i, (a, b)) in full.losses.iter().zip(&resumed).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1e-12),
            "step {}: {a} uninterrupted, {b} resumed",
            i + 1
        );
    }

    let (a, b) = (
        load_adapter(&full_task.adapter_dir).unwrap(),
        load_adapter(&half_dir.join("adapter")).unwrap(),
    );
    assert_eq!(a.weights.len(), b.weights.len());
    for (module, (fa, fb)) in &a.weights {
        let (ra, rb) = &b.weights[module];
        assert!(max_abs_diff(fa, ra) <= 1e-6, "{module} lora_A");
        assert!(max_abs_diff(fb, rb) <= 1e-6, "{module} lora_B");
        assert!(
            max_abs_diff(fb, &fb.zeros_like().unwrap()) > 0.0,
            "{module} trained"
        );
    }
    let moments = |job: &Path| {
        candle_core::safetensors::load(checkpoint_dir(job, 8).join(OPTIMIZER_FILE), &Device::Cpu)
            .unwrap()
    };
    let (ma, mb) = (moments(&root.join("full")), moments(&half_dir));
    assert_eq!(ma.len(), 2 * 2 * a.weights.len());
    for (name, t) in &ma {
        assert!(max_abs_diff(t, &mb[name]) <= 1e-6, "{name}");
    }
    eprintln!(
        "uninterrupted + interrupted + resumed runs took {:?}",
        started.elapsed()
    );
}

#[test]
fn checkpoints_are_pruned_to_keep_and_leftovers_removed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let mut s = settings();
    s.set("max_steps", "5").unwrap();
    s.set("checkpoint_every", "1").unwrap();
    s.set("keep_checkpoints", "2").unwrap();
    let t = task(root, s, "job");
    let leftover = t.job_dir.join(CHECKPOINTS_DIR).join(".tmp-step-3-1");
    std::fs::create_dir_all(&leftover).unwrap();
    let mut events = Vec::new();
    train(&t, &mut |e| events.push(e)).unwrap();

    let steps: Vec<u64> = list_checkpoints(&t.job_dir)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, vec![4, 5]);
    let names: Vec<String> = std::fs::read_dir(t.job_dir.join(CHECKPOINTS_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "nothing but the kept checkpoints: {names:?}"
    );
    let saved: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Checkpoint { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(saved, vec![1, 2, 3, 4, 5]);
    // Each mid-run checkpoint is announced by Saving and followed by a return to Training.
    let i = events
        .iter()
        .position(|e| matches!(e, TrainEvent::Checkpoint { step: 2, .. }))
        .unwrap();
    assert!(matches!(
        events[i - 1],
        TrainEvent::Phase {
            phase: Phase::Saving
        }
    ));
    assert!(matches!(
        events[i + 1],
        TrainEvent::Phase {
            phase: Phase::Training
        }
    ));

    // The final checkpoint is a PEFT adapter equal to the job's adapter.
    let last = latest_checkpoint(&t.job_dir).unwrap();
    assert!(last.join(CONFIG_FILE).is_file());
    let (a, b) = (
        load_adapter(&last).unwrap(),
        load_adapter(&t.adapter_dir).unwrap(),
    );
    for (module, (ca, cb)) in &a.weights {
        assert_eq!(max_abs_diff(ca, &b.weights[module].0), 0.0);
        assert_eq!(max_abs_diff(cb, &b.weights[module].1), 0.0);
    }
}

#[test]
fn rng_state_round_trips_mid_block() {
    let mut rng = crate::rng::rng_for(5, 2);
    let _: u32 = rng.random();
    let _: f64 = rng.random();
    let saved: RngState = serde_json::from_str(
        &serde_json::to_string(&RngState::capture("dropout", 5, &rng)).unwrap(),
    )
    .unwrap();
    let mut restored = saved.restore();
    let next: Vec<u64> = (0..40).map(|_| rng.random()).collect();
    let again: Vec<u64> = (0..40).map(|_| restored.random()).collect();
    assert_eq!(next, again);
}

#[test]
fn seek_lands_where_reading_through_does() {
    let data: Vec<Tokenized> = (0..10)
        .map(|i| Tokenized {
            ids: vec![0, i + 1, 0],
            trained: vec![false, true, true],
        })
        .collect();
    let mut read = Loader::new(data.clone(), 3, 9, 0);
    for _ in 0..6 {
        read.next_batch(&Device::Cpu).unwrap();
    }
    let mut jumped = Loader::new(data, 3, 9, 0);
    jumped.seek(read.position()).unwrap();
    assert_eq!(read.position(), DataPosition { epoch: 1, index: 6 });
    for _ in 0..5 {
        let (a, b) = (
            read.next_batch(&Device::Cpu).unwrap(),
            jumped.next_batch(&Device::Cpu).unwrap(),
        );
        assert_eq!(
            a.ids.to_vec2::<u32>().unwrap(),
            b.ids.to_vec2::<u32>().unwrap()
        );
    }
    assert!(jumped
        .seek(DataPosition {
            epoch: 0,
            index: 11
        })
        .unwrap_err()
        .to_string()
        .contains("past the 10 examples"));
}
