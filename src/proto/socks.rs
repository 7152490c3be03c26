//! SOCKS5 codecs: RFC 1928 messages, RFC 1929 username/password, the sudp sub-negotiation
//! (method 0x80) and the UDP request header.
//!
//! Parsers take `&[u8]` and return the message and the bytes consumed. They tell
//! [`SocksError::Incomplete`] (read more) apart from every other error (close), never panic
//! on peer input, and the datagram parsers reject nothing silently. Encoders write into a
//! caller-supplied buffer and return the bytes written.
//!
//! Addresses (RFC 1928 §5):
//!
//! ```text
//! +------+----------------------------+--------+
//! | ATYP | ADDR                       | PORT   |
//! +------+----------------------------+--------+
//! | 0x01 | 4 bytes IPv4               | 2 (BE) |
//! | 0x03 | 1 byte length n, n bytes   | 2 (BE) |
//! | 0x04 | 16 bytes IPv6              | 2 (BE) |
//! +------+----------------------------+--------+
//! ```
//!
//! UDP request header of a naked datagram (RFC 1928 §7):
//!
//! ```text
//! +-----+------+------+----------+----------+----------+
//! | RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
//! +-----+------+------+----------+----------+----------+
//! |  2  |  1   |  1   | Variable |    2     | Variable |
//! +-----+------+------+----------+----------+----------+
//! ```

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use crate::proto::error::SocksError;
use crate::proto::keys::{AssociationId, CipherSuite};

/// SOCKS protocol version.
pub const SOCKS_VERSION: u8 = 0x05;
/// RFC 1929 sub-negotiation version.
pub const USERPASS_VERSION: u8 = 0x01;
/// sudp sub-negotiation version.
pub const SUDP_VERSION: u8 = 0x01;

/// Authentication method ids.
pub mod method {
    /// No authentication required.
    pub const NO_AUTH: u8 = 0x00;
    /// GSS-API (RFC 1961; the sub-negotiation is [`crate::proto::gssapi`]).
    pub const GSSAPI: u8 = 0x01;
    /// Username/password (RFC 1929).
    pub const USERPASS: u8 = 0x02;
    /// sudp secure-UDP negotiation with optional credentials (private range).
    pub const SUDP: u8 = 0x80;
    /// sudp control session: the sub-negotiation of 0x80, then control frames at once, no
    /// request and no association (PROTOCOL.md §2.8).
    pub const CONTROL: u8 = 0x81;
    /// No acceptable methods.
    pub const NONE_ACCEPTABLE: u8 = 0xFF;
}

/// Address type bytes.
pub mod atyp {
    /// IPv4.
    pub const V4: u8 = 0x01;
    /// Domain name.
    pub const DOMAIN: u8 = 0x03;
    /// IPv6.
    pub const V6: u8 = 0x04;
}

/// A SOCKS5 command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// CONNECT (0x01).
    Connect,
    /// BIND (0x02).
    Bind,
    /// UDP ASSOCIATE (0x03).
    UdpAssociate,
    /// Any other byte (answered with "command not supported").
    Other(u8),
}

impl Command {
    /// Wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            Command::Connect => 1,
            Command::Bind => 2,
            Command::UdpAssociate => 3,
            Command::Other(b) => b,
        }
    }

    /// From the wire byte.
    pub fn from_u8(b: u8) -> Self {
        match b {
            1 => Command::Connect,
            2 => Command::Bind,
            3 => Command::UdpAssociate,
            b => Command::Other(b),
        }
    }
}

/// RFC 1928 §6 reply codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReplyCode {
    /// 0x00 succeeded.
    Succeeded = 0x00,
    /// 0x01 general SOCKS server failure.
    GeneralFailure = 0x01,
    /// 0x02 connection not allowed by ruleset.
    NotAllowed = 0x02,
    /// 0x03 network unreachable.
    NetworkUnreachable = 0x03,
    /// 0x04 host unreachable.
    HostUnreachable = 0x04,
    /// 0x05 connection refused.
    ConnectionRefused = 0x05,
    /// 0x06 TTL expired.
    TtlExpired = 0x06,
    /// 0x07 command not supported.
    CommandNotSupported = 0x07,
    /// 0x08 address type not supported.
    AddressTypeNotSupported = 0x08,
}

impl ReplyCode {
    /// From the wire byte; unknown bytes map to `GeneralFailure`.
    pub fn from_u8(b: u8) -> Self {
        match b {
            0x00 => ReplyCode::Succeeded,
            0x02 => ReplyCode::NotAllowed,
            0x03 => ReplyCode::NetworkUnreachable,
            0x04 => ReplyCode::HostUnreachable,
            0x05 => ReplyCode::ConnectionRefused,
            0x06 => ReplyCode::TtlExpired,
            0x07 => ReplyCode::CommandNotSupported,
            0x08 => ReplyCode::AddressTypeNotSupported,
            _ => ReplyCode::GeneralFailure,
        }
    }
}

/// A borrowed SOCKS5 address, as parsed from a datagram without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrRef<'a> {
    /// IPv4 or IPv6 socket address.
    Ip(SocketAddr),
    /// Domain name (1..=255 bytes of printable ASCII) and port.
    Domain(&'a str, u16),
}

/// An owned SOCKS5 address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// IPv4 or IPv6 socket address.
    Ip(SocketAddr),
    /// Domain name and port.
    Domain(String, u16),
}

impl AddrRef<'_> {
    /// Owned copy.
    pub fn to_owned(&self) -> Address {
        match *self {
            AddrRef::Ip(a) => Address::Ip(a),
            AddrRef::Domain(d, p) => Address::Domain(d.to_owned(), p),
        }
    }

    /// Port.
    pub fn port(&self) -> u16 {
        match self {
            AddrRef::Ip(a) => a.port(),
            AddrRef::Domain(_, p) => *p,
        }
    }

    /// Encoded length in bytes (ATYP through PORT).
    pub fn encoded_len(&self) -> usize {
        match self {
            AddrRef::Ip(SocketAddr::V4(_)) => 1 + 4 + 2,
            AddrRef::Ip(SocketAddr::V6(_)) => 1 + 16 + 2,
            AddrRef::Domain(d, _) => 1 + 1 + d.len() + 2,
        }
    }

    /// Writes ATYP, ADDR, PORT into `out`; returns the bytes written.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, SocksError> {
        let need = self.encoded_len();
        if out.len() < need {
            return Err(SocksError::BufferTooSmall { need });
        }
        match self {
            AddrRef::Ip(SocketAddr::V4(a)) => {
                out[0] = atyp::V4;
                out[1..5].copy_from_slice(&a.ip().octets());
            }
            AddrRef::Ip(SocketAddr::V6(a)) => {
                out[0] = atyp::V6;
                out[1..17].copy_from_slice(&a.ip().octets());
            }
            AddrRef::Domain(d, _) => {
                // Same rule as `parse`, so whatever we encode the peer accepts.
                if d.is_empty() || d.len() > 255 || !d.bytes().all(|c| c.is_ascii_graphic()) {
                    return Err(SocksError::BadDomain);
                }
                out[0] = atyp::DOMAIN;
                out[1] = d.len() as u8;
                out[2..2 + d.len()].copy_from_slice(d.as_bytes());
            }
        }
        out[need - 2..need].copy_from_slice(&self.port().to_be_bytes());
        Ok(need)
    }

    /// Parses an address at the start of `buf`; returns it and the bytes consumed.
    pub fn parse(buf: &'_ [u8]) -> Result<(AddrRef<'_>, usize), SocksError> {
        let Some(&t) = buf.first() else {
            return Err(SocksError::Incomplete { need: 1 });
        };
        let port_at = |buf: &[u8], at: usize| -> Result<u16, SocksError> {
            match buf.get(at..at + 2) {
                Some(p) => Ok(u16::from_be_bytes([p[0], p[1]])),
                None => Err(SocksError::Incomplete { need: at + 2 }),
            }
        };
        match t {
            atyp::V4 => {
                let port = port_at(buf, 5)?;
                let ip = Ipv4Addr::new(buf[1], buf[2], buf[3], buf[4]);
                Ok((AddrRef::Ip(SocketAddr::V4(SocketAddrV4::new(ip, port))), 7))
            }
            atyp::V6 => {
                let port = port_at(buf, 17)?;
                let mut o = [0u8; 16];
                o.copy_from_slice(&buf[1..17]);
                let a = SocketAddrV6::new(Ipv6Addr::from(o), port, 0, 0);
                Ok((AddrRef::Ip(SocketAddr::V6(a)), 19))
            }
            atyp::DOMAIN => {
                let Some(&n) = buf.get(1) else {
                    return Err(SocksError::Incomplete { need: 2 });
                };
                let n = n as usize;
                let port = port_at(buf, 2 + n)?;
                let name = &buf[2..2 + n];
                if n == 0 || !name.iter().all(|c| c.is_ascii_graphic()) {
                    return Err(SocksError::BadDomain);
                }
                // Invariant: every byte is ASCII, checked just above.
                let name = std::str::from_utf8(name).map_err(|_| SocksError::BadDomain)?;
                Ok((AddrRef::Domain(name, port), 4 + n))
            }
            t => Err(SocksError::BadAddressType(t)),
        }
    }
}

impl Address {
    /// Borrowed view.
    pub fn as_ref(&self) -> AddrRef<'_> {
        match self {
            Address::Ip(a) => AddrRef::Ip(*a),
            Address::Domain(d, p) => AddrRef::Domain(d, *p),
        }
    }

    /// Port.
    pub fn port(&self) -> u16 {
        self.as_ref().port()
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Ip(a) => write!(f, "{a}"),
            Address::Domain(d, p) => write!(f, "{d}:{p}"),
        }
    }
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Self {
        Address::Ip(a)
    }
}

/// Parsed RFC 1928 §7 UDP request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpHeader<'a> {
    /// Fragment number (0 = standalone datagram).
    pub frag: u8,
    /// Destination (client to proxy) or source (proxy to client).
    pub addr: AddrRef<'a>,
    /// Offset of the payload in the datagram.
    pub payload_offset: usize,
}

/// Parses the UDP request header of a naked datagram. RSV must be zero; an incomplete header
/// is an error here (a datagram is all there is).
pub fn parse_udp_header(datagram: &[u8]) -> Result<UdpHeader<'_>, SocksError> {
    if datagram.len() < 4 {
        return Err(SocksError::Incomplete { need: 4 });
    }
    if datagram[0] != 0 || datagram[1] != 0 {
        return Err(SocksError::BadReserved);
    }
    let (addr, n) = AddrRef::parse(&datagram[3..])?;
    Ok(UdpHeader {
        frag: datagram[2],
        addr,
        payload_offset: 3 + n,
    })
}

/// Writes RSV, FRAG = 0 and `addr`; returns the header length.
pub fn encode_udp_header(addr: &AddrRef<'_>, out: &mut [u8]) -> Result<usize, SocksError> {
    let need = 3 + addr.encoded_len();
    if out.len() < need {
        return Err(SocksError::BufferTooSmall { need });
    }
    out[..3].fill(0);
    addr.encode(&mut out[3..])?;
    Ok(need)
}

/// Client greeting: VER, NMETHODS, METHODS.
pub fn parse_greeting(buf: &[u8]) -> Result<(&[u8], usize), SocksError> {
    if buf.len() < 2 {
        return Err(SocksError::Incomplete { need: 2 });
    }
    if buf[0] != SOCKS_VERSION {
        return Err(SocksError::BadVersion(buf[0]));
    }
    let n = buf[1] as usize;
    if n == 0 {
        return Err(SocksError::BadField {
            field: "NMETHODS",
            value: 0,
        });
    }
    match buf.get(2..2 + n) {
        Some(m) => Ok((m, 2 + n)),
        None => Err(SocksError::Incomplete { need: 2 + n }),
    }
}

/// Encodes a client greeting.
pub fn encode_greeting(methods: &[u8], out: &mut Vec<u8>) {
    out.push(SOCKS_VERSION);
    out.push(methods.len() as u8);
    out.extend_from_slice(methods);
}

/// Server's method selection: VER, METHOD.
pub fn parse_method_selection(buf: &[u8]) -> Result<(u8, usize), SocksError> {
    if buf.len() < 2 {
        return Err(SocksError::Incomplete { need: 2 });
    }
    if buf[0] != SOCKS_VERSION {
        return Err(SocksError::BadVersion(buf[0]));
    }
    Ok((buf[1], 2))
}

/// A SOCKS5 request (client to server) or reply (server to client); same layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Command (request) or reply code byte (reply).
    pub code: u8,
    /// DST (request) or BND (reply) address.
    pub addr: Address,
}

/// Parses a request or reply: VER, CMD/REP, RSV, ATYP, ADDR, PORT.
pub fn parse_request(buf: &[u8]) -> Result<(Request, usize), SocksError> {
    if buf.len() < 4 {
        return Err(SocksError::Incomplete { need: 4 });
    }
    if buf[0] != SOCKS_VERSION {
        return Err(SocksError::BadVersion(buf[0]));
    }
    if buf[2] != 0 {
        return Err(SocksError::BadReserved);
    }
    let (addr, n) = AddrRef::parse(&buf[3..]).map_err(|e| match e {
        SocksError::Incomplete { need } => SocksError::Incomplete { need: need + 3 },
        e => e,
    })?;
    Ok((
        Request {
            code: buf[1],
            addr: addr.to_owned(),
        },
        3 + n,
    ))
}

/// Encodes a request or reply.
pub fn encode_request(code: u8, addr: &AddrRef<'_>, out: &mut Vec<u8>) -> Result<(), SocksError> {
    let start = out.len();
    out.extend_from_slice(&[SOCKS_VERSION, code, 0]);
    out.resize(start + 3 + addr.encoded_len(), 0);
    addr.encode(&mut out[start + 3..])?;
    Ok(())
}

/// Username and password as borrowed from a message.
pub type Credentials<'a> = (&'a [u8], &'a [u8]);

/// RFC 1929 request: VER=1, ULEN, UNAME, PLEN, PASSWD.
pub fn parse_userpass(buf: &[u8]) -> Result<(Credentials<'_>, usize), SocksError> {
    if buf.len() < 2 {
        return Err(SocksError::Incomplete { need: 2 });
    }
    if buf[0] != USERPASS_VERSION {
        return Err(SocksError::BadVersion(buf[0]));
    }
    parse_credentials(buf, 1, false)
}

/// ULEN UNAME PLEN PASSWD starting at `at`; with `allow_empty`, ULEN = 0 means "none".
fn parse_credentials(
    buf: &[u8],
    at: usize,
    allow_empty: bool,
) -> Result<(Credentials<'_>, usize), SocksError> {
    let Some(&ulen) = buf.get(at) else {
        return Err(SocksError::Incomplete { need: at + 1 });
    };
    let ulen = ulen as usize;
    if ulen == 0 && allow_empty {
        return Ok(((&[], &[]), at + 1));
    }
    if ulen == 0 {
        return Err(SocksError::BadField {
            field: "ULEN",
            value: 0,
        });
    }
    let p = at + 1 + ulen;
    let Some(&plen) = buf.get(p) else {
        return Err(SocksError::Incomplete { need: p + 1 });
    };
    let plen = plen as usize;
    let end = p + 1 + plen;
    if buf.len() < end {
        return Err(SocksError::Incomplete { need: end });
    }
    Ok(((&buf[at + 1..p], &buf[p + 1..end]), end))
}

fn encode_credentials(user: &[u8], pass: &[u8], out: &mut Vec<u8>) -> Result<(), SocksError> {
    if user.len() > 255 || pass.len() > 255 || (user.is_empty() && !pass.is_empty()) {
        return Err(SocksError::BadField {
            field: "credentials length",
            value: user.len().max(pass.len()) as u64,
        });
    }
    out.push(user.len() as u8);
    if user.is_empty() {
        return Ok(());
    }
    out.extend_from_slice(user);
    out.push(pass.len() as u8);
    out.extend_from_slice(pass);
    Ok(())
}

/// Encodes an RFC 1929 request.
pub fn encode_userpass(user: &[u8], pass: &[u8], out: &mut Vec<u8>) -> Result<(), SocksError> {
    if user.is_empty() {
        return Err(SocksError::BadField {
            field: "ULEN",
            value: 0,
        });
    }
    out.push(USERPASS_VERSION);
    encode_credentials(user, pass, out)
}

/// The sudp sub-negotiation request (method 0x80), client to gateway:
///
/// ```text
/// +-----+---------+------------+------+-------+------+--------+
/// | VER | NSUITES | SUITES     | ULEN | UNAME | PLEN | PASSWD |
/// +-----+---------+------------+------+-------+------+--------+
/// |  1  |    1    | NSUITES    |  1   | ULEN  |  1   |  PLEN  |
/// +-----+---------+------------+------+-------+------+--------+
/// ```
///
/// VER = 0x01; SUITES are suite ids in preference order (1..=16 of them); ULEN = 0 means no
/// credentials (then PLEN and PASSWD are absent), used with mTLS or an open gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SudpHello<'a> {
    /// Offered suite ids, preference order (unknown ids are kept so the server can skip them).
    pub suites: &'a [u8],
    /// Username, empty when absent.
    pub user: &'a [u8],
    /// Password, empty when absent.
    pub pass: &'a [u8],
}

/// Largest number of suites a hello may offer.
pub const MAX_SUITES: usize = 16;

impl<'a> SudpHello<'a> {
    /// Parses a hello; returns it and the bytes consumed.
    pub fn parse(buf: &'a [u8]) -> Result<(Self, usize), SocksError> {
        if buf.len() < 2 {
            return Err(SocksError::Incomplete { need: 2 });
        }
        if buf[0] != SUDP_VERSION {
            return Err(SocksError::BadVersion(buf[0]));
        }
        let n = buf[1] as usize;
        if n == 0 || n > MAX_SUITES {
            return Err(SocksError::BadField {
                field: "NSUITES",
                value: n as u64,
            });
        }
        let Some(suites) = buf.get(2..2 + n) else {
            return Err(SocksError::Incomplete { need: 2 + n + 1 });
        };
        let ((user, pass), used) = parse_credentials(buf, 2 + n, true)?;
        Ok((SudpHello { suites, user, pass }, used))
    }

    /// Encodes a hello.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), SocksError> {
        if self.suites.is_empty() || self.suites.len() > MAX_SUITES {
            return Err(SocksError::BadField {
                field: "NSUITES",
                value: self.suites.len() as u64,
            });
        }
        out.push(SUDP_VERSION);
        out.push(self.suites.len() as u8);
        out.extend_from_slice(self.suites);
        encode_credentials(self.user, self.pass, out)
    }
}

/// sudp sub-negotiation status codes.
pub mod sudp_status {
    /// Accepted: SUITE and ASSOC_ID are valid.
    pub const OK: u8 = 0x00;
    /// Credentials missing or wrong; the gateway closes the connection.
    pub const AUTH_FAILED: u8 = 0x01;
    /// No offered suite is acceptable; the gateway closes the connection.
    pub const NO_SUITE: u8 = 0x02;
    /// The credentials were not checked because the gateway's verification queue is full (a
    /// reconnect storm): try again after a backoff. The gateway closes the connection.
    pub const BUSY: u8 = 0x03;
}

/// The sudp sub-negotiation reply, gateway to client (always 11 bytes):
///
/// ```text
/// +-----+--------+-------+----------------------+
/// | VER | STATUS | SUITE | ASSOC_ID (8, BE)     |
/// +-----+--------+-------+----------------------+
/// ```
///
/// On a STATUS other than 0x00, SUITE and ASSOC_ID are zero and the gateway closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SudpAccept {
    /// Status code ([`sudp_status`]).
    pub status: u8,
    /// Chosen suite id.
    pub suite: u8,
    /// Association id for this control connection's secure association.
    pub assoc: AssociationId,
}

impl SudpAccept {
    /// Encoded length.
    pub const LEN: usize = 11;

    /// Accepting reply.
    pub fn ok(suite: CipherSuite, assoc: AssociationId) -> Self {
        SudpAccept {
            status: sudp_status::OK,
            suite: suite.id(),
            assoc,
        }
    }

    /// Refusing reply.
    pub fn refuse(status: u8) -> Self {
        SudpAccept {
            status,
            suite: 0,
            assoc: AssociationId(0),
        }
    }

    /// Encodes the reply.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = SUDP_VERSION;
        b[1] = self.status;
        b[2] = self.suite;
        b[3..].copy_from_slice(&self.assoc.to_bytes());
        b
    }

    /// Parses a reply.
    pub fn parse(buf: &[u8]) -> Result<(Self, usize), SocksError> {
        if buf.len() < Self::LEN {
            return Err(SocksError::Incomplete { need: Self::LEN });
        }
        if buf[0] != SUDP_VERSION {
            return Err(SocksError::BadVersion(buf[0]));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&buf[3..11]);
        Ok((
            SudpAccept {
                status: buf[1],
                suite: buf[2],
                assoc: AssociationId::from_bytes(id),
            },
            Self::LEN,
        ))
    }
}

/// Picks the first suite of the client's preference list that `allowed` contains.
pub fn choose_suite(offered: &[u8], allowed: &[CipherSuite]) -> Option<CipherSuite> {
    offered
        .iter()
        .filter_map(|&id| CipherSuite::from_id(id))
        .find(|s| allowed.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::detect::{classify, DatagramKind};
    use proptest::prelude::*;

    #[test]
    fn udp_header_v4_known_bytes() {
        let a: SocketAddr = "192.0.2.1:53".parse().unwrap();
        let mut out = [0u8; 32];
        let n = encode_udp_header(&AddrRef::Ip(a), &mut out).unwrap();
        assert_eq!(&out[..n], &[0, 0, 0, 1, 192, 0, 2, 1, 0, 53]);
        let h = parse_udp_header(&out[..n]).unwrap();
        assert_eq!(h.addr, AddrRef::Ip(a));
        assert_eq!(h.payload_offset, 10);
    }

    #[test]
    fn udp_header_domain_and_v6() {
        let mut out = [0u8; 300];
        let n = encode_udp_header(&AddrRef::Domain("example.com", 443), &mut out).unwrap();
        assert_eq!(&out[..6], &[0, 0, 0, 3, 11, b'e']);
        assert_eq!(&out[n - 2..n], &[1, 187]);
        let h = parse_udp_header(&out[..n]).unwrap();
        assert_eq!(h.addr, AddrRef::Domain("example.com", 443));
        let a: SocketAddr = "[2001:db8::1]:5004".parse().unwrap();
        let n = encode_udp_header(&AddrRef::Ip(a), &mut out).unwrap();
        assert_eq!(n, 22);
        assert_eq!(parse_udp_header(&out[..n]).unwrap().addr, AddrRef::Ip(a));
    }

    #[test]
    fn bad_udp_headers() {
        assert_eq!(parse_udp_header(&[0, 1, 0, 1]), Err(SocksError::BadReserved));
        assert_eq!(
            parse_udp_header(&[0, 0, 0, 9]),
            Err(SocksError::BadAddressType(9))
        );
        assert_eq!(
            parse_udp_header(&[0, 0, 0, 3, 0, 0, 1]),
            Err(SocksError::BadDomain)
        );
        assert!(matches!(
            parse_udp_header(&[0, 0, 0, 1, 1, 2]),
            Err(SocksError::Incomplete { .. })
        ));
    }

    #[test]
    fn request_incomplete_then_complete() {
        let mut v = Vec::new();
        encode_request(3, &AddrRef::Domain("a.b", 9), &mut v).unwrap();
        for i in 0..v.len() {
            assert!(
                matches!(parse_request(&v[..i]), Err(SocksError::Incomplete { .. })),
                "{i}"
            );
        }
        let (r, n) = parse_request(&v).unwrap();
        assert_eq!(n, v.len());
        assert_eq!(r.code, 3);
        assert_eq!(r.addr, Address::Domain("a.b".into(), 9));
    }

    #[test]
    fn credentials_over_255_bytes_are_refused_on_either_side() {
        let (long, short) = (vec![b'a'; 256], b"p".to_vec());
        let max = vec![b'b'; 255];
        for (u, p, ok) in [
            (&long, &short, false),
            (&short, &long, false),
            (&long, &long, false),
            (&max, &max, true),
        ] {
            let mut v = Vec::new();
            let r = encode_userpass(u, p, &mut v);
            assert_eq!(r.is_ok(), ok, "RFC 1929 user {} pass {}", u.len(), p.len());
            if !ok {
                assert!(matches!(
                    r,
                    Err(SocksError::BadField {
                        field: "credentials length",
                        ..
                    })
                ));
            }
            let mut v = Vec::new();
            let h = SudpHello {
                suites: &[1],
                user: u,
                pass: p,
            };
            assert_eq!(
                h.encode(&mut v).is_ok(),
                ok,
                "SudpHello user {} pass {}",
                u.len(),
                p.len()
            );
        }
    }

    /// A hello offers 1 to MAX_SUITES suites: encode refuses an empty list and a long one
    /// alike (parse refuses both too), and writes nothing when it refuses.
    #[test]
    fn sudp_hello_encode_refuses_an_empty_or_long_suite_list() {
        let long = [1u8; MAX_SUITES + 1];
        let full = [1u8; MAX_SUITES];
        for (suites, ok) in [
            (&[][..], false),
            (&long[..], false),
            (&full[..], true),
            (&[1][..], true),
        ] {
            let mut v = Vec::new();
            let h = SudpHello {
                suites,
                user: b"",
                pass: b"",
            };
            let r = h.encode(&mut v);
            assert_eq!(r.is_ok(), ok, "{} suites", suites.len());
            if ok {
                assert_eq!(SudpHello::parse(&v).unwrap().0.suites, suites);
            } else {
                assert!(v.is_empty());
                assert!(matches!(
                    r,
                    Err(SocksError::BadField { field: "NSUITES", value }) if value == suites.len() as u64
                ));
            }
        }
    }

    #[test]
    fn sudp_hello_round_trip_with_and_without_credentials() {
        for (u, p) in [(&b""[..], &b""[..]), (b"alice", b"s3cret")] {
            let h = SudpHello {
                suites: &[1, 2],
                user: u,
                pass: p,
            };
            let mut v = Vec::new();
            h.encode(&mut v).unwrap();
            for i in 0..v.len() {
                assert!(matches!(
                    SudpHello::parse(&v[..i]),
                    Err(SocksError::Incomplete { .. })
                ));
            }
            let (back, n) = SudpHello::parse(&v).unwrap();
            assert_eq!(n, v.len());
            assert_eq!(back, h);
        }
    }

    #[test]
    fn sudp_accept_round_trip() {
        let a = SudpAccept::ok(
            CipherSuite::Aes256CbcHmacSha256,
            AssociationId(0x0102030405060708),
        );
        let b = a.encode();
        assert_eq!(b, [1, 0, 2, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(SudpAccept::parse(&b).unwrap(), (a, 11));
    }

    #[test]
    fn suite_choice_follows_client_preference() {
        let all = CipherSuite::ALL;
        assert_eq!(
            choose_suite(&[9, 2, 1], &all),
            Some(CipherSuite::Aes256CbcHmacSha256)
        );
        assert_eq!(choose_suite(&[9], &all), None);
        assert_eq!(choose_suite(&[1], &[CipherSuite::Aes256CbcHmacSha256]), None);
    }

    fn arb_addr() -> impl Strategy<Value = Address> {
        prop_oneof![
            any::<(u32, u16)>().prop_map(|(ip, p)| Address::Ip(SocketAddr::from((Ipv4Addr::from(ip), p)))),
            any::<(u128, u16)>().prop_map(|(ip, p)| Address::Ip(SocketAddr::from((Ipv6Addr::from(ip), p)))),
            ("[a-z0-9.-]{1,255}", any::<u16>()).prop_map(|(d, p)| Address::Domain(d, p)),
        ]
    }

    proptest! {
        #[test]
        fn udp_header_round_trip(addr in arb_addr(), payload in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = vec![0u8; 300 + payload.len()];
            let n = encode_udp_header(&addr.as_ref(), &mut buf).unwrap();
            buf.truncate(n);
            buf.extend_from_slice(&payload);
            let h = parse_udp_header(&buf).unwrap();
            prop_assert_eq!(h.addr.to_owned(), addr);
            prop_assert_eq!(h.frag, 0);
            prop_assert_eq!(&buf[h.payload_offset..], &payload[..]);
        }
    }

    use crate::proto::testing::{assert_reached, counted};

    /// A valid message and one change to it: byte `at` (modulo the length) set to `value`,
    /// or, with `cut`, the message cut at `at`.
    ///
    /// Half the changes hit the first four bytes (where versions, counts and types sit)
    /// and half the values are ones those fields treat specially, so that each check
    /// is reached often, not once in thousands of cases.
    fn mutation() -> impl Strategy<Value = (prop::sample::Index, bool, u8, bool)> {
        let value = prop_oneof![
            1 => any::<u8>(),
            1 => prop::sample::select(vec![0u8, 1, 5, 17, 0xff]),
        ];
        (
            any::<prop::sample::Index>(),
            any::<bool>(),
            value,
            prop::bool::weighted(0.15),
        )
    }

    fn mutate(
        valid: &[u8],
        (at, head, value, cut): &(prop::sample::Index, bool, u8, bool),
    ) -> (Vec<u8>, usize) {
        let i = if *head {
            at.index(valid.len().min(4))
        } else {
            at.index(valid.len())
        };
        let mut m = valid.to_vec();
        if *cut {
            m.truncate(i);
        } else {
            m[i] = *value;
        }
        (m, i)
    }

    fn label(e: &SocksError) -> &'static str {
        match e {
            SocksError::Incomplete { .. } => "incomplete",
            SocksError::BadVersion(_) => "bad_version",
            SocksError::BadReserved => "bad_reserved",
            SocksError::BadAddressType(_) => "bad_address_type",
            SocksError::BadDomain => "bad_domain",
            SocksError::BadField { .. } => "bad_field",
            _ => "other",
        }
    }

    /// Requests (and replies: same layout) built valid, then one byte changed or the message
    /// cut. Reaches: success (port, address bytes, code changed), VER, RSV, ATYP, the domain
    /// check and "incomplete", each counted. Per field the outcome is the model's: VER != 5
    /// is `BadVersion`, RSV != 0 `BadReserved`, an unknown ATYP `BadAddressType`, a
    /// non-graphic name byte `BadDomain`, a cut `Incomplete`; whatever parses re-encodes to
    /// the bytes it consumed.
    #[test]
    fn mutated_requests_reach_every_check() {
        let counts = counted(
            1500,
            (arb_addr(), any::<u8>(), mutation()),
            |(addr, code, mutation)| {
                let mut valid = Vec::new();
                encode_request(code, &addr.as_ref(), &mut valid).unwrap();
                let (m, i) = mutate(&valid, &mutation);
                let got = parse_request(&m);
                if let Ok((r, n)) = &got {
                    let mut again = Vec::new();
                    encode_request(r.code, &r.addr.as_ref(), &mut again).unwrap();
                    prop_assert_eq!(&again[..], &m[..*n]);
                }
                let (_, _, value, cut) = mutation;
                let name = match &addr {
                    Address::Domain(d, _) => Some(5..5 + d.len()),
                    Address::Ip(_) => None,
                };
                if cut {
                    prop_assert!(matches!(got, Err(SocksError::Incomplete { .. })), "{:?}", got);
                } else if i == 0 && value != SOCKS_VERSION {
                    prop_assert_eq!(&got, &Err(SocksError::BadVersion(value)));
                } else if i == 2 && value != 0 {
                    prop_assert_eq!(&got, &Err(SocksError::BadReserved));
                } else if i == 3 && ![atyp::V4, atyp::DOMAIN, atyp::V6].contains(&value) {
                    prop_assert_eq!(&got, &Err(SocksError::BadAddressType(value)));
                } else if name.as_ref().is_some_and(|r| r.contains(&i)) && !value.is_ascii_graphic() {
                    prop_assert_eq!(&got, &Err(SocksError::BadDomain));
                } else if i == 1
                    || i >= valid.len() - 2
                    || (i > 3 && name.is_none())
                    || name.as_ref().is_some_and(|r| r.contains(&i))
                {
                    // CMD, PORT, an IP byte or a graphic name byte: still a request, that field changed.
                    let (r, _) = got.clone().unwrap();
                    prop_assert_eq!(r.code, m[1]);
                    prop_assert_eq!(
                        r.addr.port(),
                        u16::from_be_bytes([m[m.len() - 2], m[m.len() - 1]])
                    );
                }
                Ok(match &got {
                    Ok(_) => "ok",
                    Err(e) => label(e),
                })
            },
        );
        assert_reached(
            &counts,
            &[
                "ok",
                "incomplete",
                "bad_version",
                "bad_reserved",
                "bad_address_type",
                "bad_domain",
            ],
            20,
        );
    }

    /// UDP request headers built valid, then one byte changed or the datagram cut. Reaches:
    /// success (FRAG, address, port changed), RSV, ATYP, the domain check and a cut-short
    /// header, counted; the model as for requests, and FRAG is passed through unchecked.
    #[test]
    fn mutated_udp_headers_reach_every_check() {
        let strategy = (
            arb_addr(),
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 0..8),
            mutation(),
        );
        let counts = counted(1500, strategy, |(addr, frag, payload, mutation)| {
            let mut valid = vec![0u8; 300];
            let n = encode_udp_header(&addr.as_ref(), &mut valid).unwrap();
            valid[2] = frag;
            valid.truncate(n);
            let (mut m, i) = mutate(&valid, &mutation);
            m.extend_from_slice(&payload);
            let got = parse_udp_header(&m);
            if let Ok(h) = &got {
                let mut again = vec![0u8; 300];
                let k = encode_udp_header(&h.addr, &mut again).unwrap();
                prop_assert_eq!(k, h.payload_offset);
                prop_assert_eq!(&again[3..k], &m[3..k]);
                prop_assert_eq!(h.frag, m[2]);
                prop_assert_eq!(classify(&m), DatagramKind::Naked);
            }
            let (_, _, value, cut) = mutation;
            let name = match &addr {
                Address::Domain(d, _) => Some(5..5 + d.len()),
                Address::Ip(_) => None,
            };
            if !cut && i < 2 && value != 0 {
                prop_assert_eq!(&got, &Err(SocksError::BadReserved));
            } else if !cut && i == 3 && ![atyp::V4, atyp::DOMAIN, atyp::V6].contains(&value) {
                prop_assert_eq!(&got, &Err(SocksError::BadAddressType(value)));
            } else if !cut && name.as_ref().is_some_and(|r| r.contains(&i)) && !value.is_ascii_graphic() {
                prop_assert_eq!(&got, &Err(SocksError::BadDomain));
            } else if !cut && payload.is_empty() && (i == 2 || i >= valid.len() - 2) {
                let h = got.unwrap();
                prop_assert_eq!(h.frag, m[2]);
                prop_assert_eq!(h.payload_offset, valid.len());
            }
            Ok(match &got {
                Ok(_) => "ok",
                Err(e) => label(e),
            })
        });
        assert_reached(
            &counts,
            &[
                "ok",
                "incomplete",
                "bad_reserved",
                "bad_address_type",
                "bad_domain",
            ],
            20,
        );
    }

    /// A model of the length-prefixed messages: (accepted, bytes consumed) or the error
    /// label, written from RFC 1928 §3, RFC 1929 §2 and docs/PROTOCOL.md §3 alone.
    fn model(kind: u8, b: &[u8]) -> Result<usize, &'static str> {
        let at = |i: usize| b.get(i).copied().ok_or("incomplete");
        match kind {
            // Greeting: VER=5, NMETHODS >= 1, METHODS.
            0 => {
                at(1)?;
                if b[0] != 5 {
                    return Err("bad_version");
                }
                let n = usize::from(b[1]);
                if n == 0 {
                    return Err("bad_field");
                }
                at(1 + n).map(|_| 2 + n)
            }
            // Method selection: VER=5, METHOD.
            1 => {
                at(1)?;
                if b[0] != 5 {
                    Err("bad_version")
                } else {
                    Ok(2)
                }
            }
            // RFC 1929: VER=1, ULEN >= 1, UNAME, PLEN, PASSWD.
            2 => {
                at(1)?;
                if b[0] != 1 {
                    return Err("bad_version");
                }
                let u = usize::from(b[1]);
                if u == 0 {
                    return Err("bad_field");
                }
                let p = usize::from(at(2 + u)?);
                at(2 + u + p).map(|_| 3 + u + p)
            }
            // SudpHello: VER=1, NSUITES 1..=16, SUITES, ULEN (0: done), UNAME, PLEN, PASSWD.
            3 => {
                at(1)?;
                if b[0] != 1 {
                    return Err("bad_version");
                }
                let n = usize::from(b[1]);
                if n == 0 || n > MAX_SUITES {
                    return Err("bad_field");
                }
                let u = usize::from(at(2 + n)?);
                if u == 0 {
                    return Ok(3 + n);
                }
                let p = usize::from(at(3 + n + u)?);
                at(3 + n + u + p).map(|_| 4 + n + u + p)
            }
            // SudpAccept: 11 bytes, VER=1.
            _ => {
                at(10)?;
                if b[0] != 1 {
                    Err("bad_version")
                } else {
                    Ok(11)
                }
            }
        }
    }

    /// Parses with the parser `kind` names and re-encodes what it accepted.
    fn parse_encode(kind: u8, b: &[u8]) -> Result<(usize, Vec<u8>), SocksError> {
        let mut v = Vec::new();
        let n = match kind {
            0 => {
                let (m, n) = parse_greeting(b)?;
                encode_greeting(m, &mut v);
                n
            }
            1 => {
                let (m, n) = parse_method_selection(b)?;
                v.extend_from_slice(&[SOCKS_VERSION, m]);
                n
            }
            2 => {
                let ((u, p), n) = parse_userpass(b)?;
                encode_userpass(u, p, &mut v).unwrap();
                n
            }
            3 => {
                let (h, n) = SudpHello::parse(b)?;
                h.encode(&mut v).unwrap();
                n
            }
            _ => {
                let (a, n) = SudpAccept::parse(b)?;
                v.extend_from_slice(&a.encode());
                n
            }
        };
        Ok((n, v))
    }

    /// A valid message of parser `kind`.
    fn valid_message() -> impl Strategy<Value = (u8, Vec<u8>)> {
        let bytes = |lo: usize, hi: usize| prop::collection::vec(any::<u8>(), lo..hi);
        prop_oneof![
            bytes(1, 256).prop_map(|m| {
                let mut v = Vec::new();
                encode_greeting(&m, &mut v);
                (0, v)
            }),
            any::<u8>().prop_map(|m| (1, vec![SOCKS_VERSION, m])),
            (bytes(1, 256), bytes(0, 256)).prop_map(|(u, p)| {
                let mut v = Vec::new();
                encode_userpass(&u, &p, &mut v).unwrap();
                (2, v)
            }),
            (bytes(1, MAX_SUITES + 1), bytes(0, 40), bytes(0, 40)).prop_map(|(s, u, p)| {
                let p = if u.is_empty() { Vec::new() } else { p };
                let mut v = Vec::new();
                SudpHello {
                    suites: &s,
                    user: &u,
                    pass: &p,
                }
                .encode(&mut v)
                .unwrap();
                (3, v)
            }),
            (any::<u8>(), any::<u8>(), any::<u64>()).prop_map(|(status, suite, id)| (
                4,
                SudpAccept {
                    status,
                    suite,
                    assoc: AssociationId(id)
                }
                .encode()
                .to_vec()
            )),
        ]
    }

    /// Greeting, method selection, RFC 1929, SudpHello and SudpAccept: a valid message with
    /// one byte changed, one cut, or trailing bytes. Property: accepted iff the model
    /// accepts, with the bytes consumed the model says (trailing data left alone), and the
    /// accepted message re-encodes to exactly those bytes; every error the model names.
    /// Counted: success and each refusal (version, count/length field, incomplete) per parser.
    #[test]
    fn length_prefixed_messages_match_their_model() {
        let strategy = (
            valid_message(),
            mutation(),
            prop::collection::vec(any::<u8>(), 0..4),
        );
        let counts = counted(3000, strategy, |((kind, valid), mutation, trailing)| {
            let (mut m, _) = mutate(&valid, &mutation);
            m.extend_from_slice(&trailing);
            let got = parse_encode(kind, &m);
            match (model(kind, &m), &got) {
                (Ok(n), Ok((k, v))) => {
                    prop_assert_eq!(n, *k);
                    prop_assert_eq!(&v[..], &m[..n]);
                }
                (Err(want), Err(e)) => prop_assert_eq!(want, label(e)),
                (want, got) => prop_assert!(false, "kind {}: model {:?}, parser {:?}", kind, want, got),
            }
            const LABELS: [[&str; 4]; 5] = [
                [
                    "greeting ok",
                    "greeting incomplete",
                    "greeting bad_version",
                    "greeting bad_field",
                ],
                [
                    "method ok",
                    "method incomplete",
                    "method bad_version",
                    "method bad_version",
                ],
                [
                    "userpass ok",
                    "userpass incomplete",
                    "userpass bad_version",
                    "userpass bad_field",
                ],
                [
                    "hello ok",
                    "hello incomplete",
                    "hello bad_version",
                    "hello bad_field",
                ],
                [
                    "accept ok",
                    "accept incomplete",
                    "accept bad_version",
                    "accept bad_version",
                ],
            ];
            let row = LABELS[usize::from(kind)];
            Ok(match got {
                Ok(_) => row[0],
                Err(SocksError::Incomplete { .. }) => row[1],
                Err(SocksError::BadVersion(_)) => row[2],
                Err(_) => row[3],
            })
        });
        let mut want = Vec::new();
        for p in ["greeting", "userpass", "hello"] {
            for l in ["ok", "incomplete", "bad_version", "bad_field"] {
                want.push(format!("{p} {l}"));
            }
        }
        for p in ["method", "accept"] {
            for l in ["ok", "incomplete", "bad_version"] {
                want.push(format!("{p} {l}"));
            }
        }
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_reached(&counts, &want, 1);
    }

    proptest! {
        /// `choose_suite` is the first offered id that is known and allowed.
        #[test]
        fn suite_choice_matches_its_model(offered in prop::collection::vec(0u8..5, 0..8), mask in 0u8..4) {
            let allowed: Vec<CipherSuite> =
                CipherSuite::ALL.into_iter().filter(|s| mask & (1 << (s.id() - 1)) != 0).collect();
            let model = offered
                .iter()
                .find_map(|&id| CipherSuite::from_id(id).filter(|s| allowed.contains(s)));
            prop_assert_eq!(choose_suite(&offered, &allowed), model);
        }
    }

    /// The `need` of every `Incomplete` at every cut of a valid message: the length up to
    /// the end of the next field the parser has to see (the control connection's reader
    /// resizes its buffer to `need` and reads exactly that much, so a `need` too large
    /// waits for bytes a correct peer never sends, and one at or below the bytes in hand
    /// would shrink the buffer). Written from the byte layouts, one list per message.
    #[test]
    fn incomplete_names_the_end_of_the_next_field() {
        fn needs(parse: impl Fn(&[u8]) -> Result<usize, SocksError>, msg: &[u8]) -> Vec<usize> {
            assert_eq!(parse(msg), Ok(msg.len()), "the whole message parses");
            (0..msg.len())
                .map(|cut| match parse(&msg[..cut]) {
                    Err(SocksError::Incomplete { need }) => need,
                    other => panic!("cut {cut} of {msg:?}: {other:?}"),
                })
                .collect()
        }
        let request = |addr: AddrRef<'_>| {
            let mut v = Vec::new();
            encode_request(1, &addr, &mut v).unwrap();
            v
        };
        let req = |b: &[u8]| parse_request(b).map(|(_, n)| n);
        // VER CMD RSV ATYP | LEN | NAME PORT
        assert_eq!(
            needs(req, &request(AddrRef::Domain("a.b", 9))),
            [4, 4, 4, 4, 5, 10, 10, 10, 10, 10]
        );
        let v4: SocketAddr = "192.0.2.1:53".parse().unwrap();
        assert_eq!(
            needs(req, &request(AddrRef::Ip(v4))),
            [4, 4, 4, 4, 10, 10, 10, 10, 10, 10]
        );
        let v6: SocketAddr = "[2001:db8::1]:5004".parse().unwrap();
        let mut want = vec![4; 4];
        want.resize(22, 22);
        assert_eq!(needs(req, &request(AddrRef::Ip(v6))), want);
        // An address alone: ATYP | LEN | NAME PORT, ATYP | ADDR PORT.
        let addr = |b: &[u8]| AddrRef::parse(b).map(|(_, n)| n);
        let mut a = [0u8; 32];
        let n = AddrRef::Domain("ab", 1).encode(&mut a).unwrap();
        assert_eq!(needs(addr, &a[..n]), [1, 2, 6, 6, 6, 6]);
        let n = AddrRef::Ip(v4).encode(&mut a).unwrap();
        assert_eq!(needs(addr, &a[..n]), [1, 7, 7, 7, 7, 7, 7]);
        // Greeting: VER NMETHODS | METHODS.
        let greeting = |b: &[u8]| parse_greeting(b).map(|(_, n)| n);
        assert_eq!(needs(greeting, &[5, 2, 0, 2]), [2, 2, 4, 4]);
        // NMETHODS other than 2, where 2 + n and 2 * n differ.
        assert_eq!(needs(greeting, &[5, 1, 0]), [2, 2, 3]);
        assert_eq!(needs(greeting, &[5, 3, 0, 1, 2]), [2, 2, 5, 5, 5]);
        let method = |b: &[u8]| parse_method_selection(b).map(|(_, n)| n);
        assert_eq!(needs(method, &[5, 0x80]), [2, 2]);
        // RFC 1929: VER ULEN | UNAME PLEN | PASSWD.
        let userpass = |b: &[u8]| parse_userpass(b).map(|(_, n)| n);
        assert_eq!(
            needs(userpass, &[1, 2, b'a', b'b', 3, b'x', b'y', b'z']),
            [2, 2, 5, 5, 5, 8, 8, 8]
        );
        // SudpHello: VER NSUITES | SUITES ULEN | UNAME PLEN | PASSWD; ULEN 0 ends it.
        let hello = |b: &[u8]| SudpHello::parse(b).map(|(_, n)| n);
        assert_eq!(needs(hello, &[1, 2, 3, 1, 0]), [2, 2, 5, 5, 5]);
        assert_eq!(
            needs(hello, &[1, 1, 3, 2, b'a', b'b', 1, b'p']),
            [2, 2, 4, 4, 7, 7, 7, 8]
        );
        let accept = |b: &[u8]| SudpAccept::parse(b).map(|(_, n)| n);
        let ok = SudpAccept::ok(CipherSuite::Aes128Gcm, AssociationId(7)).encode();
        assert_eq!(needs(accept, &ok), [11; 11]);
    }

    /// Every command byte survives `from_u8` then `to_u8`, and the three RFC 1928 commands
    /// are the ones named (BIND and unknown bytes are refused by the gateway by name).
    #[test]
    fn command_bytes_map_both_ways() {
        assert_eq!(Command::from_u8(1), Command::Connect);
        assert_eq!(Command::from_u8(2), Command::Bind);
        assert_eq!(Command::from_u8(3), Command::UdpAssociate);
        assert_eq!(Command::from_u8(0), Command::Other(0));
        assert_eq!(Command::from_u8(4), Command::Other(4));
        for b in 0..=255u8 {
            assert_eq!(Command::from_u8(b).to_u8(), b);
        }
    }

    /// Reply bytes 0x00..=0x08 are their RFC 1928 §6 codes; anything else reads as a general
    /// failure, never as success.
    #[test]
    fn reply_codes_map_to_their_rfc_bytes() {
        for b in 0..=255u8 {
            let code = ReplyCode::from_u8(b);
            if b <= 0x08 {
                assert_eq!(code as u8, b);
            } else {
                assert_eq!(code, ReplyCode::GeneralFailure, "{b:#04x}");
            }
        }
    }

    /// `Address` prints as `host:port` (IPv6 bracketed), as the logs and audit lines show it.
    #[test]
    fn addresses_print_as_host_and_port() {
        let v4: SocketAddr = "192.0.2.1:53".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:5004".parse().unwrap();
        assert_eq!(Address::from(v4), Address::Ip(v4));
        assert_eq!(Address::from(v4).to_string(), "192.0.2.1:53");
        assert_eq!(Address::from(v6).to_string(), "[2001:db8::1]:5004");
        let d = Address::Domain("example.com".into(), 443);
        assert_eq!(d.to_string(), "example.com:443");
        assert_eq!((d.port(), d.as_ref().port()), (443, 443));
    }

    /// A buffer of exactly the encoded length is enough and one byte less is not, for an
    /// address and a UDP header; a name of 255 bytes (the most a length byte holds) encodes
    /// and parses back, one of 256 is refused.
    #[test]
    fn exact_buffers_and_the_longest_name() {
        let long = "n".repeat(255);
        for addr in [
            AddrRef::Ip("192.0.2.1:53".parse().unwrap()),
            AddrRef::Ip("[2001:db8::1]:5004".parse().unwrap()),
            AddrRef::Domain("example.com", 443),
            AddrRef::Domain(&long, 1),
        ] {
            let need = addr.encoded_len();
            let mut out = vec![0u8; need];
            assert_eq!(addr.encode(&mut out), Ok(need));
            assert_eq!(AddrRef::parse(&out), Ok((addr, need)));
            assert_eq!(
                addr.encode(&mut out[..need - 1]),
                Err(SocksError::BufferTooSmall { need })
            );
            let mut out = vec![0u8; 3 + need];
            assert_eq!(encode_udp_header(&addr, &mut out), Ok(3 + need));
            assert_eq!(parse_udp_header(&out).unwrap().addr, addr);
            assert_eq!(
                encode_udp_header(&addr, &mut out[..need + 2]),
                Err(SocksError::BufferTooSmall { need: 3 + need })
            );
        }
        assert_eq!(long.len() + 4, AddrRef::Domain(&long, 1).encoded_len());
        let longer = "n".repeat(256);
        assert_eq!(
            AddrRef::Domain(&longer, 1).encode(&mut [0u8; 300]),
            Err(SocksError::BadDomain)
        );
    }
}
