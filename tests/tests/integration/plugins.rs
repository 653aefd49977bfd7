//! Plugins as users meet them: loaded and rejected libraries in `status`, a rescan on SIGHUP, a plugin
//! that panics (an error reply, a failed job, a daemon that keeps serving), and exports.
use crate::{spec, wait_for, FAST};
use lorad_schema::{ErrorCode, JobState};
use lorad_tests::{tiny_model, write_dataset, TestDaemon};
use std::time::{Duration, Instant};

/// Polls `status` until `ok` accepts its plugin list.
fn wait_plugins(
    d: &TestDaemon,
    ok: impl Fn(&lorad_schema::PluginsStatus) -> bool,
) -> lorad_schema::PluginsStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let plugins = d.client().status().expect("status").plugins;
        if ok(&plugins) {
            return plugins;
        }
        assert!(
            Instant::now() < deadline,
            "plugins never became as expected: {plugins:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn broken_plugins_are_rejected_and_the_daemon_keeps_serving() {
    let d = TestDaemon::start_with(
        &[("PANICKY_PANIC_IN_LIST", "1")],
        &["lorad_templates", "badabi_plugin", "panicky_plugin"],
    );
    let c = d.client();
    let plugins = c.status().expect("status").plugins;
    let loaded: Vec<&str> = plugins.loaded.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(loaded, ["lorad-templates"], "{plugins:#?}");
    let reason = |file: &str| {
        plugins
            .rejected
            .iter()
            .find(|r| r.path.ends_with(file))
            .map(|r| r.reason.clone())
            .unwrap_or_else(|| panic!("{file} not rejected: {plugins:#?}"))
    };
    assert!(
        reason("libbadabi_plugin.so")
            .contains("plugin badabi has ABI version 99; this lorad supports 1"),
        "{plugins:#?}"
    );
    let panicked = reason("libpanicky_plugin.so");
    assert!(
        panicked.contains("templates.list failed")
            && panicked.contains("panicked: templates.list exploded"),
        "{panicked}"
    );

    // `loractl status` shows both lists to people.
    let out = std::process::Command::new(lorad_tests::bin("loractl"))
        .arg("--socket")
        .arg(d.socket())
        .arg("status")
        .output()
        .expect("loractl status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("plugins: 1 loaded, 2 rejected"), "{text}");
    assert!(text.contains("lorad-templates"), "{text}");
    assert!(
        text.contains("libbadabi_plugin.so: plugin badabi has ABI version 99"),
        "{text}"
    );

    // The daemon serves on: templates come from the good plugin, jobs run.
    let names: Vec<String> = c
        .templates()
        .expect("templates")
        .into_iter()
        .map(|t| t.name)
        .collect();
    for expected in [
        "basic-fine-tune",
        "advanced-fine-tune",
        "qa-optimized",
        "coding-assistant",
        "chatbot-personality",
        "domain-expert",
        "multilingual",
        "efficient-fine-tune",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(!names.iter().any(|n| n == "panicky-template"));
    let data = d.dir.path().join("train.jsonl");
    write_dataset(&data, 16);
    let job = c
        .submit(spec(
            tiny_model(),
            &data,
            &[("max_steps", "2"), ("max_seq_len", "32")],
        ))
        .expect("submit");
    let (done, _) = wait_for(&c, job.id, Duration::from_secs(120), JobState::is_terminal);
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
}

#[test]
fn sighup_loads_new_plugins_and_a_panicking_plugin_fails_only_its_work() {
    let d = TestDaemon::start_with(&[], &["lorad_templates"]);
    let c = d.client();
    assert!(c.status().expect("status").plugins.rejected.is_empty());

    // A plugin dropped into the directory is picked up by SIGHUP; a second copy of a loaded plugin is
    // rejected by name.
    d.add_plugin("panicky_plugin");
    std::os::unix::fs::symlink(
        lorad_tests::plugin_lib("lorad_templates"),
        d.plugin_dir().join("libzz_templates_again.so"),
    )
    .expect("link");
    d.sighup();
    let plugins = wait_plugins(&d, |p| p.loaded.iter().any(|l| l.name == "panicky"));
    assert_eq!(plugins.rejected.len(), 1, "{plugins:#?}");
    assert!(
        plugins.rejected[0]
            .path
            .ends_with("libzz_templates_again.so")
            && plugins.rejected[0]
                .reason
                .starts_with("plugin lorad-templates is already loaded from"),
        "{plugins:#?}"
    );
    let panicky = plugins
        .loaded
        .iter()
        .find(|l| l.name == "panicky")
        .expect("panicky");
    assert!(
        panicky.provides.iter().any(|p| p == "export panicky"),
        "{panicky:?}"
    );
    assert!(c
        .templates()
        .expect("templates")
        .iter()
        .any(|t| t.name == "panicky-template"));

    // Its dataloader panics in the worker: the job fails with the panic as its reason.
    let data = d.dir.path().join("train.boom");
    std::fs::write(&data, "anything\n").expect("dataset");
    let job = c.submit(spec(tiny_model(), &data, FAST)).expect("submit");
    let (failed, _) = wait_for(&c, job.id, Duration::from_secs(120), JobState::is_terminal);
    assert_eq!(failed.state, JobState::Failed);
    let why = failed.reason.clone().unwrap_or_default();
    assert!(
        why.contains("plugin panicky") && why.contains("dataloader.read exploded"),
        "{why}"
    );

    // Its exporter panics in the export worker: an error reply, nothing written, the daemon serves on.
    let data = d.dir.path().join("train.jsonl");
    write_dataset(&data, 16);
    let job = c
        .submit(spec(
            tiny_model(),
            &data,
            &[("max_steps", "2"), ("max_seq_len", "32")],
        ))
        .expect("submit");
    let (done, _) = wait_for(&c, job.id, Duration::from_secs(120), JobState::is_terminal);
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);
    let out = d.dir.path().join("out-panicky");
    let err = c
        .export(job.id, "panicky", &out.display().to_string(), None)
        .expect_err("export must fail");
    let text = err.to_string();
    assert!(text.contains("export.run exploded"), "{text}");
    assert!(matches!(err.code(), Some(ErrorCode::Failed)), "{err:?}");
    assert!(!out.exists());
    assert!(c.status().is_ok());
    let log = std::fs::read_to_string(d.state_dir().join(format!("jobs/{}/job.log", job.id)))
        .expect("job.log");
    assert!(log.contains("===== lorad: export panicky started"), "{log}");
}
