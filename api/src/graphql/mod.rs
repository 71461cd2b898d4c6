//! The GraphQL schema, one module per resource (its queries, mutations, subscriptions and
//! object types), merged here into the roots; inputs in `inputs`, ids and paging in
//! `args`. Also the per-request context every resolver reads the caller from.

mod args;
mod audit;
mod auth;
pub mod bounds;
mod clusters;
pub mod cost;
mod inputs;
mod limits;
mod members;
mod notifications;
mod packages;
mod retention;
mod runs;
mod tasks;
mod tenants;

use std::net::IpAddr;
use std::sync::Arc;

use async_graphql::{Context, MergedObject, MergedSubscription, Schema};
use cloudtask_catalogue::TenantHandle;
use cloudtask_core::Error;
use tokio::sync::OnceCell;

use crate::AppState;
use crate::auth::Identity;

pub use args::encode_cursor;

#[derive(MergedObject, Default)]
#[graphql(name = "Query")]
pub struct QueryRoot(
    auth::AuthQuery,
    tenants::TenantQuery,
    clusters::ClusterQuery,
    tasks::TaskQuery,
    runs::RunQuery,
    notifications::NotificationQuery,
    retention::RetentionQuery,
    members::MemberQuery,
    audit::AuditQuery,
);

#[derive(MergedObject, Default)]
#[graphql(name = "Mutation")]
pub struct MutationRoot(
    auth::AuthMutation,
    tenants::TenantMutation,
    members::MemberMutation,
    clusters::ClusterMutation,
    notifications::NotificationMutation,
    retention::RetentionMutation,
    tasks::TaskMutation,
    packages::PackageMutation,
    runs::RunMutation,
);

#[derive(MergedSubscription, Default)]
#[graphql(name = "Subscription")]
pub struct SubscriptionRoot(runs::RunSubscription, clusters::ClusterSubscription);

pub type AppSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// The id of one HTTP request to `/graphql` (see `http::graphql`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    /// The caller's id when it is a plain token of at most 64 characters, else a new one.
    pub fn from_header(given: Option<&str>) -> RequestId {
        let plain = |id: &str| {
            (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
        };
        match given {
            Some(id) if plain(id) => RequestId(id.to_owned()),
            _ => RequestId(format!("req_{}", uuid::Uuid::now_v7().simple())),
        }
    }
}

/// Built once per HTTP request from its headers, and once per operation on a socket.
#[derive(Clone)]
pub struct RequestContext {
    /// `None`: no token was sent. `Some(Err)`: one was sent and refused, with the reason.
    pub auth: Option<Result<Identity, String>>,
    /// The client's address, through trusted proxies (see `crate::client_addr`).
    pub client_ip: IpAddr,
    tenant: OnceCell<TenantHandle>,
}

impl RequestContext {
    pub fn new(auth: Option<Result<Identity, String>>, client_ip: IpAddr) -> Self {
        RequestContext {
            auth,
            client_ip,
            tenant: OnceCell::new(),
        }
    }

    /// Who pays for this request's budget over time: the signed-in user, or the
    /// client's address.
    pub fn caller(&self) -> crate::budget::Caller {
        crate::budget::Caller::of(&self.auth, self.client_ip)
    }

    /// A context whose tenant handle was built already (a socket's operation, right
    /// after its session was checked).
    pub fn with_tenant(
        auth: Option<Result<Identity, String>>,
        client_ip: IpAddr,
        tenant: Option<TenantHandle>,
    ) -> Self {
        RequestContext {
            auth,
            client_ip,
            tenant: OnceCell::new_with(tenant),
        }
    }
}

/// Who a schema serves. Anonymous callers may only sign in: they get no introspection and
/// no "Did you mean…" suggestions, which would map the API for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    SignedIn,
    Anonymous,
}

pub fn build_schema(state: Option<Arc<AppState>>, audience: Audience) -> AppSchema {
    let mut builder = Schema::build(
        QueryRoot::default(),
        MutationRoot::default(),
        SubscriptionRoot::default(),
    )
    .extension(crate::error::ErrorCodes);
    if audience == Audience::Anonymous {
        builder = builder.disable_introspection().disable_suggestions();
    }
    if let Some(state) = state {
        let bounds = bounds::TextBounds {
            max_chars: state.config.query_max_chars,
            max_tokens: state.config.query_max_tokens,
            max_nesting: state.config.query_max_nesting,
            max_aliases: state.config.query_max_aliases,
            max_directives: state.config.query_max_directives,
        };
        builder = builder
            .extension(bounds::Bounds(bounds))
            .extension(cost::Costs {
                max_complexity: state.config.query_max_complexity,
                max_answer_bytes: state.config.query_max_answer_bytes,
                heavy_complexity: state.config.query_heavy_complexity,
            })
            .limit_depth(state.config.query_max_depth)
            .limit_complexity(state.config.query_max_complexity)
            .data(state);
    }
    builder.finish()
}

/// The SDL that `cloudtask export-schema` prints and `schema.graphql` holds.
pub fn sdl() -> String {
    build_schema(None, Audience::SignedIn).sdl()
}

pub(crate) fn state<'a>(ctx: &Context<'a>) -> &'a Arc<AppState> {
    ctx.data_unchecked::<Arc<AppState>>()
}

pub(crate) fn request<'a>(ctx: &Context<'a>) -> &'a RequestContext {
    ctx.data_unchecked::<RequestContext>()
}

/// The verified caller, or UNAUTHENTICATED.
pub(crate) fn identity<'a>(ctx: &Context<'a>) -> Result<&'a Identity, Error> {
    match &request(ctx).auth {
        None => Err(Error::Unauthenticated("no access token".into())),
        Some(Err(why)) => Err(Error::Unauthenticated(why.clone())),
        Some(Ok(identity)) => Ok(identity),
    }
}

/// The caller's tenant handle: the only way resolvers reach tenant data. Built once per
/// request; the membership is checked against the catalogue, not taken from the token.
pub(crate) async fn tenant<'a>(ctx: &Context<'a>) -> Result<&'a TenantHandle, Error> {
    let identity = identity(ctx)?;
    let tenant_id = identity.tenant_id.ok_or_else(|| {
        Error::Forbidden("this token names no tenant; log in with a tenantId".into())
    })?;
    request(ctx)
        .tenant
        .get_or_try_init(|| state(ctx).tenant(identity, tenant_id))
        .await
}
