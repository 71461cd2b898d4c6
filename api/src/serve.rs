//! The HTTP server around the router: what every connection and every answer gets, whatever
//! the route. A client that opens a connection and sends its headers slowly, or goes
//! quiet between requests, is cut off after `http_header_timeout_secs`; one that stalls
//! inside a body, after `http_body_idle_timeout_secs` without a byte. Every answer says
//! `nosniff`, no framing, no referrer, and carries a Content-Security-Policy (the console
//! and GraphiQL set their own; everything else is data and may load nothing). Each request
//! carries its client's address ([`ClientAddr`], resolved through `trusted_proxies`). A
//! handler that panics answers 500 INTERNAL; the process serves on.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::AppState;
use crate::client_addr::ClientAddr;

/// Serves until `shutdown` is cancelled, then lets the requests in flight finish.
pub async fn run(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let config = state.config.clone();
    // Tokens of logins revoked before this replica started are refused from its first
    // request; later revocations arrive as events.
    if let Err(e) = state.revoked.learn(&state.catalogue, None).await {
        tracing::warn!(error = %e, "reading revoked logins");
    }
    tokio::spawn(crate::sockets::follow_accounts(Arc::downgrade(&state)));
    let budgets = Arc::downgrade(&state);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        every.tick().await;
        while let Some(state) = {
            every.tick().await;
            budgets.upgrade()
        } {
            state.budget.forget_idle();
            state.lanes.forget_idle();
            state.heavy.forget_idle();
        }
    });
    let trusted_proxies = Arc::new(state.trusted_proxies.clone());
    let app = guarded(crate::router(state), &config);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(config.http_header_timeout_secs));
    builder.http2().enable_connect_protocol();
    let builder = Arc::new(builder);
    // Shutdown drops `signal_rx`: each connection sees its sender closed and finishes
    // gracefully; each holds a `close_rx` until it ends, so `close_tx.closed()` waits for all.
    let (signal_tx, signal_rx) = watch::channel(());
    let (close_tx, close_rx) = watch::channel(());
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small request/response pairs (claims, report batches) must not wait for Nagle
        // and the peer's delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let trusted_proxies = trusted_proxies.clone();
        let service = TowerToHyperService::new(app.clone().map_request(
            move |mut request: Request<hyper::body::Incoming>| {
                let client: ClientAddr = trusted_proxies.client_addr(peer.ip(), request.headers());
                request.extensions_mut().insert(client);
                request.extensions_mut().insert(ConnectInfo(peer));
                request.map(axum::body::Body::new)
            },
        ));
        let builder = builder.clone();
        let signal_tx = signal_tx.clone();
        let close_rx = close_rx.clone();
        tokio::spawn(async move {
            let io = TokioIo::new(tcp);
            let mut connection = pin!(builder.serve_connection_with_upgrades(io, service));
            let mut stop = pin!(signal_tx.closed());
            let mut stopping = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(e) = result {
                            tracing::trace!(error = %e, "connection ended");
                        }
                        break;
                    }
                    // Once: a finished future must not be polled again.
                    _ = &mut stop, if !stopping => {
                        stopping = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(close_rx);
        });
    }
    drop(listener);
    drop(signal_rx);
    drop(close_rx);
    close_tx.closed().await;
    Ok(())
}

/// What every route gets: security headers, a request's panic answered as its own 500
/// (logged) while the connection and the process live on, and the body idle timeout.
fn guarded(router: axum::Router, config: &cloudtask_core::config::Config) -> axum::Router {
    // The headers go outside the panic guard, so its 500 carries them too.
    router
        .layer(CatchPanicLayer::custom(panicked))
        .layer(axum::middleware::from_fn(security_headers))
        .layer(RequestBodyTimeoutLayer::new(Duration::from_secs(
            config.http_body_idle_timeout_secs,
        )))
}

fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic");
    tracing::error!(%detail, "a request panicked");
    let body = r#"{"errors":[{"message":"internal error","extensions":{"code":"INTERNAL"}}]}"#;
    let mut response = Response::new(axum::body::Body::from(body));
    *response.status_mut() = axum::http::StatusCode::INTERNAL_SERVER_ERROR;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ),
    ] {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use tower::ServiceExt;

    async fn boom() -> &'static str {
        panic!("a bug in one handler")
    }

    /// A handler that panics answers 500 INTERNAL with the usual headers, and the same
    /// service answers the next request.
    #[tokio::test]
    async fn a_panicking_request_is_answered_500_and_the_service_serves_on() {
        let router = axum::Router::new()
            .route("/boom", get(boom))
            .route("/fine", get(|| async { "fine" }));
        let app = super::guarded(router, &Default::default());
        let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();

        let boom = app.clone().oneshot(get("/boom")).await.unwrap();
        assert_eq!(boom.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(boom.headers()["x-content-type-options"], "nosniff");
        let body = axum::body::to_bytes(boom.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["errors"][0]["extensions"]["code"], "INTERNAL");

        let fine = app.oneshot(get("/fine")).await.unwrap();
        assert_eq!(fine.status(), StatusCode::OK);
    }
}
