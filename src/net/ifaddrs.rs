//! The host's interface addresses (`getifaddrs(3)`), for the destination policy's
//! "the gateway host itself" rule.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Every address configured on the host's interfaces (up or down), with its prefix length
/// taken from the netmask. Non-IP entries (link-layer) are skipped.
pub fn interface_addrs() -> io::Result<Vec<(IpAddr, u8)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; on success it owns a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        // SAFETY: the addresses, when non-null, point at sockaddrs of the family they name.
        if let Some(ip) = unsafe { sockaddr_ip(ifa.ifa_addr) } {
            let prefix = match unsafe { sockaddr_ip(ifa.ifa_netmask) } {
                Some(IpAddr::V4(m)) => u32::from(m).leading_ones() as u8,
                Some(IpAddr::V6(m)) => u128::from(m).leading_ones() as u8,
                None => host_prefix(ip),
            };
            out.push((ip, prefix));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

fn host_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// The IP address in `sa`, if it is an IPv4 or IPv6 sockaddr.
///
/// # Safety
/// `sa` is null or points at a sockaddr whose `sa_family` tells its real type.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    match i32::from((*sa).sa_family) {
        libc::AF_INET => {
            let sin = &*(sa as *const libc::sockaddr_in);
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            let sin6 = &*(sa as *const libc::sockaddr_in6);
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_loopback_interface() {
        let addrs = interface_addrs().unwrap();
        assert!(addrs.contains(&("127.0.0.1".parse().unwrap(), 8)), "{addrs:?}");
    }
}
