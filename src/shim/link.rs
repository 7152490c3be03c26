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
//! stay open throughout, so an application sees only the datagrams lost meanwhile. Up to
//! [`MAX_PENDING`] datagrams sent while the link is down wait (oldest dropped first, none
//! older than [`PENDING_MAX_AGE`]) and go out as soon as an association is up: the first
//! datagrams of a new flow are not lost to the handshake.
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
use crate::proto::record::{record_len, PREFIX_LEN};
use crate::proto::socks::AddrRef;
use crate::proto::{DropReason, SealError};
use crate::shim::Dialer;

/// First wait after a failed attempt.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Datagrams kept while the link is down.
pub const MAX_PENDING: usize = 64;
/// Bytes of plaintext kept while the link is down.
pub const MAX_PENDING_BYTES: usize = 512 * 1024;
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
}

#[derive(Default)]
struct Pending {
    /// Record buffers with the plaintext at `PREFIX_LEN`, its length, and when queued.
    queue: VecDeque<(Vec<u8>, usize, Instant)>,
    bytes: usize,
}

impl Link {
    /// Starts a link named `label` (for logs). With `first`, an association already opened
    /// through gateway `first.1` is used until it is lost; without, the supervisor opens one.
    pub(crate) fn spawn(dialer: Arc<Dialer>, label: String, first: Option<(SecureUdp, usize)>) -> Link {
        let metrics = dialer.metrics.clone();
        let shared = Arc::new(Shared {
            label,
            dialer,
            current: watch::Sender::new(None),
            wake: Notify::new(),
            pending: Mutex::new(Pending::default()),
            epoch: Instant::now(),
            last_send: AtomicU64::new(0),
            metrics,
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
    pub(crate) fn sent(&self, payload_lens: &[usize]) {
        let s = &self.shared;
        s.last_send.store(s.now_ms(), Ordering::Relaxed);
        let m = &s.metrics;
        m.forwarded
            .fetch_add(payload_lens.len() as u64, Ordering::Relaxed);
        m.forwarded_bytes
            .fetch_add(payload_lens.iter().sum::<usize>() as u64, Ordering::Relaxed);
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
        while p.queue.len() >= MAX_PENDING || p.bytes + plaintext.len() > MAX_PENDING_BYTES {
            match p.queue.pop_front() {
                Some((_, len, _)) => {
                    p.bytes -= len;
                    self.metrics.count_drop(DropReason::SendFailed);
                }
                None => break,
            }
        }
        let mut rec = vec![0u8; record_len(plaintext.len())];
        rec[PREFIX_LEN..PREFIX_LEN + plaintext.len()].copy_from_slice(plaintext);
        p.bytes += plaintext.len();
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
            Ok(_) => self.metrics.forwarded(payload_len),
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
                        p.bytes -= item.1;
                        Some(item)
                    }
                    None => {
                        self.current.send_replace(Some(assoc.clone()));
                        None
                    }
                }
            };
            let Some((mut rec, len, queued)) = next else {
                return;
            };
            if queued.elapsed() > PENDING_MAX_AGE {
                self.metrics.count_drop(DropReason::SendFailed);
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
                    match dialer.udp_via(next).await {
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
        match lost_at.take() {
            Some(at) => tracing::info!(
                link = %shared.label,
                gateway = %dialer.name(gw),
                assoc = %udp.assoc(),
                down_for = ?at.elapsed(),
                "secure association re-established"
            ),
            None => tracing::debug!(
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
            let mut counted = |p: &[u8], from: &crate::proto::socks::Address| {
                metrics.returned(p.len());
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
                        self.shared.metrics.returned(r.payload.len());
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

    fn dead_dialer(metrics: Arc<Metrics>) -> Arc<Dialer> {
        // Port 9 on loopback: nothing listens, connections are refused at once.
        let tls = crate::tls::client_config(crate::tls::ClientTlsOptions {
            trust: crate::tls::ServerTrust::Pin([0; 32]),
            client_auth: None,
            allow_tls12: false,
        })
        .unwrap();
        Arc::new(Dialer {
            gateways: vec![GatewayEndpoint::new(Address::Ip("127.0.0.1:9".parse().unwrap()))],
            tls,
            credentials: None,
            suites: crate::proto::CipherSuite::ALL.to_vec(),
            timeout: Duration::from_secs(1),
            replay_window: 1024,
            heartbeat: crate::client::DEFAULT_HEARTBEAT,
            preferred: AtomicUsize::new(0),
            metrics,
            trust_origin: None,
            refusals: Default::default(),
        })
    }

    #[tokio::test]
    async fn datagrams_wait_while_down_bounded_oldest_dropped_first() {
        let metrics = Arc::new(Metrics::default());
        let link = Link::spawn(dead_dialer(metrics.clone()), "test".into(), None);
        assert!(!link.is_up());
        let mut buf = vec![0u8; 256];
        for i in 0..(MAX_PENDING + 10) {
            buf[PREFIX_LEN] = i as u8;
            link.send(&mut buf, 1 + i % 100).await;
        }
        let p = link.shared.pending.lock().unwrap();
        assert_eq!(p.queue.len(), MAX_PENDING);
        // The oldest ten went first.
        assert_eq!(p.queue.front().unwrap().0[PREFIX_LEN], 10);
        assert_eq!(p.bytes, p.queue.iter().map(|(_, n, _)| n).sum::<usize>());
        assert_eq!(metrics.drops(DropReason::SendFailed), 10);
    }

    #[tokio::test]
    async fn queue_is_bounded_in_bytes_too() {
        let metrics = Arc::new(Metrics::default());
        let link = Link::spawn(dead_dialer(metrics.clone()), "test".into(), None);
        let mut buf = vec![0u8; record_len(60_000)];
        for _ in 0..20 {
            link.send(&mut buf, 60_000).await;
        }
        let p = link.shared.pending.lock().unwrap();
        assert!(p.bytes <= MAX_PENDING_BYTES);
        assert_eq!(p.queue.len(), MAX_PENDING_BYTES / 60_000);
        assert_eq!(metrics.drops(DropReason::SendFailed), 20 - p.queue.len() as u64);
    }
}
