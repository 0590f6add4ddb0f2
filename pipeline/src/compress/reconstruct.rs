//! Least-squares reconstruction of narrowed MLPs (`reconstruct:` in a
//! pruning plan): label-free, training-free recovery.
//!
//! Narrowing an MLP keeps `k` of its neurons and slices its output
//! projection to their columns, so the removed neurons' contribution is
//! simply lost. Reconstruction re-fits the output projection (and its bias,
//! where the architecture has one) so that the kept neurons reproduce the
//! *full* MLP's output on calibration tokens:
//!
//! ```text
//! W', b' = argmin Σ_tokens ‖W' a_K + b' − (W a + b)‖² + λ ‖[W' b']‖²
//! ```
//!
//! where `a` is the full MLP's intermediate activation and `a_K` its kept
//! entries. Everything the solve needs is in one Gram matrix `G = Σ [a 1]ᵀ
//! [a 1]` per layer, so the calibration text runs through the model once
//! per reconstructed layer, and nothing per token is kept. Layers are
//! fitted in order: layer `l`'s inputs come from the pruned model with
//! layers `< l` already re-fitted (dropped MLPs skipped, removed neurons
//! masked), so each fit corrects what the layers before it left.
//!
//! The ridge `λ` is relative to the mean diagonal of the kept neurons' Gram
//! matrix, so one value suits every layer and model.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::compress::least_squares::{axpy, solve_positive_definite};
use crate::error::{Error, Result};
use crate::model::arch::ForwardHooks;
use crate::model::embedder::Embedder;

/// How to reconstruct (`reconstruct:` in `configs/prune-*.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconstructPlan {
    /// Ridge strength, relative to the mean diagonal of the kept neurons'
    /// Gram matrix; must be positive.
    #[serde(default = "default_ridge")]
    pub ridge: f64,
}

impl Default for ReconstructPlan {
    fn default() -> Self {
        Self {
            ridge: default_ridge(),
        }
    }
}

fn default_ridge() -> f64 {
    1e-4
}

impl ReconstructPlan {
    pub fn validate(&self) -> Result<()> {
        if !(self.ridge.is_finite() && self.ridge > 0.0) {
            return Err(Error::InvalidPlan(format!(
                "reconstruct.ridge {} must be a positive number",
                self.ridge
            )));
        }
        Ok(())
    }
}

/// A re-fitted output projection: `weight` `(hidden, kept)` and `bias`
/// `(hidden,)` (absent where the checkpoint's projection has none), `f32`.
#[derive(Debug, Clone)]
pub struct Projection {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// How closely one narrowed MLP reproduces the full MLP's output on the
/// calibration tokens, before and after its re-fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerFit {
    pub layer: usize,
    /// Neurons kept of `width`.
    pub kept: usize,
    pub width: usize,
    /// Calibration tokens the fit saw.
    pub tokens: usize,
    /// `Σ‖y_pruned − y_full‖² / Σ‖y_full‖²` with the sliced projection.
    pub relative_error_sliced: f64,
    /// The same with the re-fitted projection.
    pub relative_error_refit: f64,
}

/// Every re-fitted layer's projection and fit.
#[derive(Debug, Clone, Default)]
pub struct Reconstruction {
    pub projections: BTreeMap<usize, Projection>,
    pub fits: Vec<LayerFit>,
}

/// `Σ [a 1]ᵀ [a 1]` over tokens: the sufficient statistic of the fit.
#[derive(Debug, Clone)]
pub struct Gram {
    /// `width + 1`: the activation's entries, then the constant 1.
    pub size: usize,
    /// `size × size`, row-major.
    pub sums: Vec<f64>,
    pub tokens: usize,
}

impl Gram {
    pub fn new(width: usize) -> Self {
        Self {
            size: width + 1,
            sums: vec![0.0; (width + 1) * (width + 1)],
            tokens: 0,
        }
    }

    /// Adds the rows of `activations` `(N, width)`.
    pub fn add(&mut self, activations: &Tensor) -> candle_core::Result<()> {
        let (n, width) = activations.dims2()?;
        if width + 1 != self.size {
            candle_core::bail!(
                "activation width {width}, the Gram matrix is for {}",
                self.size - 1
            );
        }
        if n == 0 {
            return Ok(());
        }
        let rows = Tensor::cat(
            &[
                activations.to_dtype(DType::F32)?,
                Tensor::ones((n, 1), DType::F32, activations.device())?,
            ],
            1,
        )?;
        let batch: Vec<f32> = rows.t()?.matmul(&rows)?.flatten_all()?.to_vec1()?;
        for (sum, v) in self.sums.iter_mut().zip(batch) {
            *sum += v as f64;
        }
        self.tokens += n;
        Ok(())
    }
}

/// A least-squares output projection and how well it and the sliced one fit.
#[derive(Debug, Clone)]
pub struct FittedProjection {
    /// `hidden × kept`, row-major.
    pub weight: Vec<f64>,
    /// `hidden`, where a bias was fitted.
    pub bias: Option<Vec<f64>>,
    /// Relative output error of the sliced projection (see [`LayerFit`]).
    pub error_sliced: f64,
    /// Relative output error of the fitted projection.
    pub error_refit: f64,
}

/// The least-squares output projection of the `kept` neurons given the
/// full projection `down` (`hidden × width`, row-major) and `bias`, with
/// the fit's errors. `bias: None` fits no bias (the architecture has none).
pub fn fit_projection(
    gram: &Gram,
    kept: &[u32],
    down: &[f64],
    hidden: usize,
    bias: Option<&[f64]>,
    ridge: f64,
) -> std::result::Result<FittedProjection, String> {
    let width = gram.size - 1;
    assert_eq!(down.len(), hidden * width, "down is hidden × width");
    // Targets: the full projection as rows, one per activation entry (and
    // the bias as the constant's row): y = Σ_t a_t M[t].
    let targets: Vec<usize> = (0..width).chain(bias.map(|_| width)).collect();
    let mut m = vec![0.0; gram.size * hidden];
    for h in 0..hidden {
        for t in 0..width {
            m[t * hidden + h] = down[h * width + t];
        }
    }
    if let Some(b) = bias {
        m[width * hidden..].copy_from_slice(b);
    }
    // The fit's features: the kept entries (and the constant).
    let features: Vec<usize> = kept
        .iter()
        .map(|&j| j as usize)
        .chain(bias.map(|_| width))
        .collect();
    let g = |i: usize, j: usize| gram.sums[i * gram.size + j];
    // Q = G M over the targets; its feature rows are the normal equations'
    // right-hand side, and Σ M ⊙ Q is Σ‖y_full‖².
    let mut q = vec![0.0; gram.size * hidden];
    for &i in targets.iter() {
        let row = &mut q[i * hidden..(i + 1) * hidden];
        for &t in &targets {
            let v = g(i, t);
            if v != 0.0 {
                axpy(row, v, &m[t * hidden..(t + 1) * hidden]);
            }
        }
    }
    let total: f64 = targets
        .iter()
        .map(|&t| {
            dot(
                &m[t * hidden..(t + 1) * hidden],
                &q[t * hidden..(t + 1) * hidden],
            )
        })
        .sum();
    let f = features.len();
    let gff: Vec<f64> = features
        .iter()
        .flat_map(|&i| features.iter().map(move |&j| g(i, j)))
        .collect();
    let rhs: Vec<f64> = features
        .iter()
        .flat_map(|&i| q[i * hidden..(i + 1) * hidden].iter().copied())
        .collect();
    // Σ‖X_F a_F − y_full‖² = total − 2 Σ X ⊙ R + Σ X ⊙ (G_FF X).
    let error = |x: &[f64]| -> f64 {
        let mut gx = vec![0.0; f * hidden];
        for i in 0..f {
            for j in 0..f {
                axpy(
                    &mut gx[i * hidden..(i + 1) * hidden],
                    gff[i * f + j],
                    &x[j * hidden..(j + 1) * hidden],
                );
            }
        }
        let e = total - 2.0 * dot(x, &rhs) + dot(x, &gx);
        if total > 0.0 {
            e.max(0.0) / total
        } else {
            0.0
        }
    };
    let sliced: Vec<f64> = features
        .iter()
        .flat_map(|&i| m[i * hidden..(i + 1) * hidden].iter().copied())
        .collect();
    let error_sliced = error(&sliced);
    let mean_diagonal = (0..f).map(|i| gff[i * f + i]).sum::<f64>() / f.max(1) as f64;
    let lambda = ridge * mean_diagonal.max(f64::MIN_POSITIVE);
    let mut a = gff.clone();
    for i in 0..f {
        a[i * f + i] += lambda;
    }
    let mut x = rhs.clone();
    solve_positive_definite(&mut a, f, &mut x, hidden).map_err(|e| {
        format!(
            "the normal equations are not positive definite (pivot {} of {f} is {:e}); raise reconstruct.ridge",
            e.row, e.pivot
        )
    })?;
    let error_refit = error(&x);
    let k = kept.len();
    let mut weight = vec![0.0; hidden * k];
    for (c, row) in x.chunks(hidden).take(k).enumerate() {
        for (h, v) in row.iter().enumerate() {
            weight[h * k + c] = *v;
        }
    }
    Ok(FittedProjection {
        weight,
        bias: bias.map(|_| x[k * hidden..(k + 1) * hidden].to_vec()),
        error_sliced,
        error_refit,
    })
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One calibration pass: the pruned model (removed neurons masked, layers
/// before `target` with their re-fitted projections) with `target`'s full
/// activations summed into its Gram matrix.
struct ReconstructionPass<'a> {
    target: usize,
    masks: &'a [Option<Tensor>],
    kept: &'a [Option<Tensor>],
    projections: &'a BTreeMap<usize, Projection>,
    /// The kept activation of the layer whose re-fitted output comes next.
    kept_activation: Option<Tensor>,
    /// Indices of the batch's real tokens in `(B·T)`.
    tokens: Option<Tensor>,
    gram: Gram,
}

impl ForwardHooks for ReconstructionPass<'_> {
    fn mlp_activation(&mut self, layer: usize, activation: Tensor) -> candle_core::Result<Tensor> {
        if layer == self.target {
            let width = activation.dim(D::Minus1)?;
            let rows = activation.reshape(((), width))?.index_select(
                self.tokens.as_ref().expect("tokens set before each batch"),
                0,
            )?;
            self.gram.add(&rows)?;
        }
        if self.projections.contains_key(&layer) {
            let kept = self.kept[layer]
                .as_ref()
                .expect("re-fitted layers are narrowed");
            self.kept_activation = Some(activation.index_select(kept, D::Minus1)?);
            return Ok(activation);
        }
        match &self.masks[layer] {
            Some(mask) => activation.broadcast_mul(&mask.to_dtype(activation.dtype())?),
            None => Ok(activation),
        }
    }

    fn mlp_output(&mut self, layer: usize, output: Tensor) -> candle_core::Result<Tensor> {
        let Some(projection) = self.projections.get(&layer) else {
            return Ok(output);
        };
        let a = self
            .kept_activation
            .take()
            .expect("the activation hook ran first")
            .to_dtype(DType::F32)?;
        let y = a.broadcast_matmul(&projection.weight.t()?)?;
        let y = match &projection.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        y.to_dtype(output.dtype())
    }
}

/// Re-fits the output projection of every narrowed MLP, in layer order, on
/// `texts`. `kept` holds each layer's kept neurons (ascending indices into
/// the source MLP; `None` where the layer has no MLP or it was dropped); a
/// layer that keeps them all is left as it is. `embedder` must be the
/// source model that `tensors` hold, with the dropped MLPs already skipped.
pub fn reconstruct_mlps(
    embedder: &Embedder,
    tensors: &std::collections::HashMap<String, Tensor>,
    kept: &[Option<&[u32]>],
    plan: &ReconstructPlan,
    texts: &[String],
    batch_size: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Reconstruction> {
    plan.validate()?;
    let (dir, map) = (&embedder.setup().dir, embedder.setup().config.checkpoint());
    let prefix = map.prefix(tensors.keys());
    let widths: Vec<Option<usize>> = embedder
        .shape()
        .layers
        .iter()
        .map(|l| l.mlp.map(|m| m.intermediate_size))
        .collect();
    let narrowed: Vec<usize> = kept
        .iter()
        .enumerate()
        .filter_map(|(l, k)| (Some((*k)?.len()) != widths[l]).then_some(l))
        .collect();
    let mut masks = vec![None; kept.len()];
    let mut kept_index = vec![None; kept.len()];
    for &l in &narrowed {
        let neurons = kept[l].expect("narrowed layers keep neurons");
        let width = widths[l].expect("a narrowed layer has an MLP");
        let mut mask = vec![0f32; width];
        for &j in neurons {
            mask[j as usize] = 1.0;
        }
        masks[l] = Some(Tensor::new(mask.as_slice(), &Device::Cpu)?);
        kept_index[l] = Some(Tensor::new(neurons, &Device::Cpu)?);
    }
    let mut out = Reconstruction::default();
    for (i, &l) in narrowed.iter().enumerate() {
        progress(&format!(
            "reconstructing layer {l}'s MLP output ({}/{})",
            i + 1,
            narrowed.len()
        ));
        let width = widths[l].expect("a narrowed layer has an MLP");
        let mut pass = ReconstructionPass {
            target: l,
            masks: &masks,
            kept: &kept_index,
            projections: &out.projections,
            kept_activation: None,
            tokens: None,
            gram: Gram::new(width),
        };
        embedder.for_each_batch(texts, "", batch_size.max(1), &mut |input, _| {
            let mask: Vec<u32> = input.attention_mask.flatten_all()?.to_vec1()?;
            let real: Vec<u32> = (0..mask.len() as u32)
                .filter(|&i| mask[i as usize] == 1)
                .collect();
            pass.tokens = Some(Tensor::new(real.as_slice(), input.input_ids.device())?);
            embedder.hidden_states_hooked(input, &mut pass)?;
            Ok(())
        })?;
        let gram = pass.gram;
        let names = map.mlp_tensors(prefix, l);
        let down = tensors
            .get(&names.down)
            .ok_or_else(|| Error::MissingTensor {
                path: dir.to_path_buf(),
                tensor: names.down.clone(),
            })?;
        let (hidden, down_width) = down.dims2()?;
        if down_width != width {
            return Err(Error::InvalidArgument(format!(
                "{}: {} has {down_width} columns, layer {l}'s MLP has {width} neurons",
                dir.display(),
                names.down
            )));
        }
        let down: Vec<f64> = down.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let bias: Option<Vec<f64>> = tensors
            .get(&names.down_bias)
            .map(|b| b.to_dtype(DType::F64)?.to_vec1())
            .transpose()?;
        let neurons = kept[l].expect("narrowed layers keep neurons");
        let FittedProjection {
            weight,
            bias: new_bias,
            error_sliced: sliced,
            error_refit: refit,
        } = fit_projection(&gram, neurons, &down, hidden, bias.as_deref(), plan.ridge)
            .map_err(|e| Error::InvalidArgument(format!("layer {l}'s MLP: {e}")))?;
        tracing::info!(
            layer = l,
            tokens = gram.tokens,
            relative_error_sliced = sliced,
            relative_error_refit = refit,
            "reconstructed"
        );
        let to_tensor = |v: Vec<f64>, shape: &[usize]| -> candle_core::Result<Tensor> {
            Tensor::from_vec(
                v.into_iter().map(|x| x as f32).collect::<Vec<_>>(),
                shape,
                &Device::Cpu,
            )
        };
        out.projections.insert(
            l,
            Projection {
                weight: to_tensor(weight, &[hidden, neurons.len()])?,
                bias: new_bias.map(|b| to_tensor(b, &[hidden])).transpose()?,
            },
        );
        out.fits.push(LayerFit {
            layer: l,
            kept: neurons.len(),
            width,
            tokens: gram.tokens,
            relative_error_sliced: sliced,
            relative_error_refit: refit,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Activations of 5 neurons where neuron 3 is twice neuron 1 and neuron
    /// 4 is neuron 0 plus neuron 2: keeping 0, 1 and 2, a re-fit reproduces
    /// the full output exactly, while slicing loses neurons 3 and 4.
    #[test]
    fn a_refit_recovers_removed_neurons_that_the_kept_ones_span() {
        let mut rows = Vec::new();
        let mut state = 7u64;
        for _ in 0..64 {
            let mut r = [0f32; 5];
            for v in r.iter_mut().take(3) {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                *v = ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.3;
            }
            r[3] = 2.0 * r[1];
            r[4] = r[0] + r[2];
            rows.extend(r);
        }
        let activations = Tensor::from_vec(rows, (64, 5), &Device::Cpu).unwrap();
        let mut gram = Gram::new(5);
        gram.add(&activations).unwrap();
        assert_eq!(gram.tokens, 64);
        let hidden = 2;
        let down = [0.5, -1.0, 0.25, 0.75, 2.0, -0.5, 0.3, 1.0, -1.5, 0.1];
        let bias = [0.2, -0.1];
        let FittedProjection {
            weight,
            bias: new_bias,
            error_sliced: sliced,
            error_refit: refit,
        } = fit_projection(&gram, &[0, 1, 2], &down, hidden, Some(&bias), 1e-9).unwrap();
        assert!(sliced > 0.1, "slicing loses neurons 3 and 4: {sliced}");
        assert!(
            refit < 1e-6,
            "the kept neurons span the removed ones: {refit}"
        );
        // W' = W_K + W_3 · (2 e_1) + W_4 · (e_0 + e_2), bias unchanged.
        let expect = |h: usize| {
            let w = &down[h * 5..h * 5 + 5];
            [w[0] + w[4], w[1] + 2.0 * w[3], w[2] + w[4]]
        };
        for h in 0..hidden {
            for (c, e) in expect(h).iter().enumerate() {
                assert!(
                    (weight[h * 3 + c] - e).abs() < 1e-4,
                    "W'[{h}][{c}] = {} not {e}",
                    weight[h * 3 + c]
                );
            }
            assert!((new_bias.as_ref().unwrap()[h] - bias[h]).abs() < 1e-4);
        }
    }

    /// Keeping every neuron, the fit is the projection itself.
    #[test]
    fn keeping_every_neuron_fits_the_original_projection() {
        let a = Tensor::new(
            &[
                [1.0f32, 0.5, -0.2],
                [0.3, -1.0, 0.8],
                [-0.7, 0.2, 0.1],
                [0.9, 0.9, -0.4],
                [0.0, 0.4, 1.2],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let mut gram = Gram::new(3);
        gram.add(&a).unwrap();
        let down = [1.0, 2.0, 3.0, -1.0, 0.5, 0.25];
        let FittedProjection {
            weight,
            bias,
            error_sliced: sliced,
            error_refit: refit,
        } = fit_projection(&gram, &[0, 1, 2], &down, 2, Some(&[0.1, 0.2]), 1e-10).unwrap();
        assert!(sliced < 1e-12 && refit < 1e-8, "{sliced} {refit}");
        for (w, d) in weight.iter().zip(down) {
            assert!((w - d).abs() < 1e-4, "{w} vs {d}");
        }
        let bias = bias.unwrap();
        assert!((bias[0] - 0.1).abs() < 1e-4 && (bias[1] - 0.2).abs() < 1e-4);
    }

    /// Without a bias (gated decoder MLPs), none is fitted.
    #[test]
    fn no_bias_is_fitted_where_the_projection_has_none() {
        let a = Tensor::new(&[[1.0f32, 2.0], [0.5, -1.0], [2.0, 0.1]], &Device::Cpu).unwrap();
        let mut gram = Gram::new(2);
        gram.add(&a).unwrap();
        let FittedProjection {
            weight,
            bias,
            error_refit: refit,
            ..
        } = fit_projection(&gram, &[0], &[1.0, 1.0], 1, None, 1e-6).unwrap();
        assert!(bias.is_none());
        assert_eq!(weight.len(), 1);
        assert!(refit > 0.0 && refit < 1.0);
    }

    #[test]
    fn the_ridge_must_be_positive() {
        for ridge in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = ReconstructPlan { ridge }
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains("reconstruct.ridge"), "{err}");
        }
        ReconstructPlan::default().validate().unwrap();
    }
}
