//! Prometheus metrics: one process-wide registry, the text exposition format, the plain-HTTP
//! listener that serves it (`/metrics`, `/healthz`; loopback by default, for probes that cannot
//! present a client certificate), a tower layer that times every gRPC call, and a timing
//! wrapper around the HSM.
//!
//! Labels carry only bounded, non-secret values: method names from a fixed list (anything else
//! is `unknown`), status code names, verification result names, kind and state names, and
//! caller identities (certificate names, already in every audit record). Never a secret name,
//! a value or a key.

use crate::error::Code;
use crate::model::VerifyResult;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Histogram bucket bounds, in seconds.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Most distinct identities counted by name for unknown-key attempts.
const MAX_IDENTITIES: usize = 1000;

/// A latency histogram.
#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += s;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(self.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// The registry.
pub struct Metrics {
    rpc: Mutex<BTreeMap<(String, &'static str), Histogram>>,
    verifications: [AtomicU64; 12],
    rate_limited: AtomicU64,
    quota_exceeded: AtomicU64,
    lockouts: AtomicU64,
    stale_refusals: AtomicU64,
    unknown_keys: Mutex<BTreeMap<String, u64>>,
    hsm: Mutex<BTreeMap<&'static str, Histogram>>,
    hsm_up: AtomicBool,
    audit_write: Mutex<Histogram>,
    methods: OnceLock<HashSet<String>>,
    alerts: Mutex<BTreeMap<&'static str, u64>>,
    alerts_dropped: AtomicU64,
    webhooks: Mutex<BTreeMap<&'static str, u64>>,
    webhooks_pending: AtomicU64,
    webhook_duration: Mutex<Histogram>,
}

/// The process-wide registry.
pub fn global() -> &'static Metrics {
    static GLOBAL: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get_or_init(|| Metrics {
        rpc: Mutex::default(),
        verifications: Default::default(),
        rate_limited: AtomicU64::new(0),
        quota_exceeded: AtomicU64::new(0),
        lockouts: AtomicU64::new(0),
        stale_refusals: AtomicU64::new(0),
        unknown_keys: Mutex::default(),
        hsm: Mutex::default(),
        // The server starts only with its HSM reachable.
        hsm_up: AtomicBool::new(true),
        audit_write: Mutex::default(),
        methods: OnceLock::new(),
        alerts: Mutex::default(),
        alerts_dropped: AtomicU64::new(0),
        webhooks: Mutex::default(),
        webhooks_pending: AtomicU64::new(0),
        webhook_duration: Mutex::default(),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Escapes a label value for the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Sets the gRPC paths (`/pkg.Service/Method`) that may appear as method labels.
    pub fn set_methods(&self, methods: HashSet<String>) {
        let _ = self.methods.set(methods);
    }

    /// The method label of a request path: the path's method name if it is a served method,
    /// else `unknown` (the path is the client's to choose; labels must stay bounded).
    pub fn method_label(&self, path: &str) -> String {
        match self.methods.get() {
            Some(m) if m.contains(path) => path.trim_start_matches('/').to_owned(),
            _ => "unknown".to_owned(),
        }
    }

    /// Records one gRPC call.
    pub fn observe_rpc(&self, method: String, code: &'static str, took: Duration) {
        lock(&self.rpc)
            .entry((method, code))
            .or_default()
            .observe(took);
    }

    /// Counts one alert raised, by type (a fixed set of names).
    pub fn count_alert(&self, kind: &'static str) {
        *lock(&self.alerts).entry(kind).or_default() += 1;
    }

    /// Counts one alert dropped because the alert queue was full.
    pub fn count_alert_dropped(&self) {
        self.alerts_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one webhook delivery attempt by result (`delivered`, `failed`, `given_up`).
    pub fn count_webhook(&self, result: &'static str) {
        *lock(&self.webhooks).entry(result).or_default() += 1;
    }

    /// Sets the number of webhook deliveries waiting in the outbox.
    pub fn set_webhooks_pending(&self, n: u64) {
        self.webhooks_pending.store(n, Ordering::Relaxed);
    }

    /// Times one webhook delivery attempt.
    pub fn observe_webhook(&self, took: Duration) {
        lock(&self.webhook_duration).observe(took);
    }

    /// Counts one verification by result.
    pub fn count_verification(&self, r: VerifyResult) {
        if let Some(c) = self.verifications.get(r.number()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a rate-limit rejection.
    pub fn count_rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a call refused because this replica's copy of a shared store may be stale.
    pub fn count_stale_refusal(&self) {
        self.stale_refusals.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a quota rejection.
    pub fn count_quota_exceeded(&self) {
        self.quota_exceeded.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a verification refused because its caller presented too many unknown keys.
    pub fn count_lockout(&self) {
        self.lockouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an unknown key presented by `identity`.
    pub fn count_unknown_key(&self, identity: &str) {
        let mut m = lock(&self.unknown_keys);
        let label = if m.contains_key(identity) || m.len() < MAX_IDENTITIES {
            identity
        } else {
            "(other)"
        };
        *m.entry(label.to_owned()).or_insert(0) += 1;
    }

    /// Records one HSM call.
    pub fn observe_hsm(&self, op: &'static str, took: Duration) {
        lock(&self.hsm).entry(op).or_default().observe(took);
    }

    /// Records whether the last HSM call found the HSM able to serve it.
    pub fn set_hsm_up(&self, up: bool) {
        self.hsm_up.store(up, Ordering::Relaxed);
    }

    /// Records one audit write (commit and flush).
    pub fn observe_audit_write(&self, took: Duration) {
        lock(&self.audit_write).observe(took);
    }

    /// The exposition text; `versions` are the secret versions by (kind, state) now, `keys` the
    /// indexed key versions.
    pub fn render(
        &self,
        versions: &BTreeMap<(&'static str, &'static str), u64>,
        keys: usize,
    ) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str("# HELP ward_rpc_duration_seconds gRPC calls by method and status code.\n");
        out.push_str("# TYPE ward_rpc_duration_seconds histogram\n");
        for ((method, code), h) in lock(&self.rpc).iter() {
            let labels = format!("method=\"{}\",code=\"{code}\"", escape(method));
            h.render(&mut out, "ward_rpc_duration_seconds", &labels);
        }
        out.push_str("# HELP ward_key_verifications_total API-key verifications by result.\n");
        out.push_str("# TYPE ward_key_verifications_total counter\n");
        for r in VerifyResult::ALL {
            let n = self.verifications[r.number()].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "ward_key_verifications_total{{result=\"{}\"}} {n}",
                r.name()
            );
        }
        let counters = [
            (
                "ward_rate_limit_rejections_total",
                "Verifications refused by a key's rate limit.",
                &self.rate_limited,
            ),
            (
                "ward_quota_rejections_total",
                "Verifications refused by a key's quota.",
                &self.quota_exceeded,
            ),
            (
                "ward_unknown_key_lockouts_total",
                "Unknown keys refused (RATE_LIMITED): the caller presented too many unknown keys.",
                &self.lockouts,
            ),
            (
                "ward_stale_refusals_total",
                "Calls refused because this replica had not heard from etcd within store.etcd.max_staleness.",
                &self.stale_refusals,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP ward_unknown_keys_total Unknown (or not verifiable) keys presented, by caller identity.\n");
        out.push_str("# TYPE ward_unknown_keys_total counter\n");
        for (id, n) in lock(&self.unknown_keys).iter() {
            let _ = writeln!(
                out,
                "ward_unknown_keys_total{{identity=\"{}\"}} {n}",
                escape(id)
            );
        }
        out.push_str("# HELP ward_hsm_call_duration_seconds HSM (PKCS#11) calls by operation.\n");
        out.push_str("# TYPE ward_hsm_call_duration_seconds histogram\n");
        for (op, h) in lock(&self.hsm).iter() {
            h.render(
                &mut out,
                "ward_hsm_call_duration_seconds",
                &format!("op=\"{op}\""),
            );
        }
        out.push_str("# HELP ward_hsm_up 1 if the last HSM call was served (or refused for its input), 0 if the HSM could not serve it.\n");
        out.push_str("# TYPE ward_hsm_up gauge\n");
        let _ = writeln!(
            out,
            "ward_hsm_up {}",
            u8::from(self.hsm_up.load(Ordering::Relaxed))
        );
        out.push_str(
            "# HELP ward_audit_write_duration_seconds Audit record writes, commit to durable.\n",
        );
        out.push_str("# TYPE ward_audit_write_duration_seconds histogram\n");
        lock(&self.audit_write).render(&mut out, "ward_audit_write_duration_seconds", "");
        out.push_str(
            "# HELP ward_secret_versions Secret versions by kind and state in force now.\n",
        );
        out.push_str("# TYPE ward_secret_versions gauge\n");
        for ((kind, state), n) in versions {
            let _ = writeln!(
                out,
                "ward_secret_versions{{kind=\"{kind}\",state=\"{state}\"}} {n}"
            );
        }
        out.push_str("# HELP ward_indexed_keys API-key versions in the in-memory index.\n");
        out.push_str("# TYPE ward_indexed_keys gauge\n");
        let _ = writeln!(out, "ward_indexed_keys {keys}");
        self.render_alerts(&mut out);
        out
    }

    fn render_alerts(&self, out: &mut String) {
        out.push_str("# HELP ward_alerts_total Alerts raised, by type.\n");
        out.push_str("# TYPE ward_alerts_total counter\n");
        for (kind, n) in lock(&self.alerts).iter() {
            let _ = writeln!(out, "ward_alerts_total{{type=\"{kind}\"}} {n}");
        }
        out.push_str(
            "# HELP ward_alerts_dropped_total Alerts dropped because the alert queue was full.\n",
        );
        out.push_str("# TYPE ward_alerts_dropped_total counter\n");
        let _ = writeln!(
            out,
            "ward_alerts_dropped_total {}",
            self.alerts_dropped.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP ward_webhook_deliveries_total Webhook delivery attempts, by result.\n",
        );
        out.push_str("# TYPE ward_webhook_deliveries_total counter\n");
        for (result, n) in lock(&self.webhooks).iter() {
            let _ = writeln!(
                out,
                "ward_webhook_deliveries_total{{result=\"{result}\"}} {n}"
            );
        }
        out.push_str("# HELP ward_webhook_pending Webhook deliveries waiting in the outbox.\n");
        out.push_str("# TYPE ward_webhook_pending gauge\n");
        let _ = writeln!(
            out,
            "ward_webhook_pending {}",
            self.webhooks_pending.load(Ordering::Relaxed)
        );
        out.push_str("# HELP ward_webhook_delivery_duration_seconds Webhook delivery attempts, connect to answer.\n");
        out.push_str("# TYPE ward_webhook_delivery_duration_seconds histogram\n");
        lock(&self.webhook_duration).render(out, "ward_webhook_delivery_duration_seconds", "");
    }
}

/// The gRPC code name carried by a response: the `grpc-status` header of an error (tonic sends
/// errors as trailers-only responses), else OK (a unary success carries its status in the
/// trailers).
pub fn grpc_code_name(headers: &http::HeaderMap) -> &'static str {
    let Some(v) = headers.get("grpc-status") else {
        return Code::Ok.name();
    };
    let n: i32 = v.to_str().ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    ward::status::code_name(n)
}

/// Tower layer timing every gRPC call by method and status code.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

/// The service [`RpcMetricsLayer`] wraps around the router.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = global().method_label(req.uri().path());
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => grpc_code_name(r.headers()),
                Err(_) => "UNKNOWN",
            };
            global().observe_rpc(method, code, started.elapsed());
            res
        })
    }
}

/// Times every call of the HSM, and records in `ward_hsm_up` whether the HSM could serve it.
pub struct MeteredWrapper(pub std::sync::Arc<dyn ward_hsm::Hsm>);

impl MeteredWrapper {
    fn timed<T>(
        op: &'static str,
        f: impl FnOnce() -> Result<T, ward_hsm::HsmError>,
    ) -> Result<T, ward_hsm::HsmError> {
        use ward_hsm::HsmError as H;
        let started = Instant::now();
        let out = f();
        global().observe_hsm(op, started.elapsed());
        // An answer about the input (integrity, a missing key) means the HSM is there.
        let up = !matches!(
            out,
            Err(H::Unavailable(_)
                | H::BadPin { .. }
                | H::TokenNotFound { .. }
                | H::ModuleLoad { .. })
        );
        global().set_hsm_up(up);
        out
    }
}

impl ward_hsm::KeyWrapper for MeteredWrapper {
    fn wrap(&self, label: &str, aad: &[u8], key: &[u8]) -> Result<Vec<u8>, ward_hsm::HsmError> {
        Self::timed("wrap", || self.0.wrap(label, aad, key))
    }
    fn unwrap(
        &self,
        label: &str,
        aad: &[u8],
        wrapped: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, ward_hsm::HsmError> {
        Self::timed("unwrap", || self.0.unwrap(label, aad, wrapped))
    }
    fn has_master_key(&self, label: &str) -> Result<bool, ward_hsm::HsmError> {
        Self::timed("find_key", || self.0.has_master_key(label))
    }
    fn create_master_key(&self, label: &str) -> Result<(), ward_hsm::HsmError> {
        Self::timed("create_key", || self.0.create_master_key(label))
    }
    fn mechanism(&self) -> ward_hsm::Mechanism {
        self.0.mechanism()
    }
}

impl ward_hsm::MacSigner for MeteredWrapper {
    fn has_mac_key(&self, label: &str) -> Result<bool, ward_hsm::HsmError> {
        Self::timed("find_mac_key", || self.0.has_mac_key(label))
    }
    fn create_mac_key(&self, label: &str) -> Result<(), ward_hsm::HsmError> {
        Self::timed("create_mac_key", || self.0.create_mac_key(label))
    }
    fn mac(&self, label: &str, data: &[u8]) -> Result<Vec<u8>, ward_hsm::HsmError> {
        Self::timed("mac", || self.0.mac(label, data))
    }
    fn verify_mac(&self, label: &str, data: &[u8], tag: &[u8]) -> Result<bool, ward_hsm::HsmError> {
        Self::timed("verify_mac", || self.0.verify_mac(label, data, tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_text_is_cumulative() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
        let mut out = String::new();
        h.render(&mut out, "y", "");
        assert!(
            out.contains("y_bucket{le=\"+Inf\"} 3\n") && out.contains("y_count 3\n"),
            "{out}"
        );
    }

    #[test]
    fn unknown_methods_and_codes() {
        let m = global();
        m.set_methods(
            ["/ward.v1.Keys/VerifyKey".to_string()]
                .into_iter()
                .collect(),
        );
        assert_eq!(
            m.method_label("/ward.v1.Keys/VerifyKey"),
            "ward.v1.Keys/VerifyKey"
        );
        assert_eq!(m.method_label("/evil\"label/x"), "unknown");
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_code_name(&h), "OK");
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_code_name(&h), "NOT_FOUND");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
