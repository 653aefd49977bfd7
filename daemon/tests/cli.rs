//! The `lorad` binary's own commands (the daemon itself is tested in the lorad-tests crate).
use std::process::Command;

fn lorad() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lorad"))
}

#[test]
fn make_tiny_model_is_deterministic_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a", "b"] {
        let out = lorad()
            .arg("make-tiny-model")
            .arg(dir.path().join(name))
            .args(["--seed", "7"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let a = std::fs::read(dir.path().join("a").join(file)).unwrap();
        let b = std::fs::read(dir.path().join("b").join(file)).unwrap();
        assert!(a == b, "{file} differs between two runs with the same seed");
    }
    let other = dir.path().join("c");
    assert!(lorad()
        .arg("make-tiny-model")
        .arg(&other)
        .args(["--seed", "8"])
        .status()
        .unwrap()
        .success());
    assert!(
        std::fs::read(other.join("model.safetensors")).unwrap()
            != std::fs::read(dir.path().join("a/model.safetensors")).unwrap(),
        "another seed gives other weights"
    );
}

#[test]
fn worker_refuses_to_run_by_hand() {
    let out = lorad().arg("worker").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("started by the daemon"), "{err}");
}
