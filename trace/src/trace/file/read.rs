//! Reading a `.mrt` file: the rows of a (sequence, layer) from any position, the whole file as a
//! [`Trace`], its sequences and summary, and the [`RouteSource`] the replay policies read from.

use super::TraceFile;
use crate::trace::model::{Trace, TraceSummary};
use crate::trace::{ALL_ZERO_MIN_ROWS, MISSING_ID, RouteSource, TraceError, TraceHeader};
use moe_router_core::layout::{LayerId, SeqId};
use ndarray::ArrayViewMut2;

impl TraceFile {
    /// Loads the whole file into an in-memory [`Trace`].
    pub fn to_trace(&self) -> Result<Trace, TraceError> {
        let mut t = self.overlay.clone();
        let rb = self.codec.row_bytes();
        let mut keys: Vec<_> = self.lanes.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            for bl in &self.lanes[&key] {
                let raw = self.payload(bl.chunk)?;
                let off = bl.data_off as usize;
                t.insert(key.0, key.1, bl.start, &raw[off..off + bl.rows as usize * rb], true)?;
            }
        }
        Ok(t)
    }

    /// Counts of the whole file (loads it; see [`Trace::summary`]).
    pub fn summary(&self) -> Result<TraceSummary, TraceError> {
        Ok(self.to_trace()?.summary())
    }

    /// Distinct sequence ids, ascending.
    pub fn sequences(&self) -> Vec<SeqId> {
        let mut v: Vec<SeqId> = self.lanes.keys().map(|k| k.0).chain(self.overlay.sequences()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Fills `out` (`[len, K]`) with positions `start..` of `seq` at `layer` (see
    /// [`RouteSource::read_rows`]).
    pub fn read_rows(
        &self,
        seq: SeqId,
        layer: LayerId,
        start: u64,
        mut out: ArrayViewMut2<'_, u32>,
    ) -> Result<(), TraceError> {
        if self.header.layer_index(layer).is_none() {
            return Err(TraceError::UnknownLayer {
                layer: layer.0,
                known: self.header.layer_ids(),
            });
        }
        let (len, k) = out.dim();
        if k != self.codec.top_k() {
            return Err(TraceError::Shape {
                top_k: self.codec.top_k(),
                got: k,
            });
        }
        let Some(blocks) = self.lanes.get(&(seq, layer)) else {
            return self.overlay.read_rows(seq, layer, start, out);
        };
        let rb = self.codec.row_bytes();
        let end = start.saturating_add(len as u64);
        let i0 = blocks.partition_point(|b| b.start + u64::from(b.rows) <= start);
        if let Some(o) = out.as_slice_mut() {
            // Contiguous output: whole block ranges are widened at once; only the gaps between
            // blocks are filled with the missing marker.
            let mut cursor = start;
            for bl in &blocks[i0..] {
                if bl.start >= end {
                    break;
                }
                let raw = self.payload(bl.chunk)?;
                let lo = start.max(bl.start);
                let hi = end.min(bl.start + u64::from(bl.rows));
                let a = bl.data_off as usize + (lo - bl.start) as usize * rb;
                let data = raw
                    .get(a..a + (hi - lo) as usize * rb)
                    .ok_or_else(|| TraceError::Malformed {
                        what: format!("chunk {}", bl.chunk),
                        offset: 0,
                        reason: "block runs past its chunk's payload".into(),
                    })?;
                o[(cursor - start) as usize * k..(lo - start) as usize * k].fill(MISSING_ID);
                self.codec
                    .decode_rows_into(data, &mut o[(lo - start) as usize * k..(hi - start) as usize * k]);
                cursor = hi;
            }
            o[(cursor - start) as usize * k..].fill(MISSING_ID);
            return Ok(());
        }
        out.fill(MISSING_ID);
        for bl in &blocks[i0..] {
            if bl.start >= end {
                break;
            }
            let raw = self.payload(bl.chunk)?;
            let be = bl.start + u64::from(bl.rows);
            let lo = start.max(bl.start);
            let hi = end.min(be);
            let data = &raw[bl.data_off as usize..];
            for p in lo..hi {
                let row = &data[((p - bl.start) as usize) * rb..][..rb];
                let mut o = out.row_mut((p - start) as usize);
                match o.as_slice_mut() {
                    Some(s) => self.codec.decode_into(row, s),
                    None => self.codec.decode_row(row, o),
                }
            }
        }
        Ok(())
    }
}

impl RouteSource for TraceFile {
    fn header(&self) -> &TraceHeader {
        &self.header
    }
    fn read_rows(&self, seq: SeqId, layer: LayerId, start: u64, out: ArrayViewMut2<'_, u32>) -> Result<(), TraceError> {
        TraceFile::read_rows(self, seq, layer, start, out)
    }
    fn validate(&self) -> Result<(), TraceError> {
        self.verify_all()?;
        let lc = self.layer_counts.lock().unwrap_or_else(|p| p.into_inner());
        for (i, c) in lc.iter().enumerate() {
            if c.rows >= ALL_ZERO_MIN_ROWS && !c.nonzero {
                return Err(TraceError::AllZeroLayer {
                    layer: self.header.layers()[i].0,
                    rows: c.rows,
                });
            }
        }
        drop(lc);
        self.overlay.check_all_zero_layers()
    }
}
