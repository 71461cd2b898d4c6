//! Which addresses an outbound request (a tenant's webhook) may reach. A tenant chooses the
//! URL, so without a rule the platform would POST wherever it is told: its own loopback
//! services, the cloud's metadata endpoint, the private network behind it (SSRF). Only
//! public unicast addresses are reachable, plus the networks an operator allows
//! (`webhook_allow_networks`). The rule is checked when a URL is set and again on every
//! address a name resolves to at connect time (the sender's resolver).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The operator's exceptions to "public addresses only".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundPolicy {
    allowed: Vec<IpNet>,
}

impl OutboundPolicy {
    /// Comma-separated networks (`10.1.0.0/16`) or single addresses (`127.0.0.1`).
    pub fn parse(list: &str) -> Result<Self, String> {
        Ok(OutboundPolicy {
            allowed: parse_networks(list)?,
        })
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allowed.iter().any(|net| net.contains(&ip))
    }

    /// The set-time check of a webhook URL: http or https, a host, and when the host is an
    /// address (or a name that can only mean this machine), one the policy permits. Names
    /// are checked again, resolved, by the sender.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let parsed =
            url::Url::parse(url).map_err(|_| "must be an http:// or https:// URL".to_owned())?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("must be an http:// or https:// URL".into());
        }
        let refused =
            || "must not point at a loopback, private, link-local or metadata address".to_owned();
        match parsed.host() {
            None => Err("must name a host".into()),
            Some(url::Host::Ipv4(ip)) if !self.permits(IpAddr::V4(ip)) => Err(refused()),
            Some(url::Host::Ipv6(ip)) if !self.permits(IpAddr::V6(ip)) => Err(refused()),
            Some(url::Host::Domain(name)) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                let local = name == "localhost" || name.ends_with(".localhost");
                if local && !self.permits(IpAddr::V4(Ipv4Addr::LOCALHOST)) {
                    return Err(refused());
                }
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }
}

/// Comma-separated networks (`10.1.0.0/16`) or single addresses (`127.0.0.1`), as the
/// configuration writes them.
pub fn parse_networks(list: &str) -> Result<Vec<IpNet>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{s:?} is not a network such as 10.1.0.0/16 or an address"))
        })
        .collect()
}

/// A public unicast address: not loopback, private, link-local (which holds the cloud
/// metadata address 169.254.169.254), shared (CGNAT), documentation, benchmarking,
/// multicast, reserved or unspecified; IPv6 forms that embed an IPv4 address are judged by
/// that address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || a == 0
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || (a == 100 && (b & 0xc0) == 64) // 100.64.0.0/10, shared address space
        || (a == 192 && b == 0 && c == 0) // 192.0.0.0/24, protocol assignments
        || (a == 198 && (b & 0xfe) == 18) // 198.18.0.0/15, benchmarking
        || a >= 240) // 240.0.0.0/4, reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = embedded_v4(ip) {
        return is_public_v4(v4);
    }
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // fc00::/7, unique local (fd00:ec2::254 is metadata)
        || (first & 0xffc0) == 0xfe80 // fe80::/10, link-local
        || (first & 0xffc0) == 0xfec0 // fec0::/10, old site-local
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
        || (first == 0x2001 && ip.segments()[1] == 0) // Teredo
        || (first == 0x0100 && ip.segments()[1..4] == [0, 0, 0])) // discard-only
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible, NAT64
/// (`64:ff9b::/96`) or 6to4 (`2002::/16`) address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(low),
        [0, 0, 0, 0, 0, 0, _, _] if !ip.is_loopback() && !ip.is_unspecified() => Some(low),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_public_unicast_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "198.18.0.1",
            "192.0.2.1",
            "192.0.0.8",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "2001:db8::1",
            "::127.0.0.1",
        ] {
            assert!(!is_public(ip(private)), "{private} is not public");
        }
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "172.32.0.1",
        ] {
            assert!(is_public(ip(public)), "{public} is public");
        }
    }

    #[test]
    fn an_operator_may_allow_networks() {
        let policy = OutboundPolicy::parse("10.1.0.0/16, 127.0.0.1").unwrap();
        assert!(policy.permits(ip("10.1.2.3")));
        assert!(!policy.permits(ip("10.2.0.1")));
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(!policy.permits(ip("127.0.0.2")));
        assert!(OutboundPolicy::parse("").unwrap() == OutboundPolicy::default());
        assert!(OutboundPolicy::parse("10.0.0.0/33").is_err());
        assert!(OutboundPolicy::parse("intranet").is_err());
    }

    #[test]
    fn urls_are_checked_by_scheme_and_literal_host() {
        let strict = OutboundPolicy::default();
        assert!(strict.check_url("https://hooks.example.com/x").is_ok());
        assert!(strict.check_url("http://93.184.216.34:8080/").is_ok());
        for bad in [
            "ftp://example.com/",
            "http://127.0.0.1:9000/",
            "http://[::1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://localhost:8080/",
            "http://api.localhost./",
            "http://[::ffff:10.0.0.1]/",
            "http://2130706433/", // 127.0.0.1 as one number
            "http://0x7f.1/",
            "not a url",
        ] {
            assert!(strict.check_url(bad).is_err(), "{bad} is refused");
        }
        let local = OutboundPolicy::parse("127.0.0.0/8").unwrap();
        assert!(local.check_url("http://127.0.0.1:9000/").is_ok());
        assert!(local.check_url("http://localhost:9000/").is_ok());
    }
}
