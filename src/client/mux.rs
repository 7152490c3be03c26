//! One UDP socket for the associations a [`Trunk`](super::Trunk) opens (PROTOCOL.md §2.9).
//!
//! ```text
//!   SecureUdp ◀─ queue ─┐                         records of every association
//!   SecureUdp ◀─ queue ─┼─ demux (by ASSOC_ID) ◀── one socket ◀── relay
//!   SecureUdp ◀─ queue ─┘                          one socket ──▶ relay
//! ```
//!
//! A shim with many flows would otherwise hold one socket per flow, and each datagram the
//! gateway returns would wake that flow's task for one `recvmmsg` returning one datagram.
//! Here the associations opened on one control connection send from one socket and one
//! task reads it in batches, handing each record to its association's queue by the
//! association id in its header. The record is opened (tag, replay window, decryption) by
//! its association, exactly as from a socket of its own; the demux reads only the header.
//!
//! Bounds: a record waits in its association's queue until read, at most [`QUEUE_RECORDS`]
//! per association and [`QUEUE_BYTES`] for the whole socket (what a peer can make the
//! shim hold before any tag is checked); beyond them a record is dropped and counted as
//! `queue_full`, as is one that names no association of the socket (`unknown_association`)
//! or has no record header (`truncated`, `bad_header`, ...: the reason of the header check).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::net::batch::{BatchSocket, RecvBatch, BATCH};
use crate::net::drops::Tracked;
use crate::proto::record::parse_any_header;
use crate::proto::{AssociationId, DropReason};

/// Records one association's queue holds.
pub(crate) const QUEUE_RECORDS: usize = 1024;
/// Bytes of records all queues of one socket hold together (a socket buffer's worth).
pub(crate) const QUEUE_BYTES: usize = 8 << 20;

/// Pause after a receive error on the shared socket, doubling while errors repeat.
const ERROR_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(1);
const ERROR_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_millis(100);

/// What the demux task and the associations share.
struct Shared {
    routes: Mutex<HashMap<AssociationId, mpsc::Sender<Vec<u8>>>>,
    /// Bytes of records queued and not yet taken, over all queues.
    queued: AtomicUsize,
    metrics: OnceLock<Arc<Metrics>>,
    drops: OnceLock<Arc<Tracked>>,
}

impl Shared {
    fn count(&self, reason: DropReason) {
        if let Some(m) = self.metrics.get() {
            m.count_drop(reason);
        }
    }
}

/// The shared socket and its demux task; dropped with the last association (and trunk)
/// holding it, which ends the task.
pub(crate) struct Mux {
    socket: Arc<BatchSocket>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Mux {
    fn drop(&mut self) {
        if let Some(t) = self.shared.drops.get() {
            t.close();
        }
        self.task.abort();
    }
}

impl Mux {
    /// Binds a socket of `relay`'s family, connects it to `relay` and starts the demux.
    pub(crate) async fn start(relay: SocketAddr) -> io::Result<Arc<Mux>> {
        let socket = crate::net::bind_udp(super::any_port_like(relay))?;
        socket.connect(relay).await?;
        let socket = Arc::new(BatchSocket::new(socket)?);
        let shared = Arc::new(Shared {
            routes: Mutex::new(HashMap::new()),
            queued: AtomicUsize::new(0),
            metrics: OnceLock::new(),
            drops: OnceLock::new(),
        });
        let task = tokio::spawn(demux(socket.clone(), shared.clone()));
        Ok(Arc::new(Mux { socket, shared, task }))
    }

    /// The socket the associations send from.
    pub(crate) fn socket(&self) -> &BatchSocket {
        &self.socket
    }

    /// Counts the demux's drops, and the kernel's at the socket (as `outbound`), in
    /// `metrics` (the first association to ask sets it: all share the shim's).
    pub(crate) fn set_metrics(&self, metrics: &Arc<Metrics>) {
        if self.shared.metrics.set(metrics.clone()).is_ok() {
            let fd = self.socket.raw_fd();
            let _ = self.shared.drops.set(metrics.socket_drops.outbound.track(fd));
        }
    }

    /// Routes the records naming `assoc` to the returned queue until [`Route`] is dropped.
    pub(crate) fn route(self: &Arc<Mux>, assoc: AssociationId) -> Route {
        let (tx, rx) = mpsc::channel(QUEUE_RECORDS);
        lock(&self.shared.routes).insert(assoc, tx);
        Route {
            mux: self.clone(),
            assoc,
            rx: tokio::sync::Mutex::new(rx),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One association's end of the shared socket.
pub(crate) struct Route {
    mux: Arc<Mux>,
    assoc: AssociationId,
    rx: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
}

impl Route {
    /// The shared socket.
    pub(crate) fn mux(&self) -> &Mux {
        &self.mux
    }

    /// The next record for this association. Cancel-safe.
    pub(crate) async fn recv(&self) -> Vec<u8> {
        let mut rx = self.rx.lock().await;
        match rx.recv().await {
            Some(r) => self.taken(r),
            // The sender lives in the routes until this route is dropped.
            None => std::future::pending().await,
        }
    }

    /// [`Route::recv`], then what else waits, up to `max` records in all, into `out`.
    pub(crate) async fn recv_many(&self, out: &mut Vec<Vec<u8>>, max: usize) {
        let mut rx = self.rx.lock().await;
        match rx.recv().await {
            Some(r) => out.push(self.taken(r)),
            None => return std::future::pending().await,
        }
        while out.len() < max {
            match rx.try_recv() {
                Ok(r) => out.push(self.taken(r)),
                Err(_) => break,
            }
        }
    }

    fn taken(&self, r: Vec<u8>) -> Vec<u8> {
        self.mux.shared.queued.fetch_sub(r.len(), Ordering::Relaxed);
        r
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        lock(&self.mux.shared.routes).remove(&self.assoc);
        // What still waits leaves the byte budget with the queue.
        let rx = self.rx.get_mut();
        rx.close();
        while let Ok(r) = rx.try_recv() {
            self.mux.shared.queued.fetch_sub(r.len(), Ordering::Relaxed);
        }
    }
}

/// Reads the shared socket in batches and hands each record to its association's queue.
async fn demux(socket: Arc<BatchSocket>, shared: Arc<Shared>) {
    let mut batch = RecvBatch::new(BATCH);
    let mut backoff = ERROR_BACKOFF_MIN;
    loop {
        let n = match socket.recv_batch(&mut batch).await {
            Ok(n) => {
                backoff = ERROR_BACKOFF_MIN;
                n
            }
            Err(e) => {
                // ICMP errors of a connected socket (the relay unreachable for a moment):
                // the associations notice through their probes and the control connection.
                // Backing off, so an error that persists costs no more than 10 wake-ups/s.
                tracing::debug!(error = %e, "shared association socket: receive error");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ERROR_BACKOFF_MAX);
                continue;
            }
        };
        if let Some(t) = shared.drops.get() {
            t.maybe_sync(n == BATCH);
        }
        let routes = lock(&shared.routes);
        // `for_each`, not `next`: an empty datagram is one too, counted (`truncated`).
        batch.for_each(|d, _from| {
            let assoc = match parse_any_header(d) {
                Ok(h) => h.assoc,
                Err(e) => return shared.count(e.reason()),
            };
            let Some(tx) = routes.get(&assoc) else {
                return shared.count(DropReason::UnknownAssociation);
            };
            let len = d.len();
            if shared.queued.fetch_add(len, Ordering::Relaxed) + len > QUEUE_BYTES
                || tx.try_send(d.to_vec()).is_err()
            {
                shared.queued.fetch_sub(len, Ordering::Relaxed);
                shared.count(DropReason::QueueFull);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::session::SendSession;
    use crate::proto::socks::AddrRef;
    use crate::proto::{CipherSuite, KeySchedule, Role};
    use std::time::Duration;
    use tokio::net::UdpSocket;

    const WAIT: Duration = Duration::from_secs(5);

    fn sender(assoc: AssociationId) -> SendSession {
        let suite = CipherSuite::Aes128CbcHmacSha256;
        let m: Vec<u8> = (0..suite.exporter_len()).map(|i| (i * 3) as u8).collect();
        SendSession::new(
            assoc,
            &KeySchedule::from_exporter(suite, &m).unwrap(),
            Role::Gateway,
        )
    }

    /// A mux whose "relay" is a socket of the test, counting into its own metrics; and the
    /// address the relay sends to.
    async fn setup() -> (UdpSocket, Arc<Mux>, Arc<Metrics>, SocketAddr) {
        let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mux = Mux::start(relay.local_addr().unwrap()).await.unwrap();
        let metrics = Arc::new(Metrics::default());
        mux.set_metrics(&metrics);
        let to = mux.socket().local_addr().unwrap();
        (relay, mux, metrics, to)
    }

    /// Waits until `f` holds, at most 5 s (the demux task runs beside the test).
    async fn until(mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn got(r: &Route) -> Vec<u8> {
        tokio::time::timeout(WAIT, r.recv()).await.expect("a record")
    }

    fn record(tx: &mut SendSession, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        let src: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let n = tx.seal(&AddrRef::Ip(src), payload, &mut b).unwrap();
        b.truncate(n);
        b
    }

    /// Records reach the association their header names and no other; what names none,
    /// or is no record, is counted by its reason; a dropped route gives its queued bytes back.
    #[tokio::test]
    async fn records_go_to_the_association_they_name_and_the_rest_is_counted() {
        let (relay, mux, metrics, to) = setup().await;
        let (a, b, c) = (AssociationId(0xa), AssociationId(0xb), AssociationId(0xc));
        let (ra, rb) = (mux.route(a), mux.route(b));
        let (mut ta, mut tb, mut tc) = (sender(a), sender(b), sender(c));
        let (a1, b1, a2, c1) = (
            record(&mut ta, b"a1"),
            record(&mut tb, b"b1"),
            record(&mut ta, b"a2"),
            record(&mut tc, b"c1"),
        );
        for d in [&a1[..], &b1, &c1, &a2, &a1[..4], &[]] {
            relay.send_to(d, to).await.unwrap();
        }
        assert_eq!(got(&ra).await, a1);
        assert_eq!(got(&ra).await, a2);
        assert_eq!(got(&rb).await, b1);
        let counted = || {
            (
                metrics.drops(DropReason::UnknownAssociation),
                metrics.drops(DropReason::Truncated),
            )
        };
        until(|| counted() == (1, 2)).await;
        assert_eq!(
            counted(),
            (1, 2),
            "c1 names no route; a cut header and an empty datagram"
        );
        assert!(tokio::time::timeout(Duration::from_millis(50), ra.recv())
            .await
            .is_err());
        // Queued and never read: given back when the route goes; then its id is unknown.
        relay.send_to(&b1, to).await.unwrap();
        until(|| mux.shared.queued.load(Ordering::Relaxed) == b1.len()).await;
        assert_eq!(mux.shared.queued.load(Ordering::Relaxed), b1.len());
        drop(rb);
        assert_eq!(mux.shared.queued.load(Ordering::Relaxed), 0);
        relay.send_to(&b1, to).await.unwrap();
        until(|| counted().0 == 2).await;
        assert_eq!(counted().0, 2);
    }

    /// A queue that is not read holds at most QUEUE_RECORDS records; the rest are counted
    /// as queue_full, and the other associations' records still pass.
    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_the_others_go_on() {
        let (relay, mux, metrics, to) = setup().await;
        let (a, b) = (AssociationId(0xa), AssociationId(0xb));
        let (_ra, rb) = (mux.route(a), mux.route(b));
        let (mut ta, mut tb) = (sender(a), sender(b));
        let extra = 50;
        for i in 0..QUEUE_RECORDS + extra {
            let r = record(&mut ta, format!("{i}").as_bytes());
            relay.send_to(&r, to).await.unwrap();
            if i % 64 == 0 {
                // Let the demux keep up with the socket (its buffer is not the subject).
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let b1 = record(&mut tb, b"b1");
        relay.send_to(&b1, to).await.unwrap();
        assert_eq!(tokio::time::timeout(WAIT, rb.recv()).await.unwrap(), b1);
        let dropped = metrics.drops(DropReason::QueueFull) + metrics.socket_drops.outbound.total();
        assert_eq!(dropped, extra as u64, "the records past the queue's bound");
        assert_eq!(metrics.drops(DropReason::QueueFull), extra as u64);
    }
}
