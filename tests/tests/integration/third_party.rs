//! A third-party plugin (`tests/plugins/acme`, written from docs/PLUGINS.md alone) under a real daemon:
//! listed in `status`, its template trains the tiny model on its `.tsv` format, and a malformed `.tsv`
//! fails the job with a reason naming the line.
use crate::{fast_with, spec, wait_for};
use lorad_schema::JobState;
use lorad_tests::{bin, tiny_model, TestDaemon};
use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

/// 32 short support exchanges with one stock reply, regular enough for the (random) tiny model to
/// learn visibly in 30 steps. Half the replies start with the `\n` escape, which the plugin turns
/// into a newline.
fn support_tsv() -> String {
    let items = ["order", "parcel", "refund", "invoice"];
    let moods = ["late", "lost", "missing", "wrong"];
    let mut text = String::new();
    for i in 0..32 {
        let item = items[i % items.len()];
        let mood = moods[(i / items.len()) % moods.len()];
        let sep = if i % 2 == 0 { " " } else { "\\n" };
        writeln!(
            text,
            "Customer: my {item} is {mood}.\tAgent:{sep}Sorry! We are on it.",
        )
        .unwrap();
        if i % 8 == 7 {
            text.push('\n'); // blank lines are skipped
        }
    }
    text
}

#[test]
fn acme_plugin_template_and_tsv_dataloader_train_a_job() {
    let d = TestDaemon::start_with(&[], &["lorad_templates", "acme_plugin"]);
    let c = d.client();

    // status lists the plugin with what it provides; nothing is rejected.
    let plugins = c.status().expect("status").plugins;
    assert!(plugins.rejected.is_empty(), "{plugins:#?}");
    let acme = plugins
        .loaded
        .iter()
        .find(|p| p.name == "acme")
        .unwrap_or_else(|| panic!("acme not loaded: {plugins:#?}"));
    assert!(acme.path.ends_with("libacme_plugin.so"), "{}", acme.path);
    for expected in ["template acme-support", "dataset tsv (.tsv)"] {
        assert!(
            acme.provides.iter().any(|p| p == expected),
            "{expected} missing from {:?}",
            acme.provides
        );
    }
    // So does `loractl status`, as the guide shows it.
    let out = Command::new(bin("loractl"))
        .arg("--socket")
        .arg(d.socket())
        .arg("status")
        .output()
        .expect("run loractl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("acme") && text.contains("template acme-support, dataset tsv (.tsv)"),
        "{text}"
    );
    let template = c
        .templates()
        .expect("templates")
        .into_iter()
        .find(|t| t.name == "acme-support")
        .expect("acme-support listed");
    assert_eq!(template.settings.lora_r, 8);

    // A job on the acme template and a .tsv dataset trains and learns.
    let data = d.dir.path().join("support.tsv");
    std::fs::write(&data, support_tsv()).expect("dataset");
    // FAST (batch 8, warmup 0, constant schedule, dropout 0, max_seq_len 64) with lr 0.005: at FAST's
    // 0.01 this tiny model's loss spikes now and then late in the run, and which steps spike depends
    // on float rounding (any kernel change moves them).
    let overrides = fast_with(&[("max_steps", "30"), ("grad_accum", "1"), ("lr", "0.005")]);
    let mut good = spec(tiny_model(), &data, &overrides);
    good.template = "acme-support".into();
    let job = c.submit(good).expect("submit");

    // A malformed line (no TAB on line 3) fails its job with the plugin's message.
    let bad_data = d.dir.path().join("broken.tsv");
    std::fs::write(
        &bad_data,
        "Customer: hi\tAgent: hello\n\nCustomer: this line has no tab\n",
    )
    .expect("dataset");
    let mut bad = spec(tiny_model(), &bad_data, &overrides);
    bad.template = "acme-support".into();
    let bad_job = c.submit(bad).expect("submit");

    let (done, _) = wait_for(&c, job.id, Duration::from_secs(60), JobState::is_terminal);
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    assert_eq!(done.template, "acme-support");
    // The template's own settings survive where no override replaced them.
    assert_eq!(done.settings.lora_r, 8);
    assert_eq!(
        done.settings.target_modules,
        ["q_proj", "k_proj", "v_proj", "o_proj"]
    );
    assert_eq!(done.settings.max_steps, Some(30));
    let points = c.metrics(job.id, None).expect("metrics");
    assert_eq!(points.len(), 30, "{points:?}");
    let mean = |p: &[lorad_schema::MetricPoint]| p.iter().map(|p| p.loss).sum::<f64>() / 5.0;
    let (first, last) = (mean(&points[..5]), mean(&points[25..]));
    eprintln!(
        "acme losses: {:?}",
        points.iter().map(|p| p.loss).collect::<Vec<_>>()
    );
    assert!(
        last < first * 0.85,
        "loss did not go down: first 5 steps {first}, last 5 {last}: {:?}",
        points.iter().map(|p| p.loss).collect::<Vec<_>>()
    );

    let (failed, _) = wait_for(
        &c,
        bad_job.id,
        Duration::from_secs(60),
        JobState::is_terminal,
    );
    assert_eq!(failed.state, JobState::Failed);
    let why = failed.reason.clone().unwrap_or_default();
    let expected = format!("{}:3: expected prompt<TAB>completion", bad_data.display());
    assert!(
        why.contains(&expected) && why.contains("plugin acme"),
        "{why}"
    );
}
