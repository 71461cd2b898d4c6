//! The API process: GraphQL over HTTP (and GraphiQL), the web console, health endpoints,
//! package downloads, and the worker endpoints.

pub mod auth;
mod budget;
mod client_addr;
pub mod cluster_view;
mod console;
mod download;
mod error;
pub mod graphql;
mod http;
mod lanes;
mod limits;
mod serve;
mod sockets;
mod webhooks;
mod worker_api;

use std::sync::Arc;

use cloudtask_catalogue::Catalogue;
use cloudtask_core::config::Config;

pub use graphql::sdl;
pub use http::router;
pub use serve::run;

/// What every request handler shares.
pub struct AppState {
    pub catalogue: Catalogue,
    pub config: Arc<Config>,
    pub keys: auth::TokenKeys,
    pub logins: limits::LoginLimiter,
    /// Join-token attempts (`POST /worker/join`), on the same budget as logins: a wrong
    /// token counts against its address; past the budget, RATE_LIMITED.
    pub joins: limits::LoginLimiter,
    /// Every argon2 hash and check the API makes goes through it.
    pub passwords: auth::PasswordHashing,
    pub trusted_proxies: client_addr::TrustedProxies,
    pub cluster_view: cluster_view::ClusterView,
    /// Uploads being received now (`max_uploads_in_flight`).
    pub uploads: Arc<tokio::sync::Semaphore>,
    pub sockets: sockets::SocketRegistry,
    /// Logins revoked while their access tokens are still valid.
    pub revoked: auth::RevokedLogins,
    /// Catalogue connections each user may hold at once.
    pub lanes: lanes::Lanes<cloudtask_core::ids::UserId>,
    /// Each caller's turn for heavy operations (one at a time).
    pub heavy: lanes::Lanes<budget::Caller>,
    /// Requests and query cost per caller per minute.
    pub budget: budget::RateBudget,
    /// The platform's ZooKeeper identity: workers' identities derive from it at join.
    pub zookeeper: cloudtask_coord::Access,
}

impl AppState {
    /// Fails when the configuration lacks what the API needs (a JWT secret). The cluster
    /// view reads ZooKeeper at `config.zookeeper`.
    pub fn new(
        catalogue: Catalogue,
        config: Config,
    ) -> Result<Arc<Self>, cloudtask_core::config::ConfigError> {
        let coordinator =
            cloudtask_coord::zk::ZkCoordinator::from_config(&config).map_err(|e| {
                cloudtask_core::config::ConfigError::new("zookeeper_auth", e.to_string())
            })?;
        Self::with_coordinator(catalogue, config, Arc::new(coordinator))
    }

    /// A user's access token, verified: signed by us, for users, not expired, and its login
    /// not revoked.
    pub fn verify_user(&self, token: &str) -> cloudtask_core::Result<auth::Identity> {
        let identity = self.keys.verify_access(token)?;
        match identity.login {
            Some(login) if self.revoked.is_revoked(login) => Err(
                cloudtask_core::Error::Unauthenticated("logged out: this login is revoked".into()),
            ),
            _ => Ok(identity),
        }
    }

    /// The tenant handle of a verified user, on the user's lanes.
    pub async fn tenant(
        &self,
        identity: &auth::Identity,
        tenant_id: cloudtask_core::ids::TenantId,
    ) -> cloudtask_core::Result<cloudtask_catalogue::TenantHandle> {
        let handle = self
            .catalogue
            .tenant(cloudtask_catalogue::Scope {
                tenant_id,
                user_id: identity.user_id,
                actor: identity.user_id.to_string(),
            })
            .await?;
        Ok(handle.with_lanes(self.lanes.of(identity.user_id)))
    }

    pub fn with_coordinator(
        catalogue: Catalogue,
        config: Config,
        coordinator: Arc<dyn cloudtask_coord::Coordinator>,
    ) -> Result<Arc<Self>, cloudtask_core::config::ConfigError> {
        let keys = auth::TokenKeys::new(
            config.require_jwt_secret()?.as_bytes(),
            chrono::Duration::seconds(config.access_token_ttl_secs as i64),
        );
        let logins = limits::LoginLimiter::new(
            config.login_max_attempts,
            std::time::Duration::from_secs(config.login_window_secs),
            std::time::Duration::from_secs(config.login_account_max_delay_secs),
        );
        let joins = limits::LoginLimiter::new(
            config.login_max_attempts,
            std::time::Duration::from_secs(config.login_window_secs),
            std::time::Duration::from_secs(config.login_account_max_delay_secs),
        );
        let passwords = auth::PasswordHashing::new(
            config.password_hash_concurrency,
            config.password_hash_queue,
        );
        let trusted_proxies =
            client_addr::TrustedProxies::parse(&config.trusted_proxies).map_err(|message| {
                cloudtask_core::config::ConfigError::new("trusted_proxies", message)
            })?;
        let zookeeper = coordinator.access().clone();
        let cluster_view = cluster_view::ClusterView::new(coordinator);
        let uploads = Arc::new(tokio::sync::Semaphore::new(config.max_uploads_in_flight));
        let sockets = sockets::SocketRegistry::new(config.ws_max_sockets_per_user);
        let budget = budget::RateBudget::new(&config);
        let revoked = auth::RevokedLogins::new(chrono::Duration::seconds(
            config.access_token_ttl_secs as i64,
        ));
        let lanes = lanes::Lanes::new(config.db_connections_per_user);
        Ok(Arc::new(AppState {
            revoked,
            lanes,
            heavy: lanes::Lanes::new(1),
            budget,
            uploads,
            catalogue,
            config: Arc::new(config),
            keys,
            logins,
            joins,
            passwords,
            trusted_proxies,
            cluster_view,
            zookeeper,
            sockets,
        }))
    }
}
