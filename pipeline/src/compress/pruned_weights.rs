//! The pruned model's weights: the source's tensors with dropped MLPs
//! left out and narrowed MLPs sliced to their kept neurons, in the source's
//! dtype. One slicing plan serves both ways of holding the source: tensors
//! loaded whole ([`slice_weights`], saved as one file) and tensors read one
//! at a time from memory-mapped files ([`write_sliced_weights`], written
//! tensor by tensor into shards).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::io::safetensors_shards::{PlannedTensor, ShardedWriter, DEFAULT_SHARD_BYTES};
use crate::io::weight_store::WeightStore;
use crate::model::arch::CheckpointMap;

/// The source model's weights, as the pruning run holds them.
pub enum SourceWeights<'a> {
    /// Every tensor in memory, in its stored dtype.
    Loaded(HashMap<String, Tensor>),
    /// Memory-mapped, read and written one tensor at a time (`--stream`).
    Streamed(&'a WeightStore),
}

/// What pruning does to one source tensor (one it leaves out of the plan
/// is copied unchanged).
enum Slicing<'a> {
    /// A dropped MLP's tensor.
    Remove,
    /// Keep these rows (the neurons of gate/up projections and their biases).
    Rows(&'a [u32]),
    /// Keep these columns (the neurons of the output projection).
    Columns(&'a [u32]),
}

impl Slicing<'_> {
    /// The shape of `shape` after slicing (`None`: removed).
    fn shape(&self, shape: &[usize]) -> Option<Vec<usize>> {
        let mut shape = shape.to_vec();
        match self {
            Self::Remove => return None,
            Self::Rows(keep) => shape[0] = keep.len(),
            Self::Columns(keep) => shape[1] = keep.len(),
        }
        Some(shape)
    }

    /// `tensor` sliced; `None` when it is removed.
    fn apply(&self, tensor: &Tensor) -> Result<Option<Tensor>> {
        let (dim, keep) = match self {
            Self::Remove => return Ok(None),
            Self::Rows(keep) => (0, *keep),
            Self::Columns(keep) => (1, *keep),
        };
        Ok(Some(
            tensor.index_select(&Tensor::new(keep, &Device::Cpu)?, dim)?,
        ))
    }
}

/// Every source tensor pruning changes, by name: the tensors of an MLP
/// that keeps no neurons (`kept[l]` is `None`) removed, a narrowed MLP's
/// rows and output columns sliced to its kept neurons. `down_width` gives the stored width of an output projection
/// (`None` if the checkpoint lacks it: nothing of that layer is sliced).
fn slicing_plan<'a>(
    map: &CheckpointMap,
    prefix: &str,
    kept: &[Option<&'a [u32]>],
    down_width: &dyn Fn(&str) -> Option<usize>,
) -> HashMap<String, Slicing<'a>> {
    let mut plan = HashMap::new();
    for (l, keep) in kept.iter().enumerate() {
        let names = map.mlp_tensors(prefix, l);
        let Some(keep) = *keep else {
            for name in names.rows.iter().chain([&names.down]).chain(&names.others) {
                plan.insert(name.clone(), Slicing::Remove);
            }
            continue;
        };
        if down_width(&names.down).unwrap_or(keep.len()) == keep.len() {
            continue;
        }
        for name in names.rows {
            plan.insert(name, Slicing::Rows(keep));
        }
        plan.insert(names.down, Slicing::Columns(keep));
    }
    plan
}

/// The source's tensors with dropped MLPs removed and narrowed MLPs sliced
/// to their kept neurons.
pub(crate) fn slice_weights(
    mut tensors: HashMap<String, Tensor>,
    map: &CheckpointMap,
    kept: &[Option<&[u32]>],
) -> Result<HashMap<String, Tensor>> {
    let prefix = map.prefix(tensors.keys());
    let plan = slicing_plan(map, prefix, kept, &|name| {
        tensors.get(name).and_then(|t| t.dims().get(1).copied())
    });
    for (name, slicing) in plan {
        let Some(tensor) = tensors.remove(&name) else {
            continue;
        };
        if let Some(sliced) = slicing.apply(&tensor)? {
            tensors.insert(name, sliced);
        }
    }
    Ok(tensors)
}

/// Writes the source's tensors into `dir` one at a time, in the source's
/// order and dtype, with dropped MLPs left out and narrowed ones sliced:
/// the tensors the in-memory run writes, in shards of at most 5 GB.
pub(crate) fn write_sliced_weights(
    store: &WeightStore,
    map: &CheckpointMap,
    kept: &[Option<&[u32]>],
    dir: &Path,
) -> Result<()> {
    let prefix = map.prefix(store.names().iter());
    let slicing = slicing_plan(map, prefix, kept, &|name| {
        store.info(name).and_then(|t| t.shape.get(1).copied())
    });
    let mut planned = Vec::new();
    for name in store.names() {
        let info = store.info(name).expect("a listed tensor");
        let shape = match slicing.get(name) {
            None => Some(info.shape.clone()),
            Some(s) => s.shape(&info.shape),
        };
        if let Some(shape) = shape {
            planned.push(PlannedTensor {
                name: name.clone(),
                dtype: info.dtype,
                shape,
            });
        }
    }
    let order: Vec<String> = planned.iter().map(|t| t.name.clone()).collect();
    let mut writer = ShardedWriter::new(dir, planned, DEFAULT_SHARD_BYTES)?;
    for name in order {
        match slicing.get(&name) {
            // Unchanged: straight from the mapping to the file.
            None => {
                let info = store.info(&name).expect("a listed tensor");
                store.with_bytes(&name, |bytes| {
                    writer.write_bytes(&name, info.dtype, &info.shape, bytes)
                })??;
            }
            Some(slicing) => {
                let sliced = slicing
                    .apply(&store.load_stored(&name)?)?
                    .expect("removed tensors are not planned");
                writer.write(&name, &sliced)?;
            }
        }
    }
    writer.finish()
}
