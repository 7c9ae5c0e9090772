//! Turning logits into the next token: penalties, temperature, top-k,
//! top-p, min-p, a seeded generator, and log-probabilities.

/// Per-request sampling settings (already validated).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub max_tokens: usize,
    /// Number of alternatives to report per token (`top_logprobs`); `None`
    /// means no logprobs at all.
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
    /// Output held to a grammar (structured output, forced tool calls).
    pub constraint: Option<crate::engine::constrained::Constraint>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            max_tokens: 16,
            logprobs: None,
            ignore_eos: false,
            constraint: None,
        }
    }
}

impl SamplingParams {
    /// Greedy (argmax) decoding.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..Default::default()
        }
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, reproducible across
/// platforms (a seed must give the same text on every node).
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Log-probability of the chosen token and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Numerically stable log-softmax.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    logits.iter().map(|&l| l - lse).collect()
}

/// Index of the largest logit; ties go to the lowest id (as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Applies repetition (prompt and output), presence and frequency (output
/// only) penalties the way vLLM does.
pub fn apply_penalties(logits: &mut [f32], p: &SamplingParams, prompt: &[u32], output: &[u32]) {
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in prompt.iter().chain(output) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (l, s) in logits.iter_mut().zip(seen) {
            if s {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts = vec![0u32; logits.len()];
        for &t in output {
            if let Some(c) = counts.get_mut(t as usize) {
                *c += 1;
            }
        }
        for (l, c) in logits.iter_mut().zip(counts) {
            if c > 0 {
                *l -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
    }
}

/// Picks the next token. `logits` are the raw model outputs; logprobs are
/// reported from those (as vLLM does by default), the choice honours every
/// setting.
pub fn sample(
    logits: &[f32],
    p: &SamplingParams,
    prompt: &[u32],
    output: &[u32],
    rng: &mut Rng,
) -> (u32, Option<TokenLogprobs>) {
    let mut l = logits.to_vec();
    apply_penalties(&mut l, p, prompt, output);
    let token = if p.temperature <= 1e-5 {
        argmax(&l)
    } else {
        sample_filtered(&l, p, rng)
    };
    let lp = p.logprobs.map(|k| {
        let ls = log_softmax(logits);
        let mut idx: Vec<u32> = (0..ls.len() as u32).collect();
        let k = k.min(ls.len());
        if k > 0 {
            idx.select_nth_unstable_by(k - 1, |a, b| ls[*b as usize].total_cmp(&ls[*a as usize]));
        }
        let mut top: Vec<(u32, f32)> = idx[..k].iter().map(|&i| (i, ls[i as usize])).collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        TokenLogprobs {
            logprob: ls[token as usize],
            top,
        }
    });
    (token, lp)
}

fn sample_filtered(l: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    let t = p.temperature;
    let mut cand: Vec<(u32, f32)> = l
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| (i as u32, v / t))
        .collect();
    if cand.is_empty() {
        return argmax(l);
    }
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.truncate(p.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    for x in probs.iter_mut() {
        *x /= total;
    }
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, x) in probs.iter().enumerate() {
            acc += x;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    if p.min_p > 0.0 {
        let cut = probs[0] * p.min_p as f64;
        let keep = probs.iter().take_while(|&&x| x >= cut).count().max(1);
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.next_f64() * total;
    for (i, x) in probs.iter().enumerate() {
        r -= x;
        if r < 0.0 {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn zero_temperature_is_argmax() {
        let p = SamplingParams::greedy(1);
        let (t, _) = sample(&[0.1, 3.0, 2.9], &p, &[], &[], &mut Rng::new(1));
        assert_eq!(t, 1);
    }

    #[test]
    fn the_same_seed_gives_the_same_draws_and_another_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.3).sin()).collect();
        let p = SamplingParams::default();
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..40)
                .map(|_| sample(&logits, &p, &[], &[], &mut r).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_always_picks_the_best() {
        let p = params(|p| p.top_k = 1);
        let mut r = Rng::new(3);
        for _ in 0..50 {
            assert_eq!(sample(&[1.0, 5.0, 4.9, 0.0], &p, &[], &[], &mut r).0, 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.70, 0.26, 0.04]: top_p 0.5 leaves only the first.
        let p = params(|p| p.top_p = 0.5);
        let mut r = Rng::new(4);
        for _ in 0..50 {
            assert_eq!(sample(&[2.0, 1.0, -1.0], &p, &[], &[], &mut r).0, 0);
        }
    }

    #[test]
    fn min_p_drops_tokens_far_below_the_best() {
        let p = params(|p| p.min_p = 0.5);
        let mut r = Rng::new(5);
        for _ in 0..100 {
            let t = sample(&[3.0, 2.9, -5.0, -5.0], &p, &[], &[], &mut r).0;
            assert!(t < 2);
        }
    }

    #[test]
    fn penalties_lower_repeated_tokens() {
        let mut l = vec![2.0, -2.0, 1.0];
        let p = params(|p| {
            p.repetition_penalty = 2.0;
            p.presence_penalty = 0.5;
            p.frequency_penalty = 0.25;
        });
        apply_penalties(&mut l, &p, &[1], &[0, 0]);
        assert_eq!(l, vec![2.0 / 2.0 - 0.5 - 0.5, -4.0, 1.0]);
    }

    #[test]
    fn logprobs_report_the_chosen_token_and_sorted_alternatives() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.logprobs = Some(2);
        });
        let (t, lp) = sample(&[0.0, 2.0, 1.0], &p, &[], &[], &mut Rng::new(0));
        let lp = lp.unwrap();
        assert_eq!(t, 1);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let z = (0f32.exp() + 2f32.exp() + 1f32.exp()).ln();
        assert!((lp.logprob - (2.0 - z)).abs() < 1e-6);
    }
}
