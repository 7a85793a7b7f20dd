//! The interchange formats ([`Format`]): their names, the file extensions that name them, and
//! sniffing a file's format from its content.

use super::trim_ascii;
use std::fmt;

/// The interchange formats (and the project's own `.mrt` file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// The project's trace file (`.mrt`, see `docs/trace-format.md`).
    Mrt,
    /// NumPy `.npy` `[T, L, K]`.
    Npy,
    /// safetensors with tensor `routed_experts` `[T, L, K]`.
    Safetensors,
    /// SGLang `routed_experts`: base64 of little-endian int32, flat `[T, L, K]`.
    Sglang,
    /// NeMo Gym envelope `nrlre1:<dtype>:<T>x<L>x<K>:<base64>`.
    Nrlre1,
    /// Fireworks R3/v1: base64 of a zstd frame.
    R3v1,
    /// prime-rl msgpack `{data, shape, dtype, start}`.
    PrimeRl,
}

impl Format {
    /// Every format, in CLI order.
    pub const ALL: [Format; 7] = [
        Format::Mrt,
        Format::Npy,
        Format::Safetensors,
        Format::Sglang,
        Format::Nrlre1,
        Format::R3v1,
        Format::PrimeRl,
    ];

    /// The name used on the command line (`mrt`, `npy`, `safetensors`, `sglang`, `nrlre1`,
    /// `r3v1`, `prime-rl`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Mrt => "mrt",
            Format::Npy => "npy",
            Format::Safetensors => "safetensors",
            Format::Sglang => "sglang",
            Format::Nrlre1 => "nrlre1",
            Format::R3v1 => "r3v1",
            Format::PrimeRl => "prime-rl",
        }
    }

    /// Parses [`Format::name`] (case-insensitive; `prime_rl` and `primerl` are accepted too).
    pub fn from_name(s: &str) -> Option<Format> {
        let s = s.to_ascii_lowercase().replace('_', "-");
        match s.as_str() {
            "primerl" => Some(Format::PrimeRl),
            _ => Format::ALL.into_iter().find(|f| f.name() == s),
        }
    }

    /// The format a file extension names unambiguously: `.mrt`, `.npy`, `.safetensors`,
    /// `.msgpack` (prime-rl). Other extensions (the text formats have none of their own) give
    /// `None`.
    pub fn from_extension(ext: &str) -> Option<Format> {
        match ext.to_ascii_lowercase().as_str() {
            "mrt" => Some(Format::Mrt),
            "npy" => Some(Format::Npy),
            "safetensors" => Some(Format::Safetensors),
            "msgpack" => Some(Format::PrimeRl),
            _ => None,
        }
    }

    /// The format of a path by its extension (see [`Format::from_extension`]).
    pub fn from_path(path: &std::path::Path) -> Option<Format> {
        path.extension()
            .and_then(|e| e.to_str())
            .and_then(Format::from_extension)
    }

    /// Guesses the format from the content: the `.mrt`, `.npy` and safetensors headers, the
    /// `nrlre1:` prefix, base64 of a zstd frame (R3/v1), base64 otherwise (SGLang), and a
    /// msgpack map (prime-rl). `None` when nothing fits.
    pub fn sniff(bytes: &[u8]) -> Option<Format> {
        if bytes.starts_with(&[0x89, b'M', b'R', b'T']) {
            return Some(Format::Mrt);
        }
        if bytes.starts_with(b"\x93NUMPY") {
            return Some(Format::Npy);
        }
        let text = trim_ascii(bytes);
        if text.starts_with(b"nrlre1:") {
            return Some(Format::Nrlre1);
        }
        // An SGLang response / meta_info object.
        if text.starts_with(b"{") && text.windows(16).any(|w| w == b"\"routed_experts\"") {
            return Some(Format::Sglang);
        }
        // A msgpack fixmap / map16 / map32 holding a "data" key.
        if matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf)) && bytes.windows(5).any(|w| w == b"\xa4data") {
            return Some(Format::PrimeRl);
        }
        if bytes.len() >= 9 {
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
            if bytes[8] == b'{' && n >= 2 && n < bytes.len() as u64 {
                return Some(Format::Safetensors);
            }
        }
        if !text.is_empty()
            && text
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'-' | b'_'))
        {
            // base64 of the zstd magic 28 b5 2f fd starts with "KLUv".
            return Some(if text.starts_with(b"KLUv") {
                Format::R3v1
            } else {
                Format::Sglang
            });
        }
        None
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
