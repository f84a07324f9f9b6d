//! An API key's usage policy — allowed CIDR ranges, rate limit, quota, expiry — made only by
//! parsing, so a held [`KeyPolicy`] is always valid. Scopes stay in `SecretRecord::scopes`.

use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::model::names::excerpt;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Most CIDR ranges on one key.
pub const MAX_CIDRS: usize = 64;
/// Largest `requests` and `burst` of a rate limit.
pub const MAX_RATE: u32 = 1_000_000;
/// Longest rate-limit period: one day.
pub const MAX_RATE_PERIOD_MS: u64 = 24 * 3600 * 1000;
/// Largest quota.
pub const MAX_QUOTA: u64 = 1_000_000_000_000;
/// Shortest quota refill period: one second.
pub const MIN_REFILL_MS: u64 = 1000;
/// Longest quota refill period: 366 days.
pub const MAX_REFILL_MS: u64 = 366 * 24 * 3600 * 1000;

/// An IP range: a network address and a prefix length. Host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address (a single host). Host bits set below the
    /// prefix are refused: `10.1.2.3/8` is almost always a typo for something else.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Err(Error::invalid(format!(
                "invalid CIDR {}: {why}",
                excerpt(s)
            )))
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let Ok(addr) = addr.parse::<IpAddr>() else {
            return bad("not an IPv4 or IPv6 address");
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                match p.parse::<u8>() {
                    Ok(n) if n <= max => n,
                    _ => return bad(&format!("prefix length must be 0 to {max}")),
                }
            }
            Some(_) => return bad("prefix length is not a number"),
        };
        let cidr = Self { addr, prefix };
        if cidr.network() != addr {
            return bad(&format!(
                "host bits are set (the network is {}/{prefix})",
                cidr.network()
            ));
        }
        Ok(cidr.canonical())
    }

    /// An IPv4-mapped IPv6 range (`::ffff:10.0.0.0/104`) as the IPv4 range it names
    /// (`10.0.0.0/8`). Client addresses are matched in canonical form (see [`Cidr::contains`]),
    /// so a range kept in the mapped form would never match anyone. Any mapped network with a
    /// prefix below 96 has host bits set and is refused before this.
    fn canonical(self) -> Self {
        match self.addr {
            IpAddr::V6(v6) if self.prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => Self {
                    addr: IpAddr::V4(v4),
                    prefix: self.prefix - 96,
                },
                None => self,
            },
            _ => self,
        }
    }

    /// Whether `ip` lies in the range. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is
    /// matched as the IPv4 address it carries, so a dual-stack listener cannot slip past an
    /// IPv4 rule.
    pub fn contains(&self, ip: IpAddr) -> bool {
        // Ranges stored before parsing made them canonical are matched canonically too.
        let Self { addr, prefix } = self.canonical();
        match (addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask_v4(u32::from(ip), prefix) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => mask_v6(u128::from(ip), prefix) == u128::from(net),
            _ => false,
        }
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(mask_v4(u32::from(a), self.prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(mask_v6(u128::from(a), self.prefix))),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask_v4(a: u32, prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(prefix)))
    }
}

fn mask_v6(a: u128, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(prefix)))
    }
}

/// `ip` with an IPv4-mapped IPv6 address turned into the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Parses a client IP as a verifier sends it: an IPv4 or IPv6 address (brackets and a zone are
/// not accepted). Empty means "not given".
pub fn parse_client_ip(s: &str) -> Result<Option<IpAddr>> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<IpAddr>()
        .map(|ip| Some(canonical(ip)))
        .map_err(|_| {
            Error::invalid(format!(
                "invalid client_ip {}: not an IP address",
                excerpt(s)
            ))
        })
}

/// A GCRA rate limit: `requests` per `period_ms` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Requests per period.
    pub requests: u32,
    /// The period, in milliseconds.
    pub period_ms: u64,
    /// Requests admitted back to back.
    pub burst: u32,
}

impl RateLimit {
    /// Checks the bounds; `burst` 0 means `requests`.
    pub fn parse(requests: u32, period_ms: u64, burst: u32) -> Result<Self> {
        if requests == 0 || requests > MAX_RATE {
            return Err(Error::invalid(format!(
                "rate_limit.requests must be 1 to {MAX_RATE}"
            )));
        }
        if period_ms == 0 || period_ms > MAX_RATE_PERIOD_MS {
            return Err(Error::invalid(
                "rate_limit.period must be 1 ms to 1 day".to_string(),
            ));
        }
        if burst > MAX_RATE {
            return Err(Error::invalid(format!(
                "rate_limit.burst must be at most {MAX_RATE}"
            )));
        }
        let burst = if burst == 0 { requests } else { burst };
        Ok(Self {
            requests,
            period_ms,
            burst,
        })
    }

    /// One replica's share when `replicas` serve the key: the same requests over `replicas`
    /// times the period, and the burst divided (rounded up, at least 1). Across replicas the
    /// sum admits at most the rate plus `replicas - 1` requests of rounding in the burst.
    pub fn shared_by(self, replicas: usize) -> Self {
        let n = u32::try_from(replicas.max(1)).unwrap_or(u32::MAX);
        if n == 1 {
            return self;
        }
        Self {
            requests: self.requests,
            period_ms: self.period_ms.saturating_mul(u64::from(n)),
            burst: self.burst.div_ceil(n).max(1),
        }
    }
}

/// A quota: a starting balance, optionally refilled (replaced) every period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Starting balance.
    pub limit: u64,
    /// Balance after each refill.
    pub refill: u64,
    /// Refill period in milliseconds, if the quota refills.
    pub refill_period_ms: Option<u64>,
    /// When the quota was set; refill periods count from here.
    pub set_ms: Millis,
    /// Increases every time the quota is set, so the ledger knows to start afresh.
    pub epoch: u64,
}

impl Quota {
    /// Checks the bounds: a refill needs a period; `refill` 0 means `limit`.
    pub fn parse(
        limit: u64,
        refill: u64,
        refill_period_ms: Option<u64>,
        set_ms: Millis,
        epoch: u64,
    ) -> Result<Self> {
        if limit == 0 || limit > MAX_QUOTA {
            return Err(Error::invalid(format!(
                "quota.limit must be 1 to {MAX_QUOTA}"
            )));
        }
        if refill > MAX_QUOTA {
            return Err(Error::invalid(format!(
                "quota.refill must be at most {MAX_QUOTA}"
            )));
        }
        match refill_period_ms {
            None if refill != 0 => {
                return Err(Error::invalid(
                    "quota.refill needs a quota.refill_period".to_string(),
                ))
            }
            Some(p) if !(MIN_REFILL_MS..=MAX_REFILL_MS).contains(&p) => {
                return Err(Error::invalid(
                    "quota.refill_period must be 1 s to 366 days".to_string(),
                ))
            }
            _ => {}
        }
        Ok(Self {
            limit,
            refill: if refill == 0 { limit } else { refill },
            refill_period_ms,
            set_ms,
            epoch,
        })
    }
}

/// An API key's policy (scopes live in the record itself).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPolicy {
    /// Client IPs must fall in one of these; empty: any.
    pub allowed_cidrs: Vec<Cidr>,
    /// Rate limit of verifications.
    pub rate_limit: Option<RateLimit>,
    /// Usage quota.
    pub quota: Option<Quota>,
    /// The highest quota epoch ever given out for this key, kept when the quota is cleared.
    /// Epochs must never repeat: a quota set again after being cleared once got `0 + 1`, the
    /// epoch of the first quota, and so picked up that quota's spent ledger.
    pub quota_epoch: u64,
}

impl KeyPolicy {
    /// Whether a verification from `ip` passes the CIDR check (no ranges: any client, even
    /// one that sent no IP).
    pub fn admits_ip(&self, ip: Option<IpAddr>) -> bool {
        self.allowed_cidrs.is_empty()
            || ip.is_some_and(|ip| self.allowed_cidrs.iter().any(|c| c.contains(ip)))
    }

    /// Replaces the quota (`None` clears it). A new quota gets an epoch above every epoch this
    /// key has used, so its ledger starts at the new limit.
    pub fn set_quota(&mut self, quota: Option<(u64, u64, Option<u64>)>, now: Millis) -> Result<()> {
        // Records written before `quota_epoch` existed have only the live quota's epoch.
        let used = self.quota.map_or(0, |q| q.epoch).max(self.quota_epoch);
        let epoch = used.saturating_add(1);
        self.quota = quota
            .map(|(limit, refill, period)| Quota::parse(limit, refill, period, now, epoch))
            .transpose()?;
        self.quota_epoch = if self.quota.is_some() { epoch } else { used };
        Ok(())
    }
}

/// A key policy as received, before parsing (times already converted to milliseconds).
#[derive(Debug, Clone, Default)]
pub struct KeyPolicyInput {
    /// Allowed CIDRs, unparsed.
    pub allowed_cidrs: Vec<String>,
    /// (requests, period in ms, burst).
    pub rate_limit: Option<(u32, u64, u32)>,
    /// (limit, refill, refill period in ms).
    pub quota: Option<(u64, u64, Option<u64>)>,
    /// Expiry, in ms since the epoch.
    pub expire_ms: Option<Millis>,
}

/// Which policy fields an update replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyMask {
    /// Replace the scopes.
    pub scopes: bool,
    /// Replace the allowed CIDRs.
    pub allowed_cidrs: bool,
    /// Replace the rate limit.
    pub rate_limit: bool,
    /// Replace (and restart) the quota.
    pub quota: bool,
    /// Replace the expiry.
    pub expire_time: bool,
    /// Replace the scheduled rotation period (only when named: not part of [`PolicyMask::ALL`]).
    pub rotation_period: bool,
    /// Replace the default grace period (only when named: not part of [`PolicyMask::ALL`]).
    pub default_grace_period: bool,
}

impl PolicyMask {
    /// Every usage field (what an empty mask means). The schedule fields are left out: a caller
    /// that predates them sends an empty mask and must not clear a key's scheduled rotation.
    pub const ALL: Self = Self {
        scopes: true,
        allowed_cidrs: true,
        rate_limit: true,
        quota: true,
        expire_time: true,
        rotation_period: false,
        default_grace_period: false,
    };

    /// Parses field-mask paths (snake_case or lowerCamelCase); empty means every usage field.
    pub fn parse(paths: &[String]) -> Result<Self> {
        if paths.is_empty() {
            return Ok(Self::ALL);
        }
        let mut m = Self::default();
        for p in paths {
            match p.as_str() {
                "scopes" => m.scopes = true,
                "allowed_cidrs" | "allowedCidrs" => m.allowed_cidrs = true,
                "rate_limit" | "rateLimit" => m.rate_limit = true,
                "quota" => m.quota = true,
                "expire_time" | "expireTime" => m.expire_time = true,
                "rotation_period" | "rotationPeriod" => m.rotation_period = true,
                "default_grace_period" | "defaultGracePeriod" => m.default_grace_period = true,
                other => {
                    return Err(Error::invalid(format!(
                        "unknown update_mask path {} (expected scopes, allowed_cidrs, \
                         rate_limit, quota, expire_time, rotation_period, default_grace_period)",
                        excerpt(other)
                    )))
                }
            }
        }
        Ok(m)
    }
}

/// Whether a key granting `granted` has every scope in `required`.
pub fn grants_scopes(granted: &[String], required: &[String]) -> bool {
    required.iter().all(|s| granted.contains(s))
}

/// Parses CIDR strings, refusing duplicates and more than [`MAX_CIDRS`].
pub fn parse_cidrs(cidrs: &[String]) -> Result<Vec<Cidr>> {
    if cidrs.len() > MAX_CIDRS {
        return Err(Error::invalid(format!(
            "more than {MAX_CIDRS} allowed_cidrs"
        )));
    }
    let mut out: Vec<Cidr> = Vec::with_capacity(cidrs.len());
    for c in cidrs {
        let parsed = Cidr::parse(c)?;
        if out.contains(&parsed) {
            return Err(Error::invalid(format!("CIDR {c:?} given twice")));
        }
        out.push(parsed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_rate_shared_by_replicas_sums_to_the_rate() {
        let r = RateLimit::parse(100, 1_000, 10).unwrap();
        assert_eq!(r.shared_by(1), r);
        assert_eq!(r.shared_by(0), r);
        let third = r.shared_by(3);
        assert_eq!(
            (third.requests, third.period_ms, third.burst),
            (100, 3_000, 4)
        );
        // One request a minute over five replicas: each admits one per five minutes.
        let slow = RateLimit::parse(1, 60_000, 0).unwrap().shared_by(5);
        assert_eq!((slow.requests, slow.period_ms, slow.burst), (1, 300_000, 1));
    }

    #[test]
    fn quota_epochs_never_repeat_even_across_a_cleared_quota() {
        let mut p = KeyPolicy::default();
        let mut seen = Vec::new();
        for (step, q) in [Some((3, 0, None)), None, Some((3, 0, None)), None, None]
            .into_iter()
            .enumerate()
        {
            p.set_quota(q, step as u64).unwrap();
            if let Some(q) = p.quota {
                assert!(!seen.contains(&q.epoch), "epoch {} reused", q.epoch);
                seen.push(q.epoch);
            }
        }
        p.set_quota(Some((5, 0, None)), 9).unwrap();
        assert_eq!(p.quota.map(|q| q.epoch), Some(3));
        // A record from before `quota_epoch` existed: the live quota's epoch is the floor.
        let mut old = KeyPolicy {
            quota: Quota::parse(1, 0, None, 0, 7).ok(),
            ..Default::default()
        };
        old.set_quota(None, 1).unwrap();
        old.set_quota(Some((1, 0, None)), 2).unwrap();
        assert_eq!(old.quota.map(|q| q.epoch), Some(8));
        // A refused quota changes nothing.
        assert!(old.set_quota(Some((0, 0, None)), 3).is_err());
        assert_eq!(old.quota_epoch, 8);
    }

    #[test]
    fn cidr_matching_v4_and_v6() {
        let net = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(net.contains(ip("10.255.1.2")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(net.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped IPv6");
        assert!(!net.contains(ip("2001:db8::1")));
        let host = Cidr::parse("192.168.1.7").unwrap();
        assert_eq!(host.to_string(), "192.168.1.7/32");
        assert!(host.contains(ip("192.168.1.7")));
        assert!(!host.contains(ip("192.168.1.8")));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("::1")));
        let odd = Cidr::parse("172.16.0.0/12").unwrap();
        assert!(odd.contains(ip("172.31.255.255")));
        assert!(!odd.contains(ip("172.32.0.0")));
    }

    #[test]
    fn ipv4_mapped_ranges_match_the_ipv4_clients_they_name() {
        // Found by the fuzz target `policy`: `::ffff:10.1.2.3` parsed as an IPv6 host that no
        // client could ever match (clients are compared as IPv4), so a key allowed only there
        // was refused FORBIDDEN_IP from everywhere, including from 10.1.2.3.
        let host = Cidr::parse("::ffff:10.1.2.3").unwrap();
        assert_eq!(host, Cidr::parse("10.1.2.3").unwrap());
        assert_eq!(host.to_string(), "10.1.2.3/32");
        assert!(host.contains(ip("10.1.2.3")));
        assert!(host.contains(ip("::ffff:10.1.2.3")));
        let net = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(net.to_string(), "10.0.0.0/8");
        assert!(net.contains(ip("10.200.0.1")) && !net.contains(ip("11.0.0.1")));
        assert!(parse_cidrs(&["10.0.0.0/8".into(), "::ffff:10.0.0.0/104".into()]).is_err());
        // Mapped networks shorter than /96 have host bits set; plain IPv6 stays IPv6.
        assert!(Cidr::parse("::ffff:0.0.0.0/95").is_err());
        assert_eq!(Cidr::parse("::/0").unwrap().to_string(), "::/0");
    }

    #[test]
    fn bad_cidrs_are_refused() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "10.0.0/8",
            "10.1.2.3/8",
            "2001:db8::1/32",
            "::/129",
            "hostname/8",
            "10.0.0.0/08a",
            "[::1]/128",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse_cidrs(&["10.0.0.0/8".into(), "10.0.0.0/8".into()]).is_err());
    }

    #[test]
    fn refusals_quote_only_an_excerpt_of_the_input() {
        // Found by the fuzz target `policy`: the whole input was quoted, escaped, into the
        // status message, and a large one broke the reply's headers.
        let huge = "\u{1b}".repeat(100_000);
        let errors = [
            Cidr::parse(&huge).unwrap_err(),
            parse_client_ip(&huge).unwrap_err(),
            PolicyMask::parse(std::slice::from_ref(&huge)).unwrap_err(),
        ];
        for e in errors {
            let shown = e.to_string();
            assert!(shown.len() < 512, "{} bytes: {:.80}", shown.len(), shown);
        }
    }

    #[test]
    fn client_ips() {
        assert_eq!(parse_client_ip("").unwrap(), None);
        assert_eq!(
            parse_client_ip("::ffff:1.2.3.4").unwrap(),
            Some(ip("1.2.3.4"))
        );
        for bad in ["1.2.3", "1.2.3.4:80", "[::1]", "fe80::1%eth0", "x"] {
            assert!(parse_client_ip(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_limits_and_quotas_are_bounded() {
        assert_eq!(RateLimit::parse(10, 1000, 0).unwrap().burst, 10);
        assert!(RateLimit::parse(0, 1000, 0).is_err());
        assert!(RateLimit::parse(10, 0, 0).is_err());
        assert!(RateLimit::parse(MAX_RATE + 1, 1000, 0).is_err());
        assert!(RateLimit::parse(10, MAX_RATE_PERIOD_MS + 1, 0).is_err());
        assert!(RateLimit::parse(10, 1000, MAX_RATE + 1).is_err());
        assert!(Quota::parse(0, 0, None, 0, 1).is_err());
        assert!(Quota::parse(MAX_QUOTA + 1, 0, None, 0, 1).is_err());
        assert!(
            Quota::parse(10, 5, None, 0, 1).is_err(),
            "refill without period"
        );
        assert!(Quota::parse(10, 0, Some(10), 0, 1).is_err());
        let q = Quota::parse(10, 0, Some(60_000), 0, 1).unwrap();
        assert_eq!(q.refill, 10);
    }

    #[test]
    fn masks() {
        assert_eq!(PolicyMask::parse(&[]).unwrap(), PolicyMask::ALL);
        let m = PolicyMask::parse(&["quota".into(), "expireTime".into()]).unwrap();
        assert!(m.quota && m.expire_time && !m.scopes);
        assert!(PolicyMask::parse(&["owner".into()]).is_err());
        let m =
            PolicyMask::parse(&["rotationPeriod".into(), "default_grace_period".into()]).unwrap();
        assert!(m.rotation_period && m.default_grace_period && !m.quota);
        let all = PolicyMask::ALL;
        assert!(
            !all.rotation_period && !all.default_grace_period,
            "an empty mask never touches the schedule"
        );
    }
}
