//! The set-time check of a tenant's webhook URL (the sender checks every address again
//! at connect time): the URL's form and any address written in it, then the addresses
//! its name resolves to now. A name that does not resolve yet is accepted; the sender
//! refuses it later if it comes to resolve to an address webhooks may not reach.

use std::time::Duration;

use cloudtask_core::Error;
use cloudtask_core::net::OutboundPolicy;

/// How long the set-time resolution may take before the URL is accepted on its form.
const RESOLVE_PATIENCE: Duration = Duration::from_secs(2);

pub(crate) async fn check_webhook_url(policy: &OutboundPolicy, url: &str) -> Result<(), Error> {
    policy
        .check_url(url)
        .map_err(|why| Error::bad_input("webhookUrl", why))?;
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    let (Some(url::Host::Domain(name)), Some(port)) =
        (parsed.host(), parsed.port_or_known_default())
    else {
        return Ok(());
    };
    let lookup = tokio::net::lookup_host((name, port));
    if let Ok(Ok(addresses)) = tokio::time::timeout(RESOLVE_PATIENCE, lookup).await {
        for address in addresses {
            if !policy.permits(address.ip()) {
                return Err(Error::bad_input(
                    "webhookUrl",
                    format!(
                        "{name} resolves to {}, which webhooks may not reach",
                        address.ip()
                    ),
                ));
            }
        }
    }
    Ok(())
}
