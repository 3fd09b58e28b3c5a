//! The gRPC edge of the error classes: every baton server turns its errors into a status here,
//! and every baton client classifies a peer's status here, so a class and a code correspond the
//! same way everywhere.

use std::time::Duration;

use baton_core::ErrorClass;
use tonic::{Code, Status};

/// The gRPC code of a class.
pub fn code(class: ErrorClass) -> Code {
    match class {
        ErrorClass::InvalidRequest => Code::InvalidArgument,
        ErrorClass::NotFound => Code::NotFound,
        ErrorClass::Unauthenticated => Code::Unauthenticated,
        ErrorClass::Overloaded => Code::ResourceExhausted,
        ErrorClass::Unavailable => Code::Unavailable,
        ErrorClass::Deadline => Code::DeadlineExceeded,
        ErrorClass::Cancelled => Code::Cancelled,
        ErrorClass::BadModel | ErrorClass::Internal => Code::Internal,
    }
}

/// A status of `class` saying `message`; an overload carries `retry-after` (whole seconds, at
/// least 1) when the server knows when to come back.
pub fn status(
    class: ErrorClass,
    message: impl Into<String>,
    retry_after: Option<Duration>,
) -> Status {
    let mut status = Status::new(code(class), message);
    if let Some(after) = retry_after
        && let Ok(v) = after.as_secs().max(1).to_string().parse()
    {
        status.metadata_mut().insert("retry-after", v);
    }
    status
}

/// Metadata a decode worker puts on a stream's error when the KV's source failed it (the
/// prefill worker died, hung past its lease, or sent bytes that did not verify): the decode
/// worker itself is fine, and a coordinator that places the stream again avoids the source.
const KV_SOURCE_FAILED: &str = "baton-kv-source-failed";

/// Marks `status` as caused by the KV's source ([`kv_source_failed`]).
pub fn mark_kv_source_failed(mut status: Status) -> Status {
    status.metadata_mut().insert(
        KV_SOURCE_FAILED,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    status
}

/// Whether a decode worker said its KV's source, not itself, failed the stream.
pub fn kv_source_failed(status: &Status) -> bool {
    status.metadata().contains_key(KV_SOURCE_FAILED)
}

/// The class of a peer's status, by its code.
pub fn class_of(status: &Status) -> ErrorClass {
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            ErrorClass::InvalidRequest
        }
        Code::ResourceExhausted => ErrorClass::Overloaded,
        Code::DeadlineExceeded => ErrorClass::Deadline,
        // tonic's own timer for the call's grpc-timeout (the request's deadline) reports
        // CANCELLED; it is the deadline that passed.
        Code::Cancelled if timed_out(status) => ErrorClass::Deadline,
        Code::Cancelled => ErrorClass::Cancelled,
        Code::NotFound => ErrorClass::NotFound,
        Code::Unauthenticated | Code::PermissionDenied => ErrorClass::Unauthenticated,
        Code::Unavailable | Code::Aborted | Code::Unknown => ErrorClass::Unavailable,
        _ => ErrorClass::Internal,
    }
}

/// Whether a call failed because tonic's client-side timer for its `grpc-timeout` fired.
fn timed_out(status: &Status) -> bool {
    std::error::Error::source(status).is_some_and(|e| {
        e.downcast_ref::<tonic::TimeoutExpired>().is_some()
            || e.downcast_ref::<tonic::transport::Error>()
                .and_then(std::error::Error::source)
                .is_some_and(|e| e.downcast_ref::<tonic::TimeoutExpired>().is_some())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kv_source_failure_is_marked_and_only_then() {
        let plain = status(ErrorClass::Unavailable, "kv handoff failed: x", None);
        assert!(!kv_source_failed(&plain));
        let marked = mark_kv_source_failed(plain);
        assert!(kv_source_failed(&marked));
        assert_eq!(class_of(&marked), ErrorClass::Unavailable);
        // A status's metadata travels in the stream's trailers (the chaos suite's
        // kill-prefill-pull scenario sees the coordinator act on it).
        assert!(marked.metadata().contains_key(KV_SOURCE_FAILED));
    }

    #[test]
    fn every_class_survives_the_round_trip_through_a_status() {
        for class in ErrorClass::ALL {
            let back = class_of(&status(class, "x", None));
            let expected = match class {
                // Both are 500 INTERNAL on the wire; a peer's broken model is our internal error.
                ErrorClass::BadModel => ErrorClass::Internal,
                c => c,
            };
            assert_eq!(back, expected, "{class}");
        }
    }

    #[test]
    fn overload_carries_retry_after_in_whole_seconds() {
        let s = status(
            ErrorClass::Overloaded,
            "full",
            Some(Duration::from_millis(200)),
        );
        assert_eq!(
            s.metadata()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
    }
}
