//! The merge itself: `W' = W + scale * B @ A` for every adapted module, with lorad's (and PEFT's) scale
//! (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA; `LoraConfig::scale`).
use crate::base::BaseEntry;
use candle_core::Tensor;
use lorad_engine::adapter::LoadedAdapter;
use std::collections::HashMap;

/// The adapter's updates by the name of the base weight they apply to, checked against the base.
#[derive(Debug)]
pub struct Deltas {
    /// `model.layers.0.self_attn.q_proj.weight` -> (A `[r, in]`, B `[out, r]`).
    pairs: HashMap<String, (Tensor, Tensor)>,
    scale: f64,
}

impl Deltas {
    /// Pairs every adapted module with its base weight; an error names the first module that has no
    /// base weight or whose A/B do not fit its shape.
    pub fn new(adapter: &LoadedAdapter, base: &[BaseEntry]) -> Result<Self, String> {
        let shapes: HashMap<&str, &[usize]> = base
            .iter()
            .map(|e| (e.name.as_str(), e.shape.as_slice()))
            .collect();
        let mut modules: Vec<&String> = adapter.weights.keys().collect();
        modules.sort();
        let mut pairs = HashMap::new();
        for module in modules {
            let Some((a, b)) = adapter.weights.get(module) else {
                continue;
            };
            let weight = format!("{module}.weight");
            let Some(shape) = shapes.get(weight.as_str()) else {
                return Err(format!(
                    "module {module} is adapted but the base has no tensor {weight}"
                ));
            };
            let want = [b.dims().first().copied(), a.dims().get(1).copied()];
            if shape.len() != 2 || want != [Some(shape[0]), Some(shape[1])] {
                return Err(format!(
                    "{weight} has shape {shape:?}, but lora_B {:?} @ lora_A {:?} does not",
                    b.dims(),
                    a.dims()
                ));
            }
            pairs.insert(weight, (a.clone(), b.clone()));
        }
        Ok(Deltas {
            pairs,
            scale: adapter.lora_config().scale(),
        })
    }

    /// How many base weights get an update.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether no base weight gets an update.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Whether `name` gets an update.
    pub fn adapts(&self, name: &str) -> bool {
        self.pairs.contains_key(name)
    }

    /// `weight` with its update added, if `name` is adapted; unchanged otherwise. f32 throughout.
    pub fn apply(&self, name: &str, weight: Tensor) -> candle_core::Result<Tensor> {
        match self.pairs.get(name) {
            Some((a, b)) => weight.add(&b.matmul(a)?.affine(self.scale, 0.0)?),
            None => Ok(weight),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;
    use lorad_engine::adapter::AdapterConfig;

    fn adapter(use_rslora: bool) -> LoadedAdapter {
        let dev = Device::Cpu;
        let a = Tensor::from_slice(&[1f32, 2.0, 0.0, 1.0, 1.0, 0.0], (2, 3), &dev).unwrap();
        let b = Tensor::from_slice(&[1f32, 0.0, 0.0, 1.0], (2, 2), &dev).unwrap();
        let config: AdapterConfig = serde_json::from_value(serde_json::json!({
            "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
            "use_rslora": use_rslora,
        }))
        .unwrap();
        LoadedAdapter {
            config,
            weights: HashMap::from([("model.layers.0.self_attn.q_proj".to_string(), (a, b))]),
        }
    }

    fn entry(name: &str, shape: &[usize]) -> BaseEntry {
        BaseEntry {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn adds_the_scaled_update() {
        let base = [entry("model.layers.0.self_attn.q_proj.weight", &[2, 3])];
        let w = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        // alpha / r = 2: W' = 2 * B @ A = 2 * A.
        let d = Deltas::new(&adapter(false), &base).unwrap();
        let merged = d.apply(&base[0].name, w.clone()).unwrap();
        assert_eq!(
            merged.to_vec2::<f32>().unwrap(),
            [[2.0, 4.0, 0.0], [2.0, 2.0, 0.0]]
        );
        // rsLoRA: alpha / sqrt(r) = 2 * sqrt(2).
        let d = Deltas::new(&adapter(true), &base).unwrap();
        let merged = d.apply(&base[0].name, w.clone()).unwrap();
        assert!((merged.to_vec2::<f32>().unwrap()[0][1] - 4.0 * 2f32.sqrt()).abs() < 1e-6);
        // Other tensors pass through.
        let other = d.apply("model.norm.weight", w.clone()).unwrap();
        assert_eq!(other.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn names_the_module_that_does_not_fit() {
        let e = Deltas::new(&adapter(false), &[entry("model.norm.weight", &[3])]).unwrap_err();
        assert!(
            e.contains("no tensor model.layers.0.self_attn.q_proj.weight"),
            "{e}"
        );
        let base = [entry("model.layers.0.self_attn.q_proj.weight", &[3, 2])];
        let e = Deltas::new(&adapter(false), &base).unwrap_err();
        assert!(e.contains("has shape [3, 2]"), "{e}");
    }
}
