//! A cutting TCP proxy: a deterministic connection loss between two real services.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// A TCP proxy in front of a server (ZooKeeper, the API) that can cut the connections going through it and
/// refuse new ones: a deterministic connection loss, and, held long enough, an expiry.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    state: Arc<std::sync::Mutex<ProxyState>>,
}

struct ProxyState {
    open: bool,
    connections: CancellationToken,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(std::sync::Mutex::new(ProxyState {
            open: true,
            connections: CancellationToken::new(),
        }));
        let upstream = upstream.to_owned();
        let accepting = state.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (open, cut) = {
                    let state = accepting.lock().expect("proxy state");
                    (state.open, state.connections.clone())
                };
                if !open {
                    continue; // dropped: the connection is refused
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Proxy { addr, state }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        let mut state = self.state.lock().expect("proxy state");
        state.open = false;
        state.connections.cancel();
        state.connections = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.state.lock().expect("proxy state").open = true;
    }
}
