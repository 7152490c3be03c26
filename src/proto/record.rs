//! The secure-UDP record: header codec, seal and open.
//!
//! One record is one UDP datagram (all integers big-endian):
//!
//! ```text
//!  0        1        2        3        4        5                  13                 21
//! +--------+--------+--------+--------+--------+------------------+------------------+
//! |  0x97  |  0x03  |  0x03  |   length (u16)  |  association id  |   nonce (u64)    |
//! +--------+--------+--------+--------+--------+------------------+------------------+
//! |               ciphertext: AES-CBC(PKCS#7(plaintext)), 16*k bytes, k >= 1          |
//! +-----------------------------------------------------------------------------------+
//! |               tag: HMAC-SHA256(mac_key, bytes 0 .. 21+16k)[0..16]                 |
//! +-----------------------------------------------------------------------------------+
//! ```
//!
//! * Byte 0 is TLS `application_data` (0x17) with the secure-UDP flag bit 0x80 set. A naked
//!   SOCKS5 UDP datagram starts with RSV = 0x0000, so the first byte alone routes a datagram.
//! * `length` counts every byte after the 5-byte header (association id to tag).
//! * The IV is not sent: `IV = AES-ECB(iv_key, association id || nonce)`, the "combined
//!   nonce/IV" of the design. It is unpredictable without `iv_key` and unique per nonce.
//! * Encrypt-then-MAC: the tag covers header, association id, nonce and ciphertext, and is
//!   checked in constant time before anything is decrypted.
//! * The plaintext is the SOCKS5 address (ATYP, ADDR, PORT) followed by the payload.
//!
//! The AEAD suites (3: AES-128-GCM, 4: ChaCha20-Poly1305; PROTOCOL.md §4.7) keep the
//! header, association id and nonce, and replace the two lower rows:
//!
//! ```text
//! |               ciphertext: AEAD-Encrypt(key, iv XOR pad12(nonce), AAD = bytes 0 .. 21,   |
//! |               plaintext), exactly as long as the plaintext, then the 16-byte AEAD tag     |
//! ```
//!
//! no padding, no MAC key, no IV derivation; the AEAD's own tag is the record's tag, and
//! opening is one pass (verify and decrypt) that releases nothing unless the tag verifies.
//!
//! CBC overhead is 37 bytes plus 1-16 bytes of padding; AEAD overhead is 37 bytes. Every record fits in the largest UDP
//! payload, 65 507 bytes ([`MAX_DATAGRAM`]); whole blocks make the largest record 65 493
//! bytes ([`MAX_RECORD`]), carrying the largest plaintext, [`MAX_PLAINTEXT`] = 65 455 bytes.

use aes::cipher::consts::U16;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::inout::InOutBuf;
#[cfg(test)]
use aes::cipher::BlockEncryptMut;
use aes::cipher::{
    BlockBackend, BlockClosure, BlockDecryptMut, BlockEncrypt, BlockSizeUser, InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes256};

use crate::proto::error::{OpenError, SealError};
use crate::proto::keys::{AssociationId, CipherSuite, DirectionKeys, AEAD_IV_LEN};
use crate::proto::tag::TagKey;
use subtle::ConstantTimeEq;

/// Content type byte: TLS application_data (0x17) | secure-UDP flag (0x80).
pub const CONTENT_TYPE: u8 = 0x97;
/// The secure-UDP flag bit of the content type.
pub const SECURE_FLAG: u8 = 0x80;
/// Record version bytes (TLS 1.2's, as TLS 1.3 records carry too).
pub const VERSION: [u8; 2] = [0x03, 0x03];
/// Header length: type, version, length.
pub const HEADER_LEN: usize = 5;
/// Offset of the association id.
pub const ASSOC_OFFSET: usize = HEADER_LEN;
/// Offset of the nonce.
pub const NONCE_OFFSET: usize = ASSOC_OFFSET + 8;
/// Offset of the ciphertext (and of the plaintext when sealing in place).
pub const PREFIX_LEN: usize = NONCE_OFFSET + 8;
/// Tag length (HMAC-SHA256 truncated to 128 bits, as RFC 4868).
pub const TAG_LEN: usize = 16;
/// Cipher block length.
pub const BLOCK_LEN: usize = 16;
/// Smallest record of a CBC suite: prefix, one block, tag.
pub const MIN_RECORD: usize = PREFIX_LEN + BLOCK_LEN + TAG_LEN;
/// Smallest record of an AEAD suite, and of any suite: prefix and tag (empty plaintext).
pub const MIN_AEAD_RECORD: usize = PREFIX_LEN + TAG_LEN;
/// Largest UDP payload over IPv4: no record is longer.
pub const MAX_DATAGRAM: usize = 65_507;
/// Largest ciphertext that fits in [`MAX_DATAGRAM`].
pub const MAX_CIPHERTEXT: usize = (MAX_DATAGRAM - PREFIX_LEN - TAG_LEN) / BLOCK_LEN * BLOCK_LEN;
/// Largest plaintext (address header + payload) one record carries, in every suite (an AEAD
/// record of it is 65 492 bytes, one less than the CBC one).
pub const MAX_PLAINTEXT: usize = MAX_CIPHERTEXT - 1;
/// Largest record a sender makes (PROTOCOL.md §4.6): 65 493 bytes, length field `0xFFD0`.
pub const MAX_RECORD: usize = record_len(MAX_PLAINTEXT);
/// Records whose CBC chains [`Sealer::seal_many_in_place`] advances together.
pub const INTERLEAVE: usize = 8;
/// Records one key may seal: nonces 0 .. 2^48. Far below the CBC birthday bound (2^64
/// blocks) even at maximal records, and unreachable in practice (9 years at 1 Mpps).
pub const MAX_RECORDS_PER_KEY: u64 = 1 << 48;

/// Length of the CBC record that seals `plaintext_len` bytes; an AEAD record is shorter
/// ([`CipherSuite::record_len`]), so this is room enough for a record of any suite.
pub const fn record_len(plaintext_len: usize) -> usize {
    PREFIX_LEN + (plaintext_len / BLOCK_LEN + 1) * BLOCK_LEN + TAG_LEN
}

/// The cleartext fields of a record, read without keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Association id.
    pub assoc: AssociationId,
    /// Nonce.
    pub nonce: u64,
    /// Ciphertext length.
    pub ciphertext_len: usize,
}

/// Parses and checks the cleartext part of a record of a CBC suite (no keys needed): at
/// least [`MIN_RECORD`] bytes, and a ciphertext of whole blocks. The whole datagram must be
/// the record: trailing bytes are a length mismatch.
pub fn parse_header(datagram: &[u8]) -> Result<RecordHeader, OpenError> {
    let h = parse_header_min(datagram, MIN_RECORD)?;
    if h.ciphertext_len == 0 || h.ciphertext_len % BLOCK_LEN != 0 {
        return Err(OpenError::BadCiphertextLength {
            len: h.ciphertext_len,
        });
    }
    Ok(h)
}

/// The checks of [`parse_header`] that hold for every suite (at least [`MIN_AEAD_RECORD`]
/// bytes, type, version, length field), for a receiver that does not know the record's
/// suite yet (the gateway routes by association id before it has the keys). The suite's
/// own rules follow in [`Opener::check_header`].
pub fn parse_any_header(datagram: &[u8]) -> Result<RecordHeader, OpenError> {
    parse_header_min(datagram, MIN_AEAD_RECORD)
}

/// [`parse_header`] for a receiver that finds a record's suite by its association id (the
/// gateway): a datagram that fails only the CBC suites' own rules (shorter than
/// [`MIN_RECORD`], or a ciphertext of no whole blocks) yet has the shape of every suite
/// ([`parse_any_header`]) is accepted when `aead(id)` says its association uses an AEAD
/// suite. Otherwise the [`parse_header`] error stands, so what §6.1 of PROTOCOL.md counts
/// for a datagram no AEAD association claims is unchanged.
pub fn parse_header_with(
    datagram: &[u8],
    aead: impl FnOnce(AssociationId) -> bool,
) -> Result<RecordHeader, OpenError> {
    match parse_header(datagram) {
        Err(e @ (OpenError::Truncated { .. } | OpenError::BadCiphertextLength { .. })) => {
            match parse_any_header(datagram) {
                Ok(h) if aead(h.assoc) => Ok(h),
                _ => Err(e),
            }
        }
        r => r,
    }
}

fn parse_header_min(datagram: &[u8], min: usize) -> Result<RecordHeader, OpenError> {
    if datagram.len() < min {
        return Err(OpenError::Truncated {
            len: datagram.len(),
            min,
        });
    }
    let version = [datagram[1], datagram[2]];
    if datagram[0] != CONTENT_TYPE || version != VERSION {
        return Err(OpenError::BadHeader {
            content_type: datagram[0],
            version: u16::from_be_bytes(version),
        });
    }
    let field = u16::from_be_bytes([datagram[3], datagram[4]]) as usize;
    let actual = datagram.len() - HEADER_LEN;
    if field != actual {
        return Err(OpenError::LengthMismatch { field, actual });
    }
    let ciphertext_len = datagram.len() - PREFIX_LEN - TAG_LEN;
    Ok(RecordHeader {
        assoc: AssociationId::from_bytes(read8(&datagram[ASSOC_OFFSET..])),
        nonce: u64::from_be_bytes(read8(&datagram[NONCE_OFFSET..])),
        ciphertext_len,
    })
}

/// Writes the 21 cleartext bytes of a `len`-byte record.
fn write_prefix(buf: &mut [u8], assoc: AssociationId, nonce: u64, len: usize) {
    buf[0] = CONTENT_TYPE;
    buf[1..3].copy_from_slice(&VERSION);
    buf[3..5].copy_from_slice(&((len - HEADER_LEN) as u16).to_be_bytes());
    buf[ASSOC_OFFSET..NONCE_OFFSET].copy_from_slice(&assoc.to_bytes());
    buf[NONCE_OFFSET..PREFIX_LEN].copy_from_slice(&nonce.to_be_bytes());
}

fn read8(b: &[u8]) -> [u8; 8] {
    let mut o = [0u8; 8];
    o.copy_from_slice(&b[..8]);
    o
}

/// A keyed AES instance of either size, built once per key (and held for the key's life:
/// the 256 bytes between the variants cost nothing, where a box would cost a pointer chase
/// per block).
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
enum Aes {
    A128(Aes128),
    A256(Aes256),
}

type Block = GenericArray<u8, U16>;

impl Aes {
    fn new(suite: CipherSuite, key: &[u8]) -> Self {
        // Invariant: DirectionKeys guarantees key lengths match the suite.
        match suite {
            CipherSuite::Aes128CbcHmacSha256 => {
                Aes::A128(Aes128::new_from_slice(key).expect("16-byte key by construction"))
            }
            CipherSuite::Aes256CbcHmacSha256 => {
                Aes::A256(Aes256::new_from_slice(key).expect("32-byte key by construction"))
            }
            // Invariant: only `CbcKeys::new`, for a CBC suite, builds an `Aes`.
            CipherSuite::Aes128Gcm | CipherSuite::ChaCha20Poly1305 => {
                unreachable!("AES-CBC keys are built for CBC suites only")
            }
        }
    }

    fn encrypt_block(&self, block: &mut [u8; 16]) {
        let b = Block::from_mut_slice(block);
        match self {
            Aes::A128(k) => k.encrypt_block(b),
            Aes::A256(k) => k.encrypt_block(b),
        }
    }

    /// Runs `job` with this key's AES backend (round keys set up once for the whole job).
    fn encrypt_with(&self, job: CbcJob<'_>) {
        match self {
            Aes::A128(k) => k.encrypt_with_backend(job),
            Aes::A256(k) => k.encrypt_with_backend(job),
        }
    }

    /// CBC-encrypts whole blocks in place (tests build records by hand with it).
    #[cfg(test)]
    fn cbc_encrypt(&self, iv: &[u8; 16], data: &mut [u8]) {
        let (blocks, tail) = InOutBuf::from(data).into_chunks::<U16>();
        debug_assert!(tail.is_empty());
        let iv = Block::from_slice(iv);
        match self {
            Aes::A128(k) => cbc::Encryptor::<&Aes128>::inner_iv_init(k, iv).encrypt_blocks_inout_mut(blocks),
            Aes::A256(k) => cbc::Encryptor::<&Aes256>::inner_iv_init(k, iv).encrypt_blocks_inout_mut(blocks),
        }
    }

    /// CBC-decrypts whole blocks in place.
    fn cbc_decrypt(&self, iv: &[u8; 16], data: &mut [u8]) {
        let (blocks, tail) = InOutBuf::from(data).into_chunks::<U16>();
        debug_assert!(tail.is_empty());
        let iv = Block::from_slice(iv);
        match self {
            Aes::A128(k) => cbc::Decryptor::<&Aes128>::inner_iv_init(k, iv).decrypt_blocks_inout_mut(blocks),
            Aes::A256(k) => cbc::Decryptor::<&Aes256>::inner_iv_init(k, iv).decrypt_blocks_inout_mut(blocks),
        }
    }
}

/// CBC encryption of up to [`INTERLEAVE`] records in one call to the AES backend.
///
/// CBC encryption is latency-bound: each block waits for the previous one. Encrypting
/// the records of a batch row by row (block `b` of every record before block `b + 1` of
/// any) keeps several independent chains in flight, and running the whole job inside one
/// backend call sets the round keys up once rather than once per block.
struct CbcJob<'a> {
    buf: &'a mut [u8],
    offsets: &'a [usize],
    nblocks: [usize; INTERLEAVE],
    chain: [Block; INTERLEAVE],
}

impl BlockSizeUser for CbcJob<'_> {
    type BlockSize = U16;
}

impl BlockClosure for CbcJob<'_> {
    #[inline(always)]
    fn call<B: BlockBackend<BlockSize = U16>>(mut self, backend: &mut B) {
        let k = self.offsets.len();
        let most = self.nblocks[..k].iter().copied().max().unwrap_or(0);
        for r in 0..most {
            for j in 0..k {
                if r < self.nblocks[j] {
                    let at = self.offsets[j] + PREFIX_LEN + r * BLOCK_LEN;
                    let mut x = self.chain[j];
                    for (c, p) in x.iter_mut().zip(&self.buf[at..at + BLOCK_LEN]) {
                        *c ^= p;
                    }
                    backend.proc_block((&mut x).into());
                    self.buf[at..at + BLOCK_LEN].copy_from_slice(&x);
                    self.chain[j] = x;
                }
            }
        }
    }
}

/// The keyed state one direction of a CBC suite needs: data cipher, IV cipher, MAC. Built
/// once per key; every per-record operation works on caller buffers and allocates nothing.
#[derive(Clone)]
struct RecordKeys {
    data: Aes,
    iv: Aes,
    mac: TagKey,
    assoc: AssociationId,
}

impl RecordKeys {
    fn new(assoc: AssociationId, keys: &DirectionKeys) -> Self {
        RecordKeys {
            data: Aes::new(keys.suite(), keys.enc()),
            iv: Aes::new(keys.suite(), keys.iv()),
            mac: TagKey::new(keys.mac()),
            assoc,
        }
    }

    /// `IV = AES(iv_key, assoc_id || nonce)`.
    fn iv_for(&self, nonce: u64) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.assoc.to_bytes());
        b[8..].copy_from_slice(&nonce.to_be_bytes());
        self.iv.encrypt_block(&mut b);
        b
    }

    #[cfg(test)]
    fn tag(&self, authenticated: &[u8]) -> [u8; TAG_LEN] {
        self.mac.tag(authenticated)
    }
}

/// The keyed state one direction of an AEAD suite needs: `ring`'s AEAD key and the
/// per-direction IV.
#[derive(Clone)]
struct AeadKeys {
    key: ring::aead::LessSafeKey,
    iv: [u8; AEAD_IV_LEN],
    assoc: AssociationId,
}

impl AeadKeys {
    fn new(assoc: AssociationId, keys: &DirectionKeys) -> Self {
        let alg = match keys.suite() {
            CipherSuite::Aes128Gcm => &ring::aead::AES_128_GCM,
            CipherSuite::ChaCha20Poly1305 => &ring::aead::CHACHA20_POLY1305,
            // Invariant: `SuiteKeys::new` builds AEAD keys for AEAD suites only.
            CipherSuite::Aes128CbcHmacSha256 | CipherSuite::Aes256CbcHmacSha256 => {
                unreachable!("AEAD keys are built for AEAD suites only")
            }
        };
        // Invariant: DirectionKeys guarantees the key length matches the suite (16 / 32),
        // the one thing `UnboundKey::new` checks.
        let key = ring::aead::UnboundKey::new(alg, keys.enc()).expect("key length by construction");
        let mut iv = [0u8; AEAD_IV_LEN];
        iv.copy_from_slice(keys.iv());
        AeadKeys {
            key: ring::aead::LessSafeKey::new(key),
            iv,
            assoc,
        }
    }

    /// The AEAD nonce: the IV XOR the record nonce, big-endian, left-padded to 12 bytes
    /// (as TLS 1.3, RFC 8446 §5.3, and DTLS 1.3 build it).
    fn nonce_for(&self, nonce: u64) -> ring::aead::Nonce {
        let mut n = self.iv;
        for (b, x) in n[AEAD_IV_LEN - 8..].iter_mut().zip(nonce.to_be_bytes()) {
            *b ^= x;
        }
        ring::aead::Nonce::assume_unique_for_key(n)
    }

    /// Encrypts `record[PREFIX_LEN..len - TAG_LEN]` in place with the prefix as AAD and
    /// writes the tag; the prefix is already written.
    fn seal(&self, nonce: u64, record: &mut [u8]) {
        let split = record.len() - TAG_LEN;
        let (aad, rest) = record.split_at_mut(PREFIX_LEN);
        let (body, tag_out) = rest.split_at_mut(split - PREFIX_LEN);
        // Invariant: ring refuses only inputs longer than the AEAD's limit (2^36 bytes for
        // GCM, 2^38 for ChaCha20), far above a record's 65 455 bytes.
        let tag = self
            .key
            .seal_in_place_separate_tag(self.nonce_for(nonce), ring::aead::Aad::from(&*aad), body)
            .expect("a record is far below the AEAD input limit");
        tag_out.copy_from_slice(tag.as_ref());
    }

    /// Verifies and decrypts a record in place; the plaintext is `record[PREFIX_LEN..]`
    /// minus the tag. On a bad tag nothing is released (ring leaves the buffer unspecified;
    /// the caller drops it).
    fn open<'a>(&self, nonce: u64, record: &'a mut [u8]) -> Result<&'a mut [u8], OpenError> {
        let (aad, body) = record.split_at_mut(PREFIX_LEN);
        self.key
            .open_in_place(self.nonce_for(nonce), ring::aead::Aad::from(&*aad), body)
            .map_err(|_| OpenError::BadMac)
    }
}

/// A direction's keys, by suite family.
// One per direction, built once per key: inline (not boxed) so the CBC hot path chases no
// extra pointer for the ~500 bytes the variants differ by.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum SuiteKeys {
    Cbc(RecordKeys),
    Aead(AeadKeys),
}

impl SuiteKeys {
    fn new(assoc: AssociationId, keys: &DirectionKeys) -> Self {
        if keys.suite().is_aead() {
            SuiteKeys::Aead(AeadKeys::new(assoc, keys))
        } else {
            SuiteKeys::Cbc(RecordKeys::new(assoc, keys))
        }
    }

    fn assoc(&self) -> AssociationId {
        match self {
            SuiteKeys::Cbc(k) => k.assoc,
            SuiteKeys::Aead(k) => k.assoc,
        }
    }
}

/// The CBC tests reach the CBC keys as before (`s.keys.iv_for`, `s.keys.data`); a test
/// doing so with AEAD keys is a broken test.
#[cfg(test)]
impl std::ops::Deref for SuiteKeys {
    type Target = RecordKeys;
    fn deref(&self) -> &RecordKeys {
        match self {
            SuiteKeys::Cbc(k) => k,
            SuiteKeys::Aead(_) => panic!("a CBC test used AEAD keys"),
        }
    }
}

/// Seals plaintexts into records for one association and direction.
///
/// The sealer takes the nonce as an argument; [`crate::proto::SendSession`] owns the counter.
/// So that no library user can seal two records under one nonce, a sealer is built only
/// inside the crate (by the send session) and is not `Clone`.
pub struct Sealer {
    keys: SuiteKeys,
    suite: CipherSuite,
}

impl Sealer {
    /// A sealer with `keys` for association `assoc`. Crate-private (the send session
    /// builds one per key); public only with the crate's test doors, for the benches.
    #[cfg(not(feature = "test-doors"))]
    pub(crate) fn new(assoc: AssociationId, keys: &DirectionKeys) -> Self {
        Self::with_keys(assoc, keys)
    }

    /// A sealer with `keys` for association `assoc` (the benches' door: feature
    /// `test-doors`, never enabled for library users).
    #[cfg(feature = "test-doors")]
    pub fn new(assoc: AssociationId, keys: &DirectionKeys) -> Self {
        Self::with_keys(assoc, keys)
    }

    fn with_keys(assoc: AssociationId, keys: &DirectionKeys) -> Self {
        Sealer {
            keys: SuiteKeys::new(assoc, keys),
            suite: keys.suite(),
        }
    }

    /// The association id written into records.
    pub fn assoc(&self) -> AssociationId {
        self.keys.assoc()
    }

    /// The suite these records are sealed with.
    pub fn suite(&self) -> CipherSuite {
        self.suite
    }

    /// Seals the plaintext that the caller already placed at
    /// `buf[PREFIX_LEN .. PREFIX_LEN + plaintext_len]`, writing header, padding (CBC suites)
    /// and tag around it. Returns the record length; the record is `buf[..len]`.
    pub fn seal_in_place(
        &self,
        nonce: u64,
        buf: &mut [u8],
        plaintext_len: usize,
    ) -> Result<usize, SealError> {
        let len = self.check(nonce, buf.len(), plaintext_len)?;
        match &self.keys {
            SuiteKeys::Cbc(k) => {
                let iv = Self::prepare(k, nonce, buf, plaintext_len);
                Self::encrypt_and_tag(k, buf, &[0], &[len], &[iv]);
            }
            SuiteKeys::Aead(k) => {
                write_prefix(buf, k.assoc, nonce, len);
                k.seal(nonce, &mut buf[..len]);
            }
        }
        Ok(len)
    }

    /// Checks one record of a batch; returns its length.
    fn check(&self, nonce: u64, buf_len: usize, plaintext_len: usize) -> Result<usize, SealError> {
        if plaintext_len > MAX_PLAINTEXT {
            return Err(SealError::TooLarge {
                len: plaintext_len,
                max: MAX_PLAINTEXT,
            });
        }
        if nonce >= MAX_RECORDS_PER_KEY {
            return Err(SealError::KeyExhausted {
                limit: MAX_RECORDS_PER_KEY,
            });
        }
        let len = self.suite.record_len(plaintext_len);
        if buf_len < len {
            return Err(SealError::BufferTooSmall {
                have: buf_len,
                need: len,
            });
        }
        Ok(len)
    }

    /// Writes padding and the cleartext fields of a CBC record; returns the IV.
    fn prepare(k: &RecordKeys, nonce: u64, buf: &mut [u8], plaintext_len: usize) -> [u8; 16] {
        let len = record_len(plaintext_len);
        let ct_len = len - PREFIX_LEN - TAG_LEN;
        let pad = (ct_len - plaintext_len) as u8;
        buf[PREFIX_LEN + plaintext_len..PREFIX_LEN + ct_len].fill(pad);
        write_prefix(buf, k.assoc, nonce, len);
        k.iv_for(nonce)
    }

    /// Seals several records at once, with nonces `first_nonce`, `first_nonce + 1`, ...:
    /// record `i` starts at `buf[offsets[i]..]` with its plaintext of `plaintext_lens[i]`
    /// bytes already at `PREFIX_LEN` from there, and room up to the next offset (or the
    /// end of `buf`) for the whole record. Writes each record's length to `lens[i]`.
    ///
    /// The bytes are exactly those of sealing each record in turn with
    /// [`seal_in_place`](Self::seal_in_place). What differs is speed: CBC encryption is
    /// serial within a record, so the CBC chains of up to [`INTERLEAVE`] records advance
    /// together and the AES unit pipelines their independent blocks (an AEAD suite seals
    /// one record after the other: its cipher is parallel within a record). Nothing is
    /// written when any record fails its checks.
    pub fn seal_many_in_place(
        &self,
        first_nonce: u64,
        buf: &mut [u8],
        offsets: &[usize],
        plaintext_lens: &[usize],
        lens: &mut [usize],
    ) -> Result<(), SealError> {
        let n = offsets.len();
        assert!(
            plaintext_lens.len() == n && lens.len() >= n,
            "one length per record"
        );
        for i in 0..n {
            let end = offsets.get(i + 1).copied().unwrap_or(buf.len());
            assert!(offsets[i] <= end && end <= buf.len(), "offsets ascend within buf");
            let nonce = first_nonce.saturating_add(i as u64);
            lens[i] = self.check(nonce, end - offsets[i], plaintext_lens[i])?;
        }
        let keys = match &self.keys {
            SuiteKeys::Cbc(k) => k,
            SuiteKeys::Aead(k) => {
                for i in 0..n {
                    let nonce = first_nonce + i as u64;
                    let record = &mut buf[offsets[i]..offsets[i] + lens[i]];
                    write_prefix(record, k.assoc, nonce, lens[i]);
                    k.seal(nonce, record);
                }
                return Ok(());
            }
        };
        let mut ivs = [[0u8; 16]; INTERLEAVE];
        for group in (0..n).step_by(INTERLEAVE) {
            let k = INTERLEAVE.min(n - group);
            for (j, iv) in ivs[..k].iter_mut().enumerate() {
                let i = group + j;
                *iv = Self::prepare(
                    keys,
                    first_nonce + i as u64,
                    &mut buf[offsets[i]..],
                    plaintext_lens[i],
                );
            }
            Self::encrypt_and_tag(
                keys,
                buf,
                &offsets[group..group + k],
                &lens[group..group + k],
                &ivs[..k],
            );
        }
        Ok(())
    }

    /// CBC-encrypts, then tags, up to [`INTERLEAVE`] prepared records (`lens` are whole
    /// record lengths, `ivs` their IVs); see [`CbcJob`].
    fn encrypt_and_tag(
        keys: &RecordKeys,
        buf: &mut [u8],
        offsets: &[usize],
        lens: &[usize],
        ivs: &[[u8; 16]],
    ) {
        let k = offsets.len();
        debug_assert!(k <= INTERLEAVE && lens.len() == k && ivs.len() == k);
        let mut job = CbcJob {
            buf: &mut *buf,
            offsets,
            nblocks: [0; INTERLEAVE],
            chain: [Block::default(); INTERLEAVE],
        };
        for j in 0..k {
            job.chain[j] = Block::from(ivs[j]);
            job.nblocks[j] = (lens[j] - PREFIX_LEN - TAG_LEN) / BLOCK_LEN;
        }
        keys.data.encrypt_with(job);
        // Equal-length records (a train) are tagged in lockstep (see `proto::tag`).
        let mut tags = [[0u8; TAG_LEN]; INTERLEAVE];
        {
            let mut msgs: [&[u8]; INTERLEAVE] = [&[]; INTERLEAVE];
            for j in 0..k {
                msgs[j] = &buf[offsets[j]..offsets[j] + lens[j] - TAG_LEN];
            }
            keys.mac.tag_many(&msgs[..k], &mut tags[..k]);
        }
        for j in 0..k {
            let end = offsets[j] + lens[j];
            buf[end - TAG_LEN..end].copy_from_slice(&tags[j]);
        }
    }

    /// Seals `plaintext` into `out`; returns the record length.
    pub fn seal(&self, nonce: u64, plaintext: &[u8], out: &mut [u8]) -> Result<usize, SealError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(SealError::TooLarge {
                len: plaintext.len(),
                max: MAX_PLAINTEXT,
            });
        }
        let need = self.suite.record_len(plaintext.len());
        if out.len() < need {
            return Err(SealError::BufferTooSmall {
                have: out.len(),
                need,
            });
        }
        out[PREFIX_LEN..PREFIX_LEN + plaintext.len()].copy_from_slice(plaintext);
        self.seal_in_place(nonce, out, plaintext.len())
    }
}

/// Verifies and decrypts records of one association and direction.
///
/// The opener is stateless; [`crate::proto::RecvSession`] adds the replay window around it.
#[derive(Clone)]
pub struct Opener {
    keys: SuiteKeys,
    suite: CipherSuite,
}

impl Opener {
    /// An opener with `keys` for association `assoc`.
    pub fn new(assoc: AssociationId, keys: &DirectionKeys) -> Self {
        Opener {
            keys: SuiteKeys::new(assoc, keys),
            suite: keys.suite(),
        }
    }

    /// The association id this opener accepts.
    pub fn assoc(&self) -> AssociationId {
        self.keys.assoc()
    }

    /// The suite of the records this opener opens.
    pub fn suite(&self) -> CipherSuite {
        self.suite
    }

    /// Parses the header and checks that the record belongs to this association: the
    /// suite's shape ([`parse_header`] for a CBC suite, [`parse_any_header`] for an AEAD
    /// suite, whose ciphertext has any length), the association id, the nonce limit.
    pub fn check_header(&self, datagram: &[u8]) -> Result<RecordHeader, OpenError> {
        let h = if self.suite.is_aead() {
            parse_any_header(datagram)?
        } else {
            parse_header(datagram)?
        };
        let assoc = self.keys.assoc();
        if h.assoc != assoc {
            return Err(OpenError::WrongAssociation {
                found: h.assoc.0,
                expected: assoc.0,
            });
        }
        if h.nonce >= MAX_RECORDS_PER_KEY {
            return Err(OpenError::NonceLimit { nonce: h.nonce });
        }
        Ok(h)
    }

    /// Checks the tag in constant time. `datagram` must have passed
    /// [`check_header`](Self::check_header).
    ///
    /// An AEAD checks its tag only while decrypting, so for an AEAD suite this decrypts a
    /// copy (an allocation and a decryption): the session's receive path does not call it
    /// for AEAD records, it opens them in one pass ([`decrypt_in_place`](Self::decrypt_in_place)).
    pub fn verify(&self, datagram: &[u8]) -> Result<(), OpenError> {
        match &self.keys {
            SuiteKeys::Cbc(k) => {
                let split = datagram.len() - TAG_LEN;
                if k.mac.verify(&datagram[..split], &datagram[split..]) {
                    Ok(())
                } else {
                    Err(OpenError::BadMac)
                }
            }
            SuiteKeys::Aead(k) => {
                let nonce = u64::from_be_bytes(read8(&datagram[NONCE_OFFSET..]));
                let mut copy = datagram.to_vec();
                k.open(nonce, &mut copy).map(|_| ())
            }
        }
    }

    /// Checks the tags of several records (each already through
    /// [`check_header`](Self::check_header)) at once: `ok[i]` says whether record `i`'s tag
    /// verifies. Records of equal length are hashed in lockstep, so a train costs well under
    /// one [`verify`](Self::verify) per record. Every comparison is constant-time and every
    /// record is checked (no early exit).
    ///
    /// For an AEAD suite each record is decrypted in a scratch copy ([`verify`](Self::verify)):
    /// correct, but no faster than opening; the session skips it for AEAD trains
    /// ([`crate::proto::RecvSession::verify_run`]).
    pub fn verify_many(&self, datagrams: &[&[u8]], ok: &mut [bool]) {
        assert!(ok.len() >= datagrams.len(), "one verdict per record");
        let keys = match &self.keys {
            SuiteKeys::Cbc(k) => k,
            SuiteKeys::Aead(_) => {
                for (d, ok) in datagrams.iter().zip(ok.iter_mut()) {
                    *ok = d.len() >= MIN_AEAD_RECORD && self.verify(d).is_ok();
                }
                return;
            }
        };
        for (datagrams, ok) in datagrams.chunks(INTERLEAVE).zip(ok.chunks_mut(INTERLEAVE)) {
            let mut msgs: [&[u8]; INTERLEAVE] = [&[]; INTERLEAVE];
            for (m, d) in msgs.iter_mut().zip(datagrams) {
                *m = &d[..d.len().saturating_sub(TAG_LEN)];
            }
            let mut tags = [[0u8; TAG_LEN]; INTERLEAVE];
            let n = datagrams.len();
            keys.mac.tag_many(&msgs[..n], &mut tags[..n]);
            for i in 0..n {
                let d = datagrams[i];
                ok[i] = d.len() >= MIN_RECORD && bool::from(tags[i].ct_eq(&d[d.len() - TAG_LEN..]));
            }
        }
    }

    /// Decrypts a verified record in place and strips the padding; returns the plaintext,
    /// which lies at `datagram[PREFIX_LEN..]`.
    ///
    /// For an AEAD suite this is the AEAD's open: it verifies the tag as it decrypts and
    /// returns [`OpenError::BadMac`], releasing nothing, when the tag does not verify.
    pub fn decrypt_in_place<'a>(
        &self,
        h: &RecordHeader,
        datagram: &'a mut [u8],
    ) -> Result<&'a mut [u8], OpenError> {
        let keys = match &self.keys {
            SuiteKeys::Cbc(k) => k,
            SuiteKeys::Aead(k) => return k.open(h.nonce, datagram),
        };
        let iv = keys.iv_for(h.nonce);
        let ct = &mut datagram[PREFIX_LEN..PREFIX_LEN + h.ciphertext_len];
        keys.data.cbc_decrypt(&iv, ct);
        // Padding is authenticated (the tag covered the ciphertext), so checking it cannot
        // act as a padding oracle; a bad pad only means a broken sender.
        let pad = ct[ct.len() - 1] as usize;
        if pad == 0 || pad > BLOCK_LEN || ct[ct.len() - pad..].iter().any(|&b| b as usize != pad) {
            return Err(OpenError::BadPadding);
        }
        let n = ct.len() - pad;
        Ok(&mut ct[..n])
    }

    /// Header check, tag check and decryption without replay protection (for tests,
    /// vectors and tools). Returns the nonce and the plaintext.
    pub fn open_in_place<'a>(&self, datagram: &'a mut [u8]) -> Result<(u64, &'a mut [u8]), OpenError> {
        let h = self.check_header(datagram)?;
        if !self.suite.is_aead() {
            // An AEAD verifies in `decrypt_in_place`, in the same pass.
            self.verify(datagram)?;
        }
        let pt = self.decrypt_in_place(&h, datagram)?;
        Ok((h.nonce, pt))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn largest_record_is_the_one_protocol_md_gives() {
        assert_eq!(MAX_RECORD, 65_493);
        assert_eq!(MAX_RECORD - HEADER_LEN, 0xFFD0);
        assert!(MAX_RECORD <= MAX_DATAGRAM && record_len(MAX_PLAINTEXT + 1) > MAX_DATAGRAM);
    }

    use super::*;
    use proptest::prelude::*;

    fn keys(suite: CipherSuite) -> DirectionKeys {
        let n = suite.enc_key_len();
        let e: Vec<u8> = (0..n as u8).collect();
        let m: Vec<u8> = (100..100 + suite.mac_key_len() as u8).collect();
        let i: Vec<u8> = (200..200 + suite.iv_len() as u8).collect();
        DirectionKeys::new(suite, &e, &m, &i).unwrap()
    }

    fn pair(suite: CipherSuite) -> (Sealer, Opener) {
        let k = keys(suite);
        let a = AssociationId(0x1122334455667788);
        (Sealer::new(a, &k), Opener::new(a, &k))
    }

    #[test]
    fn limits_are_consistent() {
        assert_eq!(MIN_RECORD, 53);
        assert_eq!(MAX_CIPHERTEXT, 65_456);
        assert_eq!(MAX_PLAINTEXT, 65_455);
        assert!(record_len(MAX_PLAINTEXT) <= MAX_DATAGRAM);
        assert!(record_len(MAX_PLAINTEXT + 1) > MAX_DATAGRAM);
    }

    #[test]
    fn round_trip_and_overhead() {
        for suite in CipherSuite::ALL {
            let (s, o) = pair(suite);
            let mut buf = vec![0u8; MAX_DATAGRAM];
            for len in [0usize, 1, 15, 16, 17, 200, 1200] {
                let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let n = s.seal(7, &pt, &mut buf).unwrap();
                assert_eq!(n, suite.record_len(len));
                assert_eq!(buf[0], 0x97);
                let (nonce, back) = o.open_in_place(&mut buf[..n]).unwrap();
                assert_eq!(nonce, 7);
                assert_eq!(back, &pt[..]);
            }
        }
    }

    #[test]
    fn largest_plaintext_fits_and_one_more_is_refused() {
        let (s, o) = pair(CipherSuite::Aes128CbcHmacSha256);
        let mut buf = vec![0u8; MAX_DATAGRAM + 64];
        let pt = vec![0x5a; MAX_PLAINTEXT];
        let n = s.seal(0, &pt, &mut buf).unwrap();
        assert_eq!(n, 65_493);
        assert_eq!(o.open_in_place(&mut buf[..n]).unwrap().1.len(), MAX_PLAINTEXT);
        let pt = vec![0; MAX_PLAINTEXT + 1];
        assert_eq!(
            s.seal(0, &pt, &mut buf),
            Err(SealError::TooLarge {
                len: MAX_PLAINTEXT + 1,
                max: MAX_PLAINTEXT
            })
        );
    }

    #[test]
    fn verify_many_takes_any_number_of_records() {
        let (s, o) = pair(CipherSuite::Aes128CbcHmacSha256);
        let mut recs: Vec<Vec<u8>> = (0..11u64)
            .map(|n| {
                let mut b = vec![0u8; 200];
                let len = s.seal(n, &[n as u8; 100], &mut b).unwrap();
                b.truncate(len);
                b
            })
            .collect();
        recs[9][30] ^= 1;
        recs.push(vec![0x97; 20]); // too short to be a record
        recs.push(vec![1; 5]); // shorter than a tag
        let views: Vec<&[u8]> = recs.iter().map(|r| &r[..]).collect();
        let mut ok = vec![true; views.len()];
        o.verify_many(&views, &mut ok);
        let want: Vec<bool> = (0..13).map(|i| i < 11 && i != 9).collect();
        assert_eq!(ok, want);
    }

    #[test]
    fn seal_many_checks_everything_before_writing() {
        let (s, _) = pair(CipherSuite::Aes128CbcHmacSha256);
        let mut buf = vec![0u8; 256];
        let before = buf.clone();
        let mut lens = [0usize; 2];
        // The second record crosses the key limit: nothing is sealed.
        assert_eq!(
            s.seal_many_in_place(MAX_RECORDS_PER_KEY - 1, &mut buf, &[0, 128], &[5, 5], &mut lens),
            Err(SealError::KeyExhausted {
                limit: MAX_RECORDS_PER_KEY
            })
        );
        assert_eq!(buf, before);
        // No room for the second record.
        assert!(matches!(
            s.seal_many_in_place(0, &mut buf, &[0, 230], &[5, 5], &mut lens),
            Err(SealError::BufferTooSmall { .. })
        ));
        assert_eq!(buf, before);
    }

    #[test]
    fn key_limit_refuses_to_seal() {
        let (s, _) = pair(CipherSuite::Aes128CbcHmacSha256);
        let mut buf = [0u8; 128];
        assert!(s.seal(MAX_RECORDS_PER_KEY - 1, b"x", &mut buf).is_ok());
        assert_eq!(
            s.seal(MAX_RECORDS_PER_KEY, b"x", &mut buf),
            Err(SealError::KeyExhausted {
                limit: MAX_RECORDS_PER_KEY
            })
        );
    }

    #[test]
    fn ivs_differ_per_nonce_and_are_not_counters() {
        let (s, _) = pair(CipherSuite::Aes128CbcHmacSha256);
        let a = s.keys.iv_for(1);
        let b = s.keys.iv_for(2);
        assert_ne!(a, b);
        // Not a counter and not XOR of the nonce into a fixed value.
        let x: Vec<u8> = a.iter().zip(b.iter()).map(|(p, q)| p ^ q).collect();
        assert!(x.iter().filter(|&&v| v != 0).count() > 4);
    }

    #[test]
    fn same_plaintext_different_nonce_different_ciphertext() {
        let (s, _) = pair(CipherSuite::Aes128CbcHmacSha256);
        let mut a = [0u8; 128];
        let mut b = [0u8; 128];
        let n = s.seal(1, b"hello", &mut a).unwrap();
        s.seal(2, b"hello", &mut b).unwrap();
        assert_ne!(a[PREFIX_LEN..n], b[PREFIX_LEN..n]);
    }

    #[test]
    fn wrong_keys_or_association_fail() {
        let (s, _) = pair(CipherSuite::Aes128CbcHmacSha256);
        let mut buf = [0u8; 128];
        let n = s.seal(1, b"hello", &mut buf).unwrap();
        let other =
            DirectionKeys::new(CipherSuite::Aes128CbcHmacSha256, &[1; 16], &[2; 32], &[3; 16]).unwrap();
        let o = Opener::new(s.assoc(), &other);
        assert_eq!(o.open_in_place(&mut { buf }[..n]).unwrap_err(), OpenError::BadMac);
        let o = Opener::new(AssociationId(1), &keys(CipherSuite::Aes128CbcHmacSha256));
        assert!(matches!(
            o.open_in_place(&mut buf[..n]),
            Err(OpenError::WrongAssociation { .. })
        ));
    }

    #[test]
    fn authenticated_bad_padding_is_reported() {
        // Build a record whose padding is wrong but whose tag is right, as a buggy
        // sender would: encrypt blocks by hand and tag them.
        let (s, o) = pair(CipherSuite::Aes128CbcHmacSha256);
        let mut buf = [0u8; MIN_RECORD];
        s.seal(3, &[0u8; 15], &mut buf).unwrap();
        let iv = s.keys.iv_for(3);
        let mut block = [0u8; 16];
        block[15] = 0; // pad byte 0 is invalid
        buf[PREFIX_LEN..PREFIX_LEN + 16].copy_from_slice(&block);
        s.keys
            .data
            .cbc_encrypt(&iv, &mut buf[PREFIX_LEN..PREFIX_LEN + 16]);
        let tag = s.keys.tag(&buf[..PREFIX_LEN + 16]);
        buf[PREFIX_LEN + 16..].copy_from_slice(&tag);
        assert_eq!(o.open_in_place(&mut buf).unwrap_err(), OpenError::BadPadding);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn seal_open_round_trip(len in 0usize..4096, nonce in 0u64..MAX_RECORDS_PER_KEY, big in any::<bool>()) {
            let suite = if big { CipherSuite::Aes256CbcHmacSha256 } else { CipherSuite::Aes128CbcHmacSha256 };
            let (s, o) = pair(suite);
            let pt: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut buf = vec![0u8; record_len(len)];
            let n = s.seal(nonce, &pt, &mut buf).unwrap();
            prop_assert_eq!(n, buf.len());
            let (got_nonce, back) = o.open_in_place(&mut buf).unwrap();
            prop_assert_eq!(got_nonce, nonce);
            prop_assert_eq!(&back[..], &pt[..]);
        }

        /// Interleaved sealing gives exactly the bytes of sealing one record at a time.
        #[test]
        fn seal_many_equals_sealing_one_by_one(
            sizes in prop::collection::vec(0usize..700, 1..20),
            first in 0u64..1000,
            big in any::<bool>(),
        ) {
            let suite = if big { CipherSuite::Aes256CbcHmacSha256 } else { CipherSuite::Aes128CbcHmacSha256 };
            let (s, o) = pair(suite);
            let mut offsets = Vec::new();
            let mut total = 0;
            for &n in &sizes {
                offsets.push(total);
                total += record_len(n) + 5; // a little slack between records
            }
            let mut many = vec![0u8; total];
            for (i, &n) in sizes.iter().enumerate() {
                for k in 0..n {
                    many[offsets[i] + PREFIX_LEN + k] = (i * 31 + k) as u8;
                }
            }
            let mut one = many.clone();
            let mut lens = vec![0usize; sizes.len()];
            s.seal_many_in_place(first, &mut many, &offsets, &sizes, &mut lens).unwrap();
            for (i, &n) in sizes.iter().enumerate() {
                let len = s.seal_in_place(first + i as u64, &mut one[offsets[i]..], n).unwrap();
                prop_assert_eq!(lens[i], len);
                prop_assert_eq!(&many[offsets[i]..offsets[i] + len], &one[offsets[i]..offsets[i] + len]);
                let (nonce, pt) = o.open_in_place(&mut many[offsets[i]..offsets[i] + len]).unwrap();
                prop_assert_eq!(nonce, first + i as u64);
                prop_assert_eq!(pt.len(), n);
            }
        }
    }

    const AEADS: [CipherSuite; 2] = [CipherSuite::Aes128Gcm, CipherSuite::ChaCha20Poly1305];

    /// The AEAD record, built by hand from the layout of PROTOCOL.md §4.7 with ring's AEAD
    /// called directly: prefix as AAD, IV XOR the left-padded nonce, ciphertext as long as
    /// the plaintext, tag last.
    fn aead_by_hand(suite: CipherSuite, assoc: AssociationId, nonce: u64, pt: &[u8]) -> Vec<u8> {
        let k = keys(suite);
        let alg = if suite == CipherSuite::Aes128Gcm {
            &ring::aead::AES_128_GCM
        } else {
            &ring::aead::CHACHA20_POLY1305
        };
        let key = ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(alg, k.enc()).unwrap());
        let mut n = [0u8; 12];
        n.copy_from_slice(k.iv());
        for (i, b) in nonce.to_be_bytes().iter().enumerate() {
            n[4 + i] ^= b;
        }
        let mut r = vec![0x97, 3, 3];
        r.extend_from_slice(&((8 + 8 + pt.len() + 16) as u16).to_be_bytes());
        r.extend_from_slice(&assoc.0.to_be_bytes());
        r.extend_from_slice(&nonce.to_be_bytes());
        let mut body = pt.to_vec();
        let tag = key
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(n),
                ring::aead::Aad::from(&r[..]),
                &mut body,
            )
            .unwrap();
        r.extend_from_slice(&body);
        r.extend_from_slice(tag.as_ref());
        r
    }

    #[test]
    fn aead_records_follow_the_layout_and_open() {
        for suite in AEADS {
            let (s, o) = pair(suite);
            let mut buf = vec![0u8; MAX_DATAGRAM];
            for (len, nonce) in [
                (0usize, 0u64),
                (1, 1),
                (15, 0x0102_0304_0506),
                (16, 7),
                (200, 9),
                (1200, (1 << 48) - 1),
            ] {
                let pt: Vec<u8> = (0..len).map(|i| (i * 3) as u8).collect();
                let n = s.seal(nonce, &pt, &mut buf).unwrap();
                assert_eq!(n, PREFIX_LEN + len + TAG_LEN);
                assert_eq!(n, suite.record_len(len));
                assert_eq!(
                    buf[..n],
                    aead_by_hand(suite, s.assoc(), nonce, &pt)[..],
                    "{suite} {len}"
                );
                let (got, back) = o.open_in_place(&mut buf[..n]).unwrap();
                assert_eq!((got, &back[..]), (nonce, &pt[..]));
            }
            // The largest plaintext makes a 65 492-byte record, one more is refused.
            let pt = vec![1u8; MAX_PLAINTEXT];
            assert_eq!(s.seal(0, &pt, &mut buf).unwrap(), MAX_RECORD - 1);
            assert!(matches!(
                s.seal(0, &vec![0u8; MAX_PLAINTEXT + 1], &mut buf),
                Err(SealError::TooLarge { .. })
            ));
            // The AEAD keys are not the CBC keys: a CBC opener of the same bytes refuses.
            assert!(matches!(
                s.seal_in_place(MAX_RECORDS_PER_KEY, &mut buf, 3),
                Err(SealError::KeyExhausted { .. })
            ));
        }
    }

    #[test]
    fn aead_every_byte_is_authenticated() {
        for suite in AEADS {
            let (s, o) = pair(suite);
            let mut rec = vec![0u8; 64];
            let n = s.seal(5, b"0123456789", &mut rec).unwrap();
            rec.truncate(n);
            for i in 0..n {
                let mut d = rec.clone();
                d[i] ^= 0x01;
                let e = o.open_in_place(&mut d).unwrap_err();
                let want = match i {
                    0..=2 => "bad_header",
                    3..=4 => "length_mismatch",
                    5..=12 => "unknown_association", // WrongAssociation's drop reason
                    13..=14 => "nonce_limit",
                    _ => "bad_mac",
                };
                assert_eq!(e.reason().name(), want, "{suite} byte {i}");
                assert!(o.verify(&d).is_err() || i < 13);
            }
            // Truncated (length field fixed up): the tag no longer verifies; below 37 bytes
            // the record is `truncated`.
            let mut d = rec[..n - 1].to_vec();
            let f = (d.len() - HEADER_LEN) as u16;
            d[3..5].copy_from_slice(&f.to_be_bytes());
            assert_eq!(o.open_in_place(&mut d).unwrap_err(), OpenError::BadMac);
            let mut d = rec[..MIN_AEAD_RECORD - 1].to_vec();
            assert!(matches!(
                o.open_in_place(&mut d),
                Err(OpenError::Truncated { min: 37, .. })
            ));
            // Another association's opener with the same keys refuses by id before any crypto.
            let other = Opener::new(AssociationId(1), &keys(suite));
            assert!(matches!(
                other.open_in_place(&mut rec.clone()),
                Err(OpenError::WrongAssociation { .. })
            ));
            // The same bytes under the other direction's keys (other IV) fail the tag.
            let mut k = keys(suite);
            k = DirectionKeys::new(suite, k.enc(), &[], &[9u8; 12]).unwrap();
            let o2 = Opener::new(s.assoc(), &k);
            assert_eq!(o2.open_in_place(&mut rec.clone()).unwrap_err(), OpenError::BadMac);
        }
    }

    #[test]
    fn aead_nonce_changes_ciphertext_and_limit_is_enforced() {
        for suite in AEADS {
            let (s, o) = pair(suite);
            let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
            let n = s.seal(1, b"hello", &mut a).unwrap();
            s.seal(2, b"hello", &mut b).unwrap();
            assert_ne!(a[PREFIX_LEN..n], b[PREFIX_LEN..n]);
            // A nonce at the limit is refused before the tag, as for CBC.
            a[NONCE_OFFSET] = 0x01;
            assert!(matches!(
                o.open_in_place(&mut a[..n]),
                Err(OpenError::NonceLimit { .. })
            ));
        }
    }

    #[test]
    fn aead_train_paths_equal_single_paths() {
        for suite in AEADS {
            let (s, o) = pair(suite);
            let sizes = [0usize, 7, 100, 100, 100, 1200, 33, 16, 17, 5, 64];
            let mut offsets = Vec::new();
            let mut total = 0;
            for &n in &sizes {
                offsets.push(total);
                total += record_len(n);
            }
            let mut many = vec![0u8; total];
            for (i, &n) in sizes.iter().enumerate() {
                for k in 0..n {
                    many[offsets[i] + PREFIX_LEN + k] = (i + k) as u8;
                }
            }
            let mut one = many.clone();
            let mut lens = vec![0; sizes.len()];
            s.seal_many_in_place(40, &mut many, &offsets, &sizes, &mut lens)
                .unwrap();
            let mut views = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let len = s.seal_in_place(40 + i as u64, &mut one[offsets[i]..], n).unwrap();
                assert_eq!(lens[i], len);
                assert_eq!(len, suite.record_len(n));
                assert_eq!(
                    many[offsets[i]..offsets[i] + len],
                    one[offsets[i]..offsets[i] + len]
                );
                views.push(many[offsets[i]..offsets[i] + len].to_vec());
            }
            views[3][30] ^= 1;
            views.push(vec![0x97; 20]);
            let refs: Vec<&[u8]> = views.iter().map(|v| &v[..]).collect();
            let mut ok = vec![true; refs.len()];
            o.verify_many(&refs, &mut ok);
            let want: Vec<bool> = (0..refs.len()).map(|i| i < sizes.len() && i != 3).collect();
            assert_eq!(ok, want);
            // Nothing is written when one record fails its checks.
            let before = many.clone();
            assert!(matches!(
                s.seal_many_in_place(MAX_RECORDS_PER_KEY - 1, &mut many, &offsets, &sizes, &mut lens),
                Err(SealError::KeyExhausted { .. })
            ));
            assert_eq!(many, before);
        }
    }

    #[test]
    fn header_rules_per_suite() {
        let (s, _) = pair(CipherSuite::Aes128Gcm);
        let (_, cbc) = pair(CipherSuite::Aes128CbcHmacSha256);
        let mut d = [0u8; 64];
        let n = s.seal(3, b"abc", &mut d).unwrap(); // 40 bytes: no CBC record is that long
        let d = &d[..n];
        assert!(parse_any_header(d).is_ok());
        assert!(matches!(parse_header(d), Err(OpenError::Truncated { .. })));
        assert!(matches!(cbc.check_header(d), Err(OpenError::Truncated { .. })));
        assert_eq!(parse_header_with(d, |_| true).unwrap().nonce, 3);
        assert!(matches!(
            parse_header_with(d, |_| false),
            Err(OpenError::Truncated { .. })
        ));
        // A 60-byte AEAD record: CBC's ciphertext-length rule, waived for AEAD associations.
        let mut e = [0u8; 64];
        let n = s.seal(4, &[0; 23], &mut e).unwrap();
        assert!(matches!(
            parse_header(&e[..n]),
            Err(OpenError::BadCiphertextLength { .. })
        ));
        assert_eq!(parse_header_with(&e[..n], |id| id == s.assoc()).unwrap().nonce, 4);
        // Errors of every suite's shape are never waived.
        e[0] = 0x98;
        assert!(matches!(
            parse_header_with(&e[..n], |_| true),
            Err(OpenError::BadHeader { .. })
        ));
        assert!(matches!(
            parse_any_header(&e[..n]),
            Err(OpenError::BadHeader { .. })
        ));
    }

    use crate::proto::detect::{classify, DatagramKind};
    use crate::proto::testing::{assert_reached, counted};

    /// What `parse_header` must accept, from the diagram in the module documentation.
    fn header_model(d: &[u8]) -> bool {
        d.len() >= MIN_RECORD
            && d[..3] == [CONTENT_TYPE, VERSION[0], VERSION[1]]
            && usize::from(u16::from_be_bytes([d[3], d[4]])) == d.len() - HEADER_LEN
            && (d.len() - PREFIX_LEN - TAG_LEN) % BLOCK_LEN == 0
    }

    fn set_length_field(d: &mut [u8]) {
        let field = (d.len() - HEADER_LEN) as u16;
        d[3..5].copy_from_slice(&field.to_be_bytes());
    }

    /// A sealed record with one field changed, each change aimed at one check of `open`:
    /// the record opens only unchanged, and every change gets the error of the check it
    /// targets, in the documented order (length, header, length field, ciphertext length,
    /// association, nonce limit, tag, padding). `parse_header` agrees with its model on
    /// every input, and the detector routes every record-shaped input as secure. Counted:
    /// each of the nine outcomes, so none of those checks goes unexercised.
    #[test]
    fn mutated_records_reach_every_check() {
        let strategy = (
            0usize..300,
            0u64..MAX_RECORDS_PER_KEY,
            0u8..9,
            any::<prop::sample::Index>(),
            1u8..=255,
        );
        let counts = counted(1500, strategy, |(len, nonce, kind, at, x)| {
            let (s, o) = pair(if x & 1 == 0 {
                CipherSuite::Aes128CbcHmacSha256
            } else {
                CipherSuite::Aes256CbcHmacSha256
            });
            let pt: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
            let mut d = vec![0u8; record_len(len)];
            s.seal(nonce, &pt, &mut d).unwrap();
            let expect = match kind {
                0 => None,
                1 => {
                    d.truncate(at.index(MIN_RECORD));
                    Some("truncated")
                }
                2 => {
                    d[at.index(3)] ^= x;
                    Some("bad_header")
                }
                3 => {
                    let field = u16::from_be_bytes([d[3], d[4]]) ^ u16::from(x);
                    d[3..5].copy_from_slice(&field.to_be_bytes());
                    Some("length_mismatch")
                }
                4 => {
                    // Longer or shorter by 1..=15 bytes, length field fixed up.
                    let by = usize::from(x % 15) + 1;
                    if x & 0x80 != 0 || d.len() - by < MIN_RECORD {
                        d.extend(std::iter::repeat_n(x, by))
                    } else {
                        d.truncate(d.len() - by)
                    }
                    set_length_field(&mut d);
                    Some("bad_ciphertext_length")
                }
                5 => {
                    d[ASSOC_OFFSET + at.index(8)] ^= x;
                    Some("wrong_association")
                }
                6 => {
                    d[NONCE_OFFSET + at.index(2)] |= x;
                    Some("nonce_limit")
                }
                7 => {
                    // Any byte the tag covers after the nonce's top bytes, or the tag itself.
                    let from = NONCE_OFFSET + 2;
                    let i = from + at.index(d.len() - from);
                    d[i] ^= x;
                    Some("bad_mac")
                }
                _ => {
                    // Authenticated bad padding, as a broken sender would produce.
                    let n = d.len();
                    let ct = n - PREFIX_LEN - TAG_LEN;
                    let iv = s.keys.iv_for(nonce);
                    let mut plain = d.clone();
                    o.decrypt_in_place(&parse_header(&d).unwrap(), &mut plain)
                        .unwrap();
                    let mut blocks = plain[PREFIX_LEN..PREFIX_LEN + ct].to_vec();
                    let last = blocks.len() - 1;
                    let pad = usize::from(blocks[last]);
                    // Break the pad: its length byte to 0 or 17+, or one of its other bytes.
                    match x % 3 {
                        0 => blocks[last] = 0,
                        1 => blocks[last] = 17 + x % 200,
                        _ if pad > 1 => blocks[last - 1 - at.index(pad - 1)] ^= x,
                        _ => blocks[last] = 0,
                    }
                    s.keys.data.cbc_encrypt(&iv, &mut blocks);
                    d[PREFIX_LEN..PREFIX_LEN + ct].copy_from_slice(&blocks);
                    let tag = s.keys.tag(&d[..n - TAG_LEN]);
                    d[n - TAG_LEN..].copy_from_slice(&tag);
                    Some("bad_padding")
                }
            };
            prop_assert_eq!(parse_header(&d).is_ok(), header_model(&d));
            if d.len() >= HEADER_LEN && d[0] & SECURE_FLAG != 0 {
                prop_assert_eq!(classify(&d), DatagramKind::Secure);
            }
            let mut b = d.clone();
            let got = match o.open_in_place(&mut b) {
                Ok((n, back)) => {
                    prop_assert_eq!((n, &back[..]), (nonce, &pt[..]));
                    "ok"
                }
                Err(OpenError::Truncated { .. }) => "truncated",
                Err(OpenError::BadHeader { .. }) => "bad_header",
                Err(OpenError::LengthMismatch { .. }) => "length_mismatch",
                Err(OpenError::BadCiphertextLength { .. }) => "bad_ciphertext_length",
                Err(OpenError::WrongAssociation { .. }) => "wrong_association",
                Err(OpenError::NonceLimit { .. }) => "nonce_limit",
                Err(OpenError::BadMac) => "bad_mac",
                Err(OpenError::BadPadding) => "bad_padding",
                Err(e) => return Err(TestCaseError::fail(format!("unexpected {e:?}"))),
            };
            prop_assert_eq!(got, expect.unwrap_or("ok"), "kind {}", kind);
            // The train path agrees with the single path on every mutated record.
            let mut ok = [false];
            o.verify_many(&[&d], &mut ok);
            prop_assert_eq!(ok[0], d.len() >= MIN_RECORD && o.verify(&d).is_ok());
            Ok(got)
        });
        let all = [
            "ok",
            "truncated",
            "bad_header",
            "length_mismatch",
            "bad_ciphertext_length",
            "wrong_association",
            "nonce_limit",
            "bad_mac",
            "bad_padding",
        ];
        assert_reached(&counts, &all, 50);
    }

    proptest! {
        /// `parse_header` on arbitrary bytes shaped like a header (a valid prefix, then
        /// anything): accepted iff the model says so, and an accepted header reads back the
        /// bytes it came from.
        #[test]
        fn parse_header_matches_its_model(
            len in 0usize..200,
            field_ok in any::<bool>(),
            prefix in prop::sample::select(vec![0usize, 1, 3, 5]),
            body in prop::collection::vec(any::<u8>(), 200),
        ) {
            let mut d = body[..len].to_vec();
            let head = [CONTENT_TYPE, VERSION[0], VERSION[1]];
            let p = prefix.min(3).min(d.len());
            d[..p].copy_from_slice(&head[..p]);
            if field_ok && d.len() >= HEADER_LEN {
                set_length_field(&mut d);
            }
            let got = parse_header(&d);
            prop_assert_eq!(got.is_ok(), header_model(&d));
            if let Ok(h) = got {
                prop_assert_eq!(h.assoc.to_bytes(), read8(&d[ASSOC_OFFSET..]));
                prop_assert_eq!(h.nonce.to_be_bytes(), read8(&d[NONCE_OFFSET..]));
                prop_assert_eq!(h.ciphertext_len, d.len() - PREFIX_LEN - TAG_LEN);
            }
        }
    }

    #[test]
    fn the_nonce_limit_is_exactly_two_to_the_48() {
        // The last sealable nonce opens; the first one past the key limit is refused at
        // the header, before any tag work, even with a valid tag.
        let (s, o) = pair(CipherSuite::Aes128CbcHmacSha256);
        let mut buf = [0u8; MIN_RECORD];
        s.seal(MAX_RECORDS_PER_KEY - 1, b"x", &mut buf).unwrap();
        assert_eq!(
            o.open_in_place(&mut buf.clone()).unwrap().0,
            MAX_RECORDS_PER_KEY - 1
        );
        buf[NONCE_OFFSET..PREFIX_LEN].copy_from_slice(&MAX_RECORDS_PER_KEY.to_be_bytes());
        let tag = s.keys.tag(&buf[..MIN_RECORD - TAG_LEN]);
        buf[MIN_RECORD - TAG_LEN..].copy_from_slice(&tag);
        assert_eq!(
            o.check_header(&buf),
            Err(OpenError::NonceLimit {
                nonce: MAX_RECORDS_PER_KEY
            })
        );
        assert_eq!(
            o.open_in_place(&mut buf).unwrap_err(),
            OpenError::NonceLimit {
                nonce: MAX_RECORDS_PER_KEY
            }
        );
    }

    #[test]
    #[should_panic(expected = "one length per record")]
    fn seal_many_wants_one_plaintext_length_per_record() {
        let (s, _) = pair(CipherSuite::Aes128CbcHmacSha256);
        let mut buf = vec![0u8; 256];
        let _ = s.seal_many_in_place(0, &mut buf, &[0, 128], &[5], &mut [0; 2]);
    }

    #[test]
    #[should_panic(expected = "one length per record")]
    fn seal_many_wants_room_for_every_length() {
        let (s, _) = pair(CipherSuite::Aes128CbcHmacSha256);
        let mut buf = vec![0u8; 256];
        let _ = s.seal_many_in_place(0, &mut buf, &[0, 128], &[5, 5], &mut [0; 1]);
    }

    #[test]
    #[should_panic(expected = "offsets ascend within buf")]
    fn seal_many_wants_ascending_offsets() {
        let (s, _) = pair(CipherSuite::Aes128CbcHmacSha256);
        let mut buf = vec![0u8; 256];
        let _ = s.seal_many_in_place(0, &mut buf, &[128, 0], &[5, 5], &mut [0; 2]);
    }

    #[test]
    #[should_panic(expected = "offsets ascend within buf")]
    fn seal_many_wants_offsets_inside_the_buffer() {
        let (s, _) = pair(CipherSuite::Aes128CbcHmacSha256);
        let mut buf = vec![0u8; 256];
        let _ = s.seal_many_in_place(0, &mut buf, &[0, 300], &[5, 5], &mut [0; 2]);
    }
}
