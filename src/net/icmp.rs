//! ICMP errors on UDP sockets (Linux `IP_RECVERR`): which destination answered "port
//! unreachable".
//!
//! An unconnected UDP socket hears nothing of ICMP errors unless it asks. With `IP_RECVERR`
//! (and `IPV6_RECVERR` on an IPv6 socket, whose IPv4-mapped traffic uses the IPv4 option
//! too) the kernel queues each error with the datagram's original destination, and the next
//! receive fails once (`ECONNREFUSED` for a port unreachable) to say so. [`take_unreachable`]
//! then drains that error queue. The gateway does this only on the outbound sockets of
//! associations that may reach end-to-end destinations (PROTOCOL.md §2.4, CLOSE `0x06`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Most queued errors one [`take_unreachable`] call reads (the queue is bounded by the
/// socket's receive buffer anyway; the rest waits for the next call).
const MAX_PER_CALL: usize = 64;

/// Asks the kernel to report ICMP errors of the UDP socket `fd` (both families where the
/// socket is IPv6).
pub fn enable_errors(fd: RawFd, v6_socket: bool) -> io::Result<()> {
    let on: libc::c_int = 1;
    let set = |level, name| {
        // SAFETY: `fd` is a socket the caller owns; the option value is a valid c_int of
        // the length given.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(libc::IPPROTO_IP, libc::IP_RECVERR)?;
    if v6_socket {
        set(libc::IPPROTO_IPV6, libc::IPV6_RECVERR)?;
    }
    Ok(())
}

/// Whether an extended error is an ICMP (v4 type 3 code 3) or ICMPv6 (type 1 code 4) port
/// unreachable.
fn is_port_unreachable(origin: u8, kind: u8, code: u8) -> bool {
    const SO_EE_ORIGIN_ICMP6: u8 = 3;
    (origin == libc::SO_EE_ORIGIN_ICMP && kind == 3 && code == 3)
        || (origin == SO_EE_ORIGIN_ICMP6 && kind == 1 && code == 4)
}

/// Drains (up to [`MAX_PER_CALL`]) the socket's error queue; returns the original
/// destinations of the datagrams that drew a port unreachable (IPv4-mapped addresses as
/// they are; the caller canonicalises). Never blocks.
pub fn take_unreachable(fd: RawFd) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for _ in 0..MAX_PER_CALL {
        // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
        let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut control = [0u64; 64];
        let mut data = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: every pointer in `msg` points at a live buffer of the length given.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n < 0 {
            break;
        }
        let mut unreachable = false;
        // SAFETY: the kernel filled `msg_control` up to `msg_controllen`; CMSG_* walk it
        // within those bounds.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let h = &*c;
                let ours = (h.cmsg_level == libc::IPPROTO_IP && h.cmsg_type == libc::IP_RECVERR)
                    || (h.cmsg_level == libc::IPPROTO_IPV6 && h.cmsg_type == libc::IPV6_RECVERR);
                if ours {
                    let ee = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::sock_extended_err>());
                    unreachable |= is_port_unreachable(ee.ee_origin, ee.ee_type, ee.ee_code);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if unreachable {
            if let Some(addr) = sockaddr_to(&name) {
                out.push(addr);
            }
        }
    }
    out
}

fn sockaddr_to(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(a.sin6_port))))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_closed_port_on_loopback_is_reported_with_its_address() {
        let closed = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_errors(s.as_raw_fd(), false).unwrap();
        s.send_to(b"x", closed).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 8];
        // The pending error surfaces on the next receive.
        let e = s.recv_from(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        assert_eq!(take_unreachable(s.as_raw_fd()), vec![closed]);
        assert!(take_unreachable(s.as_raw_fd()).is_empty(), "drained");
    }

    #[test]
    fn only_port_unreachable_counts() {
        assert!(is_port_unreachable(2, 3, 3));
        assert!(is_port_unreachable(3, 1, 4));
        assert!(!is_port_unreachable(2, 3, 1), "host unreachable");
        assert!(!is_port_unreachable(1, 3, 3), "local origin");
        assert!(!is_port_unreachable(3, 1, 3));
    }
}
