//! Who may read which register, pure.
//!
//! - A request carrying a member's key (as `Authorization: Bearer`, or in
//!   the cookie the page's form sets) sees its own StintQuota's register and
//!   nothing else, whatever the other registers' visibility: a member never
//!   sees another tenant's register through their key.
//! - A request without a key sees `public` registers, and `cluster` ones
//!   when its source address lies in the gateway's cluster networks
//!   (`--register-cluster-cidrs`: loopback by default; add the Pod and
//!   Service CIDRs). The address is the TCP peer's: `X-Forwarded-For` is
//!   never trusted, because any client can write it.
//! - A `members` register answers 401 without a key.

use std::net::IpAddr;

use axum::http::{HeaderMap, header};
use ipnet::IpNet;

use super::super::keys::Owner;
use crate::resources::stint_quota::RegisterVisibility;

/// The cookie the sign-in form sets: the member's key, percent-encoded,
/// `HttpOnly` and `SameSite=Strict`.
pub const COOKIE: &str = "copyhold_register_key";

/// Who is asking.
#[derive(Clone, Debug, PartialEq)]
pub enum Viewer {
    /// A member, by their key.
    Member(Owner),
    /// No key; whether the source address is inside the cluster.
    Anonymous { in_cluster: bool },
}

/// What a viewer may do with one register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Shown,
    /// Only with a member's key (401).
    NeedsKey,
    /// Not for this viewer (403, or 404 for another tenant's register).
    Refused,
}

/// May `viewer` read the register `namespace/name` of `visibility`?
pub fn access(
    viewer: &Viewer,
    namespace: &str,
    name: &str,
    visibility: RegisterVisibility,
) -> Access {
    match viewer {
        Viewer::Member(o) if o.namespace == namespace && o.quota == name => Access::Shown,
        Viewer::Member(_) => Access::Refused,
        Viewer::Anonymous { in_cluster } => match visibility {
            RegisterVisibility::Public => Access::Shown,
            RegisterVisibility::Cluster if *in_cluster => Access::Shown,
            RegisterVisibility::Cluster => Access::Refused,
            RegisterVisibility::Members => Access::NeedsKey,
        },
    }
}

/// Why `--register-cluster-cidrs` was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0:?} is not a CIDR such as 10.0.0.0/8 or fd00::/8: {1}")]
pub struct CidrError(String, String);

/// The networks whose clients count as inside the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterNets(Vec<IpNet>);

impl Default for ClusterNets {
    /// Loopback only: the gateway's own node (and `kubectl port-forward`).
    fn default() -> Self {
        ClusterNets::parse("127.0.0.0/8,::1/128").unwrap_or(ClusterNets(Vec::new()))
    }
}

impl ClusterNets {
    /// Comma-separated CIDRs; an empty string is no network at all.
    pub fn parse(s: &str) -> Result<ClusterNets, CidrError> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<IpNet>()
                    .map_err(|e| CidrError(p.to_string(), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(ClusterNets)
    }

    /// Whether `ip` (an IPv4 address mapped into IPv6 counts as IPv4) is in
    /// one of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// The key a request presents: Bearer first, then the cookie.
pub fn presented_key(headers: &HeaderMap) -> Option<Vec<u8>> {
    if let Some(k) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    {
        return Some(k.to_vec());
    }
    cookie_key(headers)
}

/// The key in the register cookie, if any.
pub fn cookie_key(headers: &HeaderMap) -> Option<Vec<u8>> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, v)| percent_encoding::percent_decode_str(v).collect::<Vec<u8>>())
        .filter(|k| !k.is_empty())
}

/// `Set-Cookie` for a key the form posted. `secure` when the client came
/// over HTTPS (a TLS-terminating proxy says so in `X-Forwarded-Proto`).
pub fn set_cookie(key: &str, secure: bool) -> String {
    let v = percent_encoding::utf8_percent_encode(key, percent_encoding::NON_ALPHANUMERIC);
    format!(
        "{COOKIE}={v}; Path=/; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// `Set-Cookie` that removes the key.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::common::Priority;

    fn owner(ns: &str, quota: &str) -> Viewer {
        Viewer::Member(Owner {
            namespace: ns.into(),
            quota: quota.into(),
            member: "ana".into(),
            priority: Priority::Standard,
        })
    }

    #[test]
    fn a_members_key_opens_its_own_register_and_no_other() {
        use RegisterVisibility::*;
        let ana = owner("town", "commons");
        for v in [Members, Public, Cluster] {
            assert_eq!(access(&ana, "town", "commons", v), Access::Shown);
            assert_eq!(access(&ana, "village", "commons", v), Access::Refused);
            assert_eq!(access(&ana, "town", "other", v), Access::Refused);
        }
    }

    #[test]
    fn without_a_key_visibility_decides() {
        use RegisterVisibility::*;
        let outside = Viewer::Anonymous { in_cluster: false };
        let inside = Viewer::Anonymous { in_cluster: true };
        assert_eq!(access(&outside, "t", "q", Members), Access::NeedsKey);
        assert_eq!(access(&inside, "t", "q", Members), Access::NeedsKey);
        assert_eq!(access(&outside, "t", "q", Public), Access::Shown);
        assert_eq!(access(&outside, "t", "q", Cluster), Access::Refused);
        assert_eq!(access(&inside, "t", "q", Cluster), Access::Shown);
    }

    #[test]
    fn cluster_networks_are_cidrs_and_mapped_addresses_count_as_ipv4() {
        let d = ClusterNets::default();
        assert!(d.contains("127.0.0.1".parse().unwrap()));
        assert!(d.contains("::1".parse().unwrap()));
        assert!(d.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!d.contains("10.1.2.3".parse().unwrap()));
        let n = ClusterNets::parse("10.244.0.0/16, 10.96.0.0/12,fd00::/8").unwrap();
        assert!(n.contains("10.244.3.4".parse().unwrap()));
        assert!(n.contains("::ffff:10.96.0.1".parse().unwrap()));
        assert!(n.contains("fd00::1".parse().unwrap()));
        assert!(!n.contains("127.0.0.1".parse().unwrap()));
        assert!(
            !ClusterNets::parse("")
                .unwrap()
                .contains("127.0.0.1".parse().unwrap())
        );
        assert!(ClusterNets::parse("10.0.0.0").is_err());
    }

    #[test]
    fn the_key_comes_from_bearer_or_the_cookie_and_survives_encoding() {
        let key = "sk-a;b =c%";
        let set = set_cookie(key, false);
        assert!(set.contains("HttpOnly; SameSite=Strict") && !set.contains("Secure"));
        assert!(set_cookie(key, true).ends_with("; Secure"));
        let pair = set.split(';').next().unwrap().to_string();
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("other=1; {pair}; x=y").parse().unwrap(),
        );
        assert_eq!(presented_key(&h), Some(key.as_bytes().to_vec()));
        h.insert(header::AUTHORIZATION, "Bearer sk-b".parse().unwrap());
        assert_eq!(presented_key(&h), Some(b"sk-b".to_vec()));
        let mut empty = HeaderMap::new();
        empty.insert(header::COOKIE, format!("{COOKIE}=").parse().unwrap());
        assert_eq!(presented_key(&empty), None);
    }
}
