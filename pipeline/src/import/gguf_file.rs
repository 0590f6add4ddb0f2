//! Reading a GGUF file (llama.cpp's single-file model format): its header,
//! metadata and tensor directory, checked against the file before any tensor
//! is read, and each tensor dequantized to f32.
//!
//! The header is parsed here rather than by candle's `gguf_file` so that an
//! unsupported tensor type is refused by the tensor's name and type name, and
//! a tensor directory that disagrees with the data section (a wrong tensor
//! count, overlapping or misaligned tensors, a truncated file) is caught
//! before anything is written. Dequantization is candle's
//! (`quantized::ggml_file::qtensor_from_ggml`).
//!
//! Layout (GGUF v2/v3, little-endian): magic `GGUF`, version (u32), tensor
//! count (u64), metadata count (u64), the metadata key/value pairs, one
//! directory entry per tensor (name, dimensions innermost first, type,
//! offset into the data section), then the data section at the next
//! multiple of `general.alignment` (32 by default).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::Device;

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// No tensor of a real model has more dimensions than this.
const MAX_DIMENSIONS: u32 = 4;
/// Nested metadata arrays deeper than this are refused.
const MAX_ARRAY_DEPTH: usize = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetadataValue>),
}

impl MetadataValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            // The shortest decimal that reads back as the f32 (1e-5, not
            // 9.999999747378752e-6), as the writer of the file meant it.
            Self::F32(v) => v.to_string().parse().ok(),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// The tensor types effir dequantizes, by GGUF type id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TensorType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl TensorType {
    pub const ALL: [TensorType; 13] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    /// The type with GGUF id `id`, or the id's name when effir does not
    /// handle it.
    pub fn from_id(id: u32) -> std::result::Result<Self, String> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => return Err(unsupported_type_name(other)),
        })
    }

    /// The name llama.cpp gives the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::BF16 => GgmlDType::BF16,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q2K => GgmlDType::Q2K,
            Self::Q3K => GgmlDType::Q3K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Elements per block (1 for the float types).
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.ggml().type_size()
    }

    /// Whether the values are stored as floats (not quantized).
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }
}

impl std::fmt::Display for TensorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// llama.cpp's names for the type ids effir does not dequantize.
fn unsupported_type_name(id: u32) -> String {
    let name = match id {
        4 => "Q4_2 (removed from llama.cpp)",
        5 => "Q4_3 (removed from llama.cpp)",
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("unknown type id {id}"),
    };
    format!("{name} (type id {id})")
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major dimensions, outermost first (the reverse of GGUF's order):
    /// a weight matrix is `[out_features, in_features]`, as in PyTorch.
    pub dims: Vec<usize>,
    pub ty: TensorType,
    /// Offset of the tensor's bytes from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// Bytes of the stored tensor.
    pub fn bytes(&self) -> usize {
        self.elements() / self.ty.block_size() * self.ty.block_bytes()
    }
}

/// An open GGUF file: metadata and the checked tensor directory; tensors are
/// read from a read-only memory map on demand.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, MetadataValue>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    data_offset: u64,
}

impl GgufFile {
    /// Opens and checks `path`: the header parses, every tensor type is one
    /// effir handles, and the tensor directory covers the data section
    /// exactly (aligned, in bounds, no overlaps, nothing left over).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; effir does not modify the file while
        // it reads it, and a file truncated underneath is the user's doing
        // (the same contract as every mmap-based weight loader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad = |message: String| Error::config(path, message);
        let mut reader = Reader { bytes: &map, at: 0 };
        let magic = reader
            .take(4)
            .map_err(|_| bad("not a GGUF file: shorter than its magic".into()))?;
        if magic != MAGIC {
            return Err(bad(format!(
                "not a GGUF file: it starts with {magic:02x?}, not `GGUF`"
            )));
        }
        let version = reader.u32().map_err(|e| bad(format!("header: {e}")))?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        let tensor_count = reader.u64().map_err(|e| bad(format!("header: {e}")))?;
        let metadata_count = reader.u64().map_err(|e| bad(format!("header: {e}")))?;
        // Each metadata entry takes at least 13 bytes and each tensor entry
        // at least 28: refuse counts the file cannot hold before allocating.
        let remaining = reader.remaining() as u64;
        if metadata_count.saturating_mul(13) > remaining
            || tensor_count.saturating_mul(28) > remaining
        {
            return Err(bad(format!(
                "the header declares {tensor_count} tensors and {metadata_count} metadata entries; \
                 the file's {remaining} remaining bytes cannot hold them (truncated or corrupt)"
            )));
        }

        let mut metadata = BTreeMap::new();
        for index in 0..metadata_count {
            let key = reader
                .string()
                .map_err(|e| bad(format!("metadata entry {index}: {e}")))?;
            let value = reader
                .value(0)
                .map_err(|e| bad(format!("metadata `{key}`: {e}")))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(bad(format!("metadata key `{key}` appears twice")));
            }
        }

        let mut tensors = Vec::with_capacity(tensor_count as usize);
        let mut names = HashSet::new();
        for index in 0..tensor_count {
            let entry = |e: String| {
                bad(format!(
                    "tensor directory entry {index} of the {tensor_count} the header declares: {e}"
                ))
            };
            let name = reader.string().map_err(entry)?;
            let info = reader.tensor_info(name).map_err(entry)?;
            if !names.insert(info.name.clone()) {
                return Err(bad(format!("tensor `{}` is listed twice", info.name)));
            }
            tensors.push(info);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(bad(format!(
                        "`general.alignment` is {v:?}, not a power of two"
                    )))
                }
            },
        };
        let data_offset = (reader.at as u64).div_ceil(alignment) * alignment;
        check_data_section(path, &tensors, data_offset, map.len() as u64, alignment)?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors,
            data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Metadata value `key`, or an error naming the file and the key.
    pub fn require(&self, key: &str) -> Result<&MetadataValue> {
        self.metadata
            .get(key)
            .ok_or_else(|| Error::config(&self.path, format!("no metadata `{key}`")))
    }

    pub fn require_u64(&self, key: &str) -> Result<u64> {
        let value = self.require(key)?;
        value.as_u64().ok_or_else(|| {
            Error::config(&self.path, format!("`{key}` is {value:?}, not an integer"))
        })
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        let value = self.require(key)?;
        value
            .as_str()
            .ok_or_else(|| Error::config(&self.path, format!("`{key}` is {value:?}, not a string")))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The stored bytes of `info`.
    pub fn raw(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.map[start..start + info.bytes()]
    }

    /// `info` dequantized to f32, row-major.
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let cpu = Device::Cpu;
        let failed = |e: candle_core::Error| {
            Error::config(
                &self.path,
                format!(
                    "tensor `{}` ({}): cannot dequantize: {e}",
                    info.name, info.ty
                ),
            )
        };
        // candle reads the bytes as f32 values or block structs in place;
        // a file with a small `general.alignment` may place them at any
        // address, so they are copied to an 8-byte-aligned buffer first.
        let raw = self.raw(info);
        let mut aligned = vec![0u64; raw.len().div_ceil(8)];
        // SAFETY: a u64 buffer viewed as bytes: same memory, no alignment
        // requirement for u8, length within the allocation.
        let bytes: &mut [u8] = unsafe {
            std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast::<u8>(), aligned.len() * 8)
        };
        bytes[..raw.len()].copy_from_slice(raw);
        let quantized = candle_core::quantized::ggml_file::qtensor_from_ggml(
            info.ty.ggml(),
            &bytes[..raw.len()],
            info.dims.clone(),
            &cpu,
        )
        .map_err(failed)?;
        let values = quantized
            .dequantize(&cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(failed)?;
        Ok(values)
    }
}

/// Checks that the tensors tile the data section: each starts at an aligned
/// offset, ends inside the file, overlaps no other, and the last ends within
/// one alignment of the end of the file. A tensor count in the header that
/// disagrees with the directory shows here: too small a count leaves the
/// unread directory entries in front of the data, too large a count reads
/// tensor data as directory entries.
fn check_data_section(
    path: &Path,
    tensors: &[TensorInfo],
    data_offset: u64,
    file_len: u64,
    alignment: u64,
) -> Result<()> {
    let bad = |message: String| Error::config(path, message);
    let data_len = file_len.checked_sub(data_offset).ok_or_else(|| {
        bad(format!(
            "the tensor directory ends at byte {data_offset}, past the end of the file ({file_len} bytes): truncated"
        ))
    })?;
    let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(tensors.len());
    for t in tensors {
        if t.offset % alignment != 0 {
            return Err(bad(format!(
                "tensor `{}` starts at data offset {}, not a multiple of the alignment {alignment}",
                t.name, t.offset
            )));
        }
        let end = t
            .offset
            .checked_add(t.bytes() as u64)
            .filter(|&e| e <= data_len);
        let Some(end) = end else {
            return Err(bad(format!(
                "tensor `{}` ({} {:?}, {} bytes at data offset {}) runs past the end of the file: truncated",
                t.name,
                t.ty,
                t.dims,
                t.bytes(),
                t.offset
            )));
        };
        spans.push((t.offset, end, &t.name));
    }
    spans.sort_unstable();
    for pair in spans.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(bad(format!(
                "tensors `{}` and `{}` overlap in the data section",
                pair[0].2, pair[1].2
            )));
        }
    }
    let used = spans.last().map_or(0, |s| s.1);
    let slack = data_len - used;
    if slack >= alignment {
        return Err(bad(format!(
            "the data section holds {data_len} bytes but the {} tensors of the directory end at {used}: \
             {slack} bytes belong to no tensor (the header's tensor count disagrees with the file, or the file is corrupt)",
            tensors.len()
        )));
    }
    Ok(())
}

/// A bounds-checked little-endian reader over the header bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "needs {n} bytes at offset {}, the file ends {} bytes later (truncated)",
                self.at,
                self.remaining()
            ));
        }
        let slice = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A length that must fit in the rest of the file at `unit` bytes each.
    fn length(&mut self, unit: usize) -> std::result::Result<usize, String> {
        let n = self.u64()?;
        if n.saturating_mul(unit as u64) > self.remaining() as u64 {
            return Err(format!(
                "a length of {n} at offset {} exceeds the {} bytes left in the file",
                self.at - 8,
                self.remaining()
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.length(1)?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| format!("a string at offset {} is not UTF-8", self.at - n))
    }

    fn value(&mut self, depth: usize) -> std::result::Result<MetadataValue, String> {
        let ty = self.u32()?;
        self.value_of(ty, depth)
    }

    fn value_of(&mut self, ty: u32, depth: usize) -> std::result::Result<MetadataValue, String> {
        use MetadataValue as V;
        Ok(match ty {
            0 => V::U8(self.array::<1>()?[0]),
            1 => V::I8(self.array::<1>()?[0] as i8),
            2 => V::U16(u16::from_le_bytes(self.array()?)),
            3 => V::I16(i16::from_le_bytes(self.array()?)),
            4 => V::U32(self.u32()?),
            5 => V::I32(i32::from_le_bytes(self.array()?)),
            6 => V::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => V::Bool(false),
                1 => V::Bool(true),
                b => return Err(format!("a boolean holds {b}")),
            },
            8 => V::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let element = self.u32()?;
                let unit = match element {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 => 8,
                    9 => 12,
                    other => return Err(format!("unknown metadata value type {other}")),
                };
                let n = self.length(unit)?;
                let mut values = Vec::with_capacity(n);
                for _ in 0..n {
                    values.push(self.value_of(element, depth + 1)?);
                }
                V::Array(values)
            }
            10 => V::U64(self.u64()?),
            11 => V::I64(i64::from_le_bytes(self.array()?)),
            12 => V::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }

    fn tensor_info(&mut self, name: String) -> std::result::Result<TensorInfo, String> {
        let n_dims = self.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMENSIONS {
            return Err(format!(
                "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMENSIONS} are valid)"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64()?);
        }
        dims.reverse();
        let type_id = self.u32()?;
        let offset = self.u64()?;
        let ty = TensorType::from_id(type_id).map_err(|ty| {
            format!(
                "tensor `{name}` has type {ty}, which effir does not dequantize (it handles {})",
                TensorType::ALL.map(|t| t.name()).join(", ")
            )
        })?;
        let mut elements: u64 = 1;
        for &d in &dims {
            elements = elements
                .checked_mul(d)
                .filter(|&e| e <= 1 << 40)
                .ok_or_else(|| {
                    format!("tensor `{name}` has dimensions {dims:?}: too many elements")
                })?;
        }
        let inner = *dims.last().expect("n_dims >= 1");
        if elements == 0 || inner % ty.block_size() as u64 != 0 {
            return Err(format!(
                "tensor `{name}` has dimensions {dims:?}; {ty} needs rows of a multiple of {} values",
                ty.block_size()
            ));
        }
        Ok(TensorInfo {
            name,
            dims: dims.into_iter().map(|d| d as usize).collect(),
            ty,
            offset,
        })
    }
}
