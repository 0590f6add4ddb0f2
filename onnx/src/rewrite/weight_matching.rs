//! Pass 2: which checkpoint tensor each graph weight holds, by value, then
//! by the graph's structure as the checkpoint map describes it.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Tensor};
use candle_onnx::onnx::{GraphProto, NodeProto};
use effir_pipeline::model::arch::checkpoint_map::{CheckpointMap, NormPlacement};
use effir_pipeline::Architecture;
use serde::Serialize;

use super::graph_index::{hash, value_of, Source};
use crate::error::Result;
use crate::graph_file::float_values;
use crate::node_index::NodeIndex;

/// How a graph weight relates to a checkpoint tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Orientation {
    AsStored,
    /// The graph holds `Wᵀ` (a MatMul weight).
    Transposed,
}

/// A checkpoint's tensors with names stripped of the `bert.` / `model.`
/// prefix, as float32 values.
pub(super) struct Checkpoint {
    pub(super) tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Checkpoint {
    pub(super) fn load(dir: &Path, arch: Architecture) -> Result<Self> {
        let all = effir_pipeline::io::weights::load_all_tensors(dir)?;
        let prefix = arch.checkpoint().prefix(all.keys()).to_string();
        let mut tensors = HashMap::new();
        for (name, t) in all {
            let t = t.to_dtype(DType::F32)?;
            let dims = t.dims().to_vec();
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            let short = name.strip_prefix(&prefix).unwrap_or(&name).to_string();
            tensors.insert(short, (dims, values));
        }
        Ok(Self { tensors })
    }

    /// Values in the graph's orientation.
    pub(super) fn oriented(
        &self,
        name: &str,
        orientation: Orientation,
    ) -> Option<(Vec<i64>, Vec<f32>)> {
        let (dims, values) = self.tensors.get(name)?;
        match orientation {
            Orientation::AsStored => {
                Some((dims.iter().map(|&d| d as i64).collect(), values.clone()))
            }
            Orientation::Transposed => {
                let (r, c) = (dims[0], dims[1]);
                let t = Tensor::from_vec(values.clone(), (r, c), &candle_core::Device::Cpu).ok()?;
                let v = t
                    .t()
                    .ok()?
                    .contiguous()
                    .ok()?
                    .flatten_all()
                    .ok()?
                    .to_vec1::<f32>()
                    .ok()?;
                Some((vec![c as i64, r as i64], v))
            }
        }
    }
}

/// Which checkpoint tensor each graph weight holds.
pub(super) struct WeightMatch {
    /// Graph weights matched to one checkpoint tensor, in the graph's orientation.
    pub(super) assigned: HashMap<Source, (String, Orientation)>,
    /// Graph value names of every weight whose values some checkpoint tensor has.
    pub(super) by_value: HashMap<String, Source>,
    /// Weights that match several checkpoint tensors with different new values.
    pub(super) unresolved: Vec<String>,
}

/// Matches graph weights to the original checkpoint's tensors by value:
/// unique matches first, then biases and norms by the graph's structure,
/// then what is left when the names other weights took are set aside.
pub(super) fn match_weights(
    graph: &GraphProto,
    idx: &NodeIndex,
    base: &Path,
    arch: Architecture,
    original: &Checkpoint,
    target: &Checkpoint,
) -> Result<WeightMatch> {
    // Every checkpoint tensor by the hash of its values (and of its transpose).
    let mut by_hash: HashMap<blake3::Hash, Vec<(String, Orientation)>> = HashMap::new();
    for (name, (dims, values)) in &original.tensors {
        by_hash
            .entry(hash(values))
            .or_default()
            .push((name.clone(), Orientation::AsStored));
        if dims.len() == 2 && dims[0] > 1 && dims[1] > 1 {
            if let Some((_, t)) = original.oriented(name, Orientation::Transposed) {
                by_hash
                    .entry(hash(&t))
                    .or_default()
                    .push((name.clone(), Orientation::Transposed));
            }
        }
    }
    let mut candidates: HashMap<Source, Vec<(String, Orientation)>> = HashMap::new();
    let mut source_name: HashMap<Source, String> = HashMap::new();
    for (i, t) in graph.initializer.iter().enumerate() {
        if let Some(values) = float_values(t, base)? {
            if let Some(c) = by_hash.get(&hash(&values)) {
                candidates.insert(Source::Initializer(i), c.clone());
            }
            source_name.insert(Source::Initializer(i), t.name.clone());
        }
    }
    for (i, n) in graph.node.iter().enumerate() {
        if n.op_type != "Constant" {
            continue;
        }
        if let Some(t) = n
            .attribute
            .iter()
            .find(|a| a.name == "value")
            .and_then(|a| a.t.as_ref())
        {
            if t.dims.iter().product::<i64>() > 1 {
                if let Some(values) = float_values(t, base)? {
                    if let Some(c) = by_hash.get(&hash(&values)) {
                        candidates.insert(Source::Constant(i), c.clone());
                    }
                    source_name.insert(Source::Constant(i), n.output[0].clone());
                }
            }
        }
    }

    let mut assigned: HashMap<Source, (String, Orientation)> = HashMap::new();
    for (s, c) in &candidates {
        let distinct: HashSet<&String> = c.iter().map(|(n, _)| n).collect();
        if distinct.len() == 1 {
            assigned.insert(*s, c[0].clone());
        }
    }
    let by_value: HashMap<String, Source> = candidates
        .keys()
        .map(|s| (value_of(graph, s), *s))
        .collect();
    let structural = structural_matches(graph, idx, arch, &assigned, &by_value, &candidates);
    for (s, name) in structural {
        if assigned.contains_key(&s) {
            continue;
        }
        if let Some(c) = candidates[&s].iter().find(|(n, _)| {
            *n == name || n.ends_with(&format!(".{name}")) || name.ends_with(n.as_str())
        }) {
            assigned.insert(s, c.clone());
        }
    }
    // Still ambiguous: drop the names other weights took; what is left
    // must be one name, or names with the same new values.
    let taken: HashSet<String> = assigned.values().map(|(n, _)| n.clone()).collect();
    let mut unresolved = Vec::new();
    let mut pending: Vec<Source> = candidates
        .keys()
        .filter(|s| !assigned.contains_key(s))
        .copied()
        .collect();
    pending.sort_by_key(|s| source_name[s].clone());
    for s in &pending {
        let c: Vec<(String, Orientation)> = candidates[s]
            .iter()
            .filter(|(n, _)| !taken.contains(n))
            .cloned()
            .collect();
        if c.is_empty() {
            unresolved.push(format!(
                "`{}` matches only weights other graph values hold",
                source_name[s]
            ));
            continue;
        }
        let targets: Vec<Option<(Vec<i64>, Vec<f32>)>> =
            c.iter().map(|(n, o)| target.oriented(n, *o)).collect();
        let same_new_values = targets.windows(2).all(|w| w[0] == w[1]) && targets[0].is_some();
        if same_new_values || c.len() == 1 {
            assigned.insert(*s, c[0].clone());
        } else {
            unresolved.push(format!(
                "`{}` matches {} ({})",
                source_name[s],
                c.len(),
                c.iter()
                    .map(|(n, _)| n.as_str())
                    .take(4)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok(WeightMatch {
        assigned,
        by_value,
        unresolved,
    })
}

/// The checkpoint name each ambiguous weight must have by its place in the
/// graph: a bias is the constant operand of the Add after an assigned
/// MatMul (or a Gemm's third input); a norm weight is the Mul feeding an
/// assigned projection (decoders) or the LayerNormalization after the
/// residual Add that follows one (BERT).
pub(super) fn structural_matches(
    graph: &GraphProto,
    idx: &NodeIndex,
    arch: Architecture,
    assigned: &HashMap<Source, (String, Orientation)>,
    by_value: &HashMap<String, Source>,
    candidates: &HashMap<Source, Vec<(String, Orientation)>>,
) -> Vec<(Source, String)> {
    let weight_of_value: HashMap<String, String> = assigned
        .iter()
        .filter(|(_, (n, _))| n.ends_with(".weight"))
        .map(|(s, (n, _))| {
            (
                value_of(graph, s),
                n.trim_end_matches(".weight").to_string(),
            )
        })
        .collect();
    let projections: Vec<(&NodeProto, &String)> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "MatMul" || n.op_type == "Gemm")
        .filter_map(|n| Some((n, n.input.get(1).and_then(|w| weight_of_value.get(w))?)))
        .collect();
    // Biases first, then norms: a value both could be (zeros) goes to the bias.
    let mut matches: Vec<(Source, String)> = Vec::new();
    for &(n, module) in &projections {
        let bias_value = if n.op_type == "Gemm" {
            n.input.get(2).cloned()
        } else {
            idx.consumers.get(&n.output[0]).and_then(|cs| {
                cs.iter()
                    .map(|&c| &graph.node[c])
                    .find(|c| c.op_type == "Add")
                    .and_then(|add| {
                        add.input
                            .iter()
                            .find(|x| by_value.contains_key(*x))
                            .cloned()
                    })
            })
        };
        if let Some(b) = bias_value.and_then(|b| by_value.get(&b).copied()) {
            let name = format!("{module}.bias");
            if !assigned.contains_key(&b) && candidates[&b].iter().any(|(n, _)| *n == name) {
                matches.push((b, name));
            }
        }
    }
    for &(n, module) in &projections {
        // Decoders: Mul(normalized, weight) -> MatMul.
        if let Some(norm) = norm_feeding(arch.checkpoint(), module) {
            if let Some(&p) = idx.producer.get(&n.input[0]) {
                let mul = &graph.node[p];
                if mul.op_type == "Mul" {
                    if let Some(s) = mul.input.iter().find_map(|x| by_value.get(x)) {
                        matches.push((*s, format!("{norm}.weight")));
                    }
                }
            }
        }
        // BERT: MatMul -> [Add bias] -> Add residual -> LayerNormalization.
        if let Some(ln) = residual_norm_after(arch.checkpoint(), module) {
            let mut v = n.output[0].clone();
            for _ in 0..3 {
                let Some(cs) = idx.consumers.get(&v) else {
                    break;
                };
                let Some(&c) = cs.first() else { break };
                let node = &graph.node[c];
                if node.op_type == "LayerNormalization" {
                    if let Some(s) = node.input.get(1).and_then(|x| by_value.get(x)) {
                        matches.push((*s, format!("{ln}.weight")));
                    }
                    if let Some(s) = node.input.get(2).and_then(|x| by_value.get(x)) {
                        matches.push((*s, format!("{ln}.bias")));
                    }
                    break;
                }
                if node.op_type != "Add" {
                    break;
                }
                v = node.output[0].clone();
            }
        }
    }
    matches
}

/// The norm (checkpoint module name) whose output feeds the projection
/// `module`: its sub-layer's input norm, for projections that read the
/// sub-layer's input; `None` for output projections and post-LN BERT.
pub(super) fn norm_feeding(map: &CheckpointMap, module: &str) -> Option<String> {
    let (_, role) = map.locate_projection(module)?;
    role.reads_input()
        .then(|| map.norm_around(module, NormPlacement::Input))
        .flatten()
}

/// The post-LN norm after the residual that the output projection `module`
/// writes to (BERT's); `None` for pre-norm layers.
pub(super) fn residual_norm_after(map: &CheckpointMap, module: &str) -> Option<String> {
    let (_, role) = map.locate_projection(module)?;
    (!role.reads_input())
        .then(|| map.norm_around(module, NormPlacement::Residual))
        .flatten()
}
