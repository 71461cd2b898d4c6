//! A socket's session: who signed in at `connection_init`, checked again before every
//! operation and every event delivered, and ended (the socket closes with 4403) when the
//! access token expires, its login is revoked (logout) or the user is no longer a member
//! of its tenant. A change to the user's account on any replica (role, removal, logout)
//! makes their sockets check at once (`super::follow_accounts`).
//!
//! A role change does not end it: every operation gets a tenant handle built from the
//! role held now, and every role may read what subscriptions deliver.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_graphql::futures_util::stream::{self, BoxStream, StreamExt};
use async_graphql::{Response, ServerError};
use chrono::Utc;
use cloudtask_catalogue::TenantHandle;
use cloudtask_core::Error;
use tokio::sync::watch;
use tokio::time::Instant;

use super::registry::SocketSlot;
use crate::AppState;
use crate::auth::Identity;
use crate::graphql::RequestContext;

/// Events delivered within this long of a successful check are not checked again, unless
/// the user's memberships changed on this replica meanwhile (a burst of log lines costs
/// one check, not one per line). Operations are always checked.
const EVENT_RECHECK: Duration = Duration::from_secs(1);

pub struct Session {
    state: Arc<AppState>,
    identity: Identity,
    client_ip: IpAddr,
    slot: SocketSlot,
    /// When the membership was last found, and the membership generation then.
    verified: Mutex<Option<(Instant, u64)>>,
    /// Why the session ended, once it has.
    ended: watch::Sender<Option<String>>,
}

impl Session {
    pub fn new(
        state: Arc<AppState>,
        identity: Identity,
        client_ip: IpAddr,
        slot: SocketSlot,
    ) -> Self {
        Session {
            state,
            identity,
            client_ip,
            slot,
            verified: Mutex::new(None),
            ended: watch::channel(None).0,
        }
    }

    /// The session as it stands now: UNAUTHENTICATED once the token has expired,
    /// FORBIDDEN once the user is no longer a member; else the tenant handle with the
    /// role held now (none for a token without a tenant).
    pub async fn check(&self) -> Result<Option<TenantHandle>, Error> {
        self.check_expiry()?;
        let generation = *self.slot.membership.borrow();
        if let Some(login) = self.identity.login
            && self.state.revoked.is_revoked(login)
        {
            return Err(Error::Unauthenticated("logged out".into()));
        }
        let Some(tenant_id) = self.identity.tenant_id else {
            *self.verified.lock().expect("session") = Some((Instant::now(), generation));
            return Ok(None);
        };
        let handle = self.state.tenant(&self.identity, tenant_id).await?;
        // The membership, read now (a handle reads it once).
        handle.role().await?;
        *self.verified.lock().expect("session") = Some((Instant::now(), generation));
        Ok(Some(handle))
    }

    fn check_expiry(&self) -> Result<(), Error> {
        if Utc::now() >= self.identity.expires_at {
            return Err(Error::Unauthenticated("access token expired".into()));
        }
        Ok(())
    }

    /// [`Session::check`] before an event is delivered, reusing a recent success.
    async fn check_for_event(&self) -> Result<(), Error> {
        self.check_expiry()?;
        let generation = *self.slot.membership.borrow();
        let recent = self
            .verified
            .lock()
            .expect("session")
            .is_some_and(|(at, seen)| seen == generation && at.elapsed() < EVENT_RECHECK);
        if recent {
            return Ok(());
        }
        self.check().await.map(drop)
    }

    /// Ends the session when `error` says it is over; whether it did.
    fn end_if_over(&self, error: &Error) -> bool {
        let over = matches!(error, Error::Unauthenticated(_) | Error::Forbidden(_));
        if over {
            let why = error.to_string();
            self.ended.send_if_modified(|ended| {
                let first = ended.is_none();
                if first {
                    *ended = Some(why);
                }
                first
            });
        }
        over
    }

    /// Resolves when the session ends, with the reason: at the token's expiry, or when a
    /// check (after an account change, or before an operation or event) failed.
    pub async fn ended(&self) -> String {
        let mut ended = self.ended.subscribe();
        let mut membership = self.slot.membership.clone();
        let left = (self.identity.expires_at - Utc::now())
            .to_std()
            .unwrap_or_default();
        let expiry = tokio::time::sleep(left);
        tokio::pin!(expiry);
        loop {
            if let Some(why) = ended.borrow_and_update().clone() {
                return why;
            }
            tokio::select! {
                _ = &mut expiry => {
                    self.end_if_over(&Error::Unauthenticated("access token expired".into()));
                }
                Ok(()) = membership.changed() => {
                    if let Err(e) = self.check().await {
                        self.end_if_over(&e);
                    }
                }
                _ = ended.changed() => {}
            }
        }
    }

    /// What an operation's resolvers read the caller from, with the tenant handle that
    /// the check before it built (one per operation: the role is the one held now).
    pub fn request_context(&self, tenant: Option<TenantHandle>) -> RequestContext {
        RequestContext::with_tenant(Some(Ok(self.identity.clone())), self.client_ip, tenant)
    }

    /// An operation refused by its check: the error, then (when the session is over) the
    /// end of the session, which closes the socket.
    pub fn refuse(self: &Arc<Self>, error: Error) -> BoxStream<'static, Response> {
        let answer = stream::once(std::future::ready(error_response(&error)));
        let session = self.clone();
        let end = stream::once(async move {
            if session.end_if_over(&error) {
                std::future::pending::<()>().await;
            }
        })
        .filter_map(|()| std::future::ready(None));
        answer.chain(end).boxed()
    }

    /// `answers` with the session checked before each is delivered. Once the session is
    /// over nothing more is delivered (the socket is being closed).
    pub fn guard(
        self: &Arc<Self>,
        answers: BoxStream<'static, Response>,
    ) -> BoxStream<'static, Response> {
        let session = self.clone();
        stream::unfold(Some(answers), move |answers| {
            let session = session.clone();
            async move {
                let mut answers = answers?;
                let answer = answers.next().await?;
                match session.check_for_event().await {
                    Ok(()) => Some((answer, Some(answers))),
                    Err(e) => {
                        if session.end_if_over(&e) {
                            std::future::pending::<()>().await;
                        }
                        // The catalogue cannot say: this operation ends with the error.
                        Some((error_response(&e), None))
                    }
                }
            }
        })
        .boxed()
    }
}

/// An answer that is only `error`, with its code.
pub fn error_response(error: &Error) -> Response {
    graphql_error_response(crate::error::to_graphql(error))
}

pub fn graphql_error_response(error: async_graphql::Error) -> Response {
    let mut server_error = ServerError::new(error.message, None);
    server_error.extensions = error.extensions;
    Response::from_errors(vec![server_error])
}
