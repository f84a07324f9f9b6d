//! The endpoints of one client: a channel per Ward replica, what the client knows of each
//! replica's health, and the order in which a call tries them.
//!
//! Every replica of a cluster serves the same data, so any of them can answer any call. The
//! client sends each call to the **first healthy endpoint in the order given** (a preference
//! list, not round-robin): a replica serves reads from memory that its etcd watch keeps
//! current, so a write acknowledged by one replica reaches the others a moment later; keeping a
//! client's calls on one replica gives it read-your-writes and one warm connection instead of
//! several. Load is spread by giving different clients different orders.
//!
//! An endpoint whose call fails with a transport error or UNAVAILABLE becomes unhealthy: it is
//! tried after every healthy one, and once its backoff has passed a call spawns a probe
//! (`grpc.health.v1.Health/Check`) of it in the background. It becomes healthy again, and so
//! preferred again, only when it answers: a probe reporting SERVING, or any call it answers
//! (which happens when every endpoint is unhealthy). A failed probe doubles its backoff.
//! Calls themselves never wait for a probe.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::config::{
    ClientConfig, DEFAULT_FAILOVER_BACKOFF, DEFAULT_FAILOVER_BACKOFF_MAX, DEFAULT_TIMEOUT,
};
use crate::error::{transport_causes, Error};
use crate::retry::jittered_backoff;

/// HTTP/2 keep-alive ping interval: finds a dead connection before a call has to time out on it.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a keep-alive ping may go unanswered before the connection is dropped.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the client knows of one endpoint, as reported by [`crate::Client::endpoints`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStatus {
    /// The endpoint URI, e.g. `https://10.0.0.7:8443`.
    pub endpoint: String,
    /// Whether calls go to it before the unhealthy ones.
    pub healthy: bool,
    /// Transport errors and UNAVAILABLE answers (failed probes included) since it last
    /// answered; 0 when healthy.
    pub consecutive_failures: u32,
}

/// The replicas one client (and its clones) talks to.
pub(crate) struct Endpoints {
    list: Vec<Replica>,
    /// Failover backoff: (initial, max).
    backoff: (Duration, Duration),
    /// Limit on one health probe.
    probe_timeout: Duration,
}

struct Replica {
    uri: String,
    channel: Channel,
    health: Mutex<Health>,
}

/// One endpoint's health: a small state machine with time as a parameter.
#[derive(Debug, Clone, Default)]
struct Health {
    /// Consecutive failures; 0 means healthy.
    failures: u32,
    /// When an unhealthy endpoint may be probed again.
    retry_at: Option<Instant>,
    /// A probe is running: start no other.
    probing: bool,
}

impl Health {
    fn healthy(&self) -> bool {
        self.failures == 0
    }

    /// It answered: healthy again, preferred again by its place in the list.
    fn answered(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }

    /// It failed: behind every healthy endpoint until it answers, probed again after `backoff`.
    fn failed(&mut self, now: Instant, backoff: Duration) {
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(now + backoff);
    }

    /// Whether a probe should start now (and, if so, notes that one runs).
    fn start_probe(&mut self, now: Instant) -> bool {
        let due = !self.healthy() && !self.probing && self.retry_at.is_none_or(|t| t <= now);
        if due {
            self.probing = true;
        }
        due
    }
}

/// The endpoint a call tries next: among those not `tried` yet in this call (all, once every
/// one was tried), the first healthy one in list order; failing that, the unhealthy one with
/// the fewest failures in a row (the likeliest to be back), then list order.
fn pick(health: &[Health], tried: &[bool]) -> usize {
    let all_tried = tried.iter().all(|&t| t);
    let candidates = || {
        health
            .iter()
            .enumerate()
            .filter(move |&(i, _)| all_tried || !tried[i])
    };
    if let Some((i, _)) = candidates().find(|(_, h)| h.healthy()) {
        return i;
    }
    candidates()
        .min_by_key(|&(i, h)| (h.failures, i))
        .map_or(0, |(i, _)| i)
}

/// Whether an outcome says the endpoint is not serving (as opposed to a verdict on the call).
/// DEADLINE_EXCEEDED says neither: a slow answer is not a dead replica.
fn outcome_health<T>(result: &Result<T, Error>) -> Option<bool> {
    match result {
        Ok(_) => Some(true),
        Err(Error::Transport(_)) => Some(false),
        Err(Error::Status { code, .. }) => match code {
            Code::Unavailable => Some(false),
            Code::DeadlineExceeded | Code::Cancelled => None,
            _ => Some(true),
        },
        Err(Error::Config(_) | Error::Stale(_)) => None,
    }
}

/// The endpoints already tried by one call.
pub(crate) struct Tried(Vec<bool>);

impl Tried {
    /// Whether every endpoint was tried (so the next attempt goes back to one).
    pub(crate) fn all(&self) -> bool {
        self.0.iter().all(|&t| t)
    }
}

impl Endpoints {
    /// Connects over mutual TLS to the first endpoint (in the configured order) that accepts a
    /// connection, retrying per the config's retry policy when none does; the others get a
    /// channel that connects when first used. An endpoint that refused starts unhealthy.
    pub(crate) async fn connect(cfg: &ClientConfig) -> Result<Self, Error> {
        let uris = cfg.endpoints();
        let endpoints = uris
            .iter()
            .map(|uri| tonic_endpoint(cfg, uri))
            .collect::<Result<Vec<_>, _>>()?;
        let retry = cfg.retry();
        let mut refused: Vec<Option<String>> = vec![None; endpoints.len()];
        let mut connected = None;
        'attempts: for attempt in 1..=retry.attempts() {
            if attempt > 1 {
                tokio::time::sleep(retry.backoff(attempt - 1)).await;
            }
            for (i, endpoint) in endpoints.iter().enumerate() {
                match endpoint.connect().await {
                    Ok(channel) => {
                        refused[i] = None;
                        connected = Some((i, channel));
                        break 'attempts;
                    }
                    Err(e) => refused[i] = Some(transport_causes(&e)),
                }
            }
        }
        let Some((first, channel)) = connected else {
            return Err(cannot_connect(uris, &refused));
        };
        let mut channel = Some(channel);
        let channels = endpoints
            .iter()
            .zip(uris)
            .enumerate()
            .map(|(i, (endpoint, uri))| {
                let ch = match channel.take_if(|_| i == first) {
                    Some(ch) => ch,
                    None => endpoint.connect_lazy(),
                };
                (uri.clone(), ch)
            })
            .collect();
        let this = Self::new(channels, cfg.failover_backoff(), cfg.timeout());
        for (i, why) in refused.into_iter().enumerate() {
            if let Some(why) = why {
                this.report::<()>(i, &Err(Error::Transport(why)));
            }
        }
        Ok(this)
    }

    /// One endpoint: a channel made elsewhere (e.g. to an in-process server).
    pub(crate) fn single(channel: Channel) -> Self {
        Self::new(
            vec![("(channel)".to_owned(), channel)],
            (DEFAULT_FAILOVER_BACKOFF, DEFAULT_FAILOVER_BACKOFF_MAX),
            DEFAULT_TIMEOUT,
        )
    }

    /// Endpoints from (URI, channel) pairs in order of preference; never empty.
    fn new(
        list: Vec<(String, Channel)>,
        backoff: (Duration, Duration),
        probe_timeout: Duration,
    ) -> Self {
        Self {
            list: list
                .into_iter()
                .map(|(uri, channel)| Replica {
                    uri,
                    channel,
                    health: Mutex::new(Health::default()),
                })
                .collect(),
            backoff,
            probe_timeout,
        }
    }

    /// A fresh record of what a call has tried.
    pub(crate) fn tried(&self) -> Tried {
        Tried(vec![false; self.list.len()])
    }

    /// The endpoint for the next attempt of a call, noted in `tried`; starts the probes that
    /// are due.
    pub(crate) fn next(self: &Arc<Self>, tried: &mut Tried) -> (usize, Channel) {
        let now = Instant::now();
        let health = self.snapshot();
        let i = pick(&health, &tried.0);
        if tried.all() {
            tried.0.fill(false);
        }
        tried.0[i] = true;
        self.start_probes(now);
        (i, self.list[i].channel.clone())
    }

    /// The channel a call would use now (for the generated clients handed out by `raw()`).
    pub(crate) fn preferred(&self) -> Channel {
        let health = self.snapshot();
        let i = pick(&health, &vec![false; health.len()]);
        self.list[i].channel.clone()
    }

    /// Records what endpoint `i` did with a call.
    pub(crate) fn report<T>(&self, i: usize, result: &Result<T, Error>) {
        match outcome_health(result) {
            Some(true) => self.replica(i).answered(),
            Some(false) => self.note_failure(&mut self.replica(i), Instant::now()),
            None => {}
        }
    }

    /// What the client knows of each endpoint, in list order.
    pub(crate) fn status(&self) -> Vec<EndpointStatus> {
        self.list
            .iter()
            .map(|r| {
                let h = lock(&r.health);
                EndpointStatus {
                    endpoint: r.uri.clone(),
                    healthy: h.healthy(),
                    consecutive_failures: h.failures,
                }
            })
            .collect()
    }

    fn replica(&self, i: usize) -> MutexGuard<'_, Health> {
        lock(&self.list[i].health)
    }

    fn note_failure(&self, h: &mut Health, now: Instant) {
        let backoff = jittered_backoff(self.backoff.0, self.backoff.1, h.failures + 1);
        h.failed(now, backoff);
    }

    fn snapshot(&self) -> Vec<Health> {
        self.list.iter().map(|r| lock(&r.health).clone()).collect()
    }

    /// Spawns a probe of every unhealthy endpoint whose backoff has passed. Outside a tokio
    /// runtime (a `raw()` client used elsewhere) there is nothing to spawn on: no probe.
    fn start_probes(self: &Arc<Self>, now: Instant) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for i in 0..self.list.len() {
            if self.replica(i).start_probe(now) {
                runtime.spawn(self.clone().probe(i));
            }
        }
    }

    /// Asks endpoint `i` whether it serves; healthy again only if it says SERVING in time.
    async fn probe(self: Arc<Self>, i: usize) {
        let mut health = HealthClient::new(self.list[i].channel.clone());
        let check = health.check(HealthCheckRequest {
            service: String::new(),
        });
        let serving = matches!(
            tokio::time::timeout(self.probe_timeout, check).await,
            Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32
        );
        let mut h = self.replica(i);
        h.probing = false;
        if serving {
            h.answered();
        } else {
            self.note_failure(&mut h, Instant::now());
        }
    }
}

/// The tonic endpoint for `uri` with the config's TLS material, timeouts and keep-alive.
fn tonic_endpoint(cfg: &ClientConfig, uri: &str) -> Result<Endpoint, Error> {
    let connect_timeout = cfg.effective_connect_timeout();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(cfg.ca_pem()))
        .identity(Identity::from_pem(cfg.cert_pem(), cfg.key_pem()))
        .timeout(connect_timeout);
    if let Some(name) = cfg.server_name() {
        tls = tls.domain_name(name);
    }
    Endpoint::from_shared(uri.to_owned())
        .map_err(|e| Error::config(format!("invalid endpoint {uri}: {e}")))?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .tls_config(tls)
        // Building the TLS connector parses the PEMs: a failure here is bad input.
        .map_err(|e| Error::config(format!("unusable TLS material: {}", transport_causes(&e))))
}

/// The error of a client none of whose endpoints accepted a connection.
fn cannot_connect(uris: &[String], refused: &[Option<String>]) -> Error {
    let why = |i: usize| refused[i].as_deref().unwrap_or("not tried");
    match uris {
        [one] => Error::Transport(format!("cannot connect to {one}: {}", why(0))),
        many => Error::Transport(format!(
            "cannot connect to any endpoint: {}",
            many.iter()
                .enumerate()
                .map(|(i, uri)| format!("{uri}: {}", why(i)))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}

impl fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.status()).finish()
    }
}

fn lock(m: &Mutex<Health>) -> MutexGuard<'_, Health> {
    // A panic while holding this lock leaves plain counters behind; keep using them.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn unhealthy(failures: u32, retry_at: Instant) -> Health {
        Health {
            failures,
            retry_at: Some(retry_at),
            probing: false,
        }
    }

    #[test]
    fn all_healthy_sticks_to_the_first_in_the_list() {
        let h = vec![Health::default(); 3];
        assert_eq!(pick(&h, &[false, false, false]), 0);
        // A call that tried the first goes on in list order…
        assert_eq!(pick(&h, &[true, false, false]), 1);
        assert_eq!(pick(&h, &[true, true, false]), 2);
        // …and, having tried them all, starts over at the first.
        assert_eq!(pick(&h, &[true, true, true]), 0);
    }

    #[test]
    fn unhealthy_endpoints_are_tried_last() {
        let now = Instant::now();
        let h = vec![
            unhealthy(1, now + SEC),
            Health::default(),
            Health::default(),
        ];
        assert_eq!(pick(&h, &[false; 3]), 1);
        assert_eq!(pick(&h, &[false, true, false]), 2);
        assert_eq!(pick(&h, &[false, true, true]), 0);

        // All unhealthy: the one with the fewest failures in a row, then list order.
        let h = vec![
            unhealthy(3, now + SEC),
            unhealthy(1, now + 3 * SEC),
            unhealthy(2, now + 2 * SEC),
        ];
        assert_eq!(pick(&h, &[false; 3]), 1);
        assert_eq!(pick(&h, &[false, true, false]), 2);
        assert_eq!(pick(&h, &[false, true, true]), 0);
        let h = vec![unhealthy(2, now + SEC), unhealthy(2, now + SEC)];
        assert_eq!(pick(&h, &[false; 2]), 0);
    }

    #[test]
    fn health_follows_failures_answers_and_probes() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert!(h.healthy());
        assert!(!h.start_probe(t0), "a healthy endpoint is not probed");

        h.failed(t0, SEC);
        assert!(!h.healthy());
        assert_eq!(h.failures, 1);
        assert!(!h.start_probe(t0), "not before its backoff");
        assert!(h.start_probe(t0 + SEC));
        assert!(!h.start_probe(t0 + 2 * SEC), "one probe at a time");

        // The probe fails: further behind, probed later.
        h.probing = false;
        h.failed(t0 + SEC, 2 * SEC);
        assert_eq!(h.failures, 2);
        assert!(!h.start_probe(t0 + 2 * SEC));
        assert!(h.start_probe(t0 + 3 * SEC));

        // It answers: healthy, and preferred again by its place in the list.
        h.probing = false;
        h.answered();
        assert!(h.healthy());
        assert_eq!(h.retry_at, None);
        assert_eq!(pick(&[h, Health::default()], &[false, false]), 0);
    }

    #[test]
    fn which_outcomes_say_what_about_health() {
        let status = |code| -> Result<(), Error> {
            Err(Error::Status {
                code,
                message: String::new(),
            })
        };
        assert_eq!(outcome_health(&Ok(())), Some(true));
        assert_eq!(
            outcome_health::<()>(&Err(Error::Transport("refused".into()))),
            Some(false)
        );
        assert_eq!(outcome_health(&status(Code::Unavailable)), Some(false));
        // A verdict on the call means the replica is up.
        for code in [Code::NotFound, Code::PermissionDenied, Code::Aborted] {
            assert_eq!(outcome_health(&status(code)), Some(true), "{code:?}");
        }
        // A slow answer says nothing either way.
        assert_eq!(outcome_health(&status(Code::DeadlineExceeded)), None);
    }

    fn lazy_channel(port: u16) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy()
    }

    #[tokio::test]
    async fn a_failed_endpoint_moves_behind_and_comes_back_when_it_answers() {
        let eps = Arc::new(Endpoints::new(
            vec![
                ("https://a:1".into(), lazy_channel(1)),
                ("https://b:1".into(), lazy_channel(2)),
            ],
            (Duration::from_secs(60), Duration::from_secs(60)),
            SEC,
        ));
        let mut tried = eps.tried();
        assert_eq!(eps.next(&mut tried).0, 0);
        eps.report::<()>(0, &Err(Error::Transport("connection refused".into())));
        assert!(!tried.all());
        assert_eq!(eps.next(&mut tried).0, 1);
        assert!(tried.all());
        eps.report(1, &Ok(()));
        // The next call starts on the healthy one; the failed one waits out its backoff.
        assert_eq!(eps.next(&mut eps.tried()).0, 1);
        let st = eps.status();
        assert_eq!(
            (st[0].healthy, st[0].consecutive_failures, st[1].healthy),
            (false, 1, true)
        );
        // A deadline says nothing; an answer (even a refusal) makes it healthy again.
        eps.report::<()>(
            0,
            &Err(Error::Status {
                code: Code::DeadlineExceeded,
                message: String::new(),
            }),
        );
        assert!(!eps.status()[0].healthy);
        eps.report::<()>(
            0,
            &Err(Error::Status {
                code: Code::NotFound,
                message: String::new(),
            }),
        );
        assert!(eps.status()[0].healthy);
        assert_eq!(eps.next(&mut eps.tried()).0, 0);
    }
}
