//! Per-rank shards and the small JSON manifest that merges them.

use super::file::{OpenOptions, TraceFile};
use super::model::Trace;
use super::{MISSING_ID, RouteSource, TraceError, TraceHeader};
use moe_router_core::layout::{LayerId, SeqId};
use ndarray::{Array2, ArrayViewMut2, Zip};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `format` value of a manifest.
pub const MANIFEST_FORMAT: &str = "moe-router-trace-manifest";

/// One shard of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestShard {
    /// Path of the shard's `.mrt` file, relative to the manifest's directory (or absolute).
    pub path: String,
    /// The rank that wrote it.
    pub rank: u32,
}

/// A manifest: the shards (one `.mrt` file per rank) that together form one trace.
///
/// JSON: `{"format": "moe-router-trace-manifest", "version": 1, "num_experts": E, "top_k": K,
/// "layers": [...], "fingerprint": F, "shards": [{"path": "rank-0.mrt", "rank": 0}, ...]}`.
/// The header fields are a summary for tools; the shard headers are authoritative and must
/// agree with each other and with the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `"moe-router-trace-manifest"`.
    pub format: String,
    /// Manifest version (1).
    pub version: u32,
    /// E.
    pub num_experts: usize,
    /// K.
    pub top_k: usize,
    /// MoE layer ids.
    pub layers: Vec<u32>,
    /// Config fingerprint.
    pub fingerprint: u64,
    /// The shards.
    pub shards: Vec<ManifestShard>,
}

impl Manifest {
    /// A manifest for shards written with `header`.
    pub fn new(header: &TraceHeader, shards: Vec<ManifestShard>) -> Self {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: 1,
            num_experts: header.num_experts(),
            top_k: header.top_k(),
            layers: header.layer_ids(),
            fingerprint: header.fingerprint(),
            shards,
        }
    }

    /// Writes the manifest as pretty JSON.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), TraceError> {
        let path = path.as_ref();
        let s = serde_json::to_string_pretty(self).map_err(|e| TraceError::Manifest {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        std::fs::write(path, s).map_err(|e| TraceError::io(format!("writing {}", path.display()), &e))
    }

    /// Reads and checks a manifest.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, TraceError> {
        let path = path.as_ref();
        let s = std::fs::read_to_string(path).map_err(|e| TraceError::io(format!("reading {}", path.display()), &e))?;
        Self::parse(&s, path)
    }

    /// Parses manifest JSON (`path` is used in error messages).
    pub fn parse(json: &str, path: &Path) -> Result<Self, TraceError> {
        let err = |reason: String| TraceError::Manifest {
            path: path.display().to_string(),
            reason,
        };
        let m: Manifest = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
        if m.format != MANIFEST_FORMAT {
            return Err(err(format!("format is {:?}, expected {MANIFEST_FORMAT:?}", m.format)));
        }
        if m.version != 1 {
            return Err(err(format!("unsupported manifest version {}", m.version)));
        }
        if m.shards.is_empty() {
            return Err(err("no shards".into()));
        }
        let mut ranks: Vec<u32> = m.shards.iter().map(|s| s.rank).collect();
        ranks.sort_unstable();
        if let Some(w) = ranks.windows(2).find(|w| w[0] == w[1]) {
            return Err(err(format!("rank {} listed twice", w[0])));
        }
        Ok(m)
    }

    /// Opens every shard (paths relative to the manifest's directory) as one [`ShardedTrace`].
    pub fn open(path: impl AsRef<Path>, opts: OpenOptions) -> Result<ShardedTrace, TraceError> {
        let path = path.as_ref();
        let m = Self::read(path)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut files = Vec::with_capacity(m.shards.len());
        for s in &m.shards {
            let p = PathBuf::from(&s.path);
            let p = if p.is_absolute() { p } else { dir.join(p) };
            files.push((s.rank, TraceFile::open_with(&p, opts)?));
        }
        let sh = ShardedTrace::new(files)?;
        let h = sh.header();
        if h.num_experts() != m.num_experts
            || h.top_k() != m.top_k
            || h.layer_ids() != m.layers
            || h.fingerprint() != m.fingerprint
        {
            return Err(TraceError::Manifest {
                path: path.display().to_string(),
                reason: format!("manifest summary disagrees with the shard headers ({h:?})"),
            });
        }
        Ok(sh)
    }
}

/// Several shard files read as one trace. A row present in two shards must hold the same ids
/// (else [`TraceError::Conflict`]).
#[derive(Debug)]
pub struct ShardedTrace {
    shards: Vec<(u32, TraceFile)>,
}

impl ShardedTrace {
    /// Combines opened shards (`(rank, file)`); their headers must agree up to the producer.
    pub fn new(shards: Vec<(u32, TraceFile)>) -> Result<Self, TraceError> {
        let Some((_, first)) = shards.first() else {
            return Err(TraceError::Manifest {
                path: String::new(),
                reason: "no shards".into(),
            });
        };
        for (_, s) in &shards[1..] {
            first.header().check_compatible(s.header())?;
        }
        Ok(ShardedTrace { shards })
    }

    /// The shards with their ranks.
    pub fn shards(&self) -> &[(u32, TraceFile)] {
        &self.shards
    }

    /// Merges every shard into one in-memory trace.
    pub fn to_trace(&self) -> Result<Trace, TraceError> {
        let mut t = Trace::new(self.header().clone());
        for (_, s) in &self.shards {
            t.merge(&s.to_trace()?)?;
        }
        Ok(t)
    }
}

impl RouteSource for ShardedTrace {
    fn header(&self) -> &TraceHeader {
        // `new` guarantees at least one shard.
        self.shards[0].1.header()
    }

    fn read_rows(
        &self,
        seq: SeqId,
        layer: LayerId,
        start: u64,
        mut out: ArrayViewMut2<'_, u32>,
    ) -> Result<(), TraceError> {
        let (rows, k) = out.dim();
        if self.shards.len() == 1 {
            return self.shards[0].1.read_rows(seq, layer, start, out);
        }
        out.fill(MISSING_ID);
        let mut tmp = Array2::from_elem((rows, k), MISSING_ID);
        for (_, s) in &self.shards {
            s.read_rows(seq, layer, start, tmp.view_mut())?;
            for (r, (mut o, t)) in out.outer_iter_mut().zip(tmp.outer_iter()).enumerate() {
                if t[0] == MISSING_ID {
                    continue;
                }
                if o[0] == MISSING_ID {
                    Zip::from(&mut o).and(&t).for_each(|a, &b| *a = b);
                } else if o != t {
                    return Err(TraceError::Conflict {
                        seq: seq.0,
                        layer: layer.0,
                        position: start + r as u64,
                    });
                }
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), TraceError> {
        for (_, s) in &self.shards {
            s.verify_all()?;
        }
        self.to_trace()?.check_all_zero_layers()
    }
}
