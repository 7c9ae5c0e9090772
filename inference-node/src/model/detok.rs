//! Streaming text out of token ids: incremental detokenization that never
//! emits half a UTF-8 character, and stop strings found across token
//! boundaries without ever streaming text that a stop string later cuts.

use crate::model::tokenizer::TextModel;

/// Incremental detokenizer (the prefix/read offset scheme of TGI and vLLM).
#[derive(Debug, Default, Clone)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// Adds a token; returns the text that is now complete.
    pub fn push(&mut self, text: &TextModel, id: u32) -> String {
        self.ids.push(id);
        self.emit(text, false)
    }

    /// Returns whatever is still held back (call once at the end).
    pub fn flush(&mut self, text: &TextModel) -> String {
        self.emit(text, true)
    }

    fn emit(&mut self, text: &TextModel, last: bool) -> String {
        let prefix = text.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = text.decode(&self.ids[self.prefix_offset..]);
        // A trailing U+FFFD means a character is still incomplete.
        if full.len() > prefix.len() && (last || !full.ends_with('\u{FFFD}')) {
            let delta = match full.get(prefix.len()..) {
                Some(d) if full.starts_with(&prefix) => d.to_string(),
                // The decoder rewrote earlier text (rare): skip as many
                // characters as were already emitted.
                _ => full.chars().skip(prefix.chars().count()).collect(),
            };
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }
}

/// Holds back text that could be the start of a stop string.
#[derive(Debug, Default, Clone)]
pub struct StopChecker {
    stops: Vec<String>,
    held: String,
}

impl StopChecker {
    pub fn new(stops: Vec<String>) -> StopChecker {
        StopChecker {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Feeds new text; returns what may be streamed now and whether a stop
    /// string was hit (the stop string itself is not returned).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.held.push_str(delta);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(i) = hit {
            let out = self.held[..i].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest tail that is a prefix of some stop string: only
        // tails shorter than the stop string can be one, so the held text
        // and the work per token stay bounded by the longest stop string
        // (`api::MAX_STOP_BYTES`), however long the generation.
        let mut keep = 0;
        for s in &self.stops {
            let from = self.held.len().saturating_sub(s.len().saturating_sub(1));
            for (i, _) in self.held.char_indices().filter(|&(i, _)| i >= from) {
                let tail = &self.held[i..];
                if s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// The held tail, at the end of a generation that hit no stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_string_split_across_deltas_is_found_and_never_streamed() {
        let mut s = StopChecker::new(vec!["END".into()]);
        assert_eq!(s.push("hello E"), ("hello ".into(), false));
        assert_eq!(s.push("N"), ("".into(), false));
        assert_eq!(s.push("D and more"), ("".into(), true));
    }

    #[test]
    fn a_false_start_of_a_stop_string_is_released() {
        let mut s = StopChecker::new(vec!["END".into()]);
        assert_eq!(s.push("an E"), ("an ".into(), false));
        assert_eq!(s.push("ls"), ("Els".into(), false));
        assert_eq!(s.push("EN"), ("".into(), false));
        assert_eq!(s.finish(), "EN");
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let mut s = StopChecker::new(vec!["zz".into(), "b".into()]);
        assert_eq!(s.push("aabzz"), ("aa".into(), true));
    }

    #[test]
    fn multibyte_text_is_held_at_character_boundaries() {
        let mut s = StopChecker::new(vec!["é!".into()]);
        assert_eq!(s.push("caf"), ("caf".into(), false));
        assert_eq!(s.push("é"), ("".into(), false));
        assert_eq!(s.push("s"), ("és".into(), false));
    }
}
