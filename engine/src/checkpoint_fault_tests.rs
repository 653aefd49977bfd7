//! Checkpoint faults: what resume refuses (changed math or data, missing or corrupt files, a sequence
//! length the model cannot hold) and what it ignores (temporary and incomplete directories).
use super::tests::{settings, setup, steps_of, task, write_dataset};
use super::*;
use crate::train::train;
use crate::{Phase, TrainEvent, TrainTask};

#[test]
fn latest_checkpoint_ignores_temp_and_incomplete_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path();
    assert_eq!(latest_checkpoint(job), None);
    let root = job.join(CHECKPOINTS_DIR);
    for (name, complete) in [
        ("step-2", true),
        ("step-10", true),
        (".tmp-step-12-999", true),
        (".old-step-1-999", true),
        ("step-11", false),
        ("step-x", true),
        ("step-", true),
    ] {
        std::fs::create_dir_all(root.join(name)).unwrap();
        if complete {
            std::fs::write(root.join(name).join(STATE_FILE), "{}").unwrap();
        }
    }
    assert_eq!(
        latest_checkpoint(job),
        Some(root.join("step-10")),
        "numeric, not lexical"
    );
    let steps: Vec<u64> = list_checkpoints(job).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![2, 10]);
}

/// A 2-step run (one checkpoint, at the end) under `root/job`; returns its task.
fn short_run(root: &Path) -> TrainTask {
    setup(root);
    let mut s = settings();
    s.set("max_steps", "2").unwrap();
    let t = task(root, s, "job");
    train(&t, &mut |_| {}).unwrap();
    t
}

#[test]
fn resume_refuses_changed_math_and_data_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut t = short_run(root);
    t.resume_from = latest_checkpoint(&t.job_dir);
    let ckpt = t.resume_from.clone().unwrap();

    // Operational settings may change.
    let mut ok = t.clone();
    ok.settings.set("workers", "5").unwrap();
    ok.settings.set("checkpoint_every", "1").unwrap();
    ok.settings.set("stall_timeout", "9").unwrap();
    let mut events = Vec::new();
    let summary = train(&ok, &mut |e| events.push(e)).unwrap();
    assert_eq!((summary.steps, summary.losses.len()), (2, 2));
    assert!(steps_of(&events).is_empty(), "nothing left to train");

    let refused = |t: &TrainTask| {
        let mut events = Vec::new();
        let e = train(t, &mut |e| events.push(e)).unwrap_err();
        assert!(
            !events.iter().any(|e| matches!(
                e,
                TrainEvent::Phase {
                    phase: Phase::Training
                } | TrainEvent::Step { .. }
            )),
            "refused before training: {events:?}"
        );
        assert!(matches!(e, EngineError::ResumeMismatch { .. }), "{e:?}");
        e.to_string()
    };
    let mut math = t.clone();
    math.settings.set("lr", "0.001").unwrap();
    math.settings.set("lora_dropout", "0.2").unwrap();
    let msg = refused(&math);
    assert!(
        msg.contains(&format!("cannot resume from {}", ckpt.display())),
        "{msg}"
    );
    assert!(
        msg.contains("setting 'lr' changed (0.003 at the checkpoint, 0.001 now)"),
        "{msg}"
    );
    assert!(msg.contains("setting 'lora_dropout' changed"), "{msg}");
    assert!(!msg.contains("dataset"), "{msg}");

    write_dataset(root, 21);
    let msg = refused(&t);
    assert!(
        msg.contains(&format!("the dataset {} changed", t.dataset.display())),
        "{msg}"
    );
    assert!(!msg.contains("setting"), "{msg}");
}

#[test]
fn missing_or_corrupt_checkpoint_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let t = short_run(dir.path());
    let good = latest_checkpoint(&t.job_dir).unwrap();
    let copy = |name: &str| {
        let to = dir.path().join(name);
        std::fs::create_dir(&to).unwrap();
        for e in std::fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
        to
    };
    let expect_named = |ckpt: &Path, file: &str| {
        let e = load(ckpt).unwrap_err();
        assert!(matches!(e, EngineError::Checkpoint { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&ckpt.join(file).display().to_string()),
            "{msg}"
        );
        msg
    };

    let c = copy("no_optimizer");
    std::fs::remove_file(c.join(OPTIMIZER_FILE)).unwrap();
    let msg = expect_named(&c, OPTIMIZER_FILE);
    assert!(msg.contains("cannot read"), "{msg}");
    // Through train() too: the resume fails with the same message.
    let mut resume = t.clone();
    resume.resume_from = Some(c.clone());
    assert_eq!(train(&resume, &mut |_| {}).unwrap_err().to_string(), msg);

    let c = copy("bad_weights");
    std::fs::write(c.join(WEIGHTS_FILE), b"not safetensors").unwrap();
    expect_named(&c, WEIGHTS_FILE);

    let c = copy("bad_state");
    let text = std::fs::read_to_string(c.join(STATE_FILE)).unwrap();
    std::fs::write(c.join(STATE_FILE), &text[..text.len() / 2]).unwrap();
    let msg = expect_named(&c, STATE_FILE);
    assert!(msg.contains("not a trainer state"), "{msg}");

    let c = copy("no_state");
    std::fs::remove_file(c.join(STATE_FILE)).unwrap();
    expect_named(&c, STATE_FILE);
    assert!(load(&dir.path().join("nowhere"))
        .unwrap_err()
        .to_string()
        .contains("not a checkpoint directory"));
}

#[test]
fn max_seq_len_beyond_the_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let mut s = settings();
    s.set("max_seq_len", "1024").unwrap();
    let e = train(&task(dir.path(), s, "job"), &mut |_| {}).unwrap_err();
    assert_eq!(
        e.to_string(),
        "setting 'max_seq_len': 1024 is longer than the model's max_position_embeddings (512); \
         set max_seq_len to at most 512"
    );
}
