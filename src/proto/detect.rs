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

    /// Any datagram gets the kind the table in the module documentation gives; whatever
    /// the SOCKS UDP parser accepts is naked and whatever the record header parser accepts
    /// is secure, so the detector never routes a valid datagram to the wrong parser. Inputs
    /// start with a naked, a secure or a random prefix so that all three kinds (and the
    /// one-byte and empty edge cases) are counted.
    #[test]
    fn classification_matches_the_table_and_the_parsers() {
        use crate::proto::record::parse_header;
        use crate::proto::socks::parse_udp_header;
        use crate::proto::testing::{assert_reached, counted};
        use proptest::prelude::*;

        let prefix = prop::sample::select(vec![vec![], vec![0, 0], vec![0x97, 3, 3], vec![0], vec![0x80]]);
        let strategy = (prefix, prop::collection::vec(any::<u8>(), 0..64));
        let counts = counted(3000, strategy, |(prefix, rest)| {
            let mut d = prefix;
            d.extend_from_slice(&rest);
            let model = match d.as_slice() {
                [] => DatagramKind::Unknown,
                [b, ..] if *b >= 0x80 => DatagramKind::Secure,
                [0, 0, ..] => DatagramKind::Naked,
                _ => DatagramKind::Unknown,
            };
            let kind = classify(&d);
            prop_assert_eq!(kind, model);
            if parse_udp_header(&d).is_ok() {
                prop_assert_eq!(kind, DatagramKind::Naked);
            }
            if parse_header(&d).is_ok() {
                prop_assert_eq!(kind, DatagramKind::Secure);
            }
            Ok(match (kind, d.len()) {
                (DatagramKind::Naked, _) => "naked",
                (DatagramKind::Secure, _) => "secure",
                (DatagramKind::Unknown, 0) => "unknown, empty",
                (DatagramKind::Unknown, 1) => "unknown, one byte",
                (DatagramKind::Unknown, _) => "unknown",
            })
        });
        assert_reached(
            &counts,
            &[
                "naked",
                "secure",
                "unknown",
                "unknown, empty",
                "unknown, one byte",
            ],
            10,
        );
    }
}
