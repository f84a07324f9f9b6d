//! Abuse signals computed on the verification path: in memory, bounded, no I/O. The verifier
//! hands each verification of a found key to [`Signals::observe`]; what crosses a threshold is
//! raised into the alert queue (never awaited).
//!
//! State is per API key (secret name): the networks it was used from, a per-window counter
//! and its moving baseline, a scope-failure counter, and the alerts already fired. Each alert
//! fires once per threshold and period (hysteresis): a quota hovering at 20 % is one
//! `key.quota.low` per refill period, a flood is one `key.spike` per `repeat_after`. At most
//! `max_tracked_keys` keys are watched (a key's state is a few hundred bytes; new keys past the
//! bound go unwatched) and at most `max_networks` networks per key (a key used from more gets one
//! `key.new_network` per `repeat_after` for the rest). The state is not stored: after
//! a restart every key learns its networks afresh, which can miss, never invent, a new network.

use super::{Alert, AlertType, Alerts};
use crate::clock::Millis;
use crate::config::AlertsConfig;
use crate::model::VerifyResult;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Lock shards of the per-key state (verifications of different keys rarely contend).
const SHARDS: usize = 32;
/// Alerts remembered per key for hysteresis.
const MAX_FIRED: usize = 16;
/// Weight of the newest window in the moving baseline.
const ALPHA: f64 = 0.3;

/// How a verified key stood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// PRIMARY or ACTIVE: usable.
    Usable,
    /// REVOKED or DESTROYED.
    Revoked,
    /// Past its expiry.
    Expired,
    /// An old version whose rotation window closed.
    GraceEnded,
    /// Made INACTIVE by hand.
    Inactive,
}

/// One verification of a found key, as the signals see it.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    /// Secret holding the key.
    pub name: &'a str,
    /// Version presented.
    pub version: u64,
    /// Its key id.
    pub key_id: &'a str,
    /// The secret's environment.
    pub environment: &'a str,
    /// How the version stood.
    pub standing: Standing,
    /// The answer.
    pub result: VerifyResult,
    /// The end client's address, if the verifier gave it.
    pub ip: Option<IpAddr>,
    /// Quota: (balance now, limit, an id of the current refill period).
    pub quota: Option<(u64, u64, u64)>,
    /// Now.
    pub now: Millis,
}

/// A network a key was used from: an IPv4 /24 or an IPv6 /48.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net([u8; 7]);

impl Net {
    fn of(ip: IpAddr) -> Self {
        let mut n = [0u8; 7];
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                n[0] = 4;
                n[1..4].copy_from_slice(&v4.octets()[..3]);
            }
            IpAddr::V6(v6) => {
                n[0] = 6;
                n[1..7].copy_from_slice(&v6.octets()[..6]);
            }
        }
        Self(n)
    }

    fn display(self) -> String {
        let b = self.0;
        if b[0] == 4 {
            format!("{}.{}.{}.0/24", b[1], b[2], b[3])
        } else {
            format!(
                "{:x}:{:x}:{:x}::/48",
                u16::from_be_bytes([b[1], b[2]]),
                u16::from_be_bytes([b[3], b[4]]),
                u16::from_be_bytes([b[5], b[6]])
            )
        }
    }
}

/// What is remembered about one key.
#[derive(Debug, Default)]
struct KeyState {
    first_ms: Millis,
    uses: u64,
    networks: Vec<Net>,
    /// How many of `networks` (the first ones) were learnt during the learning period.
    learnt: usize,
    window: u64,
    window_count: u64,
    baseline: f64,
    windows_seen: u64,
    scope_start: Millis,
    scope_count: u32,
    fired: Vec<(AlertType, u64, u64)>,
}

impl KeyState {
    /// True the first time `(kind, version, period)` is asked about (hysteresis).
    fn once(&mut self, kind: AlertType, version: u64, period: u64) -> bool {
        let k = (kind, version, period);
        if self.fired.contains(&k) {
            return false;
        }
        if self.fired.len() >= MAX_FIRED {
            self.fired.remove(0);
        }
        self.fired.push(k);
        true
    }
}

/// Thresholds, from `[alerts]`.
#[derive(Debug, Clone)]
struct Thresholds {
    max_keys: usize,
    learn_uses: u64,
    learn_ms: u64,
    max_networks: usize,
    spike_window_ms: u64,
    spike_factor: f64,
    spike_min: u64,
    scope_threshold: u32,
    scope_window_ms: u64,
    quota_low_percent: u64,
    repeat_ms: u64,
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The signal state of every watched key.
pub struct Signals {
    t: Thresholds,
    alerts: Arc<Alerts>,
    shards: Vec<Mutex<HashMap<String, KeyState>>>,
    tracked: AtomicUsize,
}

impl Signals {
    /// Signals with `cfg`'s thresholds, raising into `alerts`.
    pub fn new(cfg: &AlertsConfig, alerts: Arc<Alerts>) -> Self {
        Self {
            t: Thresholds {
                max_keys: cfg.max_tracked_keys,
                learn_uses: cfg.learn_uses,
                learn_ms: ms(cfg.learn_period),
                max_networks: cfg.max_networks,
                spike_window_ms: ms(cfg.spike_window),
                spike_factor: cfg.spike_factor,
                spike_min: cfg.spike_min,
                scope_threshold: cfg.scope_probe_threshold.max(1),
                scope_window_ms: ms(cfg.scope_probe_window),
                quota_low_percent: u64::from(cfg.quota_low_percent),
                repeat_ms: ms(cfg.repeat_after),
            },
            alerts,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            tracked: AtomicUsize::new(0),
        }
    }

    /// Where alerts go (also for alerts raised outside the verification path).
    pub fn alerts(&self) -> &Arc<Alerts> {
        &self.alerts
    }

    /// The networks key `name` was used from during its learning period, as CIDRs (for a
    /// quarantine): not those first seen later, which raised `key.new_network`.
    pub fn learnt_networks(&self, name: &str) -> Vec<String> {
        let keys = self.shards[shard_of(name)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        keys.get(name).map_or_else(Vec::new, |s| {
            s.networks[..s.learnt.min(s.networks.len())]
                .iter()
                .map(|n| n.display())
                .collect()
        })
    }

    /// Looks at one verification; raises what it crosses.
    pub fn observe(&self, o: &Observation<'_>) {
        let mut raised: Vec<(AlertType, Map<String, Value>)> = Vec::new();
        {
            let shard = &self.shards[shard_of(o.name)];
            let mut keys = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let state = match keys.get_mut(o.name) {
                Some(s) => s,
                None => {
                    if self.tracked.load(Ordering::Relaxed) >= self.t.max_keys {
                        return;
                    }
                    self.tracked.fetch_add(1, Ordering::Relaxed);
                    keys.entry(o.name.to_owned()).or_insert_with(|| KeyState {
                        first_ms: o.now,
                        ..KeyState::default()
                    })
                }
            };
            self.judge(state, o, &mut raised);
        }
        for (kind, details) in raised {
            self.alerts.raise(Alert {
                kind,
                name: o.name.to_owned(),
                version: o.version,
                key_id: o.key_id.to_owned(),
                environment: o.environment.to_owned(),
                details,
                time_ms: o.now,
            });
        }
    }

    fn judge(
        &self,
        s: &mut KeyState,
        o: &Observation<'_>,
        out: &mut Vec<(AlertType, Map<String, Value>)>,
    ) {
        let t = &self.t;
        let repeat = o.now / t.repeat_ms;
        let ip = || o.ip.map_or(Value::Null, |ip| json!(ip.to_string()));
        // Use of a version that should no longer be in use.
        let late = match o.standing {
            Standing::Revoked | Standing::Expired => Some(AlertType::UsedAfterRevoke),
            Standing::GraceEnded => Some(AlertType::UsedAfterGrace),
            Standing::Usable | Standing::Inactive => None,
        };
        if let Some(kind) = late {
            if s.once(kind, o.version, repeat) {
                let state = match o.standing {
                    Standing::Expired => "EXPIRED",
                    Standing::GraceEnded => "INACTIVE (grace ended)",
                    _ => "REVOKED",
                };
                out.push((
                    kind,
                    details([("state", json!(state)), ("client_ip", ip())]),
                ));
            }
        }
        // Networks: learnt during the first uses (or period), then a new one is an alert.
        s.uses = s.uses.saturating_add(1);
        if let Some(addr) = o.ip {
            let net = Net::of(addr);
            if !s.networks.contains(&net) {
                let learning =
                    s.uses <= t.learn_uses && o.now.saturating_sub(s.first_ms) < t.learn_ms;
                let full = s.networks.len() >= t.max_networks;
                // A full list learns no more: every further network would be new again and
                // again, so a key used from that many networks gets one alert per period.
                if !learning && (!full || s.once(AlertType::NewNetwork, u64::MAX, repeat)) {
                    out.push((
                        AlertType::NewNetwork,
                        details([
                            ("network", json!(net.display())),
                            ("client_ip", ip()),
                            ("known_networks", json!(s.networks.len())),
                        ]),
                    ));
                }
                if !full {
                    s.networks.push(net);
                    if learning {
                        s.learnt = s.networks.len();
                    }
                }
            }
        }
        // Spikes: this window against the moving baseline of the earlier ones.
        let window = o.now / t.spike_window_ms;
        if window != s.window {
            if s.window_count > 0 || s.windows_seen > 0 {
                s.baseline = if s.windows_seen == 0 {
                    s.window_count as f64
                } else {
                    ALPHA * s.window_count as f64 + (1.0 - ALPHA) * s.baseline
                };
                // Quiet windows in between pull the baseline down.
                let quiet = window.saturating_sub(s.window).saturating_sub(1).min(64);
                s.baseline *= (1.0 - ALPHA).powi(quiet as i32);
                s.windows_seen += 1;
            }
            s.window = window;
            s.window_count = 0;
        }
        s.window_count += 1;
        if s.windows_seen > 0
            && s.window_count >= t.spike_min
            && s.window_count as f64 > t.spike_factor * s.baseline.max(1.0)
            && s.once(AlertType::Spike, 0, repeat)
        {
            out.push((
                AlertType::Spike,
                details([
                    ("count", json!(s.window_count)),
                    ("baseline", json!((s.baseline * 10.0).round() / 10.0)),
                    ("window_seconds", json!(t.spike_window_ms as f64 / 1000.0)),
                ]),
            ));
        }
        // Scope probing: repeated INSUFFICIENT_SCOPE within a window.
        if o.result == VerifyResult::InsufficientScope {
            if o.now.saturating_sub(s.scope_start) >= t.scope_window_ms {
                s.scope_start = o.now;
                s.scope_count = 0;
            }
            s.scope_count += 1;
            if s.scope_count >= t.scope_threshold
                && s.once(AlertType::ScopeProbe, o.version, repeat)
            {
                out.push((
                    AlertType::ScopeProbe,
                    details([
                        ("failures", json!(s.scope_count)),
                        ("window_seconds", json!(t.scope_window_ms / 1000)),
                        ("client_ip", ip()),
                    ]),
                ));
            }
        }
        // Quota: low and exhausted, once per refill period each.
        if let Some((left, limit, period)) = o.quota {
            let kind = if left == 0 {
                Some(AlertType::QuotaExhausted)
            } else if left.saturating_mul(100) <= limit.saturating_mul(t.quota_low_percent) {
                Some(AlertType::QuotaLow)
            } else {
                None
            };
            if let Some(kind) = kind {
                if s.once(kind, 0, period) {
                    out.push((
                        kind,
                        details([("remaining", json!(left)), ("limit", json!(limit))]),
                    ));
                }
            }
        }
    }
}

fn details<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

fn shard_of(name: &str) -> usize {
    // FNV-1a: cheap, and good enough to spread names over a few shards.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % SHARDS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fixture(
        edit: impl FnOnce(&mut AlertsConfig),
    ) -> (Signals, tokio::sync::mpsc::Receiver<Alert>) {
        let mut cfg = AlertsConfig {
            learn_uses: 3,
            spike_window: Duration::from_secs(1),
            spike_factor: 5.0,
            spike_min: 20,
            scope_probe_threshold: 3,
            ..AlertsConfig::default()
        };
        edit(&mut cfg);
        let (alerts, rx) = Alerts::new(1000);
        (Signals::new(&cfg, alerts), rx)
    }

    fn obs(now: Millis) -> Observation<'static> {
        Observation {
            name: "app/key",
            version: 1,
            key_id: "00ff00ff00ff00ff",
            environment: "prod",
            standing: Standing::Usable,
            result: VerifyResult::Valid,
            ip: None,
            quota: None,
            now,
        }
    }

    fn drain(rx: &mut tokio::sync::mpsc::Receiver<Alert>) -> Vec<Alert> {
        let mut out = Vec::new();
        while let Ok(a) = rx.try_recv() {
            out.push(a);
        }
        out
    }

    const T0: Millis = 1_700_000_000_000;

    #[test]
    fn a_new_network_after_learning_fires_once() {
        let (s, mut rx) = fixture(|_| {});
        let at = |ip: &str, i: u64| Observation {
            ip: Some(ip.parse().unwrap()),
            ..obs(T0 + i)
        };
        for (i, ip) in ["10.0.0.1", "10.0.0.2", "10.0.1.9"].iter().enumerate() {
            s.observe(&at(ip, i as u64));
        }
        assert!(drain(&mut rx).is_empty());
        s.observe(&at("10.0.0.77", 10));
        assert!(drain(&mut rx).is_empty(), "same /24 as a learnt network");
        assert_eq!(s.learnt_networks("app/key"), ["10.0.0.0/24", "10.0.1.0/24"]);
        s.observe(&at("192.168.5.5", 11));
        s.observe(&at("192.168.5.6", 12));
        let got = drain(&mut rx);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].kind, AlertType::NewNetwork);
        // Seen after learning: known (no second alert) but not learnt (no quarantine).
        assert_eq!(s.learnt_networks("app/key").len(), 2);
        assert_eq!(got[0].details["network"], json!("192.168.5.0/24"));
        s.observe(&at("2001:db8:1:2::1", 13));
        assert_eq!(
            drain(&mut rx)[0].details["network"],
            json!("2001:db8:1::/48")
        );
        // Past max_networks: one alert per period, however many networks come.
        let (s, mut rx) = fixture(|c| c.max_networks = 4);
        for i in 0..3 {
            s.observe(&at("10.0.0.1", i));
        }
        for n in 1..50 {
            s.observe(&at(&format!("10.{n}.0.1"), 10 + n));
        }
        let got = drain(&mut rx);
        assert_eq!(
            got.len(),
            4,
            "3 new while the list fills, then one for the full list: {got:?}"
        );
    }

    #[test]
    fn a_spike_over_the_baseline_fires_once() {
        let (s, mut rx) = fixture(|_| {});
        // Three quiet windows of 4 verifications, then 30 in one window.
        for w in 0..3 {
            for i in 0..4 {
                s.observe(&obs(T0 + w * 1000 + i));
            }
        }
        assert!(drain(&mut rx).is_empty());
        for i in 0..60 {
            s.observe(&obs(T0 + 3000 + i));
        }
        let got = drain(&mut rx);
        assert_eq!(
            got.iter().map(|a| a.kind).collect::<Vec<_>>(),
            [AlertType::Spike]
        );
        assert_eq!(got[0].details["count"], json!(21));
    }

    #[test]
    fn late_use_probes_and_quota_fire_once_per_period() {
        let (s, mut rx) = fixture(|_| {});
        for i in 0..5 {
            s.observe(&Observation {
                standing: Standing::Revoked,
                result: VerifyResult::Revoked,
                ..obs(T0 + i)
            });
            s.observe(&Observation {
                version: 2,
                standing: Standing::GraceEnded,
                result: VerifyResult::Disabled,
                ..obs(T0 + i)
            });
            s.observe(&Observation {
                result: VerifyResult::InsufficientScope,
                ..obs(T0 + i)
            });
        }
        let kinds: Vec<_> = drain(&mut rx).iter().map(|a| a.kind).collect();
        assert_eq!(
            kinds,
            [
                AlertType::UsedAfterRevoke,
                AlertType::UsedAfterGrace,
                AlertType::ScopeProbe
            ]
        );
        // Quota: 10 units; low at 2 left, exhausted at 0; hovering does not repeat.
        for left in [5, 3, 2, 1, 2, 1, 0, 0, 1, 0] {
            s.observe(&Observation {
                quota: Some((left, 10, 7)),
                ..obs(T0 + 100)
            });
        }
        let kinds: Vec<_> = drain(&mut rx).iter().map(|a| a.kind).collect();
        assert_eq!(kinds, [AlertType::QuotaLow, AlertType::QuotaExhausted]);
        // The next refill period may fire again.
        s.observe(&Observation {
            quota: Some((1, 10, 8)),
            ..obs(T0 + 200)
        });
        assert_eq!(drain(&mut rx)[0].kind, AlertType::QuotaLow);
    }

    #[test]
    fn memory_is_bounded() {
        let (s, mut rx) = fixture(|c| c.max_tracked_keys = 2);
        let names = ["a", "b", "c"];
        for n in names {
            for i in 0..5 {
                s.observe(&Observation {
                    name: n,
                    standing: Standing::Revoked,
                    ..obs(T0 + i)
                });
            }
        }
        assert_eq!(drain(&mut rx).len(), 2, "the third key is not watched");
        assert_eq!(s.tracked.load(Ordering::Relaxed), 2);
    }
}
