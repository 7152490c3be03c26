//! Port forwards: a local UDP or TCP socket whose traffic goes to one target through the
//! gateway.
//!
//! **UDP.** Each local source address gets its own flow: a [`Link`] (one secure
//! association, reconnecting) and a task that returns the gateway's replies to that source
//! from the forward's socket. Flows are bounded (`max_flows`; the least recently active
//! one is closed to make room) and closed after `idle_timeout` without traffic either way.
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
use tokio::task::{JoinHandle, JoinSet};

use crate::client::RECORD_BUF;
use crate::config::Forward;
use crate::proto::record::{MAX_PLAINTEXT, PREFIX_LEN};
use crate::proto::DropReason;
use crate::shim::link::Link;
use crate::shim::socks::DATAGRAM_ROOM;
use crate::shim::{drain, stopped, Ctx};

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
    let sock = Arc::new(sock);
    let epoch = Instant::now();
    let now_ms = move || epoch.elapsed().as_millis() as u64;
    let target = spec.target.as_ref();
    let alen = target.encoded_len();
    let at = PREFIX_LEN + alen;
    // Room for the largest datagram plus the record's padding and tag after it.
    let mut buf = vec![0u8; at + DATAGRAM_ROOM + 64];
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let idle = ctx.idle_timeout;
    let mut sweep =
        tokio::time::interval((idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)));
    let too_large_logged = AtomicBool::new(false);
    let m = ctx.metrics.clone();
    loop {
        let (n, src) = tokio::select! {
            r = sock.recv_from(&mut buf[at..at + DATAGRAM_ROOM]) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(forward = %spec, error = %e, "local UDP receive error");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            },
            _ = sweep.tick() => {
                let cutoff = now_ms().saturating_sub(idle.as_millis() as u64);
                flows.retain(|src, f| {
                    let keep = f.last.load(Ordering::Relaxed) > cutoff;
                    if !keep {
                        tracing::info!(forward = %spec, %src, "flow idle: closed");
                    }
                    keep
                });
                continue;
            }
            _ = stopped(&mut stop) => break,
        };
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
        if target.encode(&mut buf[PREFIX_LEN..at]).is_err() {
            // Cannot happen for a validated config (names are checked when parsed).
            m.count_drop(DropReason::BadAddress);
            continue;
        }
        if !flows.contains_key(&src) && flows.len() >= ctx.max_flows {
            let oldest = flows
                .iter()
                .min_by_key(|(_, f)| f.last.load(Ordering::Relaxed))
                .map(|(a, _)| *a);
            if let Some(old) = oldest {
                tracing::info!(forward = %spec, src = %old, "flow limit reached: closing the least recently active flow");
                flows.remove(&old);
            }
        }
        let flow = flows
            .entry(src)
            .or_insert_with(|| new_flow(&ctx, &spec, &sock, src, now_ms));
        flow.last.store(now_ms(), Ordering::Relaxed);
        let link = flow.link.clone();
        link.send(&mut buf, alen + n).await;
    }
    let open = flows.len();
    drop(flows);
    tracing::debug!(forward = %spec, flows = open, "UDP forward stopped");
}

fn new_flow(
    ctx: &Ctx,
    spec: &Forward,
    sock: &Arc<UdpSocket>,
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
        let mut rec = vec![0u8; RECORD_BUF];
        loop {
            let r = rx.recv(&mut rec).await;
            last2.store(now_ms(), Ordering::Relaxed);
            if sock.send_to(&rec[r.payload], src).await.is_err() {
                m.count_drop(DropReason::SendFailed);
            }
        }
    });
    Flow { link, replies, last }
}

/// Serves a TCP forward until `stop`; then drains its connections.
pub(crate) async fn serve_tcp(
    ctx: Arc<Ctx>,
    spec: Forward,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let spec = Arc::new(spec);
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = ctx.connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopped(&mut stop) => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let (ctx, spec) = (ctx.clone(), spec.clone());
                    conns.spawn(async move {
                        tcp_conn(&ctx, &spec, tcp, peer).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(forward = %spec, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    drain(conns, "TCP forward").await;
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
