//! The `[alerts]` section: thresholds of the abuse signals, the webhook endpoints and how their
//! deliveries are retried (docs/alerts.md explains each signal).

use super::de_duration;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Abuse signals and their delivery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Compute signals on the verification path at all (alerts raised by other means, such as
    /// leak reports, are always recorded).
    pub signals: bool,
    /// Alerts waiting to be written; when full, further alerts are dropped and counted
    /// (`ward_alerts_dropped_total`): the request path never waits on alerting.
    pub queue: usize,
    /// Most API keys whose signal state is kept in memory; keys beyond it are not watched
    /// until others are forgotten.
    pub max_tracked_keys: usize,
    /// A key's networks are learnt during its first `learn_uses` uses…
    pub learn_uses: u64,
    /// …or for this long after its first use seen by this process, whichever ends first.
    #[serde(deserialize_with = "de_duration")]
    pub learn_period: Duration,
    /// Most networks remembered per key.
    pub max_networks: usize,
    /// Verifications are counted per window this long…
    #[serde(deserialize_with = "de_duration")]
    pub spike_window: Duration,
    /// …and a window with more than `spike_factor` × the moving baseline…
    pub spike_factor: f64,
    /// …and at least this many verifications is a spike.
    pub spike_min: u64,
    /// INSUFFICIENT_SCOPE answers for one key within `scope_probe_window` that make a probe.
    pub scope_probe_threshold: u32,
    /// See `scope_probe_threshold`.
    #[serde(deserialize_with = "de_duration")]
    pub scope_probe_window: Duration,
    /// `key.quota.low` when the balance is at or below this percentage of the limit.
    pub quota_low_percent: u8,
    /// A signal that has no natural period (use after revoke, after grace, spikes, probes)
    /// fires at most once per key version per this period.
    #[serde(deserialize_with = "de_duration")]
    pub repeat_after: Duration,
    /// `secret.expiring` fires when a key or secret expires within each of these.
    #[serde(deserialize_with = "de_durations")]
    pub expiring_within: Vec<Duration>,
    /// `key.stale` fires when an API key has not been used for this long.
    #[serde(deserialize_with = "de_duration")]
    pub stale_after: Duration,
    /// How often expiry, rotation and staleness are judged (a pass over every secret).
    #[serde(deserialize_with = "de_duration")]
    pub deadline_interval: Duration,
    /// First retry of a failed delivery after about this long (doubling, with jitter)…
    #[serde(deserialize_with = "de_duration")]
    pub retry_initial: Duration,
    /// …never waiting longer than this between attempts…
    #[serde(deserialize_with = "de_duration")]
    pub retry_max_interval: Duration,
    /// …for at most this long; then the endpoint is disabled (with an alert record).
    #[serde(deserialize_with = "de_duration")]
    pub retry_for: Duration,
    /// Connect, TLS and response timeout of one delivery.
    #[serde(deserialize_with = "de_duration")]
    pub delivery_timeout: Duration,
    /// Webhook endpoints.
    pub webhooks: Vec<WebhookConfig>,
}

/// One `[[alerts.webhooks]]` endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `https://…`; `http://` only for a loopback address (local relays, tests).
    pub url: String,
    /// File of the signing secret(s), `whsec_` + base64, one per line: every line signs
    /// (several signatures while a secret rotates).
    pub secret_file: PathBuf,
    /// Event types delivered; `key.*` matches a family, `*` everything (the default).
    #[serde(default = "every_event")]
    pub events: Vec<String>,
    /// CA bundle (PEM) that the endpoint's certificate must chain to (default: the system's,
    /// /etc/ssl/certs/ca-certificates.crt).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn every_event() -> Vec<String> {
    vec!["*".into()]
}

fn de_durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|t| super::parse_duration(t).map_err(serde::de::Error::custom))
        .collect()
}

impl Default for AlertsConfig {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            signals: true,
            queue: 4096,
            max_tracked_keys: 100_000,
            learn_uses: 100,
            learn_period: Duration::from_secs(7 * DAY),
            max_networks: 32,
            spike_window: Duration::from_secs(60),
            spike_factor: 10.0,
            spike_min: 100,
            scope_probe_threshold: 5,
            scope_probe_window: Duration::from_secs(600),
            quota_low_percent: 20,
            repeat_after: Duration::from_secs(DAY),
            expiring_within: vec![Duration::from_secs(7 * DAY), Duration::from_secs(DAY)],
            stale_after: Duration::from_secs(90 * DAY),
            deadline_interval: Duration::from_secs(3600),
            retry_initial: Duration::from_secs(5),
            retry_max_interval: Duration::from_secs(3600),
            retry_for: Duration::from_secs(3 * DAY),
            delivery_timeout: Duration::from_secs(10),
            webhooks: Vec::new(),
        }
    }
}

impl AlertsConfig {
    /// Resolves relative paths against the config file's folder.
    pub(super) fn resolve(&mut self, base: &Path) {
        for w in &mut self.webhooks {
            if w.secret_file.is_relative() {
                w.secret_file = base.join(&w.secret_file);
            }
            if let Some(ca) = w.ca_file.as_mut() {
                if ca.is_relative() {
                    *ca = base.join(&*ca);
                }
            }
        }
    }

    /// Checks the bounds and each endpoint's URL and event patterns.
    pub(super) fn validate(&self) -> Result<(), String> {
        const S: Duration = Duration::from_secs(1);
        const DAY: Duration = Duration::from_secs(24 * 3600);
        let within = |name: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("alerts: {name} must be between {lo} and {hi}"))
            }
        };
        let lasting = |name: &str, d: Duration, lo: Duration, hi: Duration| {
            if d >= lo && d <= hi {
                Ok(())
            } else {
                Err(format!("alerts: {name} must be between {lo:?} and {hi:?}"))
            }
        };
        within("queue", self.queue as u64, 1, 1_000_000)?;
        within(
            "max_tracked_keys",
            self.max_tracked_keys as u64,
            1,
            10_000_000,
        )?;
        within("max_networks", self.max_networks as u64, 1, 1024)?;
        within("spike_min", self.spike_min, 1, u64::from(u32::MAX))?;
        within(
            "scope_probe_threshold",
            u64::from(self.scope_probe_threshold),
            1,
            1_000_000,
        )?;
        within(
            "quota_low_percent",
            u64::from(self.quota_low_percent),
            1,
            99,
        )?;
        within("webhooks (count)", self.webhooks.len() as u64, 0, 16)?;
        if !(self.spike_factor > 1.0 && self.spike_factor <= 1e6) {
            return Err("alerts: spike_factor must be above 1 (and at most 1000000)".into());
        }
        let ms = Duration::from_millis(100);
        lasting("learn_period", self.learn_period, S, 366 * DAY)?;
        lasting("spike_window", self.spike_window, S, DAY)?;
        lasting("scope_probe_window", self.scope_probe_window, S, DAY)?;
        lasting("repeat_after", self.repeat_after, S, 366 * DAY)?;
        lasting("stale_after", self.stale_after, S, 3650 * DAY)?;
        lasting("deadline_interval", self.deadline_interval, ms, DAY)?;
        lasting("retry_initial", self.retry_initial, ms, DAY)?;
        lasting(
            "retry_max_interval",
            self.retry_max_interval,
            self.retry_initial,
            7 * DAY,
        )?;
        lasting("retry_for", self.retry_for, S, 30 * DAY)?;
        lasting("delivery_timeout", self.delivery_timeout, ms, 300 * S)?;
        if self.expiring_within.len() > 8 {
            return Err("alerts: expiring_within takes at most 8 thresholds".into());
        }
        for d in &self.expiring_within {
            lasting("each expiring_within", *d, S, 366 * DAY)?;
        }
        let mut seen = std::collections::HashSet::new();
        for w in &self.webhooks {
            WebhookUrl::parse(&w.url).map_err(|e| format!("alerts.webhooks {:?}: {e}", w.url))?;
            if !seen.insert(w.url.as_str()) {
                return Err(format!("alerts.webhooks: {:?} is listed twice", w.url));
            }
            for e in &w.events {
                check_pattern(e).map_err(|e| format!("alerts.webhooks {:?}: {e}", w.url))?;
            }
        }
        Ok(())
    }
}

/// A webhook URL, parsed: `https://host[:port]/path`, or `http://` to a loopback address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    /// HTTPS (rustls) rather than plain HTTP.
    pub tls: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

impl WebhookUrl {
    /// Parses and checks a URL: plain `http://` is allowed only to a loopback address (a relay
    /// on the same host, or a test receiver), since alerts name secrets and key ids.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|_| "not a URL".to_string())?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("the URL must start with https:// (or http:// to loopback)".into()),
        };
        let auth = uri.authority().ok_or("the URL names no host")?;
        if auth.as_str().contains('@') {
            return Err("credentials in a webhook URL are not supported".into());
        }
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("the URL names no host".into());
        }
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !tls && !loopback {
            return Err("plain http:// is allowed only to a loopback address; use https://".into());
        }
        Ok(Self {
            tls,
            host: host.to_owned(),
            port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }
}

/// Checks an event pattern: `*`, a type such as `key.spike`, or a family such as `key.*`.
pub fn check_pattern(p: &str) -> Result<(), String> {
    let body = p.strip_suffix(".*").unwrap_or(p);
    let ok = p == "*"
        || (!body.is_empty()
            && body.len() <= 64
            && body
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "event pattern {p:?}: use *, a type such as key.spike, or a family such as key.*"
        ))
    }
}

/// Whether event type `t` matches pattern `p` (see [`check_pattern`]).
pub fn pattern_matches(p: &str, t: &str) -> bool {
    match p.strip_suffix(".*") {
        _ if p == "*" => true,
        Some(family) => t.strip_prefix(family).is_some_and(|r| r.starts_with('.')),
        None => p == t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_patterns() {
        let u = WebhookUrl::parse("https://hooks.example.com/ward?x=1").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (true, "hooks.example.com", 443, "/ward?x=1")
        );
        let u = WebhookUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (false, 8080, "/"));
        assert!(WebhookUrl::parse("http://[::1]:9/h").is_ok());
        assert!(WebhookUrl::parse("http://hooks.example.com/").is_err());
        assert!(WebhookUrl::parse("http://10.0.0.1/").is_err());
        assert!(WebhookUrl::parse("ftp://localhost/").is_err());
        assert!(WebhookUrl::parse("https://user:pw@example.com/").is_err());
        for ok in ["*", "key.*", "secret.expiring", "key.quota.low"] {
            check_pattern(ok).unwrap();
        }
        for bad in ["", "Key.*", "key.**", "*.x", ".*"] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
        assert!(pattern_matches("key.*", "key.quota.low"));
        assert!(pattern_matches("key.quota.*", "key.quota.low"));
        assert!(!pattern_matches("key.*", "keys.x"));
        assert!(!pattern_matches("key.*", "secret.expiring"));
        assert!(pattern_matches("secret.expiring", "secret.expiring"));
        assert!(pattern_matches("*", "webhook.disabled"));
    }
}
