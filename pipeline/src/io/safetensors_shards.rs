//! Writing a model's weights tensor by tensor into safetensors shards with
//! Hugging Face's index (`model-00001-of-00003.safetensors`,
//! `model.safetensors.index.json`), or one `model.safetensors` when they
//! fit in one shard. Every tensor's name, dtype and shape is planned
//! first, so each shard's header is written before its data and no
//! tensor has to wait in memory for the others.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::io::weight_store::safetensors_dtype;
use crate::io::weights::{WEIGHTS_FILE, WEIGHTS_INDEX_FILE};

/// Hugging Face's default shard size (`max_shard_size="5GB"`).
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// A tensor to be written: its name, dtype and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()) as u64
    }
}

struct Shard {
    file_name: String,
    tensors: Vec<PlannedTensor>,
}

/// Counts what passes through to a shard.
struct CountingWriter<'a> {
    inner: &'a mut std::io::BufWriter<std::fs::File>,
    bytes: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes planned tensors, in plan order, into the shards of a directory.
pub struct ShardedWriter {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Shard and tensor index of the next tensor.
    next: (usize, usize),
    file: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
}

impl ShardedWriter {
    /// Plans `tensors` into shards of at most `max_shard_bytes` (a tensor
    /// larger than that gets a shard of its own) in `dir`.
    pub fn new(dir: &Path, tensors: Vec<PlannedTensor>, max_shard_bytes: u64) -> Result<Self> {
        if tensors.is_empty() {
            return Err(Error::InvalidArgument("no tensors to write".into()));
        }
        if let Some(t) = tensors
            .iter()
            .find(|t| safetensors_dtype(t.dtype).is_none())
        {
            return Err(Error::InvalidArgument(format!(
                "{}: safetensors cannot store {:?}",
                t.name, t.dtype
            )));
        }
        let mut groups: Vec<Vec<PlannedTensor>> = vec![Vec::new()];
        let mut size = 0u64;
        for tensor in tensors {
            let bytes = tensor.bytes();
            let current = groups.last_mut().expect("one group");
            if !current.is_empty() && size + bytes > max_shard_bytes {
                groups.push(Vec::new());
                size = 0;
            }
            size += bytes;
            groups.last_mut().expect("one group").push(tensor);
        }
        let count = groups.len();
        let shards = groups
            .into_iter()
            .enumerate()
            .map(|(i, tensors)| Shard {
                file_name: if count == 1 {
                    WEIGHTS_FILE.to_string()
                } else {
                    format!("model-{:05}-of-{count:05}.safetensors", i + 1)
                },
                tensors,
            })
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            next: (0, 0),
            file: None,
        })
    }

    /// The tensor the writer expects next.
    pub fn expected(&self) -> Option<&PlannedTensor> {
        self.shards
            .get(self.next.0)
            .and_then(|s| s.tensors.get(self.next.1))
    }

    /// Writes the next planned tensor, which must be `tensor` (same name,
    /// dtype and shape).
    pub fn write(&mut self, name: &str, tensor: &Tensor) -> Result<()> {
        self.write_bytes(
            name,
            tensor.dtype(),
            tensor.dims(),
            &safetensors::View::data(tensor),
        )
    }

    /// Writes the next planned tensor from its little-endian bytes (a
    /// tensor copied unchanged goes from the source's mapping to the file).
    pub fn write_bytes(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<()> {
        self.write_with(name, dtype, shape, &mut |out| out.write_all(bytes))
    }

    /// Writes the next planned tensor, whose bytes `fill` writes into the
    /// shard in as many pieces as it likes (a generated tensor never has to
    /// be whole in memory); it must write exactly the planned size.
    pub fn write_with(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        fill: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<()> {
        let expected = self.expected().cloned().ok_or_else(|| {
            Error::InvalidArgument(format!("{name}: every planned tensor is written already"))
        })?;
        if expected.name != name || expected.dtype != dtype || expected.shape != shape {
            return Err(Error::InvalidArgument(format!(
                "{name} {dtype:?} {shape:?} written where {} {:?} {:?} was planned",
                expected.name, expected.dtype, expected.shape
            )));
        }
        if self.next.1 == 0 {
            self.open_shard()?;
        }
        let (path, out) = self.file.as_mut().expect("the shard is open");
        let mut counted = CountingWriter {
            inner: out,
            bytes: 0,
        };
        fill(&mut counted).map_err(|e| Error::io(&*path, e))?;
        if counted.bytes != expected.bytes() {
            return Err(Error::InvalidArgument(format!(
                "{name}: {} bytes written, {} planned",
                counted.bytes,
                expected.bytes()
            )));
        }
        self.next.1 += 1;
        if self.next.1 == self.shards[self.next.0].tensors.len() {
            let (path, out) = self.file.take().expect("the shard is open");
            let file = out
                .into_inner()
                .map_err(|e| Error::io(&path, e.into_error()))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
            self.next = (self.next.0 + 1, 0);
        }
        Ok(())
    }

    fn open_shard(&mut self) -> Result<()> {
        let shard = &self.shards[self.next.0];
        let path = self.dir.join(&shard.file_name);
        let mut header = serde_json::Map::new();
        let mut offset = 0u64;
        for t in &shard.tensors {
            let end = offset + t.bytes();
            header.insert(
                t.name.clone(),
                serde_json::json!({
                    "dtype": safetensors_dtype(t.dtype).expect("checked by new"),
                    "shape": t.shape,
                    "data_offsets": [offset, end],
                }),
            );
            offset = end;
        }
        header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
        let mut text =
            serde_json::to_string(&header).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        // The data starts 8-byte aligned, as the safetensors writer pads it.
        while (8 + text.len()) % 8 != 0 {
            text.push(' ');
        }
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(text.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(text.as_bytes()))
            .map_err(|e| Error::io(&path, e))?;
        self.file = Some((path, out));
        Ok(())
    }

    /// Checks that every planned tensor was written and writes the index.
    pub fn finish(self) -> Result<()> {
        if let Some(missing) = self.expected() {
            return Err(Error::InvalidArgument(format!(
                "{} was planned but not written",
                missing.name
            )));
        }
        if self.shards.len() > 1 {
            let weight_map: BTreeMap<&str, &str> = self
                .shards
                .iter()
                .flat_map(|s| {
                    s.tensors
                        .iter()
                        .map(move |t| (t.name.as_str(), s.file_name.as_str()))
                })
                .collect();
            let total: u64 = self
                .shards
                .iter()
                .flat_map(|s| &s.tensors)
                .map(PlannedTensor::bytes)
                .sum();
            let index = serde_json::json!({
                "metadata": { "total_size": total },
                "weight_map": weight_map,
            });
            let path = self.dir.join(WEIGHTS_INDEX_FILE);
            std::fs::write(&path, crate::io::json_file::to_json_document(&index))
                .map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensors() -> Vec<(String, Tensor)> {
        let d = Device::Cpu;
        vec![
            (
                "a".into(),
                Tensor::arange(0f32, 6.0, &d)
                    .unwrap()
                    .reshape((2, 3))
                    .unwrap(),
            ),
            ("b".into(), Tensor::new(&[1u32, 2, 3], &d).unwrap()),
            (
                "c".into(),
                Tensor::arange(0f32, 8.0, &d)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            ),
        ]
    }

    fn plan(tensors: &[(String, Tensor)]) -> Vec<PlannedTensor> {
        tensors
            .iter()
            .map(|(n, t)| PlannedTensor {
                name: n.clone(),
                dtype: t.dtype(),
                shape: t.dims().to_vec(),
            })
            .collect()
    }

    #[test]
    fn shards_and_their_index_load_back_as_written() {
        for (max, files) in [(1 << 20, 1), (24, 3)] {
            let dir = tempfile::tempdir().unwrap();
            let written = tensors();
            let mut writer = ShardedWriter::new(dir.path(), plan(&written), max).unwrap();
            for (name, t) in &written {
                writer.write(name, t).unwrap();
            }
            writer.finish().unwrap();
            let shards = std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".safetensors")
                })
                .count();
            assert_eq!(shards, files);
            assert_eq!(dir.path().join(WEIGHTS_INDEX_FILE).exists(), files > 1);
            let store = crate::io::weight_store::WeightStore::open(dir.path()).unwrap();
            for (name, t) in &written {
                let back = store.load_stored(name).unwrap();
                assert_eq!(back.dtype(), t.dtype());
                assert_eq!(
                    back.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                );
            }
        }
    }

    #[test]
    fn a_tensor_out_of_plan_or_missing_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let written = tensors();
        let mut writer = ShardedWriter::new(dir.path(), plan(&written), 1 << 20).unwrap();
        let err = writer.write("b", &written[1].1).unwrap_err().to_string();
        assert!(err.contains("where a"), "{err}");
        writer.write("a", &written[0].1).unwrap();
        let err = writer.finish().unwrap_err().to_string();
        assert!(err.contains("b was planned"), "{err}");
    }
}
