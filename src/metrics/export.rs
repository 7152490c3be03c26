//! The Prometheus text exposition of a [`Metrics`]: one `prometheus-client` registry whose
//! collector reads the atomics at scrape time, so the datagram path never takes a lock for
//! metrics. Gauges that live elsewhere (associations in the relay table, ...) are read through
//! closures the owner registers.
//!
//! Every metric is listed, with its meaning, in `docs/OPERATIONS.md`.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::audit::AuditLog;
use crate::metrics::{Metrics, Path};
use crate::proto::DropReason;

/// A gauge read at scrape time: name (without prefix), help, reader.
type GaugeFn = (&'static str, &'static str, Box<dyn Fn() -> i64 + Send + Sync>);

/// Renders a [`Metrics`] (and registered gauges) in the Prometheus text format.
pub struct Exporter {
    registry: Registry,
}

impl fmt::Debug for Exporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

struct Collector {
    metrics: Arc<Metrics>,
    gauges: Vec<GaugeFn>,
    /// The gateway's audit writer, whose lost lines are counted (`None`: the shim, which
    /// writes no audit lines).
    audit: Option<AuditLog>,
}

impl fmt::Debug for Collector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Collector").finish_non_exhaustive()
    }
}

impl Exporter {
    /// An exporter of `metrics` whose names start with `prefix` (`sudp_gateway`,
    /// `sudp_shim`), with extra gauges read at each scrape.
    pub fn new(prefix: &str, metrics: Arc<Metrics>, gauges: Vec<GaugeFn>) -> Exporter {
        Exporter::build(prefix, metrics, gauges, None)
    }

    /// [`Exporter::new`] that also counts the audit lines `audit` lost
    /// (`audit_lines_lost_total{why="dropped|failed"}`).
    pub fn with_audit(
        prefix: &str,
        metrics: Arc<Metrics>,
        gauges: Vec<GaugeFn>,
        audit: AuditLog,
    ) -> Exporter {
        Exporter::build(prefix, metrics, gauges, Some(audit))
    }

    fn build(prefix: &str, metrics: Arc<Metrics>, gauges: Vec<GaugeFn>, audit: Option<AuditLog>) -> Exporter {
        let mut registry = Registry::with_prefix(prefix);
        registry.register_collector(Box::new(Collector {
            metrics,
            gauges,
            audit,
        }));
        Exporter { registry }
    }

    /// The text exposition, format 0.0.4 (`text/plain; version=0.0.4`).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Invariant: writing to a String cannot fail, and the collector only formats numbers.
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("formatting into a String");
        out
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

        {
            let mut family = enc.encode_descriptor(
                "dropped_datagrams",
                "Datagrams dropped by sudp, by reason (PROTOCOL.md section 7)",
                None,
                MetricType::Counter,
            )?;
            for r in DropReason::ALL {
                let labels = [("reason", r.name())];
                ConstCounter::new(m.drops(r)).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = enc.encode_descriptor(
                "kernel_dropped_datagrams",
                "Datagrams the kernel dropped at the receive queue of sudp's own sockets, by socket role",
                None,
                MetricType::Counter,
            )?;
            for (role, t) in m.socket_drops.by_role() {
                let labels = [("socket", role)];
                ConstCounter::new(t.total()).encode(family.encode_family(&labels)?)?;
            }
        }
        for (name, help, flows) in [
            (
                "datagrams",
                "Datagrams relayed, by direction (forwarded: client to target; returned: target to client) and path",
                0usize,
            ),
            ("payload_bytes", "Payload bytes relayed, by direction and path", 1),
        ] {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (direction, by) in [("forwarded", &m.forwarded_by), ("returned", &m.returned_by)] {
                for p in Path::ALL {
                    let f = &by[p as usize];
                    let v = if flows == 0 { load(&f.datagrams) } else { load(&f.bytes) };
                    let labels = [("direction", direction), ("path", p.name())];
                    ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        counter(
            &mut enc,
            "connections",
            "Control connections accepted (gateway) or TCP connections opened through the gateway (shim)",
            load(&m.connections),
        )?;
        counter(
            &mut enc,
            "associations",
            "UDP associations opened",
            load(&m.associations),
        )?;
        {
            let mut family = enc.encode_descriptor(
                "tls_handshakes",
                "TLS handshakes of control connections, by kind (full, or resumed from a session of this node or, with a shared store, of another)",
                None,
                MetricType::Counter,
            )?;
            for (kind, c) in [("full", &m.handshakes_full), ("resumed", &m.handshakes_resumed)] {
                let labels = [("kind", kind)];
                ConstCounter::new(load(c)).encode(family.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut enc,
            "associations_reattached",
            "Associations re-attached to a new control connection (after a node loss, a broken connection or roaming)",
            load(&m.reattached),
        )?;
        counter(
            &mut enc,
            "associations_moved_away",
            "Associations released here because another control connection re-attached them",
            load(&m.moved_away),
        )?;
        counter(
            &mut enc,
            "associations_opened_shared",
            "Associations opened with OPEN on a control connection that already carried one",
            load(&m.opened_shared),
        )?;
        counter(
            &mut enc,
            "associations_released",
            "Associations released by their client (a client's CLOSE)",
            load(&m.released),
        )?;
        {
            let mut family = enc.encode_descriptor(
                "open_refused",
                "OPENs (one more association on a control connection) refused, by status",
                None,
                MetricType::Counter,
            )?;
            for (i, r) in crate::metrics::OPEN_REFUSALS.iter().enumerate() {
                let labels = [("status", r.name())];
                ConstCounter::new(load(&m.open_refused[i])).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = enc.encode_descriptor(
                "reattach_refused",
                "Re-attaches refused, by reason",
                None,
                MetricType::Counter,
            )?;
            for (i, r) in crate::metrics::REATTACH_REFUSALS.iter().enumerate() {
                let labels = [("reason", r.name())];
                ConstCounter::new(load(&m.reattach_refused[i])).encode(family.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut enc,
            "control_sessions_active",
            "Control sessions (method 0x81, delegation) open now",
            load(&m.control_sessions_active) as i64,
        )?;
        gauge(
            &mut enc,
            "delegation_secrets_held",
            "Delegated TLS secret sets held now, one per inspected CONNECT tunnel (zero once their tunnels or control sessions end)",
            load(&m.delegation_secrets_held) as i64,
        )?;
        {
            use crate::proto::frame::DelegateStatus;
            let mut family = enc.encode_descriptor(
                "delegations",
                "DELEGATE frames answered, by verdict (accepted, or why the secrets were refused)",
                None,
                MetricType::Counter,
            )?;
            for code in 0..crate::metrics::DELEGATION_STATUSES as u8 {
                let status = DelegateStatus::from_code(code);
                let labels = [("status", status.name())];
                ConstCounter::new(m.delegations(status)).encode(family.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut enc,
            "tunnels_inspected",
            "CONNECT tunnels decrypted with delegated secrets",
            load(&m.tunnels_inspected),
        )?;
        counter(
            &mut enc,
            "tunnels_opaque",
            "Tapped CONNECT tunnels left opaque (secrets too late or never, not TLS 1.3, a record that did not open)",
            load(&m.tunnels_opaque),
        )?;
        counter(
            &mut enc,
            "e2e_expired",
            "End-to-end CONNECT tunnels closed at their maximum lifetime (e2e_ttl)",
            load(&m.e2e_expired),
        )?;
        {
            let mut family = enc.encode_descriptor(
                "auth_failures",
                "Authentication attempts refused, by method",
                None,
                MetricType::Counter,
            )?;
            // By the method the credentials came with (a password the KDC refused is a
            // `password` failure).
            for method in crate::auth::Method::CREDENTIALS {
                let labels = [("method", method.name())];
                ConstCounter::new(m.auth_failures_by(method)).encode(family.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut enc,
            "auth_rate_limited",
            "Authentication attempts answered with a failure without a check: their source failed too often",
            load(&m.auth_rate_limited),
        )?;
        counter(
            &mut enc,
            "auth_overloaded",
            "Authentication attempts not checked: the verification queue was full, the deadline passed or the client left",
            load(&m.auth_overloaded),
        )?;
        counter(
            &mut enc,
            "connections_over_source_cap",
            "Control connections closed at once because their source already held its share of slots",
            load(&m.connections_over_source_cap),
        )?;
        gauge(
            &mut enc,
            "associations_active",
            "UDP associations open now",
            load(&m.associations_active) as i64,
        )?;
        gauge(
            &mut enc,
            "connections_active",
            "Control connections open now",
            load(&m.connections_active) as i64,
        )?;
        gauge(
            &mut enc,
            "flow_queue_bytes",
            "Bytes waiting in flow-start queues while associations open (shim)",
            load(&m.flow_queue_bytes) as i64,
        )?;
        if let Some(audit) = &self.audit {
            let mut family = enc.encode_descriptor(
                "audit_lines_lost",
                "Audit lines not written: the queue to the writer was full (dropped) or the file refused them (failed)",
                None,
                MetricType::Counter,
            )?;
            for (why, n) in [("dropped", audit.dropped()), ("failed", audit.failed())] {
                ConstCounter::new(n).encode(family.encode_family(&[("why", why)])?)?;
            }
        }
        for (name, help, read) in &self.gauges {
            gauge(&mut enc, name, help, read())?;
        }
        let (sum, count, buckets) = m.processing.snapshot();
        let mut h = enc.encode_descriptor(
            "record_processing_seconds",
            "Gateway time per datagram received from clients (checks, decryption, forwarding), measured per receive batch",
            None,
            MetricType::Histogram,
        )?;
        h.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_the_counts() {
        let m = Arc::new(Metrics::default());
        m.count_drop(DropReason::Duplicate);
        m.forwarded_on(Path::Secure, 3, 300);
        m.returned_on(Path::Naked, 1, 10);
        m.processing.observe_many(std::time::Duration::from_micros(3), 4);
        m.count_auth_failure(crate::auth::Method::Certificate);
        let e = Exporter::with_audit(
            "sudp_gateway",
            m.clone(),
            vec![("relay_workers", "Relay receive workers", Box::new(|| 2))],
            AuditLog::disabled(),
        );
        let text = e.render();
        for line in [
            "sudp_gateway_dropped_datagrams_total{reason=\"duplicate\"} 1",
            "sudp_gateway_dropped_datagrams_total{reason=\"bad_mac\"} 0",
            "sudp_gateway_kernel_dropped_datagrams_total{socket=\"relay\"} 0",
            "sudp_gateway_datagrams_total{direction=\"forwarded\",path=\"secure\"} 3",
            "sudp_gateway_payload_bytes_total{direction=\"forwarded\",path=\"secure\"} 300",
            "sudp_gateway_datagrams_total{direction=\"returned\",path=\"naked\"} 1",
            "sudp_gateway_relay_workers 2",
            "sudp_gateway_auth_failures_total{method=\"certificate\"} 1",
            "sudp_gateway_auth_failures_total{method=\"password\"} 0",
            "sudp_gateway_auth_failures_total{method=\"gssapi\"} 0",
            "sudp_gateway_audit_lines_lost_total{why=\"dropped\"} 0",
            "sudp_gateway_audit_lines_lost_total{why=\"failed\"} 0",
            "sudp_gateway_record_processing_seconds_count 4",
            "sudp_gateway_record_processing_seconds_bucket{le=\"2e-06\"} 0",
            "sudp_gateway_record_processing_seconds_bucket{le=\"4e-06\"} 4",
            "sudp_gateway_record_processing_seconds_bucket{le=\"+Inf\"} 4",
            "# TYPE sudp_gateway_record_processing_seconds histogram",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Kerberos is an identity's method, never a wire method failures are counted by.
        assert!(!text.contains("method=\"kerberos\""), "{text}");
        let shim = Exporter::new("sudp_shim", m, Vec::new()).render();
        assert!(
            !shim.contains("audit_lines_lost"),
            "the shim writes no audit lines"
        );
    }
}
