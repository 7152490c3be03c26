//! Counters shared by the gateway, the shim and the bench: the one place where drops are
//! counted by reason (see [`crate::proto::DropReason`]) and traffic is totalled.
//!
//! Counters are relaxed atomics: exact totals, no ordering between them, no locks on the
//! datagram path. [`Metrics::render_prometheus`] writes the text exposition format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::net::drops::DropTracker;

use crate::proto::DropReason;

/// Traffic and drop counters.
#[derive(Debug, Default)]
pub struct Metrics {
    drops: [AtomicU64; DropReason::COUNT],
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
    /// Authentication failures.
    pub auth_failures: AtomicU64,
    /// Datagrams the kernel dropped at our own sockets' receive queues, by socket role.
    pub socket_drops: SocketDrops,
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

    /// Counts a forwarded datagram of `bytes` payload bytes.
    pub fn forwarded(&self, bytes: usize) {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        self.forwarded_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts a returned datagram of `bytes` payload bytes.
    pub fn returned(&self, bytes: usize) {
        self.returned.fetch_add(1, Ordering::Relaxed);
        self.returned_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Prometheus text exposition of every counter, names prefixed with `prefix`.
    pub fn render_prometheus(&self, prefix: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# TYPE {prefix}_dropped_datagrams_total counter");
        for r in DropReason::ALL {
            let _ = writeln!(
                s,
                "{prefix}_dropped_datagrams_total{{reason=\"{}\"}} {}",
                r.name(),
                self.drops(r)
            );
        }
        let plain = [
            ("forwarded_datagrams_total", &self.forwarded),
            ("returned_datagrams_total", &self.returned),
            ("forwarded_bytes_total", &self.forwarded_bytes),
            ("returned_bytes_total", &self.returned_bytes),
            ("connections_total", &self.connections),
            ("associations_total", &self.associations),
            ("auth_failures_total", &self.auth_failures),
        ];
        let _ = writeln!(s, "# TYPE {prefix}_kernel_dropped_datagrams_total counter");
        for (role, t) in self.socket_drops.by_role() {
            let _ = writeln!(
                s,
                "{prefix}_kernel_dropped_datagrams_total{{socket=\"{role}\"}} {}",
                t.total()
            );
        }
        for (name, c) in plain {
            let _ = writeln!(
                s,
                "# TYPE {prefix}_{name} counter\n{prefix}_{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason_and_renders() {
        let m = Metrics::default();
        m.count_drop(DropReason::BadMac);
        m.count_drop(DropReason::BadMac);
        m.count_drop(DropReason::Duplicate);
        assert_eq!(m.drops(DropReason::BadMac), 2);
        assert_eq!(m.total_drops(), 3);
        assert_eq!(m.drop_summary(), "duplicate=1 bad_mac=2");
        let text = m.render_prometheus("sudp_gateway");
        assert!(text.contains("sudp_gateway_dropped_datagrams_total{reason=\"bad_mac\"} 2"));
        assert!(text.contains("sudp_gateway_forwarded_datagrams_total 0"));
    }
}
