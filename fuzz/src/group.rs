//! The rank link of a worker group (baton-group): frames as a rank or the group's driver reads
//! them, each decoded into the operation or reply it carries.

use baton_group::wire::{self, Header, ReadError};

/// A byte stream of frames as one end of a rank link reads it: each frame's lengths checked
/// against their bounds, its JSON header parsed, then read as an operation (what a rank does)
/// and as a reply (what the driver does), payload and all. Stops where a link would: a short or
/// malformed frame. A frame that decodes is written again and must read back the same.
pub fn group_frame(data: &[u8]) {
    let mut stream = data;
    loop {
        let (header, payload) = match wire::read_frame(&mut stream) {
            Ok(frame) => frame,
            Err(ReadError::Closed(_) | ReadError::Bad(_)) => return,
        };
        let mut again = Vec::new();
        if wire::write_frame(&mut again, &header, &[&payload]).is_ok() {
            let Ok((h2, p2)) = wire::read_frame(&mut again.as_slice()) else {
                panic!("a frame that was read does not read back once written");
            };
            assert_eq!(
                serde_json::to_string(&h2).ok(),
                serde_json::to_string(&header).ok(),
                "a header changed on its way round"
            );
            assert_eq!(
                p2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                payload.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "a payload changed on its way round"
            );
        }
        match &header {
            Header::Op(_) => {
                let _ = wire::op_of(header, payload);
            }
            Header::Reply { .. } | Header::Failed { .. } => {
                let _ = wire::reply_of(header, payload);
            }
            Header::Hello { .. } | Header::Welcome | Header::Refused { .. } => {}
        }
    }
}
