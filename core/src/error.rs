//! The domain error. Every layer maps into it; the API maps it onto `extensions.code`.

/// What went wrong, in terms a client can act on. `Internal` carries detail for the log only.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("authentication required")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("invalid {field}: {message}")]
    BadInput { field: String, message: String },
    #[error("{0}")]
    Conflict(String),
    #[error("too many attempts, retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// A dependency (the coordination service) cannot be reached right now.
    #[error("{0} is unavailable; retry shortly")]
    Unavailable(&'static str),
    #[error("internal error")]
    Internal(String),
}

impl Error {
    pub fn bad_input(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::BadInput {
            field: field.into(),
            message: message.to_string(),
        }
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Error::Internal(detail.to_string())
    }

    /// The machine-readable code clients see in `extensions.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Unauthenticated(_) => "UNAUTHENTICATED",
            Error::Forbidden(_) => "FORBIDDEN",
            Error::NotFound(_) => "NOT_FOUND",
            Error::BadInput { .. } => "BAD_USER_INPUT",
            Error::Conflict(_) => "CONFLICT",
            Error::RateLimited { .. } => "RATE_LIMITED",
            Error::Unavailable(_) => "UNAVAILABLE",
            Error::Internal(_) => "INTERNAL",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
