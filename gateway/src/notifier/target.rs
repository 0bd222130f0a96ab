//! Where webhooks may go (the SSRF guard): a `notify_url` must be http(s)
//! and reach a public address. Loopback, private, link-local, unspecified,
//! multicast/reserved and cloud metadata addresses are refused unless
//! `notifier.allow_private_targets` is set (tests, development).
//!
//! The check sits where the address is chosen, not only in front of it: the
//! HTTP client resolves names through [`GuardedResolver`], which hands the
//! connector only the addresses it has checked. A name that resolves to a
//! public address when checked and to 127.0.0.1 a moment later (DNS
//! rebinding) can therefore never be connected to at the second address.
//! IP-literal hosts never reach a resolver, so [`check_url`] classifies them
//! before the request is made. Redirects are not followed and proxies not
//! used (see `Notifier::new`), so nothing else picks an address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

/// A delivery target was refused. The text is what `last_error` shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused target: {0}")]
pub struct RefusedTarget(pub String);

/// Why `ip` is not a public unicast address, or None when it is.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) {
        Some("metadata")
    } else if o[0] == 0 {
        // 0.0.0.0/8: "this network"; connecting to 0.0.0.0 reaches the host
        // itself on Linux.
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        // 100.64.0.0/10, carrier-grade NAT: internal to a provider.
        Some("shared (CGNAT)")
    } else if o[..3] == [192, 0, 0] {
        // 192.0.0.0/24, IETF protocol assignments: DS-Lite and NAT64
        // gateways (192.0.0.0/29, 192.0.0.170/171) sit here.
        Some("IETF protocol assignment")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        // 198.18.0.0/15, benchmarking: used inside data centres and labs.
        Some("benchmarking")
    } else if ip.is_multicast() || o[0] >= 240 {
        // Multicast, 240/4 reserved, and the broadcast address.
        Some("multicast or reserved")
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    // ::ffff:a.b.c.d reaches the IPv4 address itself.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    if ip == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254) {
        Some("metadata")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("private (unique local)")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if (s[0] & 0xffc0) == 0xfec0 {
        Some("private (site-local)")
    } else if (s[0] & 0xff00) == 0xff00 {
        Some("multicast or reserved")
    } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        // 64:ff9b:1::/48, NAT64 for local use (RFC 8215): its translator is
        // the operator's own, and where the IPv4 address sits in it depends
        // on a prefix length we cannot know, so none of it is allowed.
        Some("NAT64 (local use)")
    } else if s[..6] == [0; 6]
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4])
        || (s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0)
    {
        // IPv4-compatible ::a.b.c.d (deprecated), NAT64 64:ff9b::a.b.c.d
        // and IPv4-translated ::ffff:0:a.b.c.d (SIIT) carry an IPv4 address
        // that a translator would connect to. (IPv4-mapped ::ffff:a.b.c.d
        // is judged above.)
        let v4 = Ipv4Addr::new(
            (s[6] >> 8) as u8,
            (s[6] & 0xff) as u8,
            (s[7] >> 8) as u8,
            (s[7] & 0xff) as u8,
        );
        forbidden_v4(v4)
    } else {
        None
    }
}

/// Parse `url` and check what can be checked without DNS: the scheme, a
/// host, and an IP-literal host's address.
pub fn check_url(url: &str, allow_private: bool) -> Result<Url, RefusedTarget> {
    let parsed = Url::parse(url).map_err(|e| RefusedTarget(format!("invalid notify_url: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(RefusedTarget(format!(
            "scheme {:?} is not http or https",
            parsed.scheme()
        )));
    }
    let ip = match parsed.host() {
        None => return Err(RefusedTarget("notify_url has no host".into())),
        Some(url::Host::Domain(_)) => None,
        Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
    };
    if let (Some(ip), false) = (ip, allow_private) {
        if let Some(why) = forbidden(ip) {
            return Err(RefusedTarget(format!("{ip} is a {why} address")));
        }
    }
    Ok(parsed)
}

/// The HTTP client's resolver: system DNS (tokio's `lookup_host`), then only
/// the addresses that pass [`forbidden`]; none left is a [`RefusedTarget`].
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: the connector puts the URL's port in.
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let (ok, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = found
                .into_iter()
                .partition(|a| allow_private || forbidden(a.ip()).is_none());
            if ok.is_empty() {
                let shown: Vec<String> = refused
                    .iter()
                    .map(|a| match forbidden(a.ip()) {
                        Some(why) => format!("{} ({why})", a.ip()),
                        None => a.ip().to_string(),
                    })
                    .collect();
                let why = if shown.is_empty() {
                    format!("{host} resolves to no address")
                } else {
                    format!("{host} resolves only to {}", shown.join(", "))
                };
                return Err(
                    Box::new(RefusedTarget(why)) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            let addrs: Addrs = Box::new(ok.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn why(s: &str) -> Option<&'static str> {
        forbidden(IpAddr::from_str(s).unwrap())
    }

    #[test]
    fn ipv4_classes() {
        for (ip, want) in [
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("10.0.0.1", "private"),
            ("10.255.255.255", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.0.1", "link-local"),
            ("169.254.169.254", "metadata"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("100.127.255.255", "shared (CGNAT)"),
            ("224.0.0.1", "multicast or reserved"),
            ("240.0.0.1", "multicast or reserved"),
            ("255.255.255.255", "multicast or reserved"),
        ] {
            assert_eq!(why(ip), Some(want), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.1.1",
            "169.253.0.1",
            "100.63.255.255",
            "100.128.0.0",
            "11.0.0.1",
            "223.255.255.255",
        ] {
            assert_eq!(why(ip), None, "{ip}");
        }
    }

    #[test]
    fn ipv6_classes() {
        for (ip, want) in [
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fc00::1", "private (unique local)"),
            ("fdff:ffff::1", "private (unique local)"),
            ("fd00:ec2::254", "metadata"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "private (site-local)"),
            ("ff02::1", "multicast or reserved"),
        ] {
            assert_eq!(why(ip), Some(want), "{ip}");
        }
        for ip in [
            "2001:4860:4860::8888",
            "2606:4700::1111",
            "fbff::1",
            "2002:808:808::1",
        ] {
            assert_eq!(why(ip), None, "{ip}");
        }
    }

    #[test]
    fn ipv4_inside_ipv6_is_judged_as_ipv4() {
        for (ip, want) in [
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:10.1.2.3", Some("private")),
            ("::ffff:169.254.169.254", Some("metadata")),
            ("::ffff:192.168.0.1", Some("private")),
            ("::ffff:8.8.8.8", None),
            // IPv4-compatible (deprecated) and NAT64 forms.
            ("::127.0.0.1", Some("loopback")),
            ("::10.0.0.1", Some("private")),
            ("64:ff9b::169.254.169.254", Some("metadata")),
            ("64:ff9b::7f00:1", Some("loopback")),
            ("64:ff9b::8.8.8.8", None),
            // IPv4-mapped, the whole ::ffff:0:0/96, and IPv4-translated.
            ("::ffff:0.0.0.0", Some("unspecified")),
            ("::ffff:192.0.0.8", Some("IETF protocol assignment")),
            ("::ffff:198.18.0.1", Some("benchmarking")),
            ("::ffff:0:127.0.0.1", Some("loopback")),
            ("::ffff:0:10.0.0.1", Some("private")),
            ("::ffff:0:169.254.169.254", Some("metadata")),
            ("::ffff:0:8.8.8.8", None),
        ] {
            assert_eq!(why(ip), want, "{ip}");
        }
    }

    #[test]
    fn special_purpose_ranges_are_refused() {
        for (ip, want) in [
            ("192.0.0.0", "IETF protocol assignment"),
            ("192.0.0.8", "IETF protocol assignment"),
            ("192.0.0.170", "IETF protocol assignment"),
            ("192.0.0.255", "IETF protocol assignment"),
            ("198.18.0.0", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("64:ff9b:1::", "NAT64 (local use)"),
            ("64:ff9b:1::a00:1", "NAT64 (local use)"),
            ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", "NAT64 (local use)"),
        ] {
            assert_eq!(why(ip), Some(want), "{ip}");
        }
        // Their neighbours are public.
        for ip in [
            "191.255.255.255",
            "192.0.1.0",
            "198.17.255.255",
            "198.20.0.0",
            "64:ff9b:2::1",
            "64:ff9a:1::1",
        ] {
            assert_eq!(why(ip), None, "{ip}");
        }
        for url in [
            "http://192.0.0.8/",
            "http://198.18.0.1/",
            "http://[64:ff9b:1::1]/",
        ] {
            assert!(check_url(url, false).is_err(), "{url}");
        }
    }

    #[test]
    fn urls_are_checked_before_any_lookup() {
        for (url, fragment) in [
            ("ftp://hooks.example/", "scheme"),
            ("not a url", "invalid notify_url"),
            ("http://127.0.0.1:8080/hook", "loopback"),
            ("http://[::1]/hook", "loopback"),
            ("http://[::ffff:10.0.0.1]/", "private"),
            ("http://169.254.169.254/latest/meta-data", "metadata"),
            // WHATWG URL parsing turns these spellings into 127.0.0.1.
            ("http://2130706433/", "loopback"),
            ("http://0x7f.1/", "loopback"),
            ("http://0/", "unspecified"),
        ] {
            let err = check_url(url, false).unwrap_err();
            assert!(err.0.contains(fragment), "{url}: {err}");
            assert!(err.to_string().starts_with("refused target: "), "{err}");
        }
        assert!(check_url("https://hooks.example/n?x=1", false).is_ok());
        assert!(check_url("http://93.184.216.34/", false).is_ok());
        // Names are left to the resolver.
        assert!(check_url("http://localhost/", false).is_ok());
        assert!(check_url("http://127.0.0.1:8080/hook", true).is_ok());
        assert!(check_url("ftp://127.0.0.1/", true).is_err());
    }

    #[tokio::test]
    async fn the_resolver_drops_forbidden_addresses() {
        let guarded = GuardedResolver {
            allow_private: false,
        };
        let err = match guarded.resolve(Name::from_str("localhost").unwrap()).await {
            Ok(addrs) => panic!("localhost allowed: {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e,
        };
        let refused = err
            .downcast_ref::<RefusedTarget>()
            .expect("a RefusedTarget");
        assert!(
            refused.0.contains("localhost resolves only to"),
            "{refused}"
        );
        assert!(refused.0.contains("loopback"), "{refused}");

        let open = GuardedResolver {
            allow_private: true,
        };
        let addrs: Vec<SocketAddr> = open
            .resolve(Name::from_str("localhost").unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
