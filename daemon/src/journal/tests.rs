use super::*;
use lorad_schema::{Progress, TrainSettings};

fn record(id: JobId) -> JobRecord {
    JobRecord {
        id,
        name: format!("job{id}"),
        state: JobState::Queued,
        reason: None,
        owner_uid: 1000,
        priority: 0,
        template: "basic-fine-tune".into(),
        base_model: "/m".into(),
        dataset: "/d.jsonl".into(),
        output_dir: "/o".into(),
        settings: TrainSettings::default(),
        overrides: Default::default(),
        progress: Progress::default(),
        created_at_ms: 1,
        started_at_ms: None,
        finished_at_ms: None,
        adapter_dir: None,
        worker_pid: None,
        resume_checkpoint: None,
        requeued: false,
        memory_estimate: None,
        first_started_at_ms: None,
        after: Vec::new(),
        not_before_ms: None,
        on_finish: None,
    }
}

fn point(step: u64) -> MetricPoint {
    MetricPoint {
        step,
        epoch: 0.1 * step as f64,
        loss: 5.0 / step as f64,
        lr: 1e-3,
        grad_norm: Some(1.0),
        tokens_per_s: 100.0,
        samples_per_s: 4.0,
        step_ms: 10.0,
        data_wait_ms: 0.1,
        gpu: None,
        cpu: None,
        at_ms: 5,
    }
}

#[test]
fn ids_are_sequential_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.redb");
    {
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.insert_job(record).unwrap().0.id, JobId(1));
        assert_eq!(j.insert_job(record).unwrap().0.id, JobId(2));
    }
    let j = Journal::open(&path).unwrap();
    assert_eq!(j.insert_job(record).unwrap().0.id, JobId(3));
    assert_eq!(j.jobs().unwrap().len(), 3);
}

#[test]
fn invalid_transition_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("j.redb")).unwrap();
    let (job, _) = j.insert_job(record).unwrap();
    let seq = j.last_seq().unwrap();
    let err = j
        .transition(job.id, JobState::Completed, None, |_| {})
        .unwrap_err();
    assert!(matches!(err, JournalError::Transition(_)));
    assert_eq!(j.job(job.id).unwrap(), job);
    assert_eq!(
        j.last_seq().unwrap(),
        seq,
        "no event for a refused transition"
    );

    let (after, ev) = j
        .transition(job.id, JobState::Initializing, Some("start".into()), |_| {})
        .unwrap();
    assert_eq!(after.state, JobState::Initializing);
    assert_eq!(ev.seq, seq + 1);
    assert!(matches!(
        ev.body,
        EventBody::StateChanged {
            from: JobState::Queued,
            to: JobState::Initializing,
            ..
        }
    ));
}

#[test]
fn metric_points_are_stored_once_in_step_order() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("j.redb")).unwrap();
    let (job, _) = j.insert_job(record).unwrap();
    j.transition(job.id, JobState::Initializing, None, |_| {})
        .unwrap();
    for s in [1, 2, 3] {
        assert!(j.record_metric(job.id, point(s)).unwrap().is_some());
    }
    assert!(
        j.record_metric(job.id, point(2)).unwrap().is_none(),
        "a replayed step is ignored"
    );
    let steps: Vec<u64> = j
        .metrics(job.id, None)
        .unwrap()
        .iter()
        .map(|p| p.step)
        .collect();
    assert_eq!(steps, vec![1, 2, 3]);
    let since: Vec<u64> = j
        .metrics(job.id, Some(1))
        .unwrap()
        .iter()
        .map(|p| p.step)
        .collect();
    assert_eq!(since, vec![2, 3]);
    assert_eq!(j.job(job.id).unwrap().progress.step, 3);
    j.transition(job.id, JobState::Cancelled, None, |_| {})
        .unwrap();
    assert!(
        j.record_metric(job.id, point(4)).unwrap().is_none(),
        "an ended job's history is closed"
    );
}

#[test]
fn events_replay_by_seq_and_job() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("j.redb")).unwrap();
    let (a, _) = j.insert_job(record).unwrap();
    let (b, _) = j.insert_job(record).unwrap();
    j.transition(a.id, JobState::Cancelled, None, |_| {})
        .unwrap();
    let all = j.events_since(0, None, 100).unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(j.events_since(0, Some(b.id), 100).unwrap().len(), 1);
    assert_eq!(j.events_since(all[0].seq, None, 100).unwrap().len(), 2);
}
