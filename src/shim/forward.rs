//! Port forwards: a local UDP or TCP socket whose traffic goes to one target through the
//! gateway.
//!
//! **UDP.** Each local source address gets its own flow: a [`Link`] (one secure
//! association, reconnecting) and a task that returns the gateway's replies to that source
//! from the forward's socket. Flows are bounded (`max_flows`: a new source beyond it is
//! refused and counted, never at the expense of an admitted flow) and closed after
//! `idle_timeout` without traffic either way.
//! See the module documentation of [`crate::shim`] for why a flow per source.
//!
//! The target's address is written in front of each received payload and the record is
//! sealed in place:
//!
//! ```text
//!  buf:  | record prefix 21 | ATYP TARGET PORT | payload (received here) | pad | tag |
//! ```
//!
//! **TCP.** Each accepted connection opens a SOCKS5 CONNECT through the gateway and copies
//! bytes both ways; a half-close is carried through.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Forward;
use crate::net::batch::{BatchSocket, Cursor, GsoBatch, RecordTrain, RecvBatch, SMALL_BATCH};
use crate::proto::record::{MAX_PLAINTEXT, PREFIX_LEN};
use crate::proto::DropReason;
use crate::shim::link::{Assoc, Link};
use crate::shim::socks::DATAGRAM_ROOM;
use crate::shim::{accept_loop, stopped, Ctx};

/// One local source of a UDP forward.
struct Flow {
    link: Arc<Link>,
    replies: JoinHandle<()>,
    /// Milliseconds since the forward's epoch of the last datagram either way.
    last: Arc<AtomicU64>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// Serves a UDP forward until `stop`.
pub(crate) async fn serve_udp(
    ctx: Arc<Ctx>,
    spec: Forward,
    sock: UdpSocket,
    mut stop: watch::Receiver<bool>,
) {
    let sock = match BatchSocket::new(sock) {
        Ok(s) => Arc::new(s.track_drops(&ctx.metrics.socket_drops.local)),
        Err(e) => {
            tracing::error!(forward = %spec, error = %e, "cannot set up the local UDP socket");
            return;
        }
    };
    let epoch = Instant::now();
    let now_ms = move || epoch.elapsed().as_millis() as u64;
    let target = spec.target.as_ref();
    let alen = target.encoded_len();
    let at = PREFIX_LEN + alen;
    let mut header = vec![0u8; alen];
    if target.encode(&mut header).is_err() {
        // Cannot happen for a validated config (names are checked when parsed).
        tracing::error!(forward = %spec, "target address cannot be encoded");
        return;
    }
    // Slow path (link down): the plaintext is placed here and handed to the link's queue.
    let mut buf = vec![0u8; at + DATAGRAM_ROOM + 64];
    buf[PREFIX_LEN..at].copy_from_slice(&header);
    let mut batch = RecvBatch::default();
    let mut train = Train::default();
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let idle = ctx.idle_timeout;
    let mut sweep =
        tokio::time::interval((idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)));
    let too_large_logged = AtomicBool::new(false);
    let flow_limit_logged = AtomicBool::new(false);
    let m = ctx.metrics.clone();
    loop {
        tokio::select! {
            r = sock.recv_batch(&mut batch) => if let Err(e) = r {
                tracing::debug!(forward = %spec, error = %e, "local UDP receive error");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            },
            _ = sweep.tick() => {
                let now = now_ms();
                let idle_ms = idle.as_millis() as u64;
                // A flow that ends makes room: the next refusal is logged again.
                flow_limit_logged.store(false, Ordering::Relaxed);
                flows.retain(|src, f| {
                    // Idle means `idle` since the last datagram. (Not `last > now - idle`:
                    // in the first milliseconds both sides are 0 and a brand-new flow, with
                    // its first burst queued, would be closed at once.)
                    let keep = now.saturating_sub(f.last.load(Ordering::Relaxed)) < idle_ms;
                    if !keep {
                        tracing::info!(forward = %spec, %src, "flow idle: closed");
                    }
                    keep
                });
                continue;
            }
            _ = stopped(&mut stop) => break,
        }
        // Every datagram of the batch: records for a live association are sealed straight
        // into a GSO train (one send per run of equal sizes); the rest wait in their link.
        let now = now_ms();
        let mut cur = Cursor::default();
        while let Some((d, src)) = batch.next(&mut cur) {
            let n = d.len();
            if alen + n > MAX_PLAINTEXT {
                m.count_drop(DropReason::TooLarge);
                if !too_large_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        forward = %spec,
                        size = n,
                        max = MAX_PLAINTEXT - alen,
                        "datagram too large for one secure record: dropped (logged once per forward)"
                    );
                }
                continue;
            }
            if !flows.contains_key(&src) && flows.len() >= ctx.max_flows {
                // Refuse the excess, never evict a live flow for it: evicting made each new
                // source close another, which closed another (every flow lost its stream).
                // The admitted flows go on; the refused source is counted and logged once
                // per burst of refusals.
                m.count_drop(DropReason::FlowLimit);
                if !flow_limit_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        forward = %spec,
                        %src,
                        max_flows = ctx.max_flows,
                        "flow limit reached: datagrams from new sources are refused (counted as flow_limit) until a flow ends"
                    );
                }
                continue;
            }
            let flow = flows
                .entry(src)
                .or_insert_with(|| new_flow(&ctx, &spec, &sock, src, now_ms));
            flow.last.store(now, Ordering::Relaxed);
            match flow.link.current() {
                Some(assoc) => {
                    let link = flow.link.clone();
                    train.push(link, assoc, &header, d).await;
                }
                None => {
                    buf[at..at + n].copy_from_slice(d);
                    let link = flow.link.clone();
                    train.flush().await;
                    link.send(&mut buf, alen + n).await;
                }
            }
        }
        train.flush().await;
    }
    let open = flows.len();
    drop(flows);
    tracing::debug!(forward = %spec, flows = open, "UDP forward stopped");
}

/// Records waiting to leave in one GSO send: of one association, or of several that share
/// one socket (opened on one control connection, PROTOCOL.md §2.9), one stretch each. Their
/// plaintexts are placed as they come and each stretch is sealed by its association at
/// [`Train::flush`], so the CBC chains of a stretch advance side by side
/// ([`SecureUdp::seal_many`](crate::client::SecureUdp::seal_many)), and many small flows
/// leave in one system call instead of one each.
pub(crate) struct Train {
    /// The associations of the train in order, each with the index of its first record.
    stretches: Vec<(Arc<Link>, Arc<Assoc>, usize)>,
    records: RecordTrain,
    /// Payload bytes of each record, for the counters. Reused, never shrunk.
    payloads: Vec<usize>,
    /// Per stretch at [`Train::flush`]: its records and whether they sealed. Reused.
    sealed: Vec<(std::ops::Range<usize>, bool)>,
}

impl Default for Train {
    fn default() -> Self {
        Train {
            stretches: Vec::with_capacity(64),
            records: RecordTrain::new(1),
            payloads: Vec::with_capacity(64),
            sealed: Vec::with_capacity(64),
        }
    }
}

impl Train {
    /// Places `header` + `payload` for `assoc` in the train, sending the train first when
    /// the record cannot join it (an association on another socket, or inside TLS, another
    /// size, or full). The caller has checked that the plaintext fits one record.
    pub(crate) async fn push(&mut self, link: Arc<Link>, assoc: Arc<Assoc>, header: &[u8], payload: &[u8]) {
        let relay = assoc.udp.relay();
        let plaintext_len = header.len() + payload.len();
        let len = assoc.udp.suite().record_len(plaintext_len);
        // Borrowed, not cloned: no reference-count traffic per datagram.
        let joins = self.stretches.last().is_some_and(|(_, a, _)| {
            Arc::ptr_eq(a, &assoc)
                || (a.udp.shares_socket_with(&assoc.udp) && !a.udp.via_tls() && !assoc.udp.via_tls())
        });
        if !joins || !self.records.fits(relay, len) {
            self.flush().await;
        }
        if self.stretches.is_empty() {
            self.records.reset(assoc.udp.max_gso_segments());
        }
        if !self
            .stretches
            .last()
            .is_some_and(|(_, a, _)| Arc::ptr_eq(a, &assoc))
        {
            self.stretches.push((link, assoc, self.records.len()));
        }
        let space = self.records.place(relay, len, plaintext_len);
        space[PREFIX_LEN..PREFIX_LEN + header.len()].copy_from_slice(header);
        space[PREFIX_LEN + header.len()..PREFIX_LEN + plaintext_len].copy_from_slice(payload);
        self.payloads.push(payload.len());
    }

    /// Seals (each stretch with its association's keys) and sends what the train holds: in
    /// one send when every stretch sealed, else each sealed stretch apart (an unsealed one,
    /// whose key is exhausted, is counted and never sent).
    pub(crate) async fn flush(&mut self) {
        let n = self.records.len();
        let sealed = &mut self.sealed;
        sealed.clear();
        for (i, (link, assoc, start)) in self.stretches.iter().enumerate() {
            let end = self.stretches.get(i + 1).map_or(n, |s| s.2);
            let r = self
                .records
                .seal_range_with(*start..end, |buf, offsets, pts, lens| {
                    assoc.udp.seal_many(buf, offsets, pts, lens)
                });
            if let Err(e) = r {
                for _ in *start..end {
                    link.seal_failed(assoc, e);
                }
            }
            sealed.push((*start..end, r.is_ok()));
        }
        if sealed.iter().all(|(_, ok)| *ok) {
            if let (Some((_, first, _)), Some((_, bytes, seg))) =
                (self.stretches.first(), self.records.pending())
            {
                let r = first.udp.send_train(bytes, seg).await;
                for ((link, assoc, _), (range, _)) in self.stretches.iter().zip(sealed.iter()) {
                    if !Arc::ptr_eq(assoc, first) {
                        assoc.udp.maybe_probe();
                    }
                    match &r {
                        Ok(()) => link.sent(assoc.udp.via_tls(), &self.payloads[range.clone()]),
                        Err(e) => link.send_failed(assoc, range.len(), e),
                    }
                }
            }
        } else {
            for ((link, assoc, _), (range, ok)) in self.stretches.iter().zip(sealed.iter()) {
                if !ok {
                    continue;
                }
                let (bytes, seg) = self.records.range_bytes(range.clone());
                match assoc.udp.send_train(bytes, seg).await {
                    Ok(()) => link.sent(assoc.udp.via_tls(), &self.payloads[range.clone()]),
                    Err(e) => link.send_failed(assoc, range.len(), &e),
                }
            }
        }
        self.stretches.clear();
        self.records.clear();
        self.payloads.clear();
    }
}

fn new_flow(
    ctx: &Ctx,
    spec: &Forward,
    sock: &Arc<BatchSocket>,
    src: SocketAddr,
    now_ms: impl Fn() -> u64 + Send + 'static,
) -> Flow {
    tracing::info!(forward = %spec, %src, "new flow");
    let link = Arc::new(Link::spawn(
        ctx.dialer.clone(),
        format!("forward {spec} from {src}"),
        None,
    ));
    let last = Arc::new(AtomicU64::new(now_ms()));
    let mut rx = link.receiver();
    let (sock, last2, m) = (sock.clone(), last.clone(), ctx.metrics.clone());
    let replies = tokio::spawn(async move {
        // Replies arrive in batches and leave for the local peer as GSO trains.
        let mut batch = RecvBatch::new(SMALL_BATCH);
        let mut out = GsoBatch::new(sock.max_gso_segments());
        loop {
            rx.recv_batch(&mut batch, &mut |payload, _from| {
                if !out.fits(src, payload.len()) {
                    if let Some((dest, bytes, seg)) = out.pending() {
                        if sock.try_send(dest, bytes, seg).is_err() {
                            for _ in 0..out.len() {
                                m.count_drop(DropReason::SendFailed);
                            }
                        }
                    }
                    out.clear();
                }
                out.push(src, payload);
            })
            .await;
            last2.store(now_ms(), Ordering::Relaxed);
            if let Some((dest, bytes, seg)) = out.pending() {
                if sock.send(dest, bytes, seg).await.is_err() {
                    for _ in 0..out.len() {
                        m.count_drop(DropReason::SendFailed);
                    }
                }
            }
            out.clear();
        }
    });
    Flow { link, replies, last }
}

/// Serves a TCP forward until `stop`; then drains its connections.
pub(crate) async fn serve_tcp(
    ctx: Arc<Ctx>,
    spec: Forward,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) {
    let spec = Arc::new(spec);
    let what = format!("TCP forward {spec}");
    accept_loop(&ctx.clone(), listener, stop, &what, move |tcp, peer| {
        let (ctx, spec) = (ctx.clone(), spec.clone());
        async move { tcp_conn(&ctx, &spec, tcp, peer).await }
    })
    .await;
}

async fn tcp_conn(ctx: &Ctx, spec: &Forward, mut tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let mut tls = match ctx.dialer.tcp_any(&spec.target).await {
        Ok((tls, _)) => tls,
        Err(e) => {
            tracing::info!(forward = %spec, %peer, error = %e, "CONNECT through the gateway failed");
            return;
        }
    };
    // Half-close is carried through: EOF one way shuts down that direction's writer only.
    match tokio::io::copy_bidirectional(&mut tcp, &mut tls).await {
        Ok((up, down)) => tracing::debug!(forward = %spec, %peer, up, down, "connection finished"),
        Err(e) => tracing::debug!(forward = %spec, %peer, error = %e, "connection ended"),
    }
}
