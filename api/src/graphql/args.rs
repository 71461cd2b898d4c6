//! What every resource reads the same way: ids, page sizes and cursors; and the Relay
//! connection a page of records becomes.

use async_graphql::ID;
use async_graphql::OutputType;
use async_graphql::connection::{Connection, Edge};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cloudtask_catalogue::{Page, PageRequest};
use cloudtask_core::{Error, Result};
use uuid::Uuid;

pub fn parse_id<T: std::str::FromStr<Err = Error>>(field: &str, id: &ID) -> Result<T> {
    id.parse::<T>()
        .map_err(|_| Error::bad_input(field, format!("not a valid id: {:?}", id.as_str())))
}

/// An optional id argument, parsed when given.
pub fn parse_optional_id<T: std::str::FromStr<Err = Error>>(
    field: &str,
    id: Option<&ID>,
) -> Result<Option<T>> {
    id.map(|id| parse_id(field, id)).transpose()
}

const CURSOR_PREFIX: &str = "c1:";

pub fn encode_cursor(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{id}"))
}

fn decode_cursor(cursor: &str) -> Result<Uuid> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| {
            text.strip_prefix(CURSOR_PREFIX)
                .and_then(|id| Uuid::parse_str(id).ok())
        })
        .ok_or_else(|| Error::bad_input("after", "not a cursor from this API"))
}

pub const DEFAULT_PAGE: i32 = 50;

pub fn page_request(first: Option<i32>, after: Option<String>) -> Result<PageRequest> {
    let first = first.unwrap_or(DEFAULT_PAGE);
    if !(0..=cloudtask_catalogue::MAX_PAGE as i32).contains(&first) {
        return Err(Error::bad_input(
            "first",
            format!("must be between 0 and {}", cloudtask_catalogue::MAX_PAGE),
        ));
    }
    Ok(PageRequest {
        first: first as u64,
        after: after.as_deref().map(decode_cursor).transpose()?,
    })
}

/// A Relay connection over a page of records, with opaque cursors.
pub fn connection<R, N: OutputType>(
    page: Page<R>,
    request: PageRequest,
    id_of: impl Fn(&R) -> Uuid,
    node: impl Fn(R) -> N,
) -> Connection<String, N> {
    let mut connection = Connection::new(request.after.is_some(), page.has_next);
    connection.edges.extend(
        page.items
            .into_iter()
            .map(|record| Edge::new(encode_cursor(id_of(&record)), node(record))),
    );
    connection
}
