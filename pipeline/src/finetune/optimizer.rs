//! AdamW with its state in the open (so checkpoints can save and restore it
//! bit for bit), a warmup-then-decay learning-rate schedule, and gradient
//! clipping by global norm.

use std::collections::BTreeMap;

use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// How the learning rate decays after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    #[default]
    Linear,
    Cosine,
    Constant,
}

/// Learning rate at `step` (0-based) of `total`: linear warmup from 0 over
/// `warmup` steps, then `decay` to 0 at `total`.
pub fn learning_rate(peak: f64, step: usize, warmup: usize, total: usize, decay: Decay) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
    match decay {
        Decay::Linear => peak * (1.0 - progress),
        Decay::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        Decay::Constant => peak,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW over named variables; moments are kept by name.
pub struct AdamW {
    pub settings: AdamWSettings,
    /// Steps taken (bias correction).
    pub step: u64,
    pub first: BTreeMap<String, Tensor>,
    pub second: BTreeMap<String, Tensor>,
}

impl AdamW {
    pub fn new(settings: AdamWSettings) -> Self {
        Self {
            settings,
            step: 0,
            first: BTreeMap::new(),
            second: BTreeMap::new(),
        }
    }

    /// One update of every variable that has a gradient in `grads`.
    pub fn step(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        let s = self.settings;
        let t = self.step as i32;
        let bc1 = 1.0 - s.beta1.powi(t);
        let bc2 = 1.0 - s.beta2.powi(t);
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            let m = match self.first.get(name) {
                Some(m) => ((m * s.beta1)? + (g * (1.0 - s.beta1))?)?,
                None => (g * (1.0 - s.beta1))?,
            };
            let v = match self.second.get(name) {
                Some(v) => ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?,
                None => (g.sqr()? * (1.0 - s.beta2))?,
            };
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + s.eps)?)?;
            let w = var.as_tensor();
            let decayed = (w * (1.0 - lr * s.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.first.insert(name.clone(), m);
            self.second.insert(name.clone(), v);
        }
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_rises_linearly_then_decays_to_zero() {
        let lr = |s| learning_rate(1.0, s, 4, 12, Decay::Linear);
        assert_eq!(lr(0), 0.25);
        assert_eq!(lr(3), 1.0);
        assert!((lr(8) - 0.5).abs() < 1e-12);
        assert_eq!(lr(12), 0.0);
        let cos = |s| learning_rate(1.0, s, 0, 10, Decay::Cosine);
        assert!(
            (cos(0) - 1.0).abs() < 1e-12 && (cos(5) - 0.5).abs() < 1e-12 && cos(10).abs() < 1e-12
        );
    }

    #[test]
    fn adamw_moves_a_parameter_against_its_gradient() {
        let dev = candle_core::Device::Cpu;
        let var = Var::new(&[1.0f32, -1.0], &dev).unwrap();
        let vars = BTreeMap::from([("w".to_string(), var.clone())]);
        let grads =
            BTreeMap::from([("w".to_string(), Tensor::new(&[0.5f32, -0.5], &dev).unwrap())]);
        let mut opt = AdamW::new(AdamWSettings {
            weight_decay: 0.0,
            ..Default::default()
        });
        opt.step(&vars, &grads, 0.1).unwrap();
        let w: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        // First Adam step moves each weight by lr against the gradient's sign.
        assert!(
            (w[0] - 0.9).abs() < 1e-5 && (w[1] + 0.9).abs() < 1e-5,
            "{w:?}"
        );
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let dev = candle_core::Device::Cpu;
        let mut grads = BTreeMap::from([
            ("a".to_string(), Tensor::new(&[3.0f32], &dev).unwrap()),
            ("b".to_string(), Tensor::new(&[4.0f32], &dev).unwrap()),
        ]);
        let before = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-6);
        let after = clip_grad_norm(&mut grads, 0.0).unwrap();
        assert!((after - 1.0).abs() < 1e-4, "{after}");
    }
}
