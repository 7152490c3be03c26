//! Sealing of stored values: the one function every value passes through on its way to the
//! repository, and the cluster key it is sealed under.
//!
//! AES-256-GCM (ring) under a key derived from the 32-byte cluster key with HKDF-SHA256.
//! The associated data binds the cluster, the table, the record key and the version, so a
//! value copied under another key, table or cluster, or with its version changed, fails to
//! open; a reader of Redis learns nothing and cannot forge a record. Nonces are 96 random
//! bits per seal (ring's system RNG): at 2^32 seals under one cluster key the chance of a
//! repeated nonce is about 2^-33, far beyond what a cluster writes before its key is
//! rotated.
//!
//! The stored form (what Redis holds):
//!
//! ```text
//!  0               8   9                  21
//! +---------------+---+------------------+----------------------------+
//! | version (BE)  | 1 | nonce (12 bytes) | AES-256-GCM(value) ‖ tag 16 |
//! +---------------+---+------------------+----------------------------+
//!   in the clear   format               encrypted, tag over value and AAD
//!
//! AAD = "sudp-store-v1" ‖ len ‖ cluster ‖ len ‖ table ‖ len(4, BE) ‖ key ‖ version (8, BE)
//! ```
//!
//! The version is in the clear so that Redis can compare it (UPDATE is a compare-and-set
//! run as a Lua script); it is in the AAD, so changing it breaks the tag.

use std::io::Write as _;
use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::{check_name, StoreError, Table};

/// Length of a cluster key.
pub const CLUSTER_KEY_LEN: usize = 32;

const FORMAT: u8 = 1;
const HEADER_LEN: usize = 8 + 1 + NONCE_LEN;
const TAG_LEN: usize = 16;
const AAD_LABEL: &[u8] = b"sudp-store-v1";
const HKDF_SALT: &[u8] = b"sudp cluster key v1";
const HKDF_INFO: &[u8] = b"store seal aes-256-gcm";

/// The secret every node of a cluster shares: the root of the sealing key (and nothing
/// else). Never stored in Redis, never logged (its `Debug` hides it), zeroized on drop.
pub struct ClusterKey(Zeroizing<[u8; CLUSTER_KEY_LEN]>);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// A key of these bytes.
    pub fn from_bytes(bytes: [u8; CLUSTER_KEY_LEN]) -> ClusterKey {
        ClusterKey(Zeroizing::new(bytes))
    }

    /// A fresh random key.
    pub fn generate() -> Result<ClusterKey, StoreError> {
        let mut k = Zeroizing::new([0u8; CLUSTER_KEY_LEN]);
        SystemRandom::new()
            .fill(&mut k[..])
            .map_err(|_| StoreError::Rng)?;
        Ok(ClusterKey(k))
    }

    /// Writes a fresh key to `path` as 64 hex digits and a newline, mode 0600. Refuses to
    /// overwrite an existing file (a cluster's key is replaced on purpose, not by accident).
    pub fn write_new(path: &Path) -> Result<(), StoreError> {
        let key = ClusterKey::generate()?;
        let err = |reason: String| StoreError::ClusterKey {
            path: path.display().to_string(),
            reason,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut file = opts.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                err("already exists; refusing to overwrite it (remove it first to replace the key)".into())
            } else {
                err(format!("cannot create: {e}"))
            }
        })?;
        let mut text = Zeroizing::new(hex::encode(&key.0[..]));
        text.push('\n');
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| err(format!("cannot write: {e}")))
    }

    /// Reads a key file: 64 hex digits (surrounding whitespace ignored). A file that group
    /// or others can read is accepted with a warning (some secret mounts are 0644).
    pub fn load(path: &Path) -> Result<ClusterKey, StoreError> {
        let err = |reason: String| StoreError::ClusterKey {
            path: path.display().to_string(),
            reason,
        };
        let text = Zeroizing::new(std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?);
        #[cfg(unix)]
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt as _;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "cluster key file is readable by group or others; chmod 600 it"
                );
            }
        }
        let trimmed = text.trim_ascii();
        let mut key = Zeroizing::new([0u8; CLUSTER_KEY_LEN]);
        if trimmed.len() != 2 * CLUSTER_KEY_LEN || hex::decode_to_slice(trimmed, &mut key[..]).is_err() {
            return Err(err(format!(
                "expected {} hex digits (as `sudp cluster-key --out FILE` writes)",
                2 * CLUSTER_KEY_LEN
            )));
        }
        Ok(ClusterKey(key))
    }
}

/// Why a stored value did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Shorter than a header and a tag, or of an unknown format.
    #[error("malformed stored value")]
    Malformed,
    /// The tag does not verify: another cluster key, or the value was altered or copied
    /// from another key, table or cluster.
    #[error("stored value does not authenticate")]
    Forged,
}

/// Seals and opens the values of one cluster.
pub struct Sealer {
    key: LessSafeKey,
    cluster: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer(cluster {:?})", self.cluster)
    }
}

/// The AES-256-GCM key length as HKDF output.
struct SealKeyLen;

impl hkdf::KeyType for SealKeyLen {
    fn len(&self) -> usize {
        AES_256_GCM.key_len()
    }
}

impl Sealer {
    /// The sealer of cluster `cluster` under `key`.
    pub fn new(key: &ClusterKey, cluster: &str) -> Result<Sealer, StoreError> {
        check_name("cluster", cluster)?;
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&key.0[..]);
        let mut raw = Zeroizing::new([0u8; 32]);
        // Invariant: 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
        prk.expand(&[HKDF_INFO], SealKeyLen)
            .and_then(|okm| okm.fill(&mut raw[..]))
            .expect("HKDF output of 32 bytes");
        // Invariant: the key is exactly AES-256-GCM's key length.
        let unbound = UnboundKey::new(&AES_256_GCM, &raw[..]).expect("AES-256 key length");
        Ok(Sealer {
            key: LessSafeKey::new(unbound),
            cluster: cluster.to_owned(),
            rng: SystemRandom::new(),
        })
    }

    /// The cluster this sealer serves.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Seals `value` of record (`table`, `key`) at `version`, into the stored form.
    pub fn seal(&self, table: &Table, key: &[u8], version: u64, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| StoreError::Rng)?;
        let mut out = Vec::with_capacity(HEADER_LEN + value.len() + TAG_LEN);
        out.extend_from_slice(&version.to_be_bytes());
        out.push(FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(value);
        let aad = self.aad(table, key, version);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut out[HEADER_LEN..],
            )
            // Invariant: ring fails only for inputs beyond GCM's 2^36-byte limit.
            .expect("value within AES-GCM's length limit");
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens a stored value of record (`table`, `key`): its version and value.
    pub fn open(
        &self,
        table: &Table,
        key: &[u8],
        stored: &[u8],
    ) -> Result<(u64, Zeroizing<Vec<u8>>), OpenError> {
        if stored.len() < HEADER_LEN + TAG_LEN || stored[8] != FORMAT {
            return Err(OpenError::Malformed);
        }
        let version = stored_version(stored).ok_or(OpenError::Malformed)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&stored[9..HEADER_LEN]);
        let mut buf = Zeroizing::new(stored[HEADER_LEN..].to_vec());
        let aad = self.aad(table, key, version);
        let len = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut buf[..])
            .map_err(|_| OpenError::Forged)?
            .len();
        buf.truncate(len);
        Ok((version, buf))
    }

    fn aad(&self, table: &Table, key: &[u8], version: u64) -> Vec<u8> {
        let (c, t) = (self.cluster.as_bytes(), table.as_str().as_bytes());
        let mut aad = Vec::with_capacity(AAD_LABEL.len() + 2 + c.len() + t.len() + 4 + key.len() + 8);
        aad.extend_from_slice(AAD_LABEL);
        // Names are at most 64 bytes (check_name), so their lengths fit in a byte.
        aad.push(c.len() as u8);
        aad.extend_from_slice(c);
        aad.push(t.len() as u8);
        aad.extend_from_slice(t);
        aad.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_be_bytes());
        aad.extend_from_slice(key);
        aad.extend_from_slice(&version.to_be_bytes());
        aad
    }
}

/// The version in the clear at the front of a stored value.
pub fn stored_version(stored: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(stored.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(cluster: &str) -> Sealer {
        Sealer::new(&ClusterKey::from_bytes([7; 32]), cluster).unwrap()
    }

    #[test]
    fn seal_opens_only_under_its_own_names() {
        let s = sealer("prod");
        let t = Table::TLS_SESSION;
        let stored = s.seal(&t, b"key", 5, b"secret value").unwrap();
        assert_eq!(stored.len(), HEADER_LEN + 12 + TAG_LEN);
        assert_eq!(stored_version(&stored), Some(5));
        assert!(!stored.windows(6).any(|w| w == b"secret"), "plaintext visible");
        let (v, value) = s.open(&t, b"key", &stored).unwrap();
        assert_eq!((v, &value[..]), (5, &b"secret value"[..]));

        // Moved to another key, table or cluster, or under another cluster key: refused.
        assert_eq!(s.open(&t, b"kez", &stored), Err(OpenError::Forged));
        assert_eq!(
            s.open(&Table::TICKET_KEYS, b"key", &stored),
            Err(OpenError::Forged)
        );
        assert_eq!(sealer("prod2").open(&t, b"key", &stored), Err(OpenError::Forged));
        let other = Sealer::new(&ClusterKey::from_bytes([8; 32]), "prod").unwrap();
        assert_eq!(other.open(&t, b"key", &stored), Err(OpenError::Forged));

        // A changed version or any flipped bit breaks the tag.
        let mut bumped = stored.clone();
        bumped[7] ^= 1;
        assert_eq!(s.open(&t, b"key", &bumped), Err(OpenError::Forged));
        for i in 9..stored.len() {
            let mut bad = stored.clone();
            bad[i] ^= 0x40;
            assert_eq!(s.open(&t, b"key", &bad), Err(OpenError::Forged), "byte {i}");
        }
        let mut fmt = stored.clone();
        fmt[8] = 2;
        assert_eq!(s.open(&t, b"key", &fmt), Err(OpenError::Malformed));
        for n in 0..HEADER_LEN + TAG_LEN {
            assert_eq!(s.open(&t, b"key", &stored[..n]), Err(OpenError::Malformed));
        }
    }

    #[test]
    fn nonces_are_fresh() {
        let s = sealer("c");
        let a = s.seal(&Table::TLS_SESSION, b"k", 1, b"same").unwrap();
        let b = s.seal(&Table::TLS_SESSION, b"k", 1, b"same").unwrap();
        assert_ne!(a[9..HEADER_LEN], b[9..HEADER_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn key_files() {
        let dir = std::env::temp_dir().join(format!("sudp-ck-{}-{}", std::process::id(), line!()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.key");
        let _ = std::fs::remove_file(&path);
        ClusterKey::write_new(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        let a = ClusterKey::load(&path).unwrap();
        assert_eq!(format!("{a:?}"), "ClusterKey(..)");
        let err = ClusterKey::write_new(&path).unwrap_err().to_string();
        assert!(err.contains("refusing to overwrite"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "file unchanged");
        // Same file, same sealing key.
        let b = ClusterKey::load(&path).unwrap();
        let stored = Sealer::new(&a, "c")
            .unwrap()
            .seal(&Table::TLS_SESSION, b"k", 1, b"v")
            .unwrap();
        assert!(Sealer::new(&b, "c")
            .unwrap()
            .open(&Table::TLS_SESSION, b"k", &stored)
            .is_ok());

        std::fs::write(&path, "abc\n").unwrap();
        let err = ClusterKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("expected 64 hex digits"), "{err}");
        std::fs::write(&path, "zz".repeat(32)).unwrap();
        assert!(ClusterKey::load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(ClusterKey::load(&path)
            .unwrap_err()
            .to_string()
            .contains("cannot read"));
    }
}
