//! The API process: GraphQL over HTTP (and GraphiQL), the web console, health endpoints,
//! package downloads, and the worker endpoints.

pub mod auth;
pub mod cluster_view;
mod console;
mod download;
mod error;
pub mod graphql;
mod http;
mod limits;
mod serve;
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
    pub cluster_view: cluster_view::ClusterView,
}

impl AppState {
    /// Fails when the configuration lacks what the API needs (a JWT secret). The cluster
    /// view reads ZooKeeper at `config.zookeeper`.
    pub fn new(
        catalogue: Catalogue,
        config: Config,
    ) -> Result<Arc<Self>, cloudtask_core::config::ConfigError> {
        let coordinator = Arc::new(cloudtask_coord::zk::ZkCoordinator::new(
            config.zookeeper.clone(),
            std::time::Duration::from_millis(config.zookeeper_session_timeout_ms),
        ));
        Self::with_coordinator(catalogue, config, coordinator)
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
        );
        let cluster_view = cluster_view::ClusterView::new(coordinator);
        Ok(Arc::new(AppState {
            catalogue,
            config: Arc::new(config),
            keys,
            logins,
            cluster_view,
        }))
    }
}
