//! Writing `.npy` files (NumPy format 1.0, little-endian `f32`, C order).

use std::path::Path;

use ndarray::Array2;

use crate::error::{Error, Result};
use crate::io::atomic_file::write_atomically;

/// Writes `array` to `path` as a `.npy` file, atomically.
pub fn write_npy(path: &Path, array: &Array2<f32>) -> Result<()> {
    let (rows, cols) = array.dim();
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + header length (2) + header, padded with
    // spaces and ended by '\n' to a multiple of 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let header_len = u16::try_from(header.len())
        .map_err(|_| Error::InvalidArgument("npy header too long".into()))?;
    write_atomically(path, |w| {
        let io = |e| Error::io(path, e);
        w.write_all(b"\x93NUMPY\x01\x00").map_err(io)?;
        w.write_all(&header_len.to_le_bytes()).map_err(io)?;
        w.write_all(header.as_bytes()).map_err(io)?;
        for value in array.iter() {
            w.write_all(&value.to_le_bytes()).map_err(io)?;
        }
        Ok(())
    })
}

/// Writes one JSON line per row: `{"index": i, "embedding": [...]}`, atomically.
pub fn write_jsonl(path: &Path, array: &Array2<f32>) -> Result<()> {
    write_atomically(path, |w| {
        for (i, row) in array.rows().into_iter().enumerate() {
            let line = serde_json::json!({ "index": i, "embedding": row.to_vec() });
            serde_json::to_writer(&mut *w, &line).map_err(|error| Error::Json {
                path: path.to_path_buf(),
                error,
            })?;
            w.write_all(b"\n").map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    })
}

/// Reads a 2-D little-endian `f32` `.npy` file (C order) as written by
/// [`write_npy`] or NumPy.
pub fn read_npy(path: &Path) -> Result<Array2<f32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |message: &str| Error::Input {
        path: path.to_path_buf(),
        line: 0,
        message: format!("not a 2-D float32 .npy file: {message}"),
    };
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("no NumPy magic"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unknown format version")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("dtype is not <f4 in C order"));
    }
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_>>()?;
    let [rows, cols] = dims[..] else {
        return Err(bad("not 2-D"));
    };
    let data = &bytes[start + header_len..];
    if data.len() != rows * cols * 4 {
        return Err(bad("data length does not match the shape"));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Array2::from_shape_vec((rows, cols), values).map_err(|_| bad("bad shape"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_64_byte_aligned_and_data_follows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let array = Array2::from_shape_vec((2, 3), vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        write_npy(&path, &array).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        let data: Vec<f32> = bytes[10 + header_len..]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(data, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(read_npy(&path).unwrap(), array);
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        assert!(read_npy(&path).is_err(), "a truncated file must not load");
    }
}
