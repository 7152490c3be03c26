//! Counters shared by the gateway, the shim and the bench: the one place where drops are
//! counted by reason (see [`crate::proto::DropReason`]) and traffic is totalled.
//!
//! Counters are relaxed atomics: exact totals, no ordering between them, no locks on the
//! datagram path. [`export`] turns them into the Prometheus text format at scrape time (a
//! `prometheus-client` collector reads the atomics; nothing on the hot path takes a lock),
//! and [`http`] serves that, with `/healthz`, on `--metrics ADDR`.

pub mod export;
pub mod http;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::auth::Method;
use crate::net::drops::DropTracker;

use crate::proto::DropReason;

/// Which way a datagram crossed the secure or naked leg between client and gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// RFC 1928 UDP datagrams in the clear (standard clients).
    Naked = 0,
    /// Secure-UDP records over UDP.
    Secure = 1,
    /// Secure-UDP records carried inside the TLS control connection.
    Tls = 2,
}

impl Path {
    /// Every path, in index order.
    pub const ALL: [Path; 3] = [Path::Naked, Path::Secure, Path::Tls];

    /// Stable name, used as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            Path::Naked => "naked",
            Path::Secure => "secure",
            Path::Tls => "tls",
        }
    }
}

/// Datagrams and payload bytes one way on one path.
#[derive(Debug, Default)]
pub struct Flow {
    /// Datagrams.
    pub datagrams: AtomicU64,
    /// Payload bytes.
    pub bytes: AtomicU64,
}

/// Upper bounds (microseconds) of the buckets of [`Histogram`].
pub const PROCESSING_BUCKETS_US: [u64; 12] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];

/// A fixed-bucket histogram of durations with lock-free updates (one atomic add per
/// bucket touched, per batch rather than per datagram where the caller can).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at most each bound of [`PROCESSING_BUCKETS_US`] (not cumulative), and
    /// the overflow bucket last.
    buckets: [AtomicU64; PROCESSING_BUCKETS_US.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records `n` observations of `each`.
    pub fn observe_many(&self, each: std::time::Duration, n: u64) {
        if n == 0 {
            return;
        }
        let us = each.as_micros() as u64;
        let i = PROCESSING_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(PROCESSING_BUCKETS_US.len());
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(each.as_nanos() as u64 * n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations in seconds, count, and the buckets as (upper bound in
    /// seconds, observations above the previous bound and at most this one), `+Inf` last.
    /// (The exposition makes them cumulative.)
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            total += n;
            let bound = PROCESSING_BUCKETS_US
                .get(i)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            out.push((bound, n));
        }
        (self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9, total, out)
    }
}

/// Traffic and drop counters.
#[derive(Debug, Default)]
pub struct Metrics {
    drops: [AtomicU64; DropReason::COUNT],
    /// Client to target, by path.
    pub forwarded_by: [Flow; 3],
    /// Target to client, by path.
    pub returned_by: [Flow; 3],
    /// Associations open now.
    pub associations_active: AtomicU64,
    /// Control connections open now.
    pub connections_active: AtomicU64,
    /// Bytes waiting in flow-start queues now (shim).
    pub flow_queue_bytes: AtomicU64,
    /// Gateway time per record received (classification, checks, decryption, forwarding),
    /// measured per receive batch.
    pub processing: Histogram,
    /// Datagrams received from clients and forwarded to targets.
    pub forwarded: AtomicU64,
    /// Datagrams received from targets and returned to clients.
    pub returned: AtomicU64,
    /// Payload bytes forwarded to targets.
    pub forwarded_bytes: AtomicU64,
    /// Payload bytes returned to clients.
    pub returned_bytes: AtomicU64,
    /// Control connections accepted.
    pub connections: AtomicU64,
    /// Associations opened (naked and secure).
    pub associations: AtomicU64,
    /// Authentication failures, every method (checked and wrong).
    pub auth_failures: AtomicU64,
    /// Authentication failures by method, indexed by [`Method::index`].
    auth_failures_by_method: [AtomicU64; Method::ALL.len()],
    /// Authentication attempts refused without a check: their source failed too often.
    pub auth_rate_limited: AtomicU64,
    /// Authentication attempts not checked: the queue was full, the connection's deadline
    /// passed or the client went away while queued.
    pub auth_overloaded: AtomicU64,
    /// Control connections closed at once: their source already held its share of slots.
    pub connections_over_source_cap: AtomicU64,
    /// TLS handshakes completed in full (no session resumed).
    pub handshakes_full: AtomicU64,
    /// TLS handshakes that resumed a session (abbreviated), from this node or, with a
    /// shared store, from another node of the cluster.
    pub handshakes_resumed: AtomicU64,
    /// Datagrams the kernel dropped at our own sockets' receive queues, by socket role.
    pub socket_drops: SocketDrops,
    /// Associations re-attached to a new control connection (gateway: accepted; shim:
    /// re-attached after a loss).
    pub reattached: AtomicU64,
    /// Re-attaches refused, by [`REATTACH_REFUSALS`] reason (gateway: refused; shim:
    /// refused to it, after which it opened a new association).
    pub reattach_refused: [AtomicU64; REATTACH_REFUSALS.len()],
    /// Associations this node released because another connection re-attached them.
    pub moved_away: AtomicU64,
    /// Associations opened with OPEN on a connection that already carried one (gateway:
    /// opened; shim: opened on a shared connection instead of a new one).
    pub opened_shared: AtomicU64,
    /// OPENs refused (gateway: refused; shim: refused to it), by [`OPEN_REFUSALS`] status.
    pub open_refused: [AtomicU64; OPEN_REFUSALS.len()],
    /// Associations released by their client (a client's CLOSE).
    pub released: AtomicU64,
    /// Control sessions (method 0x81) open now.
    pub control_sessions_active: AtomicU64,
    /// Delegated secret sets held now (one per inspected tunnel; gateway).
    pub delegation_secrets_held: AtomicU64,
    /// DELEGATE verdicts, indexed by the status code 0x00..=0x08 (9: any other).
    delegations: [AtomicU64; DELEGATION_STATUSES],
    /// Tunnels whose secrets were accepted and that were decrypted.
    pub tunnels_inspected: AtomicU64,
    /// Tapped tunnels that stayed or turned opaque (secrets too late or never, not TLS 1.3,
    /// a record that did not open, the inspector fell behind).
    pub tunnels_opaque: AtomicU64,
    /// End-to-end tunnels closed at their lifetime (`e2e_ttl`).
    pub e2e_expired: AtomicU64,
}

/// The refusal reasons of a REATTACH, as metric labels (index of
/// [`Metrics::reattach_refused`]).
pub const REATTACH_REFUSALS: [crate::proto::frame::RefuseReason; 6] = {
    use crate::proto::frame::RefuseReason as R;
    [
        R::Unknown,
        R::NotOwner,
        R::Anonymous,
        R::Busy,
        R::AlreadyAttached,
        R::Other(0),
    ]
};

/// The refusal statuses of an OPEN, as metric labels (index of [`Metrics::open_refused`]).
pub const OPEN_REFUSALS: [crate::proto::frame::OpenStatus; 3] = {
    use crate::proto::frame::OpenStatus as S;
    [S::Limit, S::Failed, S::Other(0)]
};

impl Metrics {
    /// Counts a refused OPEN (an `Opened` status is not a refusal and is not counted).
    pub fn count_open_refused(&self, status: crate::proto::frame::OpenStatus) {
        use crate::proto::frame::OpenStatus as S;
        let i = match status {
            S::Opened => return,
            S::Limit => 0,
            S::Failed => 1,
            S::Other(_) => 2,
        };
        self.open_refused[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused re-attach.
    pub fn count_reattach_refused(&self, reason: crate::proto::frame::RefuseReason) {
        use crate::proto::frame::RefuseReason as R;
        let i = match reason {
            R::Unknown => 0,
            R::NotOwner => 1,
            R::Anonymous => 2,
            R::Busy => 3,
            R::AlreadyAttached => 4,
            R::Other(_) => 5,
        };
        self.reattach_refused[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Slots of the DELEGATE verdict counters: codes 0x00..=0x08 and one for the rest.
pub const DELEGATION_STATUSES: usize = 10;

/// Holds one unit of a gauge of [`Metrics`] (e.g. `connections_active`) while alive, so the
/// gauge is right even when the task holding it is aborted.
pub struct GaugeGuard {
    metrics: Arc<Metrics>,
    gauge: fn(&Metrics) -> &AtomicU64,
}

impl GaugeGuard {
    /// Adds one to `gauge` until the guard is dropped.
    pub fn new(metrics: Arc<Metrics>, gauge: fn(&Metrics) -> &AtomicU64) -> GaugeGuard {
        gauge(&metrics).fetch_add(1, Ordering::Relaxed);
        GaugeGuard { metrics, gauge }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.gauge)(&self.metrics).fetch_sub(1, Ordering::Relaxed);
    }
}

/// Kernel receive-queue drops at sudp's own sockets ([`crate::net::drops`]), by role.
#[derive(Debug, Default)]
pub struct SocketDrops {
    /// Gateway: the relay sockets (datagrams from clients).
    pub relay: Arc<DropTracker>,
    /// Gateway: the per-association sockets (replies from targets). Shim: the sockets of
    /// its secure associations (records from the gateway).
    pub outbound: Arc<DropTracker>,
    /// Shim: the sockets applications send to (forwards, SOCKS5 UDP relays).
    pub local: Arc<DropTracker>,
}

impl SocketDrops {
    /// Each role's name (a metric label) and tracker.
    pub fn by_role(&self) -> [(&'static str, &Arc<DropTracker>); 3] {
        [
            ("relay", &self.relay),
            ("outbound", &self.outbound),
            ("local", &self.local),
        ]
    }

    /// Every role's drops, read now.
    pub fn total(&self) -> u64 {
        self.by_role().iter().map(|(_, t)| t.total()).sum()
    }
}

impl Metrics {
    /// Counts one DELEGATE verdict.
    pub fn count_delegation(&self, status: crate::proto::frame::DelegateStatus) {
        let i = (status.code() as usize).min(DELEGATION_STATUSES - 1);
        self.delegations[i].fetch_add(1, Ordering::Relaxed);
    }

    /// DELEGATE verdicts counted with `status` so far.
    pub fn delegations(&self, status: crate::proto::frame::DelegateStatus) -> u64 {
        let i = (status.code() as usize).min(DELEGATION_STATUSES - 1);
        self.delegations[i].load(Ordering::Relaxed)
    }

    /// Counts one dropped datagram.
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Drops counted for `reason` so far.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }

    /// All drops, every reason.
    pub fn total_drops(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.drops(*r)).sum()
    }

    /// Non-zero drop counters, for logs.
    pub fn drop_summary(&self) -> String {
        let mut s = String::new();
        for r in DropReason::ALL {
            let n = self.drops(r);
            if n > 0 {
                let _ = write!(s, "{}{}={}", if s.is_empty() { "" } else { " " }, r.name(), n);
            }
        }
        for (role, t) in self.socket_drops.by_role() {
            let n = t.total();
            if n > 0 {
                let _ = write!(s, "{}kernel_{role}={n}", if s.is_empty() { "" } else { " " });
            }
        }
        if s.is_empty() {
            s.push_str("none");
        }
        s
    }

    /// Counts a finished TLS handshake by its kind (`handshake_kind()` of the connection).
    pub fn count_handshake(&self, kind: Option<rustls::HandshakeKind>) {
        let counter = match kind {
            Some(rustls::HandshakeKind::Resumed) => &self.handshakes_resumed,
            _ => &self.handshakes_full,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one authentication failure of `method`.
    pub fn count_auth_failure(&self, method: Method) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
        self.auth_failures_by_method[method.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Authentication failures of `method` so far.
    pub fn auth_failures_by(&self, method: Method) -> u64 {
        self.auth_failures_by_method[method.index()].load(Ordering::Relaxed)
    }

    /// Counts `datagrams` forwarded (client to target) on `path`, `bytes` payload bytes in all.
    pub fn forwarded_on(&self, path: Path, datagrams: u64, bytes: u64) {
        self.forwarded.fetch_add(datagrams, Ordering::Relaxed);
        self.forwarded_bytes.fetch_add(bytes, Ordering::Relaxed);
        let f = &self.forwarded_by[path as usize];
        f.datagrams.fetch_add(datagrams, Ordering::Relaxed);
        f.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts `datagrams` returned (target to client) on `path`, `bytes` payload bytes in all.
    pub fn returned_on(&self, path: Path, datagrams: u64, bytes: u64) {
        self.returned.fetch_add(datagrams, Ordering::Relaxed);
        self.returned_bytes.fetch_add(bytes, Ordering::Relaxed);
        let f = &self.returned_by[path as usize];
        f.datagrams.fetch_add(datagrams, Ordering::Relaxed);
        f.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn histogram_buckets_count_each_range() {
        let h = super::Histogram::default();
        h.observe_many(std::time::Duration::from_nanos(500), 3);
        h.observe_many(std::time::Duration::from_micros(3), 2);
        h.observe_many(std::time::Duration::from_secs(1), 1);
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 6);
        assert!((sum - (1.5e-6 + 6e-6 + 1.0)).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (1e-6, 3));
        assert_eq!(buckets[1], (2e-6, 0));
        assert_eq!(buckets[2], (4e-6, 2));
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 1));
    }

    use super::*;

    #[test]
    fn counts_by_reason() {
        let m = Metrics::default();
        m.count_drop(DropReason::BadMac);
        m.count_drop(DropReason::BadMac);
        m.count_drop(DropReason::Duplicate);
        assert_eq!(m.drops(DropReason::BadMac), 2);
        assert_eq!(m.total_drops(), 3);
        assert_eq!(m.drop_summary(), "duplicate=1 bad_mac=2");
    }
}
