//! A cache of secret values for applications, kept current by `WatchSecrets`.
//!
//! - [`Cache::get`] serves a secret's PRIMARY value from memory; the first call for a name
//!   fetches it and adds the name to the cache's watch stream.
//! - One background task keeps that stream open. A rotation makes it fetch the new PRIMARY;
//!   a revocation, destruction, expiry or end of grace removes the version at once, so the
//!   next `get` asks the server (which refuses it). The application sees rotation and
//!   revocation without polling or a restart; [`Cache::subscribe`] tells it when they happen.
//! - If the stream breaks (server unreachable), what the cache holds is still served for at
//!   most [`CacheConfig::with_max_stale`] after the break (or after the value was fetched, if
//!   later); then `get` tries the server and, failing that, returns [`Error::Stale`]. On
//!   reconnection the cache resends what it holds and gets the difference, so it misses
//!   nothing. Deadlines the server reported (grace_until, expire_time) are honoured by the
//!   local wall clock even while disconnected.
//! - Values live in memory only, in zeroizing buffers; nothing is written to disk.
//!
//! The cache learns of a revocation by push: the server sends the event before it answers
//! the RevokeSecret call, so the window in which a cache may still serve a just-revoked value
//! is the delivery time of one message on an open stream (no poll interval). While
//! disconnected, no revocation can reach it: that is what `max_stale` bounds.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, watch, Notify};
use tonic::Code;
use zeroize::Zeroizing;

use crate::client::Client;
use crate::error::Error;
use ward::v1::{
    HeldSecret, HeldVersion, SecretKind, SecretMetadata, VersionState, WatchEvent, WatchEventType,
    WatchSecretsRequest,
};

/// How long a cache keeps serving after losing the server, unless configured.
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(300);

/// A source of monotonic time for the cache's staleness bound (tests substitute one they
/// move by hand).
pub trait TimeSource: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> Instant;
}

/// [`Instant::now`].
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemTimeSource;

impl TimeSource for SystemTimeSource {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Cache settings.
#[derive(Clone)]
pub struct CacheConfig {
    max_stale: Duration,
    reconnect_initial: Duration,
    reconnect_max: Duration,
    time: Arc<dyn TimeSource>,
}

impl fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheConfig")
            .field("max_stale", &self.max_stale)
            .field("reconnect_initial", &self.reconnect_initial)
            .field("reconnect_max", &self.reconnect_max)
            .finish_non_exhaustive()
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_stale: DEFAULT_MAX_STALE,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            time: Arc::new(SystemTimeSource),
        }
    }
}

impl CacheConfig {
    /// The defaults: serve for 5 minutes without the server; reconnect from 100 ms to 5 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long values are served while the server cannot be reached.
    pub fn with_max_stale(mut self, max_stale: Duration) -> Self {
        self.max_stale = max_stale;
        self
    }

    /// Delay before reconnecting the watch stream, doubling from `initial` up to `max`.
    pub fn with_reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.reconnect_initial = initial;
        self.reconnect_max = max.max(initial);
        self
    }

    /// The clock the staleness bound is measured with.
    pub fn with_time_source(mut self, time: Arc<dyn TimeSource>) -> Self {
        self.time = time;
        self
    }
}

/// A value served by the cache. Cheap to clone (the value is shared); `Debug` shows no value.
#[derive(Clone)]
pub struct CachedSecret {
    /// Secret name.
    pub name: String,
    /// Version number.
    pub version: u64,
    /// The version's state as the cache last heard it.
    pub state: VersionState,
    /// Kind of secret.
    pub kind: SecretKind,
    /// CRC32C of the value (checked when fetched).
    pub checksum: u32,
    value: Arc<Zeroizing<Vec<u8>>>,
}

impl CachedSecret {
    /// The secret value.
    pub fn value(&self) -> &[u8] {
        &self.value
    }
}

impl fmt::Debug for CachedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedSecret")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("state", &self.state)
            .field(
                "value",
                &format_args!("<{} bytes redacted>", self.value.len()),
            )
            .finish_non_exhaustive()
    }
}

/// What the cache tells subscribers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum CacheEvent {
    /// The server's watch event, after the cache applied it (for a rotation, after it fetched
    /// the new PRIMARY when it could).
    Changed(Box<WatchEvent>),
    /// The cache is in step with the server (after connecting or reconnecting).
    Synced,
    /// The watch stream broke; cached values are served for at most `max_stale` more.
    Disconnected(String),
}

/// A cache of secret values kept current by a watch stream. Dropping it stops its task.
pub struct Cache {
    shared: Arc<Shared>,
    _stop: watch::Sender<()>,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("Cache")
            .field("names", &st.entries.len())
            .field("synced", &matches!(st.link, Link::Synced))
            .finish_non_exhaustive()
    }
}

struct Shared {
    client: Client,
    cfg: CacheConfig,
    state: Mutex<State>,
    /// Names were added: reopen the stream with everything held.
    wake: Notify,
    events: broadcast::Sender<CacheEvent>,
}

struct State {
    entries: BTreeMap<String, Entry>,
    link: Link,
}

enum Link {
    /// The stream is open and the initial differences are applied.
    Synced,
    /// Not in step with the server since `since`.
    Down { since: Instant, why: String },
}

#[derive(Default)]
struct Entry {
    /// Every version's state as last heard (what the cache holds, for the watch request).
    states: BTreeMap<u64, VersionState>,
    /// The usable PRIMARY, if any.
    primary: Option<u64>,
    /// Values of PRIMARY or ACTIVE versions.
    values: BTreeMap<u64, Held>,
}

struct Held {
    secret: CachedSecret,
    /// When the server last handed it over (the staleness bound counts from the later of
    /// this and the break).
    fetched: Instant,
    /// Wall-clock time (ms since the epoch) after which the server no longer serves it.
    deadline_ms: Option<u64>,
}

impl Cache {
    /// A cache over `client`. Spawns its watch task, so it must be called within a tokio
    /// runtime.
    pub fn new(client: Client, cfg: CacheConfig) -> Self {
        let now = cfg.time.now();
        let (events, _) = broadcast::channel(256);
        let shared = Arc::new(Shared {
            client,
            cfg,
            state: Mutex::new(State {
                entries: BTreeMap::new(),
                link: Link::Down {
                    since: now,
                    why: "not connected yet".into(),
                },
            }),
            wake: Notify::new(),
            events,
        });
        let (stop, stopped) = watch::channel(());
        tokio::spawn(run(shared.clone(), stopped));
        Self {
            shared,
            _stop: stop,
        }
    }

    /// The PRIMARY value of `name`: from memory when the cache holds it and is in step with
    /// the server (or lost it less than `max_stale` ago), else from the server.
    pub async fn get(&self, name: &str) -> Result<CachedSecret, Error> {
        self.lookup(name, 0).await
    }

    /// One version of `name` (0: the PRIMARY), served like [`Cache::get`].
    pub async fn get_version(&self, name: &str, version: u64) -> Result<CachedSecret, Error> {
        self.lookup(name, version).await
    }

    /// Events as the cache applies them.
    pub fn subscribe(&self) -> broadcast::Receiver<CacheEvent> {
        self.shared.events.subscribe()
    }

    /// Whether the watch stream is open and in step.
    pub fn is_synced(&self) -> bool {
        matches!(self.shared.lock().link, Link::Synced)
    }

    async fn lookup(&self, name: &str, version: u64) -> Result<CachedSecret, Error> {
        let stale = match self.shared.serve(name, version) {
            Served::Hit(s) => return Ok(s),
            Served::Miss => None,
            Served::Stale(why) => Some(why),
        };
        match self.shared.fetch(name, version).await {
            Ok(s) => Ok(s),
            Err(e) if is_unreachable(&e) => Err(match stale {
                Some(why) => Error::Stale(format!(
                    "{name}: {why}; the server is still \
                                                   unreachable ({e})"
                )),
                None => e,
            }),
            Err(e) => Err(e),
        }
    }
}

enum Served {
    Hit(CachedSecret),
    Miss,
    Stale(String),
}

fn is_unreachable(e: &Error) -> bool {
    matches!(e, Error::Transport(_))
        || matches!(
            e.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
        )
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ts_ms(t: &prost_types::Timestamp) -> u64 {
    (t.seconds.max(0) as u64)
        .saturating_mul(1000)
        .saturating_add(t.nanos.max(0) as u64 / 1_000_000)
}

fn usable(state: VersionState) -> bool {
    matches!(state, VersionState::Primary | VersionState::Active)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serve(&self, name: &str, version: u64) -> Served {
        let now = self.cfg.time.now();
        let st = self.lock();
        let Some(entry) = st.entries.get(name) else {
            return Served::Miss;
        };
        let wanted = if version == 0 {
            entry.primary
        } else {
            Some(version)
        };
        let Some(held) = wanted.and_then(|v| entry.values.get(&v)) else {
            return Served::Miss;
        };
        if held.deadline_ms.is_some_and(|d| wall_ms() >= d) {
            return Served::Miss;
        }
        match &st.link {
            Link::Synced => Served::Hit(held.secret.clone()),
            Link::Down { since, why } => {
                let from = (*since).max(held.fetched);
                let age = now.saturating_duration_since(from);
                if age <= self.cfg.max_stale {
                    Served::Hit(held.secret.clone())
                } else {
                    Served::Stale(format!(
                        "not in step with the server for {}s (watch: {why}), longer than the \
                         cache's max_stale of {}s",
                        age.as_secs(),
                        self.cfg.max_stale.as_secs()
                    ))
                }
            }
        }
    }

    /// Fetches from the server and keeps the value; a new name joins the watch.
    async fn fetch(&self, name: &str, version: u64) -> Result<CachedSecret, Error> {
        let f = self.client.fetch_secret_zeroizing(name, version).await?;
        let m = f.metadata;
        let state = VersionState::try_from(m.state).unwrap_or(VersionState::Unspecified);
        let secret = CachedSecret {
            name: m.name.clone(),
            version: m.version,
            state,
            kind: SecretKind::try_from(m.kind).unwrap_or(SecretKind::Unspecified),
            checksum: m.checksum,
            value: Arc::new(f.value),
        };
        let deadline_ms = [m.grace_until.as_ref(), m.expire_time.as_ref()]
            .into_iter()
            .flatten()
            .map(ts_ms)
            .min();
        let now = self.cfg.time.now();
        let new_name = {
            let mut st = self.lock();
            let new_name = !st.entries.contains_key(&m.name);
            let entry = st.entries.entry(m.name.clone()).or_default();
            entry.states.insert(m.version, state);
            if state == VersionState::Primary {
                entry.primary = Some(m.version);
            }
            entry.values.insert(
                m.version,
                Held {
                    secret: secret.clone(),
                    fetched: now,
                    deadline_ms,
                },
            );
            new_name
        };
        if new_name {
            self.wake.notify_one();
        }
        Ok(secret)
    }

    fn watch_request(&self) -> Option<WatchSecretsRequest> {
        let st = self.lock();
        if st.entries.is_empty() {
            return None;
        }
        Some(WatchSecretsRequest {
            names: st.entries.keys().cloned().collect(),
            held: st
                .entries
                .iter()
                .map(|(name, e)| HeldSecret {
                    name: name.clone(),
                    versions: e
                        .states
                        .iter()
                        .map(|(&version, &state)| HeldVersion {
                            version,
                            state: state as i32,
                        })
                        .collect(),
                })
                .collect(),
            ..Default::default()
        })
    }

    fn link_down(&self, why: String) {
        let now = self.cfg.time.now();
        let mut st = self.lock();
        if let Link::Synced = st.link {
            st.link = Link::Down {
                since: now,
                why: why.clone(),
            };
            drop(st);
            let _ = self.events.send(CacheEvent::Disconnected(why));
        }
    }

    /// Applies one event: removes what is no longer usable at once, then fetches a new
    /// PRIMARY (outside the lock).
    async fn apply(&self, ev: WatchEvent) {
        if ev.r#type() == WatchEventType::Synced {
            self.lock().link = Link::Synced;
            let _ = self.events.send(CacheEvent::Synced);
            return;
        }
        if let Some(meta) = &ev.secret {
            if let Some(fetch) = self.apply_metadata(meta) {
                // A failure here (revoked meanwhile, server gone) leaves the PRIMARY unheld;
                // the next get asks the server and reports what it says.
                let _ = self.fetch(&meta.name, fetch).await;
            }
        }
        let _ = self.events.send(CacheEvent::Changed(Box::new(ev)));
    }

    /// Updates an entry from the server's metadata; returns a PRIMARY to fetch, if any.
    fn apply_metadata(&self, meta: &SecretMetadata) -> Option<u64> {
        let mut st = self.lock();
        let entry = st.entries.get_mut(&meta.name)?;
        let secret_expiry = meta.expire_time.as_ref().map(ts_ms);
        entry.states.clear();
        entry.primary = None;
        for v in &meta.versions {
            let state = v.state();
            entry.states.insert(v.version, state);
            if !usable(state) {
                entry.values.remove(&v.version);
                continue;
            }
            if state == VersionState::Primary {
                entry.primary = Some(v.version);
            }
            if let Some(held) = entry.values.get_mut(&v.version) {
                held.secret.state = state;
                held.deadline_ms = [
                    v.grace_until.as_ref().map(ts_ms),
                    v.expire_time.as_ref().map(ts_ms),
                    secret_expiry,
                ]
                .into_iter()
                .flatten()
                .min();
            }
        }
        let states = &entry.states;
        entry.values.retain(|v, _| states.contains_key(v));
        entry.primary.filter(|p| !entry.values.contains_key(p))
    }
}

/// Keeps the watch stream open while the cache exists.
async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<()>) {
    let mut delay = shared.cfg.reconnect_initial;
    loop {
        let Some(req) = shared.watch_request() else {
            tokio::select! {
                _ = shared.wake.notified() => continue,
                _ = stop.changed() => return,
            }
        };
        let opened = tokio::select! {
            r = shared.client.watch_secrets(req) => r,
            _ = stop.changed() => return,
        };
        let mut reopen = false;
        match opened {
            Ok(mut stream) => loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = shared.wake.notified() => {
                        reopen = true;
                        break;
                    }
                    msg = stream.next() => match msg {
                        Some(Ok(ev)) => {
                            delay = shared.cfg.reconnect_initial;
                            shared.apply(ev).await;
                        }
                        Some(Err(e)) => {
                            shared.link_down(e.to_string());
                            break;
                        }
                        None => {
                            shared.link_down("the server ended the watch".into());
                            break;
                        }
                    }
                }
            },
            Err(e) => shared.link_down(e.to_string()),
        }
        if !reopen {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
            delay = (delay * 2).min(shared.cfg.reconnect_max);
        }
    }
}
