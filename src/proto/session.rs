//! One association's two halves: a [`SendSession`] (sealer + nonce counter) and a
//! [`RecvSession`] (opener + replay window).
//!
//! The receive path follows one order and never another:
//!
//! 1. parse the cleartext header (type, version, length, association id, nonce limit);
//! 2. ask the replay window whether the nonce is acceptable (no state change);
//! 3. verify the tag in constant time;
//! 4. commit the nonce to the window (only now: a forged record cannot move it);
//! 5. decrypt, strip the padding, parse the address header, or, for a control plaintext
//!    (ATYP 0x00, [`crate::proto::path`]), the control message.
//!
//! An AEAD suite verifies and decrypts in one pass: steps 3 and 5's decryption are the
//! AEAD's open, done before step 4, and nothing of the plaintext is looked at unless it
//! succeeded; the window is still checked before and committed only after the tag verifies.

use crate::proto::error::{OpenError, SealError};
use crate::proto::keys::{AssociationId, CipherSuite, KeySchedule, Role};
use crate::proto::path::{ControlMessage, CONTROL_ATYP, PATH_MESSAGE_LEN};
use crate::proto::record::{Opener, Sealer, INTERLEAVE, MAX_RECORDS_PER_KEY, PREFIX_LEN};
use crate::proto::replay::{ReplayWindow, Verdict};
use crate::proto::socks::AddrRef;

/// The sending half: seals with a fresh nonce each time.
///
/// Deliberately not `Clone`, and made only from a [`KeySchedule`] taken by value
/// ([`KeySchedule::into_sessions`]): two senders with one key would reuse nonces, hence
/// IVs and (for equal plaintexts) whole records. Inside the crate, the gateway and the
/// client build exactly one per association.
pub struct SendSession {
    sealer: Sealer,
    next_nonce: u64,
    /// Cipher blocks sealed under this key, for a suite with a data limit (AES-128-GCM,
    /// PROTOCOL.md §8); the sealer cannot count them, it takes the nonce as an argument.
    blocks: u64,
}

impl SendSession {
    /// Sending half for `role`, starting at nonce 0. Crate-private: the caller promises to
    /// build one per key (library users go through [`KeySchedule::into_sessions`]).
    pub(crate) fn new(assoc: AssociationId, keys: &KeySchedule, role: Role) -> Self {
        SendSession {
            sealer: Sealer::new(assoc, keys.for_role(role).0),
            next_nonce: 0,
            blocks: 0,
        }
    }

    /// The suite this session seals with.
    pub fn suite(&self) -> CipherSuite {
        self.sealer.suite()
    }

    /// Length of the record this session makes of a `plaintext_len`-byte plaintext
    /// ([`CipherSuite::record_len`]): what a train of equal records is cut by.
    pub fn record_len(&self, plaintext_len: usize) -> usize {
        self.sealer.suite().record_len(plaintext_len)
    }

    /// Counts the cipher blocks of records with these plaintext lengths against the
    /// suite's data limit, if it has one; refuses (nothing counted) past it.
    fn take_blocks(&mut self, plaintext_lens: impl Iterator<Item = usize>) -> Result<(), SealError> {
        let Some(limit) = self.sealer.suite().max_blocks_per_key() else {
            return Ok(());
        };
        // The counter blocks of the plaintext, plus the one that masks the tag.
        let blocks: u64 = plaintext_lens.map(|n| n.div_ceil(16) as u64 + 1).sum();
        if self.blocks.saturating_add(blocks) > limit {
            return Err(SealError::KeyExhausted {
                limit: self.next_nonce,
            });
        }
        self.blocks += blocks;
        Ok(())
    }

    /// Starts the data-limit count at `blocks` (a test door, as [`SendSession::resume`]).
    #[cfg(any(test, feature = "test-doors"))]
    pub fn resume_blocks(&mut self, blocks: u64) {
        self.blocks = blocks;
    }

    /// Sending half that continues from `next_nonce`. A door for tests (the known-answer
    /// vectors seal at chosen nonces): compiled only for the crate's own tests, since a
    /// chosen nonce is a reused nonce in any other hands.
    #[cfg(any(test, feature = "test-doors"))]
    pub fn resume(assoc: AssociationId, keys: &KeySchedule, role: Role, next_nonce: u64) -> Self {
        SendSession {
            next_nonce,
            ..SendSession::new(assoc, keys, role)
        }
    }

    /// The nonce the next record will carry.
    pub fn next_nonce(&self) -> u64 {
        self.next_nonce
    }

    /// Records left before the key is exhausted.
    pub fn remaining(&self) -> u64 {
        MAX_RECORDS_PER_KEY - self.next_nonce
    }

    /// Seals `addr` + `payload` into `out`; returns the record length.
    ///
    /// The address header is written straight into `out` and the payload copied once after
    /// it, then sealed in place: one copy, no allocation.
    pub fn seal(&mut self, addr: &AddrRef<'_>, payload: &[u8], out: &mut [u8]) -> Result<usize, SealError> {
        let alen = addr.encoded_len();
        let pt_len = alen + payload.len();
        let need = self.record_len(pt_len);
        if pt_len > crate::proto::record::MAX_PLAINTEXT {
            return Err(SealError::TooLarge {
                len: pt_len,
                max: crate::proto::record::MAX_PLAINTEXT,
            });
        }
        if out.len() < need {
            return Err(SealError::BufferTooSmall {
                have: out.len(),
                need,
            });
        }
        addr.encode(&mut out[PREFIX_LEN..])
            .map_err(SealError::BadAddress)?;
        out[PREFIX_LEN + alen..PREFIX_LEN + pt_len].copy_from_slice(payload);
        self.seal_in_place(out, pt_len)
    }

    /// Seals a control message (PROTOCOL.md §4.1) into `out`; returns the record length.
    /// It takes the next nonce like any record.
    pub fn seal_control(&mut self, msg: &ControlMessage, out: &mut [u8]) -> Result<usize, SealError> {
        let need = self.record_len(PATH_MESSAGE_LEN);
        if out.len() < need {
            return Err(SealError::BufferTooSmall {
                have: out.len(),
                need,
            });
        }
        let n = msg.encode(&mut out[PREFIX_LEN..]);
        self.seal_in_place(out, n)
    }

    /// Seals several records at once with consecutive nonces (see
    /// [`Sealer::seal_many_in_place`] for the layout); faster than one at a time.
    pub fn seal_many_in_place(
        &mut self,
        buf: &mut [u8],
        offsets: &[usize],
        plaintext_lens: &[usize],
        lens: &mut [usize],
    ) -> Result<(), SealError> {
        let before = self.blocks;
        self.take_blocks(plaintext_lens.iter().copied())?;
        if let Err(e) = self
            .sealer
            .seal_many_in_place(self.next_nonce, buf, offsets, plaintext_lens, lens)
        {
            self.blocks = before;
            return Err(e);
        }
        self.next_nonce += offsets.len() as u64;
        Ok(())
    }

    /// Seals a plaintext (address header + payload) already placed at
    /// `buf[PREFIX_LEN..PREFIX_LEN + plaintext_len]`.
    pub fn seal_in_place(&mut self, buf: &mut [u8], plaintext_len: usize) -> Result<usize, SealError> {
        let before = self.blocks;
        self.take_blocks(std::iter::once(plaintext_len))?;
        let n = self
            .sealer
            .seal_in_place(self.next_nonce, buf, plaintext_len)
            .inspect_err(|_| self.blocks = before)?;
        self.next_nonce += 1;
        Ok(n)
    }
}

/// A record opened by a [`RecvSession`].
#[derive(Debug)]
pub struct Opened<'a> {
    /// The record's nonce.
    pub nonce: u64,
    /// How the replay window took the nonce.
    pub verdict: Verdict,
    /// What the record carries.
    pub content: Content<'a>,
}

/// What an opened record carries: application data, or a control message that is never
/// delivered to an application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content<'a> {
    /// A datagram.
    Data {
        /// The address in the plaintext (destination from a client, source from a gateway).
        addr: AddrRef<'a>,
        /// The payload.
        payload: &'a [u8],
    },
    /// A control message (ATYP 0x00).
    Control(ControlMessage),
}

impl<'a> Opened<'a> {
    /// The address and payload of a data record; `None` for a control message.
    pub fn data(&self) -> Option<(AddrRef<'a>, &'a [u8])> {
        match self.content {
            Content::Data { addr, payload } => Some((addr, payload)),
            Content::Control(_) => None,
        }
    }

    /// Whether the nonce is above every nonce the window accepted before (the record is
    /// the sender's newest so far).
    pub fn is_newest(&self) -> bool {
        matches!(self.verdict, Verdict::Ahead { .. })
    }
}

/// The receiving half: replay window around an opener.
#[derive(Clone)]
pub struct RecvSession {
    opener: Opener,
    window: ReplayWindow,
}

impl RecvSession {
    /// Receiving half for `role` with a window of `window` nonces.
    pub fn new(assoc: AssociationId, keys: &KeySchedule, role: Role, window: usize) -> Self {
        RecvSession {
            opener: Opener::new(assoc, keys.for_role(role).1),
            window: ReplayWindow::new(window),
        }
    }

    /// The association id.
    pub fn assoc(&self) -> AssociationId {
        self.opener.assoc()
    }

    /// The suite of the records this session opens.
    pub fn suite(&self) -> CipherSuite {
        self.opener.suite()
    }

    /// The replay window (read-only, for state export and tests).
    pub fn window(&self) -> &ReplayWindow {
        &self.window
    }

    /// Opens one datagram in place, in the order given in the module documentation.
    pub fn open<'a>(&mut self, datagram: &'a mut [u8]) -> Result<Opened<'a>, OpenError> {
        self.open_with(datagram, None)
    }

    /// Checks the tags of several records at once (see
    /// [`Opener::verify_many`]); `ok[i]` is then handed to [`open_verified`](Self::open_verified)
    /// with record `i`. Records whose header does not parse or names another association get
    /// `false` (their [`open_verified`](Self::open_verified) reports the header error first).
    pub fn verify_many(&self, datagrams: &[&[u8]], ok: &mut [bool]) {
        self.opener.verify_many(datagrams, ok);
        for (d, ok) in datagrams.iter().zip(ok.iter_mut()) {
            *ok &= self.opener.check_header(d).is_ok();
        }
    }

    /// [`verify_many`](Self::verify_many) for records held as mutable slices (a run of a
    /// receive batch): `tags[i]` becomes `Some(verdict)` for record `i`.
    ///
    /// For an AEAD suite this leaves every `tags[i]` at `None`: its tag is checked in the
    /// one pass that decrypts ([`open`](Self::open)), so checking it first would decrypt twice.
    pub fn verify_run(&self, records: &[&mut [u8]], tags: &mut [Option<bool>]) {
        assert_eq!(records.len(), tags.len(), "one verdict per record");
        if self.opener.suite().is_aead() {
            tags.fill(None);
            return;
        }
        for (records, tags) in records.chunks(INTERLEAVE).zip(tags.chunks_mut(INTERLEAVE)) {
            let mut msgs: [&[u8]; INTERLEAVE] = [&[]; INTERLEAVE];
            for (m, r) in msgs.iter_mut().zip(records) {
                *m = r;
            }
            let mut ok = [false; INTERLEAVE];
            self.verify_many(&msgs[..records.len()], &mut ok);
            for (t, ok) in tags.iter_mut().zip(ok) {
                *t = Some(ok);
            }
        }
    }

    /// Opens one datagram like [`open`](Self::open), with its tag already checked by
    /// [`verify_many`](Self::verify_many) (`tag_ok`) on these very bytes. The checks keep
    /// their order and their drop reasons: header, then replay window, then the tag.
    pub fn open_verified<'a>(
        &mut self,
        datagram: &'a mut [u8],
        tag_ok: bool,
    ) -> Result<Opened<'a>, OpenError> {
        self.open_with(datagram, Some(tag_ok))
    }

    fn open_with<'a>(
        &mut self,
        datagram: &'a mut [u8],
        tag_ok: Option<bool>,
    ) -> Result<Opened<'a>, OpenError> {
        let h = self.opener.check_header(datagram)?;
        let verdict = self.window.check(h.nonce)?;
        let pt: &'a [u8] = if self.opener.suite().is_aead() {
            if tag_ok == Some(false) {
                return Err(OpenError::BadMac);
            }
            // Verify-and-decrypt in one pass; nothing is released on a bad tag.
            let pt = self.opener.decrypt_in_place(&h, datagram)?;
            self.window.commit(h.nonce);
            pt
        } else {
            match tag_ok {
                None => self.opener.verify(datagram)?,
                Some(true) => {}
                Some(false) => return Err(OpenError::BadMac),
            }
            self.window.commit(h.nonce);
            self.opener.decrypt_in_place(&h, datagram)?
        };
        let content = if pt.first() == Some(&CONTROL_ATYP) {
            Content::Control(ControlMessage::parse(pt)?)
        } else {
            let (addr, used) = AddrRef::parse(pt).map_err(OpenError::BadAddress)?;
            Content::Data {
                addr,
                payload: &pt[used..],
            }
        };
        Ok(Opened {
            nonce: h.nonce,
            verdict,
            content,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::keys::CipherSuite;
    use crate::proto::record::record_len;
    use crate::proto::DropReason;
    use proptest::prelude::*;
    use std::net::SocketAddr;

    fn schedule() -> KeySchedule {
        let suite = CipherSuite::Aes128CbcHmacSha256;
        let m: Vec<u8> = (0..suite.exporter_len()).map(|i| (i * 3) as u8).collect();
        KeySchedule::from_exporter(suite, &m).unwrap()
    }

    fn ends() -> (SendSession, RecvSession, SendSession, RecvSession) {
        let ks = schedule();
        let a = AssociationId(42);
        (
            SendSession::new(a, &ks, Role::Client),
            RecvSession::new(a, &ks, Role::Gateway, 64),
            SendSession::new(a, &ks, Role::Gateway),
            RecvSession::new(a, &ks, Role::Client, 64),
        )
    }

    #[test]
    fn both_directions_with_reorder_and_replay() {
        let (mut cs, mut gr, mut gs, mut cr) = ends();
        let dst: SocketAddr = "198.51.100.7:5004".parse().unwrap();
        let mut recs = Vec::new();
        for i in 0..5u8 {
            let mut b = vec![0u8; 256];
            let n = cs.seal(&AddrRef::Ip(dst), &[i; 20], &mut b).unwrap();
            b.truncate(n);
            recs.push(b);
        }
        // Deliver out of order; every record opens once, replays are refused.
        for &i in &[3usize, 0, 4, 1, 2] {
            let mut b = recs[i].clone();
            let o = gr.open(&mut b).unwrap();
            assert_eq!(o.nonce, i as u64);
            let (addr, payload) = o.data().unwrap();
            assert_eq!(addr, AddrRef::Ip(dst));
            assert_eq!(payload, &[i as u8; 20]);
            let mut again = recs[i].clone();
            assert_eq!(
                gr.open(&mut again).unwrap_err(),
                OpenError::Duplicate { nonce: i as u64 }
            );
        }
        // The reverse direction uses the other keys: a client record does not open at the client.
        let mut b = recs[0].clone();
        assert_eq!(cr.open(&mut b).unwrap_err(), OpenError::BadMac);
        let mut b = vec![0u8; 128];
        let n = gs.seal(&AddrRef::Ip(dst), b"pong", &mut b).unwrap();
        assert_eq!(cr.open(&mut b[..n]).unwrap().data().unwrap().1, b"pong");
    }

    #[test]
    fn forged_record_does_not_move_the_window() {
        let (mut cs, mut gr, _, _) = ends();
        let dst: SocketAddr = "192.0.2.9:9".parse().unwrap();
        let mut b = vec![0u8; 128];
        let n = cs.seal(&AddrRef::Ip(dst), b"x", &mut b).unwrap();
        // Forge a far-ahead nonce: the tag fails, the window must stay where it was.
        let mut forged = b[..n].to_vec();
        forged[crate::proto::record::NONCE_OFFSET..crate::proto::record::PREFIX_LEN]
            .copy_from_slice(&1_000_000u64.to_be_bytes());
        assert_eq!(gr.open(&mut forged).unwrap_err(), OpenError::BadMac);
        assert_eq!(gr.window().top(), 0);
        assert!(gr.open(&mut b[..n]).is_ok());
    }

    #[test]
    fn verified_together_opens_like_one_by_one_with_the_same_drop_reasons() {
        let (mut cs, mut gr, _, _) = ends();
        let dst: SocketAddr = "198.51.100.7:5004".parse().unwrap();
        let mut recs: Vec<Vec<u8>> = (0..6u8)
            .map(|i| {
                let mut b = vec![0u8; 256];
                let n = cs.seal(&AddrRef::Ip(dst), &[i; 40], &mut b).unwrap();
                b.truncate(n);
                b
            })
            .collect();
        let len = recs[0].len();
        recs[2][len - 1] ^= 1; // forged tag
        recs[4][30] ^= 0x80; // forged ciphertext
        let mut ok = [true; 6];
        let views: Vec<&[u8]> = recs.iter().map(|r| &r[..]).collect();
        gr.verify_many(&views, &mut ok);
        assert_eq!(ok, [true, true, false, true, false, true]);
        for (i, r) in recs.iter_mut().enumerate() {
            match gr.open_verified(r, ok[i]) {
                Ok(o) => assert_eq!((o.nonce, o.data().unwrap().1), (i as u64, &[i as u8; 40][..])),
                Err(e) => {
                    assert!(i == 2 || i == 4, "record {i}: {e}");
                    assert_eq!(e.reason(), DropReason::BadMac);
                }
            }
        }
        // A replayed record is refused as a duplicate, even with a tag verdict in hand, and
        // a record of another association gets `false`.
        let mut replay = recs[0].clone();
        let mut foreign = recs[1].clone();
        foreign[5] ^= 1; // association id
        let mut ok = [true; 2];
        gr.verify_many(&[&replay, &foreign], &mut ok);
        assert_eq!(ok, [false, false], "record 0 was decrypted in place above");
        let mut fresh = vec![0u8; 256];
        let n = cs.seal(&AddrRef::Ip(dst), &[9; 40], &mut fresh).unwrap();
        fresh.truncate(n);
        let copy = fresh.clone();
        let mut ok = [false; 2];
        gr.verify_many(&[&fresh, &copy], &mut ok);
        assert_eq!(ok, [true, true]);
        assert!(gr.open_verified(&mut fresh, ok[0]).is_ok());
        replay.copy_from_slice(&copy);
        assert_eq!(
            gr.open_verified(&mut replay, ok[1]).unwrap_err().reason(),
            DropReason::Duplicate
        );
    }

    #[test]
    fn control_records_open_as_control_and_unknown_kinds_are_refused() {
        use crate::proto::path::{PATH_CHALLENGE, PATH_RESPONSE};
        let (mut cs, mut gr, mut gs, mut cr) = ends();
        let mut b = vec![0u8; 128];
        let n = gs
            .seal_control(&ControlMessage::PathChallenge([5; 8]), &mut b)
            .unwrap();
        assert_eq!(
            n,
            crate::proto::record::MIN_RECORD,
            "10-byte plaintext, one block"
        );
        let o = cr.open(&mut b[..n]).unwrap();
        assert_eq!(o.content, Content::Control(ControlMessage::PathChallenge([5; 8])));
        assert!(o.data().is_none());
        assert!(o.is_newest());
        let n = cs
            .seal_control(&ControlMessage::PathResponse([5; 8]), &mut b)
            .unwrap();
        let o = gr.open(&mut b[..n]).unwrap();
        assert_eq!(o.content, Content::Control(ControlMessage::PathResponse([5; 8])));
        // Crafted control plaintexts: unknown KIND, short body, long body.
        for (pt, kind) in [
            (&[0u8, 0x09, 1, 2, 3, 4, 5, 6, 7, 8][..], 0x09),
            (&[0, PATH_CHALLENGE, 1, 2, 3][..], PATH_CHALLENGE),
            (&[0, PATH_RESPONSE, 1, 2, 3, 4, 5, 6, 7, 8, 9][..], PATH_RESPONSE),
            (&[0][..], 0),
        ] {
            let mut rec = vec![0u8; 128];
            rec[PREFIX_LEN..PREFIX_LEN + pt.len()].copy_from_slice(pt);
            let n = cs.seal_in_place(&mut rec, pt.len()).unwrap();
            let e = gr.open(&mut rec[..n]).unwrap_err();
            assert_eq!(e, OpenError::BadControl { kind });
            assert_eq!(e.reason(), DropReason::BadControl);
        }
        // The nonce of a refused control record stays committed (it authenticated).
        assert_eq!(gr.window().top(), 5);
    }

    #[test]
    fn unencodable_domain_is_an_error_not_a_panic() {
        let (mut cs, ..) = ends();
        let mut out = vec![0u8; 1024];
        let long = "a".repeat(256);
        for bad in ["", "has space", long.as_str()] {
            assert!(matches!(
                cs.seal(&AddrRef::Domain(bad, 1), b"x", &mut out),
                Err(SealError::BadAddress(_))
            ));
        }
        assert_eq!(cs.next_nonce(), 0);
    }

    #[test]
    fn too_large_is_refused_not_truncated() {
        let (mut cs, ..) = ends();
        let dst: SocketAddr = "192.0.2.9:9".parse().unwrap();
        let mut out = vec![0u8; 70_000];
        let payload = vec![0u8; 65_507];
        assert!(matches!(
            cs.seal(&AddrRef::Ip(dst), &payload, &mut out),
            Err(SealError::TooLarge { .. })
        ));
        assert_eq!(cs.next_nonce(), 0, "a refused seal consumes no nonce");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Every single-bit flip and every truncation of a valid record is rejected.
        #[test]
        fn every_bit_flip_and_truncation_rejected(len in 0usize..100) {
            let (mut cs, gr, ..) = ends();
            let dst: SocketAddr = "192.0.2.1:53".parse().unwrap();
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut rec = vec![0u8; record_len(7 + len)];
            let n = cs.seal(&AddrRef::Ip(dst), &payload, &mut rec).unwrap();
            prop_assert_eq!(n, rec.len());
            for bit in 0..rec.len() * 8 {
                let mut b = rec.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                let mut r = gr.clone();
                prop_assert!(r.open(&mut b).is_err(), "bit {} accepted", bit);
            }
            for cut in 0..rec.len() {
                let mut b = rec[..cut].to_vec();
                let mut r = gr.clone();
                prop_assert!(r.open(&mut b).is_err(), "truncation to {} accepted", cut);
            }
            let mut b = rec.clone();
            b.push(0);
            let mut r = gr.clone();
            prop_assert!(r.open(&mut b).is_err(), "trailing byte accepted");
            let mut r = gr.clone();
            prop_assert!(r.open(&mut rec).is_ok());
        }
    }

    #[test]
    fn the_largest_plaintext_seals_through_the_session_and_one_more_byte_does_not() {
        let (mut cs, mut gr, ..) = ends();
        let dst: SocketAddr = "192.0.2.9:9".parse().unwrap();
        let alen = AddrRef::Ip(dst).encoded_len();
        let mut out = vec![0u8; crate::proto::record::MAX_RECORD];
        let payload = vec![0x5a; crate::proto::record::MAX_PLAINTEXT - alen];
        let n = cs.seal(&AddrRef::Ip(dst), &payload, &mut out).unwrap();
        assert_eq!(n, crate::proto::record::MAX_RECORD);
        assert_eq!(
            gr.open(&mut out[..n]).unwrap().data().unwrap().1.len(),
            payload.len()
        );
        let payload = vec![0x5a; crate::proto::record::MAX_PLAINTEXT - alen + 1];
        assert_eq!(
            cs.seal(&AddrRef::Ip(dst), &payload, &mut out),
            Err(SealError::TooLarge {
                len: crate::proto::record::MAX_PLAINTEXT + 1,
                max: crate::proto::record::MAX_PLAINTEXT
            })
        );
        assert_eq!(cs.next_nonce(), 1);
    }

    #[test]
    fn buffers_of_exactly_the_record_length_are_enough_and_one_byte_less_is_not() {
        let (mut cs, mut gr, mut gs, mut cr) = ends();
        let dst: SocketAddr = "192.0.2.9:9".parse().unwrap();
        let need = record_len(AddrRef::Ip(dst).encoded_len() + 3);
        let mut out = vec![0u8; need - 1];
        assert_eq!(
            cs.seal(&AddrRef::Ip(dst), b"abc", &mut out),
            Err(SealError::BufferTooSmall { have: need - 1, need })
        );
        let mut out = vec![0u8; need];
        assert_eq!(cs.seal(&AddrRef::Ip(dst), b"abc", &mut out), Ok(need));
        assert!(gr.open(&mut out).is_ok());
        let need = crate::proto::record::MIN_RECORD;
        let msg = ControlMessage::PathChallenge([1; 8]);
        let mut out = vec![0u8; need - 1];
        assert_eq!(
            gs.seal_control(&msg, &mut out),
            Err(SealError::BufferTooSmall { have: need - 1, need })
        );
        let mut out = vec![0u8; need];
        assert_eq!(gs.seal_control(&msg, &mut out), Ok(need));
        assert_eq!(cr.open(&mut out).unwrap().content, Content::Control(msg));
        assert_eq!(
            (cs.next_nonce(), gs.next_nonce()),
            (1, 1),
            "a refused seal takes no nonce"
        );
    }

    #[test]
    fn nonces_count_up_and_remaining_counts_down() {
        let (mut cs, mut gr, ..) = ends();
        assert_eq!(cs.remaining(), MAX_RECORDS_PER_KEY);
        let dst: SocketAddr = "192.0.2.9:9".parse().unwrap();
        let mut b = vec![0u8; 128];
        cs.seal(&AddrRef::Ip(dst), b"x", &mut b).unwrap();
        assert_eq!((cs.next_nonce(), cs.remaining()), (1, MAX_RECORDS_PER_KEY - 1));
        // Three records at once take the next three nonces.
        let alen = AddrRef::Ip(dst).encoded_len();
        let mut buf = vec![0u8; 3 * 64];
        for i in 0..3 {
            AddrRef::Ip(dst).encode(&mut buf[i * 64 + PREFIX_LEN..]).unwrap();
        }
        let mut lens = [0usize; 3];
        cs.seal_many_in_place(&mut buf, &[0, 64, 128], &[alen; 3], &mut lens)
            .unwrap();
        assert_eq!((cs.next_nonce(), cs.remaining()), (4, MAX_RECORDS_PER_KEY - 4));
        for (i, &len) in lens.iter().enumerate() {
            let o = gr.open(&mut buf[i * 64..i * 64 + len]).unwrap();
            assert_eq!(o.nonce, 1 + i as u64);
        }
        let resumed = SendSession::resume(AssociationId(42), &schedule(), Role::Client, 77);
        assert_eq!(
            (resumed.next_nonce(), resumed.remaining()),
            (77, MAX_RECORDS_PER_KEY - 77)
        );
    }

    #[test]
    fn only_a_record_above_every_accepted_one_is_the_newest() {
        let (mut cs, mut gr, ..) = ends();
        let dst: SocketAddr = "192.0.2.9:9".parse().unwrap();
        let recs: Vec<Vec<u8>> = (0..3)
            .map(|_| {
                let mut b = vec![0u8; 128];
                let n = cs.seal(&AddrRef::Ip(dst), b"x", &mut b).unwrap();
                b.truncate(n);
                b
            })
            .collect();
        let newest = |gr: &mut RecvSession, i: usize| {
            let mut b = recs[i].clone();
            let o = gr.open(&mut b).unwrap();
            (o.verdict, o.is_newest())
        };
        assert_eq!(newest(&mut gr, 2), (Verdict::Ahead { jump: 3 }, true));
        assert_eq!(newest(&mut gr, 0), (Verdict::InWindow, false));
        assert_eq!(newest(&mut gr, 1), (Verdict::InWindow, false));
        assert_eq!(gr.assoc(), AssociationId(42));
        assert_eq!(gr.window().top(), 3);
    }

    #[test]
    fn verify_run_gives_every_record_its_verdict() {
        let (mut cs, gr, ..) = ends();
        let dst: SocketAddr = "192.0.2.9:9".parse().unwrap();
        // More than one chunk of INTERLEAVE, with forged records in both.
        let mut recs: Vec<Vec<u8>> = (0..INTERLEAVE + 3)
            .map(|i| {
                let mut b = vec![0u8; 128];
                let n = cs.seal(&AddrRef::Ip(dst), &[i as u8; 9], &mut b).unwrap();
                b.truncate(n);
                b
            })
            .collect();
        let bad = [1usize, INTERLEAVE + 1];
        for &i in &bad {
            recs[i][PREFIX_LEN] ^= 1;
        }
        recs[INTERLEAVE + 2][5] ^= 1; // another association
        let views: Vec<&mut [u8]> = recs.iter_mut().map(|r| &mut r[..]).collect();
        let mut tags = vec![None; views.len()];
        gr.verify_run(&views, &mut tags);
        let want: Vec<Option<bool>> = (0..INTERLEAVE + 3)
            .map(|i| Some(!bad.contains(&i) && i != INTERLEAVE + 2))
            .collect();
        assert_eq!(tags, want);
    }

    fn aead_ends(suite: CipherSuite) -> (SendSession, RecvSession, SendSession, RecvSession) {
        let m: Vec<u8> = (0..suite.exporter_len()).map(|i| (i * 5) as u8).collect();
        let ks = KeySchedule::from_exporter(suite, &m).unwrap();
        let a = AssociationId(77);
        (
            SendSession::new(a, &ks, Role::Client),
            RecvSession::new(a, &ks, Role::Gateway, 64),
            SendSession::new(a, &ks, Role::Gateway),
            RecvSession::new(a, &ks, Role::Client, 64),
        )
    }

    #[test]
    fn aead_sessions_keep_the_receive_rules() {
        for suite in [CipherSuite::Aes128Gcm, CipherSuite::ChaCha20Poly1305] {
            let (mut cs, mut gr, mut gs, mut cr) = aead_ends(suite);
            assert_eq!((cs.suite(), gr.suite()), (suite, suite));
            let dst: SocketAddr = "198.51.100.7:5004".parse().unwrap();
            let mut recs = Vec::new();
            for i in 0..4u8 {
                let mut b = vec![0u8; 256];
                let n = cs.seal(&AddrRef::Ip(dst), &[i; 20], &mut b).unwrap();
                assert_eq!(n, cs.record_len(7 + 20));
                assert_eq!(n, 21 + 27 + 16);
                b.truncate(n);
                recs.push(b);
            }
            // A forged far-ahead record (tag fails) moves nothing; its real twin opens later.
            let mut forged = recs[2].clone();
            forged[crate::proto::record::NONCE_OFFSET..crate::proto::record::PREFIX_LEN]
                .copy_from_slice(&1_000_000u64.to_be_bytes());
            assert_eq!(gr.open(&mut forged).unwrap_err(), OpenError::BadMac);
            assert_eq!(gr.window().top(), 0);
            let mut bad = recs[1].clone();
            bad[40] ^= 0x20;
            assert_eq!(gr.open(&mut bad).unwrap_err(), OpenError::BadMac);
            // Reordered delivery opens once each; replays are duplicates, checked before the tag.
            for &i in &[3usize, 1, 0, 2] {
                let mut b = recs[i].clone();
                let o = gr.open(&mut b).unwrap();
                assert_eq!(o.nonce, i as u64);
                assert_eq!(o.data().unwrap(), (AddrRef::Ip(dst), &[i as u8; 20][..]));
                let mut again = recs[i].clone();
                again[40] ^= 1; // even with a bad tag, a replay is a duplicate
                assert_eq!(
                    gr.open(&mut again).unwrap_err(),
                    OpenError::Duplicate { nonce: i as u64 }
                );
            }
            // The train path: no pre-verification for an AEAD, the single path decides.
            let mut run: Vec<Vec<u8>> = (0..3u8)
                .map(|i| {
                    let mut b = vec![0u8; 128];
                    let n = cs.seal(&AddrRef::Ip(dst), &[i; 9], &mut b).unwrap();
                    b.truncate(n);
                    b
                })
                .collect();
            run[1][30] ^= 4;
            let views: Vec<&mut [u8]> = run.iter_mut().map(|r| &mut r[..]).collect();
            let mut tags = vec![Some(true); 3];
            gr.verify_run(&views, &mut tags);
            assert_eq!(tags, vec![None; 3]);
            let mut ok = [false; 3];
            let refs: Vec<&[u8]> = run.iter().map(|r| &r[..]).collect();
            gr.verify_many(&refs, &mut ok);
            assert_eq!(ok, [true, false, true]);
            assert_eq!(
                gr.open_verified(&mut run[1], true).unwrap_err(),
                OpenError::BadMac
            );
            assert!(gr.open_verified(&mut run[0].clone(), false).is_err());
            assert!(gr.open_verified(&mut run[0], true).is_ok());
            assert_eq!(gr.window().top(), 5); // one above the newest, nonce 4
                                              // The other direction.
            let mut b = vec![0u8; 128];
            let n = gs.seal(&AddrRef::Ip(dst), b"pong", &mut b).unwrap();
            assert_eq!(cr.open(&mut b[..n]).unwrap().data().unwrap().1, b"pong");
            let mut c = vec![0u8; 128];
            let n = gs
                .seal_control(&ControlMessage::PathChallenge([1; 8]), &mut c)
                .unwrap();
            assert_eq!(n, 21 + PATH_MESSAGE_LEN + 16);
        }
    }

    #[test]
    fn gcm_data_limit_refuses_and_counts_nothing_on_refusal() {
        let (mut cs, mut gr, _, _) = aead_ends(CipherSuite::Aes128Gcm);
        let limit = crate::proto::keys::GCM_MAX_BLOCKS_PER_KEY;
        // 27 bytes of plaintext = 2 counter blocks + the tag block.
        cs.resume_blocks(limit - 6);
        let dst: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let mut b = vec![0u8; 128];
        for _ in 0..2 {
            let n = cs.seal(&AddrRef::Ip(dst), &[0; 20], &mut b).unwrap();
            assert!(gr.open(&mut b[..n]).is_ok());
        }
        assert!(matches!(
            cs.seal(&AddrRef::Ip(dst), &[0; 20], &mut b),
            Err(SealError::KeyExhausted { limit: 2 })
        ));
        // An empty-payload record still costs its blocks; nothing was counted by the refusal.
        assert_eq!(cs.next_nonce(), 2);
        let mut buf = vec![0u8; 4096];
        let mut lens = [0usize; 2];
        assert!(cs
            .seal_many_in_place(&mut buf, &[0, 2048], &[7, 7], &mut lens)
            .is_err());
        assert_eq!(cs.next_nonce(), 2);
        // ChaCha20-Poly1305 and the CBC suites have no data limit below the nonce limit.
        let (mut cc, _, _, _) = aead_ends(CipherSuite::ChaCha20Poly1305);
        cc.resume_blocks(u64::MAX - 1);
        assert!(cc.seal(&AddrRef::Ip(dst), &[0; 20], &mut b).is_ok());
    }
}
