//! The shim's local SOCKS5 server (RFC 1928, plain TCP, meant for loopback).
//!
//! * Methods: "no authentication", or RFC 1929 username/password when local credentials
//!   are configured.
//! * CONNECT: a SOCKS5 CONNECT inside TLS to the gateway; the gateway's reply code and BND
//!   are passed on; bytes are then copied both ways with half-close carried through.
//! * UDP ASSOCIATE: a local UDP socket on the IP the application connected to (so BND.ADDR
//!   is usable, never 0.0.0.0) and a [`Link`] to the gateway. Datagrams are converted in
//!   place, the payload never copied:
//!
//! ```text
//!  app → shim   | RSV 2 | FRAG 1 | ATYP ADDR PORT | DATA |          received at buf[18..]
//!  shim → gw    | record prefix 21 | ATYP ADDR PORT | DATA | pad | tag |   sealed in buf
//!                 (the plaintext of a record is exactly the naked datagram minus RSV, FRAG)
//!  gw → shim    | record prefix 21 | ATYP ADDR PORT | DATA | pad | tag |   opened in rec
//!  shim → app   | 00 00 | 00 | ATYP ADDR PORT | DATA |              sent from rec[18..]
//! ```
//!
//!   Only datagrams from the application's IP (the control connection's) are accepted, and
//!   from its port: DST.PORT of the request when nonzero, else the port of its first
//!   datagram. FRAG ≠ 0 is dropped (`fragmented`); a datagram too large for one record is
//!   dropped (`too_large`) and logged once per association, never truncated.
//! * BIND: "command not supported".

use crate::logsafe::Peer;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::net::batch::{BatchSocket, Cursor, GsoBatch, RecvBatch, SMALL_BATCH};
use crate::net::canonical;
use crate::proto::record::{MAX_DATAGRAM, MAX_PLAINTEXT, PREFIX_LEN};
use crate::proto::socks::{self, method, Address, Command, ReplyCode};
use crate::proto::{DropReason, SocksError};
use crate::shim::forward::Train;
use crate::shim::link::Link;
use crate::shim::{accept_loop, stopped, Ctx};

/// Time a local client has to finish its greeting, authentication and request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Room for one received datagram (more than any UDP payload).
pub(crate) const DATAGRAM_ROOM: usize = 65_536;
/// RSV and FRAG: what a naked datagram has in front of the record's plaintext.
const NAKED_PREFIX: usize = 3;

/// Serves the listener until `stop`; then drains the connections it accepted.
pub(crate) async fn serve(ctx: Arc<Ctx>, listener: TcpListener, stop: watch::Receiver<bool>) {
    let stop_conns = stop.clone();
    accept_loop(&ctx.clone(), listener, stop, "SOCKS5", move |tcp, peer| {
        serve_conn(ctx.clone(), tcp, peer, stop_conns.clone())
    })
    .await;
}

/// Why a local client's session ended before a command ran.
#[derive(Debug, thiserror::Error)]
enum LocalError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Socks(#[from] SocksError),
    #[error("timed out")]
    Timeout,
    #[error("no acceptable authentication method offered")]
    NoMethod,
    #[error("wrong local username or password")]
    AuthFailed,
}

async fn serve_conn(ctx: Arc<Ctx>, mut tcp: TcpStream, peer: SocketAddr, stop: watch::Receiver<bool>) {
    let _ = tcp.set_nodelay(true);
    let request = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&ctx, &mut tcp))
        .await
        .unwrap_or(Err(LocalError::Timeout));
    let (cmd, target) = match request {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(%peer, error = %e, "local SOCKS5 handshake failed");
            return;
        }
    };
    let result = match cmd {
        Command::Connect => connect(&ctx, tcp, peer, target).await,
        Command::UdpAssociate => associate(&ctx, tcp, peer, target, stop).await,
        Command::Bind | Command::Other(_) => reply(&mut tcp, ReplyCode::CommandNotSupported, None).await,
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "local SOCKS5 connection ended");
    }
}

/// Greeting, method choice, authentication and the request.
async fn handshake(ctx: &Ctx, tcp: &mut TcpStream) -> Result<(Command, Address), LocalError> {
    let greeting = read_msg(tcp, |b| socks::parse_greeting(b).map(|(_, n)| n)).await?;
    let (methods, _) = socks::parse_greeting(&greeting)?;
    // One login for the whole handshake, even if a reload lands during it.
    let local_login = ctx.socks_credentials.load_full();
    let chosen = match &*local_login {
        Some(_) if methods.contains(&method::USERPASS) => method::USERPASS,
        Some(_) => method::NONE_ACCEPTABLE,
        None if methods.contains(&method::NO_AUTH) => method::NO_AUTH,
        // No local credentials configured: a client that insists on sending some may.
        None if methods.contains(&method::USERPASS) => method::USERPASS,
        None => method::NONE_ACCEPTABLE,
    };
    tcp.write_all(&[socks::SOCKS_VERSION, chosen]).await?;
    if chosen == method::NONE_ACCEPTABLE {
        return Err(LocalError::NoMethod);
    }
    if chosen == method::USERPASS {
        let msg = read_msg(tcp, |b| socks::parse_userpass(b).map(|(_, n)| n)).await?;
        let ((user, pass), _) = socks::parse_userpass(&msg)?;
        let ok = match &*local_login {
            Some((u, p)) => ct_eq(user, u.as_bytes()) & ct_eq(pass, p.as_bytes()),
            None => true,
        };
        tcp.write_all(&[socks::USERPASS_VERSION, if ok { 0 } else { 1 }])
            .await?;
        if !ok {
            return Err(LocalError::AuthFailed);
        }
    }
    let msg = read_msg(tcp, |b| socks::parse_request(b).map(|(_, n)| n)).await?;
    let (req, _) = socks::parse_request(&msg)?;
    Ok((Command::from_u8(req.code), req.addr))
}

/// Compares without an early exit on the first differing byte.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads one message whose parser reports how many bytes it needs, byte-exactly, so
/// nothing the client pipelined after it is swallowed.
async fn read_msg<S: AsyncRead + Unpin>(
    s: &mut S,
    parse: impl Fn(&[u8]) -> Result<usize, SocksError>,
) -> Result<Vec<u8>, LocalError> {
    let mut buf = Vec::with_capacity(32);
    loop {
        match parse(&buf) {
            Ok(_) => return Ok(buf),
            Err(SocksError::Incomplete { need }) if need <= 600 => {
                let have = buf.len();
                buf.resize(need, 0);
                s.read_exact(&mut buf[have..]).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends a reply; BND defaults to 0.0.0.0:0 (refusals carry no address).
async fn reply(tcp: &mut TcpStream, code: ReplyCode, bnd: Option<&Address>) -> Result<(), LocalError> {
    let zero = Address::Ip(SocketAddr::from(([0, 0, 0, 0], 0)));
    let bnd = bnd.unwrap_or(&zero);
    let mut out = Vec::with_capacity(32);
    if socks::encode_request(code as u8, &bnd.as_ref(), &mut out).is_err() {
        // Only an unencodable domain in the gateway's BND can get here: say 0.0.0.0:0.
        out.clear();
        socks::encode_request(code as u8, &zero.as_ref(), &mut out)?;
    }
    tcp.write_all(&out).await?;
    Ok(())
}

async fn connect(ctx: &Ctx, mut tcp: TcpStream, peer: SocketAddr, target: Address) -> Result<(), LocalError> {
    let (mut tls, bnd) = match ctx.dialer.tcp_any(&target).await {
        Ok(x) => x,
        Err(e) => {
            // The target is the local application's (a domain name may hold any bytes).
            tracing::info!(%peer, target = %Peer::str(&target.to_string()), error = %e, "CONNECT through the gateway failed");
            return reply(&mut tcp, e.reply_code(), None).await;
        }
    };
    reply(&mut tcp, ReplyCode::Succeeded, Some(&bnd)).await?;
    // Delegated inspection: the tunnel is named by its own TLS connection's exporter.
    let delegation = ctx.delegator.get().and_then(|d| {
        let tag = crate::client::tunnel_tag(&tls).ok()?;
        let gateway = tls.get_ref().0.peer_addr().ok()?;
        Some((d.clone(), tag, canonical(gateway)))
    });
    // Half-close is carried through: EOF one way shuts down that direction's writer only.
    let (up, down) = match delegation {
        None => tokio::io::copy_bidirectional(&mut tcp, &mut tls).await?,
        Some((d, tag, gateway)) => {
            let mut app = super::delegate::Sniff::new(tcp, d, tag, gateway);
            tokio::io::copy_bidirectional(&mut app, &mut tls).await?
        }
    };
    tracing::debug!(%peer, target = %Peer::str(&target.to_string()), up, down, "CONNECT finished");
    Ok(())
}

/// Where the application's datagrams come from: its IP, and its port once known.
struct AppAddr {
    ip: IpAddr,
    port: Mutex<Option<u16>>,
}

impl AppAddr {
    /// Accepts `src` if it is the application; the first datagram fixes an unknown port.
    fn accept(&self, src: SocketAddr) -> bool {
        if src.ip() != self.ip {
            return false;
        }
        let mut port = self.port.lock().unwrap_or_else(|e| e.into_inner());
        match *port {
            Some(p) => p == src.port(),
            None => {
                *port = Some(src.port());
                true
            }
        }
    }

    fn addr(&self) -> Option<SocketAddr> {
        let port = *self.port.lock().unwrap_or_else(|e| e.into_inner());
        port.map(|p| SocketAddr::new(self.ip, p))
    }
}

async fn associate(
    ctx: &Arc<Ctx>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    dst: Address,
    mut stop: watch::Receiver<bool>,
) -> Result<(), LocalError> {
    let peer = canonical(peer);
    // The IP the application reached us on: loopback when it connected to loopback.
    let local_ip = canonical(tcp.local_addr()?).ip();
    let sock = match crate::net::bind_udp(SocketAddr::new(local_ip, 0)).and_then(BatchSocket::new) {
        Ok(s) => Arc::new(s.track_drops(&ctx.metrics.socket_drops.local)),
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot bind a local UDP socket");
            return reply(&mut tcp, ReplyCode::GeneralFailure, None).await;
        }
    };
    let bnd = sock.local_addr()?;
    let first = match ctx.dialer.udp_any().await {
        Ok(x) => x,
        Err(e) => {
            tracing::info!(%peer, error = %e, "UDP ASSOCIATE: no secure association through any gateway");
            return reply(&mut tcp, e.reply_code(), None).await;
        }
    };
    let label = format!("socks udp {bnd} for {peer}");
    let link = Arc::new(Link::spawn(ctx.dialer.clone(), label.clone(), Some(first)));
    reply(&mut tcp, ReplyCode::Succeeded, Some(&Address::Ip(bnd))).await?;
    tracing::info!(%peer, relay = %bnd, "UDP association open");

    let app = Arc::new(AppAddr {
        ip: peer.ip(),
        port: Mutex::new((dst.port() != 0).then_some(dst.port())),
    });
    let mut tasks = JoinSet::new();
    tasks.spawn(app_to_gateway(
        ctx.clone(),
        sock.clone(),
        app.clone(),
        link.clone(),
        label,
    ));
    tasks.spawn(gateway_to_app(ctx.clone(), sock, app, link.clone()));

    let mut scratch = [0u8; 512];
    let why = loop {
        tokio::select! {
            r = tcp.read(&mut scratch) => match r {
                Ok(0) | Err(_) => break "application closed the control connection",
                // RFC 1928 leaves the control connection idle; bytes on it are ignored.
                Ok(_) => continue,
            },
            _ = stopped(&mut stop) => break "shim shutting down",
            Some(_) = tasks.join_next() => break "relay task ended",
        }
    };
    tracing::info!(%peer, relay = %bnd, reason = why, "UDP association closed");
    tasks.shutdown().await;
    drop(link);
    let _ = tcp.shutdown().await;
    Ok(())
}

/// Naked datagrams from the application, received in batches and sealed into GSO trains
/// towards the gateway (the naked header minus RSV and FRAG is the record's plaintext
/// address); while the link is down they wait in the link's queue.
async fn app_to_gateway(
    ctx: Arc<Ctx>,
    sock: Arc<BatchSocket>,
    app: Arc<AppAddr>,
    link: Arc<Link>,
    label: String,
) {
    let m = &ctx.metrics;
    let at = PREFIX_LEN - NAKED_PREFIX;
    // Slow path (link down): the naked datagram is placed so its plaintext starts at
    // PREFIX_LEN, with room for the record's padding and tag after it.
    let mut buf = vec![0u8; at + DATAGRAM_ROOM + 64];
    let mut batch = RecvBatch::new(SMALL_BATCH);
    let mut train = Train::default();
    let too_large_logged = AtomicBool::new(false);
    loop {
        if let Err(e) = sock.recv_batch(&mut batch).await {
            tracing::debug!(error = %e, "local UDP receive error");
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let mut cur = Cursor::default();
        while let Some((d, src)) = batch.next(&mut cur) {
            if !app.accept(src) {
                m.count_drop(DropReason::ForeignSource);
                continue;
            }
            let h = match socks::parse_udp_header(d) {
                Ok(h) if h.frag != 0 => {
                    m.count_drop(DropReason::Fragmented);
                    continue;
                }
                Ok(h) => h,
                Err(SocksError::Incomplete { .. }) => {
                    m.count_drop(DropReason::Truncated);
                    continue;
                }
                Err(_) => {
                    m.count_drop(DropReason::BadAddress);
                    continue;
                }
            };
            let plaintext_len = d.len() - NAKED_PREFIX;
            if plaintext_len > MAX_PLAINTEXT {
                m.count_drop(DropReason::TooLarge);
                if !too_large_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        link = %label,
                        size = d.len(),
                        max_payload = MAX_PLAINTEXT,
                        "datagram too large for one secure record: dropped (logged once per association)"
                    );
                }
                continue;
            }
            match link.current() {
                Some(assoc) => {
                    let (addr, payload) = d[NAKED_PREFIX..].split_at(h.payload_offset - NAKED_PREFIX);
                    train.push(link.clone(), assoc, addr, payload).await;
                }
                None => {
                    train.flush().await;
                    buf[at..at + d.len()].copy_from_slice(d);
                    link.send(&mut buf, plaintext_len).await;
                }
            }
        }
        train.flush().await;
    }
}

/// Records from the gateway, received in batches, turned into naked datagrams with the
/// source's header and sent to the application in GSO trains.
async fn gateway_to_app(ctx: Arc<Ctx>, sock: Arc<BatchSocket>, app: Arc<AppAddr>, link: Arc<Link>) {
    let m = ctx.metrics.clone();
    let mut rx = link.receiver();
    drop(link);
    let mut batch = RecvBatch::new(SMALL_BATCH);
    let mut out = GsoBatch::new(sock.max_gso_segments());
    loop {
        rx.recv_batch(&mut batch, &mut |payload, from| {
            let Some(to) = app.addr() else {
                m.count_drop(DropReason::UnsolicitedReply);
                return;
            };
            let len = NAKED_PREFIX + from.as_ref().encoded_len() + payload.len();
            if len > MAX_DATAGRAM {
                m.count_drop(DropReason::TooLarge);
                return;
            }
            if !out.fits(to, len) {
                if let Some((dest, bytes, seg)) = out.pending() {
                    if sock.try_send(dest, bytes, seg).is_err() {
                        for _ in 0..out.len() {
                            m.count_drop(DropReason::SendFailed);
                        }
                    }
                }
                out.clear();
            }
            let space = out.reserve(len);
            // Invariant: `space` holds the header and the payload (its length is their sum).
            let h = socks::encode_udp_header(&from.as_ref(), space).expect("room reserved");
            space[h..].copy_from_slice(payload);
            out.commit(to, len, len);
        })
        .await;
        if let Some((dest, bytes, seg)) = out.pending() {
            if sock.send(dest, bytes, seg).await.is_err() {
                for _ in 0..out.len() {
                    m.count_drop(DropReason::SendFailed);
                }
            }
        }
        out.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret!"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn app_address_filter() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        // Port announced in the request: only that port.
        let app = AppAddr {
            ip,
            port: Mutex::new(Some(4000)),
        };
        assert_eq!(app.addr(), Some(sa("127.0.0.1:4000")));
        assert!(app.accept(sa("127.0.0.1:4000")));
        assert!(!app.accept(sa("127.0.0.1:4001")));
        assert!(!app.accept(sa("127.0.0.2:4000")));
        // Port not announced: the first datagram from the app's IP fixes it.
        let app = AppAddr {
            ip,
            port: Mutex::new(None),
        };
        assert_eq!(app.addr(), None);
        assert!(!app.accept(sa("192.0.2.1:5000")));
        assert_eq!(app.addr(), None);
        assert!(app.accept(sa("127.0.0.1:5000")));
        assert!(!app.accept(sa("127.0.0.1:5001")));
        assert_eq!(app.addr(), Some(sa("127.0.0.1:5000")));
    }

    #[test]
    fn naked_header_and_record_plaintext_line_up() {
        // The in-place conversion relies on the naked datagram minus RSV and FRAG being
        // exactly a record's plaintext, placed at PREFIX_LEN.
        let target = Address::Ip("[::1]:53".parse().unwrap());
        let mut naked = vec![0u8; 64];
        let h = socks::encode_udp_header(&target.as_ref(), &mut naked).unwrap();
        let mut plain = vec![0u8; 64];
        let a = target.as_ref().encode(&mut plain).unwrap();
        assert_eq!(h, NAKED_PREFIX + a);
        assert_eq!(naked[NAKED_PREFIX..h], plain[..a]);
        const { assert!(PREFIX_LEN >= NAKED_PREFIX) };
    }
}
