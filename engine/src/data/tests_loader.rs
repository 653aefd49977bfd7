//! The loader: batches identical for any worker count and after `seek`, prefetch bounded, errors and
//! panics in workers surface in order, packing keeps each example's mask.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use super::tests::file;
use super::tests_encode::{segments, tiny_assets, tiny_encoder};
use super::*;
use candle_core::Device;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `n` prompt/completion lines, each different.
fn dataset(n: usize) -> tempfile::NamedTempFile {
    let mut lines = String::new();
    for i in 0..n {
        let rec = serde_json::json!({
            "prompt": format!("Question {i}: what does the cat do?\nAnswer:"),
            "completion": format!(" it sits on mat number {}.", i * 7),
        });
        lines.push_str(&rec.to_string());
        lines.push('\n');
    }
    file(&lines)
}

fn opts(batch_size: usize, workers: usize, prefetch: usize) -> LoaderOptions {
    LoaderOptions {
        batch_size,
        seed: 5,
        pad_id: 0,
        workers,
        prefetch,
        packing: false,
    }
}

fn loader(source: Arc<dyn DataSource>, o: &LoaderOptions) -> Loader {
    Loader::from_source(source, Arc::new(tiny_encoder(64)), o).unwrap()
}

/// What a batch is, as plain data.
type Seen = (Vec<Vec<u32>>, Vec<u32>, Vec<u32>, bool, DataPosition);

fn take(l: &mut Loader, n: usize) -> Vec<Seen> {
    (0..n)
        .map(|_| {
            let b = l.next_batch(&Device::Cpu).unwrap();
            (
                b.ids.to_vec2().unwrap(),
                b.positions.to_vec1().unwrap(),
                b.labels.to_vec1().unwrap(),
                b.epoch_end,
                l.position(),
            )
        })
        .collect()
}

#[test]
fn batches_are_the_same_for_any_worker_count() {
    let f = dataset(10);
    let src: Arc<dyn DataSource> = Arc::new(JsonlSource::open(f.path()).unwrap());
    // 10 examples in batches of 3: 4 batches per epoch, the last of one example; three epochs.
    let reference = take(&mut loader(Arc::clone(&src), &opts(3, 0, 1)), 12);
    for (workers, prefetch) in [(1, 1), (4, 3), (4, 8)] {
        let got = take(
            &mut loader(Arc::clone(&src), &opts(3, workers, prefetch)),
            12,
        );
        assert!(got == reference, "workers={workers} prefetch={prefetch}");
    }
    let ends: Vec<bool> = reference.iter().map(|s| s.3).collect();
    assert_eq!(ends, [false, false, false, true].repeat(3));
    assert_eq!(
        reference[3].4,
        DataPosition {
            epoch: 0,
            index: 10
        }
    );
    assert_eq!(reference[4].4, DataPosition { epoch: 1, index: 3 });
    assert_ne!(
        reference[0].0, reference[4].0,
        "each epoch has its own order"
    );
    // Every example once per epoch.
    let firsts: std::collections::BTreeSet<Vec<u32>> =
        reference[..4].iter().flat_map(|s| s.0.clone()).collect();
    assert_eq!(firsts.len(), 10);
}

#[test]
fn seek_resumes_exactly() {
    let f = dataset(10);
    let src: Arc<dyn DataSource> = Arc::new(JsonlSource::open(f.path()).unwrap());
    let mut first = loader(Arc::clone(&src), &opts(3, 4, 4));
    take(&mut first, 6);
    let at = first.position();
    assert_eq!(at, DataPosition { epoch: 1, index: 6 });
    let rest = take(&mut first, 7);
    for workers in [0, 1, 4] {
        let mut resumed = loader(Arc::clone(&src), &opts(3, workers, 2));
        take(&mut resumed, 1); // batches already built ahead are dropped by the seek
        resumed.seek(at).unwrap();
        assert_eq!(resumed.position(), at);
        assert!((resumed.epoch_progress() - 1.6).abs() < 1e-9);
        assert!(take(&mut resumed, 7) == rest, "workers={workers}");
    }
    // The end of an epoch is a position too: the next batch starts the next epoch.
    let mut a = loader(Arc::clone(&src), &opts(3, 2, 2));
    a.seek(DataPosition {
        epoch: 0,
        index: 10,
    })
    .unwrap();
    let mut b = loader(Arc::clone(&src), &opts(3, 0, 1));
    take(&mut b, 4);
    assert!(take(&mut a, 3) == take(&mut b, 3));
    let e = a
        .seek(DataPosition {
            epoch: 2,
            index: 11,
        })
        .unwrap_err();
    assert!(e.to_string().contains("past the 10 examples"), "{e}");
}

/// A source that counts reads and can fail or panic at one record.
struct Probe {
    inner: JsonlSource,
    reads: AtomicUsize,
    fail_at: Option<usize>,
    panic_at: Option<usize>,
}

impl DataSource for Probe {
    fn origin(&self) -> &Path {
        self.inner.origin()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn read(&self, range: Range<usize>) -> Result<Vec<RawExample>, EngineError> {
        self.reads.fetch_add(range.len(), Ordering::SeqCst);
        if self.panic_at.is_some_and(|i| range.contains(&i)) {
            panic!("probe panics");
        }
        if let Some(i) = self.fail_at.filter(|i| range.contains(i)) {
            return Err(EngineError::dataset(
                self.origin(),
                Some(i + 1),
                "probe fails",
            ));
        }
        self.inner.read(range)
    }
}

fn probe(
    f: &tempfile::NamedTempFile,
    fail_at: Option<usize>,
    panic_at: Option<usize>,
) -> Arc<Probe> {
    Arc::new(Probe {
        inner: JsonlSource::open(f.path()).unwrap(),
        reads: AtomicUsize::new(0),
        fail_at,
        panic_at,
    })
}

fn settle(p: &Probe, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.reads.load(Ordering::SeqCst) < want {
        assert!(
            Instant::now() < deadline,
            "workers never read {want} records"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // Give over-eager workers the chance to read more than they may.
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
fn prefetch_bounds_the_batches_in_flight() {
    let f = dataset(40);
    let p = probe(&f, None, None);
    // from_source reads record 0 twice (format, first-record check) before any worker starts.
    let mut l = loader(p.clone(), &opts(2, 4, 3));
    settle(&p, 2 + 3 * 2);
    assert_eq!(
        p.reads.load(Ordering::SeqCst),
        2 + 3 * 2,
        "3 batches of 2 ahead, no more"
    );
    assert_eq!(l.in_flight(), 3);
    take(&mut l, 1);
    settle(&p, 2 + 4 * 2);
    assert_eq!(p.reads.load(Ordering::SeqCst), 2 + 4 * 2);
    assert_eq!(l.in_flight(), 3);
}

#[test]
fn worker_errors_and_panics_arrive_in_order() {
    let f = dataset(12);
    for workers in [0, 3] {
        // Find which batch holds record 7 from a clean run, then fail there.
        let mut clean = loader(probe(&f, None, None), &opts(2, 0, 1));
        let seen = take(&mut clean, 6);
        let target = tiny_encoder(64)
            .encode_one(&read_jsonl(f.path()).unwrap()[7])
            .unwrap();
        let k = seen
            .iter()
            .position(|s| s.0.iter().any(|row| row.starts_with(&target.ids)))
            .unwrap();
        let mut l = loader(probe(&f, Some(7), None), &opts(2, workers, 4));
        for _ in 0..k {
            l.next_batch(&Device::Cpu).unwrap();
        }
        let e = l.next_batch(&Device::Cpu).unwrap_err();
        assert!(
            matches!(e, EngineError::Dataset { line: Some(8), .. }),
            "{e:?}"
        );

        let mut l = loader(probe(&f, None, Some(7)), &opts(2, workers.max(1), 4));
        for _ in 0..k {
            l.next_batch(&Device::Cpu).unwrap();
        }
        let e = l.next_batch(&Device::Cpu).unwrap_err();
        assert!(
            e.to_string()
                .contains("a data worker panicked: probe panics"),
            "{e}"
        );
    }
}

#[test]
fn chat_datasets_need_a_template_up_front() {
    let f = file("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n");
    let src: Arc<dyn DataSource> = Arc::new(JsonlSource::open(f.path()).unwrap());
    let a = tiny_assets();
    let enc = Encoder::new(a.tokenizer, a.special, None, 64);
    let Err(e) = Loader::from_source(src, Arc::new(enc), &opts(2, 2, 2)) else {
        panic!()
    };
    assert!(
        matches!(e, EngineError::Dataset { line: Some(1), .. }),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("needs the model's chat template"),
        "{e}"
    );
}

#[test]
fn packing_keeps_each_example_whole_and_masked() {
    let f = dataset(30);
    let src: Arc<dyn DataSource> = Arc::new(JsonlSource::open(f.path()).unwrap());
    let enc = tiny_encoder(64);
    let examples: Vec<Tokenized> = read_jsonl(f.path())
        .unwrap()
        .iter()
        .map(|e| enc.encode_one(e).unwrap())
        .collect();
    let packed = pack(examples.clone(), 64);
    assert!(
        packed.len() <= examples.len() / 2,
        "{} sequences",
        packed.len()
    );
    assert!(packed.iter().all(|p| p.ids.len() <= 64));
    let concat: Vec<u32> = packed.iter().flat_map(|p| p.ids.clone()).collect();
    assert_eq!(
        concat,
        examples
            .iter()
            .flat_map(|e| e.ids.clone())
            .collect::<Vec<_>>()
    );
    let tok = tiny_assets().tokenizer;
    let want: Vec<String> = examples.iter().flat_map(|e| segments(&tok, e)).collect();
    let got: Vec<String> = packed.iter().flat_map(|p| segments(&tok, p)).collect();
    assert_eq!(
        got, want,
        "each example's completion, nothing across a boundary"
    );

    let mut o = opts(4, 1, 2);
    o.packing = true;
    let mut one = loader(Arc::clone(&src), &o);
    assert_eq!(one.len(), packed.len());
    o.workers = 3;
    let mut three = loader(src, &o);
    let n = 2 * one.batches_per_epoch();
    assert_eq!(n, 2 * three.batches_per_epoch());
    assert!(take(&mut one, n) == take(&mut three, n));
}

fn ex(ids: &[u32]) -> Tokenized {
    Tokenized {
        ids: ids.to_vec(),
        trained: (0..ids.len()).map(|t| t > 0).collect(),
    }
}

#[test]
fn batches_pad_right_and_label_next_tokens() {
    let mut loader = Loader::new(vec![ex(&[0, 5, 6, 0]), ex(&[0, 7, 0])], 2, 1, 99);
    assert_eq!(loader.batches_per_epoch(), 1);
    let b = loader.next_batch(&Device::Cpu).unwrap();
    assert!(b.epoch_end);
    assert_eq!((b.examples, b.tokens, b.targets), (2, 7, 5));
    let rows = b.ids.to_vec2::<u32>().unwrap();
    let long = rows.iter().position(|r| r[1] == 5).unwrap();
    let short = 1 - long;
    assert_eq!(rows[short], vec![0, 7, 0, 99]);
    let pos = b.positions.to_vec1::<u32>().unwrap();
    let lab = b.labels.to_vec1::<u32>().unwrap();
    let pairs: Vec<(u32, u32)> = pos.into_iter().zip(lab).collect();
    let (l, s) = (long as u32 * 4, short as u32 * 4);
    for p in [(l, 5), (l + 1, 6), (l + 2, 0), (s, 7), (s + 1, 0)] {
        assert!(pairs.contains(&p), "{p:?} in {pairs:?}");
    }
    assert!(
        !pairs.iter().any(|(p, _)| *p == s + 2),
        "no target at padding"
    );
}

#[test]
fn shuffle_is_seeded_per_epoch() {
    let data: Vec<Tokenized> = (0..20).map(|i| ex(&[0, i + 1])).collect();
    let order = |seed| {
        let mut l = Loader::new(data.clone(), 4, seed, 0);
        let mut firsts = Vec::new();
        for _ in 0..10 {
            let b = l.next_batch(&Device::Cpu).unwrap();
            firsts.push(b.ids.to_vec2::<u32>().unwrap()[0][1]);
        }
        (firsts, l.epoch_progress())
    };
    let (a, progress) = order(3);
    assert_eq!(a, order(3).0);
    assert_ne!(a, order(4).0);
    assert_ne!(a[..5], a[5..], "epochs are shuffled differently");
    assert!((progress - 2.0).abs() < 1e-9);
}

#[test]
fn training_survives_batches_with_nothing_to_learn() {
    use crate::{train::train, TrainEvent, TrainTask};
    let dir = tempfile::tempdir().unwrap();
    crate::tiny::make_tiny_model(&dir.path().join("model"), 3).unwrap();
    let long = "the cat sat on the mat. ".repeat(20);
    let mut lines = String::new();
    for prompt in ["Q: where?\nA:", long.as_str(), "Q: who?\nA:"] {
        let rec = serde_json::json!({"prompt": prompt, "completion": " the cat."});
        lines.push_str(&format!("{rec}\n"));
    }
    std::fs::write(dir.path().join("d.jsonl"), lines).unwrap();
    let mut s = lorad_schema::TrainSettings::default();
    for (k, v) in [
        ("batch_size", "1"),
        ("max_seq_len", "32"),
        ("epochs", "2"),
        ("device", "cpu"),
    ] {
        s.set(k, v).unwrap();
    }
    let task = TrainTask {
        job: lorad_schema::JobId(1),
        base_model: dir.path().join("model"),
        dataset: dir.path().join("d.jsonl"),
        adapter_dir: dir.path().join("adapter"),
        job_dir: dir.path().join("job"),
        settings: s,
        resume_from: None,
        pin_resume: false,
    };
    let mut losses = Vec::new();
    let summary = train(&task, &mut |e| {
        if let TrainEvent::Step { point } = e {
            losses.push(point.loss);
        }
    })
    .unwrap();
    assert_eq!(summary.steps, 6);
    // The long prompt fills max_seq_len: its steps have no target and report a loss of 0.
    assert_eq!(
        losses.iter().filter(|&&l| l == 0.0).count(),
        2,
        "{losses:?}"
    );
}
