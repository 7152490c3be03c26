//! The three ways the bench moves a datagram to the reflector and back, and the reflector.
//!
//! ```text
//! direct   client socket ───────────────────────────────────────▶ reflector ─┐
//!          client socket ◀────────────────────────────────────────────────────┘
//! naked    client socket ── 00 00 00 ATYP ADDR PORT payload ──▶ relay ──▶ reflector ─┐
//!          (SOCKS5 UDP ASSOCIATE, RFC 1928 §7)                  relay ◀───────────────┘
//! secure   SecureUdp ─────── secure-UDP record ───────────────▶ relay ──▶ reflector ─┐
//!                                                               relay ◀───────────────┘
//! ```
//!
//! [`NakedUdp`] is a conventional SOCKS5 UDP client: UDP ASSOCIATE over any control stream
//! (the gateway's TLS, or a plain TCP SOCKS5 proxy), then RFC 1928 §7 datagrams to the relay.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::client::{self, ClientError, SecureUdp};
use crate::proto::socks::{self, Address, Command};

use super::stats::{PROBE_HEADER, RX_NS_OFFSET};

/// Room in a send buffer for the largest header the bench puts before a payload (a secure
/// record's prefix, the address, padding and tag; or a naked header with a domain).
pub const SEND_OVERHEAD: usize = 512;

/// A control connection: plain TCP to a SOCKS5 proxy, or TLS to the gateway.
pub trait ControlStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ControlStream for T {}

/// A conventional SOCKS5 UDP association (RFC 1928 §4, §7): datagrams carry the SOCKS5 UDP
/// request header in the clear.
pub struct NakedUdp {
    socket: UdpSocket,
    relay: SocketAddr,
    control: JoinHandle<()>,
}

impl NakedUdp {
    /// Sends UDP ASSOCIATE on `control` (already past method negotiation, e.g. by
    /// [`client::authenticate_plain`]) and connects a UDP socket to the relay. `proxy_ip`
    /// replaces an unspecified BND.ADDR. The association lives as long as this value holds
    /// the control connection.
    pub async fn associate<S: ControlStream>(
        mut control: S,
        proxy_ip: IpAddr,
    ) -> Result<NakedUdp, ClientError> {
        let bind = match proxy_ip {
            IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        };
        let socket = crate::net::bind_udp(bind)?;
        // DST.ADDR/DST.PORT: the address we will send from. The IP is unspecified (the proxy
        // sees our real one); the port lets it bind the association before the first datagram.
        let from = Address::Ip(SocketAddr::new(bind.ip(), socket.local_addr()?.port()));
        let bnd = client::request(&mut control, Command::UdpAssociate, &from).await?;
        let relay = match bnd {
            Address::Ip(a) if a.ip().is_unspecified() => SocketAddr::new(proxy_ip, a.port()),
            Address::Ip(a) => a,
            Address::Domain(..) => {
                return Err(crate::proto::SocksError::BadAddressType(socks::atyp::DOMAIN).into())
            }
        };
        socket.connect(relay).await?;
        let control = tokio::spawn(async move {
            let mut scratch = [0u8; 256];
            while let Ok(n) = control.read(&mut scratch).await {
                if n == 0 {
                    break;
                }
            }
        });
        Ok(NakedUdp {
            socket,
            relay,
            control,
        })
    }

    /// The proxy's relay address.
    pub fn relay(&self) -> SocketAddr {
        self.relay
    }

    /// True once the proxy closed the control connection.
    pub fn is_closed(&self) -> bool {
        self.control.is_finished()
    }

    /// Sends `payload` to `target` through the relay, building the datagram in `scratch`
    /// (which needs `payload.len() + 262` bytes).
    pub async fn send_to_buf(&self, payload: &[u8], target: &Address, scratch: &mut [u8]) -> io::Result<()> {
        let h = socks::encode_udp_header(&target.as_ref(), scratch).map_err(io::Error::other)?;
        let end = h + payload.len();
        let Some(body) = scratch.get_mut(h..end) else {
            return Err(io::Error::other("send buffer too small for the datagram"));
        };
        body.copy_from_slice(payload);
        self.socket.send(&scratch[..end]).await?;
        Ok(())
    }

    /// Receives the next well-formed datagram into `buf`; returns where its payload lies
    /// and its source. Malformed or fragmented datagrams are skipped.
    pub async fn recv_in_place(&self, buf: &mut [u8]) -> io::Result<(Range<usize>, Address)> {
        loop {
            let n = self.socket.recv(buf).await?;
            match socks::parse_udp_header(&buf[..n]) {
                Ok(h) if h.frag == 0 => return Ok((h.payload_offset..n, h.addr.to_owned())),
                _ => continue,
            }
        }
    }
}

impl Drop for NakedUdp {
    fn drop(&mut self) {
        self.control.abort();
    }
}

/// Opens a naked association through the gateway's TLS control connection (methods 0x00 or
/// 0x02, as any standard SOCKS5 client tunnelled through TLS).
pub async fn naked_via_gateway(opts: &client::ClientOptions) -> Result<NakedUdp, ClientError> {
    tokio::time::timeout(opts.timeout, async {
        let mut control = client::connect_tls(opts).await?;
        let creds = opts.credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        client::authenticate_plain(&mut control, creds).await?;
        NakedUdp::associate(control, opts.gateway.ip()).await
    })
    .await
    .map_err(|_| ClientError::Timeout)?
}

/// Opens a naked association through a plain (TCP, no TLS) SOCKS5 proxy.
pub async fn naked_via_socks(
    proxy: SocketAddr,
    credentials: Option<(&str, &str)>,
    timeout: std::time::Duration,
) -> Result<NakedUdp, ClientError> {
    tokio::time::timeout(timeout, async {
        let mut control = tokio::net::TcpStream::connect(proxy).await?;
        let _ = control.set_nodelay(true);
        client::authenticate_plain(&mut control, credentials).await?;
        NakedUdp::associate(control, proxy.ip()).await
    })
    .await
    .map_err(|_| ClientError::Timeout)?
}

/// One stream's path to the reflector.
pub enum Link {
    /// Straight to the reflector (connected socket).
    Direct(UdpSocket),
    /// Conventional SOCKS5 UDP through a proxy.
    Naked(NakedUdp, Address),
    /// Secure records through the gateway (boxed: the sessions' key schedules are large).
    Secure(Box<SecureUdp>, Address),
}

impl Link {
    /// A direct link to `target`.
    pub async fn direct(target: SocketAddr) -> io::Result<Link> {
        let bind = match target.ip() {
            IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        };
        let s = crate::net::bind_udp(bind)?;
        s.connect(target).await?;
        Ok(Link::Direct(s))
    }

    /// Sends one payload; `scratch` needs `payload.len() + SEND_OVERHEAD` bytes.
    pub async fn send(&self, payload: &[u8], scratch: &mut [u8]) -> io::Result<()> {
        match self {
            Link::Direct(s) => s.send(payload).await.map(drop),
            Link::Naked(n, target) => n.send_to_buf(payload, target, scratch).await,
            Link::Secure(s, target) => s.send_to_buf(payload, target, scratch).await.map_err(io_error),
        }
    }

    /// Receives the next datagram into `buf` (which should hold any datagram plus record
    /// overhead); returns where its payload lies.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Range<usize>> {
        match self {
            Link::Direct(s) => s.recv(buf).await.map(|n| 0..n),
            Link::Naked(n, _) => n.recv_in_place(buf).await.map(|(r, _)| r),
            Link::Secure(s, _) => s.recv_in_place(buf).await.map(|r| r.payload).map_err(io_error),
        }
    }

    /// True once the association behind the link is gone.
    pub fn is_closed(&self) -> bool {
        match self {
            Link::Direct(_) => false,
            Link::Naked(n, _) => n.is_closed(),
            Link::Secure(s, _) => s.is_closed(),
        }
    }
}

fn io_error(e: ClientError) -> io::Error {
    match e {
        ClientError::Io(e) => e,
        e => io::Error::other(e),
    }
}

/// Echoes every datagram back to its sender until the task is dropped (or the socket fails
/// for good; then returns how many it echoed). With `stamp`, it
/// writes its receive time (ns since `epoch`) into the probe header's `rx_ns` first, so
/// the sender can read the one-way latency off the echo: only meaningful when both ends
/// share `epoch`, i.e. in-process.
pub async fn reflect(socket: Arc<UdpSocket>, stamp: Option<Instant>) -> io::Result<u64> {
    let mut buf = vec![0u8; crate::net::DATAGRAM_BUF];
    let mut echoed = 0u64;
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            // ICMP errors from earlier sends surface here on some systems: not fatal.
            Err(e) if is_transient(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, echoed, "reflector stopped");
                return Err(e);
            }
        };
        if let Some(epoch) = stamp {
            if n >= PROBE_HEADER {
                let now = epoch.elapsed().as_nanos() as u64;
                buf[RX_NS_OFFSET..RX_NS_OFFSET + 8].copy_from_slice(&now.to_be_bytes());
            }
        }
        if socket.send_to(&buf[..n], from).await.is_ok() {
            echoed += 1;
        }
    }
}

/// Errors a UDP socket reports for one earlier datagram (ICMP unreachable and the like),
/// after which it keeps working.
pub fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || is_enobufs(e)
}

/// ENOBUFS: the kernel's queue was momentarily full; the datagram is lost, the socket fine.
fn is_enobufs(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        e.raw_os_error() == Some(libc::ENOBUFS)
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}
