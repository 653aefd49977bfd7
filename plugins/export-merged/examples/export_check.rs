//! The Rust half of `bench/export_check.sh`: lorad trains, the three exporter plugins export (loaded
//! from their cdylibs with libloading, as lorad's worker loads them), and lorad's own logits are
//! dumped for the Python half (real PEFT and transformers) to compare with.
//!
//! ```text
//! export_check run --base MODEL --work DIR [--steps N] [--lr X] [--r R] [--plugins DIR]
//!     trains MODEL (HF dir or GGUF) for N steps on lorad's demo data in DIR/job, exports DIR/peft,
//!     DIR/merged and DIR/export.zip, writes DIR/lorad_logits.safetensors (base, lora, merged: [t, vocab])
//!     and DIR/lorad.json (ids, text and its ids, losses, export times)
//! export_check golden-setup DIR
//!     the golden check's inputs (tests/golden/recipe.json) in DIR: model/, <adapter>/adapter,
//!     <adapter>/merged, and lorad's logits in DIR/lorad_golden.json
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/mod.rs"]
mod support;

use candle_core::Tensor;
use lorad_engine::source::ModelSource;
use lorad_plugin::{
    call_typed, check_abi, methods, EntryFn, ExportRequest, ExportResponse, LoradPluginV1,
    ENTRY_SYMBOL,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use support::golden::{lorad_lora, read_recipe, select, setup};
use support::*;

/// The text whose logits are compared (and whose tokenization the merged tokenizer must reproduce).
const TEXT: &str = "Ada keeps 3 of the red kite in the lorad lab. The capital of France is Paris.";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("golden-setup") if args.len() == 2 => golden_setup(Path::new(&args[1])),
        _ => {
            eprintln!("usage: export_check run --base MODEL --work DIR [--steps N] [--lr X] [--r R] [--plugins DIR]\n       export_check golden-setup DIR");
            std::process::exit(2);
        }
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Loads a plugin cdylib and checks its ABI; the library is never unloaded (as in lorad).
fn load_plugin(path: &Path) -> &'static LoradPluginV1 {
    let lib = unsafe { libloading::Library::new(path) }
        .unwrap_or_else(|e| panic!("{}: {e} (build the plugins with --release)", path.display()));
    let desc = {
        let entry: libloading::Symbol<EntryFn> = unsafe { lib.get(ENTRY_SYMBOL) }.unwrap();
        unsafe { check_abi(entry()) }.unwrap()
    };
    std::mem::forget(lib);
    desc
}

fn export(desc: &LoradPluginV1, req: &ExportRequest) -> f64 {
    let started = Instant::now();
    let reply: ExportResponse = unsafe { call_typed(desc, methods::EXPORT_RUN, req) }
        .unwrap_or_else(|e| panic!("{} export failed: {e}", req.format));
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} export: {} files in {secs:.2} s",
        req.format,
        reply.files.len()
    );
    secs
}

fn run(args: &[String]) {
    let base = PathBuf::from(flag(args, "--base").expect("--base MODEL"));
    let work = PathBuf::from(flag(args, "--work").expect("--work DIR"));
    let steps: u64 = flag(args, "--steps").map_or(4, |s| s.parse().unwrap());
    let lr: f64 = flag(args, "--lr").map_or(0.01, |s| s.parse().unwrap());
    let r: u32 = flag(args, "--r").map_or(4, |s| s.parse().unwrap());
    let plugins = flag(args, "--plugins")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // target/release/examples/export_check -> target/release
            let exe = std::env::current_exe().unwrap();
            exe.parent().unwrap().parent().unwrap().to_path_buf()
        });
    std::fs::create_dir_all(&work).unwrap();

    let mut settings = short_settings(steps, lr);
    settings.lora_r = r;
    settings.lora_alpha = 2.0 * r as f64;
    let started = Instant::now();
    let job = train_job(&work, &base, settings);
    let train_s = started.elapsed().as_secs_f64();
    let losses: Vec<f64> = job.metrics.iter().map(|m| m.loss).collect();
    eprintln!("trained {steps} steps in {train_s:.1} s: losses {losses:?}");

    let mut times = BTreeMap::new();
    for (format, out) in [
        ("peft", work.join("peft")),
        ("merged", work.join("merged")),
        ("zip", work.join("export.zip")),
    ] {
        let desc = load_plugin(&plugins.join(format!("liblorad_export_{format}.so")));
        let req = export_request(&job, &base, &out, format, None);
        times.insert(format, export(desc, &req));
    }

    let tok = ModelSource::open(&base).unwrap().tokenizer().unwrap();
    let text_ids: Vec<u32> = tok
        .tokenizer
        .encode(TEXT, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let mut ids = Vec::new();
    if let (Some(true), Some(bos)) = (tok.special.add_bos, tok.special.bos) {
        ids.push(bos);
    }
    ids.extend(&text_ids);
    let logits = BTreeMap::from([
        ("base".to_string(), lorad_logits(&base, None, &ids)),
        (
            "lora".to_string(),
            lorad_logits(&base, Some(&work.join("peft")), &ids),
        ),
        (
            "merged".to_string(),
            lorad_logits(&work.join("merged"), None, &ids),
        ),
    ]);
    lorad_engine::weights::save_tensors(&work.join("lorad_logits.safetensors"), &logits).unwrap();
    let summary = json!({
        "base": base.display().to_string(),
        "ids": ids,
        "text": TEXT,
        "text_ids": text_ids,
        "steps": steps,
        "losses": losses,
        "train_s": train_s,
        "export_s": times,
        "lorad_merged_vs_lora": rel_err(&logits["merged"], &logits["lora"]),
        "adapter_effect": rel_err(&logits["base"], &logits["lora"]),
    });
    std::fs::write(
        work.join("lorad.json"),
        serde_json::to_string_pretty(&summary).unwrap(),
    )
    .unwrap();
    println!("{summary}");
}

fn golden_setup(dir: &Path) {
    let recipe = read_recipe();
    let model = setup(dir, &recipe);
    let desc = unsafe { check_abi(lorad_export_merged::lorad_plugin_v1()) }.unwrap();
    let mut dump = serde_json::Map::new();
    let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
    for name in recipe.adapters.keys() {
        let adapter = dir.join(name).join("adapter");
        let out = dir.join(name).join("merged");
        let job = TrainedJob {
            job_dir: dir.to_path_buf(),
            adapter_dir: adapter.clone(),
            dataset: dir.join("none.jsonl"),
            settings: Default::default(),
            metrics: vec![],
        };
        let mut req = export_request_for(&job, &model, &out);
        req.adapter_dir = adapter.display().to_string();
        let _: ExportResponse = unsafe { call_typed(desc, methods::EXPORT_RUN, &req) }.unwrap();
        let merged = select(
            &lorad_logits(&out, None, &recipe.tokens),
            recipe.vocab_stride,
        );
        dump.insert(
            name.clone(),
            json!({"lora": rows(&lorad_lora(dir, &recipe, name)), "merged": rows(&merged)}),
        );
    }
    std::fs::write(
        dir.join("lorad_golden.json"),
        serde_json::Value::Object(dump).to_string(),
    )
    .unwrap();
    println!("{}", dir.display());
}

/// A merged-export request for a hand-made adapter (no training run behind it).
fn export_request_for(job: &TrainedJob, base: &Path, out: &Path) -> ExportRequest {
    ExportRequest {
        format: "merged".into(),
        job_dir: job.job_dir.display().to_string(),
        adapter_dir: job.adapter_dir.display().to_string(),
        base_model: base.display().to_string(),
        out: out.display().to_string(),
        checkpoint: None,
        trainer_state: None,
        job: job_record(job, base),
        metrics: vec![],
    }
}
