//! The API process: GraphQL over HTTP (and GraphiQL), the web console, health endpoints,
//! package downloads, and the worker endpoints.

pub mod auth;
pub mod cluster_view;
mod console;
mod error;
pub mod graphql;
mod http;
mod limits;
mod webhooks;

use std::sync::Arc;

use cloudtask_catalogue::Catalogue;
use cloudtask_core::config::Config;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use graphql::sdl;
pub use http::router;

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

/// Serves until `shutdown` is cancelled, then drains in-flight requests.
pub async fn run(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let app = router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    // Small request/response pairs (claims, report batches) must not wait for Nagle and
    // the peer's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
