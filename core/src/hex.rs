//! Lower-case hex for the 32-byte names baton writes in configuration and adverts (model
//! fingerprints, API key hashes, advert signatures).

/// `bytes` as lower-case hex.
pub fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 64 hex digits (either case) as 32 bytes; `None` for anything else.
pub fn decode32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_64_hex_digits() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 7) as u8);
        assert_eq!(decode32(&encode(&bytes)), Some(bytes));
        assert_eq!(decode32(&encode(&bytes).to_uppercase()), Some(bytes));
        assert_eq!(decode32("ab"), None);
        assert_eq!(decode32(&"zz".repeat(32)), None);
        assert_eq!(decode32(&"é".repeat(32)), None);
    }
}
