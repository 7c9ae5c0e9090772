//! Which tokens run in the next engine step (pure logic).
//!
//! Every running sequence has tokens not yet in the KV cache: one for a
//! decoding sequence, many for a prompt. Decodes go first (they are what
//! users are waiting on, token by token), then prompts take what is left of
//! the step's token budget in arrival order — a long prompt is prefilled in
//! chunks across steps instead of stalling everyone's decode.

/// A running sequence as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// Tokens already in the KV cache.
    pub computed: usize,
    /// Tokens the sequence has (prompt + generated).
    pub total: usize,
}

impl Pending {
    pub fn remaining(&self) -> usize {
        self.total.saturating_sub(self.computed)
    }
}

/// Tokens to run per sequence (same order as `seqs`; 0 = not this step).
pub fn plan(seqs: &[Pending], budget: usize) -> Vec<usize> {
    let mut out = vec![0; seqs.len()];
    let mut left = budget;
    for (i, s) in seqs.iter().enumerate() {
        if s.remaining() == 1 && left > 0 {
            out[i] = 1;
            left -= 1;
        }
    }
    for (i, s) in seqs.iter().enumerate() {
        if s.remaining() > 1 && left > 0 {
            let n = s.remaining().min(left);
            out[i] = n;
            left -= n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(computed: usize, total: usize) -> Pending {
        Pending { computed, total }
    }

    #[test]
    fn decodes_are_scheduled_before_prefill() {
        let seqs = [p(0, 100), p(10, 11), p(5, 6)];
        assert_eq!(plan(&seqs, 10), vec![8, 1, 1]);
    }

    #[test]
    fn a_long_prompt_is_chunked_across_steps() {
        let mut s = p(0, 25);
        let mut steps = Vec::new();
        while s.remaining() > 0 {
            let n = plan(&[s], 8)[0];
            steps.push(n);
            s.computed += n;
        }
        assert_eq!(steps, vec![8, 8, 8, 1]);
    }

    #[test]
    fn prompts_share_the_budget_in_arrival_order() {
        assert_eq!(plan(&[p(0, 5), p(0, 5), p(0, 5)], 8), vec![5, 3, 0]);
    }

    #[test]
    fn finished_sequences_get_nothing() {
        assert_eq!(plan(&[p(4, 4)], 8), vec![0]);
    }
}
