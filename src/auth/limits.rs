//! The limits every backend runs under: [`Authenticator`].
//!
//! * **Bounded work.** Expensive checks run on [`AuthLimits::concurrency`] dedicated threads
//!   (one per core by default), fed by a FIFO queue of at most [`AuthLimits::max_queued`]
//!   attempts. A queued attempt whose connection's deadline passes, or whose connection goes
//!   away (the caller's `gone` future, or the caller dropping the future), is answered at
//!   once and skipped when a thread reaches it: it never runs. A full queue answers
//!   [`Verdict::Overloaded`] at once. Dedicated threads rather than tokio's blocking pool:
//!   the allocator keeps an arena per thread, and each arena that ever ran Argon2 keeps its
//!   memory (19 MiB at the default parameters) resident, so a pool that grows to dozens of
//!   threads under a flood holds hundreds of MiB even though only a few checks ever ran at
//!   once. With fixed threads, peak memory is about `concurrency` times one Argon2 run,
//!   whatever the number of clients.
//! * **Failures per source.** Each source (an IPv4 address, or an IPv6 /64: one host's share
//!   of addresses) has a token bucket of [`AuthLimits::failure_burst`] attempts, refilled one
//!   per [`AuthLimits::failure_refill`]. An attempt takes a token before it runs, and a
//!   success gives it back: so failures are what drain the bucket, and one source cannot have
//!   more than the burst in the queue at once. With the bucket empty the attempt is answered
//!   [`Verdict::RateLimited`] at once, without running the backend: the client gets the same
//!   failure reply as for a wrong password (RFC 1929 status 1, sudp AUTH_FAILED) and the
//!   connection closes. At most [`AuthLimits::tracked_sources`] sources are tracked; beyond
//!   that, sources whose buckets are full again are forgotten, and if none is, new sources
//!   share one overflow bucket (under a flood from that many addresses, they fail together
//!   rather than growing the table).
//! * **Quiet logs.** Failure lines and rate-limited lines are each rate-limited too (a burst,
//!   then a few per second); the next line that gets through says how many were suppressed.
//!   Counters ([`crate::metrics::Metrics`]) count every event.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Backend, Cost, Credentials, Identity, Method};
use crate::logsafe::Peer;
use crate::metrics::Metrics;

/// The knobs of [`Authenticator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthLimits {
    /// Most expensive checks running at once (nonzero).
    pub concurrency: usize,
    /// Most attempts waiting for a check slot.
    pub max_queued: usize,
    /// Attempts a source may have failed (or have in flight) before it is refused without a
    /// check (nonzero).
    pub failure_burst: u32,
    /// One more attempt is allowed per this much time (nonzero).
    pub failure_refill: Duration,
    /// Most sources whose failures are tracked one by one.
    pub tracked_sources: usize,
}

impl Default for AuthLimits {
    /// One check per core, 128 queued, 10 failures then one per second, 16 384 sources.
    fn default() -> Self {
        AuthLimits {
            concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_queued: 128,
            failure_burst: 10,
            failure_refill: Duration::from_secs(1),
            tracked_sources: 16_384,
        }
    }
}

/// The outcome of one authentication attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The credentials establish this identity.
    Accepted(Identity),
    /// Checked and wrong (or no backend for that method).
    Rejected,
    /// The source failed too often: refused without a check.
    RateLimited,
    /// Not checked: the queue was full, the deadline passed or the connection went away.
    Overloaded,
}

/// The key under which a source's connections and failures are counted: the IPv4 address
/// (an IPv4-mapped IPv6 address counts as its IPv4 address), or the /64 of an IPv6 address.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            at: now,
        }
    }

    fn refill(&mut self, burst: u32, per_token: Duration, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() / per_token.as_secs_f64();
        self.tokens = (self.tokens + earned).min(f64::from(burst));
        self.at = now;
    }

    fn take(&mut self, burst: u32, per_token: Duration, now: Instant) -> bool {
        self.refill(burst, per_token, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn give_back(&mut self, burst: u32, per_token: Duration, now: Instant) {
        self.refill(burst, per_token, now);
        self.tokens = (self.tokens + 1.0).min(f64::from(burst));
    }

    fn is_full(&mut self, burst: u32, per_token: Duration, now: Instant) -> bool {
        self.refill(burst, per_token, now);
        self.tokens >= f64::from(burst)
    }
}

/// Per-source failure buckets, bounded in size (sans-IO: the caller passes the time).
#[derive(Debug)]
pub(crate) struct FailureLimiter {
    burst: u32,
    per_token: Duration,
    cap: usize,
    sources: HashMap<IpAddr, Bucket>,
    overflow: Bucket,
}

impl FailureLimiter {
    pub(crate) fn new(limits: &AuthLimits, now: Instant) -> FailureLimiter {
        let burst = limits.failure_burst.max(1);
        FailureLimiter {
            burst,
            per_token: limits.failure_refill.max(Duration::from_millis(1)),
            cap: limits.tracked_sources,
            sources: HashMap::new(),
            overflow: Bucket::full(burst, now),
        }
    }

    /// The bucket of `key`, making room for it if needed.
    fn bucket(&mut self, key: IpAddr, now: Instant) -> &mut Bucket {
        let (burst, per_token) = (self.burst, self.per_token);
        if !self.sources.contains_key(&key) && self.sources.len() >= self.cap {
            self.sources.retain(|_, b| !b.is_full(burst, per_token, now));
            if self.sources.len() >= self.cap {
                return &mut self.overflow;
            }
        }
        self.sources
            .entry(key)
            .or_insert_with(|| Bucket::full(burst, now))
    }

    /// Takes a token for an attempt from `source`; false: rate-limited.
    pub(crate) fn try_take(&mut self, source: IpAddr, now: Instant) -> bool {
        let (burst, per_token) = (self.burst, self.per_token);
        self.bucket(source_key(source), now).take(burst, per_token, now)
    }

    /// Gives back the token of a successful attempt.
    pub(crate) fn give_back(&mut self, source: IpAddr, now: Instant) {
        let (burst, per_token) = (self.burst, self.per_token);
        self.bucket(source_key(source), now)
            .give_back(burst, per_token, now);
    }

    /// Sources tracked one by one.
    pub(crate) fn tracked(&self) -> usize {
        self.sources.len()
    }
}

/// Lets log lines through at a bounded rate and counts the rest.
#[derive(Debug)]
struct LogGate {
    bucket: Mutex<Bucket>,
    burst: u32,
    per_line: Duration,
    suppressed: AtomicU64,
}

impl LogGate {
    fn new(burst: u32, per_line: Duration) -> LogGate {
        LogGate {
            bucket: Mutex::new(Bucket::full(burst, Instant::now())),
            burst,
            per_line,
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log now, `n` lines were suppressed since the last one; `None`: suppress.
    fn admit(&self) -> Option<u64> {
        // A poisoned lock only means another thread panicked mid-update of two numbers.
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        if b.take(self.burst, self.per_line, Instant::now()) {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// One expensive check waiting for a thread.
struct Job {
    backend: Arc<dyn Backend>,
    credentials: Arc<Credentials>,
    deadline: Instant,
    reply: oneshot::Sender<Option<Identity>>,
}

/// A check thread: runs queued jobs until the [`Authenticator`] is dropped.
fn worker(jobs: Arc<Mutex<std::sync::mpsc::Receiver<Job>>>, running: Arc<AtomicUsize>) {
    loop {
        let job = {
            // A poisoned lock only means another worker panicked while taking a job.
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        // Nobody waits for it any more (deadline, client gone): skip it.
        if job.reply.is_closed() || Instant::now() >= job.deadline {
            continue;
        }
        running.fetch_add(1, Ordering::Relaxed);
        let outcome = job.backend.verify(&job.credentials);
        running.fetch_sub(1, Ordering::Relaxed);
        let _ = job.reply.send(outcome);
    }
}

/// The backends behind their limits: the one entry point for checking credentials.
pub struct Authenticator {
    backends: Vec<Arc<dyn Backend>>,
    limits: AuthLimits,
    jobs: std::sync::mpsc::SyncSender<Job>,
    running: Arc<AtomicUsize>,
    failures: Mutex<FailureLimiter>,
    metrics: Arc<Metrics>,
    failure_log: LogGate,
    limited_log: LogGate,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "methods",
                &self.backends.iter().map(|b| b.method()).collect::<Vec<_>>(),
            )
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Wraps `backends` (at most one per method; the first wins) in `limits`, counting into
    /// `metrics`.
    pub fn new(backends: Vec<Arc<dyn Backend>>, limits: AuthLimits, metrics: Arc<Metrics>) -> Authenticator {
        let (jobs, rx) = std::sync::mpsc::sync_channel(limits.max_queued);
        let rx = Arc::new(Mutex::new(rx));
        let running = Arc::new(AtomicUsize::new(0));
        for i in 0..limits.concurrency.max(1) {
            let (rx, running) = (rx.clone(), running.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("sudp-auth-{i}"))
                .spawn(move || worker(rx, running));
            if let Err(e) = spawned {
                // With no thread at all every expensive check answers Overloaded: visible,
                // not a hang.
                tracing::error!(error = %e, "cannot start an authentication thread");
            }
        }
        Authenticator {
            backends,
            jobs,
            running,
            failures: Mutex::new(FailureLimiter::new(&limits, Instant::now())),
            limits,
            metrics,
            failure_log: LogGate::new(20, Duration::from_millis(200)),
            limited_log: LogGate::new(1, Duration::from_secs(1)),
        }
    }

    /// Whether a backend for `method` is configured.
    pub fn has(&self, method: Method) -> bool {
        self.backend(method).is_some()
    }

    fn backend(&self, method: Method) -> Option<&Arc<dyn Backend>> {
        self.backends.iter().find(|b| b.method() == method)
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, FailureLimiter> {
        // A poisoned lock only means another thread panicked mid-update of a bucket.
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks `credentials` from `peer`. `deadline` is the connection's; `gone` completes if
    /// the connection goes away meanwhile. Counts and logs the outcome (names escaped).
    pub async fn authenticate(
        &self,
        peer: SocketAddr,
        credentials: Credentials,
        deadline: tokio::time::Instant,
        gone: impl Future<Output = ()>,
    ) -> Verdict {
        let method = credentials.method();
        let credentials = Arc::new(credentials);
        if !self.failures().try_take(peer.ip(), Instant::now()) {
            self.metrics.auth_rate_limited.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.limited_log.admit() {
                tracing::info!(%peer, method = method.name(), suppressed, "authentication rate-limited: refused without a check");
            }
            return Verdict::RateLimited;
        }
        let outcome = match self.backend(method) {
            None => Some(None),
            Some(backend) => match backend.cost() {
                Cost::Cheap => Some(backend.verify(&credentials)),
                Cost::Expensive => {
                    self.run_queued(backend.clone(), credentials.clone(), deadline, gone)
                        .await
                }
            },
        };
        match outcome {
            Some(Some(identity)) => {
                self.failures().give_back(peer.ip(), Instant::now());
                Verdict::Accepted(identity)
            }
            Some(None) => {
                self.metrics.count_auth_failure(method);
                if let Some(suppressed) = self.failure_log.admit() {
                    tracing::info!(
                        %peer,
                        method = method.name(),
                        user = %Peer(&credentials.claimed_name()),
                        suppressed,
                        "authentication failed"
                    );
                }
                Verdict::Rejected
            }
            None => {
                // Not checked: the token goes back, an unchecked attempt is no failure.
                self.failures().give_back(peer.ip(), Instant::now());
                self.metrics.auth_overloaded.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.limited_log.admit() {
                    tracing::info!(%peer, method = method.name(), suppressed, "authentication not checked: queue full, deadline passed or client gone");
                }
                Verdict::Overloaded
            }
        }
    }

    /// Runs an expensive check on a check thread. `None`: it did not run.
    async fn run_queued(
        &self,
        backend: Arc<dyn Backend>,
        credentials: Arc<Credentials>,
        deadline: tokio::time::Instant,
        gone: impl Future<Output = ()>,
    ) -> Option<Option<Identity>> {
        let (reply, outcome) = oneshot::channel();
        let job = Job {
            backend,
            credentials,
            deadline: deadline.into_std(),
            reply,
        };
        // Full (or no thread left): answered at once.
        self.jobs.try_send(job).ok()?;
        // Returning early drops `outcome`, which tells the thread to skip the job.
        tokio::select! {
            r = tokio::time::timeout_at(deadline, outcome) => r.ok()?.ok(),
            _ = gone => None,
        }
    }

    /// Checks running right now (for tests and diagnostics).
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Sources whose failures are tracked one by one (for tests and diagnostics).
    pub fn tracked_sources(&self) -> usize {
        self.failures().tracked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn limits(burst: u32) -> AuthLimits {
        AuthLimits {
            concurrency: 1,
            max_queued: 2,
            failure_burst: burst,
            failure_refill: Duration::from_secs(1),
            tracked_sources: 2,
        }
    }

    #[test]
    fn buckets_drain_on_failure_refill_with_time_and_refund_success() {
        let t0 = Instant::now();
        let mut f = FailureLimiter::new(&limits(3), t0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(f.try_take(a, t0) && f.try_take(a, t0) && f.try_take(a, t0));
        assert!(!f.try_take(a, t0), "burst spent");
        assert!(!f.try_take(a, t0 + Duration::from_millis(900)));
        assert!(
            f.try_take(a, t0 + Duration::from_millis(1900)),
            "one token a second"
        );
        // A success gives its token back.
        f.give_back(a, t0 + Duration::from_millis(1900));
        assert!(f.try_take(a, t0 + Duration::from_millis(1900)));
        // Another source is not affected.
        assert!(f.try_take("192.0.2.2".parse().unwrap(), t0));
    }

    #[test]
    fn ipv6_sources_count_per_64_and_mapped_as_ipv4() {
        assert_eq!(
            source_key("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            source_key("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        let t0 = Instant::now();
        let mut f = FailureLimiter::new(&limits(1), t0);
        assert!(f.try_take("2001:db8::1".parse().unwrap(), t0));
        assert!(!f.try_take("2001:db8::2".parse().unwrap(), t0), "same /64");
    }

    #[test]
    fn the_table_is_bounded_and_forgets_recovered_sources() {
        let t0 = Instant::now();
        let mut f = FailureLimiter::new(&limits(1), t0);
        let ip = |i: u8| IpAddr::from([192, 0, 2, i]);
        assert!(f.try_take(ip(1), t0) && f.try_take(ip(2), t0));
        assert_eq!(f.tracked(), 2);
        // Full table, nobody recovered: new sources share the overflow bucket.
        assert!(f.try_take(ip(3), t0));
        assert!(!f.try_take(ip(4), t0));
        assert_eq!(f.tracked(), 2);
        // Later the recovered sources are forgotten and new ones tracked again.
        let t1 = t0 + Duration::from_secs(5);
        assert!(f.try_take(ip(5), t1));
        assert!(f.tracked() <= 2);
    }

    /// A backend that counts its runs and sleeps.
    struct Slow(Arc<AtomicUsize>, Duration);

    impl Backend for Slow {
        fn method(&self) -> Method {
            Method::Password
        }
        fn cost(&self) -> Cost {
            Cost::Expensive
        }
        fn verify(&self, c: &Credentials) -> Option<Identity> {
            self.0.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.1);
            match c {
                Credentials::Password { user, pass } if &pass[..] == b"ok" => {
                    Some(Identity::password(std::str::from_utf8(user).ok()?))
                }
                _ => None,
            }
        }
    }

    fn peer(i: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, i], 1000))
    }

    #[tokio::test]
    async fn queue_is_bounded_and_expired_jobs_never_run() {
        let runs = Arc::new(AtomicUsize::new(0));
        let metrics = Arc::new(Metrics::default());
        let auth = Arc::new(Authenticator::new(
            vec![Arc::new(Slow(runs.clone(), Duration::from_millis(300)))],
            AuthLimits {
                failure_burst: 100,
                ..limits(100)
            },
            metrics.clone(),
        ));
        let far = tokio::time::Instant::now() + Duration::from_secs(10);
        let near = tokio::time::Instant::now() + Duration::from_millis(100);
        // One runs, two wait (one of them with a deadline that passes), the fourth finds
        // the queue full.
        let a = {
            let auth = auth.clone();
            tokio::spawn(async move {
                auth.authenticate(
                    peer(1),
                    Credentials::password(b"u", b"ok"),
                    far,
                    std::future::pending(),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        let b = {
            let auth = auth.clone();
            tokio::spawn(async move {
                auth.authenticate(
                    peer(2),
                    Credentials::password(b"u", b"x"),
                    near,
                    std::future::pending(),
                )
                .await
            })
        };
        let c = {
            let auth = auth.clone();
            tokio::spawn(async move {
                auth.authenticate(
                    peer(3),
                    Credentials::password(b"u", b"x"),
                    far,
                    std::future::ready(()),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        let d = auth
            .authenticate(
                peer(4),
                Credentials::password(b"u", b"x"),
                far,
                std::future::pending(),
            )
            .await;
        assert_eq!(a.await.unwrap(), Verdict::Accepted(Identity::password("u")));
        assert_eq!(
            b.await.unwrap(),
            Verdict::Overloaded,
            "deadline passed in the queue"
        );
        assert_eq!(c.await.unwrap(), Verdict::Overloaded, "client gone");
        assert!(matches!(d, Verdict::Overloaded | Verdict::Rejected), "{d:?}");
        // Only the first (and perhaps the fourth, once a slot freed) ever ran.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            runs.load(Ordering::SeqCst) <= 2,
            "{}",
            runs.load(Ordering::SeqCst)
        );
        assert!(metrics.auth_overloaded.load(Ordering::Relaxed) >= 2);
    }

    #[tokio::test]
    async fn rate_limited_sources_get_no_check() {
        let runs = Arc::new(AtomicUsize::new(0));
        let metrics = Arc::new(Metrics::default());
        let auth = Authenticator::new(
            vec![Arc::new(Slow(runs.clone(), Duration::ZERO))],
            AuthLimits {
                max_queued: 10,
                ..limits(2)
            },
            metrics.clone(),
        );
        let far = tokio::time::Instant::now() + Duration::from_secs(10);
        for _ in 0..2 {
            let v = auth
                .authenticate(
                    peer(1),
                    Credentials::password(b"u", b"x"),
                    far,
                    std::future::pending(),
                )
                .await;
            assert_eq!(v, Verdict::Rejected);
        }
        for _ in 0..5 {
            let v = auth
                .authenticate(
                    peer(1),
                    Credentials::password(b"u", b"ok"),
                    far,
                    std::future::pending(),
                )
                .await;
            assert_eq!(v, Verdict::RateLimited, "even the right password waits");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(metrics.auth_rate_limited.load(Ordering::Relaxed), 5);
        assert_eq!(metrics.auth_failures_by(Method::Password), 2);
        // Another source still gets through, and no backend for a method is a failure.
        let v = auth
            .authenticate(
                peer(2),
                Credentials::password(b"u", b"ok"),
                far,
                std::future::pending(),
            )
            .await;
        assert_eq!(v, Verdict::Accepted(Identity::password("u")));
        let cert = Credentials::Certificate(rustls::pki_types::CertificateDer::from(vec![0x30, 0]));
        let v = auth
            .authenticate(peer(2), cert, far, std::future::pending())
            .await;
        assert_eq!(v, Verdict::Rejected);
        assert_eq!(metrics.auth_failures_by(Method::Certificate), 1);
        assert_eq!(metrics.auth_failures.load(Ordering::Relaxed), 3);
    }
}
