//! Tests of the forward pass on the tiny model.
use super::*;
use crate::ops::causal_mask;
use crate::tiny::make_tiny_model;
use crate::weights;
use candle_core::DType;
use rand::SeedableRng;

fn lora(targets: &[&str]) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        use_rslora: false,
    }
}

fn tiny(targets: &[&str]) -> (tempfile::TempDir, Llama) {
    let dir = tempfile::tempdir().unwrap();
    make_tiny_model(dir.path(), 11).unwrap();
    let model = Llama::load(
        dir.path(),
        &lora(targets),
        &mut ChaCha8Rng::seed_from_u64(5),
        64,
        &Device::Cpu,
    )
    .unwrap();
    (dir, model)
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

#[test]
fn causal_mask_and_window() {
    let m = causal_mask(3, None, &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(m[0][1], f32::NEG_INFINITY);
    assert_eq!(m[2], vec![0.0, 0.0, 0.0]);
    let w = causal_mask(3, Some(2), &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(w[2], vec![f32::NEG_INFINITY, 0.0, 0.0]);
}

#[test]
fn tiny_model_forward_shapes_and_causality() {
    let (_dir, model) = tiny(&["q_proj", "v_proj"]);
    let cfg = model.config().clone();
    let batch = ids(&[&[0, 5, 9, 30, 7], &[0, 40, 41, 42, 0]]);
    let logits = model.logits(&batch).unwrap();
    assert_eq!(logits.dims(), &[2, 5, cfg.vocab_size]);
    let h = model.hidden(&batch, None).unwrap();
    assert_eq!(h.dims(), &[2, 5, cfg.hidden_size]);
    let all = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(all.iter().all(|v| v.is_finite()));
    // Causality: a prefix's logits do not depend on later tokens.
    let prefix = model.logits(&ids(&[&[0, 5, 9]])).unwrap();
    let full = logits.narrow(0, 0, 1).unwrap().narrow(1, 0, 3).unwrap();
    let diff = (prefix - full)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "prefix logits changed by {diff}");
    // Random init: near-uniform predictions, loss close to ln(vocab).
    let positions = Tensor::from_slice(&[0u32, 1, 2, 3], 4, &Device::Cpu).unwrap();
    let labels = Tensor::from_slice(&[5u32, 9, 30, 7], 4, &Device::Cpu).unwrap();
    let loss = model
        .loss_sum(&batch, &positions, &labels, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        / 4.0;
    assert!(
        (loss - (cfg.vocab_size as f32).ln()).abs() < 0.5,
        "initial loss {loss}"
    );
}

#[test]
fn adapter_starts_as_identity_and_base_is_frozen() {
    let (_dir, adapted) = tiny(&[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]);
    let (_dir2, plain) = tiny(&[]);
    assert_eq!(
        adapted.lora_modules().len(),
        7 * adapted.config().num_hidden_layers
    );
    assert!(plain.trainable_vars().is_empty());
    for (name, pair) in adapted.lora_modules() {
        let b = pair.b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(b.iter().all(|v| *v == 0.0), "{name}: lora_B starts at zero");
    }
    for (name, t) in adapted.base_tensors() {
        assert!(!t.is_variable(), "{name} is a plain tensor, not a Var");
    }
    let batch = ids(&[&[0, 5, 9, 30, 7]]);
    let a = adapted
        .logits(&batch)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let p = plain
        .logits(&batch)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, p, "B = 0: the adapted model equals the base model");
}

#[test]
fn load_errors_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny_model(dir.path(), 1).unwrap();
    let cfg = ModelConfig::load(dir.path()).unwrap();
    let mut tensors = weights::load_weights(dir.path(), &Device::Cpu, DType::F32).unwrap();
    tensors.remove("model.layers.2.mlp.up_proj.weight");
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let e = Llama::from_tensors(
        cfg.clone(),
        tensors,
        dir.path(),
        &lora(&[]),
        &mut rng,
        8,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("missing tensor model.layers.2.mlp.up_proj.weight"),
        "{e}"
    );
    let untied = ModelConfig {
        tie_word_embeddings: false,
        ..cfg
    };
    let tensors = weights::load_weights(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let e = Llama::from_tensors(
        untied,
        tensors,
        dir.path(),
        &lora(&[]),
        &mut rng,
        8,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(e.to_string().contains("lm_head.weight"), "{e}");
}
