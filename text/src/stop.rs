//! Stop conditions: when a sequence's generation ends, and which streamed text reaches the client.
//!
//! decode worker: sampled token --[`finish_reason_after`]--> keep going or finish
//! coordinator/stream: detokenized delta --[`StopChecker::push`]--> text to send, or stop
//!
//! Token-level stops (end-of-sequence ids, `stop_token_ids`, `max_new_tokens`) are decided per
//! step by a pure function. Stop strings are matched on text, which arrives in deltas that may
//! split a stop string anywhere, so [`StopChecker`] holds back any tail that could still become
//! one.
//!
//! Invariants of [`StopChecker`]: the stop string itself and anything after it is never emitted
//! (OpenAI behaviour); the concatenation of everything emitted is the same however the text was
//! split into deltas; held-back text always starts on a char boundary.

use serde::{Deserialize, Serialize};

use crate::sampling::SamplingParams;

/// Why a sequence stopped generating, as reported to clients (OpenAI `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_new_tokens` (OpenAI `max_tokens`) were generated.
    Length,
    /// The model produced an end-of-sequence token, a stop token id or a stop string.
    Stop,
}

impl FinishReason {
    /// The OpenAI wire name: `"length"` or `"stop"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// Decides whether `token`, the `tokens_generated`-th generated token (counting it), ends the
/// sequence. `eos_token_ids` are the model's end-of-sequence ids, ignored under `ignore_eos`;
/// `params.stop_token_ids` always apply. A stop token on the last allowed step is `Stop`, not
/// `Length`. A token that returns `Stop` is counted in usage but its text is not streamed.
pub fn finish_reason_after(
    token: u32,
    tokens_generated: u32,
    params: &SamplingParams,
    eos_token_ids: &[u32],
) -> Option<FinishReason> {
    let is_eos = !params.ignore_eos && eos_token_ids.contains(&token);
    if is_eos || params.stop_token_ids.contains(&token) {
        Some(FinishReason::Stop)
    } else if tokens_generated >= params.max_new_tokens {
        Some(FinishReason::Length)
    } else {
        None
    }
}

/// What [`StopChecker::push`] allows through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text that can be sent to the client now; may be empty.
    pub emit: String,
    /// The index, in the list given to [`StopChecker::new`], of the stop string that matched;
    /// `None` while generation may continue.
    pub stopped_by: Option<usize>,
}

impl StopOutcome {
    /// Whether a stop string matched and generation should end.
    pub fn is_stop(&self) -> bool {
        self.stopped_by.is_some()
    }
}

/// Matches stop strings against streamed text; one per sequence.
///
/// When several stop strings occur, the one that is complete first in the text wins (the
/// smallest end offset), and of those ending at the same place the one that starts first; this is
/// what a client reading character by character would see, and it does not depend on how the text
/// was split into deltas.
#[derive(Debug, Clone)]
pub struct StopChecker {
    /// `(index in the caller's list, stop string)`, empty strings dropped.
    stops: Vec<(usize, String)>,
    /// Text received but not yet emitted: a tail that is a proper prefix of some stop string.
    held: String,
    stopped_by: Option<usize>,
}

impl StopChecker {
    /// A checker for these stop strings. Empty strings are ignored (validation rejects them;
    /// one would otherwise match before any text).
    pub fn new(stop_strings: &[String]) -> StopChecker {
        StopChecker {
            stops: stop_strings
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.is_empty())
                .map(|(i, s)| (i, s.clone()))
                .collect(),
            held: String::new(),
            stopped_by: None,
        }
    }

    /// Takes the next delta of generated text. Returns the text that is now safe to emit and,
    /// on a match, which stop string matched; the emitted text then ends just before it. Once
    /// stopped, every later push emits nothing and reports the same stop.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stopped_by.is_some() {
            return StopOutcome {
                emit: String::new(),
                stopped_by: self.stopped_by,
            };
        }
        self.held.push_str(delta);

        // Earlier pushes found no match and kept every possible start held, so a match here
        // lies wholly within `held`.
        let first_match = self
            .stops
            .iter()
            .filter_map(|(index, stop)| {
                let start = self.held.find(stop.as_str())?;
                Some((start + stop.len(), start, *index))
            })
            .min();
        if let Some((_, start, index)) = first_match {
            self.held.truncate(start);
            self.stopped_by = Some(index);
            return StopOutcome {
                emit: std::mem::take(&mut self.held),
                stopped_by: Some(index),
            };
        }

        let hold_from = self.partial_match_start();
        let tail = self.held.split_off(hold_from);
        StopOutcome {
            emit: std::mem::replace(&mut self.held, tail),
            stopped_by: None,
        }
    }

    /// Generation ended for another reason (length, eos, stop token): releases the held-back
    /// text, which can no longer become a stop string. Empty after a stop-string match.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The earliest char boundary from which the rest of `held` is a proper prefix of some stop
    /// string; `held.len()` if there is none.
    fn partial_match_start(&self) -> usize {
        let longest = self.stops.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
        let earliest = self.held.len().saturating_sub(longest.saturating_sub(1));
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= earliest)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|(_, s)| s.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(stops: &[&str]) -> StopChecker {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        StopChecker::new(&stops)
    }

    fn emitted(emit: &str) -> StopOutcome {
        StopOutcome {
            emit: emit.into(),
            stopped_by: None,
        }
    }

    fn stopped(emit: &str, index: usize) -> StopOutcome {
        StopOutcome {
            emit: emit.into(),
            stopped_by: Some(index),
        }
    }

    /// Feeds `deltas` and returns everything emitted (finish() included if no stop) and the stop.
    fn run(stops: &[&str], deltas: &[&str]) -> (String, Option<usize>) {
        let mut checker = checker(stops);
        let mut text = String::new();
        for delta in deltas {
            let outcome = checker.push(delta);
            text.push_str(&outcome.emit);
            if outcome.is_stop() {
                return (text, outcome.stopped_by);
            }
        }
        text.push_str(&checker.finish());
        (text, None)
    }

    #[test]
    fn stop_string_split_across_deltas_is_held_back_and_never_emitted() {
        let mut checker = checker(&["###"]);
        assert_eq!(checker.push("a#"), emitted("a"));
        assert_eq!(checker.push("#"), emitted(""));
        assert_eq!(checker.push("#b"), stopped("", 0));
        assert_eq!(checker.finish(), "");
    }

    #[test]
    fn partial_prefix_that_does_not_match_is_released() {
        let mut checker = checker(&["###"]);
        assert_eq!(checker.push("a#"), emitted("a"));
        assert_eq!(checker.push("#x"), emitted("##x"));
        assert_eq!(checker.push("y#"), emitted("y"));
        assert_eq!(checker.push("#"), emitted(""));
        assert_eq!(checker.push("c"), emitted("##c"));
    }

    #[test]
    fn overlapping_prefix_keeps_only_what_can_still_match() {
        // "aab": the first "a" cannot start "ab" once "aa" is seen; only the last "a" is held.
        let mut checker = checker(&["ab"]);
        assert_eq!(checker.push("aa"), emitted("a"));
        assert_eq!(checker.push("b"), stopped("", 0));
    }

    #[test]
    fn match_at_the_very_start_emits_nothing() {
        let mut checker = checker(&["stop"]);
        assert_eq!(checker.push("stop and more"), stopped("", 0));
    }

    #[test]
    fn text_before_the_match_in_the_same_delta_is_emitted() {
        let mut checker = checker(&["\n\n"]);
        assert_eq!(checker.push("one\n\ntwo"), stopped("one", 0));
    }

    #[test]
    fn later_pushes_after_a_stop_emit_nothing() {
        let mut checker = checker(&["x"]);
        assert_eq!(checker.push("ax"), stopped("a", 0));
        assert_eq!(checker.push("more"), stopped("", 0));
        assert_eq!(checker.finish(), "");
    }

    #[test]
    fn earliest_completed_stop_string_wins() {
        // "bcd" is complete at offset 4, before "abcdef" at 6.
        assert_eq!(
            run(&["abcdef", "bcd"], &["abcdefg"]),
            ("a".to_string(), Some(1))
        );
        assert_eq!(
            run(&["bcd", "abcdef"], &["ab", "cd"]),
            ("a".into(), Some(0))
        );
        // Both end at offset 3: the one that starts first wins.
        assert_eq!(run(&["c", "abc"], &["xabc"]), ("x".into(), Some(1)));
        // Otherwise the first occurrence in the text wins, whatever the list order.
        assert_eq!(run(&["zz", "yy"], &["ayyzz"]), ("a".into(), Some(1)));
    }

    #[test]
    fn multibyte_text_is_held_and_released_on_char_boundaries() {
        let mut checker = checker(&["。終"]);
        assert_eq!(checker.push("こんにちは。"), emitted("こんにちは"));
        assert_eq!(checker.push("続く"), emitted("。続く"));
        assert_eq!(checker.push("ね。"), emitted("ね"));
        assert_eq!(checker.push("終わり"), stopped("", 0));
    }

    #[test]
    fn chars_sharing_leading_bytes_do_not_match() {
        // "é" is C3 A9 and "ê" is C3 AA: a byte prefix, but not a char prefix.
        let mut checker = checker(&["é!"]);
        assert_eq!(checker.push("aê"), emitted("aê"));
        assert_eq!(checker.push("é"), emitted(""));
        assert_eq!(checker.push("?"), emitted("é?"));
    }

    #[test]
    fn finish_flushes_held_back_text() {
        let mut checker = checker(&["</s>"]);
        assert_eq!(checker.push("done</"), emitted("done"));
        assert_eq!(checker.finish(), "</");
        assert_eq!(checker.finish(), "");
    }

    #[test]
    fn without_stop_strings_text_passes_through() {
        let mut checker = checker(&[]);
        assert_eq!(checker.push("any ### text"), emitted("any ### text"));
        assert_eq!(checker.finish(), "");
    }

    #[test]
    fn empty_stop_strings_are_ignored_but_keep_indices() {
        let mut checker = checker(&["", "b"]);
        assert_eq!(checker.push("ab"), stopped("a", 1));
    }

    fn params(max_new_tokens: u32, stop_token_ids: Vec<u32>, ignore_eos: bool) -> SamplingParams {
        SamplingParams {
            max_new_tokens,
            stop_token_ids,
            ignore_eos,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn eos_stops_unless_ignored() {
        let eos = [2, 128_009];
        assert_eq!(
            finish_reason_after(128_009, 1, &params(10, vec![], false), &eos),
            Some(FinishReason::Stop)
        );
        assert_eq!(
            finish_reason_after(2, 1, &params(10, vec![], true), &eos),
            None
        );
        assert_eq!(
            finish_reason_after(5, 1, &params(10, vec![], false), &eos),
            None
        );
    }

    #[test]
    fn stop_token_ids_stop_even_when_eos_is_ignored() {
        let p = params(10, vec![7], true);
        assert_eq!(
            finish_reason_after(7, 3, &p, &[2]),
            Some(FinishReason::Stop)
        );
    }

    #[test]
    fn reaching_max_new_tokens_is_length_but_a_stop_token_there_is_stop() {
        let p = params(3, vec![7], false);
        assert_eq!(finish_reason_after(5, 2, &p, &[2]), None);
        assert_eq!(
            finish_reason_after(5, 3, &p, &[2]),
            Some(FinishReason::Length)
        );
        assert_eq!(
            finish_reason_after(2, 3, &p, &[2]),
            Some(FinishReason::Stop)
        );
    }

    #[test]
    fn finish_reason_serializes_as_openai_names() -> serde_json::Result<()> {
        assert_eq!(serde_json::to_string(&FinishReason::Length)?, r#""length""#);
        assert_eq!(FinishReason::Stop.as_str(), "stop");
        Ok(())
    }

    mod properties {
        use proptest::prelude::*;

        use super::run;

        /// Where the earliest-completing stop string starts, by brute force over prefixes.
        fn reference(text: &str, stops: &[&str]) -> (String, Option<usize>) {
            let ends = text.char_indices().map(|(i, c)| i + c.len_utf8());
            for end in ends {
                let prefix = &text[..end];
                let hit = stops
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| prefix.ends_with(*s))
                    .map(|(i, s)| (end - s.len(), i))
                    .min();
                if let Some((start, i)) = hit {
                    return (text[..start].to_string(), Some(i));
                }
            }
            (text.to_string(), None)
        }

        proptest! {
            #[test]
            fn output_does_not_depend_on_how_text_is_split(
                text in "[ab#é]{0,24}",
                cuts in prop::collection::vec(0usize..32, 0..8),
                stops in prop::collection::vec("[ab#é]{1,4}", 1..4),
            ) {
                let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
                let mut bounds: Vec<usize> = cuts
                    .into_iter()
                    .filter(|&c| c <= text.len() && text.is_char_boundary(c))
                    .collect();
                bounds.extend([0, text.len()]);
                bounds.sort_unstable();
                bounds.dedup();
                let deltas: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();
                prop_assert_eq!(run(&stops, &deltas), reference(&text, &stops));
            }
        }
    }
}
