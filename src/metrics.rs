//! Counters shared by the gateway, the shim and the bench: the one place where drops are
//! counted by reason (see [`crate::proto::DropReason`]) and traffic is totalled.
//!
//! Counters are relaxed atomics: exact totals, no ordering between them, no locks on the
//! datagram path. [`Metrics::render_prometheus`] writes the text exposition format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// TLS handshakes completed in full (no session resumed).
    pub handshakes_full: AtomicU64,
    /// TLS handshakes that resumed a session (abbreviated), from this node or, with a
    /// shared store, from another node of the cluster.
    pub handshakes_resumed: AtomicU64,
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
            ("tls_handshakes_full_total", &self.handshakes_full),
            ("tls_handshakes_resumed_total", &self.handshakes_resumed),
        ];
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
        m.count_handshake(Some(rustls::HandshakeKind::Full));
        m.count_handshake(Some(rustls::HandshakeKind::Resumed));
        m.count_handshake(Some(rustls::HandshakeKind::Resumed));
        let text = m.render_prometheus("g");
        assert!(text.contains("g_tls_handshakes_full_total 1"), "{text}");
        assert!(text.contains("g_tls_handshakes_resumed_total 2"), "{text}");
    }
}
