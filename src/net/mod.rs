//! Socket helpers shared by the gateway, the shim and the bench. Knows nothing of either.

pub mod batch;
pub mod channel;
pub mod dns;
pub mod drops;
pub mod icmp;
pub mod ifaddrs;

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// Socket buffer size asked of the kernel for relay sockets (it may grant less).
pub const UDP_BUFFER: usize = 4 << 20;

/// Buffer size that holds any UDP datagram plus record overhead.
pub const DATAGRAM_BUF: usize = 65_536 + 128;

/// `::ffff:a.b.c.d` becomes `a.b.c.d`; everything else is unchanged. Every address that
/// policy, tables or SOCKS headers see goes through this first.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(a.ip()), a.port())
}

/// IP form of [`canonical`]: only the mapped form is unwrapped; the deprecated
/// IPv4-compatible form (`::a.b.c.d`) is a distinct IPv6 address (and `::1` must stay
/// loopback, not become 0.0.0.1).
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// An error mapper for a failed bind of the socket `what` (e.g. "TLS control listener") at
/// `addr`: the message names both, and for "address in use" says what to do, naming the
/// `flag` that moves it. The error kind is kept.
pub fn bind_error(
    what: &'static str,
    addr: SocketAddr,
    flag: &'static str,
) -> impl FnOnce(io::Error) -> io::Error {
    move |e: io::Error| {
        let hint = match e.kind() {
            io::ErrorKind::AddrInUse => format!(
                ": another process (perhaps another sudp) already uses {addr}; stop it or choose \
                 another address with {flag}"
            ),
            io::ErrorKind::AddrNotAvailable => {
                format!(": {} is not an address of this host ({flag})", addr.ip())
            }
            io::ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
                ": port {} needs privilege (CAP_NET_BIND_SERVICE) or a port above 1023 ({flag})",
                addr.port()
            ),
            _ => String::new(),
        };
        io::Error::new(e.kind(), format!("{what} {addr}: cannot bind: {e}{hint}"))
    }
}

/// Connections a TCP listener's accept queue holds (the kernel caps it at
/// `net.core.somaxconn`). std's and mio's defaults (128, 1024) overflowed in a reconnect
/// storm: every shim association of a lost gateway connects to the next one at once, and an
/// overflowed queue drops the SYN, which the client repeats only after a second.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Binds a TCP listener (`SO_REUSEADDR`, as std does) with a [`LISTEN_BACKLOG`] accept
/// queue, registered with tokio.
pub fn bind_tcp_listener(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Binds a UDP socket with large buffers, non-blocking, registered with tokio.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    bind_udp_opts(addr, false)
}

/// Binds `count` UDP sockets to one address with `SO_REUSEPORT`, so the kernel spreads
/// clients (by address hash) over one receive loop per socket. `addr` may have port 0: the
/// first socket picks the port, the others join it. Where `SO_REUSEPORT` is refused, one
/// socket is returned. A port that another socket already holds is an "address in use"
/// error, even if that socket set `SO_REUSEPORT` too.
pub fn bind_udp_group(addr: SocketAddr, count: usize) -> io::Result<Vec<UdpSocket>> {
    if count > 1 && addr.port() != 0 {
        // With SO_REUSEPORT the kernel would let us join any socket of the same user on
        // this port (another gateway, say) and split the clients' datagrams with it. A
        // plain bind first fails if anyone holds the port; released at once, the group
        // then takes it.
        drop(std::net::UdpSocket::bind(addr)?);
    }
    let first = match bind_udp_opts(addr, count > 1) {
        Ok(s) => s,
        Err(_) if count > 1 => return Ok(vec![bind_udp(addr)?]),
        Err(e) => return Err(e),
    };
    let local = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..count {
        match bind_udp_opts(local, true) {
            Ok(s) => group.push(s),
            Err(_) => break,
        }
    }
    Ok(group)
}

fn bind_udp_opts(addr: SocketAddr, reuse_port: bool) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    #[cfg(not(all(unix, not(any(target_os = "solaris", target_os = "illumos")))))]
    let _ = reuse_port;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Dual-stack where the host allows it, so one socket reaches v4 and v6 targets.
        let _ = s.set_only_v6(false);
    }
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    let _ = s.set_send_buffer_size(UDP_BUFFER);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Asks the kernel for a receive buffer of `bytes` on `socket` (it grants at most
/// `net.core.rmem_max`, and at least its own minimum).
pub fn set_recv_buffer(socket: &UdpSocket, bytes: usize) -> io::Result<()> {
    socket2::SockRef::from(socket).set_recv_buffer_size(bytes)
}

/// An unconnected outbound UDP socket that reaches IPv4 and, where the host has IPv6,
/// IPv6 targets. Returns the socket and whether it is an IPv6 (dual-stack) socket.
pub fn bind_outbound() -> io::Result<(UdpSocket, bool)> {
    match bind_udp(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)) {
        Ok(s) => Ok((s, true)),
        Err(_) => Ok((bind_udp("0.0.0.0:0".parse().expect("literal address"))?, false)),
    }
}

/// The address to hand `send_to` on a socket of the given family: IPv4 targets become
/// v4-mapped on a dual-stack socket.
pub fn for_socket(target: SocketAddr, v6_socket: bool) -> SocketAddr {
    match (target, v6_socket) {
        (SocketAddr::V4(v4), true) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        (t, _) => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_unmaps_v4() {
        let m: SocketAddr = "[::ffff:127.0.0.1]:9".parse().unwrap();
        assert_eq!(canonical(m), "127.0.0.1:9".parse::<SocketAddr>().unwrap());
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        assert_eq!(canonical(v6), v6);
        assert_eq!(for_socket("127.0.0.1:9".parse().unwrap(), true), m);
    }
}
