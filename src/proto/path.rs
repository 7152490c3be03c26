//! sudp control messages inside secure records, and the gateway's reply-path validation.
//!
//! A record plaintext whose first byte (where a data record has its ATYP) is `0x00` is a
//! **control plaintext**, never delivered to an application (docs/PROTOCOL.md §4.1):
//!
//! ```text
//! +------+------+---------------------+
//! | 0x00 | KIND | body                |
//! +------+------+---------------------+
//! |  1   |  1   | per KIND            |
//! +------+------+---------------------+
//! KIND 0x01 PATH_CHALLENGE  g2c  body = 8-byte token
//! KIND 0x02 PATH_RESPONSE   c2g  body = the 8-byte token of the challenge it answers
//! KIND 0x03 PROBE           c2g  body = 8-byte token ("does UDP reach you?")
//! KIND 0x04 PROBE_ACK       g2c  body = the 8-byte token of the probe it answers
//! ```
//!
//! [`PathValidator`] is the gateway's rule for where a secure association's replies go
//! (PROTOCOL.md §6.3): the path starts at the address the client announced (or the source
//! of the first authenticated record), and moves to a new source only when a record with a
//! strictly newer nonce arrives from it *and* that source then answers a PATH_CHALLENGE
//! (as QUIC validates paths, RFC 9000 §8.2). Sans-IO: the caller passes time and fresh
//! randomness in and sends the challenges the validator asks for.

use std::net::SocketAddr;

use crate::proto::error::OpenError;

/// The ATYP value that marks a control plaintext.
pub const CONTROL_ATYP: u8 = 0x00;
/// KIND of a PATH_CHALLENGE (gateway to client).
pub const PATH_CHALLENGE: u8 = 0x01;
/// KIND of a PATH_RESPONSE (client to gateway).
pub const PATH_RESPONSE: u8 = 0x02;
/// KIND of a PROBE (client to gateway, over UDP): is UDP open both ways?
pub const PROBE: u8 = 0x03;
/// KIND of a PROBE_ACK (gateway to client, over UDP, to the probe's source).
pub const PROBE_ACK: u8 = 0x04;
/// Length of a path token.
pub const TOKEN_LEN: usize = 8;
/// Encoded length of a PATH_CHALLENGE or PATH_RESPONSE plaintext.
pub const PATH_MESSAGE_LEN: usize = 2 + TOKEN_LEN;

/// Least time between two challenges of one association.
pub const CHALLENGE_INTERVAL_MS: u64 = 200;
/// Challenges sent for one probe before it is abandoned.
pub const MAX_CHALLENGES: u32 = 5;

/// A control message carried in a secure record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlMessage {
    /// "Answer me from where you are": sent by the gateway to a new source.
    PathChallenge([u8; TOKEN_LEN]),
    /// The answer, with the challenge's token.
    PathResponse([u8; TOKEN_LEN]),
    /// "Does UDP reach you, and me?": sent by a client over UDP (PROTOCOL.md §2.4).
    Probe([u8; TOKEN_LEN]),
    /// The gateway's answer to a PROBE, over UDP to the probe's source.
    ProbeAck([u8; TOKEN_LEN]),
}

impl ControlMessage {
    /// Parses a control plaintext (its first byte is [`CONTROL_ATYP`]). An unknown KIND, or
    /// a body of the wrong length (trailing bytes included), is [`OpenError::BadControl`].
    pub fn parse(plaintext: &[u8]) -> Result<ControlMessage, OpenError> {
        match plaintext {
            [CONTROL_ATYP, kind @ (PATH_CHALLENGE | PATH_RESPONSE | PROBE | PROBE_ACK), body @ ..] => {
                let token: [u8; TOKEN_LEN] = body
                    .try_into()
                    .map_err(|_| OpenError::BadControl { kind: *kind })?;
                Ok(match *kind {
                    PATH_CHALLENGE => ControlMessage::PathChallenge(token),
                    PATH_RESPONSE => ControlMessage::PathResponse(token),
                    PROBE => ControlMessage::Probe(token),
                    _ => ControlMessage::ProbeAck(token),
                })
            }
            [CONTROL_ATYP, kind, ..] => Err(OpenError::BadControl { kind: *kind }),
            // No KIND byte at all.
            _ => Err(OpenError::BadControl { kind: 0 }),
        }
    }

    /// Writes the control plaintext into `out` (at least [`PATH_MESSAGE_LEN`] bytes);
    /// returns its length.
    pub fn encode(&self, out: &mut [u8]) -> usize {
        let (kind, token) = match self {
            ControlMessage::PathChallenge(t) => (PATH_CHALLENGE, t),
            ControlMessage::PathResponse(t) => (PATH_RESPONSE, t),
            ControlMessage::Probe(t) => (PROBE, t),
            ControlMessage::ProbeAck(t) => (PROBE_ACK, t),
        };
        out[0] = CONTROL_ATYP;
        out[1] = kind;
        out[2..PATH_MESSAGE_LEN].copy_from_slice(token);
        PATH_MESSAGE_LEN
    }
}

/// What the caller of [`PathValidator::on_record`] must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum PathAction {
    /// Nothing.
    None,
    /// Send a PATH_CHALLENGE with `token` to `to` (sealed like any g2c record).
    Challenge {
        /// The source being validated.
        to: SocketAddr,
        /// The challenge's token.
        token: [u8; TOKEN_LEN],
    },
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    to: SocketAddr,
    token: [u8; TOKEN_LEN],
    last_sent_ms: u64,
    sent: u32,
}

/// Where one secure association's replies go, and the validation of a new path.
#[derive(Debug, Clone)]
pub struct PathValidator {
    current: Option<SocketAddr>,
    probe: Option<Probe>,
}

impl PathValidator {
    /// A validator whose path starts at `announced` (the client's IP with the DST.PORT of
    /// its UDP ASSOCIATE), or at the first authenticated record's source when `None`.
    pub fn new(announced: Option<SocketAddr>) -> PathValidator {
        PathValidator {
            current: announced,
            probe: None,
        }
    }

    /// Where replies go now (`None` until the first authenticated record when nothing
    /// was announced).
    pub fn current(&self) -> Option<SocketAddr> {
        self.current
    }

    /// The source being validated, if a challenge is outstanding.
    pub fn probing(&self) -> Option<SocketAddr> {
        self.probe.map(|p| p.to)
    }

    /// A data record authenticated from `src`; `newer` says its nonce is above every nonce
    /// accepted before on the association (the replay window's "ahead"). `token` draws a
    /// fresh random token, called only when a new challenge starts. `now_ms`: any
    /// monotonic clock in milliseconds.
    pub fn on_record(
        &mut self,
        src: SocketAddr,
        newer: bool,
        now_ms: u64,
        token: impl FnOnce() -> [u8; TOKEN_LEN],
    ) -> PathAction {
        let Some(current) = self.current else {
            self.current = Some(src);
            return PathAction::None;
        };
        if src == current || !newer {
            // An old or reordered record (or a copy of one) from elsewhere never moves
            // anything: only the sender's newest records speak for where it is.
            return PathAction::None;
        }
        if let Some(p) = &mut self.probe {
            if now_ms.saturating_sub(p.last_sent_ms) < CHALLENGE_INTERVAL_MS {
                return PathAction::None;
            }
            if p.to == src && p.sent < MAX_CHALLENGES {
                p.sent += 1;
                p.last_sent_ms = now_ms;
                return PathAction::Challenge {
                    to: src,
                    token: p.token,
                };
            }
            // Another source (the one outstanding challenge moves to the newest
            // candidate), or this probe used up its challenges: start afresh.
        }
        let token = token();
        self.probe = Some(Probe {
            to: src,
            token,
            last_sent_ms: now_ms,
            sent: 1,
        });
        PathAction::Challenge { to: src, token }
    }

    /// A PATH_RESPONSE authenticated from `src` with `token`: moves the path to `src` if it
    /// answers the outstanding challenge from the address challenged; returns whether the
    /// path moved. Any other response is ignored.
    pub fn on_response(&mut self, src: SocketAddr, token: [u8; TOKEN_LEN]) -> bool {
        match self.probe {
            Some(p) if p.to == src && p.token == token => {
                self.current = Some(src);
                self.probe = None;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Parse accepts exactly the encodings of the two messages and never panics.
        #[test]
        fn parse_accepts_exactly_what_encode_makes(body in proptest::collection::vec(any::<u8>(), 0..20)) {
            let mut pt = vec![CONTROL_ATYP];
            pt.extend_from_slice(&body);
            match ControlMessage::parse(&pt) {
                Ok(m) => {
                    let mut out = [0u8; PATH_MESSAGE_LEN];
                    let n = m.encode(&mut out);
                    prop_assert_eq!(&out[..n], &pt[..]);
                }
                Err(e) => {
                    let bad_control = matches!(e, OpenError::BadControl { .. });
                    prop_assert!(bad_control);
                }
            }
        }

        /// Whatever arrives, in whatever order, the path only ever becomes the announced
        /// address or an address that answered, from itself, the token the validator chose
        /// for it; and only newer records from a new address make challenges.
        #[test]
        fn the_path_moves_only_to_an_address_that_answered_its_token(
            events in proptest::collection::vec((0u8..3, 0u16..4, any::<bool>(), 0u64..500, any::<u8>()), 1..60)
        ) {
            let addr = |p: u16| SocketAddr::from(([192, 0, 2, 1], 5000 + p));
            let mut v = PathValidator::new(Some(addr(0)));
            let mut now = 0;
            let mut issued: Vec<(SocketAddr, [u8; 8])> = Vec::new();
            let mut draws = 0u8;
            for (kind, port, newer, dt, guess) in events {
                now += dt;
                let src = addr(port);
                let before = v.current();
                match kind {
                    0 | 1 => {
                        let act = v.on_record(src, newer, now, || { draws = draws.wrapping_add(1); [draws; 8] });
                        if let PathAction::Challenge { to, token } = act {
                            prop_assert!(newer && Some(to) != before && to == src);
                            issued.push((to, token));
                        }
                        prop_assert_eq!(v.current(), before.or(Some(src)));
                    }
                    _ => {
                        // An answer: sometimes a guess, sometimes a real token (from any address).
                        let token = match issued.get(guess as usize % (issued.len() + 1)) {
                            Some((_, t)) => *t,
                            None => [guess; 8],
                        };
                        let moved = v.on_response(src, token);
                        if moved {
                            prop_assert!(issued.contains(&(src, token)));
                            prop_assert_eq!(v.current(), Some(src));
                        } else {
                            prop_assert_eq!(v.current(), before);
                        }
                    }
                }
            }
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn control_messages_round_trip_and_reject_the_malformed() {
        for m in [
            ControlMessage::PathChallenge([1, 2, 3, 4, 5, 6, 7, 8]),
            ControlMessage::PathResponse([9; 8]),
        ] {
            let mut b = [0u8; PATH_MESSAGE_LEN];
            assert_eq!(m.encode(&mut b), PATH_MESSAGE_LEN);
            assert_eq!(b[0], CONTROL_ATYP);
            assert_eq!(ControlMessage::parse(&b), Ok(m));
            // Cut short and trailing bytes are refused.
            assert!(ControlMessage::parse(&b[..9]).is_err());
            let mut long = b.to_vec();
            long.push(0);
            assert!(ControlMessage::parse(&long).is_err());
        }
        assert_eq!(
            ControlMessage::parse(&[0, 0x7f, 1, 2]),
            Err(OpenError::BadControl { kind: 0x7f })
        );
        assert_eq!(
            ControlMessage::parse(&[0]),
            Err(OpenError::BadControl { kind: 0 })
        );
        assert_eq!(
            ControlMessage::parse(&[0, 5, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(OpenError::BadControl { kind: 5 })
        );
    }

    #[test]
    fn first_record_sets_the_path_when_nothing_was_announced() {
        let mut v = PathValidator::new(None);
        assert_eq!(
            v.on_record(sa("192.0.2.1:5000"), true, 0, || unreachable!()),
            PathAction::None
        );
        assert_eq!(v.current(), Some(sa("192.0.2.1:5000")));
    }

    #[test]
    fn an_old_record_from_a_new_source_moves_nothing() {
        let a = sa("192.0.2.1:5000");
        let mut v = PathValidator::new(Some(a));
        assert_eq!(
            v.on_record(sa("192.0.2.1:6666"), false, 0, || unreachable!()),
            PathAction::None
        );
        assert_eq!(v.current(), Some(a));
        assert_eq!(v.probing(), None);
    }

    #[test]
    fn a_newer_record_from_a_new_source_is_challenged_and_moves_only_on_the_answer() {
        let (a, b) = (sa("192.0.2.1:5000"), sa("192.0.2.1:6000"));
        let mut v = PathValidator::new(Some(a));
        let act = v.on_record(b, true, 1000, || [7; 8]);
        assert_eq!(act, PathAction::Challenge { to: b, token: [7; 8] });
        assert_eq!(
            v.current(),
            Some(a),
            "replies stay on the old path until validated"
        );
        // A wrong token, or the right one from another source, does not move it.
        assert!(!v.on_response(b, [8; 8]));
        assert!(!v.on_response(sa("192.0.2.1:7000"), [7; 8]));
        assert!(!v.on_response(a, [7; 8]));
        assert_eq!(v.current(), Some(a));
        assert!(v.on_response(b, [7; 8]));
        assert_eq!(v.current(), Some(b));
        assert_eq!(v.probing(), None);
        // The same answer again is stale.
        assert!(!v.on_response(b, [7; 8]));
    }

    #[test]
    fn challenges_are_resent_at_most_every_interval_and_at_most_max_times() {
        let (a, b) = (sa("192.0.2.1:5000"), sa("192.0.2.1:6000"));
        let mut v = PathValidator::new(Some(a));
        let mut draws = 0;
        let mut t = 0;
        let mut sent = 0;
        for _ in 0..100 {
            if let PathAction::Challenge { to, token } = v.on_record(b, true, t, || {
                draws += 1;
                [draws; 8]
            }) {
                assert_eq!(to, b);
                assert_eq!(token, [1; 8], "one probe, one token");
                sent += 1;
            }
            t += 50;
            if sent == MAX_CHALLENGES as usize {
                break;
            }
        }
        assert_eq!(sent, MAX_CHALLENGES as usize);
        // 5 challenges need 4 intervals of 200 ms: at 50 ms per record, 16 records later.
        assert_eq!(t, 50 * (1 + 4 * 4));
        // Used up: the next one, an interval later, starts a new probe with a new token.
        assert_eq!(
            v.on_record(b, true, t + CHALLENGE_INTERVAL_MS, || [42; 8]),
            PathAction::Challenge {
                to: b,
                token: [42; 8]
            }
        );
    }

    #[test]
    fn one_challenge_outstanding_moves_to_the_newest_candidate_after_an_interval() {
        let (a, b, c) = (sa("192.0.2.1:5000"), sa("192.0.2.1:6000"), sa("192.0.2.1:7000"));
        let mut v = PathValidator::new(Some(a));
        assert!(matches!(
            v.on_record(b, true, 0, || [1; 8]),
            PathAction::Challenge { .. }
        ));
        assert_eq!(v.on_record(c, true, 10, || [2; 8]), PathAction::None);
        assert_eq!(v.probing(), Some(b));
        assert_eq!(
            v.on_record(c, true, CHALLENGE_INTERVAL_MS, || [2; 8]),
            PathAction::Challenge { to: c, token: [2; 8] }
        );
        assert!(!v.on_response(b, [1; 8]), "the abandoned probe's answer is stale");
        assert!(v.on_response(c, [2; 8]));
        assert_eq!(v.current(), Some(c));
    }

    #[test]
    fn every_kind_round_trips_to_itself() {
        // Deleting one arm of `parse` would turn that kind into another (PROBE into
        // PROBE_ACK): each kind must come back as itself.
        let t = [7u8; TOKEN_LEN];
        for m in [
            ControlMessage::PathChallenge(t),
            ControlMessage::PathResponse(t),
            ControlMessage::Probe(t),
            ControlMessage::ProbeAck(t),
        ] {
            let mut b = [0u8; PATH_MESSAGE_LEN];
            let n = m.encode(&mut b);
            assert_eq!(ControlMessage::parse(&b[..n]), Ok(m), "{m:?}");
        }
    }
}
