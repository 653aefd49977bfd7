//! Gradient checkpointing changes memory and time, never the numbers: the same losses and adapter
//! as without it (dropout, weight decay, accumulation in play), and exact resume still holds.
use super::tests::{settings, setup, task};
use crate::adapter::load_adapter;
use crate::train::train;
use crate::{TrainEvent, TrainTask};
use lorad_schema::GradientCheckpointing;

fn run(t: &TrainTask) -> (Vec<f64>, Vec<(String, Vec<f32>)>) {
    let summary = train(t, &mut |_| {}).unwrap();
    let adapter = load_adapter(&summary.adapter_dir).unwrap();
    let mut weights: Vec<(String, Vec<f32>)> = adapter
        .weights
        .into_iter()
        .map(|(k, (a, b))| {
            let mut v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.extend(b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            (k, v)
        })
        .collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    (summary.losses, weights)
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-6 * x.abs().max(1e-12))
}

#[test]
fn checkpointed_training_equals_training_without_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let with = |on: bool| {
        let mut s = settings();
        s.gradient_checkpointing = if on {
            GradientCheckpointing::On
        } else {
            GradientCheckpointing::Off
        };
        s
    };
    let (off_losses, off_adapter) = run(&task(root, with(false), "off"));
    let (on_losses, on_adapter) = run(&task(root, with(true), "on"));
    assert_eq!(off_losses.len(), 8);
    assert!(
        close(&off_losses, &on_losses),
        "{off_losses:?}\n{on_losses:?}"
    );
    for ((name, a), (_, b)) in off_adapter.iter().zip(&on_adapter) {
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        assert!(
            worst / scale <= 1e-5,
            "{name}: relative difference {}",
            worst / scale
        );
    }

    // Resumed from the step-4 checkpoint of a checkpointed run: the same curve from there.
    let mut half = task(root, with(true), "half");
    let mut saved = Vec::new();
    train(&half, &mut |e| {
        if let TrainEvent::Checkpoint { step, .. } = e {
            saved.push(step);
        }
    })
    .unwrap();
    assert!(saved.contains(&4), "{saved:?}");
    half.resume_from = Some(half.job_dir.join("checkpoints").join("step-4"));
    half.adapter_dir = root.join("half").join("adapter-resumed");
    let resumed = train(&half, &mut |_| {}).unwrap();
    // The resumed run reports the steps it trained (5..8): they equal the uninterrupted run's.
    let tail = &on_losses[on_losses.len() - resumed.losses.len()..];
    assert!(!resumed.losses.is_empty());
    assert!(
        close(tail, &resumed.losses),
        "{tail:?}\n{:?}",
        resumed.losses
    );
}
