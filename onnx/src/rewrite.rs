//! `effir rewrite`: slim an existing ONNX export (Optimum,
//! sentence-transformers, `torch.onnx.export`) in place, keeping its exact
//! interface. Weights are found by value, never by name: every float
//! initializer (or `Constant`) is hashed and matched against the original
//! model's tensors, as stored or transposed; ambiguous ones (identical
//! values, such as fresh LayerNorm weights) are resolved by the graph's
//! structure. Each layer's MLP is located from its down projection; a
//! dropped MLP's sub-graph is cut out and its residual stream rewired,
//! narrowed MLPs get the pruned model's matrices, and every weight gets the
//! new model's values. Whatever cannot be matched is refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataLocation, tensor_proto::DataType, GraphProto,
    NodeProto, TensorProto,
};
use effir_pipeline::models::ModelConfig;
use effir_pipeline::{Architecture, ModelShape};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::graph_file::{write_model, GraphFile, EXTERNAL_DATA_THRESHOLD};

/// How a graph weight relates to a checkpoint tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Orientation {
    AsStored,
    /// The graph holds `Wᵀ` (a MatMul weight).
    Transposed,
}

/// Where a graph weight lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Initializer(usize),
    /// A `Constant` node's `value`.
    Constant(usize),
}

/// What `rewrite` did.
#[derive(Debug, Clone, Serialize)]
pub struct RewriteSummary {
    pub original_graph: PathBuf,
    pub graph: PathBuf,
    pub matched_weights: usize,
    pub replaced_weights: usize,
    pub dropped_mlps: Vec<usize>,
    pub narrowed_mlps: Vec<usize>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// The root model a pruned or fine-tuned directory descends from, following
/// the `source_model` records of `effir prune` and `effir finetune`.
pub fn original_model(dir: &Path) -> Option<PathBuf> {
    let mut current = dir.to_path_buf();
    let mut found = None;
    for _ in 0..8 {
        let Some(record) = ["effir_prune.json", "effir_finetune.json"]
            .iter()
            .map(|f| current.join(f))
            .find(|p| p.is_file())
        else {
            break;
        };
        let Some(source) = std::fs::read_to_string(&record)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| v.get("source_model")?.as_str().map(PathBuf::from))
        else {
            break;
        };
        if !source.join("config.json").is_file() {
            return found;
        }
        found = Some(source.clone());
        current = source;
    }
    found
}

fn float_values(t: &TensorProto, base: &Path) -> Result<Option<Vec<f32>>> {
    if t.data_type != DataType::Float as i32 {
        return Ok(None);
    }
    if t.data_location == DataLocation::External as i32 {
        let get = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.clone())
        };
        let location = get("location").ok_or_else(|| {
            Error::graph(base, format!("{}: external data without location", t.name))
        })?;
        let offset: u64 = get("offset").and_then(|o| o.parse().ok()).unwrap_or(0);
        let path = base.join(location);
        let count: usize = t.dims.iter().product::<i64>() as usize;
        // Only this tensor's bytes are read.
        let mut bytes = vec![0u8; count * 4];
        let mut read = || -> std::io::Result<()> {
            use std::io::{Read, Seek, SeekFrom};
            let mut file = std::fs::File::open(&path)?;
            file.seek(SeekFrom::Start(offset))?;
            file.read_exact(&mut bytes)
        };
        read().map_err(|e| {
            Error::graph(
                &path,
                format!(
                    "{}: cannot read its external data (truncated?): {e}",
                    t.name
                ),
            )
        })?;
        return Ok(Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ));
    }
    if !t.raw_data.is_empty() {
        return Ok(Some(
            t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ));
    }
    Ok(Some(t.float_data.clone()))
}

fn hash(values: &[f32]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for v in values {
        h.update(&v.to_le_bytes());
    }
    h.finalize()
}

/// A checkpoint's tensors with names stripped of the `bert.` / `model.`
/// prefix, as float32 values.
struct Checkpoint {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Checkpoint {
    fn load(dir: &Path, arch: Architecture) -> Result<Self> {
        let all = effir_pipeline::weights::load_all_tensors(dir)?;
        let prefix = arch.checkpoint_prefix(all.keys()).to_string();
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
    fn oriented(&self, name: &str, orientation: Orientation) -> Option<(Vec<i64>, Vec<f32>)> {
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

struct Index {
    producer: HashMap<String, usize>,
    consumers: HashMap<String, Vec<usize>>,
}

fn index(nodes: &[NodeProto]) -> Index {
    let mut producer = HashMap::new();
    let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for o in &n.output {
            producer.insert(o.clone(), i);
        }
        for x in &n.input {
            consumers.entry(x.clone()).or_default().push(i);
        }
    }
    Index {
        producer,
        consumers,
    }
}

/// Rewrites `graph_path` for the model in `model_dir` into `out` (a
/// directory that must not exist).
pub fn rewrite(
    graph_path: &Path,
    model_dir: &Path,
    original_dir: Option<&Path>,
    out: &Path,
) -> Result<RewriteSummary> {
    if out.exists() {
        return Err(Error::InvalidArgument(format!(
            "{}: already exists; choose a new output directory",
            out.display()
        )));
    }
    let config = ModelConfig::from_file(&model_dir.join("config.json"))?;
    let arch = config.architecture();
    let shape = ModelShape::load_or(model_dir, config.uniform_shape())?;
    let original_dir = match original_dir {
        Some(d) => d.to_path_buf(),
        None => original_model(model_dir).unwrap_or_else(|| model_dir.to_path_buf()),
    };
    let original_config = ModelConfig::from_file(&original_dir.join("config.json"))?;
    if original_config.architecture() != arch {
        return Err(Error::InvalidArgument(format!(
            "{} is a {} model, {} a {}",
            original_dir.display(),
            original_config.architecture(),
            model_dir.display(),
            arch
        )));
    }
    let mut file = GraphFile::read(graph_path)?;
    let base = graph_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let bytes_before = std::fs::metadata(graph_path)
        .map_err(|e| Error::io(graph_path, e))?
        .len()
        + std::fs::metadata(graph_path.with_extension("onnx_data")).map_or(0, |m| m.len());
    let graph = file.model.graph.as_mut().expect("checked on read");
    let used_external = inline_external_data(graph, graph_path, &base)?;
    let original = Checkpoint::load(&original_dir, arch)?;
    let target = Checkpoint::load(model_dir, arch)?;
    let nodes_before = graph.node.len();

    let idx = index(&graph.node);
    let weights = match_weights(graph, &idx, &base, arch, &original, &target)?;
    let (mlp_blocks, missing) = locate_dropped_mlps(graph, &idx, arch, &shape, &weights);
    if !missing.is_empty() || !weights.unresolved.is_empty() {
        let float_matrices = graph
            .initializer
            .iter()
            .filter(|t| t.data_type == DataType::Float as i32 && t.dims.len() == 2)
            .count();
        return Err(Error::graph(
            graph_path,
            format!(
                "cannot map this graph onto {} ({} float matrices in the graph, {} weights matched by value):\n  {}",
                original_dir.display(),
                float_matrices,
                weights.assigned.len(),
                missing
                    .into_iter()
                    .chain(weights.unresolved.iter().map(|u| format!("ambiguous weight {u}")))
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ),
        ));
    }

    let dropped: Vec<usize> = mlp_blocks.keys().copied().collect();
    cut_out_mlps(graph, &idx, &mlp_blocks);
    let replaced = replace_weights(graph, &weights.assigned, &target, arch, &dropped, model_dir)?;
    // Dead nodes and initializers go; shape hints of changed tensors too.
    remove_dead(graph);
    graph.value_info.clear();
    let narrowed: Vec<usize> = shape
        .layers
        .iter()
        .enumerate()
        .filter(|(l, s)| {
            s.mlp.is_some_and(|m| {
                original
                    .tensors
                    .get(&arch.mlp_tensors("", *l).down)
                    .is_some_and(|(d, _)| d[1] != m.intermediate_size)
            })
        })
        .map(|(l, _)| l)
        .collect();
    let nodes_after = graph.node.len();
    let weight_bytes = crate::graph_file::initializer_bytes(&file.model);
    let external = used_external || weight_bytes > EXTERNAL_DATA_THRESHOLD;

    let staging = effir_pipeline::atomic_file::StagedDir::beside(out)?;
    let file_name = graph_path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model.onnx")
        .to_string();
    write_model(file.model, staging.path(), &file_name, external)?;
    let staged_graph = staging.path().join(&file_name);
    GraphFile::read(&staged_graph)?;
    let bytes_after = std::fs::metadata(&staged_graph)
        .map_err(|e| Error::io(&staged_graph, e))?
        .len()
        + std::fs::metadata(staging.path().join(format!("{file_name}_data")))
            .map_or(0, |m| m.len());
    staging.publish(out)?;
    Ok(RewriteSummary {
        original_graph: graph_path.to_path_buf(),
        graph: out.join(file_name),
        matched_weights: weights.assigned.len(),
        replaced_weights: replaced,
        dropped_mlps: dropped,
        narrowed_mlps: narrowed,
        nodes_before,
        nodes_after,
        bytes_before,
        bytes_after,
    })
}

/// Brings weights held in external data into the graph, so that no tensor
/// keeps pointing into the original's data file (the output's is written
/// anew). Returns whether the graph used external data.
fn inline_external_data(graph: &mut GraphProto, graph_path: &Path, base: &Path) -> Result<bool> {
    let mut used = false;
    for t in graph.initializer.iter_mut() {
        if t.data_location != DataLocation::External as i32 {
            continue;
        }
        used = true;
        if t.data_type != DataType::Float as i32 {
            return Err(Error::graph(
                graph_path,
                format!(
                    "{}: external data of a non-float tensor is not supported",
                    t.name
                ),
            ));
        }
        let values = float_values(t, base)?.expect("float tensor");
        t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        t.data_location = DataLocation::Default as i32;
        t.external_data.clear();
    }
    Ok(used)
}

/// The value name a weight source feeds into the graph.
fn value_of(graph: &GraphProto, s: &Source) -> String {
    match s {
        Source::Initializer(i) => graph.initializer[*i].name.clone(),
        Source::Constant(i) => graph.node[*i].output[0].clone(),
    }
}

/// Which checkpoint tensor each graph weight holds.
struct WeightMatch {
    /// Graph weights matched to one checkpoint tensor, in the graph's orientation.
    assigned: HashMap<Source, (String, Orientation)>,
    /// Graph value names of every weight whose values some checkpoint tensor has.
    by_value: HashMap<String, Source>,
    /// Weights that match several checkpoint tensors with different new values.
    unresolved: Vec<String>,
}

/// Matches graph weights to the original checkpoint's tensors by value:
/// unique matches first, then biases and norms by the graph's structure,
/// then what is left when the names other weights took are set aside.
fn match_weights(
    graph: &GraphProto,
    idx: &Index,
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
fn structural_matches(
    graph: &GraphProto,
    idx: &Index,
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
        if let Some(norm) = norm_feeding(arch, module) {
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
        if arch == Architecture::Bert && module.ends_with(".dense") {
            let mut v = n.output[0].clone();
            for _ in 0..3 {
                let Some(cs) = idx.consumers.get(&v) else {
                    break;
                };
                let Some(&c) = cs.first() else { break };
                let node = &graph.node[c];
                if node.op_type == "LayerNormalization" {
                    let ln = module.trim_end_matches(".dense").to_string() + ".LayerNorm";
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
/// `module` of a decoder layer; `None` for BERT and output projections.
fn norm_feeding(arch: Architecture, module: &str) -> Option<String> {
    let (layer_prefix, proj) = module.rsplit_once('.')?;
    if arch == Architecture::Bert {
        return None;
    }
    let layer = layer_prefix
        .trim_end_matches(".self_attn")
        .trim_end_matches(".mlp");
    Some(match proj {
        "q_proj" | "k_proj" | "v_proj" => format!("{layer}.input_layernorm"),
        "gate_proj" | "up_proj" if arch == Architecture::Gemma3 => {
            format!("{layer}.pre_feedforward_layernorm")
        }
        "gate_proj" | "up_proj" => format!("{layer}.post_attention_layernorm"),
        _ => return None,
    })
}

/// For each layer whose MLP the pruned model dropped, the value the MLP
/// block outputs and the value entering it (block output, block input),
/// found from the layer's down projection; and what could not be located.
/// Every layer's down projection must be found and used by MatMul or Gemm
/// only, so that a graph this code does not understand is refused.
fn locate_dropped_mlps(
    graph: &GraphProto,
    idx: &Index,
    arch: Architecture,
    shape: &ModelShape,
    weights: &WeightMatch,
) -> (BTreeMap<usize, (String, String)>, Vec<String>) {
    let by_name: HashMap<&str, Source> = weights
        .assigned
        .iter()
        .map(|(s, (n, _))| (n.as_str(), *s))
        .collect();
    let mut missing = Vec::new();
    let mut blocks: BTreeMap<usize, (String, String)> = BTreeMap::new();
    for (l, layer) in shape.layers.iter().enumerate() {
        let names = arch.mlp_tensors("", l);
        let Some(down) = by_name.get(names.down.as_str()) else {
            missing.push(format!("layer {l}: no graph weight equals {}", names.down));
            continue;
        };
        let down_value = value_of(graph, down);
        let users: Vec<usize> = idx.consumers.get(&down_value).cloned().unwrap_or_default();
        let unknown: Vec<String> = users
            .iter()
            .map(|&c| &graph.node[c])
            .filter(|n| !matches!(n.op_type.as_str(), "MatMul" | "Gemm" | "Transpose"))
            .map(|n| {
                if n.domain.is_empty() {
                    n.op_type.clone()
                } else {
                    format!("{}::{}", n.domain, n.op_type)
                }
            })
            .collect();
        if users.is_empty() || !unknown.is_empty() {
            missing.push(format!(
                "layer {l}: the down projection is used by [{}], expected MatMul or Gemm",
                unknown.join(", ")
            ));
            continue;
        }
        if layer.mlp.is_some() {
            continue;
        }
        match dropped_mlp_block(graph, idx, arch, &weights.by_value, &users, l) {
            Ok(block) => {
                blocks.insert(l, block);
            }
            Err(m) => missing.push(m),
        }
    }
    (blocks, missing)
}

/// Layer `l`'s MLP block, from the users of its down projection. The block
/// ends at the residual Add: the first node downstream of the down
/// projection that adds a value computed from the MLP (through biases,
/// reshapes, casts or a post-norm such as Gemma's) to one that is not,
/// and not a constant; that other value is the block's input. For post-LN
/// BERT the LayerNorm after the residual Add goes with the block. Returns
/// (block output, block input).
fn dropped_mlp_block(
    graph: &GraphProto,
    idx: &Index,
    arch: Architecture,
    by_value: &HashMap<String, Source>,
    down_users: &[usize],
    l: usize,
) -> std::result::Result<(String, String), String> {
    let down = down_users
        .iter()
        .copied()
        .find(|&c| matches!(graph.node[c].op_type.as_str(), "MatMul" | "Gemm"))
        .ok_or_else(|| format!("layer {l}: the down projection is not used by a MatMul or Gemm"))?;
    let is_constant = |x: &String| {
        by_value.contains_key(x)
            || graph.initializer.iter().any(|t| &t.name == x)
            || idx
                .producer
                .get(x)
                .is_some_and(|&p| graph.node[p].op_type == "Constant")
    };
    // Values computed from the MLP's output; nodes are in topological order.
    let mut from_mlp: HashSet<&String> = graph.node[down].output.iter().collect();
    let mut residual = None;
    for node in &graph.node[down + 1..] {
        let inside: Vec<&String> = node.input.iter().filter(|x| from_mlp.contains(x)).collect();
        if inside.is_empty() {
            continue;
        }
        if node.op_type == "Add" && inside.len() == 1 && node.input.len() == 2 {
            let other = node.input.iter().find(|x| !from_mlp.contains(x));
            if let Some(x) = other.filter(|x| !is_constant(x)) {
                residual = Some((node, x.clone()));
                break;
            }
        }
        from_mlp.extend(node.output.iter());
    }
    let (r, x) = residual.ok_or_else(|| {
        format!("layer {l}: no residual Add after the down projection (the MLP's output is never added to the stream)")
    })?;
    let block_output = if arch == Architecture::Bert {
        // Post-LN: the LayerNorm after the residual goes with the MLP.
        let cs = idx.consumers.get(&r.output[0]).cloned().unwrap_or_default();
        match cs.as_slice() {
            [c] if graph.node[*c].op_type == "LayerNormalization" => {
                graph.node[*c].output[0].clone()
            }
            _ => return Err(format!(
                "layer {l}: the residual Add is not followed by one LayerNormalization (decomposed LayerNorm is not supported; export with opset >= 17)"
            )),
        }
    } else {
        r.output[0].clone()
    };
    Ok((block_output, x))
}

/// Cuts dropped MLP blocks out: each block's output becomes its input.
fn cut_out_mlps(graph: &mut GraphProto, idx: &Index, blocks: &BTreeMap<usize, (String, String)>) {
    for (block_output, block_input) in blocks.values() {
        let p = idx.producer[block_output];
        graph.node[p] = NodeProto {
            input: vec![block_input.clone()],
            output: vec![block_output.clone()],
            name: format!("{block_output}_effir_identity"),
            op_type: "Identity".into(),
            ..Default::default()
        };
    }
}

/// Gives every matched weight the pruned model's values (those of dropped
/// MLPs are skipped: their nodes are dead). Returns how many were replaced.
fn replace_weights(
    graph: &mut GraphProto,
    assigned: &HashMap<Source, (String, Orientation)>,
    target: &Checkpoint,
    arch: Architecture,
    dropped: &[usize],
    model_dir: &Path,
) -> Result<usize> {
    let dropped_names: HashSet<String> = dropped
        .iter()
        .flat_map(|&l| {
            let t = arch.mlp_tensors("", l);
            t.rows.into_iter().chain([t.down]).chain(t.others)
        })
        .collect();
    let mut replaced = 0;
    for (s, (name, orientation)) in assigned {
        let Some((dims, values)) = target.oriented(name, *orientation) else {
            if dropped_names.contains(name) {
                continue;
            }
            return Err(Error::InvalidArgument(format!(
                "{}: has no tensor `{name}`, which the graph uses",
                model_dir.display()
            )));
        };
        let tensor = match s {
            Source::Initializer(i) => &mut graph.initializer[*i],
            Source::Constant(i) => graph.node[*i]
                .attribute
                .iter_mut()
                .find(|a| a.name == "value" && a.r#type == AttributeType::Tensor as i32)
                .and_then(|a| a.t.as_mut())
                .expect("constant value"),
        };
        tensor.dims = dims;
        tensor.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensor.float_data.clear();
        tensor.data_location = DataLocation::Default as i32;
        tensor.external_data.clear();
        replaced += 1;
    }
    Ok(replaced)
}

/// Removes nodes none of whose outputs is used (transitively) and
/// initializers nothing reads.
fn remove_dead(graph: &mut GraphProto) {
    loop {
        let mut used: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        for n in &graph.node {
            used.extend(n.input.iter().cloned());
            // Subgraphs (If/Loop) read outer values too.
            for a in &n.attribute {
                if let Some(g) = &a.g {
                    for sn in &g.node {
                        used.extend(sn.input.iter().cloned());
                    }
                    used.extend(g.output.iter().map(|o| o.name.clone()));
                }
            }
        }
        let before = graph.node.len();
        graph
            .node
            .retain(|n| n.output.iter().any(|o| used.contains(o)));
        if graph.node.len() == before {
            graph.initializer.retain(|t| used.contains(&t.name));
            return;
        }
    }
}
