//! The record detector: decides from the first bytes of a datagram whether it is a naked
//! SOCKS5 UDP datagram or a secure-UDP record (seed 004, FIG. 3A/3B: "both types of clients
//! can be simultaneously accommodated").
//!
//! ```text
//! first byte  second byte   kind
//! 0x00        0x00          naked  (RFC 1928 UDP request header, RSV = 0x0000)
//! 0x80-0xFF   any           secure (content type with the secure-UDP flag bit set)
//! anything else             unknown: dropped and counted
//! ```

use crate::proto::record::SECURE_FLAG;

/// What a datagram looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    /// Conventional SOCKS5 UDP (RSV = 0).
    Naked,
    /// A secure-UDP record (flag bit set); still to be validated by the record layer.
    Secure,
    /// Neither.
    Unknown,
}

/// Classifies a datagram by its first bytes. Total: any input gets an answer.
pub fn classify(datagram: &[u8]) -> DatagramKind {
    match datagram {
        [b, ..] if b & SECURE_FLAG != 0 => DatagramKind::Secure,
        [0, 0, ..] => DatagramKind::Naked,
        _ => DatagramKind::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_first_bytes() {
        assert_eq!(classify(&[0, 0, 0, 1, 127, 0, 0, 1, 0, 80]), DatagramKind::Naked);
        assert_eq!(classify(&[0x97, 3, 3, 0, 0]), DatagramKind::Secure);
        assert_eq!(classify(&[0x17, 3, 3]), DatagramKind::Unknown);
        assert_eq!(classify(&[0, 1]), DatagramKind::Unknown);
        assert_eq!(classify(&[0]), DatagramKind::Unknown);
        assert_eq!(classify(&[]), DatagramKind::Unknown);
    }
}
