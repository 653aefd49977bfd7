//! The Llama MLP's last two steps as one op: `(silu(gate) * up) @ down^T` for a frozen `down`.
//!
//! Composed, the SwiGLU output `[n, intermediate]` is the down projection's input and the graph keeps
//! it for backward, though a frozen projection's backward needs only its weight: it is a third of the
//! MLP's activations (Llama-3.2-1B at 512 tokens: 268 MB over its 16 layers). Here it is a transient
//! of the forward pass; backward computes `d(swiglu) = grad @ down` and turns it into the gradients of
//! `gate` and `up` in one sweep, as the SwiGLU op does. The products are the ones `frozen_linear`
//! computes (same gemm calls, same widened weight), so the values are the composition's bit for bit.
//!
//! Only for a `down` with no adapter and no bias: an adapted one needs its input for its LoRA
//! gradients (the engine composes then).
use crate::cpu::{contiguous_f32, gemm_new, Operand, Read};
use crate::frozen::Frozen;
use crate::swiglu::swiglu;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `swiglu(gate, up) @ down^T` for `gate`, `up` `[n, intermediate]` and a frozen `down`
/// `[out, intermediate]` (never gets a gradient) -> `[n, out]`; `gate` and `up` get gradients.
///
/// f32 on the CPU runs the fused op; elsewhere the composition (`swiglu`, then `frozen_linear`).
pub fn swiglu_linear(gate: &Tensor, up: &Tensor, down: &Frozen) -> Result<Tensor> {
    let fused = crate::linear::supported(&[gate, up]) && down.device().is_cpu();
    if !fused {
        return crate::linear::frozen_linear(&swiglu(gate, up)?, down);
    }
    let (n, i) = gate.dims2()?;
    let (_, di) = down.dims2()?;
    if up.dims() != [n, i] || di != i {
        bail!(
            "swiglu-linear: gate {:?}, up {:?} and a down projection {:?}",
            gate.dims(),
            up.dims(),
            down.dims()
        );
    }
    let down = match down {
        Frozen::Dense(w) => Frozen::Dense(w.detach().contiguous()?),
        q => q.clone(),
    };
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, SwigluLinear { down })
}

/// The op on (`gate`, `up`), both contiguous f32 `[n, intermediate]`, with the frozen weight inside.
struct SwigluLinear {
    down: Frozen,
}

impl CustomOp2 for SwigluLinear {
    fn name(&self) -> &'static str {
        "swiglu-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (
            contiguous_f32("swiglu-linear", s1, l1)?,
            contiguous_f32("swiglu-linear", s2, l2)?,
        );
        let (n, i) = l1.shape().dims2()?;
        let (out, _) = self.down.dims2()?;
        // The SwiGLU output lives only until the product has read it.
        let s = crate::swiglu::forward(g, u)?;
        let y = self
            .down
            .with_f32(|w| gemm_new(Operand::plain(&s), Operand::t(w), (n, out, i), 1.0))?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (n, out) = grad.dims2()?;
        let (wo, i) = self.down.dims2()?;
        if wo != out || gate.dims() != [n, i] {
            bail!("swiglu-linear backward: gradient [{n}, {out}] for a weight [{wo}, {i}]");
        }
        let rg = Read::new(&grad);
        let dy = rg.f32("swiglu-linear backward")?;
        // d(swiglu) = grad @ down, as frozen_linear's backward computes it.
        let ds = self
            .down
            .with_f32(|w| gemm_new(Operand::plain(dy), Operand::plain(w), (n, i, out), 1.0))?;
        let (rgate, rup) = (Read::new(gate), Read::new(up));
        let (g, u) = (
            rgate.f32("swiglu-linear backward")?,
            rup.f32("swiglu-linear backward")?,
        );
        let both = crate::swiglu::backward(g, u, &ds)?;
        let both = Tensor::from_vec(both, (2, n, i), gate.device())?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::linear::frozen_linear;
    use crate::testing::random;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{DType, Device, Var};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::sync::Arc;

    /// Output and both gradients of `f(gate, up)` against a random upstream gradient.
    fn run(
        gate0: &Tensor,
        up0: &Tensor,
        r: &Tensor,
        f: impl Fn(&Tensor, &Tensor) -> Tensor,
    ) -> Vec<Vec<f32>> {
        let (g, u) = (
            Var::from_tensor(gate0).unwrap(),
            Var::from_tensor(up0).unwrap(),
        );
        let y = f(g.as_tensor(), u.as_tensor());
        let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        [&y, grads.get(&g).unwrap(), grads.get(&u).unwrap()]
            .iter()
            .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }

    #[test]
    fn equals_swiglu_then_frozen_linear_bit_for_bit_in_every_stored_form() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (n, i, out) = (9, 256, 24);
        let gate = random(&mut rng, &[n, i], 8.0);
        let up = random(&mut rng, &[n, i], 2.0);
        let w = random(&mut rng, &[out, i], 0.5);
        let r = random(&mut rng, &[n, out], 1.0);
        let downs = [
            Frozen::Dense(w.clone()),
            Frozen::Dense(w.to_dtype(DType::BF16).unwrap()),
            Frozen::Quantized(Arc::new(QTensor::quantize(&w, GgmlDType::Q4K).unwrap())),
        ];
        for down in downs {
            let fused = run(&gate, &up, &r, |g, u| swiglu_linear(g, u, &down).unwrap());
            let composed = run(&gate, &up, &r, |g, u| {
                frozen_linear(&swiglu(g, u).unwrap(), &down).unwrap()
            });
            for (what, (a, b)) in ["value", "d gate", "d up"]
                .iter()
                .zip(fused.iter().zip(&composed))
            {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{} {what}",
                    down.stored_type()
                );
            }
        }
    }

    #[test]
    fn other_devices_and_dtypes_compose() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let gate = random(&mut rng, &[3, 32], 4.0);
        let up = random(&mut rng, &[3, 32], 1.0);
        let w = random(&mut rng, &[5, 32], 1.0);
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let y = swiglu_linear(&f64s(&gate), &f64s(&up), &Frozen::Dense(f64s(&w))).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        let want = swiglu_linear(&gate, &up, &Frozen::Dense(w)).unwrap();
        crate::testing::assert_close(&y.to_dtype(DType::F32).unwrap(), &want, "f64");
        assert!(swiglu_linear(
            &gate,
            &up.narrow(1, 0, 16).unwrap(),
            &Frozen::Dense(Tensor::zeros((5, 32), DType::F32, &Device::Cpu).unwrap())
        )
        .is_err());
    }
}
