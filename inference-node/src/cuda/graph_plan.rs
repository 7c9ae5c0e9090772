//! Which decode steps replay a captured CUDA graph, and the fixed-size
//! layout they are replayed with (`--cuda-graphs`).
//!
//! A graph replays the exact launches it was captured with: the same grid
//! sizes and the same device pointers. So a decode step of `m` rows is
//! padded to a row bucket (1, 2, 4 or 8: the GEMV path, no cuBLAS), its
//! split-K partitions rounded up to a power of two, and its metadata copied
//! into buffers of fixed size that the graph owns. Padding is exact, not an
//! approximation: every kernel of the step treats rows independently (the
//! GEMV is batch-invariant), a padding row writes its K/V only into a block
//! reserved for it, and attention partitions past a context's end are
//! skipped by the decode kernel and the reduction alike. The simulator test
//! `a_decode_step_padded_to_its_graph_bucket_gives_the_real_rows_the_same_bits`
//! (tests/kernels_cpu.rs) shows it. Pure: nothing here touches a GPU.

use super::CudaError;
use super::plan::{GEMV_MAX_ROWS, StepLayout};
use crate::engine::backend::Batch;

/// Row counts graphs are captured for; a decode step is padded to the
/// smallest that holds it. Larger steps take cuBLAS, whose workspace and
/// cast buffers are not fixed, and run eagerly.
pub const ROW_BUCKETS: [usize; 4] = [1, 2, 4, GEMV_MAX_ROWS];

/// One captured graph: padded rows and split-K partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GraphKey {
    pub rows: usize,
    pub parts: usize,
}

/// The sizes every graph's buffers are made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphLimits {
    /// Block-table entries per row (the longest context's blocks).
    pub table_stride: usize,
    /// Split-K partitions of the longest context.
    pub max_parts: usize,
    /// Positions per partition (`plan::decode_part_size`).
    pub part: usize,
    pub block_size: usize,
    /// The KV block padding rows write into; never given to the engine.
    pub pad_block: u32,
}

impl GraphLimits {
    /// Limits for contexts of up to `max_context` tokens.
    pub fn new(max_context: usize, block_size: usize, part: usize, pad_block: u32) -> GraphLimits {
        let bs = block_size.max(1);
        GraphLimits {
            table_stride: max_context.div_ceil(bs).max(1),
            max_parts: max_context.div_ceil(part.max(1)).max(1),
            part: part.max(1),
            block_size: bs,
            pad_block,
        }
    }
}

/// The graph `layout` replays, or `None` when the step runs eagerly: a
/// step with prompt tokens (tiles), logits wanted for other rows than all
/// of them in order, more rows than the largest bucket, or a block table
/// longer than the limits.
pub fn key_for(batch: &Batch, layout: &StepLayout, lim: &GraphLimits) -> Option<GraphKey> {
    let m = layout.ids.len();
    if m == 0 || !layout.tiles.is_empty() || layout.decode.len() != m {
        return None;
    }
    if !layout.logits_rows.iter().copied().eq(0..m as i32) {
        return None;
    }
    let rows = *ROW_BUCKETS.iter().find(|&&b| b >= m)?;
    if batch
        .block_tables
        .iter()
        .any(|t| t.len() > lim.table_stride)
    {
        return None;
    }
    let needed = layout.decode_parts(0, lim.part);
    let parts = needed.next_power_of_two().min(lim.max_parts);
    (parts >= needed).then_some(GraphKey { rows, parts })
}

/// A decode step's metadata at a graph's fixed sizes: `key.rows` rows,
/// row `i`'s block table at `i * table_stride`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedDecode {
    pub ids: Vec<u32>,
    pub pos: Vec<i32>,
    pub slots: Vec<i32>,
    pub tok_table: Vec<i32>,
    pub tables: Vec<i32>,
    /// `0..rows`: every row is a decode row.
    pub decode: Vec<i32>,
    /// `0..rows`: logits of every row (the real ones are the first).
    pub logits_rows: Vec<i32>,
}

impl PaddedDecode {
    /// Pads `layout` (for which [`key_for`] gave `key`). Padding rows read
    /// token 0 at position 0 of the pad block, which each of them writes
    /// first: they never read a real sequence's K/V or write one.
    pub fn new(
        batch: &Batch,
        layout: &StepLayout,
        key: GraphKey,
        lim: &GraphLimits,
    ) -> Result<PaddedDecode, CudaError> {
        let (m, rows, stride) = (layout.ids.len(), key.rows, lim.table_stride);
        if m > rows || batch.tokens.len() != m {
            return Err(CudaError::Unsupported(format!(
                "a decode step of {m} rows padded to {rows}"
            )));
        }
        let pad = lim.pad_block as i32;
        let mut p = PaddedDecode {
            ids: vec![0; rows],
            pos: vec![0; rows],
            slots: vec![pad * lim.block_size as i32; rows],
            tok_table: (0..rows).map(|i| (i * stride) as i32).collect(),
            tables: vec![pad; rows * stride],
            decode: (0..rows as i32).collect(),
            logits_rows: (0..rows as i32).collect(),
        };
        for (i, tok) in batch.tokens.iter().enumerate() {
            let table = batch
                .block_tables
                .get(tok.seq)
                .filter(|t| t.len() <= stride)
                .ok_or_else(|| {
                    CudaError::Unsupported(format!("sequence {} has no table that fits", tok.seq))
                })?;
            p.ids[i] = layout.ids[i];
            p.pos[i] = layout.pos[i];
            p.slots[i] = layout.slots[i];
            for (dst, &b) in p.tables[i * stride..].iter_mut().zip(table) {
                *dst = b as i32;
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::BatchToken;

    fn decode_batch(ctx: &[usize], block_size: usize) -> Batch {
        let mut b = Batch::default();
        let mut next = 0u32;
        for (seq, &pos) in ctx.iter().enumerate() {
            let blocks = (pos + 1).div_ceil(block_size);
            b.block_tables
                .push((next..next + blocks as u32).rev().collect());
            next += blocks as u32;
            b.tokens.push(BatchToken {
                token: 7 + seq as u32,
                pos,
                seq,
                wide: false,
            });
            b.logits_for.push(seq);
        }
        b
    }

    fn lim() -> GraphLimits {
        GraphLimits::new(1024, 16, 64, 99)
    }

    fn key(b: &Batch) -> Option<GraphKey> {
        let l = StepLayout::new(b, 16, 8).unwrap();
        key_for(b, &l, &lim())
    }

    #[test]
    fn decode_steps_take_the_smallest_row_bucket_and_a_power_of_two_of_partitions() {
        assert_eq!(
            key(&decode_batch(&[0], 16)),
            Some(GraphKey { rows: 1, parts: 1 })
        );
        assert_eq!(
            key(&decode_batch(&[63, 64, 5], 16)),
            Some(GraphKey { rows: 4, parts: 2 })
        );
        // 300 positions need 5 partitions of 64: eight are captured.
        assert_eq!(
            key(&decode_batch(&[299, 1, 2, 3, 4], 16)),
            Some(GraphKey { rows: 8, parts: 8 })
        );
        // Never more than the longest context has (1024 / 64 = 16).
        assert_eq!(
            key(&decode_batch(&[1023], 16)),
            Some(GraphKey { rows: 1, parts: 16 })
        );
    }

    #[test]
    fn prompts_large_steps_other_logits_rows_and_long_tables_run_eagerly() {
        assert_eq!(key(&decode_batch(&[1; 9], 16)), None);
        let mut prompt = decode_batch(&[3], 16);
        prompt.tokens.insert(
            0,
            BatchToken {
                token: 1,
                pos: 2,
                seq: 0,
                wide: false,
            },
        );
        prompt.logits_for = vec![1];
        assert_eq!(key(&prompt), None);
        let mut some = decode_batch(&[3, 4], 16);
        some.logits_for = vec![1];
        assert_eq!(key(&some), None);
        let mut long = decode_batch(&[3], 16);
        long.block_tables[0] = (0..65).collect();
        assert_eq!(key(&long), None);
        assert_eq!(key(&Batch::default()), None);
    }

    #[test]
    fn padding_keeps_the_real_rows_and_points_the_others_at_the_pad_block() {
        let b = decode_batch(&[40, 3, 17], 16);
        let l = StepLayout::new(&b, 16, 8).unwrap();
        let lim = lim();
        let k = key_for(&b, &l, &lim).unwrap();
        assert_eq!(k.rows, 4);
        let p = PaddedDecode::new(&b, &l, k, &lim).unwrap();
        assert_eq!(&p.ids[..3], &l.ids[..]);
        assert_eq!(&p.pos[..3], &l.pos[..]);
        assert_eq!(&p.slots[..3], &l.slots[..]);
        assert_eq!((p.ids[3], p.pos[3], p.slots[3]), (0, 0, 99 * 16));
        assert_eq!(p.decode, vec![0, 1, 2, 3]);
        assert_eq!(p.logits_rows, vec![0, 1, 2, 3]);
        let stride = lim.table_stride;
        assert_eq!(p.tables.len(), 4 * stride);
        for (i, t) in b.block_tables.iter().enumerate() {
            let row = &p.tables[i * stride..(i + 1) * stride];
            let want: Vec<i32> = t.iter().map(|&x| x as i32).collect();
            assert_eq!(&row[..t.len()], &want[..]);
            assert!(row[t.len()..].iter().all(|&x| x == 99));
            assert_eq!(p.tok_table[i], (i * stride) as i32);
        }
        // Each real row's slot is where its own table puts its position.
        for i in 0..3 {
            let (pos, table) = (p.pos[i] as usize, p.tok_table[i] as usize);
            let block = p.tables[table + pos / 16];
            assert_eq!(p.slots[i], block * 16 + (pos % 16) as i32);
        }
        assert!(p.tables[3 * stride..].iter().all(|&x| x == 99));
    }
}
