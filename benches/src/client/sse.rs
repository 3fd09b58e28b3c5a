//! A bounded server-sent-events decoder: bytes in, the `data` of each complete event out.
//!
//! Follows the parts of the SSE format an OpenAI stream uses: lines end in `\n` or `\r\n`; a
//! blank line ends an event; `data:` lines (one leading space dropped) are joined with `\n`;
//! comments (`:`) and other fields (`event:`, `id:`, `retry:`) are ignored. A line or an event
//! longer than the limit is an error rather than a buffer that grows with what a peer sends.

/// An event or line over the size limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("server-sent event over {limit} bytes")]
pub struct Oversized {
    /// The limit that was crossed, in bytes.
    pub limit: usize,
}

/// Splits a byte stream into SSE events.
#[derive(Debug)]
pub struct SseDecoder {
    /// Bytes of the line not yet ended.
    line: Vec<u8>,
    /// `data` of the event not yet ended.
    data: Option<String>,
    limit: usize,
}

impl SseDecoder {
    /// A decoder refusing lines and events over `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            line: Vec::new(),
            data: None,
            limit,
        }
    }

    /// Feeds bytes; returns the data of every event they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, Oversized> {
        let mut events = Vec::new();
        let mut rest = bytes;
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            self.extend_line(&rest[..at])?;
            rest = &rest[at + 1..];
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.is_empty() {
                if let Some(data) = self.data.take() {
                    events.push(data);
                }
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            let (field, value) = match text.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (text.as_ref(), ""),
            };
            if field == "data" {
                let data = self.data.get_or_insert_with(String::new);
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
                if data.len() > self.limit {
                    return Err(Oversized { limit: self.limit });
                }
            }
        }
        self.extend_line(rest)?;
        Ok(events)
    }

    /// The data of an event the stream ended without a blank line after (a lenient end).
    pub fn finish(&mut self) -> Option<String> {
        let line = std::mem::take(&mut self.line);
        let text = String::from_utf8_lossy(&line);
        if let Some(value) = text.strip_prefix("data:") {
            let data = self.data.get_or_insert_with(String::new);
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(
                value
                    .strip_prefix(' ')
                    .unwrap_or(value)
                    .trim_end_matches('\r'),
            );
        }
        self.data.take()
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), Oversized> {
        if self.line.len() + bytes.len() > self.limit {
            return Err(Oversized { limit: self.limit });
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let stream = b"data: {\"a\":1}\n\n: keep-alive\n\nevent: x\r\ndata: two\r\ndata: lines\r\n\r\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            let mut d = SseDecoder::new(1024);
            let mut got = d.push(&stream[..cut]).expect("push");
            got.extend(d.push(&stream[cut..]).expect("push"));
            assert_eq!(got, ["{\"a\":1}", "two\nlines", "[DONE]"], "cut at {cut}");
        }
    }

    #[test]
    fn byte_by_byte_equals_all_at_once() {
        let stream = b"data:x\n\ndata: y\n\n";
        let mut d = SseDecoder::new(64);
        let mut got = Vec::new();
        for b in stream {
            got.extend(d.push(std::slice::from_ref(b)).expect("push"));
        }
        assert_eq!(got, ["x", "y"]);
    }

    #[test]
    fn oversized_lines_and_events_are_refused() {
        let mut d = SseDecoder::new(8);
        assert_eq!(d.push(b"data: 0123456789"), Err(Oversized { limit: 8 }));
        let mut d = SseDecoder::new(8);
        d.push(b"data:012\ndata:345\n")
            .expect("each line and the event so far fit");
        assert_eq!(d.push(b"data:678\n"), Err(Oversized { limit: 8 }));
    }

    #[test]
    fn an_unterminated_last_event_is_available_at_finish() {
        let mut d = SseDecoder::new(64);
        assert!(d.push(b"data: [DONE]").expect("push").is_empty());
        assert_eq!(d.finish().as_deref(), Some("[DONE]"));
        assert_eq!(d.finish(), None);
    }
}
