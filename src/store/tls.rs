//! The store behind rustls' resumption hooks, so that a client resumes on whichever node it
//! reaches.
//!
//! * [`StoreSessions`] ([`StoresServerSessions`]): stateful resumption, table
//!   `tls-session`: TLS 1.3 tickets that are lookup keys, and TLS 1.2 session ids.
//! * [`StoreTicketer`] ([`ProducesTickets`]): stateless tickets sealed under keys kept in the
//!   store (table `ticket-keys`), one per rotation period, so every node seals and opens the
//!   same tickets (seed 003's common session token).
//!
//! rustls calls both synchronously inside the handshake. They use the local tier directly;
//! on a miss with a shared store, on a multi-thread tokio runtime, they wait for Redis with
//! `block_in_place` + `Handle::block_on`, bounded by a short timeout (the worker thread is
//! handed over, so the runtime keeps running other tasks); elsewhere (a current-thread
//! runtime, no runtime) they stay local. Writes to Redis are spawned, never waited for,
//! except the creation of a period's ticket key, which must be agreed before it is used.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::{ProducesTickets, StoresServerSessions};
use zeroize::Zeroizing;

use super::{Record, SessionStore, StoreError, Table};

/// TTL of a stateful session: the ticket lifetime rustls announces for stateful TLS 1.3
/// tickets (24 h; `rustls::server::tls13`), which also bounds TLS 1.2 session ids.
pub const STATEFUL_SESSION_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Default rotation period of shared ticket keys, and so the ticket lifetime: the value
/// rustls' own rotating ticketer uses (6 h).
pub const DEFAULT_TICKET_PERIOD: Duration = Duration::from_secs(6 * 60 * 60);

/// How long a handshake waits for Redis on a local miss.
pub const DEFAULT_REMOTE_TIMEOUT: Duration = Duration::from_millis(250);

/// Runs `op` on the store from synchronous code: awaited through `block_in_place` on a
/// multi-thread runtime, bounded by `limit`; `None` without a shared store or elsewhere.
fn wait_remote<T>(
    store: &Arc<dyn SessionStore>,
    limit: Duration,
    op: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Option<T> {
    if !store.is_shared() {
        return None;
    }
    let handle = tokio::runtime::Handle::try_current().ok()?;
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return None;
    }
    tokio::task::block_in_place(|| handle.block_on(tokio::time::timeout(limit, op)))
        .ok()?
        .ok()
}

/// rustls' server session storage on the store (table `tls-session`).
#[derive(Debug)]
pub struct StoreSessions {
    store: Arc<dyn SessionStore>,
    ttl: Duration,
    remote_timeout: Duration,
}

impl StoreSessions {
    /// Sessions in `store`, kept [`STATEFUL_SESSION_TTL`], waiting at most
    /// [`DEFAULT_REMOTE_TIMEOUT`] for Redis on a miss.
    pub fn new(store: Arc<dyn SessionStore>) -> StoreSessions {
        StoreSessions {
            store,
            ttl: STATEFUL_SESSION_TTL,
            remote_timeout: DEFAULT_REMOTE_TIMEOUT,
        }
    }

    /// The same with another TTL and Redis wait.
    pub fn with_limits(
        store: Arc<dyn SessionStore>,
        ttl: Duration,
        remote_timeout: Duration,
    ) -> StoreSessions {
        StoreSessions {
            store,
            ttl,
            remote_timeout,
        }
    }

    fn spawn_write(&self, key: Vec<u8>, value: Zeroizing<Vec<u8>>) {
        if !self.store.is_shared() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, ttl) = (self.store.clone(), self.ttl);
        handle.spawn(async move {
            let _ = store.add(&Table::TLS_SESSION, &key, &value, ttl).await;
        });
    }

    fn spawn_take(&self, key: Vec<u8>) {
        if !self.store.is_shared() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.clone();
        handle.spawn(async move {
            let _ = store.take(&Table::TLS_SESSION, &key).await;
        });
    }
}

impl StoresServerSessions for StoreSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let value = Zeroizing::new(value);
        self.store
            .local()
            .insert(&Table::TLS_SESSION, &key, &value, 1, self.ttl);
        self.spawn_write(key, value);
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let t = &Table::TLS_SESSION;
        let record = match self.store.local().get(t, key) {
            Some(r) => Some(r),
            None => wait_remote(&self.store, self.remote_timeout, self.store.get(t, key)).flatten(),
        };
        record.map(|r| r.value.to_vec())
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let t = &Table::TLS_SESSION;
        let record = match self.store.local().remove(t, key) {
            Some(r) => {
                // Also gone from Redis and the other nodes, without waiting.
                self.spawn_take(key.to_vec());
                Some(r)
            }
            None => wait_remote(&self.store, self.remote_timeout, self.store.take(t, key)).flatten(),
        };
        record.map(|r| r.value.to_vec())
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// Seconds since the Unix epoch, the clock of ticket-key periods.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

fn system_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

const TICKET_AAD: &[u8] = b"sudp-ticket-v1";
const TICKET_KEY_LEN: usize = 32;
/// How long a period whose key no node has is not asked for again.
const MISS_HOLD: Duration = Duration::from_secs(1);

/// Stateless TLS tickets under keys the cluster shares (table `ticket-keys`).
///
/// Period `p` = Unix time / period. The key of `p` is 32 random bytes, created by the first
/// node that needs it (ADD, so of two racing nodes one wins and the other reads the
/// winner's), sealed in the store like every value, kept three periods. Tickets are sealed
/// under the current period's key and accepted under the previous one too, so a ticket
/// lives one to two periods; the announced lifetime is one period. Ticket layout:
///
/// ```text
/// +---------------+------------------+---------------------------------+
/// | period (8 BE) | nonce (12 bytes) | AES-256-GCM(state) ‖ tag (16)   |
/// +---------------+------------------+---------------------------------+
/// AAD = "sudp-ticket-v1" ‖ period
/// ```
pub struct StoreTicketer {
    store: Arc<dyn SessionStore>,
    period: u64,
    clock: Clock,
    remote_timeout: Duration,
    keys: Mutex<BTreeMap<u64, Arc<LessSafeKey>>>,
    misses: Mutex<BTreeMap<u64, Instant>>,
    rng: SystemRandom,
}

impl std::fmt::Debug for StoreTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreTicketer(period {} s)", self.period)
    }
}

impl StoreTicketer {
    /// Ticket keys in `store`, rotated every `period` (at least one second).
    pub fn new(store: Arc<dyn SessionStore>, period: Duration) -> StoreTicketer {
        Self::with_clock(store, period, Arc::new(system_clock))
    }

    /// The same on another clock (tests).
    pub fn with_clock(store: Arc<dyn SessionStore>, period: Duration, clock: Clock) -> StoreTicketer {
        StoreTicketer {
            store,
            period: period.as_secs().max(1),
            clock,
            remote_timeout: DEFAULT_REMOTE_TIMEOUT,
            keys: Mutex::new(BTreeMap::new()),
            misses: Mutex::new(BTreeMap::new()),
            rng: SystemRandom::new(),
        }
    }

    fn current_period(&self) -> u64 {
        (self.clock)() / self.period
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.period.saturating_mul(3))
    }

    /// The key of period `p`: cached, else from the store, else (if `create`) a new one
    /// agreed through ADD.
    fn key(&self, p: u64, create: bool) -> Option<Arc<LessSafeKey>> {
        if let Some(k) = lock(&self.keys).get(&p) {
            return Some(k.clone());
        }
        let id = p.to_be_bytes();
        let t = &Table::TICKET_KEYS;
        let held_back = lock(&self.misses)
            .get(&p)
            .is_some_and(|t| t.elapsed() < MISS_HOLD);
        let mut found = self.store.local().get(t, &id);
        if found.is_none() && !held_back {
            found = wait_remote(&self.store, self.remote_timeout, self.store.get(t, &id)).flatten();
        }
        let record = match found {
            Some(r) => r,
            None if create => self.create(p)?,
            None => {
                lock(&self.misses).insert(p, Instant::now());
                return None;
            }
        };
        let key = Arc::new(ticket_key(&record)?);
        let mut keys = lock(&self.keys);
        keys.insert(p, key.clone());
        // Keep the periods that can still be used: the previous, this one and the next.
        let cur = self.current_period();
        keys.retain(|&q, _| q + 1 >= cur && q <= cur + 1);
        lock(&self.misses).retain(|_, at| at.elapsed() < MISS_HOLD);
        Some(key)
    }

    fn create(&self, p: u64) -> Option<Record> {
        let id = p.to_be_bytes();
        let t = &Table::TICKET_KEYS;
        let mut fresh = Zeroizing::new(vec![0u8; TICKET_KEY_LEN]);
        self.rng.fill(&mut fresh).ok()?;
        let ttl = self.ttl();
        let agreed = wait_remote(&self.store, self.remote_timeout, async {
            if self.store.add(t, &id, &fresh, ttl).await? {
                Ok(None)
            } else {
                self.store.get(t, &id).await
            }
        });
        match agreed {
            // We won the ADD (it is in the local tier too) ...
            Some(None) => self.store.local().get(t, &id).or(Some(Record {
                value: fresh,
                version: 1,
            })),
            // ... or another node did first: use its key.
            Some(Some(theirs)) => Some(theirs),
            // No shared store reachable from here: this node's key, shared when it can be.
            None => {
                if !self.store.local().add(t, &id, &fresh, ttl) {
                    return self.store.local().get(t, &id);
                }
                if self.store.is_shared() {
                    if let Ok(handle) = tokio::runtime::Handle::try_current() {
                        let (store, value) = (self.store.clone(), fresh.clone());
                        handle.spawn(async move {
                            let _ = store.add(&Table::TICKET_KEYS, &id, &value, ttl).await;
                        });
                    }
                }
                Some(Record {
                    value: fresh,
                    version: 1,
                })
            }
        }
    }
}

fn ticket_key(record: &Record) -> Option<LessSafeKey> {
    if record.value.len() != TICKET_KEY_LEN {
        tracing::warn!("store: a ticket key of the wrong length; ignored");
        return None;
    }
    Some(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &record.value).ok()?,
    ))
}

fn ticket_aad(p: u64) -> [u8; TICKET_AAD.len() + 8] {
    let mut aad = [0u8; TICKET_AAD.len() + 8];
    aad[..TICKET_AAD.len()].copy_from_slice(TICKET_AAD);
    aad[TICKET_AAD.len()..].copy_from_slice(&p.to_be_bytes());
    aad
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section is one map operation: a poisoned map is still whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ProducesTickets for StoreTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.period).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let p = self.current_period();
        let key = self.key(p, true)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(8 + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&p.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ticket_aad(p)),
                &mut out[8 + NONCE_LEN..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < 8 + NONCE_LEN + 16 {
            return None;
        }
        let p = u64::from_be_bytes(cipher[..8].try_into().ok()?);
        let cur = self.current_period();
        // The previous period's key is still accepted; the next one too, for a node whose
        // clock runs a little ahead of ours.
        if p + 1 < cur || p > cur + 1 {
            return None;
        }
        let key = self.key(p, false)?;
        let nonce = Nonce::try_assume_unique_for_key(&cipher[8..8 + NONCE_LEN]).ok()?;
        let mut buf = cipher[8 + NONCE_LEN..].to_vec();
        let len = key
            .open_in_place(nonce, Aad::from(ticket_aad(p)), &mut buf)
            .ok()?
            .len();
        buf.truncate(len);
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn sessions_live_in_the_store() {
        let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::new(16));
        let s = StoreSessions::new(store.clone());
        assert!(s.can_cache());
        assert!(s.put(b"id".to_vec(), b"state".to_vec()));
        assert!(store.local().get(&Table::TLS_SESSION, b"id").is_some());
        assert_eq!(s.get(b"id").as_deref(), Some(&b"state"[..]));
        assert_eq!(s.take(b"id").as_deref(), Some(&b"state"[..]));
        assert_eq!(s.take(b"id"), None, "single use");
        assert_eq!(s.get(b"id"), None);
    }

    #[test]
    fn tickets_rotate_and_the_previous_key_still_opens() {
        let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::new(16));
        let now = Arc::new(AtomicU64::new(1_000_000));
        let clock: Clock = {
            let now = now.clone();
            Arc::new(move || now.load(Ordering::Relaxed))
        };
        let period = Duration::from_secs(100);
        let a = StoreTicketer::with_clock(store.clone(), period, clock.clone());
        let b = StoreTicketer::with_clock(store.clone(), period, clock);
        assert!(a.enabled());
        assert_eq!(a.lifetime(), 100);
        let t = a.encrypt(b"session state").unwrap();
        assert!(!t.windows(7).any(|w| w == b"session"));
        // Another node on the same store opens it: one key per period, shared.
        assert_eq!(b.decrypt(&t).as_deref(), Some(&b"session state"[..]));
        let t2 = b.encrypt(b"x").unwrap();
        assert_eq!(t2[..8], t[..8]);
        assert_eq!(a.decrypt(&t2).as_deref(), Some(&b"x"[..]));
        // Tampering fails.
        for i in [0, 8, 20, t.len() - 1] {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert_eq!(a.decrypt(&bad), None, "byte {i}");
        }
        assert_eq!(a.decrypt(&t[..20]), None);

        // Next period: a new key, the old tickets still open.
        now.fetch_add(100, Ordering::Relaxed);
        let t3 = a.encrypt(b"y").unwrap();
        assert_ne!(t3[..8], t[..8]);
        assert_eq!(b.decrypt(&t).as_deref(), Some(&b"session state"[..]));
        assert_eq!(b.decrypt(&t3).as_deref(), Some(&b"y"[..]));
        // Two periods on: the first key is no longer accepted.
        now.fetch_add(100, Ordering::Relaxed);
        assert_eq!(b.decrypt(&t), None);
        assert_eq!(a.decrypt(&t), None);
        assert_eq!(a.decrypt(&t3).as_deref(), Some(&b"y"[..]));
        // A ticket naming a period no node has a key for is refused without creating one.
        let mut future = t3.clone();
        future[..8].copy_from_slice(&(1_000_000u64 / 100 + 3).to_be_bytes());
        assert_eq!(a.decrypt(&future), None);
        assert_eq!(store.local().get(&Table::TICKET_KEYS, &future[..8]), None);
    }

    #[test]
    fn unrelated_ticketers_do_not_open_each_others_tickets() {
        let a = StoreTicketer::new(Arc::new(MemoryStore::new(4)), Duration::from_secs(60));
        let b = StoreTicketer::new(Arc::new(MemoryStore::new(4)), Duration::from_secs(60));
        let t = a.encrypt(b"state").unwrap();
        assert_eq!(b.decrypt(&t), None);
        assert_eq!(a.decrypt(&t).as_deref(), Some(&b"state"[..]));
    }
}
