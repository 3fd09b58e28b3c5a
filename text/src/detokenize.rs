//! Incremental detokenization: turns a stream of generated token ids into text deltas.
//!
//! decode worker --token ids--> coordinator --[IncrementalDetokenizer::push]--> text deltas --> client
//!
//! A token is not a unit of text: byte-level BPE splits an emoji or a CJK character over several
//! tokens, and SentencePiece writes a word's leading space as part of the next token. So each
//! step decodes a small window of recent ids twice, without and with the new id, and emits the
//! difference (the prefix/read offset technique of TGI and vLLM). While the window's text ends
//! in U+FFFD (a character whose bytes have not all arrived) nothing is emitted; the bytes are
//! held back until the character completes or [`IncrementalDetokenizer::finish`] flushes them.
//!
//! Invariant: the deltas from `push` followed by `finish`, concatenated, equal
//! `tokenizer.decode(ids, skip_special_tokens)` of all pushed ids (when no prompt tail is given;
//! with one, they equal the text the pushed ids add after the tail). This holds for every decoder
//! whose output for a sequence starts with its output for any prefix ending on a character
//! boundary, which is true of the byte-level and SentencePiece decoders baton builds.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// How many prompt ids to keep as context: enough for the first generated token to be decoded
/// as it follows the prompt (SentencePiece keeps its leading space), like vLLM's initial offset.
const PROMPT_CONTEXT: usize = 5;

/// Streams text out of generated token ids without ever splitting a UTF-8 character.
///
/// One per request; not shared. Special tokens are skipped or kept as the constructor says:
/// serving skips them (a chat model's `<|im_end|>` is not text for the client).
#[derive(Debug)]
pub struct IncrementalDetokenizer {
    tokenizer: Tokenizer,
    /// Ids from `prefix_offset` on; older ones are dropped once they can no longer matter.
    ids: Vec<u32>,
    /// Start of the window decoded as context.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    /// A detokenizer for one generation. `prompt_tail` is the end of the prompt's ids (any
    /// length; the last few are kept) so the first generated token decodes in context; pass `&[]`
    /// to decode the generated ids on their own. With `skip_special_tokens` special tokens
    /// produce no text.
    pub fn new(tokenizer: Tokenizer, prompt_tail: &[u32], skip_special_tokens: bool) -> Self {
        let tail = &prompt_tail[prompt_tail.len().saturating_sub(PROMPT_CONTEXT)..];
        Self {
            tokenizer,
            ids: tail.to_vec(),
            prefix_offset: 0,
            read_offset: tail.len(),
            skip_special_tokens,
        }
    }

    /// Adds one generated id. Returns the text it completes, or `None` while the text so far
    /// ends inside a character (or the id adds no text, like a skipped special token). An id
    /// outside the vocabulary is an error and leaves the detokenizer as it was.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let (prefix, full) = match self.decode_window() {
            Ok(texts) => texts,
            Err(err) => {
                self.ids.pop();
                return Err(err);
            }
        };
        if full.len() <= prefix.len() || full.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        let delta = text_after(&prefix, &full);
        self.advance();
        Ok((!delta.is_empty()).then_some(delta))
    }

    /// Flushes text held back at the end of the stream: bytes of an unfinished character come
    /// out as U+FFFD, as `decode` renders them. Returns `""` when nothing is held back.
    pub fn finish(&mut self) -> Result<String> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let (prefix, full) = self.decode_window()?;
        let delta = text_after(&prefix, &full);
        self.advance();
        Ok(delta)
    }

    /// Texts of the window without and with the ids not yet emitted.
    fn decode_window(&self) -> Result<(String, String)> {
        let skip = self.skip_special_tokens;
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let full = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], skip)?;
        Ok((prefix, full))
    }

    /// Marks everything pushed as emitted; the ids just emitted become the next context.
    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
    }
}

/// The text `full` adds after `prefix`. Decoders baton builds always extend the prefix; for one
/// that rewrites earlier text, the part after the longest common prefix is the best that can be
/// streamed.
fn text_after(prefix: &str, full: &str) -> String {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest.to_owned();
    }
    let common: usize = prefix
        .chars()
        .zip(full.chars())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a.len_utf8())
        .sum();
    full[common..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::tiny_byte_level_tokenizer;

    fn stream(detok: &mut IncrementalDetokenizer, ids: &[u32]) -> Vec<Option<String>> {
        ids.iter()
            .map(|&id| detok.push(id).expect("push"))
            .collect()
    }

    #[test]
    fn holds_back_partial_characters_until_complete() {
        let tok = tiny_byte_level_tokenizer();
        // No merges cover the emoji, so each of its four UTF-8 bytes is its own token.
        let ids = tok.encode("a👋b", false).expect("encodes");
        assert_eq!(ids.len(), 6);
        let mut detok = IncrementalDetokenizer::new(tok.clone(), &[], true);
        let deltas = stream(&mut detok, &ids);
        assert_eq!(
            deltas,
            [
                Some("a".to_owned()),
                None,
                None,
                None,
                Some("👋".to_owned()),
                Some("b".to_owned())
            ]
        );
        assert_eq!(detok.finish().expect("finish"), "");
    }

    #[test]
    fn finish_flushes_an_unfinished_character_as_decode_does() {
        let tok = tiny_byte_level_tokenizer();
        let ids = tok.encode("x👋", false).expect("encodes");
        let cut = &ids[..ids.len() - 1];
        let mut detok = IncrementalDetokenizer::new(tok.clone(), &[], true);
        let mut text: String = stream(&mut detok, cut).into_iter().flatten().collect();
        assert_eq!(text, "x");
        text.push_str(&detok.finish().expect("finish"));
        assert_eq!(text, tok.decode(cut, true).expect("decodes"));
        assert!(text.ends_with(char::REPLACEMENT_CHARACTER));
    }

    #[test]
    fn skipped_special_tokens_add_nothing() {
        let tok = tiny_byte_level_tokenizer();
        let mut ids = tok.encode("hi", false).expect("encodes");
        ids.push(1); // <|im_end|>
        ids.extend(tok.encode("!", false).expect("encodes"));
        let mut skipping = IncrementalDetokenizer::new(tok.clone(), &[], true);
        let skipped: String = stream(&mut skipping, &ids).into_iter().flatten().collect();
        assert_eq!(skipped, "hi!");
        let mut keeping = IncrementalDetokenizer::new(tok.clone(), &[], false);
        let kept: String = stream(&mut keeping, &ids).into_iter().flatten().collect();
        assert_eq!(kept, "hi<|im_end|>!");
    }

    #[test]
    fn out_of_range_id_errors_and_leaves_state_unchanged() {
        let tok = tiny_byte_level_tokenizer();
        let mut detok = IncrementalDetokenizer::new(tok.clone(), &[], true);
        let ids = tok.encode("ok", false).expect("encodes");
        assert_eq!(detok.push(ids[0]).expect("push").as_deref(), Some("o"));
        assert!(detok.push(u32::MAX).is_err());
        assert_eq!(detok.push(ids[1]).expect("push").as_deref(), Some("k"));
    }

    #[test]
    fn text_after_falls_back_to_common_prefix() {
        assert_eq!(text_after("ab", "abc"), "c");
        assert_eq!(text_after("aé", "aèx"), "èx");
    }
}
