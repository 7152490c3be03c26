//! The in-process tier: a bounded map of records with TTL expiry and oldest-first eviction.
//! Alone it is [`MemoryStore`], the single-node default; in a cluster it is the first tier
//! of every node ([`super::RedisStore`]).
//!
//! Synchronous on purpose (a `std` mutex held for a map operation, never across an await):
//! rustls reads its session storage inside the handshake, where it cannot wait.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::{ttl_ms, Record, SessionStore, StoreFuture, Table, Update};

/// A bounded map of records: at most `capacity` of them, each with an expiry time. When
/// full, the record written longest ago goes first (oldest-first: a read does not renew it,
/// so that the hot path of a read takes no extra bookkeeping). An expired record is never
/// returned.
#[derive(Debug)]
pub struct MemoryTier {
    inner: Mutex<Inner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Vec<u8>, Entry>,
    /// Write order: sequence number -> map key. The first entry is the oldest.
    order: BTreeMap<u64, Vec<u8>>,
    next_seq: u64,
}

#[derive(Debug)]
struct Entry {
    value: Zeroizing<Vec<u8>>,
    version: u64,
    expires: Instant,
    seq: u64,
}

/// The map key: table length, table, record key. The length prefix keeps ("ab", "c") and
/// ("a", "bc") apart.
fn map_key(table: &Table, key: &[u8]) -> Vec<u8> {
    let t = table.as_str().as_bytes();
    let mut k = Vec::with_capacity(1 + t.len() + key.len());
    // Table names are at most MAX_NAME_LEN (64) bytes, so the length fits in a byte.
    k.push(t.len() as u8);
    k.extend_from_slice(t);
    k.extend_from_slice(key);
    k
}

fn in_table(map_key: &[u8], table: &Table) -> bool {
    let t = table.as_str().as_bytes();
    map_key.first() == Some(&(t.len() as u8)) && map_key.get(1..1 + t.len()) == Some(t)
}

impl MemoryTier {
    /// A tier of at most `capacity` records (at least one).
    pub fn new(capacity: usize) -> MemoryTier {
        MemoryTier {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
        }
    }

    /// Most records held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records held now (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether the tier holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live record under `key`, if any.
    pub fn get(&self, table: &Table, key: &[u8]) -> Option<Record> {
        let k = map_key(table, key);
        let mut inner = self.lock();
        let now = Instant::now();
        match inner.map.get(&k) {
            Some(e) if e.expires > now => Some(Record {
                value: e.value.clone(),
                version: e.version,
            }),
            Some(_) => {
                inner.remove(&k);
                None
            }
            None => None,
        }
    }

    /// The live record under `key` and the time it has left.
    pub fn get_with_ttl(&self, table: &Table, key: &[u8]) -> Option<(Record, Duration)> {
        let k = map_key(table, key);
        let inner = self.lock();
        let now = Instant::now();
        let e = inner.map.get(&k).filter(|e| e.expires > now)?;
        Some((
            Record {
                value: e.value.clone(),
                version: e.version,
            },
            e.expires - now,
        ))
    }

    /// Writes `value` at `version`, replacing any record under `key`.
    pub fn insert(&self, table: &Table, key: &[u8], value: &[u8], version: u64, ttl: Duration) {
        let k = map_key(table, key);
        let expires = Instant::now() + ttl;
        self.lock().insert(k, value, version, expires, self.capacity);
    }

    /// ADD: writes `value` at version 1 unless a live record exists under `key`.
    pub fn add(&self, table: &Table, key: &[u8], value: &[u8], ttl: Duration) -> bool {
        let k = map_key(table, key);
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.map.get(&k).is_some_and(|e| e.expires > now) {
            return false;
        }
        inner.insert(k, value, 1, now + ttl, self.capacity);
        true
    }

    /// UPDATE: compare-and-set on the version.
    pub fn update(&self, table: &Table, key: &[u8], expected: u64, value: &[u8], ttl: Duration) -> Update {
        let k = map_key(table, key);
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.map.get(&k) {
            Some(e) if e.expires <= now => {
                inner.remove(&k);
                Update::Missing
            }
            None => Update::Missing,
            Some(e) if e.version != expected => Update::Conflict,
            Some(_) => {
                let version = expected.saturating_add(1);
                inner.insert(k, value, version, now + ttl, self.capacity);
                Update::Updated { version }
            }
        }
    }

    /// Removes and returns the live record under `key`.
    pub fn remove(&self, table: &Table, key: &[u8]) -> Option<Record> {
        let k = map_key(table, key);
        let e = self.lock().remove(&k)?;
        (e.expires > Instant::now()).then_some(Record {
            value: e.value,
            version: e.version,
        })
    }

    /// Removes every record of `table`; returns how many there were.
    pub fn purge_table(&self, table: &Table) -> u64 {
        let mut inner = self.lock();
        let doomed: Vec<Vec<u8>> = inner.map.keys().filter(|k| in_table(k, table)).cloned().collect();
        for k in &doomed {
            inner.remove(k);
        }
        doomed.len() as u64
    }

    /// Removes everything.
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.map.clear();
        inner.order.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a map that is still consistent enough for a
        // cache (each operation is a few map calls), so a poisoned lock is used as is.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn insert(&mut self, k: Vec<u8>, value: &[u8], version: u64, expires: Instant, capacity: usize) {
        self.remove(&k);
        while self.map.len() >= capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.map.remove(&oldest);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, k.clone());
        self.map.insert(
            k,
            Entry {
                value: Zeroizing::new(value.to_vec()),
                version,
                expires,
                seq,
            },
        );
    }

    fn remove(&mut self, k: &[u8]) -> Option<Entry> {
        let e = self.map.remove(k)?;
        self.order.remove(&e.seq);
        Some(e)
    }
}

/// The single-node store: a [`MemoryTier`] alone.
#[derive(Debug)]
pub struct MemoryStore {
    tier: MemoryTier,
}

impl MemoryStore {
    /// A store of at most `capacity` records.
    pub fn new(capacity: usize) -> MemoryStore {
        MemoryStore {
            tier: MemoryTier::new(capacity),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(super::DEFAULT_LOCAL_CAPACITY)
    }
}

impl SessionStore for MemoryStore {
    fn get<'a>(&'a self, table: &'a Table, key: &'a [u8]) -> StoreFuture<'a, Option<Record>> {
        Box::pin(async move { Ok(self.tier.get(table, key)) })
    }

    fn take<'a>(&'a self, table: &'a Table, key: &'a [u8]) -> StoreFuture<'a, Option<Record>> {
        Box::pin(async move { Ok(self.tier.remove(table, key)) })
    }

    fn add<'a>(
        &'a self,
        table: &'a Table,
        key: &'a [u8],
        value: &'a [u8],
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            ttl_ms(ttl)?;
            Ok(self.tier.add(table, key, value, ttl))
        })
    }

    fn update<'a>(
        &'a self,
        table: &'a Table,
        key: &'a [u8],
        expected: u64,
        value: &'a [u8],
        ttl: Duration,
    ) -> StoreFuture<'a, Update> {
        Box::pin(async move {
            ttl_ms(ttl)?;
            Ok(self.tier.update(table, key, expected, value, ttl))
        })
    }

    fn delete<'a>(&'a self, table: &'a Table, key: &'a [u8]) -> StoreFuture<'a, bool> {
        Box::pin(async move { Ok(self.tier.remove(table, key).is_some()) })
    }

    fn purge<'a>(&'a self, table: &'a Table) -> StoreFuture<'a, u64> {
        Box::pin(async move { Ok(self.tier.purge_table(table)) })
    }

    fn local(&self) -> &MemoryTier {
        &self.tier
    }

    fn is_shared(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    const T: Table = Table::TLS_SESSION;
    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn add_get_update_delete() {
        let m = MemoryTier::new(8);
        assert!(m.add(&T, b"k", b"v1", LONG));
        assert!(
            !m.add(&T, b"k", b"other", LONG),
            "ADD of an existing key must fail"
        );
        let r = m.get(&T, b"k").unwrap();
        assert_eq!((&r.value[..], r.version), (&b"v1"[..], 1));
        assert_eq!(m.update(&T, b"k", 2, b"x", LONG), Update::Conflict);
        assert_eq!(m.update(&T, b"k", 1, b"v2", LONG), Update::Updated { version: 2 });
        assert_eq!(
            m.update(&T, b"k", 1, b"v3", LONG),
            Update::Conflict,
            "a stale CAS loses"
        );
        assert_eq!(&m.get(&T, b"k").unwrap().value[..], b"v2");
        assert_eq!(m.update(&T, b"nope", 1, b"x", LONG), Update::Missing);
        assert!(m.remove(&T, b"k").is_some());
        assert!(m.get(&T, b"k").is_none());
    }

    #[test]
    fn tables_keep_keys_apart() {
        let m = MemoryTier::new(8);
        let other = Table::new("tls").unwrap();
        let other2 = Table::new("tls-sessio").unwrap();
        assert!(m.add(&T, b"k", b"a", LONG));
        assert!(m.add(&other, b"k", b"b", LONG));
        assert!(m.add(&other2, b"nk", b"c", LONG));
        assert_eq!(&m.get(&T, b"k").unwrap().value[..], b"a");
        assert_eq!(&m.get(&other, b"k").unwrap().value[..], b"b");
        assert_eq!(m.purge_table(&T), 1);
        assert!(m.get(&T, b"k").is_none());
        assert!(m.get(&other, b"k").is_some());
        assert!(m.get(&other2, b"nk").is_some());
    }

    #[test]
    fn expired_records_are_gone() {
        let m = MemoryTier::new(8);
        assert!(m.add(&T, b"k", b"v", Duration::from_millis(30)));
        assert!(m.get(&T, b"k").is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(m.get(&T, b"k").is_none());
        assert!(
            m.add(&T, b"k", b"again", LONG),
            "an expired key can be added again"
        );
        assert_eq!(m.get(&T, b"k").unwrap().version, 1);
        assert!(m.add(&T, b"e", b"v", Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(m.update(&T, b"e", 1, b"x", LONG), Update::Missing);
        assert!(m.remove(&T, b"e").is_none());
    }

    #[test]
    fn oldest_is_evicted_first_and_the_bound_holds() {
        let m = MemoryTier::new(3);
        for i in 0u8..3 {
            m.insert(&T, &[i], b"v", 1, LONG);
        }
        // Rewriting 0 makes it the newest: 1 is now the oldest.
        m.insert(&T, &[0], b"v", 1, LONG);
        m.insert(&T, &[3], b"v", 1, LONG);
        assert_eq!(m.len(), 3);
        assert!(m.get(&T, &[1]).is_none());
        for i in [0u8, 2, 3] {
            assert!(m.get(&T, &[i]).is_some(), "{i}");
        }
        for i in 0u8..100 {
            m.insert(&T, &[i, 1], b"v", 1, LONG);
        }
        assert_eq!(m.len(), 3);
        m.clear();
        assert!(m.is_empty());
    }

    #[tokio::test]
    async fn memory_store_implements_the_trait() {
        let s: &dyn SessionStore = &MemoryStore::new(4);
        assert!(!s.is_shared());
        assert!(s.add(&T, b"k", b"v", LONG).await.unwrap());
        assert!(!s.add(&T, b"k", b"v", LONG).await.unwrap());
        assert!(matches!(
            s.add(&T, b"z", b"v", Duration::ZERO).await,
            Err(StoreError::ZeroTtl)
        ));
        assert_eq!(
            s.update(&T, b"k", 1, b"w", LONG).await.unwrap(),
            Update::Updated { version: 2 }
        );
        assert_eq!(&s.get(&T, b"k").await.unwrap().unwrap().value[..], b"w");
        assert_eq!(s.take(&T, b"k").await.unwrap().unwrap().version, 2);
        assert!(!s.delete(&T, b"k").await.unwrap());
        assert!(s.add(&T, b"k", b"v", LONG).await.unwrap());
        assert_eq!(s.purge(&T).await.unwrap(), 1);
        assert!(s.local().is_empty());
    }
}
