//! The HTTP client webhooks are sent with. A tenant chose the URL, so every address it
//! reaches is checked against the outbound policy (`cloudtask_core::net`) at connect
//! time: the resolver drops the addresses a name resolves to that the policy refuses (a
//! name that resolved to a public address when it was set may resolve to 127.0.0.1
//! now), an address written in the URL is checked before sending, redirects are not
//! followed and no proxy from the environment is used.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cloudtask_core::net::OutboundPolicy;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// A resolver that only hands out addresses the policy permits.
struct GuardedResolver {
    policy: Arc<OutboundPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|addr| policy.permits(addr.ip()))
                .collect();
            if permitted.is_empty() {
                return Err(format!(
                    "{host} resolves only to addresses webhooks may not reach ({})",
                    found
                        .iter()
                        .map(|a| a.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
                .into());
            }
            let addrs: Addrs = Box::new(permitted.into_iter());
            Ok(addrs)
        })
    }
}

/// Sends webhooks within the outbound policy.
#[derive(Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    policy: Arc<OutboundPolicy>,
}

impl WebhookClient {
    pub fn new(policy: OutboundPolicy, timeout: Duration) -> reqwest::Result<Self> {
        let policy = Arc::new(policy);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            .build()?;
        Ok(WebhookClient { http, policy })
    }

    /// A POST to `url`, refused before any connection when the URL is not one webhooks
    /// may reach (its scheme, or an address written in it); names are checked as they
    /// resolve.
    pub fn post(&self, url: &str) -> anyhow::Result<reqwest::RequestBuilder> {
        self.policy
            .check_url(url)
            .map_err(|why| anyhow::anyhow!("webhook URL refused: {why}"))?;
        Ok(self.http.post(url))
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    async fn resolve(policy: &str, name: &str) -> Result<Vec<SocketAddr>, String> {
        let resolver = GuardedResolver {
            policy: Arc::new(OutboundPolicy::parse(policy).unwrap()),
        };
        match resolver.resolve(Name::from_str(name).unwrap()).await {
            Ok(addrs) => Ok(addrs.collect()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[tokio::test]
    async fn names_that_resolve_inside_are_refused_at_connect_time() {
        let refused = resolve("", "localhost").await.unwrap_err();
        assert!(refused.contains("may not reach"), "{refused}");
        let allowed = resolve("127.0.0.0/8, ::1", "localhost").await.unwrap();
        assert!(allowed.iter().all(|a| a.ip().is_loopback()), "{allowed:?}");
    }
}
