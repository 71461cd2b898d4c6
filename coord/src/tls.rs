//! TLS to ZooKeeper (`tcp+tls://` hosts): the crypto provider the client needs, and the
//! reason a session could not be opened when the reason is TLS (the client itself retries
//! every failure until the session timeout and then only says that it timed out).

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// rustls takes the process's crypto provider from its crate features, and this build
/// has two (ring, through reqwest; aws-lc-rs, through zookeeper-client): with none
/// installed, the ZooKeeper client's TLS set-up panics. Installs ring, unless a provider
/// is installed already.
pub(crate) fn install_crypto_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // An error means another provider was installed first: that one serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The `tcp+tls://` hosts of a connect string, as (host, port); ZooKeeper's port when
/// none is named.
pub(crate) fn tls_hosts(connect_string: &str) -> Vec<(String, u16)> {
    connect_string
        .split(',')
        .filter_map(|entry| entry.trim().strip_prefix("tcp+tls://"))
        .filter_map(|address| {
            let address = address.split('/').next().unwrap_or_default();
            let (host, port) = match address.strip_prefix('[') {
                // [::1]:2281
                Some(bracketed) => {
                    let (host, rest) = bracketed.split_once(']')?;
                    (host, rest.strip_prefix(':'))
                }
                None => match address.rsplit_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (address, None),
                },
            };
            let port = match port {
                Some(port) => port.parse().ok()?,
                None => 2181,
            };
            (!host.is_empty()).then(|| (host.to_owned(), port))
        })
        .collect()
}

/// Why `host:port` refuses a TLS session verified against `ca_pem`, when TLS is the
/// reason (its certificate is not trusted, or it does not answer in TLS); `None` when it
/// cannot be reached at all, or the handshake succeeds.
pub(crate) async fn refusal(host: &str, port: u16, ca_pem: &str) -> Option<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(
        CertificateDer::pem_slice_iter(ca_pem.as_bytes()).filter_map(Result::ok),
    );
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let handshake = async {
        let stream = tokio::net::TcpStream::connect((host, port)).await?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
    };
    let failed = match tokio::time::timeout(Duration::from_secs(5), handshake).await {
        Ok(Err(failed)) => failed,
        Ok(Ok(_)) | Err(_) => return None,
    };
    let tls = failed.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match tls {
        rustls::Error::InvalidCertificate(_) => format!(
            "ZooKeeper at {host}:{port} over TLS: {tls}; zookeeper_tls_ca must hold the CA \
             that signed the server's certificate, issued for the name or address in the \
             connect string"
        ),
        _ => format!(
            "ZooKeeper at {host}:{port}: the TLS handshake failed: {tls} (is it the server's \
             secureClientPort, and zookeeper_tls_ca the CA of its certificate?)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_hosts_of_a_connect_string() {
        let host = |h: &str, p| (h.to_owned(), p);
        assert_eq!(
            tls_hosts("tcp://zk1:2181,tcp+tls://zk2:2281,tcp+tls://[::1]:2282/cloudtask"),
            vec![host("zk2", 2281), host("::1", 2282)]
        );
        assert_eq!(
            tls_hosts("tcp+tls://zk3/chroot, tcp+tls://10.0.0.1:2281"),
            vec![host("zk3", 2181), host("10.0.0.1", 2281)]
        );
        assert!(tls_hosts("zk1:2181,zk2:2181/cloudtask").is_empty());
    }
}
