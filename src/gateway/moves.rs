//! Associations that move: their records in the session store, and the claim a re-attach
//! makes on one (PROTOCOL.md §2.7 REATTACH, §3.1 epochs, docs/CLUSTER.md).
//!
//! Every secure association with an authenticated owner has a record in the store's
//! `association` table, keyed by its 8-byte id:
//!
//! ```text
//! +--------+-------+-------+---------+------------+----------+-------------+
//! | FORMAT | EPOCH | SUITE | NODE    | CREATED_MS | OWNERLEN | OWNER       |
//! +--------+-------+-------+---------+------------+----------+-------------+
//! |   1    | 4 BE  |   1   | 8 BE    | 8 BE       | 2 BE     | OWNERLEN    |
//! +--------+-------+-------+---------+------------+----------+-------------+
//! ```
//!
//! sealed by the store like every value (only the nodes read it). The node that serves the
//! association keeps the record alive (an UPDATE every third of its TTL) and checks it once
//! a second: a record that names another node or a newer epoch means another connection
//! re-attached the association, and this node ends its copy (`moved`). A re-attach claims
//! the record with a compare-and-set UPDATE that bumps the epoch, so of two nodes claiming
//! one association at once exactly one wins, and every epoch is claimed once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::proto::frame::RefuseReason;
use crate::proto::{AssociationId, CipherSuite};
use crate::store::{SessionStore, Table, Update};

/// The first byte of a record: its layout.
const FORMAT: u8 = 1;
/// Longest owner identity a record holds (qualified names are far shorter).
const MAX_OWNER: usize = 1024;
/// Shortest and longest time a record outlives its last refresh.
const MIN_TTL: Duration = Duration::from_secs(30);
const MAX_TTL: Duration = Duration::from_secs(3600);
/// How often the serving node checks its records (cheap: the local tier answers until
/// another node's UPDATE evicts it).
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(1);

/// An association's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AssocRecord {
    /// 0 when opened; one more at each re-attach.
    pub epoch: u32,
    /// The suite of its keys (every epoch keeps it).
    pub suite: CipherSuite,
    /// The node serving it now ([`node_id`]).
    pub node: u64,
    /// When it was opened (Unix milliseconds).
    pub created_ms: u64,
    /// The qualified identity that opened it; only it may re-attach.
    pub owner: String,
}

impl AssocRecord {
    /// A new association's record (epoch 0) served by `node`.
    pub fn new(suite: CipherSuite, node: u64, owner: &str) -> AssocRecord {
        let created_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        AssocRecord {
            epoch: 0,
            suite,
            node,
            created_ms,
            owner: owner.to_owned(),
        }
    }

    /// The record's bytes (the store seals them).
    pub fn encode(&self) -> Vec<u8> {
        let owner = &self.owner.as_bytes()[..self.owner.len().min(MAX_OWNER)];
        let mut out = Vec::with_capacity(24 + owner.len());
        out.push(FORMAT);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.push(self.suite.id());
        out.extend_from_slice(&self.node.to_be_bytes());
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        out.extend_from_slice(&(owner.len() as u16).to_be_bytes());
        out.extend_from_slice(owner);
        out
    }

    /// Parses a record; `None` for any other layout (a newer format, a damaged value).
    pub fn decode(b: &[u8]) -> Option<AssocRecord> {
        if b.len() < 24 || b[0] != FORMAT {
            return None;
        }
        let epoch = u32::from_be_bytes(b[1..5].try_into().ok()?);
        let suite = CipherSuite::from_id(b[5])?;
        let node = u64::from_be_bytes(b[6..14].try_into().ok()?);
        let created_ms = u64::from_be_bytes(b[14..22].try_into().ok()?);
        let n = u16::from_be_bytes([b[22], b[23]]) as usize;
        if b.len() != 24 + n {
            return None;
        }
        let owner = String::from_utf8(b[24..].to_vec()).ok()?;
        Some(AssocRecord {
            epoch,
            suite,
            node,
            created_ms,
            owner,
        })
    }
}

/// This process's node id: random, drawn once (records name the node serving them).
pub(crate) fn node_id() -> u64 {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ID.get_or_init(rand::random)
}

/// How long a record outlives its last refresh: the gateway's idle timeout (an association
/// idle that long ends anyway), within 30 s..1 h.
pub(crate) fn record_ttl(idle_timeout: Duration) -> Duration {
    idle_timeout.clamp(MIN_TTL, MAX_TTL)
}

/// What the serving node keeps of its association's record.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub id: AssociationId,
    pub record: AssocRecord,
    /// The store version last written.
    pub version: u64,
    pub ttl: Duration,
    pub refreshed: std::time::Instant,
}

/// The answer of [`Held::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Still ours.
    Ours,
    /// Another connection (of this node or another) re-attached it.
    Moved,
}

impl Held {
    /// Writes the record of a new association (ADD). Store failures fall back to the local
    /// tier inside the store; a key that exists already (an id collision across nodes,
    /// practically never) is `None`: the caller refuses the association.
    pub async fn announce(
        store: &dyn SessionStore,
        id: AssociationId,
        record: AssocRecord,
        ttl: Duration,
    ) -> Option<Held> {
        match store
            .add(&Table::ASSOCIATION, &id.to_bytes(), &record.encode(), ttl)
            .await
        {
            Ok(true) => Some(Held {
                id,
                record,
                version: 1,
                ttl,
                refreshed: std::time::Instant::now(),
            }),
            Ok(false) => None,
            Err(e) => {
                // Only a programming error (a zero TTL, a bad name) gets here.
                tracing::error!(assoc = %id, error = %e, "association record not written");
                None
            }
        }
    }

    /// Whether the record still names this node and epoch; refreshes it when a third of
    /// its TTL has passed. A record gone (expired, purged) is written again.
    pub async fn check(&mut self, store: &dyn SessionStore) -> Standing {
        let key = self.id.to_bytes();
        let current = match store.get(&Table::ASSOCIATION, &key).await {
            Ok(r) => r,
            // Cannot tell: keep serving (the store logs its outage).
            Err(_) => return Standing::Ours,
        };
        if let Some(r) = &current {
            match AssocRecord::decode(&r.value) {
                Some(rec) if rec.node == self.record.node && rec.epoch == self.record.epoch => {
                    self.version = r.version;
                }
                _ => return Standing::Moved,
            }
        }
        if current.is_some() && self.refreshed.elapsed() < self.ttl / 3 {
            return Standing::Ours;
        }
        self.refreshed = std::time::Instant::now();
        let value = self.record.encode();
        let written = match current {
            None => store
                .add(&Table::ASSOCIATION, &key, &value, self.ttl)
                .await
                .map(|added| {
                    if added {
                        Update::Updated { version: 1 }
                    } else {
                        Update::Conflict
                    }
                }),
            Some(_) => {
                store
                    .update(&Table::ASSOCIATION, &key, self.version, &value, self.ttl)
                    .await
            }
        };
        match written {
            Ok(Update::Updated { version }) => {
                self.version = version;
                Standing::Ours
            }
            // Someone wrote it between our read and write: read again next time.
            Ok(Update::Conflict) | Ok(Update::Missing) | Err(_) => Standing::Ours,
        }
    }

    /// Deletes the record: the association ended for good (idle, key exhausted).
    pub async fn release(&self, store: &dyn SessionStore) {
        let _ = store.delete(&Table::ASSOCIATION, &self.id.to_bytes()).await;
    }

    /// Claims association `id` for `owner` on `node`: the record must exist and name
    /// `owner`; its epoch goes up by one in a compare-and-set UPDATE (retried on a
    /// concurrent refresh). Returns what this node now holds.
    pub async fn claim(
        store: &dyn SessionStore,
        id: AssociationId,
        owner: &str,
        node: u64,
        ttl: Duration,
    ) -> Result<Held, RefuseReason> {
        let key = id.to_bytes();
        for _ in 0..4 {
            let current = store
                .get(&Table::ASSOCIATION, &key)
                .await
                .map_err(|_| RefuseReason::Busy)?
                .ok_or(RefuseReason::Unknown)?;
            let Some(mut rec) = AssocRecord::decode(&current.value) else {
                return Err(RefuseReason::Unknown);
            };
            // The owner is compared in full, not in constant time: identities are not
            // secrets, and the caller authenticated as `owner` already.
            if rec.owner != owner {
                return Err(RefuseReason::NotOwner);
            }
            rec.epoch = rec.epoch.checked_add(1).ok_or(RefuseReason::Busy)?;
            rec.node = node;
            match store
                .update(&Table::ASSOCIATION, &key, current.version, &rec.encode(), ttl)
                .await
            {
                Ok(Update::Updated { version }) => {
                    return Ok(Held {
                        id,
                        record: rec,
                        version,
                        ttl,
                        refreshed: std::time::Instant::now(),
                    })
                }
                Ok(Update::Conflict) => continue,
                Ok(Update::Missing) => return Err(RefuseReason::Unknown),
                Err(_) => return Err(RefuseReason::Busy),
            }
        }
        Err(RefuseReason::Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn rec() -> AssocRecord {
        AssocRecord::new(CipherSuite::Aes256CbcHmacSha256, 7, "alice")
    }

    #[test]
    fn records_round_trip_and_refuse_other_layouts() {
        let r = rec();
        let b = r.encode();
        assert_eq!(AssocRecord::decode(&b), Some(r));
        assert_eq!(AssocRecord::decode(&b[..b.len() - 1]), None);
        let mut other = b.clone();
        other[0] = 2;
        assert_eq!(AssocRecord::decode(&other), None);
        let mut suite = b.clone();
        suite[5] = 0x7f;
        assert_eq!(AssocRecord::decode(&suite), None);
        assert_eq!(AssocRecord::decode(&[]), None);
    }

    #[tokio::test]
    async fn a_claim_bumps_the_epoch_once_and_checks_the_owner() {
        let store = MemoryStore::default();
        let id = AssociationId(42);
        let ttl = Duration::from_secs(60);
        let mut a = Held::announce(&store, id, rec(), ttl).await.unwrap();
        // A second ADD of the same id is refused (a collision).
        assert!(Held::announce(&store, id, rec(), ttl).await.is_none());
        assert_eq!(a.check(&store).await, Standing::Ours);

        assert_eq!(
            Held::claim(&store, id, "mallory", 9, ttl).await.unwrap_err(),
            RefuseReason::NotOwner
        );
        assert_eq!(
            Held::claim(&store, AssociationId(43), "alice", 9, ttl)
                .await
                .unwrap_err(),
            RefuseReason::Unknown
        );
        let b = Held::claim(&store, id, "alice", 9, ttl).await.unwrap();
        assert_eq!((b.record.epoch, b.record.node), (1, 9));
        // The first holder learns it moved.
        assert_eq!(a.check(&store).await, Standing::Moved);
        let mut c = Held::claim(&store, id, "alice", 7, ttl).await.unwrap();
        assert_eq!(c.record.epoch, 2);
        assert_eq!(c.check(&store).await, Standing::Ours);
        c.release(&store).await;
        assert_eq!(
            Held::claim(&store, id, "alice", 7, ttl).await.unwrap_err(),
            RefuseReason::Unknown
        );
    }

    #[test]
    fn ttls_are_clamped() {
        assert_eq!(record_ttl(Duration::from_secs(1)), MIN_TTL);
        assert_eq!(record_ttl(Duration::from_secs(300)), Duration::from_secs(300));
        assert_eq!(record_ttl(Duration::from_secs(86_400)), MAX_TTL);
    }
}
