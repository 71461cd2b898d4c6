//! The one place domain errors become GraphQL errors with `extensions.code`. Internal
//! details are logged here and never sent to the client.

use async_graphql::ErrorExtensions;
use cloudtask_core::Error;

/// A resolver's error. It deliberately does not implement `Display`, so the conversion
/// into `async_graphql::Error` below is the only one, and it always sets a code.
#[derive(Debug, Clone)]
pub enum ApiError {
    Domain(Error),
    Graphql(async_graphql::Error),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError::Domain(e)
    }
}

impl From<async_graphql::Error> for ApiError {
    fn from(e: async_graphql::Error) -> Self {
        ApiError::Graphql(e)
    }
}

impl From<ApiError> for async_graphql::Error {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Domain(e) => to_graphql(&e),
            // Errors raised by async-graphql itself (bad upload, missing data) keep their
            // message; give them a code when they lack one.
            ApiError::Graphql(e)
                if e.extensions
                    .as_ref()
                    .is_some_and(|x| x.get("code").is_some()) =>
            {
                e
            }
            ApiError::Graphql(e) => {
                tracing::error!(error = %e.message, "graphql error without a code");
                internal()
            }
        }
    }
}

fn internal() -> async_graphql::Error {
    async_graphql::Error::new("internal error").extend_with(|_, ext| ext.set("code", "INTERNAL"))
}

pub fn to_graphql(e: &Error) -> async_graphql::Error {
    match e {
        Error::Internal(detail) => {
            tracing::error!(%detail, "internal error");
            internal()
        }
        Error::BadInput { field, .. } => {
            async_graphql::Error::new(e.to_string()).extend_with(|_, ext| {
                ext.set("code", e.code());
                ext.set("field", field.as_str());
            })
        }
        Error::RateLimited { retry_after_secs } => async_graphql::Error::new(e.to_string())
            .extend_with(|_, ext| {
                ext.set("code", e.code());
                ext.set("retryAfterSeconds", *retry_after_secs);
            }),
        Error::Unauthenticated(why) => {
            async_graphql::Error::new(format!("authentication required: {why}"))
                .extend_with(|_, ext| ext.set("code", e.code()))
        }
        _ => {
            async_graphql::Error::new(e.to_string()).extend_with(|_, ext| ext.set("code", e.code()))
        }
    }
}
