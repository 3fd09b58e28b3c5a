//! OpenAI request bodies (the coordinator's HTTP API): JSON into the internal request, unknown
//! fields refused, sampling validated.

use baton_coordinator::fuzzing::{chat, completion};
use baton_coordinator::{Error, ErrorClass};
use baton_text::SamplingLimits;

use crate::Input;

/// A body for `/v1/completions` (first byte even) or `/v1/chat/completions` (odd), with an
/// `X-Request-Timeout` header cut from the front when the first byte's second bit is set.
/// Whatever the bytes, the answer is a request or a refusal of class invalid request (a 400):
/// never a panic, never a server error.
pub fn openai_request(data: &[u8]) {
    let mut input = Input::new(data);
    let which = input.byte();
    let timeout = (which & 2 != 0).then(|| input.field());
    let body = input.rest();
    let parsed = if which & 1 == 0 {
        completion(body, timeout)
    } else {
        chat(body, timeout)
    };
    // The coordinator validates sampling once it knows the context; a cloud-only request, with
    // a context of 2^20 tokens.
    let checked = parsed.and_then(|request| {
        request
            .params
            .validate(&SamplingLimits::with_room(1 << 20))
            .map_err(Error::Text)
    });
    if let Err(e) = checked {
        assert_eq!(
            e.class(),
            ErrorClass::InvalidRequest,
            "a client's body is refused as invalid, not as a server failure: {e}"
        );
    }
}
