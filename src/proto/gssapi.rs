//! The GSS-API sub-negotiation of SOCKS5 method 0x01 (RFC 1961), sans-IO.
//!
//! Every message but the abort has a length-prefixed token:
//!
//! ```text
//! +-----+------+-----+-------+        +-----+------+
//! | VER | MTYP | LEN | TOKEN |        | VER | MTYP |
//! +-----+------+-----+-------+        +-----+------+
//! |  1  |  1   |  2  |  LEN  |        |  1  | 0xFF |   (abort: no LEN, no TOKEN)
//! +-----+------+-----+-------+        +-----+------+
//! ```
//!
//! VER = 0x01; LEN is big-endian. MTYP 0x01 carries context-establishment tokens (both
//! ways, RFC 1961 §3), MTYP 0x02 the protection-level message (§4): a token that
//! `gss_wrap` made of one byte, the level. MTYP 0xFF aborts: the sender closes after it.
//!
//! Before the client has authenticated, a token may be at most [`MAX_TOKEN`] bytes (the
//! default Windows MaxTokenSize: Kerberos tickets with large PACs fit); a longer LEN is
//! refused as soon as the four header bytes are in, before any of the token is read.

use super::error::SocksError;

/// VER of every message.
pub const VERSION: u8 = 0x01;

/// Largest token accepted (and sent).
pub const MAX_TOKEN: usize = 48_000;

/// The protection levels of RFC 1961 §4 (and the one sudp uses, [`level::NONE`]).
pub mod level {
    /// No per-message protection: TLS already protects the channel (sudp's only choice;
    /// RFC 1961 does not define the value, clients that understand it treat it as "none").
    pub const NONE: u8 = 0x00;
    /// Integrity protection required (RFC 1961).
    pub const INTEGRITY: u8 = 0x01;
    /// Confidentiality required (RFC 1961).
    pub const CONFIDENTIALITY: u8 = 0x02;
    /// Selective per-message protection (RFC 1961).
    pub const SELECTIVE: u8 = 0x03;
    /// sudp: no per-message protection, and a sudp hello without credentials follows
    /// (PROTOCOL.md §2.6): a secure UDP association for the GSS-API identity. The gateway
    /// echoes it to agree.
    pub const SUDP: u8 = 0x80;
}

/// MTYP values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// 0x01: a context-establishment token.
    Authentication,
    /// 0x02: the (wrapped) protection level.
    Protection,
    /// 0xFF: failure; the sender closes.
    Abort,
}

impl MessageType {
    /// The MTYP byte.
    pub fn byte(self) -> u8 {
        match self {
            MessageType::Authentication => 0x01,
            MessageType::Protection => 0x02,
            MessageType::Abort => 0xff,
        }
    }

    fn from_byte(b: u8) -> Option<MessageType> {
        match b {
            0x01 => Some(MessageType::Authentication),
            0x02 => Some(MessageType::Protection),
            0xff => Some(MessageType::Abort),
            _ => None,
        }
    }
}

/// One RFC 1961 message, borrowing its token from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GssMessage<'a> {
    /// What it carries.
    pub mtyp: MessageType,
    /// The token (empty for an abort).
    pub token: &'a [u8],
}

impl<'a> GssMessage<'a> {
    /// A context-establishment token.
    pub fn authentication(token: &'a [u8]) -> GssMessage<'a> {
        GssMessage {
            mtyp: MessageType::Authentication,
            token,
        }
    }

    /// A wrapped protection level.
    pub fn protection(token: &'a [u8]) -> GssMessage<'a> {
        GssMessage {
            mtyp: MessageType::Protection,
            token,
        }
    }

    /// The abort message.
    pub fn abort() -> GssMessage<'static> {
        GssMessage {
            mtyp: MessageType::Abort,
            token: &[],
        }
    }

    /// Parses one message from the start of `buf`; returns it and its length. Bytes after
    /// it are the caller's (the next message); `Incomplete { need }` says how many bytes in
    /// all to read before trying again.
    pub fn parse(buf: &'a [u8]) -> Result<(GssMessage<'a>, usize), SocksError> {
        let (&ver, rest) = buf.split_first().ok_or(SocksError::Incomplete { need: 2 })?;
        if ver != VERSION {
            return Err(SocksError::BadVersion(ver));
        }
        let &mtyp = rest.first().ok_or(SocksError::Incomplete { need: 2 })?;
        let mtyp = MessageType::from_byte(mtyp).ok_or(SocksError::BadField {
            field: "MTYP",
            value: u64::from(mtyp),
        })?;
        if mtyp == MessageType::Abort {
            return Ok((GssMessage::abort(), 2));
        }
        if buf.len() < 4 {
            return Err(SocksError::Incomplete { need: 4 });
        }
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if len > MAX_TOKEN {
            return Err(SocksError::BadField {
                field: "LEN",
                value: len as u64,
            });
        }
        if len == 0 {
            // Every token of an establishment or protection message has content.
            return Err(SocksError::BadField {
                field: "LEN",
                value: 0,
            });
        }
        let end = 4 + len;
        let token = buf.get(4..end).ok_or(SocksError::Incomplete { need: end })?;
        Ok((GssMessage { mtyp, token }, end))
    }

    /// Appends the encoding to `out`; a token longer than [`MAX_TOKEN`], or an empty one
    /// outside an abort, is refused.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), SocksError> {
        out.push(VERSION);
        out.push(self.mtyp.byte());
        if self.mtyp == MessageType::Abort {
            return Ok(());
        }
        if self.token.is_empty() || self.token.len() > MAX_TOKEN {
            out.truncate(out.len() - 2);
            return Err(SocksError::BadField {
                field: "LEN",
                value: self.token.len() as u64,
            });
        }
        // MAX_TOKEN < 65 536, checked just above.
        out.extend_from_slice(&(self.token.len() as u16).to_be_bytes());
        out.extend_from_slice(self.token);
        Ok(())
    }
}

/// The level inside an unwrapped protection-level token: exactly one byte.
pub fn parse_level(unwrapped: &[u8]) -> Result<u8, SocksError> {
    match unwrapped {
        [level] => Ok(*level),
        [] => Err(SocksError::Incomplete { need: 1 }),
        [_, rest @ ..] => Err(SocksError::TrailingData(rest.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::testing::{assert_reached, counted};
    use proptest::prelude::*;

    #[test]
    fn known_bytes() {
        let mut out = Vec::new();
        GssMessage::authentication(b"\x60\x01").encode(&mut out).unwrap();
        assert_eq!(out, [0x01, 0x01, 0x00, 0x02, 0x60, 0x01]);
        out.clear();
        GssMessage::abort().encode(&mut out).unwrap();
        assert_eq!(out, [0x01, 0xff]);
        assert_eq!(
            GssMessage::parse(&[0x01, 0xff, 0x99]).unwrap(),
            (GssMessage::abort(), 2)
        );
        let (m, n) = GssMessage::parse(&[0x01, 0x02, 0x00, 0x01, 0x07, 0xaa]).unwrap();
        assert_eq!((m, n), (GssMessage::protection(&[0x07]), 5));
    }

    #[test]
    fn refuses_oversized_tokens_before_reading_them() {
        let len = (MAX_TOKEN as u16 + 1).to_be_bytes();
        let err = GssMessage::parse(&[0x01, 0x01, len[0], len[1]]).unwrap_err();
        assert!(
            matches!(err, SocksError::BadField { field: "LEN", .. }),
            "{err:?}"
        );
        let exact = (MAX_TOKEN as u16).to_be_bytes();
        assert_eq!(
            GssMessage::parse(&[0x01, 0x01, exact[0], exact[1]]).unwrap_err(),
            SocksError::Incomplete { need: 4 + MAX_TOKEN }
        );
        let big = vec![0u8; MAX_TOKEN + 1];
        let mut out = vec![9];
        assert!(GssMessage::authentication(&big).encode(&mut out).is_err());
        assert!(GssMessage::authentication(&[]).encode(&mut out).is_err());
        assert_eq!(out, [9], "nothing left behind by a refused encode");
        // Exactly what was there before, whatever its length; and a token of exactly
        // MAX_TOKEN bytes is taken and reads back.
        let mut out = vec![7u8; 10];
        assert!(GssMessage::authentication(&big).encode(&mut out).is_err());
        assert_eq!(out, [7u8; 10]);
        let max = vec![5u8; MAX_TOKEN];
        let mut out = Vec::new();
        GssMessage::authentication(&max).encode(&mut out).unwrap();
        assert_eq!(out.len(), 4 + MAX_TOKEN);
        let (m, used) = GssMessage::parse(&out).unwrap();
        assert_eq!((m.token, used), (&max[..], 4 + MAX_TOKEN));
    }

    #[test]
    fn bad_headers() {
        assert_eq!(
            GssMessage::parse(&[]).unwrap_err(),
            SocksError::Incomplete { need: 2 }
        );
        assert_eq!(
            GssMessage::parse(&[0x05]).unwrap_err(),
            SocksError::BadVersion(0x05)
        );
        assert_eq!(
            GssMessage::parse(&[0x01]).unwrap_err(),
            SocksError::Incomplete { need: 2 }
        );
        assert!(matches!(
            GssMessage::parse(&[0x01, 0x03, 0, 1, 0]).unwrap_err(),
            SocksError::BadField {
                field: "MTYP",
                value: 3
            }
        ));
        assert!(GssMessage::parse(&[0x01, 0x01, 0, 0]).is_err(), "empty token");
        assert_eq!(parse_level(&[0]).unwrap(), level::NONE);
        assert!(parse_level(&[]).is_err() && parse_level(&[1, 2]).is_err());
    }

    /// Any input either parses to a message whose encoding is exactly the bytes consumed,
    /// or asks for more bytes than it has, or is refused; a complete message is never
    /// misread when more bytes follow it.
    #[test]
    fn parse_is_the_inverse_of_encode() {
        let message = (
            prop_oneof![Just(0x01u8), Just(0x02), Just(0xff)],
            proptest::collection::vec(any::<u8>(), 1..300),
        );
        let strategy = prop_oneof![
            message.prop_map(|(mtyp, token)| {
                let m = GssMessage {
                    mtyp: MessageType::from_byte(mtyp).unwrap(),
                    token: &token,
                };
                let mut out = Vec::new();
                m.encode(&mut out).unwrap();
                (out, true)
            }),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|v| (v, false)),
            // A random start of a header: VER right, the rest arbitrary.
            (
                prop_oneof![Just(0x01u8), Just(0x02)],
                proptest::collection::vec(any::<u8>(), 0..6)
            )
                .prop_map(|(mtyp, rest)| ([&[VERSION, mtyp][..], &rest].concat(), false)),
        ];
        let counts = counted(
            2000,
            (
                strategy,
                proptest::collection::vec(any::<u8>(), 0..8),
                any::<usize>(),
            ),
            |((bytes, encoded), tail, cut)| {
                let mut input = bytes.clone();
                input.extend_from_slice(&tail);
                match GssMessage::parse(&input) {
                    Ok((m, n)) => {
                        let mut again = Vec::new();
                        m.encode(&mut again).unwrap();
                        prop_assert_eq!(&again[..], &input[..n]);
                        if encoded {
                            prop_assert_eq!(n, bytes.len());
                        }
                        // Every strict prefix is incomplete, never a different message.
                        let cut = cut % n;
                        match GssMessage::parse(&input[..cut]) {
                            Err(SocksError::Incomplete { need }) => prop_assert!(need > cut),
                            other => prop_assert!(false, "prefix {cut} of {n}: {other:?}"),
                        }
                        Ok(if encoded { "roundtrip" } else { "random_parsed" })
                    }
                    Err(SocksError::Incomplete { need }) => {
                        prop_assert!(!encoded);
                        prop_assert!(need > input.len());
                        Ok("incomplete")
                    }
                    Err(_) => {
                        prop_assert!(!encoded);
                        Ok("refused")
                    }
                }
            },
        );
        assert_reached(&counts, &["roundtrip", "incomplete", "refused"], 50);
    }
}
