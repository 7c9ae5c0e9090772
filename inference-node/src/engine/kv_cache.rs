//! Paged KV-cache bookkeeping (no tensors here, only block ids): fixed-size
//! blocks, one block table per sequence, and prefix caching — a full block
//! is identified by the hash of every token up to its end, shared between
//! sequences by reference count, and kept after its last user leaves so a
//! later prompt with the same prefix skips recomputing it, until the least
//! recently used such block is needed for something else.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};

/// Block id.
pub type BlockId = u32;

/// Allocator of KV blocks with prefix caching.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    refcount: Vec<u32>,
    hash_of: Vec<Option<u64>>,
    by_hash: HashMap<u64, BlockId>,
    /// Blocks holding nothing reusable.
    free: Vec<BlockId>,
    /// Unreferenced blocks that still hold a cached prefix, by last use.
    lru: BTreeMap<u64, BlockId>,
    last_use: Vec<u64>,
    tick: u64,
    /// SipHash keyed with random keys drawn when the cache is made: a
    /// client that can choose prompts cannot compute which prompt would
    /// collide with a cached prefix (and be answered from its K/V).
    key: RandomState,
}

/// A sequence's place in the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqBlocks {
    pub table: Vec<BlockId>,
    /// How many leading blocks are registered in the prefix cache.
    pub hashed: usize,
    /// Hash of the last registered block (parent of the next).
    pub last_hash: u64,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> BlockManager {
        assert!(block_size > 0);
        BlockManager {
            block_size,
            refcount: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            by_hash: HashMap::new(),
            free: (0..num_blocks as BlockId).rev().collect(),
            lru: BTreeMap::new(),
            last_use: vec![0; num_blocks],
            tick: 0,
            key: RandomState::new(),
        }
    }

    /// Chained hash of a full block: depends on the whole prefix, not just
    /// the block's own tokens, and on this cache's random key.
    pub fn block_hash(&self, parent: u64, tokens: &[u32]) -> u64 {
        self.key.hash_one((parent, tokens))
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks referenced by at least one live sequence. Every block is in
    /// exactly one of: `free`, `lru` (unreferenced, cached) or referenced,
    /// so this is O(1) (it is read every step for the metrics).
    pub fn blocks_in_use(&self) -> usize {
        self.refcount.len() - self.free.len() - self.lru.len()
    }

    /// Blocks that could be handed out now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn take(&mut self) -> Option<BlockId> {
        if let Some(b) = self.free.pop() {
            return Some(b);
        }
        let (_, b) = self.lru.pop_first()?;
        if let Some(h) = self.hash_of[b as usize].take() {
            self.by_hash.remove(&h);
        }
        Some(b)
    }

    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Reserves blocks for a new prompt, reusing cached full blocks of its
    /// prefix. At least one prompt token is always left to compute, so the
    /// sequence gets logits. Returns the blocks and how many leading tokens
    /// are already in the cache, or `None` (nothing taken) when out of room.
    pub fn allocate_prompt(&mut self, prompt: &[u32]) -> Option<(SeqBlocks, usize)> {
        let bs = self.block_size;
        let reusable = prompt.len().saturating_sub(1) / bs;
        let mut seq = SeqBlocks::default();
        let mut parent = 0u64;
        let mut hits = Vec::new();
        for i in 0..reusable {
            let h = self.block_hash(parent, &prompt[i * bs..(i + 1) * bs]);
            match self.by_hash.get(&h) {
                Some(&b) => {
                    hits.push(b);
                    parent = h;
                }
                None => break,
            }
        }
        let need = self.blocks_for(prompt.len().max(1)) - hits.len();
        let evictable_hits = hits
            .iter()
            .filter(|&&b| self.refcount[b as usize] == 0)
            .count();
        if self.available() - evictable_hits < need {
            return None;
        }
        let now = self.touch();
        for &b in &hits {
            if self.refcount[b as usize] == 0 {
                self.lru.remove(&self.last_use[b as usize]);
            }
            self.refcount[b as usize] += 1;
            self.last_use[b as usize] = now;
        }
        seq.hashed = hits.len();
        seq.last_hash = parent;
        seq.table = hits;
        for _ in 0..need {
            let b = self.take()?;
            self.refcount[b as usize] = 1;
            seq.table.push(b);
        }
        let cached = seq.hashed * bs;
        Some((seq, cached))
    }

    /// Makes room for `len` tokens in total; false (nothing taken) if full.
    pub fn grow(&mut self, seq: &mut SeqBlocks, len: usize) -> bool {
        let need = self.blocks_for(len).saturating_sub(seq.table.len());
        if need > self.available() {
            return false;
        }
        for _ in 0..need {
            match self.take() {
                Some(b) => {
                    self.refcount[b as usize] = 1;
                    seq.table.push(b);
                }
                None => return false,
            }
        }
        true
    }

    /// Registers the sequence's blocks that are now full of computed tokens
    /// (`tokens[..computed]`) so later prompts can share them.
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32], computed: usize) {
        let bs = self.block_size;
        while (seq.hashed + 1) * bs <= computed && seq.hashed < seq.table.len() {
            let i = seq.hashed;
            let h = self.block_hash(seq.last_hash, &tokens[i * bs..(i + 1) * bs]);
            let b = seq.table[i];
            if !self.by_hash.contains_key(&h) && self.hash_of[b as usize].is_none() {
                self.by_hash.insert(h, b);
                self.hash_of[b as usize] = Some(h);
            }
            seq.last_hash = h;
            seq.hashed += 1;
        }
    }

    /// Releases a sequence's blocks at once (finish, cancel or preempt).
    pub fn free(&mut self, seq: &mut SeqBlocks) {
        let now = self.touch();
        for &b in seq.table.iter().rev() {
            let r = &mut self.refcount[b as usize];
            *r = r.saturating_sub(1);
            if *r == 0 {
                if self.hash_of[b as usize].is_some() {
                    // Distinct keys: the tick is unique per free() call and
                    // blocks within one call are offset by position.
                    let key = now * 1_000_000 + self.lru.len() as u64;
                    self.last_use[b as usize] = key;
                    self.lru.insert(key, b);
                } else {
                    self.free.push(b);
                }
            }
        }
        *seq = SeqBlocks::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn a_prompt_takes_ceil_len_over_block_size_blocks_and_free_returns_them() {
        let mut m = BlockManager::new(10, 4);
        let (mut s, cached) = m.allocate_prompt(&toks(9, 0)).unwrap();
        assert_eq!((s.table.len(), cached), (3, 0));
        assert_eq!(m.blocks_in_use(), 3);
        m.free(&mut s);
        assert_eq!(m.blocks_in_use(), 0);
        assert_eq!(m.available(), 10);
    }

    #[test]
    fn a_shared_prefix_reuses_committed_blocks_with_refcounts() {
        let mut m = BlockManager::new(10, 4);
        let p = toks(9, 0);
        let (mut a, _) = m.allocate_prompt(&p).unwrap();
        m.commit(&mut a, &p, 9);
        assert_eq!(a.hashed, 2);
        let mut q = p[..8].to_vec();
        q.extend([100, 101, 102]);
        let (mut b, cached) = m.allocate_prompt(&q).unwrap();
        assert_eq!(cached, 8);
        assert_eq!(&b.table[..2], &a.table[..2]);
        assert_eq!(m.blocks_in_use(), 4);
        m.free(&mut a);
        // The shared blocks are still held by b.
        assert_eq!(m.blocks_in_use(), 3);
        m.free(&mut b);
        assert_eq!(m.blocks_in_use(), 0);
    }

    #[test]
    fn a_fully_cached_prompt_still_leaves_its_last_token_to_compute() {
        let mut m = BlockManager::new(10, 4);
        let p = toks(8, 1);
        let (mut a, _) = m.allocate_prompt(&p).unwrap();
        m.commit(&mut a, &p, 8);
        m.free(&mut a);
        let (b, cached) = m.allocate_prompt(&p).unwrap();
        assert_eq!(cached, 4);
        assert_eq!(b.table.len(), 2);
    }

    #[test]
    fn cached_blocks_survive_their_sequence_until_evicted_least_recent_first() {
        let mut m = BlockManager::new(4, 2);
        let p1 = toks(5, 0);
        let (mut a, _) = m.allocate_prompt(&p1).unwrap();
        m.commit(&mut a, &p1, 5);
        m.free(&mut a);
        assert_eq!(m.blocks_in_use(), 0);
        assert_eq!(m.available(), 4);
        // A different 7-token prompt needs all 4 blocks: evicts the cached two.
        let p2 = toks(7, 3);
        let (mut b, cached) = m.allocate_prompt(&p2).unwrap();
        assert_eq!((cached, b.table.len()), (0, 4));
        m.free(&mut b);
        let (_, cached) = m.allocate_prompt(&p1).unwrap();
        assert_eq!(cached, 0, "p1's blocks were evicted");
    }

    #[test]
    fn allocation_fails_without_taking_anything_when_out_of_blocks() {
        let mut m = BlockManager::new(2, 4);
        let (mut a, _) = m.allocate_prompt(&toks(5, 0)).unwrap();
        assert!(m.allocate_prompt(&toks(3, 1)).is_none());
        assert!(!m.grow(&mut a, 9));
        assert_eq!(a.table.len(), 2);
        assert!(m.grow(&mut a, 8));
        m.free(&mut a);
        assert_eq!(m.available(), 2);
    }

    #[test]
    fn counting_blocks_in_use_does_not_walk_the_pool() {
        // A pool of 4M blocks (a large GPU's) with a few in use: the count
        // is read every step for the metrics, so it must not scan the pool.
        let mut m = BlockManager::new(4 << 20, 16);
        let (mut a, _) = m.allocate_prompt(&toks(40, 1)).unwrap();
        let (mut b, _) = m.allocate_prompt(&toks(40, 1)).unwrap();
        m.commit(&mut a, &toks(40, 1), 40);
        let t = std::time::Instant::now();
        for _ in 0..200 {
            assert_eq!(m.blocks_in_use(), 6);
        }
        let took = t.elapsed();
        assert!(
            took < std::time::Duration::from_millis(50),
            "200 counts took {took:?}"
        );
        m.free(&mut b);
        m.free(&mut a);
        assert_eq!(m.blocks_in_use(), 0);
    }

    #[test]
    fn prefix_hashes_are_keyed_so_two_caches_never_agree_on_a_block() {
        let p = toks(8, 2);
        let hashes = || {
            let mut m = BlockManager::new(4, 4);
            let (mut a, _) = m.allocate_prompt(&p).unwrap();
            m.commit(&mut a, &p, 8);
            let mut h: Vec<u64> = m.by_hash.keys().copied().collect();
            h.sort_unstable();
            h
        };
        let (a, b) = (hashes(), hashes());
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|h| !b.contains(h)), "{a:?} {b:?}");
    }
}
