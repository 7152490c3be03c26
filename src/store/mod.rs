//! The session store: what the nodes of a cluster share (TLS sessions, ticket keys, and
//! later association records), behind one trait, [`SessionStore`].
//!
//! Two implementations, after the distributed session cache of seed 004 (FIGS. 7-9: a local
//! tier in every node, a repository tier behind them; records with a key, a table id and a
//! time to live; ADD, GET, UPDATE, DELETE and a purge):
//!
//! * [`MemoryStore`]: the bounded in-process tier alone ([`MemoryTier`]: oldest-first
//!   eviction, TTL expiry). The embedded default of a single node: nothing to install.
//! * [`RedisStore`]: a [`MemoryTier`] in front of Redis as the repository tier. GET reads the
//!   local tier first, then Redis, and fills the local tier; DELETE and UPDATE reach the
//!   other nodes' local tiers through Redis pub/sub; values in Redis are sealed
//!   ([`seal`]) under a key derived from the cluster key, which never leaves the node.
//!
//! Every record has a TTL, and a version that starts at 1 on ADD and grows by one on every
//! UPDATE: UPDATE is a compare-and-set on the version, so of two nodes updating the same
//! record from the same version exactly one wins (an association's epoch, bumped by
//! whichever node re-attaches it, needs that).
//!
//! This module knows nothing of the gateway or the shim; [`tls`] adapts it to rustls'
//! session storage and ticket hooks. `docs/CLUSTER.md` describes keys, TTLs, sealing and
//! the pub/sub channel.

pub mod cli;
pub mod memory;
pub mod redis;
pub mod seal;
pub mod tls;

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use zeroize::Zeroizing;

pub use memory::{MemoryStore, MemoryTier};
pub use redis::{RedisOptions, RedisStore};
pub use seal::{ClusterKey, Sealer};

/// Records a [`MemoryTier`] holds by default.
pub const DEFAULT_LOCAL_CAPACITY: usize = 16_384;

/// Longest cluster or table name.
pub const MAX_NAME_LEN: usize = 64;

/// What a record is: the table id the seed prefixes to every key, so that one key (a TLS
/// session id, say) can name different records in different tables.
///
/// Names are 1 to [`MAX_NAME_LEN`] characters of `a-z A-Z 0-9 - _ .`: nothing that is special
/// in a Redis key pattern (`* ? [ ] \`) or that separates the parts of a key (`:`), so that
/// a purge's `SCAN MATCH` pattern matches exactly one table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Table(Cow<'static, str>);

impl Table {
    /// Stateful TLS resumption: TLS 1.3 tickets that are lookup keys, TLS 1.2 session ids.
    pub const TLS_SESSION: Table = Table(Cow::Borrowed("tls-session"));
    /// Keys that seal stateless TLS tickets, one per rotation period.
    pub const TICKET_KEYS: Table = Table(Cow::Borrowed("ticket-keys"));
    /// Association records (issue 9, item 3).
    pub const ASSOCIATION: Table = Table(Cow::Borrowed("association"));

    /// A table named `name`, checked.
    pub fn new(name: &str) -> Result<Table, StoreError> {
        check_name("table", name)?;
        Ok(Table(Cow::Owned(name.to_owned())))
    }

    /// The name, as it appears in Redis keys.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a cluster or table name (see [`Table`]).
pub fn check_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName {
            what,
            name: name.to_owned(),
        })
    }
}

/// One record as a reader gets it: the opened value and its version.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    /// The value, in the clear (it was sealed only in the repository).
    pub value: Zeroizing<Vec<u8>>,
    /// 1 after ADD, one more after each UPDATE.
    pub version: u64,
}

impl fmt::Debug for Record {
    // Values are secrets (TLS resumption state, ticket keys): never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Record(version {}, {} bytes)", self.version, self.value.len())
    }
}

/// What an UPDATE did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Update {
    /// Written; the record now has this version.
    Updated {
        /// The new version (the expected one plus one).
        version: u64,
    },
    /// There is no such record (never added, deleted, expired or purged).
    Missing,
    /// The record exists with another version: another writer got there first. Read it
    /// again and decide.
    Conflict,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A cluster or table name outside the allowed alphabet or length.
    #[error("invalid {what} name {name:?}: 1 to 64 characters of a-z A-Z 0-9 - _ .")]
    BadName {
        /// "cluster" or "table".
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// A write without a time to live.
    #[error("a record needs a time to live of at least 1 ms")]
    ZeroTtl,
    /// The store URL is not one this build serves.
    #[error("store URL: {reason}")]
    Url {
        /// What is wrong (the URL itself is not repeated: it may carry a password).
        reason: String,
    },
    /// The repository (Redis) cannot be reached or refused the command.
    #[error("Redis at {addr}: {reason}")]
    Unavailable {
        /// Host and port (never the password).
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The cluster-key file cannot be read or written, or is malformed.
    #[error("cluster key {path}: {reason}")]
    ClusterKey {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Rng,
}

/// The future every [`SessionStore`] operation returns: boxed, so that the trait is
/// object-safe and a node holds an `Arc<dyn SessionStore>` whatever the backend.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The session store: the operations of the seed's distributed cache API, every write with
/// a time to live.
///
/// A repository that cannot be reached does not fail GET, ADD, UPDATE or DELETE: they fall
/// back to the local tier (logged once per outage) so that a node keeps serving. PURGE is an
/// operator's request and does report an unreachable repository.
pub trait SessionStore: Send + Sync + fmt::Debug {
    /// GET: the record, from the local tier or else the repository (which then fills the
    /// local tier).
    fn get<'a>(&'a self, table: &'a Table, key: &'a [u8]) -> StoreFuture<'a, Option<Record>>;

    /// GET and DELETE in one step: of several nodes taking one record, at most one gets it
    /// from the repository (single-use TLS 1.3 tickets).
    fn take<'a>(&'a self, table: &'a Table, key: &'a [u8]) -> StoreFuture<'a, Option<Record>>;

    /// ADD: creates the record at version 1. `false` if the key already exists (the
    /// existing record is left as it is).
    fn add<'a>(
        &'a self,
        table: &'a Table,
        key: &'a [u8],
        value: &'a [u8],
        ttl: Duration,
    ) -> StoreFuture<'a, bool>;

    /// UPDATE: replaces the record if its version is still `expected` (compare-and-set);
    /// the TTL starts again.
    fn update<'a>(
        &'a self,
        table: &'a Table,
        key: &'a [u8],
        expected: u64,
        value: &'a [u8],
        ttl: Duration,
    ) -> StoreFuture<'a, Update>;

    /// DELETE: removes the record here, in the repository and in every node's local tier.
    /// `true` if it existed (here or in the repository).
    fn delete<'a>(&'a self, table: &'a Table, key: &'a [u8]) -> StoreFuture<'a, bool>;

    /// PURGE: removes every record of `table`, everywhere. Returns how many the repository
    /// held (or, without one, the local tier).
    fn purge<'a>(&'a self, table: &'a Table) -> StoreFuture<'a, u64>;

    /// The node's local tier, for callers that must not wait (rustls calls its session
    /// storage synchronously inside the handshake).
    fn local(&self) -> &MemoryTier;

    /// Whether records are shared with other nodes (a repository behind the local tier).
    fn is_shared(&self) -> bool;

    /// Connects to the repository and starts listening to the other nodes, in the
    /// background, so that the first operation that needs them does not wait for it. Call
    /// from within a tokio runtime (the gateway does when it binds). Idempotent.
    fn start(&self) {}
}

fn ttl_ms(ttl: Duration) -> Result<u64, StoreError> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        Err(StoreError::ZeroTtl)
    } else {
        Ok(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["tls-session", "a", "Cluster_1.prod", &"x".repeat(64)] {
            assert!(Table::new(good).is_ok(), "{good}");
        }
        for bad in ["", "a:b", "a*", "t?", "[x]", "a b", "é", &"x".repeat(65), "a\\b"] {
            assert!(Table::new(bad).is_err(), "{bad}");
        }
        assert!(check_name("table", Table::TLS_SESSION.as_str()).is_ok());
        assert!(check_name("table", Table::TICKET_KEYS.as_str()).is_ok());
        assert!(check_name("table", Table::ASSOCIATION.as_str()).is_ok());
    }

    #[test]
    fn ttls_must_be_positive() {
        assert!(matches!(ttl_ms(Duration::ZERO), Err(StoreError::ZeroTtl)));
        assert!(matches!(
            ttl_ms(Duration::from_micros(999)),
            Err(StoreError::ZeroTtl)
        ));
        assert_eq!(ttl_ms(Duration::from_secs(2)).unwrap(), 2000);
    }

    #[test]
    fn records_do_not_print_their_value() {
        let r = Record {
            value: Zeroizing::new(b"secret".to_vec()),
            version: 3,
        };
        assert_eq!(format!("{r:?}"), "Record(version 3, 6 bytes)");
    }
}
