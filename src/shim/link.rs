//! A secure association that outlives its control connection.
//!
//! A [`Link`] holds at most one [`SecureUdp`] at a time. A supervisor task opens it, watches
//! it, and when it is lost (the gateway closed the control connection, or a send or
//! receive failed) reconnects:
//!
//! ```text
//!            open ok                         closed / send or recv error
//!  connecting ───────▶ up (published) ──────────────────────────────▶ lost
//!     ▲   │ fail: wait backoff (100 ms, doubling, at most 5 s),           │
//!     │   └──────── try the next gateway of the list                     │
//!     └──────────────────────────────────────────────────────────────────┘
//!             starting with the gateway after the one that was lost
//! ```
//!
//! The backoff is reset after every success. Local sockets belong to the link's owner and
//! stay open throughout, so an application sees only the datagrams lost meanwhile. What an
//! application sends while the link is down (a new flow's first burst, while its association
//! opens; or a reconnection) waits in the **flow-start queue**, bounded in bytes (the shim's
//! `flow_queue`, [`DEFAULT_FLOW_QUEUE`] by default; none older than [`PENDING_MAX_AGE`]), and
//! goes out in order as soon as an association is up: an unpaced video burst at the start of a
//! flow is delivered whole. What still does not fit is dropped from the tail (the start of a
//! stream, with its codec headers and first key frame, matters most, and what is kept stays
//! contiguous), counted (`queue_full`, `queue_expired`) and logged once per opening, with a
//! summary when the queue drains.
//!
//! A refusal that no retry can fix (the gateway refused the login or a certificate: see
//! [`ClientError::is_permanent`]) is not retried with the backoff: the dialer logs its cause
//! once and answers with it for [`crate::shim::REFUSAL_HOLD`], and the link asks the gateway
//! again only after [`REFUSAL_RETRY`] and only if it had traffic meanwhile.
//!
//! Each step is logged once: the loss, each failed attempt, the recovery. A link without
//! traffic for [`DORMANT_AFTER`] does not reconnect until it has something to send, so an
//! association that the gateway closed for idleness is not reopened for nothing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::client::{ClientError, Received, SecureUdp};
use crate::metrics::Path;
use crate::proto::record::{record_len, PREFIX_LEN};
use crate::proto::socks::AddrRef;
use crate::proto::{DropReason, SealError};
use crate::shim::Dialer;

/// First wait after a failed attempt.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bytes of records the flow-start queue of one link holds by default (4 MiB: a couple of
/// seconds of an unpaced HD video start).
pub const DEFAULT_FLOW_QUEUE: usize = 4 << 20;
/// Datagrams that waited longer than this are dropped rather than sent late.
pub const PENDING_MAX_AGE: Duration = Duration::from_secs(2);
/// A lost link idle this long reconnects only when it has something to send.
pub const DORMANT_AFTER: Duration = Duration::from_secs(30);
/// After a permanent refusal (credentials, certificate), the wait before a link asks the
/// gateway again, and then only if it has had traffic meanwhile: a shim whose login is wrong
/// costs the gateway one attempt per link per this much, not a retry loop.
pub const REFUSAL_RETRY: Duration = crate::shim::REFUSAL_HOLD;

/// One live association and the signal its users raise when it fails.
pub struct Assoc {
    /// The association.
    pub udp: SecureUdp,
    failed: Notify,
}

/// A reconnecting secure association (see the module documentation).
pub struct Link {
    shared: Arc<Shared>,
    supervisor: JoinHandle<()>,
}

struct Shared {
    label: String,
    dialer: Arc<Dialer>,
    current: watch::Sender<Option<Arc<Assoc>>>,
    /// Raised by a send while the link is dormant.
    wake: Notify,
    pending: Mutex<Pending>,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last send.
    last_send: AtomicU64,
    metrics: Arc<crate::metrics::Metrics>,
    /// Bytes the flow-start queue may hold.
    queue_limit: usize,
}

#[derive(Default)]
struct Pending {
    /// Record buffers with the plaintext at `PREFIX_LEN`, its length, and when queued.
    queue: VecDeque<(Vec<u8>, usize, Instant)>,
    /// Bytes of the record buffers held (what the queue costs in memory).
    bytes: usize,
    /// Datagrams and bytes dropped since the queue last drained (for the log summary).
    dropped: (u64, u64),
}

impl Link {
    /// Starts a link named `label` (for logs). With `first`, an association already opened
    /// through gateway `first.1` is used until it is lost; without, the supervisor opens one.
    pub(crate) fn spawn(dialer: Arc<Dialer>, label: String, first: Option<(SecureUdp, usize)>) -> Link {
        let metrics = dialer.metrics.clone();
        let queue_limit = dialer.flow_queue;
        let shared = Arc::new(Shared {
            label,
            dialer,
            current: watch::Sender::new(None),
            wake: Notify::new(),
            pending: Mutex::new(Pending::default()),
            epoch: Instant::now(),
            last_send: AtomicU64::new(0),
            metrics,
            queue_limit,
        });
        let supervisor = tokio::spawn(supervise(shared.clone(), first));
        Link { shared, supervisor }
    }

    /// True while an association is up.
    pub fn is_up(&self) -> bool {
        self.shared.current.borrow().is_some()
    }

    /// The association in use, if the link is up (the batched send path seals for it
    /// directly; see [`Link::sent`] and [`Link::send_failed`]).
    pub(crate) fn current(&self) -> Option<Arc<Assoc>> {
        self.shared.current.borrow().clone()
    }

    /// Notes that datagrams of these payload lengths left through [`Link::current`]'s
    /// association (one train).
    pub(crate) fn sent(&self, via_tls: bool, payload_lens: &[usize]) {
        let s = &self.shared;
        s.last_send.store(s.now_ms(), Ordering::Relaxed);
        s.metrics.forwarded_on(
            if via_tls { Path::Tls } else { Path::Secure },
            payload_lens.len() as u64,
            payload_lens.iter().sum::<usize>() as u64,
        );
    }

    /// Reports that sending `count` records through `assoc` failed with `e`: counted, and
    /// the association given up if the error is fatal (as [`Link::send`] does).
    pub(crate) fn send_failed(&self, assoc: &Arc<Assoc>, count: usize, e: &std::io::Error) {
        for _ in 0..count {
            self.shared.metrics.count_drop(DropReason::SendFailed);
        }
        if is_fatal(e) {
            tracing::debug!(link = %self.shared.label, error = %e, "send failed");
            self.shared.fail(assoc, "send failed");
        }
    }

    /// Reports a record that could not be sealed (a key at its limit ends the association).
    pub(crate) fn seal_failed(&self, assoc: &Arc<Assoc>, e: SealError) {
        self.shared.metrics.count_drop(e.reason());
        if matches!(e, SealError::KeyExhausted { .. }) {
            self.shared.fail(assoc, "sending key exhausted");
        }
    }

    /// A receiver of the datagrams the gateway returns, across reconnections.
    pub fn receiver(&self) -> LinkRx {
        LinkRx {
            shared: self.shared.clone(),
            rx: self.shared.current.subscribe(),
        }
    }

    /// Seals and sends the plaintext (target address, then payload) that the caller placed
    /// at `buf[PREFIX_LEN..PREFIX_LEN + plaintext_len]`; `buf` must have room for the record.
    /// While the link is down the datagram waits (bounded). Failures are counted, not
    /// returned: a datagram is either sent, queued or dropped.
    pub async fn send(&self, buf: &mut [u8], plaintext_len: usize) {
        let s = &self.shared;
        s.last_send.store(s.now_ms(), Ordering::Relaxed);
        let assoc = s.current.borrow().clone();
        let assoc = match assoc {
            Some(a) => a,
            None => match s.enqueue(&buf[PREFIX_LEN..PREFIX_LEN + plaintext_len]) {
                // Published while we were about to queue: send it directly after all.
                Some(a) => a,
                None => return,
            },
        };
        s.send_on(&assoc, buf, plaintext_len).await;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.supervisor.abort();
        // What still waits for an association is lost with the link: counted, never silent.
        let mut p = self.shared.pending.lock().unwrap_or_else(|e| e.into_inner());
        let left = p.queue.len() as u64;
        if left > 0 {
            for _ in 0..left {
                self.shared.metrics.count_drop(DropReason::QueueExpired);
            }
            self.shared
                .metrics
                .flow_queue_bytes
                .fetch_sub(p.bytes as u64, Ordering::Relaxed);
            tracing::warn!(
                link = %self.shared.label,
                dropped = left,
                "flow closed before its association was up: its queued datagrams are dropped"
            );
            p.queue.clear();
            p.bytes = 0;
        }
        drop(p);
        // Close the association now rather than when the last receiver lets go of it.
        self.shared.current.send_replace(None);
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn idle_for(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_send.load(Ordering::Relaxed)),
        )
    }

    /// Queues a plaintext while the link is down; returns the association instead if one
    /// was published meanwhile (checked under the queue lock, which publishing also takes).
    fn enqueue(&self, plaintext: &[u8]) -> Option<Arc<Assoc>> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = self.current.borrow().clone() {
            return Some(a);
        }
        let need = record_len(plaintext.len());
        if p.bytes + need > self.queue_limit {
            // Tail drop: what is queued stays contiguous from the start of the stream.
            self.metrics.count_drop(DropReason::QueueFull);
            if p.dropped.0 == 0 {
                tracing::warn!(
                    link = %self.label,
                    queued = p.queue.len(),
                    bytes = p.bytes,
                    limit = self.queue_limit,
                    "flow-start queue full while the association opens: dropping datagrams \
                     (raise `flow_queue`, or pace the sender)"
                );
            }
            p.dropped.0 += 1;
            p.dropped.1 += plaintext.len() as u64;
            drop(p);
            self.wake.notify_one();
            return None;
        }
        let mut rec = vec![0u8; need];
        rec[PREFIX_LEN..PREFIX_LEN + plaintext.len()].copy_from_slice(plaintext);
        p.bytes += need;
        self.metrics
            .flow_queue_bytes
            .fetch_add(need as u64, Ordering::Relaxed);
        p.queue.push_back((rec, plaintext.len(), Instant::now()));
        drop(p);
        self.wake.notify_one();
        None
    }

    async fn send_on(&self, assoc: &Arc<Assoc>, buf: &mut [u8], plaintext_len: usize) {
        // Payload bytes for the counters: the plaintext less the target's address (read
        // before sealing encrypts it).
        let payload_len = AddrRef::parse(&buf[PREFIX_LEN..PREFIX_LEN + plaintext_len])
            .map_or(plaintext_len, |(_, n)| plaintext_len - n);
        match assoc.udp.send_in_place(buf, plaintext_len).await {
            Ok(_) => self.metrics.forwarded_on(
                if assoc.udp.via_tls() {
                    Path::Tls
                } else {
                    Path::Secure
                },
                1,
                payload_len as u64,
            ),
            Err(ClientError::Seal(e @ SealError::KeyExhausted { .. })) => {
                self.metrics.count_drop(e.reason());
                self.fail(assoc, "sending key exhausted");
            }
            Err(ClientError::Seal(e)) => self.metrics.count_drop(e.reason()),
            Err(ClientError::Io(e)) if is_fatal(&e) => {
                self.metrics.count_drop(DropReason::SendFailed);
                self.fail(assoc, "send failed");
                tracing::debug!(link = %self.label, error = %e, "send failed");
            }
            Err(_) => self.metrics.count_drop(DropReason::SendFailed),
        }
    }

    fn fail(&self, assoc: &Arc<Assoc>, why: &str) {
        tracing::debug!(link = %self.label, why, "association failed");
        assoc.failed.notify_one();
    }

    /// Sends what waited, oldest first, then publishes `assoc`. Publishing happens under the
    /// queue lock when the queue is empty, so no datagram is left behind in it.
    async fn publish(&self, assoc: Arc<Assoc>) {
        loop {
            let next = {
                let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                match p.queue.pop_front() {
                    Some(item) => {
                        p.bytes -= item.0.len();
                        self.metrics
                            .flow_queue_bytes
                            .fetch_sub(item.0.len() as u64, Ordering::Relaxed);
                        Some(item)
                    }
                    None => {
                        self.current.send_replace(Some(assoc.clone()));
                        let (n, bytes) = std::mem::take(&mut p.dropped);
                        if n > 0 {
                            tracing::warn!(
                                link = %self.label,
                                dropped = n,
                                bytes,
                                "flow-start queue drained; datagrams were dropped while the association opened"
                            );
                        }
                        None
                    }
                }
            };
            let Some((mut rec, len, queued)) = next else {
                return;
            };
            if queued.elapsed() > PENDING_MAX_AGE {
                self.metrics.count_drop(DropReason::QueueExpired);
                let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                p.dropped.0 += 1;
                p.dropped.1 += len as u64;
                continue;
            }
            self.send_on(&assoc, &mut rec, len).await;
        }
    }
}

/// Errors after which an association is given up: the gateway's relay port is closed (an
/// ICMP port unreachable surfaces as ECONNREFUSED on the connected socket) or the network
/// path is gone.
fn is_fatal(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::NetworkUnreachable
            | std::io::ErrorKind::HostUnreachable
            | std::io::ErrorKind::AddrNotAvailable
    )
}

/// The wait after `current`: doubled, at most [`BACKOFF_MAX`].
fn next_backoff(current: Duration) -> Duration {
    (current * 2).clamp(BACKOFF_MIN, BACKOFF_MAX)
}

async fn supervise(shared: Arc<Shared>, mut first: Option<(SecureUdp, usize)>) {
    let dialer = shared.dialer.clone();
    let n = dialer.len();
    let mut next = dialer.preferred();
    let mut backoff = BACKOFF_MIN;
    let mut lost_at: Option<Instant> = None;
    // The association lost last: the next connection asks to re-attach it.
    let mut previous = None;
    loop {
        let (udp, gw) = match first.take() {
            Some(x) => x,
            None => {
                let mut attempt = 0u32;
                loop {
                    if lost_at.is_some() && attempt == 0 && shared.idle_for() >= DORMANT_AFTER {
                        tracing::info!(link = %shared.label, "link idle: reconnecting when there is traffic");
                        shared.wake.notified().await;
                    }
                    attempt += 1;
                    match dialer.udp_reattach_via(next, previous).await {
                        Ok(u) => break (u, next),
                        Err(e) if e.is_permanent() => {
                            // Refused for good (logged once by the dialer): no retry loop on
                            // the gateway. Ask again after the hold, and only for traffic.
                            tracing::debug!(link = %shared.label, error = %e, "refused: waiting");
                            tokio::time::sleep(REFUSAL_RETRY).await;
                            if shared.idle_for() >= REFUSAL_RETRY {
                                shared.wake.notified().await;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(
                                link = %shared.label,
                                gateway = %dialer.name(next),
                                attempt,
                                error = %e,
                                retry_in = ?backoff,
                                "cannot open secure association"
                            );
                            next = (next + 1) % n;
                            tokio::time::sleep(backoff).await;
                            backoff = next_backoff(backoff);
                        }
                    }
                }
            }
        };
        backoff = BACKOFF_MIN;
        dialer.set_preferred(gw);
        match (lost_at.take(), previous.take()) {
            (Some(at), Some((old, _))) if udp.assoc() == old => {
                shared.metrics.reattached.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    link = %shared.label,
                    gateway = %dialer.name(gw),
                    assoc = %udp.assoc(),
                    epoch = udp.epoch(),
                    down_for = ?at.elapsed(),
                    "secure association re-attached"
                )
            }
            (Some(at), old) => {
                if let Some(reason) = udp.reattach_refused() {
                    shared.metrics.count_reattach_refused(reason);
                }
                tracing::info!(
                    link = %shared.label,
                    gateway = %dialer.name(gw),
                    assoc = %udp.assoc(),
                    previous = ?old.map(|(id, _)| id.to_string()),
                    refused = udp.reattach_refused().map(|r| r.name()),
                    down_for = ?at.elapsed(),
                    "secure association re-established (a new association)"
                )
            }
            (None, _) => tracing::debug!(
                link = %shared.label,
                gateway = %dialer.name(gw),
                assoc = %udp.assoc(),
                "secure association open"
            ),
        }
        let assoc = Arc::new(Assoc {
            udp,
            failed: Notify::new(),
        });
        shared.publish(assoc.clone()).await;
        let why = tokio::select! {
            _ = assoc.udp.closed() => assoc
                .udp
                .close_reason()
                .unwrap_or_else(|| "the gateway closed the control connection".to_owned()),
            _ = assoc.failed.notified() => "send or receive failed".to_owned(),
        };
        shared.current.send_replace(None);
        tracing::warn!(
            link = %shared.label,
            gateway = %dialer.name(gw),
            assoc = %assoc.udp.assoc(),
            reason = %why,
            "secure association lost: reconnecting"
        );
        lost_at = Some(Instant::now());
        previous = Some(assoc.udp.resume_token());
        next = (gw + 1) % n;
    }
}

/// Receives what the gateway returns on a [`Link`], whichever association is current.
pub struct LinkRx {
    shared: Arc<Shared>,
    rx: watch::Receiver<Option<Arc<Assoc>>>,
}

impl LinkRx {
    /// The association in use, waiting while the link is down.
    async fn current(&mut self) -> Arc<Assoc> {
        loop {
            if let Some(a) = self.rx.borrow_and_update().clone() {
                return a;
            }
            self.changed().await;
        }
    }

    /// Waits for the supervisor to publish a change (a new association, or none).
    async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The link is gone; its owner is about to stop us.
            std::future::pending::<()>().await;
        }
    }

    /// A receive on `assoc` failed: give it up and wait for its replacement.
    async fn failed(&mut self, assoc: &Arc<Assoc>, e: &ClientError) {
        tracing::debug!(link = %self.shared.label, error = %e, "receive failed");
        self.shared.fail(assoc, "receive failed");
        self.changed().await;
    }

    /// Receives one batch of datagrams the gateway returns (see
    /// [`SecureUdp::recv_batch`]), whichever association is current; waits across
    /// reconnections. `f` gets each payload and its source. Cancel-safe.
    pub async fn recv_batch(
        &mut self,
        batch: &mut crate::net::batch::RecvBatch,
        f: &mut (dyn FnMut(&[u8], &crate::proto::socks::Address) + Send),
    ) {
        loop {
            let assoc = self.current().await;
            let metrics = self.shared.metrics.clone();
            let path = if assoc.udp.via_tls() {
                Path::Tls
            } else {
                Path::Secure
            };
            let mut counted = |p: &[u8], from: &crate::proto::socks::Address| {
                metrics.returned_on(path, 1, p.len() as u64);
                f(p, from);
            };
            tokio::select! {
                r = assoc.udp.recv_batch(batch, &mut counted) => match r {
                    Ok(0) => {}
                    Ok(_) => return,
                    Err(e) => self.failed(&assoc, &e).await,
                },
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }

    /// The next authentic datagram, opened in place in `rec` (see [`Received`]); waits
    /// across reconnections. `rec` should hold [`crate::client::RECORD_BUF`] bytes.
    /// Cancel-safe.
    pub async fn recv(&mut self, rec: &mut [u8]) -> Received {
        loop {
            let assoc = self.current().await;
            tokio::select! {
                r = assoc.udp.recv_in_place(rec) => match r {
                    Ok(r) => {
                        self.shared.metrics.returned_on(Path::Secure, 1, r.payload.len() as u64);
                        return r;
                    }
                    Err(e) => self.failed(&assoc, &e).await,
                },
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::proto::socks::Address;
    use crate::shim::{Dialer, GatewayEndpoint};
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn backoff_doubles_from_100ms_to_5s() {
        let mut d = BACKOFF_MIN;
        let mut seen = vec![d];
        while d < BACKOFF_MAX {
            d = next_backoff(d);
            seen.push(d);
        }
        let ms: Vec<u128> = seen.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000]);
        assert_eq!(next_backoff(BACKOFF_MAX), BACKOFF_MAX);
    }

    fn dead_dialer(metrics: Arc<Metrics>, flow_queue: usize) -> Arc<Dialer> {
        // Port 9 on loopback: nothing listens, connections are refused at once.
        let tls = crate::tls::client_config(crate::tls::ClientTlsOptions {
            trust: crate::tls::ServerTrust::Pin([0; 32]),
            client_auth: None,
            allow_tls12: false,
        })
        .unwrap();
        Arc::new(Dialer {
            gateways: vec![GatewayEndpoint::new(Address::Ip("127.0.0.1:9".parse().unwrap()))],
            tls: tls.into(),
            credentials: Default::default(),
            gssapi: None,
            suites: crate::proto::CipherSuite::ALL.to_vec(),
            timeout: Duration::from_secs(1),
            replay_window: 1024,
            heartbeat: crate::client::DEFAULT_HEARTBEAT,
            transport: crate::client::Transport::Auto,
            flow_queue,
            preferred: AtomicUsize::new(0),
            metrics,
            trust_origin: None,
            refusals: Default::default(),
            pool: Default::default(),
        })
    }

    #[tokio::test]
    async fn datagrams_wait_while_down_in_order_bounded_in_bytes_tail_dropped() {
        let metrics = Arc::new(Metrics::default());
        let link = Link::spawn(dead_dialer(metrics.clone(), 64 * 1024), "test".into(), None);
        assert!(!link.is_up());
        let mut buf = vec![0u8; 2048];
        // 1000-byte plaintexts make 1053-byte records: 62 fit in 64 KiB.
        for i in 0..100u32 {
            buf[PREFIX_LEN..PREFIX_LEN + 4].copy_from_slice(&i.to_be_bytes());
            link.send(&mut buf, 1000).await;
        }
        let p = link.shared.pending.lock().unwrap();
        let fit = 64 * 1024 / record_len(1000);
        assert_eq!(p.queue.len(), fit);
        assert_eq!(p.bytes, fit * record_len(1000));
        // The first ones are kept, in order: the start of the stream.
        for (i, (rec, len, _)) in p.queue.iter().enumerate() {
            assert_eq!(rec[PREFIX_LEN..PREFIX_LEN + 4], (i as u32).to_be_bytes());
            assert_eq!(*len, 1000);
        }
        assert_eq!(metrics.drops(DropReason::QueueFull), (100 - fit) as u64);
        assert_eq!(p.dropped, ((100 - fit) as u64, (100 - fit) as u64 * 1000));
        assert_eq!(metrics.drops(DropReason::SendFailed), 0);
    }

    #[tokio::test]
    async fn what_waits_when_the_link_is_dropped_is_counted() {
        let metrics = Arc::new(Metrics::default());
        let link = Link::spawn(dead_dialer(metrics.clone(), 64 * 1024), "test".into(), None);
        let mut buf = vec![0u8; 256];
        for _ in 0..5 {
            link.send(&mut buf, 100).await;
        }
        assert_eq!(
            metrics.flow_queue_bytes.load(Ordering::Relaxed),
            5 * record_len(100) as u64
        );
        drop(link);
        assert_eq!(metrics.drops(DropReason::QueueExpired), 5);
        assert_eq!(metrics.flow_queue_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn the_default_queue_holds_an_unpaced_video_start() {
        // The burst of the issue: a 1.97 MB MPEG-TS start in 1316-byte datagrams.
        let metrics = Arc::new(Metrics::default());
        let link = Link::spawn(
            dead_dialer(metrics.clone(), DEFAULT_FLOW_QUEUE),
            "test".into(),
            None,
        );
        let mut buf = vec![0u8; 2048];
        let n = 1_970_000 / 1316 + 1;
        for _ in 0..n {
            link.send(&mut buf, 7 + 1316).await;
        }
        assert_eq!(link.shared.pending.lock().unwrap().queue.len(), n);
        assert_eq!(metrics.total_drops(), 0);
    }
}
