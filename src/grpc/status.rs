//! gRPC status codes and the status every call ends with. Errors of the
//! layers below become statuses at the service edge: a group's
//! `raft::CallError` through its one `From` mapping (in `shard`), the
//! control and KV services' own refusals where they decide them.

use std::fmt;

/// The canonical gRPC status codes (grpc/doc/statuscodes.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    /// Maps a wire value back to a code; unknown values become `Unknown`.
    pub fn from_u32(v: u32) -> Code {
        use Code::*;
        match v {
            0 => Ok,
            1 => Cancelled,
            2 => Unknown,
            3 => InvalidArgument,
            4 => DeadlineExceeded,
            5 => NotFound,
            6 => AlreadyExists,
            7 => PermissionDenied,
            8 => ResourceExhausted,
            9 => FailedPrecondition,
            10 => Aborted,
            11 => OutOfRange,
            12 => Unimplemented,
            13 => Internal,
            14 => Unavailable,
            15 => DataLoss,
            16 => Unauthenticated,
            _ => Unknown,
        }
    }

    /// The upper-case name used in logs and CLI output.
    pub fn name(self) -> &'static str {
        use Code::*;
        match self {
            Ok => "OK",
            Cancelled => "CANCELLED",
            Unknown => "UNKNOWN",
            InvalidArgument => "INVALID_ARGUMENT",
            DeadlineExceeded => "DEADLINE_EXCEEDED",
            NotFound => "NOT_FOUND",
            AlreadyExists => "ALREADY_EXISTS",
            PermissionDenied => "PERMISSION_DENIED",
            ResourceExhausted => "RESOURCE_EXHAUSTED",
            FailedPrecondition => "FAILED_PRECONDITION",
            Aborted => "ABORTED",
            OutOfRange => "OUT_OF_RANGE",
            Unimplemented => "UNIMPLEMENTED",
            Internal => "INTERNAL",
            Unavailable => "UNAVAILABLE",
            DataLoss => "DATA_LOSS",
            Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

/// A failed call: code plus a human-readable message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }
    pub fn invalid_argument(m: impl Into<String>) -> Status {
        Status::new(Code::InvalidArgument, m)
    }
    pub fn not_found(m: impl Into<String>) -> Status {
        Status::new(Code::NotFound, m)
    }
    pub fn failed_precondition(m: impl Into<String>) -> Status {
        Status::new(Code::FailedPrecondition, m)
    }
    pub fn permission_denied(m: impl Into<String>) -> Status {
        Status::new(Code::PermissionDenied, m)
    }
    pub fn aborted(m: impl Into<String>) -> Status {
        Status::new(Code::Aborted, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Status {
        Status::new(Code::Unavailable, m)
    }
    pub fn deadline_exceeded(m: impl Into<String>) -> Status {
        Status::new(Code::DeadlineExceeded, m)
    }
    pub fn internal(m: impl Into<String>) -> Status {
        Status::new(Code::Internal, m)
    }
    pub fn unimplemented(m: impl Into<String>) -> Status {
        Status::new(Code::Unimplemented, m)
    }
    pub fn out_of_range(m: impl Into<String>) -> Status {
        Status::new(Code::OutOfRange, m)
    }
    pub fn resource_exhausted(m: impl Into<String>) -> Status {
        Status::new(Code::ResourceExhausted, m)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.name(), self.message)
    }
}

impl std::error::Error for Status {}
