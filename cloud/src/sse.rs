//! An incremental decoder of server-sent events: the body of a streamed completion, as it
//! arrives in arbitrary byte chunks, in; the `data` of each complete event out.
//!
//! endpoint body bytes --[SseDecoder::push]--> event data (JSON chunks, "[DONE]") --> upstream
//!
//! Follows the WHATWG event-stream grammar where it matters here: `\n`, `\r\n` and `\r` line
//! ends (a `\r\n` split across chunks is one line end), `data:` with or without one space,
//! multi-line data joined with `\n`, `:` comments, other fields (`event`, `id`, `retry`)
//! ignored, a leading byte-order mark dropped.
//!
//! Invariants: the decoder holds at most `max_event` bytes of one event (its unfinished line
//! plus its data so far); more is an error, never growth. No input panics it.

use std::mem;

/// The largest event [`SseDecoder::new`] accepts: 1 MiB.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// The stream's bytes are not an event stream we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// One event (its data lines, or one line of any kind) is larger than the limit.
    #[error("an event is larger than {limit} bytes")]
    EventTooLarge { limit: usize },
    /// A line is not UTF-8.
    #[error("a line is not utf-8")]
    InvalidUtf8,
}

/// Decodes an event stream incrementally; see the module docs. After an error the stream is
/// unusable and the decoder should be dropped.
#[derive(Debug)]
pub struct SseDecoder {
    max_event: usize,
    /// The unfinished line.
    line: Vec<u8>,
    /// The current event's data, each line followed by `\n`.
    data: String,
    /// A `data` field was seen since the last dispatch (`data:` alone dispatches "").
    has_data: bool,
    /// The last chunk ended with `\r`: a `\n` opening the next one belongs to that line end.
    after_cr: bool,
    /// No line has been completed yet (a byte-order mark may still open the stream).
    at_start: bool,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl SseDecoder {
    /// A decoder with the default event limit, [`MAX_EVENT_BYTES`].
    pub fn new() -> Self {
        Self::with_max_event(MAX_EVENT_BYTES)
    }

    /// A decoder refusing events larger than `max_event` bytes.
    pub fn with_max_event(max_event: usize) -> Self {
        Self {
            max_event,
            line: Vec::new(),
            data: String::new(),
            has_data: false,
            after_cr: false,
            at_start: true,
        }
    }

    /// Feeds the next bytes of the stream; returns the data of every event they complete.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<String>, SseError> {
        let mut events = Vec::new();
        let mut rest = chunk;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&rest[..end]);
            self.check_size()?;
            let cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
            if cr {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            let line = mem::take(&mut self.line);
            self.take_line(&line, &mut events)?;
        }
        self.line.extend_from_slice(rest);
        self.check_size()?;
        Ok(events)
    }

    /// The stream ended: an event it left unterminated (its last line or its blank line
    /// missing) is dispatched, as lenient clients do, rather than dropped.
    pub fn finish(&mut self) -> Result<Option<String>, SseError> {
        let mut events = Vec::new();
        if !self.line.is_empty() {
            let line = mem::take(&mut self.line);
            self.take_line(&line, &mut events)?;
        }
        self.take_line(b"", &mut events)?;
        Ok(events.pop())
    }

    fn check_size(&mut self) -> Result<(), SseError> {
        if self.line.len() + self.data.len() > self.max_event {
            // Free the buffers: the stream is dead and must not pin a megabyte.
            self.line = Vec::new();
            self.data = String::new();
            return Err(SseError::EventTooLarge {
                limit: self.max_event,
            });
        }
        Ok(())
    }

    fn take_line(&mut self, line: &[u8], events: &mut Vec<String>) -> Result<(), SseError> {
        let mut line = std::str::from_utf8(line).map_err(|_| SseError::InvalidUtf8)?;
        if mem::replace(&mut self.at_start, false) {
            line = line.strip_prefix('\u{feff}').unwrap_or(line);
        }
        if line.is_empty() {
            if mem::replace(&mut self.has_data, false) {
                let mut data = mem::take(&mut self.data);
                data.pop();
                events.push(data);
            }
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            self.data.push_str(value);
            self.data.push('\n');
            self.has_data = true;
            self.check_size()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn decode_all(chunks: &[&[u8]]) -> Result<Vec<String>, SseError> {
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(d.push(c)?);
        }
        Ok(out)
    }

    #[test]
    fn decodes_data_comments_and_other_fields() {
        let stream = b": keep-alive\nevent: chunk\nid: 7\ndata: {\"a\":1}\n\ndata:x\ndata: y\r\n\r\nretry: 5\rdata: z\r\r";
        assert_eq!(
            decode_all(&[stream]),
            Ok(vec!["{\"a\":1}".to_string(), "x\ny".into(), "z".into()])
        );
    }

    #[test]
    fn a_crlf_split_across_chunks_is_one_line_end() {
        assert_eq!(
            decode_all(&[b"data: a\r", b"\n", b"\r", b"\ndata: b\n\n"]),
            Ok(vec!["a".to_string(), "b".into()])
        );
    }

    #[test]
    fn a_byte_order_mark_opens_the_stream() {
        assert_eq!(
            decode_all(&[b"\xef\xbb", b"\xbfdata: a\n\n"]),
            Ok(vec!["a".to_string()])
        );
    }

    #[test]
    fn empty_data_dispatches_and_no_data_does_not() {
        assert_eq!(
            decode_all(&[b"data:\n\nevent: x\n\n\n"]),
            Ok(vec![String::new()])
        );
    }

    #[test]
    fn finish_dispatches_an_unterminated_event() {
        let mut d = SseDecoder::new();
        assert_eq!(d.push(b"data: [DONE]"), Ok(vec![]));
        assert_eq!(d.finish(), Ok(Some("[DONE]".to_string())));
        let mut d = SseDecoder::new();
        assert_eq!(d.push(b"data: a\n"), Ok(vec![]));
        assert_eq!(d.finish(), Ok(Some("a".to_string())));
        assert_eq!(SseDecoder::new().finish(), Ok(None));
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        assert_eq!(decode_all(&[b"data: \xff\n\n"]), Err(SseError::InvalidUtf8));
    }

    #[test]
    fn an_oversized_event_errors() {
        let mut d = SseDecoder::with_max_event(16);
        // Many short data lines: each fits, the event does not.
        let err = (0..10).find_map(|_| d.push(b"data: 0123\n").err());
        assert_eq!(err, Some(SseError::EventTooLarge { limit: 16 }));
        // One long line with no end at all.
        let mut d = SseDecoder::with_max_event(16);
        assert_eq!(d.push(&[b'x'; 10]), Ok(vec![]));
        assert_eq!(
            d.push(&[b'x'; 10]),
            Err(SseError::EventTooLarge { limit: 16 })
        );
    }

    #[test]
    fn the_default_limit_is_one_mebibyte() {
        let mut d = SseDecoder::new();
        let mut big = b"data: ".to_vec();
        big.resize(MAX_EVENT_BYTES + 10, b'a');
        assert_eq!(
            d.push(&big),
            Err(SseError::EventTooLarge {
                limit: MAX_EVENT_BYTES
            })
        );
    }

    /// One event as written: its data lines, with comments and other fields among them, all
    /// ended alike (mixing them could make a `\r` and the next `\n` one line end).
    fn event() -> impl Strategy<Value = (Vec<String>, Vec<u8>)> {
        let line_end = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
        let data_line = "[^\r\n]{0,20}";
        let extra = prop_oneof![
            Just(String::new()),
            Just(": ping".to_string()),
            Just("event: message".to_string()),
            Just("id: 42".to_string()),
            Just("retry: 1000".to_string()),
        ];
        (
            prop::collection::vec((data_line, any::<bool>(), extra), 1..4),
            line_end,
        )
            .prop_map(|(lines, end)| {
                let mut bytes = Vec::new();
                let mut data = Vec::new();
                for (text, space, extra) in lines {
                    if !extra.is_empty() {
                        bytes.extend_from_slice(extra.as_bytes());
                        bytes.extend_from_slice(end.as_bytes());
                    }
                    // The one space after the colon is dropped, so a value that opens with a
                    // space needs it written.
                    let prefix = if space || text.starts_with(' ') {
                        "data: "
                    } else {
                        "data:"
                    };
                    bytes.extend_from_slice(prefix.as_bytes());
                    bytes.extend_from_slice(text.as_bytes());
                    bytes.extend_from_slice(end.as_bytes());
                    data.push(text);
                }
                bytes.extend_from_slice(end.as_bytes());
                (data, bytes)
            })
    }

    fn stream() -> impl Strategy<Value = (Vec<String>, Vec<u8>)> {
        prop::collection::vec(event(), 0..6).prop_map(|events| {
            let mut expected = Vec::new();
            let mut bytes = Vec::new();
            for (data, b) in events {
                expected.push(data.join("\n"));
                bytes.extend(b);
            }
            (expected, bytes)
        })
    }

    proptest! {
        #[test]
        fn any_chunking_decodes_to_the_same_events(
            (expected, bytes) in stream(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for cut in cuts {
                chunks.push(&bytes[start..cut]);
                start = cut;
            }
            chunks.push(&bytes[start..]);
            let whole = decode_all(&[&bytes]);
            prop_assert_eq!(&whole, &Ok(expected.clone()));
            prop_assert_eq!(decode_all(&chunks), Ok(expected));
        }

        #[test]
        fn an_oversized_event_errors_however_it_is_chunked(
            lines in prop::collection::vec(1usize..80, 1..20),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            // Data lines of these lengths, one event, which exceeds a limit of its size - 1.
            let mut bytes = Vec::new();
            let mut size = 0;
            for len in &lines {
                bytes.extend_from_slice(b"data: ");
                bytes.resize(bytes.len() + len, b'a');
                bytes.push(b'\n');
                size += len + 1;
            }
            bytes.push(b'\n');
            let limit = size - 1;
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut d = SseDecoder::with_max_event(limit);
            let mut start = 0;
            let mut result = Ok(Vec::new());
            for cut in cuts {
                result = d.push(&bytes[start..cut]);
                start = cut;
                if result.is_err() {
                    break;
                }
            }
            prop_assert_eq!(result, Err(SseError::EventTooLarge { limit }));
        }

        #[test]
        fn arbitrary_bytes_never_panic_nor_outgrow_the_limit(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16),
        ) {
            let mut d = SseDecoder::with_max_event(100);
            for c in &chunks {
                if d.push(c).is_err() {
                    break;
                }
                prop_assert!(d.line.len() + d.data.len() <= 100);
            }
            let _ = d.finish();
        }
    }
}
