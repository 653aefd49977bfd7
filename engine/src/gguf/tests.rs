//! GGUF weights: names, the Q/K permutation and dequantization, checked against the tiny HF model the
//! file is written from (see `fixture`).
use super::fixture::*;
use super::*;
use crate::source::{check_model, ModelSource};
use crate::tiny;
use crate::weights::load_weights;
use candle_core::quantized::GgmlDType;
use candle_core::DType;

#[test]
fn permutation_round_trips_and_moves_rows() {
    let t = Tensor::arange(0f32, 16.0, &Device::Cpu)
        .unwrap()
        .reshape((8, 2))
        .unwrap();
    let p = permute_qk(&t, 2, false).unwrap();
    // Head 0 has rows 0..4 = halves [0, 1 | 2, 3]; interleaved: 0, 2, 1, 3.
    assert_eq!(
        p.to_vec2::<f32>().unwrap()[..4],
        [[0., 1.], [4., 5.], [2., 3.], [6., 7.]]
    );
    assert_eq!(max_abs_diff(&permute_qk(&p, 2, true).unwrap(), &t), 0.0);
    assert!(permute_qk(&t, 3, true).is_err());
}

#[test]
fn f32_gguf_gives_the_hf_models_logits() {
    let root = tiny_dir();
    let hf = root.path().join("hf");
    let gguf = root.path().join("tiny.gguf");
    write_gguf(&hf, &gguf, &Fixture::default());

    let cfg = check_model(&gguf).unwrap();
    let hf_cfg = check_model(&hf).unwrap();
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.kv_heads(),
            cfg.vocab_size,
            cfg.head_dim()
        ),
        (
            hf_cfg.hidden_size,
            hf_cfg.num_hidden_layers,
            hf_cfg.kv_heads(),
            hf_cfg.vocab_size,
            hf_cfg.head_dim()
        )
    );
    assert!(cfg.tie_word_embeddings, "no output.weight means tied");
    assert_eq!(cfg.rope().rope_theta, hf_cfg.rope().rope_theta);

    let ids = Tensor::new(&[[0u32, 17, 250, 33, 901, 5, 64, 2, 400, 9]], &Device::Cpu).unwrap();
    let want = load(&hf).logits(&ids).unwrap();
    let got = load(&gguf).logits(&ids).unwrap();
    assert!(
        max_abs_diff(&want, &got) < 1e-6,
        "diff {}",
        max_abs_diff(&want, &got)
    );

    // The same file without the converter's permutation loads, but its rows are wrong for our RoPE:
    // so the check above really tests that the permutation is undone.
    let raw = root.path().join("unpermuted.gguf");
    write_gguf(
        &hf,
        &raw,
        &Fixture {
            permute: false,
            ..Fixture::default()
        },
    );
    let wrong = load(&raw).logits(&ids).unwrap();
    assert!(
        max_abs_diff(&want, &wrong) > 1e-4,
        "the permutation must matter"
    );
}

#[test]
fn quantized_weights_dequantize_within_the_format_bound() {
    let root = tiny_dir();
    let hf = root.path().join("hf");
    let want = load_weights(&hf, &Device::Cpu, DType::F32).unwrap();
    // Q8_0: d = amax / 127 (stored as f16), error <= d / 2 plus d's rounding times 127.
    let q8_bound: fn(f32) -> f32 = |amax| amax * (0.5 / 127.0 + 1.0 / 1024.0);
    // Q4_0: d = -max / 8, values rounded to 16 levels; -max itself clips to 7d, error |d|.
    let q4_bound: fn(f32) -> f32 = |amax| amax * (1.0 / 8.0 + 1.0 / 1024.0);
    for (dtype, bound) in [(GgmlDType::Q8_0, q8_bound), (GgmlDType::Q4_0, q4_bound)] {
        let gguf = root.path().join(format!("{}.gguf", dtype_name(dtype)));
        write_gguf(
            &hf,
            &gguf,
            &Fixture {
                matrices: dtype,
                embedding: GgmlDType::Q8_0,
                ..Fixture::default()
            },
        );
        let got = ModelSource::open(&gguf)
            .unwrap()
            .tensors(&Device::Cpu)
            .unwrap();
        assert_eq!(got.len(), want.len());
        let mut worst = 0f32;
        for (name, w) in &want {
            let g = &got[name];
            assert_eq!(g.dims(), w.dims(), "{name}");
            let (w, g) = (
                w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            if w.len() <= tiny::HIDDEN {
                assert_eq!(w, g, "{name}: F32 norms are exact");
                continue;
            }
            // Blocks of 32 run along rows (the last dimension), which the Q/K permutation keeps whole.
            for (bw, bg) in w.chunks(32).zip(g.chunks(32)) {
                let amax = bw.iter().fold(0f32, |m, x| m.max(x.abs()));
                let err = bw
                    .iter()
                    .zip(bg)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                // The embedding is always Q8_0.
                let limit = if name == "model.embed_tokens.weight" {
                    q8_bound(amax)
                } else {
                    bound(amax)
                };
                assert!(
                    err <= limit,
                    "{name} ({}): error {err} > {limit}",
                    dtype_name(dtype)
                );
                worst = worst.max(err / amax.max(f32::MIN_POSITIVE));
            }
        }
        assert!(
            worst > 0.0,
            "{}: quantization must be lossy",
            dtype_name(dtype)
        );
        // And the quantized model still runs.
        let ids = Tensor::new(&[[0u32, 17, 250]], &Device::Cpu).unwrap();
        assert_eq!(
            load(&gguf).logits(&ids).unwrap().dims(),
            &[1, 3, tiny::VOCAB]
        );
    }
}

#[test]
fn qwen2_gguf_keeps_hf_row_order() {
    let root = tiny_dir();
    let hf = root.path().join("hf");
    let gguf = root.path().join("qwen2.gguf");
    // llama.cpp converts Qwen2 without the Q/K permutation (its ggml RoPE is the NeoX one).
    let fx = Fixture {
        arch: "qwen2",
        permute: false,
        ..Fixture::default()
    };
    write_gguf(&hf, &gguf, &fx);
    let cfg = check_model(&gguf).unwrap();
    assert_eq!(cfg.model_type.as_deref(), Some("qwen2"));
    let ids = Tensor::new(&[[0u32, 17, 250, 33, 901]], &Device::Cpu).unwrap();
    let want = load(&hf).logits(&ids).unwrap();
    let got = load(&gguf).logits(&ids).unwrap();
    assert!(max_abs_diff(&want, &got) < 1e-6);
}

#[test]
fn a_truncated_gguf_file_is_refused_at_check_naming_the_tensor() {
    let root = tiny_dir();
    let hf = root.path().join("hf");
    let gguf = root.path().join("tiny.gguf");
    write_gguf(&hf, &gguf, &Fixture::default());
    check_model(&gguf).unwrap();
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&gguf, &bytes[..bytes.len() - 100]).unwrap();
    let e = check_model(&gguf).unwrap_err().to_string();
    assert!(
        e.contains("truncated: tensor")
            && e.contains(&format!("the file has {}", bytes.len() - 100)),
        "{e}"
    );
}
