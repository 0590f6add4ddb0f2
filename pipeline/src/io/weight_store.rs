//! A model's weights read one tensor at a time, for models larger than
//! memory (EffiR's 7B retrievers on a 24 GB machine).
//!
//! Every safetensors file of the directory is memory-mapped and stays in
//! its stored dtype. A tensor is copied out (and converted) only when a
//! stage asks for it, and the pages it was read from are handed back to
//! the kernel at once (`MADV_DONTNEED`), so the process's resident set
//! holds what the stage keeps, not the file. Embedding tables are read
//! row by row ([`WeightStore::rows`]), never copied whole.
//!
//! Values are those candle's own loader gives (the same
//! `safetensors::Load` conversion), so a stage that streams computes bit
//! for bit what it computes on a model loaded whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// One tensor's place in its file.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    file: usize,
    /// Byte range within the file.
    start: usize,
    end: usize,
}

impl StoredTensor {
    /// Bytes the tensor takes on disk.
    pub fn bytes(&self) -> usize {
        self.end - self.start
    }

    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

struct MappedFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

/// The memory-mapped weights of one model directory.
pub struct WeightStore {
    dir: PathBuf,
    files: Vec<MappedFile>,
    tensors: HashMap<String, StoredTensor>,
    /// Tensor names in file order, then in the order their bytes lie.
    order: Vec<String>,
}

impl WeightStore {
    /// Maps the safetensors files of the model in `dir` (one file or the
    /// shards of `model.safetensors.index.json`), checked as
    /// [`crate::io::weights::weight_files`] checks them.
    pub fn open(dir: &Path) -> Result<Self> {
        let paths = crate::io::weights::weight_files(dir)?;
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        let mut order = Vec::new();
        for (index, path) in paths.into_iter().enumerate() {
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: read-only map of a file effir does not modify while it
            // reads it (the same contract as candle's mmaped VarBuilder).
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let bad = |message: String| Error::Safetensors {
                path: path.clone(),
                message,
            };
            let (header, metadata) =
                safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| bad(e.to_string()))?;
            let data_start = 8 + header;
            for name in metadata.offset_keys() {
                let info = metadata.info(&name).expect("offset_keys names its tensors");
                let dtype = DType::try_from(info.dtype)
                    .map_err(|_| bad(format!("{name}: dtype {:?} is not supported", info.dtype)))?;
                let (start, end) = (
                    data_start + info.data_offsets.0,
                    data_start + info.data_offsets.1,
                );
                if tensors.contains_key(&name) {
                    return Err(bad(format!("{name} is also in another shard")));
                }
                order.push(name.clone());
                tensors.insert(
                    name,
                    StoredTensor {
                        dtype,
                        shape: info.shape.clone(),
                        file: index,
                        start,
                        end,
                    },
                );
            }
            mmap.advise(memmap2::Advice::Sequential).ok();
            files.push(MappedFile { path, mmap });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            tensors,
            order,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Tensor names in the order their bytes lie in the files.
    pub fn names(&self) -> &[String] {
        &self.order
    }

    pub fn info(&self, name: &str) -> Option<&StoredTensor> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Bytes of every tensor, as stored.
    pub fn stored_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.bytes() as u64).sum()
    }

    fn stored(&self, name: &str) -> Result<&StoredTensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.dir.clone(),
            tensor: name.to_string(),
        })
    }

    /// The tensor `name` in its stored dtype (an owned copy).
    pub fn load_stored(&self, name: &str) -> Result<Tensor> {
        let info = self.stored(name)?;
        let file = &self.files[info.file];
        let bytes = &file.mmap[info.start..info.end];
        let view = safetensors::tensor::TensorView::new(
            stored_dtype(info.dtype),
            info.shape.clone(),
            bytes,
        )
        .map_err(|e| Error::Safetensors {
            path: file.path.clone(),
            message: format!("{name}: {e}"),
        })?;
        let tensor = view
            .load(&Device::Cpu)
            .map_err(|e| Error::weights(&file.path, e))?;
        self.release(info);
        Ok(tensor)
    }

    /// Calls `f` with the stored bytes of `name` (a view of the mapping,
    /// nothing copied), then hands their pages back.
    pub fn with_bytes<R>(&self, name: &str, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let info = self.stored(name)?;
        let result = f(&self.files[info.file].mmap[info.start..info.end]);
        self.release(info);
        Ok(result)
    }

    /// The tensor `name` converted to `dtype`.
    pub fn load(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let info = self.stored(name)?;
        let path = &self.files[info.file].path;
        self.load_stored(name)?
            .to_dtype(dtype)
            .map_err(|e| Error::weights(path, e))
    }

    /// Rows `ids` of the 2-D table `name`, as float32 `(ids.len(), columns)`:
    /// an embedding lookup that reads only the rows it needs.
    pub fn rows(&self, name: &str, ids: &[u32]) -> Result<Tensor> {
        let (info, rows, columns) = self.table(name)?;
        let rows_read: Result<Vec<Tensor>> = ids
            .iter()
            .map(|&id| {
                let id = id as usize;
                if id >= rows {
                    return Err(Error::InvalidArgument(format!(
                        "token id {id} is outside {name}'s {rows} rows"
                    )));
                }
                self.rows_as_f32(name, info, id, 1, vec![columns])
            })
            .collect();
        self.release(info);
        Tensor::stack(&rows_read?, 0).map_err(|e| Error::weights(&self.files[info.file].path, e))
    }

    /// Calls `f` with the 2-D table `name` in consecutive blocks of at most
    /// `block_rows` rows, each as float32 `(rows, columns)`, and hands each
    /// block's pages back after it: a whole table read in order without
    /// holding it converted.
    pub fn for_each_row_block(
        &self,
        name: &str,
        block_rows: usize,
        f: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let (info, rows, columns) = self.table(name)?;
        let mut first = 0;
        while first < rows {
            let count = block_rows.max(1).min(rows - first);
            let block = self.rows_as_f32(name, info, first, count, vec![count, columns])?;
            let bytes = row_bytes(info, first, count);
            self.release_range(info.file, bytes.start, bytes.end);
            f(block)?;
            first += count;
        }
        Ok(())
    }

    /// The 2-D tensor `name`: where it is stored, its rows and its columns.
    fn table(&self, name: &str) -> Result<(&StoredTensor, usize, usize)> {
        let info = self.stored(name)?;
        match info.shape[..] {
            [rows, columns] => Ok((info, rows, columns)),
            _ => Err(Error::Safetensors {
                path: self.files[info.file].path.clone(),
                message: format!("{name} is {:?}, not a table", info.shape),
            }),
        }
    }

    /// Rows `first..first + count` of the table `name` (stored at `info`),
    /// converted to float32 and shaped `shape`.
    fn rows_as_f32(
        &self,
        name: &str,
        info: &StoredTensor,
        first: usize,
        count: usize,
        shape: Vec<usize>,
    ) -> Result<Tensor> {
        let file = &self.files[info.file];
        let error = |e: &dyn std::fmt::Display| Error::Safetensors {
            path: file.path.clone(),
            message: format!("{name}, rows {first}..{}: {e}", first + count),
        };
        safetensors::tensor::TensorView::new(
            stored_dtype(info.dtype),
            shape,
            &file.mmap[row_bytes(info, first, count)],
        )
        .map_err(|e| error(&e))?
        .load(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(|e| error(&e))
    }

    /// Hands the pages of `info` back to the kernel: the file stays mapped,
    /// a later read faults them in again.
    fn release(&self, info: &StoredTensor) {
        self.release_range(info.file, info.start, info.end);
    }

    /// Hands back the pages of bytes `start..end` of file `file`.
    fn release_range(&self, file: usize, start: usize, end: usize) {
        // SAFETY: the map is a read-only, shared file mapping, so dropping
        // its pages loses nothing: they are re-read from the file on access.
        unsafe {
            self.files[file]
                .mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
                .ok();
        }
    }

    /// A [`VarBuilder`] that loads each tensor from the store when asked,
    /// converted to `dtype`: the layer loaders of every architecture read
    /// one layer's weights through it.
    pub fn var_builder(self: &Arc<Self>, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(StoreBackend(self.clone())), dtype, Device::Cpu)
    }
}

/// The safetensors name of a candle dtype (`None` for a dtype
/// safetensors has no name for).
pub(crate) fn safetensors_dtype(dtype: DType) -> Option<safetensors::Dtype> {
    Some(match dtype {
        DType::U8 => safetensors::Dtype::U8,
        DType::U32 => safetensors::Dtype::U32,
        DType::I16 => safetensors::Dtype::I16,
        DType::I32 => safetensors::Dtype::I32,
        DType::I64 => safetensors::Dtype::I64,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        DType::F32 => safetensors::Dtype::F32,
        DType::F64 => safetensors::Dtype::F64,
        DType::F8E4M3 => safetensors::Dtype::F8_E4M3,
        DType::F6E2M3 => safetensors::Dtype::F6_E2M3,
        DType::F6E3M2 => safetensors::Dtype::F6_E3M2,
        DType::F4 => safetensors::Dtype::F4,
        DType::F8E8M0 => safetensors::Dtype::F8_E8M0,
        _ => return None,
    })
}

/// The byte range of rows `first..first + count` of the 2-D tensor at `info`.
fn row_bytes(info: &StoredTensor, first: usize, count: usize) -> std::ops::Range<usize> {
    let row = info.shape[1] * info.dtype.size_in_bytes();
    let start = info.start + first * row;
    start..start + count * row
}

/// The safetensors dtype of a tensor read from a safetensors header.
fn stored_dtype(dtype: DType) -> safetensors::Dtype {
    safetensors_dtype(dtype).expect("the dtype came from a safetensors header")
}

struct StoreBackend(Arc<WeightStore>);

impl SimpleBackend for StoreBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt())?
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0
            .load(name, dtype)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_model(dir: &Path) -> HashMap<String, Tensor> {
        let device = Device::Cpu;
        let table = Tensor::arange(0f32, 24.0, &device)
            .unwrap()
            .reshape((6, 4))
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let bias = Tensor::new(&[0.5f32, -1.25, 3.0], &device).unwrap();
        let tensors = HashMap::from([("table".to_string(), table), ("bias".to_string(), bias)]);
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        tensors
    }

    #[test]
    fn tensors_and_rows_read_as_candle_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_model(dir.path());
        let store = WeightStore::open(dir.path()).unwrap();
        assert_eq!(store.info("table").unwrap().dtype, DType::BF16);
        assert_eq!(store.stored_bytes(), 6 * 4 * 2 + 3 * 4);
        let table = store.load("table", DType::F32).unwrap();
        let expected = written["table"].to_dtype(DType::F32).unwrap();
        assert_eq!(
            table.to_vec2::<f32>().unwrap(),
            expected.to_vec2::<f32>().unwrap()
        );
        let rows = store.rows("table", &[5, 0, 5]).unwrap();
        let picked = expected
            .index_select(&Tensor::new(&[5u32, 0, 5], &Device::Cpu).unwrap(), 0)
            .unwrap();
        assert_eq!(
            rows.to_vec2::<f32>().unwrap(),
            picked.to_vec2::<f32>().unwrap()
        );
        assert!(store.rows("table", &[6]).is_err(), "row 6 of 6");
        assert!(
            store.rows("bias", &[0]).is_err(),
            "a 1-D tensor is no table"
        );
        let stored = store.load_stored("bias").unwrap();
        assert_eq!(stored.dtype(), DType::F32);
        assert_eq!(stored.to_vec1::<f32>().unwrap(), vec![0.5, -1.25, 3.0]);
    }

    /// Blocks of 4 rows of the 6-row table (4, then 2), in order, are the
    /// table; a 1-D tensor is refused.
    #[test]
    fn a_table_read_in_row_blocks_is_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_model(dir.path());
        let store = WeightStore::open(dir.path()).unwrap();
        let mut blocks = Vec::new();
        store
            .for_each_row_block("table", 4, &mut |block| {
                blocks.push(block);
                Ok(())
            })
            .unwrap();
        let dims: Vec<Vec<usize>> = blocks.iter().map(|b| b.dims().to_vec()).collect();
        assert_eq!(dims, vec![vec![4, 4], vec![2, 4]]);
        let joined = Tensor::cat(&blocks, 0).unwrap();
        let expected = written["table"].to_dtype(DType::F32).unwrap();
        assert_eq!(
            joined.to_vec2::<f32>().unwrap(),
            expected.to_vec2::<f32>().unwrap()
        );
        assert!(store
            .for_each_row_block("bias", 4, &mut |_| Ok(()))
            .is_err());
    }

    #[test]
    fn the_var_builder_checks_shapes_and_names_missing_tensors() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path());
        let store = Arc::new(WeightStore::open(dir.path()).unwrap());
        let vb = store.var_builder(DType::F32);
        assert!(vb.get((6, 4), "table").is_ok());
        assert!(vb.get((4, 6), "table").is_err());
        assert!(vb.contains_tensor("bias"));
        let missing = store.load("nothing", DType::F32).unwrap_err().to_string();
        assert!(missing.contains("nothing"), "{missing}");
    }
}
