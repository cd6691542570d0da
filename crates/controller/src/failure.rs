//! Why a management request failed, in the operator's terms; the API turns the kind into
//! an HTTP status and the CLI prints the message.

use strata_pool::PoolError;

/// Why a management request failed; the kind picks the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong, in the operator's terms.
    pub kind: FailureKind,
    /// One line saying what to do.
    pub message: String,
}

/// Classes of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request is malformed or impossible.
    BadRequest,
    /// It names something that does not exist.
    NotFound,
    /// It conflicts with what exists.
    Conflict,
    /// The controller or a device failed.
    Internal,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

impl From<PoolError> for Failure {
    fn from(e: PoolError) -> Self {
        let kind = match &e {
            PoolError::Layout(_)
            | PoolError::BadName(_)
            | PoolError::TooSmall { .. }
            | PoolError::Option(_) => FailureKind::BadRequest,
            PoolError::NoSuchVolume(_) | PoolError::NoSuchDevice(_) => FailureKind::NotFound,
            PoolError::VolumeExists(_)
            | PoolError::AlreadyClaimed { .. }
            | PoolError::AlreadyMember { .. }
            | PoolError::DamagedLabel { .. }
            | PoolError::DeviceInUse { .. }
            | PoolError::ConfigTooLarge { .. }
            | PoolError::NoDevices => FailureKind::Conflict,
            _ => FailureKind::Internal,
        };
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        Failure { kind, message }
    }
}
