//! What the package download routes share (a user's `/packages/{sha256}`, a worker's
//! `/worker/packages/{sha256}`): the hash is checked before anything else, so a malformed
//! one is NOT_FOUND whoever asks, and the archive goes out as an octet stream.

use axum::extract::{FromRequestParts, Path};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use cloudtask_core::Error;
use cloudtask_core::task::is_sha256_hex;

use crate::error::HttpError;

/// The `{sha256}` of a package route, lower-case hex.
pub struct PackageSha(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PackageSha {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let Path(sha256) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        if is_sha256_hex(&sha256) {
            Ok(PackageSha(sha256))
        } else {
            Err(HttpError(Error::NotFound("package")).into_response())
        }
    }
}

/// A package's zip archive as the answer.
pub fn archive(content: Vec<u8>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        content,
    )
        .into_response()
}
