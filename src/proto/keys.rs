//! Cipher suites and the key schedule.
//!
//! Keys never travel in a SOCKS message. Both ends of the TLS control connection call the
//! TLS exporter (RFC 8446 §7.5, RFC 5705) with
//!
//! ```text
//! label   = "EXPORTER-sudp-udp-keys-v1"
//! context = association_id (8 bytes, big-endian) || suite_id (1 byte)
//! length  = 2 * (Ke + Km + Ki)
//! ```
//!
//! and cut the output, in this order, into
//!
//! ```text
//! +-------------+-------------+-------------+-------------+-------------+-------------+
//! | c2g enc Ke  | c2g mac Km  | c2g iv  Ki  | g2c enc Ke  | g2c mac Km  | g2c iv  Ki  |
//! +-------------+-------------+-------------+-------------+-------------+-------------+
//! ```
//!
//! where c2g is the client-to-gateway direction and g2c the reverse; Ke = Ki = 16 (suite 1)
//! or 32 (suite 2), Km = 32. The AEAD suites (3: AES-128-GCM, 4: ChaCha20-Poly1305) have no
//! MAC key and a 12-byte IV (Km = 0, Ki = 12, Ke = 16 or 32), so the same cut reads
//! `c2g key | c2g iv | g2c key | g2c iv`, `2 * (Ke + 12)` bytes. This module only cuts bytes:
//! calling the exporter is the TLS layer's job, so the core stays free of I/O.

use zeroize::{Zeroize, ZeroizeOnDrop};

/// TLS exporter label for secure-UDP keys (RFC 5705 §4: private labels start with "EXPORTER").
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-sudp-udp-keys-v1";

/// Length of the MAC key of the CBC suites: HMAC-SHA256's block-friendly 32 bytes.
pub const MAC_KEY_LEN: usize = 32;

/// Length of the per-direction IV of the AEAD suites (the AEAD nonce length, as TLS 1.3).
pub const AEAD_IV_LEN: usize = 12;

/// AES-128-GCM's data limit per key, in 16-byte AES blocks (PROTOCOL.md §8): 2^34 blocks
/// (256 GiB), under the 2^34.5 blocks of TLS 1.3's 2^24.5 full-size records (RFC 8446 §5.5),
/// which keep the distinguishing advantage near 2^-57. Counted by the send session.
pub const GCM_MAX_BLOCKS_PER_KEY: u64 = 1 << 34;

/// A cipher suite: AES-CBC with PKCS#7 padding and HMAC-SHA256 truncated to 128 bits
/// (suites 1, 2), or an AEAD (suites 3, 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CipherSuite {
    /// AES-128-CBC + HMAC-SHA256-128 (suite id 0x01, the default).
    Aes128CbcHmacSha256 = 0x01,
    /// AES-256-CBC + HMAC-SHA256-128 (suite id 0x02).
    Aes256CbcHmacSha256 = 0x02,
    /// AES-128-GCM (suite id 0x03), an AEAD with a 16-byte tag.
    Aes128Gcm = 0x03,
    /// ChaCha20-Poly1305 (suite id 0x04, RFC 8439), for CPUs without AES instructions.
    ChaCha20Poly1305 = 0x04,
}

impl CipherSuite {
    /// Every suite this version implements, most preferred first: the CBC suites stay the
    /// default (a client offering `ALL` gets suite 1 from a gateway that allows it).
    pub const ALL: [CipherSuite; 4] = [
        CipherSuite::Aes128CbcHmacSha256,
        CipherSuite::Aes256CbcHmacSha256,
        CipherSuite::Aes128Gcm,
        CipherSuite::ChaCha20Poly1305,
    ];

    /// The one-byte id carried in the sub-negotiation and the exporter context.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// Suite for a wire id, if this version knows it.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            0x01 => Some(CipherSuite::Aes128CbcHmacSha256),
            0x02 => Some(CipherSuite::Aes256CbcHmacSha256),
            0x03 => Some(CipherSuite::Aes128Gcm),
            0x04 => Some(CipherSuite::ChaCha20Poly1305),
            _ => None,
        }
    }

    /// Whether this is an AEAD suite (no padding, no MAC key; PROTOCOL.md §4.7).
    pub fn is_aead(self) -> bool {
        matches!(self, CipherSuite::Aes128Gcm | CipherSuite::ChaCha20Poly1305)
    }

    /// Encryption key length (Ke).
    pub fn enc_key_len(self) -> usize {
        match self {
            CipherSuite::Aes128CbcHmacSha256 | CipherSuite::Aes128Gcm => 16,
            CipherSuite::Aes256CbcHmacSha256 | CipherSuite::ChaCha20Poly1305 => 32,
        }
    }

    /// MAC key length (Km): 32 for the CBC suites, 0 for the AEAD suites.
    pub fn mac_key_len(self) -> usize {
        if self.is_aead() {
            0
        } else {
            MAC_KEY_LEN
        }
    }

    /// IV material length (Ki): the IV-derivation AES key of the CBC suites (Ke bytes), or
    /// the AEAD suites' 12-byte IV.
    pub fn iv_len(self) -> usize {
        if self.is_aead() {
            AEAD_IV_LEN
        } else {
            self.enc_key_len()
        }
    }

    /// Bytes of keying material per direction.
    pub fn direction_len(self) -> usize {
        self.enc_key_len() + self.mac_key_len() + self.iv_len()
    }

    /// Length of this suite's record sealing `plaintext_len` bytes: CBC pads to whole
    /// blocks (PROTOCOL.md §4.2), an AEAD does not (§4.7). Never longer than
    /// [`crate::proto::record::record_len`], which is the CBC length and so room for any suite.
    pub const fn record_len(self, plaintext_len: usize) -> usize {
        match self {
            CipherSuite::Aes128Gcm | CipherSuite::ChaCha20Poly1305 => {
                crate::proto::record::PREFIX_LEN + plaintext_len + crate::proto::record::TAG_LEN
            }
            _ => crate::proto::record::record_len(plaintext_len),
        }
    }

    /// The data limit per key in 16-byte cipher blocks, if the suite has one below what the
    /// nonce limit allows (PROTOCOL.md §8): AES-128-GCM only.
    pub fn max_blocks_per_key(self) -> Option<u64> {
        match self {
            CipherSuite::Aes128Gcm => Some(GCM_MAX_BLOCKS_PER_KEY),
            _ => None,
        }
    }

    /// Bytes to ask of the exporter.
    pub fn exporter_len(self) -> usize {
        2 * self.direction_len()
    }

    /// Human-readable name, as used in configs.
    pub fn name(self) -> &'static str {
        match self {
            CipherSuite::Aes128CbcHmacSha256 => "aes128-cbc-hmac-sha256",
            CipherSuite::Aes256CbcHmacSha256 => "aes256-cbc-hmac-sha256",
            CipherSuite::Aes128Gcm => "aes128-gcm",
            CipherSuite::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }

    /// Suite for a config name.
    pub fn from_name(name: &str) -> Option<Self> {
        CipherSuite::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl std::fmt::Display for CipherSuite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The 64-bit association id carried in every record, chosen by the gateway.
///
/// It is a lookup key, not a secret: any gateway node finds the association by it (like a
/// DTLS connection id). Gateways draw it at random so ids from different nodes do not collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AssociationId(pub u64);

impl AssociationId {
    /// Big-endian wire bytes.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// From big-endian wire bytes.
    pub fn from_bytes(b: [u8; 8]) -> Self {
        AssociationId(u64::from_be_bytes(b))
    }
}

impl std::fmt::Display for AssociationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Which end of the association this is; it decides which half of the keys seals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The sudp client (shim or library): seals with c2g keys, opens with g2c keys.
    Client,
    /// The gateway: seals with g2c keys, opens with c2g keys.
    Gateway,
}

/// The keys of one direction. Zeroized on drop; `Debug` never prints key bytes.
///
/// One shape for every suite: the CBC suites fill all three keys; the AEAD suites have an
/// empty [`mac`](Self::mac) and a 12-byte [`iv`](Self::iv) (the per-direction AEAD IV, not
/// an AES key), so the CBC code reads exactly what it read before.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DirectionKeys {
    enc: [u8; 32],
    mac: [u8; MAC_KEY_LEN],
    iv: [u8; 32],
    #[zeroize(skip)]
    suite: CipherSuite,
}

impl DirectionKeys {
    /// Keys from raw bytes: `enc` of [`CipherSuite::enc_key_len`], `mac` of
    /// [`CipherSuite::mac_key_len`] (empty for an AEAD suite), `iv` of
    /// [`CipherSuite::iv_len`].
    ///
    /// Returns `None` when a length does not match the suite.
    pub fn new(suite: CipherSuite, enc: &[u8], mac: &[u8], iv: &[u8]) -> Option<Self> {
        let n = suite.enc_key_len();
        if enc.len() != n || iv.len() != suite.iv_len() || mac.len() != suite.mac_key_len() {
            return None;
        }
        let mut k = DirectionKeys {
            enc: [0; 32],
            mac: [0; MAC_KEY_LEN],
            iv: [0; 32],
            suite,
        };
        k.enc[..n].copy_from_slice(enc);
        k.mac[..mac.len()].copy_from_slice(mac);
        k.iv[..iv.len()].copy_from_slice(iv);
        Some(k)
    }

    /// The suite these keys belong to.
    pub fn suite(&self) -> CipherSuite {
        self.suite
    }

    /// Encryption key (AES for suites 1-3, ChaCha20 for suite 4).
    pub fn enc(&self) -> &[u8] {
        &self.enc[..self.suite.enc_key_len()]
    }

    /// HMAC-SHA256 key (empty for an AEAD suite).
    pub fn mac(&self) -> &[u8] {
        &self.mac[..self.suite.mac_key_len()]
    }

    /// AES key of the IV derivation (CBC suites), or the 12-byte AEAD IV (AEAD suites).
    pub fn iv(&self) -> &[u8] {
        &self.iv[..self.suite.iv_len()]
    }
}

impl std::fmt::Debug for DirectionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectionKeys")
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

/// Both directions' keys of one association.
///
/// Not `Clone`: [`KeySchedule::into_sessions`] consumes it, so one schedule yields one
/// sender per association end and no nonce is ever sealed twice under its key.
#[derive(Debug)]
pub struct KeySchedule {
    /// Client-to-gateway keys.
    pub c2g: DirectionKeys,
    /// Gateway-to-client keys.
    pub g2c: DirectionKeys,
}

impl KeySchedule {
    /// The exporter context for an association: id (8 bytes BE) then the suite id.
    pub fn exporter_context(assoc: AssociationId, suite: CipherSuite) -> [u8; 9] {
        let mut c = [0u8; 9];
        c[..8].copy_from_slice(&assoc.to_bytes());
        c[8] = suite.id();
        c
    }

    /// The exporter context of epoch `epoch` of an association (PROTOCOL.md §3.1): epoch 0
    /// (the association's first control connection) is [`KeySchedule::exporter_context`];
    /// a re-attached association's epoch `e >= 1` appends `e` (4 bytes BE), so its keys
    /// come from the new connection's exporter with the epoch bound in.
    pub fn epoch_context(assoc: AssociationId, suite: CipherSuite, epoch: u32) -> Vec<u8> {
        let mut c = Self::exporter_context(assoc, suite).to_vec();
        if epoch > 0 {
            c.extend_from_slice(&epoch.to_be_bytes());
        }
        c
    }

    /// Cuts exporter output into keys. `material` must be exactly
    /// [`CipherSuite::exporter_len`] bytes; the caller zeroizes its copy.
    pub fn from_exporter(suite: CipherSuite, material: &[u8]) -> Option<Self> {
        if material.len() != suite.exporter_len() {
            return None;
        }
        let (n, m) = (suite.enc_key_len(), suite.mac_key_len());
        let cut = |d: &[u8]| DirectionKeys::new(suite, &d[..n], &d[n..n + m], &d[n + m..]);
        let (c2g, g2c) = material.split_at(suite.direction_len());
        Some(KeySchedule {
            c2g: cut(c2g)?,
            g2c: cut(g2c)?,
        })
    }

    /// The sending and receiving halves of `role`'s end of association `assoc`, the
    /// receiver with a replay window of `window` nonces. Takes the schedule by value: the
    /// one way for a library user to get a [`SendSession`](crate::proto::SendSession).
    ///
    /// A schedule makes one pair, never two senders:
    ///
    /// ```compile_fail
    /// # use sudp::proto::{AssociationId, CipherSuite, KeySchedule, Role};
    /// let suite = CipherSuite::Aes128CbcHmacSha256;
    /// let ks = KeySchedule::from_exporter(suite, &vec![7; suite.exporter_len()]).unwrap();
    /// let (a, _) = ks.into_sessions(AssociationId(1), Role::Client, 64);
    /// let (b, _) = ks.into_sessions(AssociationId(1), Role::Client, 64); // moved: refused
    /// ```
    ///
    /// and neither the schedule nor a sender can be copied:
    ///
    /// ```compile_fail
    /// fn clone<T: Clone>() {}
    /// clone::<sudp::proto::SendSession>();
    /// ```
    ///
    /// ```compile_fail
    /// fn clone<T: Clone>() {}
    /// clone::<sudp::proto::KeySchedule>();
    /// ```
    ///
    /// ```compile_fail
    /// fn clone<T: Clone>() {}
    /// clone::<sudp::proto::Sealer>();
    /// ```
    pub fn into_sessions(
        self,
        assoc: AssociationId,
        role: Role,
        window: usize,
    ) -> (crate::proto::SendSession, crate::proto::RecvSession) {
        (
            crate::proto::SendSession::new(assoc, &self, role),
            crate::proto::RecvSession::new(assoc, &self, role, window),
        )
    }

    /// (sealing keys, opening keys) for `role`.
    pub fn for_role(&self, role: Role) -> (&DirectionKeys, &DirectionKeys) {
        match role {
            Role::Client => (&self.c2g, &self.g2c),
            Role::Gateway => (&self.g2c, &self.c2g),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_contexts() {
        let id = AssociationId(0x0102_0304_0506_0708);
        let s = CipherSuite::Aes128CbcHmacSha256;
        assert_eq!(
            KeySchedule::epoch_context(id, s, 0),
            KeySchedule::exporter_context(id, s).to_vec()
        );
        assert_eq!(
            KeySchedule::epoch_context(id, s, 2),
            [1, 2, 3, 4, 5, 6, 7, 8, 0x01, 0, 0, 0, 2]
        );
    }

    #[test]
    fn exporter_cut_order_and_lengths() {
        for suite in CipherSuite::ALL.into_iter().filter(|s| !s.is_aead()) {
            let material: Vec<u8> = (0..suite.exporter_len()).map(|i| i as u8).collect();
            let ks = KeySchedule::from_exporter(suite, &material).unwrap();
            let n = suite.enc_key_len();
            assert_eq!(ks.c2g.enc(), &material[..n]);
            assert_eq!(ks.c2g.mac(), &material[n..n + 32]);
            assert_eq!(ks.c2g.iv(), &material[n + 32..2 * n + 32]);
            let d = suite.direction_len();
            assert_eq!(ks.g2c.enc(), &material[d..d + n]);
            assert_eq!(ks.g2c.iv(), &material[d + n + 32..]);
            assert!(KeySchedule::from_exporter(suite, &material[1..]).is_none());
        }
    }

    #[test]
    fn roles_swap_directions() {
        let suite = CipherSuite::Aes128CbcHmacSha256;
        let material: Vec<u8> = (0..suite.exporter_len()).map(|i| i as u8).collect();
        let ks = KeySchedule::from_exporter(suite, &material).unwrap();
        let (cs, co) = ks.for_role(Role::Client);
        let (gs, go) = ks.for_role(Role::Gateway);
        assert_eq!(cs.enc(), go.enc());
        assert_eq!(co.enc(), gs.enc());
    }

    #[test]
    fn debug_hides_keys() {
        let k = DirectionKeys::new(
            CipherSuite::Aes128CbcHmacSha256,
            &[0xAB; 16],
            &[0xCD; 32],
            &[0xEF; 16],
        )
        .unwrap();
        let s = format!("{k:?}");
        assert!(!s.contains("171") && !s.to_lowercase().contains("ab"), "{s}");
    }

    #[test]
    fn suite_ids_round_trip() {
        for s in CipherSuite::ALL {
            assert_eq!(CipherSuite::from_id(s.id()), Some(s));
            assert_eq!(CipherSuite::from_name(s.name()), Some(s));
        }
        assert_eq!(CipherSuite::from_id(0), None);
        assert_eq!(CipherSuite::from_id(5), None);
    }

    #[test]
    fn aead_exporter_cut_is_key_then_iv() {
        for (suite, ke) in [(CipherSuite::Aes128Gcm, 16), (CipherSuite::ChaCha20Poly1305, 32)] {
            assert!(suite.is_aead());
            assert_eq!(suite.exporter_len(), 2 * (ke + 12));
            let material: Vec<u8> = (0..suite.exporter_len()).map(|i| i as u8).collect();
            let ks = KeySchedule::from_exporter(suite, &material).unwrap();
            assert_eq!(ks.c2g.enc(), &material[..ke]);
            assert_eq!(ks.c2g.iv(), &material[ke..ke + 12]);
            assert!(ks.c2g.mac().is_empty());
            assert_eq!(ks.g2c.enc(), &material[ke + 12..2 * ke + 12]);
            assert_eq!(ks.g2c.iv(), &material[2 * ke + 12..]);
            assert!(KeySchedule::from_exporter(suite, &material[1..]).is_none());
            // An AEAD key with a MAC key, or a CBC-length IV, is refused.
            assert!(DirectionKeys::new(suite, &material[..ke], &[0; 32], &material[..12]).is_none());
            assert!(DirectionKeys::new(suite, &material[..ke], &[], &material[..ke + 1]).is_none());
        }
        assert_eq!(CipherSuite::from_name("aes128-gcm"), Some(CipherSuite::Aes128Gcm));
        assert_eq!(
            CipherSuite::from_name("chacha20-poly1305"),
            Some(CipherSuite::ChaCha20Poly1305)
        );
        assert_eq!(CipherSuite::Aes128Gcm.record_len(7), 21 + 7 + 16);
        assert_eq!(CipherSuite::Aes128CbcHmacSha256.record_len(7), 21 + 16 + 16);
    }

    #[test]
    fn exporter_context_is_the_id_then_the_suite() {
        // PROTOCOL.md: context = association_id (8 bytes, big-endian) || suite_id.
        let c = KeySchedule::exporter_context(
            AssociationId(0x0102_0304_0506_0708),
            CipherSuite::Aes256CbcHmacSha256,
        );
        assert_eq!(c, [1, 2, 3, 4, 5, 6, 7, 8, 2]);
        let c = KeySchedule::exporter_context(AssociationId(u64::MAX), CipherSuite::Aes128CbcHmacSha256);
        assert_eq!(c, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1]);
    }

    #[test]
    fn key_lengths_other_than_the_suites_are_refused() {
        for suite in CipherSuite::ALL {
            let (n, ml, il) = (suite.enc_key_len(), suite.mac_key_len(), suite.iv_len());
            let (e, m, i) = (vec![1u8; n], vec![2u8; ml], vec![3u8; il]);
            let k = DirectionKeys::new(suite, &e, &m, &i).expect("lengths of the suite");
            assert_eq!(
                (k.enc(), k.mac(), k.iv(), k.suite()),
                (&e[..], &m[..], &i[..], suite)
            );
            // Each length wrong on its own, one byte short and one byte long.
            for d in [n - 1, n + 1] {
                assert!(
                    DirectionKeys::new(suite, &vec![9u8; d], &m, &i).is_none(),
                    "enc {d}"
                );
            }
            for d in [il - 1, il + 1] {
                assert!(
                    DirectionKeys::new(suite, &e, &m, &vec![9u8; d]).is_none(),
                    "iv {d}"
                );
            }
            for d in [ml.saturating_sub(1), ml + 1] {
                if d != ml {
                    assert!(
                        DirectionKeys::new(suite, &e, &vec![9u8; d], &i).is_none(),
                        "mac {d}"
                    );
                }
            }
        }
    }

    #[test]
    fn lengths_and_names_are_the_documented_ones() {
        let (s1, s2) = (CipherSuite::Aes128CbcHmacSha256, CipherSuite::Aes256CbcHmacSha256);
        assert_eq!((s1.id(), s2.id()), (1, 2));
        assert_eq!((s1.enc_key_len(), s2.enc_key_len()), (16, 32));
        assert_eq!((s1.direction_len(), s2.direction_len()), (64, 96));
        assert_eq!((s1.exporter_len(), s2.exporter_len()), (128, 192));
        assert_eq!(s1.to_string(), "aes128-cbc-hmac-sha256");
        assert_eq!(s2.to_string(), "aes256-cbc-hmac-sha256");
        assert_eq!(CipherSuite::from_name("aes128"), None);
        assert_eq!(AssociationId(0xab).to_string(), "00000000000000ab");
        assert_eq!(
            AssociationId::from_bytes([0, 0, 0, 0, 0, 0, 1, 2]),
            AssociationId(0x102)
        );
        assert_eq!(AssociationId(0x0102).to_bytes(), [0, 0, 0, 0, 0, 0, 1, 2]);
    }

    #[test]
    fn debug_names_the_suite_only() {
        let k = DirectionKeys::new(CipherSuite::Aes256CbcHmacSha256, &[7; 32], &[7; 32], &[7; 32]).unwrap();
        assert_eq!(
            format!("{k:?}"),
            "DirectionKeys { suite: Aes256CbcHmacSha256, .. }"
        );
    }

    #[test]
    fn each_role_seals_with_its_own_direction() {
        let suite = CipherSuite::Aes128CbcHmacSha256;
        let material: Vec<u8> = (0..suite.exporter_len()).map(|i| i as u8).collect();
        let ks = KeySchedule::from_exporter(suite, &material).unwrap();
        let (seal, open) = ks.for_role(Role::Client);
        assert_eq!((seal.enc(), open.enc()), (ks.c2g.enc(), ks.g2c.enc()));
        let (seal, open) = ks.for_role(Role::Gateway);
        assert_eq!((seal.enc(), open.enc()), (ks.g2c.enc(), ks.c2g.enc()));
        assert_eq!(ks.g2c.mac(), &material[64 + 16..64 + 48]);
    }
}
