//! Read-only TLS 1.3 decryption of one TLS connection seen from the middle (sans-IO).
//!
//! The gateway forwards every byte of a CONNECT tunnel first and hands a copy to a [`Tap`].
//! With the connection's traffic secrets (delegated by the client, `docs/PROTOCOL.md` §2.8)
//! the tap parses the record layer of both directions (RFC 8446 §5), derives each
//! direction's key and IV with HKDF-Expand-Label (§7.1, §7.3), opens the records (AES-128-GCM,
//! AES-256-GCM, ChaCha20-Poly1305 through ring), follows the handshake to its Finished
//! messages and KeyUpdates, and yields the application data. It never produces a byte to
//! send: whatever it decides, the tunnel's bytes are forwarded unchanged by the caller.
//!
//! ```text
//! TLSPlaintext / TLSCiphertext (RFC 8446 §5.1, §5.2)
//! +------+----------------+------------+------------------------------+
//! | TYPE | LEGACY_VERSION | LEN u16 BE | FRAGMENT (LEN <= 2^14 + 256) |
//! +------+----------------+------------+------------------------------+
//! |  1   |       2        |     2      |  plaintext, or AEAD output   |
//! +------+----------------+------------+------------------------------+
//! AEAD: nonce = iv XOR (0^4 || seq u64 BE), AAD = the 5-byte header,
//! plaintext = content || inner TYPE (1) || zero padding
//! ```
//!
//! Before the secrets arrive the tap holds each direction's bytes, at most
//! [`BUFFER_LIMIT`] per direction; beyond that it only counts the records that go by (their
//! sequence numbers and sizes), so that once the secrets come it decrypts what it held,
//! steps over the counted records ([`Tap::take_gap`] says how many plaintext bytes they
//! carried) and decrypts what follows. If the handshake did not fit in what it held, or on
//! any record it cannot open, it turns [`Tap::opaque`] for good and drops what it holds. TLS 1.2 (a ServerHello without
//! `supported_versions` = 0x0304) and 0-RTT early data are not decrypted: the tap says so
//! in its [`Opaque`] reason. Secrets, keys and IVs live in zeroizing buffers (ring's own
//! expanded AES/ChaCha key schedules are ring's: it does not promise to wipe them).

use ring::hkdf::KeyType as _;
use ring::{aead, hkdf};
use zeroize::{Zeroize, Zeroizing};

/// Ciphertext held per direction while the secrets have not arrived.
pub const BUFFER_LIMIT: usize = 1 << 20;
/// Largest TLSCiphertext fragment (RFC 8446 §5.2).
pub const MAX_FRAGMENT: usize = (1 << 14) + 256;
/// Largest inner handshake message the tap reassembles (certificate chains included).
pub const MAX_HANDSHAKE: usize = 64 * 1024;

const CONTENT_CCS: u8 = 20;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPDATA: u8 = 23;

const HS_CLIENT_HELLO: u8 = 1;
const HS_SERVER_HELLO: u8 = 2;
const HS_FINISHED: u8 = 20;
const HS_KEY_UPDATE: u8 = 24;

/// SHA-256("HelloRetryRequest"): the ServerHello random of a HelloRetryRequest (§4.1.3).
const HRR_RANDOM: [u8; 32] = [
    0xCF, 0x21, 0xAD, 0x74, 0xE5, 0x9A, 0x61, 0x11, 0xBE, 0x1D, 0x8C, 0x02, 0x1E, 0x65, 0xB8, 0x91, 0xC2,
    0xA2, 0x11, 0x16, 0x7A, 0xBB, 0x8C, 0x5E, 0x07, 0x9E, 0x09, 0xE2, 0xC8, 0xA8, 0x33, 0x9C,
];

/// A TLS 1.3 cipher suite the tap decrypts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// TLS_AES_128_GCM_SHA256 (0x1301).
    Aes128GcmSha256,
    /// TLS_AES_256_GCM_SHA384 (0x1302).
    Aes256GcmSha384,
    /// TLS_CHACHA20_POLY1305_SHA256 (0x1303).
    Chacha20Poly1305Sha256,
}

impl Suite {
    /// The suite of an IANA id, if the tap knows it.
    pub fn from_id(id: u16) -> Option<Suite> {
        match id {
            0x1301 => Some(Suite::Aes128GcmSha256),
            0x1302 => Some(Suite::Aes256GcmSha384),
            0x1303 => Some(Suite::Chacha20Poly1305Sha256),
            _ => None,
        }
    }

    /// Bytes of the suite's hash (and so of its traffic secrets).
    pub fn hash_len(self) -> usize {
        match self {
            Suite::Aes256GcmSha384 => 48,
            _ => 32,
        }
    }

    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Suite::Aes256GcmSha384 => hkdf::HKDF_SHA384,
            _ => hkdf::HKDF_SHA256,
        }
    }

    fn aead(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128GcmSha256 => &aead::AES_128_GCM,
            Suite::Aes256GcmSha384 => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305Sha256 => &aead::CHACHA20_POLY1305,
        }
    }

    /// The IANA name, for logs and audit lines.
    pub fn name(self) -> &'static str {
        match self {
            Suite::Aes128GcmSha256 => "TLS_AES_128_GCM_SHA256",
            Suite::Aes256GcmSha384 => "TLS_AES_256_GCM_SHA384",
            Suite::Chacha20Poly1305Sha256 => "TLS_CHACHA20_POLY1305_SHA256",
        }
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label(secret, label, context, out.len()) of RFC 8446 §7.1, with the hash of
/// the secret's length (32: SHA-256, 48: SHA-384). `label` is without the `tls13 ` prefix.
pub fn hkdf_expand_label(
    secret: &[u8],
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> Result<(), TlsError> {
    let alg = match secret.len() {
        32 => hkdf::HKDF_SHA256,
        48 => hkdf::HKDF_SHA384,
        n => return Err(TlsError::SecretLength(n)),
    };
    expand_label(alg, secret, label, context, out)
}

fn expand_label(
    alg: hkdf::Algorithm,
    secret: &[u8],
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> Result<(), TlsError> {
    if out.len() > 255 * alg.len() || label.len() > 249 || context.len() > 255 {
        return Err(TlsError::Hkdf);
    }
    // struct { uint16 length; opaque label<7..255> = "tls13 " + Label; opaque context<0..255> }
    let length = (out.len() as u16).to_be_bytes();
    let label_len = [6 + label.len() as u8];
    let context_len = [context.len() as u8];
    let info: [&[u8]; 6] = [&length, &label_len, b"tls13 ", label, &context_len, context];
    let prk = hkdf::Prk::new_less_safe(alg, secret);
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| TlsError::Hkdf)
}

/// The four traffic secrets of one TLS 1.3 connection (RFC 8446 §7.1), as an NSS key log
/// names them. Zeroized on drop; `Debug` shows only their length.
#[derive(Clone, PartialEq, Eq)]
pub struct TrafficSecrets {
    /// CLIENT_HANDSHAKE_TRAFFIC_SECRET.
    pub client_handshake: Zeroizing<Vec<u8>>,
    /// SERVER_HANDSHAKE_TRAFFIC_SECRET.
    pub server_handshake: Zeroizing<Vec<u8>>,
    /// CLIENT_TRAFFIC_SECRET_0.
    pub client_app: Zeroizing<Vec<u8>>,
    /// SERVER_TRAFFIC_SECRET_0.
    pub server_app: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for TrafficSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrafficSecrets([redacted, {} bytes each])", self.hash_len())
    }
}

impl TrafficSecrets {
    /// Bytes of each secret (32 or 48); all four have the same length.
    pub fn hash_len(&self) -> usize {
        self.client_handshake.len()
    }

    /// Whether the four secrets have one and the same valid length (32 or 48).
    pub fn well_formed(&self) -> bool {
        let n = self.hash_len();
        (n == 32 || n == 48)
            && [&self.server_handshake, &self.client_app, &self.server_app]
                .iter()
                .all(|s| s.len() == n)
    }
}

/// Which way bytes travel in the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the client (the TLS client) to the origin.
    ClientToServer = 0,
    /// From the origin to the client.
    ServerToClient = 1,
}

/// Why the tap stopped decrypting (for good).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Opaque {
    /// More than [`BUFFER_LIMIT`] bytes went by before the secrets arrived, and the handshake
    /// was not within what was held (or what went by past it was not application records).
    #[error("secrets arrived too late: the handshake was not within the 1 MiB held, or not records past it")]
    BufferFull,
    /// The secrets never arrived (the caller gave up waiting).
    #[error("no secrets arrived")]
    NoSecrets,
    /// The stream is not TLS (bad record header, oversized record).
    #[error("not a TLS stream")]
    NotTls,
    /// The ServerHello chose TLS 1.2 or older.
    #[error("TLS 1.2 or older is not decrypted")]
    Tls12,
    /// The ServerHello chose a suite the tap does not know.
    #[error("unknown cipher suite")]
    UnknownSuite,
    /// The secrets are not those of this connection's suite (wrong length).
    #[error("secrets do not fit the negotiated suite")]
    SecretMismatch,
    /// A record did not authenticate under the expected key (wrong secrets, 0-RTT early
    /// data, a missed key change).
    #[error("a record did not decrypt")]
    Decrypt,
    /// A handshake message was malformed or too large to follow.
    #[error("malformed handshake")]
    Handshake,
    /// The inspector fell behind the tunnel and lost bytes (the tunnel never waits for it).
    #[error("the inspector fell behind")]
    Overrun,
    /// The secrets were withdrawn (the delegating session or the tunnel ended).
    #[error("secrets withdrawn")]
    Revoked,
}

/// Errors of the key schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// A secret that is neither 32 nor 48 bytes.
    #[error("a traffic secret is 32 or 48 bytes, not {0}")]
    SecretLength(usize),
    /// HKDF refused the output length.
    #[error("HKDF-Expand-Label failed")]
    Hkdf,
}

/// One direction's record key: the AEAD key, IV and the next sequence number, with the
/// secret they came from (for KeyUpdate).
struct RecordKey {
    key: aead::LessSafeKey,
    iv: Zeroizing<[u8; 12]>,
    seq: u64,
    secret: Zeroizing<Vec<u8>>,
}

impl RecordKey {
    fn new(suite: Suite, secret: &[u8]) -> Result<RecordKey, Opaque> {
        let alg = suite.aead();
        let mut key = Zeroizing::new(vec![0u8; alg.key_len()]);
        let mut iv = Zeroizing::new([0u8; 12]);
        expand_label(suite.hkdf(), secret, b"key", &[], &mut key).map_err(|_| Opaque::SecretMismatch)?;
        expand_label(suite.hkdf(), secret, b"iv", &[], &mut iv[..]).map_err(|_| Opaque::SecretMismatch)?;
        let key = aead::UnboundKey::new(alg, &key).map_err(|_| Opaque::SecretMismatch)?;
        Ok(RecordKey {
            key: aead::LessSafeKey::new(key),
            iv,
            seq: 0,
            secret: Zeroizing::new(secret.to_vec()),
        })
    }

    /// The key after a KeyUpdate (§7.2): application_traffic_secret_N+1.
    fn next(&self, suite: Suite) -> Result<RecordKey, Opaque> {
        let mut s = Zeroizing::new(vec![0u8; suite.hash_len()]);
        expand_label(suite.hkdf(), &self.secret, b"traffic upd", &[], &mut s)
            .map_err(|_| Opaque::SecretMismatch)?;
        RecordKey::new(suite, &s)
    }

    /// Opens one record in place; returns the plaintext (content || type || padding).
    fn open<'a>(&mut self, header: [u8; 5], body: &'a mut [u8]) -> Result<&'a mut [u8], Opaque> {
        let mut nonce = *self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        let nonce = aead::Nonce::assume_unique_for_key(nonce);
        let plain = self
            .key
            .open_in_place(nonce, aead::Aad::from(header), body)
            .map_err(|_| Opaque::Decrypt)?;
        self.seq += 1;
        Ok(plain)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Plaintext handshake records (ClientHello, ServerHello); encrypted ones will use the
    /// handshake secret.
    Plain,
    /// Encrypted handshake, under the handshake traffic secret.
    Handshake,
    /// Application data, under the (updated) application traffic secret.
    App,
}

struct Side {
    /// Record bytes not yet parsed.
    buf: Vec<u8>,
    stage: Stage,
    key: Option<RecordKey>,
    /// Inner handshake bytes not yet a whole message.
    hs: Vec<u8>,
    /// Application data decrypted and not yet taken by the caller.
    out: Vec<u8>,
    /// Application data bytes decrypted so far.
    app_bytes: u64,
    records: u64,
    /// Past [`BUFFER_LIMIT`] before the secrets: records counted, not kept.
    skip: Option<Skip>,
    /// Bytes of a skipped record still to come after the secrets: dropped as they arrive.
    discard: usize,
    /// Application data bytes that went by undecrypted (skipped), not yet taken.
    gap: u64,
}

/// Records that went by while the buffer was full: only their count and sizes are kept, so
/// that decryption can resume after them (their sequence numbers are known).
#[derive(Default)]
struct Skip {
    records: u64,
    /// Plaintext bytes they carried, assuming no padding (what TLS stacks send by default).
    plain: u64,
    /// Body bytes of the current record still to come.
    remaining: usize,
    /// A record header being read.
    header: Vec<u8>,
}

impl Skip {
    /// Counts the records in `bytes`; `Err` if the stream does not look like TLS records.
    fn scan(&mut self, mut bytes: &[u8]) -> Result<(), Opaque> {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(bytes.len());
                self.remaining -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() < 5 {
                break;
            }
            let len = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
            if self.header[0] != CONTENT_APPDATA || self.header[1] != 3 || !(17..=MAX_FRAGMENT).contains(&len)
            {
                return Err(Opaque::BufferFull);
            }
            self.records += 1;
            self.plain += (len - 17) as u64;
            self.remaining = len;
            self.header.clear();
        }
        Ok(())
    }
}

/// Bytes of `buf` that are whole records (where a partial record starts).
fn whole_records(buf: &[u8]) -> usize {
    let mut at = 0;
    while buf.len() >= at + 5 {
        let len = u16::from_be_bytes([buf[at + 3], buf[at + 4]]) as usize;
        if buf.len() < at + 5 + len {
            break;
        }
        at += 5 + len;
    }
    at
}

impl Side {
    fn new() -> Side {
        Side {
            buf: Vec::new(),
            stage: Stage::Plain,
            key: None,
            hs: Vec::new(),
            out: Vec::new(),
            app_bytes: 0,
            records: 0,
            skip: None,
            discard: 0,
            gap: 0,
        }
    }
}

/// The read-only tap on one tunnel (both directions of one TLS connection).
pub struct Tap {
    sides: [Side; 2],
    suite: Option<Suite>,
    secrets: Option<TrafficSecrets>,
    opaque: Option<Opaque>,
}

impl Default for Tap {
    fn default() -> Self {
        Tap::new()
    }
}

impl Tap {
    /// A tap waiting for the connection's bytes and secrets.
    pub fn new() -> Tap {
        Tap {
            sides: [Side::new(), Side::new()],
            suite: None,
            secrets: None,
            opaque: None,
        }
    }

    /// Why the tap stopped, if it has: from then on it ignores everything.
    pub fn opaque(&self) -> Option<Opaque> {
        self.opaque
    }

    /// Whether secrets were installed.
    pub fn has_secrets(&self) -> bool {
        self.secrets.is_some()
    }

    /// The suite the ServerHello chose, once seen.
    pub fn suite(&self) -> Option<Suite> {
        self.suite
    }

    /// Application data bytes decrypted so far in direction `dir`.
    pub fn app_bytes(&self, dir: Dir) -> u64 {
        self.sides[dir as usize].app_bytes
    }

    /// Gives up for good: drops every buffer and the secrets (zeroized).
    pub fn give_up(&mut self, why: Opaque) {
        if self.opaque.is_none() {
            self.opaque = Some(why);
        }
        self.secrets = None;
        for s in &mut self.sides {
            s.key = None;
            s.buf.zeroize();
            s.buf = Vec::new();
            s.hs.zeroize();
            s.hs = Vec::new();
            s.out.zeroize();
            s.out = Vec::new();
            s.skip = None;
        }
    }

    /// Drops the secrets and keys (zeroized), e.g. when the delegating session ended; the tap
    /// is opaque from then on.
    pub fn forget(&mut self) {
        self.give_up(Opaque::Revoked);
    }

    /// A copy of bytes that went by in direction `dir` (already forwarded by the caller).
    pub fn feed(&mut self, dir: Dir, bytes: &[u8]) {
        if self.opaque.is_some() {
            return;
        }
        let side = &mut self.sides[dir as usize];
        if self.secrets.is_none() {
            if side.skip.is_none() && side.buf.len() + bytes.len() > BUFFER_LIMIT {
                // Full: keep the whole records held so far, count the rest.
                let cut = whole_records(&side.buf);
                let tail = side.buf.split_off(cut);
                let mut skip = Skip::default();
                let scanned = skip.scan(&tail);
                side.skip = Some(skip);
                if let Err(e) = scanned {
                    self.give_up(e);
                    return;
                }
            }
            match &mut side.skip {
                Some(skip) => {
                    if let Err(e) = skip.scan(bytes) {
                        self.give_up(e);
                    }
                }
                None => side.buf.extend_from_slice(bytes),
            }
            return;
        }
        let drop = side.discard.min(bytes.len());
        side.discard -= drop;
        side.buf.extend_from_slice(&bytes[drop..]);
        self.process();
    }

    /// Application data bytes that went by undecrypted in direction `dir` (records counted
    /// while the buffer was full) since the last call; they come after what
    /// [`Tap::take`] returned before and before what it returns next.
    pub fn take_gap(&mut self, dir: Dir) -> u64 {
        std::mem::take(&mut self.sides[dir as usize].gap)
    }

    /// After the buffered records: resumes after the counted ones, if the handshake was done
    /// by then (else the tunnel is opaque for good).
    fn resume_after_skip(&mut self) {
        for side in &mut self.sides {
            let Some(skip) = side.skip.take() else { continue };
            let key = match side.key.as_mut() {
                Some(k) if side.stage == Stage::App => k,
                _ => {
                    self.opaque = Some(Opaque::BufferFull);
                    break;
                }
            };
            key.seq += skip.records;
            side.gap += skip.plain;
            side.discard = skip.remaining;
            // The start of the next record's header: parsed with what follows.
            side.buf.extend_from_slice(&skip.header);
        }
        if let Some(why) = self.opaque.take() {
            self.give_up(why);
        }
    }

    /// Installs the connection's secrets and decrypts what is buffered.
    pub fn install(&mut self, secrets: TrafficSecrets) {
        if self.opaque.is_some() || self.secrets.is_some() {
            return;
        }
        if !secrets.well_formed() {
            self.give_up(Opaque::SecretMismatch);
            return;
        }
        self.secrets = Some(secrets);
        self.process();
        if self.opaque.is_none() && self.sides.iter().any(|s| s.skip.is_some()) {
            self.resume_after_skip();
            if self.opaque.is_none() {
                self.process();
            }
        }
    }

    /// Application data decrypted in direction `dir` since the last call.
    pub fn take(&mut self, dir: Dir) -> Vec<u8> {
        std::mem::take(&mut self.sides[dir as usize].out)
    }

    fn process(&mut self) {
        // The server's direction first: its ServerHello names the suite that the client's
        // encrypted records need.
        for dir in [Dir::ServerToClient, Dir::ClientToServer] {
            if let Err(why) = self.process_side(dir) {
                self.give_up(why);
                return;
            }
        }
    }

    fn process_side(&mut self, dir: Dir) -> Result<(), Opaque> {
        let mut at = 0;
        let result = loop {
            let side = &self.sides[dir as usize];
            let rest = &side.buf[at..];
            if rest.len() < 5 {
                break Ok(());
            }
            let header: [u8; 5] = [rest[0], rest[1], rest[2], rest[3], rest[4]];
            let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
            if !matches!(header[0], CONTENT_CCS..=CONTENT_APPDATA) || header[1] != 3 || len > MAX_FRAGMENT {
                break Err(Opaque::NotTls);
            }
            if rest.len() < 5 + len {
                break Ok(());
            }
            if header[0] == CONTENT_APPDATA && self.suite.is_none() {
                // Encrypted client records before we saw the ServerHello: wait for it.
                break Ok(());
            }
            let mut body = rest[5..5 + len].to_vec();
            at += 5 + len;
            if let Err(e) = self.record(dir, header, &mut body) {
                body.zeroize();
                break Err(e);
            }
            body.zeroize();
        };
        let side = &mut self.sides[dir as usize];
        side.buf[..at].zeroize();
        side.buf.drain(..at);
        result
    }

    fn record(&mut self, dir: Dir, header: [u8; 5], body: &mut [u8]) -> Result<(), Opaque> {
        match header[0] {
            // Middlebox-compatibility ChangeCipherSpec (§D.4) and plaintext alerts.
            CONTENT_CCS | CONTENT_ALERT => Ok(()),
            CONTENT_HANDSHAKE => {
                if self.sides[dir as usize].stage != Stage::Plain {
                    return Err(Opaque::Handshake);
                }
                self.plain_handshake(dir, body)
            }
            _ => self.encrypted(dir, header, body),
        }
    }

    fn plain_handshake(&mut self, dir: Dir, body: &[u8]) -> Result<(), Opaque> {
        let side = &mut self.sides[dir as usize];
        if side.hs.len() + body.len() > MAX_HANDSHAKE {
            return Err(Opaque::Handshake);
        }
        side.hs.extend_from_slice(body);
        while let Some((ty, msg)) = next_message(&mut self.sides[dir as usize].hs)? {
            match (dir, ty) {
                (Dir::ServerToClient, HS_SERVER_HELLO) => {
                    let (random, suite, tls13) = parse_server_hello(&msg).ok_or(Opaque::Handshake)?;
                    if random == HRR_RANDOM {
                        continue;
                    }
                    if !tls13 {
                        return Err(Opaque::Tls12);
                    }
                    self.suite = Some(Suite::from_id(suite).ok_or(Opaque::UnknownSuite)?);
                }
                (Dir::ClientToServer, HS_CLIENT_HELLO) => {}
                _ => return Err(Opaque::Handshake),
            }
        }
        Ok(())
    }

    fn encrypted(&mut self, dir: Dir, header: [u8; 5], body: &mut [u8]) -> Result<(), Opaque> {
        // Invariant: `process_side` waits for the ServerHello before an encrypted record.
        let suite = self.suite.ok_or(Opaque::Handshake)?;
        let secrets = self.secrets.as_ref().ok_or(Opaque::NoSecrets)?;
        if secrets.hash_len() != suite.hash_len() {
            return Err(Opaque::SecretMismatch);
        }
        let side = &mut self.sides[dir as usize];
        if side.stage == Stage::Plain {
            let secret = match dir {
                Dir::ClientToServer => &secrets.client_handshake,
                Dir::ServerToClient => &secrets.server_handshake,
            };
            side.key = Some(RecordKey::new(suite, secret)?);
            side.stage = Stage::Handshake;
        }
        // Invariant: every stage after Plain has a key.
        let key = side.key.as_mut().ok_or(Opaque::Decrypt)?;
        let plain = key.open(header, body)?;
        side.records += 1;
        // Strip the zero padding; the last non-zero byte is the real content type.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(Opaque::Decrypt);
        };
        let (content, ty) = (&plain[..end], plain[end]);
        match ty {
            CONTENT_APPDATA if side.stage == Stage::App => {
                side.app_bytes += content.len() as u64;
                side.out.extend_from_slice(content);
                Ok(())
            }
            CONTENT_HANDSHAKE => {
                if side.hs.len() + content.len() > MAX_HANDSHAKE {
                    return Err(Opaque::Handshake);
                }
                side.hs.extend_from_slice(content);
                let mut change = None;
                while let Some((ty, mut msg)) = next_message(&mut side.hs)? {
                    match (side.stage, ty) {
                        (Stage::Handshake, HS_FINISHED) => change = Some(Stage::App),
                        (Stage::App, HS_KEY_UPDATE) => change = Some(Stage::App),
                        _ => {}
                    }
                    msg.zeroize();
                }
                match change {
                    Some(_) if side.stage == Stage::Handshake => {
                        let secret = match dir {
                            Dir::ClientToServer => &secrets.client_app,
                            Dir::ServerToClient => &secrets.server_app,
                        };
                        side.key = Some(RecordKey::new(suite, secret)?);
                        side.stage = Stage::App;
                    }
                    Some(_) => {
                        let next = key_next(side.key.as_ref(), suite)?;
                        side.key = Some(next);
                    }
                    None => {}
                }
                Ok(())
            }
            CONTENT_ALERT => Ok(()),
            _ => Err(Opaque::Decrypt),
        }
    }
}

fn key_next(key: Option<&RecordKey>, suite: Suite) -> Result<RecordKey, Opaque> {
    key.ok_or(Opaque::Decrypt)?.next(suite)
}

/// Takes the next whole handshake message (type, body) from `hs`, if there is one.
fn next_message(hs: &mut Vec<u8>) -> Result<Option<(u8, Vec<u8>)>, Opaque> {
    if hs.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
    if len > MAX_HANDSHAKE {
        return Err(Opaque::Handshake);
    }
    if hs.len() < 4 + len {
        return Ok(None);
    }
    let ty = hs[0];
    let msg = hs[4..4 + len].to_vec();
    hs[..4 + len].zeroize();
    hs.drain(..4 + len);
    Ok(Some((ty, msg)))
}

/// (random, cipher suite, whether supported_versions says TLS 1.3) of a ServerHello body.
fn parse_server_hello(b: &[u8]) -> Option<([u8; 32], u16, bool)> {
    let random: [u8; 32] = b.get(2..34)?.try_into().ok()?;
    let sid_len = *b.get(34)? as usize;
    let mut at = 35 + sid_len;
    let suite = u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]);
    at += 3; // suite, legacy_compression_method
    let mut tls13 = false;
    if at < b.len() {
        let ext_len = u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]) as usize;
        at += 2;
        let end = at.checked_add(ext_len)?;
        if end != b.len() {
            return None;
        }
        while at < end {
            let ty = u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]);
            let len = u16::from_be_bytes([*b.get(at + 2)?, *b.get(at + 3)?]) as usize;
            let data = b.get(at + 4..at + 4 + len)?;
            if ty == 43 && data == [3, 4] {
                tls13 = true;
            }
            at += 4 + len;
        }
    }
    Some((random, suite, tls13))
}

/// What the first bytes of a client's stream say about its ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloScan {
    /// Not enough bytes yet.
    Incomplete,
    /// The ClientHello's random (the key of its NSS key log lines).
    Random([u8; 32]),
    /// The stream does not start with a TLS ClientHello.
    NotTls,
}

/// Bytes of a stream's start that [`client_random`] needs at most.
pub const HELLO_PREFIX: usize = 5 + 4 + 2 + 32;

/// The ClientHello random at the start of a client's stream (record header, handshake
/// header, legacy_version, random).
pub fn client_random(start: &[u8]) -> HelloScan {
    let Some(head) = start.get(..HELLO_PREFIX) else {
        // Check what is there already, so a non-TLS stream is told early.
        let ok = start.first().is_none_or(|&b| b == CONTENT_HANDSHAKE)
            && start.get(1).is_none_or(|&b| b == 3)
            && start.get(5).is_none_or(|&b| b == HS_CLIENT_HELLO);
        return if ok {
            HelloScan::Incomplete
        } else {
            HelloScan::NotTls
        };
    };
    if head[0] != CONTENT_HANDSHAKE || head[1] != 3 || head[5] != HS_CLIENT_HELLO {
        return HelloScan::NotTls;
    }
    let mut r = [0u8; 32];
    r.copy_from_slice(&head[11..43]);
    HelloScan::Random(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).unwrap()
    }

    /// RFC 8448 §3 (Simple 1-RTT Handshake): "{server} derive write traffic keys for
    /// handshake data" and "{server} derive write traffic keys for application data".
    #[test]
    fn expand_label_matches_rfc8448() {
        let shts = unhex(
            "b6 7b 7d 69 0c c1 6c 4e 75 e5 42 13 cb 2d 37 b4 e9 c9 12 bc de d9 10 5d 42 be fd 59 d3 91 ad 38",
        );
        let mut key = [0u8; 16];
        let mut iv = [0u8; 12];
        hkdf_expand_label(&shts, b"key", &[], &mut key).unwrap();
        hkdf_expand_label(&shts, b"iv", &[], &mut iv).unwrap();
        assert_eq!(
            key.to_vec(),
            unhex("3f ce 51 60 09 c2 17 27 d0 f2 e4 e8 6e e4 03 bc")
        );
        assert_eq!(iv.to_vec(), unhex("5d 31 3e b2 67 12 76 ee 13 00 0b 30"));
        let sats = unhex(
            "a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43",
        );
        hkdf_expand_label(&sats, b"key", &[], &mut key).unwrap();
        hkdf_expand_label(&sats, b"iv", &[], &mut iv).unwrap();
        assert_eq!(
            key.to_vec(),
            unhex("9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56")
        );
        assert_eq!(iv.to_vec(), unhex("cf 78 2b 88 dd 83 54 9a ad f1 e9 84"));
        assert_eq!(
            hkdf_expand_label(&[0; 20], b"key", &[], &mut key),
            Err(TlsError::SecretLength(20))
        );
    }

    /// A record sealed by ring under the RFC 8448 §3 server handshake key and IV (nonce of
    /// sequence 0 = the IV) opens with the key the tap derives.
    #[test]
    fn a_record_sealed_under_the_rfc8448_handshake_key_opens() {
        let shts = unhex(
            "b6 7b 7d 69 0c c1 6c 4e 75 e5 42 13 cb 2d 37 b4 e9 c9 12 bc de d9 10 5d 42 be fd 59 d3 91 ad 38",
        );
        let mut k = RecordKey::new(Suite::Aes128GcmSha256, &shts).unwrap();
        // A record sealed with the same key by ring, then opened by the tap's key.
        let sealing = {
            let mut key = [0u8; 16];
            hkdf_expand_label(&shts, b"key", &[], &mut key).unwrap();
            aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &key).unwrap())
        };
        let mut body = b"hello\x16".to_vec();
        let header = [23, 3, 3, 0, (body.len() + 16) as u8];
        let nonce = aead::Nonce::assume_unique_for_key(
            unhex("5d 31 3e b2 67 12 76 ee 13 00 0b 30").try_into().unwrap(),
        );
        sealing
            .seal_in_place_append_tag(nonce, aead::Aad::from(header), &mut body)
            .unwrap();
        let plain = k.open(header, &mut body).unwrap();
        assert_eq!(plain, b"hello\x16");
        assert_eq!(k.seq, 1);
    }

    #[test]
    fn client_random_is_read_from_the_first_record() {
        let mut hello = vec![22, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3];
        hello.extend((0..32).map(|i| i as u8));
        hello.extend([0u8; 20]);
        assert_eq!(client_random(&hello[..10]), HelloScan::Incomplete);
        let mut want = [0u8; 32];
        want.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        assert_eq!(client_random(&hello), HelloScan::Random(want));
        assert_eq!(client_random(b"GET / HTTP/1.1\r\n"), HelloScan::NotTls);
        assert_eq!(client_random(&[22, 3, 1, 0, 5, 2]), HelloScan::NotTls);
    }

    /// Keys a rustls connection writes to its key log.
    #[derive(Debug, Default)]
    struct Log(Mutex<Vec<LogLine>>);

    /// (label, client random, secret).
    type LogLine = (String, Vec<u8>, Vec<u8>);

    impl rustls::KeyLog for Log {
        fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
            self.0
                .lock()
                .unwrap()
                .push((label.to_owned(), client_random.to_vec(), secret.to_vec()));
        }
    }

    impl Log {
        fn secrets(&self) -> TrafficSecrets {
            let v = self.0.lock().unwrap();
            let find = |l: &str| Zeroizing::new(v.iter().find(|e| e.0 == l).unwrap().2.clone());
            TrafficSecrets {
                client_handshake: find("CLIENT_HANDSHAKE_TRAFFIC_SECRET"),
                server_handshake: find("SERVER_HANDSHAKE_TRAFFIC_SECRET"),
                client_app: find("CLIENT_TRAFFIC_SECRET_0"),
                server_app: find("SERVER_TRAFFIC_SECRET_0"),
            }
        }
    }

    /// A rustls client and server in memory, every byte copied to `tap` on its way.
    struct Pair {
        client: rustls::ClientConnection,
        server: rustls::ServerConnection,
        log: Arc<Log>,
        c2s: Vec<u8>,
        s2c: Vec<u8>,
    }

    impl Pair {
        fn new(suite: rustls::SupportedCipherSuite) -> Pair {
            let provider = rustls::crypto::ring::default_provider();
            let provider = rustls::crypto::CryptoProvider {
                cipher_suites: vec![suite],
                ..provider
            };
            let provider = Arc::new(provider);
            let ca = crate::cert::generate(&["localhost".to_owned()], "client").unwrap();
            let server = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(ca.gateway_chain(), ca.gateway_key())
                .unwrap();
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.ca_der()).unwrap();
            let mut client = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let log = Arc::new(Log::default());
            client.key_log = log.clone();
            let client =
                rustls::ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap()).unwrap();
            let server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
            Pair {
                client,
                server,
                log,
                c2s: Vec::new(),
                s2c: Vec::new(),
            }
        }

        /// Moves bytes both ways until neither side has any to write.
        fn pump(&mut self) {
            for _ in 0..20 {
                let mut moved = false;
                let mut buf = Vec::new();
                while self.client.wants_write() {
                    self.client.write_tls(&mut buf).unwrap();
                }
                if !buf.is_empty() {
                    moved = true;
                    self.c2s.extend_from_slice(&buf);
                    let mut rd = &buf[..];
                    while !rd.is_empty() {
                        self.server.read_tls(&mut rd).unwrap();
                        self.server.process_new_packets().unwrap();
                    }
                }
                let mut buf = Vec::new();
                while self.server.wants_write() {
                    self.server.write_tls(&mut buf).unwrap();
                }
                if !buf.is_empty() {
                    moved = true;
                    self.s2c.extend_from_slice(&buf);
                    let mut rd = &buf[..];
                    while !rd.is_empty() {
                        self.client.read_tls(&mut rd).unwrap();
                        self.client.process_new_packets().unwrap();
                        // What the client received is not under test: keep its buffer empty.
                        let mut sink = [0u8; 16 * 1024];
                        while std::io::Read::read(&mut self.client.reader(), &mut sink).is_ok_and(|n| n > 0) {
                        }
                    }
                }
                if !moved {
                    return;
                }
            }
        }
    }

    fn exchange(suite: rustls::SupportedCipherSuite) {
        use std::io::{Read, Write};
        let mut p = Pair::new(suite);
        p.pump();
        p.client
            .writer()
            .write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        p.pump();
        p.server
            .writer()
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
            .unwrap();
        p.pump();
        // Both sides update their keys (the server asked, so the client answers).
        p.server.refresh_traffic_keys().unwrap();
        p.pump();
        p.client.writer().write_all(b"after update").unwrap();
        p.server.writer().write_all(b"server after update").unwrap();
        p.pump();
        let mut got = vec![0u8; 64];
        let n = p.server.reader().read(&mut got).unwrap();
        assert!(n > 0);

        let mut tap = Tap::new();
        // Bytes arrive in odd pieces, the secrets after the handshake bytes.
        let (c2s, s2c) = (p.c2s.clone(), p.s2c.clone());
        for chunk in s2c.chunks(7) {
            tap.feed(Dir::ServerToClient, chunk);
        }
        let half = c2s.len() / 2;
        tap.feed(Dir::ClientToServer, &c2s[..half]);
        tap.install(p.log.secrets());
        tap.feed(Dir::ClientToServer, &c2s[half..]);
        assert_eq!(tap.opaque(), None);
        let want = suite.suite().as_str().unwrap().replace("TLS13_", "TLS_");
        assert_eq!(tap.suite().map(|s| s.name()), Some(want.as_str()));
        let up = tap.take(Dir::ClientToServer);
        assert_eq!(up, b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nafter update");
        let down = tap.take(Dir::ServerToClient);
        assert_eq!(
            down,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiserver after update"
        );
    }

    /// One real connection's bytes (handshake, a request, a response), computed once.
    fn recorded() -> &'static (Vec<u8>, Vec<u8>, TrafficSecrets) {
        static ONCE: std::sync::OnceLock<(Vec<u8>, Vec<u8>, TrafficSecrets)> = std::sync::OnceLock::new();
        ONCE.get_or_init(|| {
            use std::io::Write;
            let mut p = Pair::new(rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256);
            p.pump();
            p.client.writer().write_all(b"request").unwrap();
            p.server.writer().write_all(b"response").unwrap();
            p.pump();
            (p.c2s.clone(), p.s2c.clone(), p.log.secrets())
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// However the two directions are cut and interleaved, and whenever the secrets
        /// arrive, the tap yields exactly the application data.
        #[test]
        fn any_cuts_and_any_secret_timing_yield_the_same_plaintext(cuts in proptest::collection::vec((proptest::bool::ANY, 1usize..300), 1..40), install_after in 0usize..40) {
            let (c2s, s2c, secrets) = recorded();
            let mut tap = Tap::new();
            let (mut a, mut b) = (0, 0);
            let mut up = Vec::new();
            let mut down = Vec::new();
            for (i, (client, n)) in cuts.iter().chain([&(true, 10_000), &(false, 10_000)]).enumerate() {
                if i == install_after {
                    tap.install(secrets.clone());
                }
                if *client {
                    let end = (a + n).min(c2s.len());
                    tap.feed(Dir::ClientToServer, &c2s[a..end]);
                    a = end;
                } else {
                    let end = (b + n).min(s2c.len());
                    tap.feed(Dir::ServerToClient, &s2c[b..end]);
                    b = end;
                }
                up.extend(tap.take(Dir::ClientToServer));
                down.extend(tap.take(Dir::ServerToClient));
            }
            tap.install(secrets.clone());
            up.extend(tap.take(Dir::ClientToServer));
            down.extend(tap.take(Dir::ServerToClient));
            proptest::prop_assert_eq!(tap.opaque(), None);
            proptest::prop_assert_eq!(up, b"request".to_vec());
            proptest::prop_assert_eq!(down, b"response".to_vec());
        }

        /// Arbitrary bytes and secrets never panic, and once opaque the tap stays opaque and
        /// yields nothing.
        #[test]
        fn arbitrary_input_never_panics_and_opaque_is_final(chunks in proptest::collection::vec((proptest::bool::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..200)), 0..20), len in proptest::sample::select(vec![32usize, 48, 20])) {
            let mut tap = Tap::new();
            let s = || Zeroizing::new(vec![7u8; len]);
            tap.install(TrafficSecrets { client_handshake: s(), server_handshake: s(), client_app: s(), server_app: s() });
            let mut was = tap.opaque();
            for (client, bytes) in chunks {
                let dir = if client { Dir::ClientToServer } else { Dir::ServerToClient };
                tap.feed(dir, &bytes);
                if was.is_some() {
                    proptest::prop_assert_eq!(tap.opaque(), was);
                    proptest::prop_assert!(tap.take(dir).is_empty());
                }
                was = tap.opaque();
            }
        }
    }

    #[test]
    fn decrypts_a_real_rustls_connection_with_each_suite_and_key_updates() {
        use rustls::crypto::ring::cipher_suite as cs;
        exchange(cs::TLS13_AES_128_GCM_SHA256);
        exchange(cs::TLS13_AES_256_GCM_SHA384);
        exchange(cs::TLS13_CHACHA20_POLY1305_SHA256);
    }

    /// A download of more than the buffer before the secrets: the tap decrypts what it held,
    /// steps over the counted records and decrypts what follows them.
    #[test]
    fn past_the_buffer_records_are_counted_and_decryption_resumes_after_them() {
        use std::io::Write;
        let mut p = Pair::new(rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256);
        p.pump();
        let big = vec![b'x'; 3 * BUFFER_LIMIT / 2];
        for c in big.chunks(16 * 1024) {
            p.server.writer().write_all(c).unwrap();
            p.pump();
        }
        p.server.writer().write_all(b"tail").unwrap();
        p.pump();
        let mut tap = Tap::new();
        let (c2s, s2c) = (p.c2s.clone(), p.s2c.clone());
        tap.feed(Dir::ClientToServer, &c2s);
        // Cut the stream where the tail record starts: the secrets come before it.
        let tail_at = s2c.len() - (5 + 4 + 1 + 16);
        for chunk in s2c[..tail_at].chunks(1000) {
            tap.feed(Dir::ServerToClient, chunk);
        }
        assert_eq!(tap.opaque(), None);
        tap.install(p.log.secrets());
        assert_eq!(tap.opaque(), None);
        let held = tap.take(Dir::ServerToClient);
        let gap = tap.take_gap(Dir::ServerToClient);
        assert!(gap > 0 && held.len() < BUFFER_LIMIT, "{gap} {}", held.len());
        assert_eq!(held.len() as u64 + gap, big.len() as u64);
        tap.feed(Dir::ServerToClient, &s2c[tail_at..]);
        assert_eq!(tap.take(Dir::ServerToClient), b"tail");
        assert_eq!(tap.opaque(), None);

        // A handshake that does not fit the buffer cannot be stepped over.
        let mut tap = Tap::new();
        let mut fake = Vec::new();
        while fake.len() < BUFFER_LIMIT + 100 {
            fake.extend_from_slice(&[23, 3, 3, 0, 20]);
            fake.extend_from_slice(&[0; 20]);
        }
        tap.feed(Dir::ServerToClient, &fake);
        tap.install(p.log.secrets());
        assert!(tap.opaque().is_some());
    }

    #[test]
    fn wrong_secrets_or_too_much_before_them_turn_the_tap_opaque() {
        let mut p = Pair::new(rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256);
        p.pump();
        let mut tap = Tap::new();
        tap.feed(Dir::ServerToClient, &p.s2c);
        let mut s = p.log.secrets();
        s.server_handshake[0] ^= 1;
        tap.install(s);
        assert_eq!(tap.opaque(), Some(Opaque::Decrypt));

        let mut tap = Tap::new();
        tap.feed(Dir::ClientToServer, &vec![0u8; BUFFER_LIMIT]);
        assert_eq!(tap.opaque(), None);
        tap.feed(Dir::ClientToServer, &[0; 5]);
        assert_eq!(
            tap.opaque(),
            Some(Opaque::BufferFull),
            "what goes by past the limit must look like records"
        );
        tap.install(p.log.secrets());
        assert!(!tap.has_secrets());

        let mut tap = Tap::new();
        tap.feed(Dir::ClientToServer, b"GET / HTTP/1.1\r\n\r\n");
        tap.install(p.log.secrets());
        assert_eq!(tap.opaque(), Some(Opaque::NotTls));
    }
}
