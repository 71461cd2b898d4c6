//! The one place domain errors become GraphQL errors with `extensions.code`, or HTTP
//! answers with a status and an [`ErrorBody`]. Internal details are logged here and never
//! sent to the client.

use std::sync::Arc;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextRequest, NextSubscribe,
};
use async_graphql::futures_util::stream::{BoxStream, StreamExt};
use async_graphql::{ErrorExtensions, Response};
use axum::Json;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use cloudtask_core::Error;
use cloudtask_core::protocol::ErrorBody;

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
            // Errors raised by async-graphql itself (bad upload, missing data): kept
            // when they carry a code, otherwise logged and sent as INTERNAL.
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

/// A domain error answering a plain HTTP request (the worker endpoints, package
/// downloads): its status, and an [`ErrorBody`] with its code.
#[derive(Debug)]
pub struct HttpError(pub Error);

impl From<Error> for HttpError {
    fn from(e: Error) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> axum::response::Response {
        let HttpError(e) = self;
        let status = match &e {
            Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::BadInput { .. } => StatusCode::BAD_REQUEST,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let message = match &e {
            Error::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        };
        let body = ErrorBody {
            code: e.code().to_owned(),
            error: message,
        };
        (status, Json(body)).into_response()
    }
}

/// Gives every error of a response a code, and caps their number and length, on every
/// transport (HTTP, and queries and subscriptions over WebSocket): see [`give_codes`].
pub struct ErrorCodes;

impl ExtensionFactory for ErrorCodes {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(ErrorCodesOf::default())
    }
}

/// [`ErrorCodes`] for one request: its id, once the request is seen.
#[derive(Default)]
struct ErrorCodesOf {
    request_id: std::sync::OnceLock<String>,
}

#[async_graphql::async_trait::async_trait]
impl Extension for ErrorCodesOf {
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        request: async_graphql::Request,
        next: async_graphql::extensions::NextPrepareRequest<'_>,
    ) -> async_graphql::ServerResult<async_graphql::Request> {
        let id = request
            .data
            .get(&std::any::TypeId::of::<crate::graphql::RequestId>())
            .and_then(|d| d.downcast_ref::<crate::graphql::RequestId>());
        if let Some(id) = id {
            let _ = self.request_id.set(id.0.clone());
        }
        next.run(ctx, request).await
    }

    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        let mut response = next.run(ctx).await;
        give_codes(&mut response);
        crate::graphql::cost::cap_errors(&mut response);
        if let Some(id) = self.request_id.get() {
            for error in &mut response.errors {
                error
                    .extensions
                    .get_or_insert_with(Default::default)
                    .set("requestId", id.clone());
            }
        }
        response
    }

    fn subscribe<'s>(
        &self,
        ctx: &ExtensionContext<'_>,
        stream: BoxStream<'s, Response>,
        next: NextSubscribe<'_>,
    ) -> BoxStream<'s, Response> {
        next.run(ctx, stream)
            .map(|mut response| {
                give_codes(&mut response);
                crate::graphql::cost::cap_errors(&mut response);
                response
            })
            .boxed()
    }
}

/// Resolver errors carry a code already (see [`to_graphql`]). What is left are errors the
/// request itself caused before any resolver ran: syntax, unknown fields, wrong argument
/// types, depth and complexity limits. Those are the client's to fix.
///
/// A value that does not fit its argument's type is reported by async-graphql as
/// `Invalid value for argument "input.schedule", expected type "String"` (a missing
/// input field as `…argument "input", field "schedule" of type "String!" is required…`).
/// The quoted path names the field, so it goes to `extensions.field` the way resolver
/// errors name theirs: an `input` argument's fields by their own name (`schedule`), other
/// arguments by their path (`filter.clusterId`), and a list by its own name (`env`, not
/// `env.0.name`).
fn give_codes(response: &mut async_graphql::Response) {
    /// The text between the quotes that follow `after`, and what comes behind it.
    fn quoted<'a>(text: &'a str, after: &str) -> Option<(&'a str, &'a str)> {
        let start = text.find(after)? + after.len();
        let rest = &text[start..];
        let end = rest.find('"')?;
        Some((&rest[..end], &rest[end + 1..]))
    }
    fn field_of(message: &str) -> Option<String> {
        let reason = message.strip_prefix("Invalid value for argument ")?;
        let (argument, rest) = quoted(reason, "\"")?;
        let mut path: Vec<&str> = argument.split('.').collect();
        if let Some((field, _)) = quoted(rest, "field \"") {
            path.push(field);
        }
        if let Some(index) = path.iter().position(|s| s.parse::<usize>().is_ok()) {
            path.truncate(index);
        }
        if path.len() > 1 && path[0] == "input" {
            path.remove(0);
        }
        (!path.is_empty() && path.iter().all(|s| !s.is_empty())).then(|| path.join("."))
    }

    for error in &mut response.errors {
        let extensions = error.extensions.get_or_insert_with(Default::default);
        if extensions.get("code").is_none() {
            extensions.set("code", "BAD_USER_INPUT");
            // async-graphql's own limits, named by their configuration keys.
            if error.message.contains("too complex") {
                extensions.set("limit", "query_max_complexity");
            } else if error.message.contains("nested too deep") {
                extensions.set("limit", "query_max_depth");
            }
            if extensions.get("field").is_none()
                && let Some(field) = field_of(&error.message)
            {
                extensions.set("field", field);
            }
        }
    }
}
