//! AdamW, global-norm gradient clipping and the learning-rate schedule, matching PyTorch / transformers
//! so that a run here and a run with HF Trainer + PEFT on the same data follow the same curve.
use candle_core::{Result, Tensor, Var};
use lorad_schema::Schedule;

/// AdamW hyper-parameters (torch.optim.AdamW's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW over a fixed list of variables. The moments are plain tensors so that a checkpoint can save
/// and restore them exactly.
pub struct AdamW {
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: u64,
    cfg: AdamWConfig,
}

impl AdamW {
    /// Zero moments for each of `params`.
    pub fn new(params: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let m = params
            .iter()
            .map(|p| p.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = params
            .iter()
            .map(|p| p.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            m,
            v,
            steps: 0,
            cfg,
        })
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// First and second moments, in parameter order.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Replaces the moments and the step count with a checkpoint's, so that the next `step` is exactly
    /// the one an uninterrupted run would take (bias correction depends on the count). Each moment must
    /// have its parameter's shape; they are moved to the parameter's device.
    pub fn restore(&mut self, m: Vec<Tensor>, v: Vec<Tensor>, steps: u64) -> Result<()> {
        if m.len() != self.params.len() || v.len() != self.params.len() {
            candle_core::bail!(
                "AdamW: {}/{} moments for {} parameters",
                m.len(),
                v.len(),
                self.params.len()
            );
        }
        let mut moved = (Vec::with_capacity(m.len()), Vec::with_capacity(v.len()));
        for ((p, m), v) in self.params.iter().zip(m).zip(v) {
            if m.dims() != p.dims() || v.dims() != p.dims() {
                candle_core::bail!(
                    "AdamW: moments {:?}/{:?} for a parameter of shape {:?}",
                    m.dims(),
                    v.dims(),
                    p.dims()
                );
            }
            moved.0.push(m.to_dtype(p.dtype())?.to_device(p.device())?);
            moved.1.push(v.to_dtype(p.dtype())?.to_device(p.device())?);
        }
        (self.m, self.v) = moved;
        self.steps = steps;
        Ok(())
    }

    /// One update with `grads` (same order as the parameters) at learning rate `lr`, exactly as
    /// torch's single-tensor AdamW: decay, moments, bias correction, `p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!(
                "AdamW: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        self.steps += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let t = self.steps as i32;
        let step_size = lr / (1.0 - beta1.powi(t));
        let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        for (i, p) in self.params.iter().enumerate() {
            let g = grads[i].detach();
            let mut w = p.as_tensor().detach();
            if weight_decay != 0.0 {
                w = w.affine(1.0 - lr * weight_decay, 0.0)?;
            }
            let m = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, eps)?;
            let w = (w - (m.div(&denom)? * step_size)?)?;
            p.set(&w)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm` (0 = no clipping), like
/// `torch.nn.utils.clip_grad_norm_`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.iter() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

/// Linear warmup, then cosine / linear decay to 0 at `total` steps, or constant
/// (transformers' `get_{cosine,linear,constant}_schedule_with_warmup`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// Total optimizer steps.
    pub total: u64,
    /// Shape after warmup.
    pub kind: Schedule,
}

impl LrSchedule {
    /// The learning rate of optimizer step `step` (1-based). As in transformers, step s uses the
    /// schedule's value after s-1 scheduler steps, so with warmup the very first step has lr 0.
    pub fn lr(&self, step: u64) -> f64 {
        let s = step.saturating_sub(1) as f64;
        let warmup = self.warmup as f64;
        if s < warmup {
            return self.peak * s / warmup.max(1.0);
        }
        let span = (self.total as f64 - warmup).max(1.0);
        let factor = match self.kind {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((self.total as f64 - s) / span).max(0.0),
            Schedule::Cosine => {
                let progress = (s - warmup) / span;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.peak * factor
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_torch() {
        // torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), p0 = [1.0, -2.0],
        // grads [0.5, 0.1] then [-0.3, 0.2]; torch 2.15 gives [0.899, -2.098] after step 1.
        let p = Var::from_slice(&[1f32, -2.0], 2, &Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = AdamW::new(vec![p.clone()], cfg).unwrap();
        opt.step(
            &[Tensor::from_slice(&[0.5f32, 0.1], 2, &Device::Cpu).unwrap()],
            0.1,
        )
        .unwrap();
        let v = p.to_vec1::<f32>().unwrap();
        assert!(
            (v[0] - 0.899).abs() < 1e-5 && (v[1] + 2.098).abs() < 1e-5,
            "{v:?}"
        );
        opt.step(
            &[Tensor::from_slice(&[-0.3f32, 0.2], 2, &Device::Cpu).unwrap()],
            0.1,
        )
        .unwrap();
        let v = p.to_vec1::<f32>().unwrap();
        // torch 2.15 prints [0.8789512515068054, -2.192420244216919] after step 2.
        assert!(
            (v[0] - 0.878_951_25).abs() < 1e-6 && (v[1] + 2.192_420_2).abs() < 1e-6,
            "{v:?}"
        );
        assert_eq!(opt.steps(), 2);

        // A fresh optimizer given step 1's moments and count takes the same second step.
        let q = Var::from_slice(&[0.899f32, -2.098], 2, &Device::Cpu).unwrap();
        let mut fresh = AdamW::new(vec![q.clone()], cfg).unwrap();
        let mut first = AdamW::new(
            vec![Var::from_slice(&[1f32, -2.0], 2, &Device::Cpu).unwrap()],
            cfg,
        )
        .unwrap();
        first
            .step(
                &[Tensor::from_slice(&[0.5f32, 0.1], 2, &Device::Cpu).unwrap()],
                0.1,
            )
            .unwrap();
        q.set(first.params[0].as_tensor()).unwrap();
        let (m, v) = first.moments();
        fresh.restore(m.to_vec(), v.to_vec(), 1).unwrap();
        fresh
            .step(
                &[Tensor::from_slice(&[-0.3f32, 0.2], 2, &Device::Cpu).unwrap()],
                0.1,
            )
            .unwrap();
        assert_eq!(q.to_vec1::<f32>().unwrap(), p.to_vec1::<f32>().unwrap());
        assert!(fresh
            .restore(vec![], vec![], 1)
            .unwrap_err()
            .to_string()
            .contains("0/0 moments for 1 parameters"));
    }

    #[test]
    fn clipping_scales_to_max_norm_and_reports_the_raw_norm() {
        let mut g = vec![
            Tensor::from_slice(&[3f32, 0.0], 2, &Device::Cpu).unwrap(),
            Tensor::from_slice(&[4f32], 1, &Device::Cpu).unwrap(),
        ];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        assert!((g[1].to_vec1::<f32>().unwrap()[0] - 0.8).abs() < 1e-5);
        let n = clip_grad_norm(&mut g, 10.0).unwrap();
        assert!((n - 1.0).abs() < 1e-5);
        assert!(
            (g[0].to_vec1::<f32>().unwrap()[0] - 0.6).abs() < 1e-5,
            "unchanged under the limit"
        );
    }

    #[test]
    fn schedules_follow_transformers() {
        let s = |kind| LrSchedule {
            peak: 1.0,
            warmup: 2,
            total: 10,
            kind,
        };
        let cos = s(Schedule::Cosine);
        assert_eq!(cos.lr(1), 0.0);
        assert_eq!(cos.lr(2), 0.5);
        assert_eq!(cos.lr(3), 1.0);
        assert!(
            (cos.lr(7) - 0.5).abs() < 1e-12,
            "half-way through the decay"
        );
        assert!(cos.lr(10) > 0.0 && cos.lr(11) < 1e-12);
        let lin = s(Schedule::Linear);
        assert!((lin.lr(7) - 0.5).abs() < 1e-12);
        assert_eq!(lin.lr(11), 0.0);
        assert_eq!(s(Schedule::Constant).lr(9), 1.0);
        let no_warmup = LrSchedule {
            peak: 2.0,
            warmup: 0,
            total: 4,
            kind: Schedule::Cosine,
        };
        assert_eq!(no_warmup.lr(1), 2.0);
    }
}
