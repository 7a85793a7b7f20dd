//! NumPy `.npy` reading and writing (format versions 1.0, 2.0 and 3.0), with typed errors that
//! give the byte offset of what is wrong. Values that do not fit a target type are refused,
//! never wrapped.
//!
//! **bfloat16.** NumPy has no bfloat16 type: `np.save` of an `ml_dtypes.bfloat16` array (as JAX
//! and `ml_dtypes` users write it) stores the 2-byte opaque descr `|V2`, which this module reads
//! as [`NpyDtype::Bf16`] and writes for it. torch cannot call `.numpy()` on a bf16 tensor; saving
//! `t.view(torch.int16).numpy()` gives `<i2`, which holds bf16 bits only by the caller's word, so
//! it stays [`NpyDtype::I16`] here (the CLI's `route --logits-dtype bf16` takes it as bf16).

use half::{bf16, f16};
use std::io::Write;
use std::path::Path;

/// Element types this module reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    /// `f2`
    F16,
    /// `f4`
    F32,
    /// `f8`
    F64,
    /// bfloat16, stored as NumPy's 2-byte opaque type `V2` (descr `|V2`, as `np.save` writes an
    /// `ml_dtypes.bfloat16` array; `<V2` is read too).
    Bf16,
    /// `i1`
    I8,
    /// `i2`
    I16,
    /// `i4`
    I32,
    /// `i8`
    I64,
    /// `u1` (also `b1`, booleans)
    U8,
    /// `u2`
    U16,
    /// `u4`
    U32,
    /// `u8`
    U64,
}

impl NpyDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            NpyDtype::I8 | NpyDtype::U8 => 1,
            NpyDtype::F16 | NpyDtype::Bf16 | NpyDtype::I16 | NpyDtype::U16 => 2,
            NpyDtype::F32 | NpyDtype::I32 | NpyDtype::U32 => 4,
            NpyDtype::F64 | NpyDtype::I64 | NpyDtype::U64 => 8,
        }
    }
    /// The descr string written to headers (little-endian).
    pub fn descr(self) -> &'static str {
        match self {
            NpyDtype::F16 => "<f2",
            NpyDtype::F32 => "<f4",
            NpyDtype::F64 => "<f8",
            NpyDtype::Bf16 => "|V2",
            NpyDtype::I8 => "|i1",
            NpyDtype::I16 => "<i2",
            NpyDtype::I32 => "<i4",
            NpyDtype::I64 => "<i8",
            NpyDtype::U8 => "|u1",
            NpyDtype::U16 => "<u2",
            NpyDtype::U32 => "<u4",
            NpyDtype::U64 => "<u8",
        }
    }
    /// Whether this is an integer type.
    pub fn is_integer(self) -> bool {
        !matches!(self, NpyDtype::F16 | NpyDtype::F32 | NpyDtype::F64 | NpyDtype::Bf16)
    }
    /// A readable name (`float32`, `bfloat16`, `int16`, …).
    pub fn name(self) -> &'static str {
        match self {
            NpyDtype::F16 => "float16",
            NpyDtype::F32 => "float32",
            NpyDtype::F64 => "float64",
            NpyDtype::Bf16 => "bfloat16",
            NpyDtype::I8 => "int8",
            NpyDtype::I16 => "int16",
            NpyDtype::I32 => "int32",
            NpyDtype::I64 => "int64",
            NpyDtype::U8 => "uint8",
            NpyDtype::U16 => "uint16",
            NpyDtype::U32 => "uint32",
            NpyDtype::U64 => "uint64",
        }
    }
    /// Inclusive value range of an integer type.
    pub fn int_range(self) -> (i128, i128) {
        match self {
            NpyDtype::I8 => (i8::MIN.into(), i8::MAX.into()),
            NpyDtype::I16 => (i16::MIN.into(), i16::MAX.into()),
            NpyDtype::I32 => (i32::MIN.into(), i32::MAX.into()),
            NpyDtype::I64 => (i64::MIN.into(), i64::MAX.into()),
            NpyDtype::U8 => (0, u8::MAX.into()),
            NpyDtype::U16 => (0, u16::MAX.into()),
            NpyDtype::U32 => (0, u32::MAX.into()),
            NpyDtype::U64 => (0, u64::MAX.into()),
            _ => (0, 0),
        }
    }
}

/// An error reading or writing `.npy` data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NpyError {
    /// The data ends early.
    #[error("truncated .npy: needed {needed} bytes at byte offset {offset}, only {available} available")]
    Truncated {
        /// Where the missing bytes start.
        offset: usize,
        /// How many were needed from there.
        needed: usize,
        /// How many there are.
        available: usize,
    },
    /// Not an `.npy` file.
    #[error("not a .npy file: bad magic at byte offset 0 (expected \\x93NUMPY)")]
    BadMagic,
    /// Unsupported format version.
    #[error("unsupported .npy format version {major}.{minor} at byte offset 6")]
    Version {
        /// Major version.
        major: u8,
        /// Minor version.
        minor: u8,
    },
    /// The header dictionary is malformed.
    #[error("malformed .npy header at byte offset {offset}: {reason}")]
    Header {
        /// Offset of the header text.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
    /// The dtype is not supported.
    #[error("unsupported .npy dtype {descr:?}")]
    Dtype {
        /// The descr string.
        descr: String,
    },
    /// The array has an unexpected dtype.
    #[error("{what}: expected dtype {expected}, found {found}")]
    WrongDtype {
        /// What was being read.
        what: String,
        /// Allowed dtypes.
        expected: String,
        /// Found dtype.
        found: String,
    },
    /// The array has an unexpected shape.
    #[error("{what}: expected shape {expected}, found {found:?}")]
    WrongShape {
        /// What was being read.
        what: String,
        /// Expected shape, described.
        expected: String,
        /// Found shape.
        found: Vec<usize>,
    },
    /// A value does not fit the target type.
    #[error("value {value} at flat index {index} does not fit {target}")]
    OutOfRange {
        /// Flat element index.
        index: usize,
        /// The value.
        value: i128,
        /// Target type.
        target: String,
    },
    /// An I/O error.
    #[error("{path}: {message}")]
    Io {
        /// File path.
        path: String,
        /// OS message.
        message: String,
    },
}

/// A parsed `.npy` array: shape, dtype and little-endian, C-order element bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: NpyDtype,
    /// Element bytes, little-endian, C order.
    pub data: Vec<u8>,
}

fn need(bytes: &[u8], offset: usize, n: usize) -> Result<&[u8], NpyError> {
    bytes.get(offset..offset.saturating_add(n)).ok_or(NpyError::Truncated {
        offset,
        needed: n,
        available: bytes.len().saturating_sub(offset),
    })
}

fn parse_descr(d: &str) -> Result<(NpyDtype, bool), NpyError> {
    let bad = || NpyError::Dtype { descr: d.to_string() };
    if !d.is_ascii() {
        return Err(bad());
    }
    let (endian, rest) = d.split_at(1.min(d.len()));
    let big = match endian {
        "<" | "|" | "=" => false,
        ">" => true,
        _ => return Err(bad()),
    };
    let t = match rest {
        "f2" => NpyDtype::F16,
        "f4" => NpyDtype::F32,
        "f8" => NpyDtype::F64,
        "i1" => NpyDtype::I8,
        "i2" => NpyDtype::I16,
        "i4" => NpyDtype::I32,
        "i8" => NpyDtype::I64,
        "u1" | "b1" => NpyDtype::U8,
        "u2" => NpyDtype::U16,
        "u4" => NpyDtype::U32,
        "u8" => NpyDtype::U64,
        "V2" => NpyDtype::Bf16,
        _ => return Err(bad()),
    };
    Ok((t, big))
}

/// Parses `.npy` bytes.
pub fn parse(bytes: &[u8]) -> Result<NpyArray, NpyError> {
    let magic = need(bytes, 0, 6)?;
    if magic != b"\x93NUMPY" {
        return Err(NpyError::BadMagic);
    }
    let ver = need(bytes, 6, 2)?;
    let (hlen, hstart) = match ver[0] {
        1 => {
            let l = need(bytes, 8, 2)?;
            (usize::from(u16::from_le_bytes([l[0], l[1]])), 10)
        }
        2 | 3 => {
            let l = need(bytes, 8, 4)?;
            (u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize, 12)
        }
        major => return Err(NpyError::Version { major, minor: ver[1] }),
    };
    let htext = need(bytes, hstart, hlen)?;
    let h = std::str::from_utf8(htext).map_err(|_| NpyError::Header {
        offset: hstart,
        reason: "header is not UTF-8".into(),
    })?;
    let herr = |reason: &str| NpyError::Header {
        offset: hstart,
        reason: reason.to_string(),
    };
    let field = |key: &str| -> Result<&str, NpyError> {
        let pat = format!("'{key}':");
        let i = h.find(&pat).ok_or_else(|| herr(&format!("missing key '{key}'")))?;
        Ok(h[i + pat.len()..].trim_start())
    };
    let descr_s = field("descr")?;
    let descr = descr_s
        .strip_prefix('\'')
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| herr("descr is not a quoted string"))?;
    let (dtype, big) = parse_descr(descr)?;
    let fo = field("fortran_order")?;
    let fortran = if fo.starts_with("True") {
        true
    } else if fo.starts_with("False") {
        false
    } else {
        return Err(herr("fortran_order is not True/False"));
    };
    let sh = field("shape")?;
    let sh = sh
        .strip_prefix('(')
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| herr("shape is not a tuple"))?;
    let mut shape = Vec::new();
    for part in sh.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p = part.trim_end_matches('L');
        shape.push(
            p.parse::<usize>()
                .map_err(|_| herr(&format!("bad shape entry {part:?}")))?,
        );
    }
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| herr("shape overflows"))?;
    let dstart = hstart + hlen;
    let nbytes = n.checked_mul(dtype.size()).ok_or_else(|| herr("size overflows"))?;
    let raw = need(bytes, dstart, nbytes)?;
    let mut data = raw.to_vec();
    if big && dtype.size() > 1 {
        for c in data.chunks_exact_mut(dtype.size()) {
            c.reverse();
        }
    }
    if fortran && shape.len() > 1 {
        data = fortran_to_c(&data, &shape, dtype.size());
    }
    Ok(NpyArray { shape, dtype, data })
}

fn fortran_to_c(data: &[u8], shape: &[usize], es: usize) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut out = vec![0u8; data.len()];
    let nd = shape.len();
    let mut idx = vec![0usize; nd];
    for c_index in 0..n {
        // idx is the multi-index of c_index in C order; compute its Fortran offset.
        let mut f_off = 0usize;
        let mut stride = 1usize;
        for d in 0..nd {
            f_off += idx[d] * stride;
            stride *= shape[d];
        }
        out[c_index * es..(c_index + 1) * es].copy_from_slice(&data[f_off * es..(f_off + 1) * es]);
        for d in (0..nd).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Reads and parses a `.npy` file.
pub fn read(path: &Path) -> Result<NpyArray, NpyError> {
    let bytes = std::fs::read(path).map_err(|e| NpyError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    parse(&bytes)
}

impl NpyArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check_rank(&self, what: &str, rank: usize, desc: &str) -> Result<(), NpyError> {
        if self.shape.len() != rank {
            return Err(NpyError::WrongShape {
                what: what.into(),
                expected: desc.into(),
                found: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// Elements as f32 (from f16, bf16 or f32 exactly; f64 is refused to avoid silent rounding).
    pub fn to_f32(&self, what: &str) -> Result<Vec<f32>, NpyError> {
        match self.dtype {
            NpyDtype::Bf16 => Ok(self.to_bf16(what)?.into_iter().map(bf16::to_f32).collect()),
            NpyDtype::F32 => Ok(self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            NpyDtype::F16 => Ok(self
                .data
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect()),
            other => Err(NpyError::WrongDtype {
                what: what.into(),
                expected: "float32, float16 or bfloat16".into(),
                found: other.descr().into(),
            }),
        }
    }

    /// Elements as bf16 (bfloat16 only).
    pub fn to_bf16(&self, what: &str) -> Result<Vec<bf16>, NpyError> {
        match self.dtype {
            NpyDtype::Bf16 => Ok(self
                .data
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect()),
            other => Err(NpyError::WrongDtype {
                what: what.into(),
                expected: "bfloat16 (descr |V2)".into(),
                found: other.descr().into(),
            }),
        }
    }

    /// Elements as f64 (float64 only).
    pub fn to_f64(&self, what: &str) -> Result<Vec<f64>, NpyError> {
        match self.dtype {
            NpyDtype::F64 => Ok(self
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()),
            other => Err(NpyError::WrongDtype {
                what: what.into(),
                expected: "float64".into(),
                found: other.descr().into(),
            }),
        }
    }

    /// Elements as f16 bits (f16 only).
    pub fn to_f16(&self, what: &str) -> Result<Vec<f16>, NpyError> {
        match self.dtype {
            NpyDtype::F16 => Ok(self
                .data
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect()),
            other => Err(NpyError::WrongDtype {
                what: what.into(),
                expected: "float16".into(),
                found: other.descr().into(),
            }),
        }
    }

    /// Integer elements widened to i128 (any integer dtype).
    pub fn to_ints(&self, what: &str) -> Result<Vec<i128>, NpyError> {
        let d = &self.data;
        let v: Vec<i128> = match self.dtype {
            NpyDtype::I8 => d.iter().map(|&b| i128::from(b as i8)).collect(),
            NpyDtype::U8 => d.iter().map(|&b| i128::from(b)).collect(),
            NpyDtype::I16 => d
                .chunks_exact(2)
                .map(|c| i128::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
            NpyDtype::U16 => d
                .chunks_exact(2)
                .map(|c| i128::from(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            NpyDtype::I32 => d
                .chunks_exact(4)
                .map(|c| i128::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            NpyDtype::U32 => d
                .chunks_exact(4)
                .map(|c| i128::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            NpyDtype::I64 => d
                .chunks_exact(8)
                .map(|c| i128::from(i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))))
                .collect(),
            NpyDtype::U64 => d
                .chunks_exact(8)
                .map(|c| i128::from(u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))))
                .collect(),
            other => {
                return Err(NpyError::WrongDtype {
                    what: what.into(),
                    expected: "an integer dtype".into(),
                    found: other.descr().into(),
                });
            }
        };
        Ok(v)
    }

    /// A 2-D f32 (or f16-widened) array `[rows, cols]`.
    pub fn to_f32_2d(&self, what: &str) -> Result<ndarray::Array2<f32>, NpyError> {
        self.check_rank(what, 2, "[T, E]")?;
        let v = self.to_f32(what)?;
        ndarray::Array2::from_shape_vec((self.shape[0], self.shape[1]), v).map_err(|_| NpyError::WrongShape {
            what: what.into(),
            expected: "[T, E]".into(),
            found: self.shape.clone(),
        })
    }
}

/// Serialises an array to `.npy` bytes (format 1.0, or 2.0 for very long headers).
pub fn to_bytes(shape: &[usize], dtype: NpyDtype, data: &[u8]) -> Vec<u8> {
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        dtype.descr(),
        shape_s
    );
    let v1 = header.len() + 11 < 65_536;
    let pre = if v1 { 10 } else { 12 };
    let total = (pre + header.len() + 1).div_ceil(64) * 64;
    while pre + header.len() + 1 < total {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(total + data.len());
    out.extend_from_slice(b"\x93NUMPY");
    if v1 {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Writes an array to a `.npy` file.
pub fn write(path: &Path, shape: &[usize], dtype: NpyDtype, data: &[u8]) -> Result<(), NpyError> {
    let io = |e: std::io::Error| NpyError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(&to_bytes(shape, dtype, data)).map_err(io)?;
    Ok(())
}

/// Little-endian bytes of an f32 slice.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian bytes of an i32 slice.
pub fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
