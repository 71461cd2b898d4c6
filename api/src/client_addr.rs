//! The client's address, as the login limiter and the audit see it: the TCP peer, or when
//! the peer is a proxy the operator trusts (`trusted_proxies`), the right-most address in
//! `X-Forwarded-For` that is not itself a trusted proxy. Entries left of that one were
//! written by the client and prove nothing; a header from an untrusted peer is ignored.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The caller's address, resolved once per request (by `serve`) for every handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// The configuration's comma-separated networks and addresses.
    pub fn parse(list: &str) -> Result<Self, String> {
        cloudtask_core::net::parse_networks(list).map(TrustedProxies)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    pub fn client_addr(&self, peer: IpAddr, headers: &HeaderMap) -> ClientAddr {
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            // A value that is not text is a hop that cannot be read, like any other.
            .flat_map(|value| value.to_str().unwrap_or("?").split(','))
            .collect();
        ClientAddr(select_client(peer, &hops, |ip| self.trusts(ip)))
    }
}

/// Walks from the peer leftwards through the forwarded hops while they are trusted
/// proxies; the first untrusted one is the client. A hop that cannot be read stops the
/// walk at the last trusted one, so a client cannot pick its own address.
fn select_client(peer: IpAddr, hops: &[&str], trusted: impl Fn(IpAddr) -> bool) -> IpAddr {
    let mut client = peer.to_canonical();
    if !trusted(client) {
        return client;
    }
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            return client;
        };
        client = ip;
        if !trusted(ip) {
            return ip;
        }
    }
    client
}

/// `203.0.113.7`, `2001:db8::1`, `[2001:db8::1]`, or either with a port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse().ok())
        })
        .map(|ip: IpAddr| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxies() -> TrustedProxies {
        TrustedProxies::parse("10.0.0.0/8, 192.0.2.1").unwrap()
    }

    fn client(peer: &str, forwarded: &[&str]) -> IpAddr {
        let mut headers = HeaderMap::new();
        for value in forwarded {
            headers.append("x-forwarded-for", value.parse().unwrap());
        }
        proxies().client_addr(ip(peer), &headers).0
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        assert_eq!(client("203.0.113.9", &["198.51.100.1"]), ip("203.0.113.9"));
        assert_eq!(client("203.0.113.9", &[]), ip("203.0.113.9"));
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_hop_is_the_client() {
        assert_eq!(client("10.1.2.3", &["198.51.100.1"]), ip("198.51.100.1"));
        // The left-most entries are the client's own words.
        assert_eq!(
            client("10.1.2.3", &["1.1.1.1, 198.51.100.1, 10.9.9.9"]),
            ip("198.51.100.1")
        );
        // Several headers read as one list, in order.
        assert_eq!(
            client("192.0.2.1", &["1.1.1.1", "198.51.100.1:4711, 10.2.2.2"]),
            ip("198.51.100.1")
        );
        assert_eq!(
            client("10.1.2.3", &["[2001:db8::7]:443"]),
            ip("2001:db8::7")
        );
        assert_eq!(
            client("10.1.2.3", &["::ffff:198.51.100.4"]),
            ip("198.51.100.4")
        );
    }

    #[test]
    fn without_a_readable_untrusted_hop_the_nearest_proxy_is_the_client() {
        assert_eq!(client("10.1.2.3", &[]), ip("10.1.2.3"));
        assert_eq!(client("10.1.2.3", &["10.4.4.4"]), ip("10.4.4.4"));
        assert_eq!(
            client("10.1.2.3", &["198.51.100.1, garbage, 10.4.4.4"]),
            ip("10.4.4.4")
        );
        assert_eq!(client("10.1.2.3", &["unknown"]), ip("10.1.2.3"));
    }

    #[test]
    fn a_mapped_peer_is_judged_as_ipv4() {
        assert_eq!(
            client("::ffff:10.1.2.3", &["198.51.100.1"]),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn nothing_is_trusted_by_default() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "198.51.100.1".parse().unwrap());
        let none = TrustedProxies::parse("").unwrap();
        assert_eq!(none.client_addr(ip("10.1.2.3"), &headers).0, ip("10.1.2.3"));
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
    }
}
