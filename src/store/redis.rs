//! The cluster store: a [`MemoryTier`] in front of Redis, the repository tier.
//!
//! * Redis is one address (`redis://`, `rediss://`) or the primary of a Sentinel service
//!   (`redis+sentinel://`), asked of the sentinels on every new connection so that the
//!   store follows a failover.
//! * Keys are `sudp:<cluster>:<table>:<hex of the record key>`; every record is written
//!   with `PX` (its TTL), so Redis expires it by itself; values are sealed ([`Sealer`]).
//! * GET reads the local tier, then Redis (`GET` + `PTTL`), and fills the local tier with
//!   what Redis had, for the time Redis still keeps it.
//! * ADD is `SET NX PX`. UPDATE, DELETE and TAKE are Lua scripts, so that the check, the
//!   write and the notice to the other nodes are one atomic step in Redis; UPDATE compares
//!   the version stored in the clear at the front of the value.
//! * DELETE, UPDATE, TAKE and PURGE publish a notice on the cluster's channel
//!   `sudp:<cluster>:events`; every node's subscriber evicts the record (or the table) from
//!   its local tier and ignores its own notices. Pub/sub rather than keyspace
//!   notifications: it works on managed Redis where `notify-keyspace-events` cannot be set,
//!   carries only what we publish (no event per expiry or per unrelated key), and names the
//!   node that sent it.
//! * Filling the local tier is safe only while the subscriber hears every notice: the tier
//!   is cleared whenever the subscriber (re)connects, a fill happens only while it is
//!   subscribed, and only if no notice arrived between the read and the fill (a counter
//!   that every notice and every (re)subscription bumps).
//! * Redis down: the first failure is logged once, operations fall back to the local tier
//!   (reads that miss it miss, writes stay local), and the connection manager and the
//!   subscriber reconnect by themselves when Redis returns; the next success is logged.
//!   What a node wrote during an outage stays local and is dropped when its subscriber
//!   reconnects (notices it missed cannot be known): at worst a few full TLS handshakes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::FromRedisValue;

use super::memory::MemoryTier;
use super::seal::{ClusterKey, Sealer};
use super::{check_name, ttl_ms, Record, SessionStore, StoreError, StoreFuture, Table, Update};

/// UPDATE as one atomic step: compare the version (the first 8 bytes), write, notify.
/// Returns 1 written, 0 missing, -1 another version.
const UPDATE_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
if string.sub(cur, 1, 8) ~= ARGV[1] then return -1 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
";

/// TAKE: read and delete (and notify) in one step, so one node at most gets the value.
const TAKE_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[1], ARGV[2])
end
return v
";

/// DELETE and notify.
const DELETE_SCRIPT: &str = r"
local n = redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
";

/// Keys a purge deletes per `UNLINK`.
const PURGE_BATCH: usize = 500;

/// Tuning of a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Records the local tier holds.
    pub local_capacity: usize,
    /// Limit on one Redis command (a slower Redis counts as down for that operation).
    pub op_timeout: Duration,
    /// Limit on connecting to Redis.
    pub connect_timeout: Duration,
    /// Wait after a failed connection attempt before the next one.
    pub retry_delay: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            local_capacity: super::DEFAULT_LOCAL_CAPACITY,
            op_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(1),
            retry_delay: Duration::from_millis(500),
        }
    }
}

/// A node's store in a cluster: local tier, Redis behind it, pub/sub between the nodes.
///
/// Built without connecting (so a gateway starts while Redis is down); it connects on first
/// use, or on [`RedisStore::start`].
#[derive(Debug, Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    target: Target,
    /// `host:port` for logs: never the URL, which may hold a password.
    addr: String,
    /// `sudp:<cluster>:`
    prefix: String,
    /// `sudp:<cluster>:events`
    channel: String,
    /// This node's id in notices, so that it ignores its own.
    node: u64,
    sealer: Sealer,
    local: MemoryTier,
    opts: RedisOptions,
    manager: Mutex<Option<ConnectionManager>>,
    next_attempt: Mutex<Option<Instant>>,
    /// Held while connecting.
    connecting: tokio::sync::Mutex<()>,
    /// Whether the last contact with Redis worked (for logging each outage once).
    up: AtomicBool,
    /// Outages seen (each logged once).
    outages: AtomicU64,
    /// Whether the subscriber hears notices now.
    subscribed: AtomicBool,
    /// Bumped by every notice from another node and every (re)subscription.
    notices: AtomicU64,
    subscriber: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.subscriber).take() {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section is a single assignment or clone, so a poisoned value is whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where the repository is: one address, or the primary of a Sentinel-monitored service.
enum Target {
    Direct(redis::Client),
    /// Asked for the current primary on every new connection, so that after a failover the
    /// store follows the promoted replica.
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Direct(_) => "Direct",
            Target::Sentinel(_) => "Sentinel",
        })
    }
}

impl Target {
    /// A client for the repository now (for Sentinel, the primary the sentinels name).
    async fn resolve(&self) -> redis::RedisResult<redis::Client> {
        match self {
            Target::Direct(c) => Ok(c.clone()),
            Target::Sentinel(s) => s.lock().await.async_get_client().await,
        }
    }
}

const URL_FORMS: &str = "expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB or \
     redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]";

/// Parses a store URL without connecting: the target and a name for logs (never the
/// password).
///
/// `redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]` names the
/// sentinels (plain TCP, no password) and the service; user, password and database are
/// those of the Redis primary.
fn target(url: &str) -> Result<(Target, String), StoreError> {
    let bad = |reason: String| StoreError::Url { reason };
    if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        let (authority, path) = rest.split_once('/').ok_or_else(|| bad(URL_FORMS.into()))?;
        let (creds, hosts) = match authority.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, authority),
        };
        let sentinels: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{h}"))
            .collect();
        let (service, db) = match path.split_once('/') {
            Some((s, db)) => (s, db),
            None => (path, "0"),
        };
        let db: i64 = db
            .parse()
            .map_err(|_| bad(format!("database {db:?} is not a number")))?;
        if sentinels.is_empty() || service.is_empty() {
            return Err(bad(URL_FORMS.into()));
        }
        let mut node = redis::RedisConnectionInfo::default().set_db(db);
        if let Some(creds) = creds {
            let (user, password) = creds.split_once(':').unwrap_or(("", creds));
            if !user.is_empty() {
                node = node.set_username(user);
            }
            if !password.is_empty() {
                node = node.set_password(password);
            }
        }
        let info = redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(node);
        let name = format!("sentinel service {service} via {hosts}");
        let client = redis::sentinel::SentinelClient::build(
            sentinels,
            service,
            Some(info),
            redis::sentinel::SentinelServerType::Master,
        )
        .map_err(|e| bad(e.to_string()))?;
        return Ok((Target::Sentinel(tokio::sync::Mutex::new(client)), name));
    }
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(bad(URL_FORMS.into()));
    }
    let client = redis::Client::open(url).map_err(|e| bad(e.to_string()))?;
    let addr = client.get_connection_info().addr().to_string();
    Ok((Target::Direct(client), addr))
}

/// Checks a store URL as [`RedisStore::new`] would, without connecting.
pub fn check_url(url: &str) -> Result<(), StoreError> {
    target(url).map(drop)
}

fn unavailable(addr: &str, reason: impl ToString) -> StoreError {
    StoreError::Unavailable {
        addr: addr.to_owned(),
        reason: reason.to_string(),
    }
}

/// Deletes every record of `table` in cluster `cluster` from Redis and tells the nodes to
/// drop it from their local tiers. Needs no cluster key (nothing is opened). Returns how
/// many records Redis held.
pub async fn purge_table(
    url: &str,
    cluster: &str,
    table: &Table,
    timeout: Duration,
) -> Result<u64, StoreError> {
    check_name("cluster", cluster)?;
    let (target, addr) = target(url)?;
    let connect = async { target.resolve().await?.get_multiplexed_async_connection().await };
    let mut conn = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| unavailable(&addr, "connect timed out"))?
        .map_err(|e| unavailable(&addr, e))?;
    // An operator's node id: 0, which no store draws (see `RedisStore::new`).
    tokio::time::timeout(timeout * 10, purge_with(&mut conn, cluster, table, 0))
        .await
        .map_err(|_| unavailable(&addr, "purge timed out"))?
        .map_err(|e| unavailable(&addr, e))
}

async fn purge_with(
    conn: &mut impl ConnectionLike,
    cluster: &str,
    table: &Table,
    node: u64,
) -> redis::RedisResult<u64> {
    // Names cannot hold pattern characters (check_name), so this matches one table only.
    let pattern = format!("sudp:{cluster}:{table}:*");
    let mut cursor: u64 = 0;
    let mut total = 0u64;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        for batch in keys.chunks(PURGE_BATCH) {
            let n: u64 = redis::cmd("UNLINK").arg(batch).query_async(conn).await?;
            total += n;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let () = redis::cmd("PUBLISH")
        .arg(format!("sudp:{cluster}:events"))
        .arg(notice(node, 'P', table, None))
        .query_async::<i64>(conn)
        .await
        .map(drop)?;
    Ok(total)
}

/// A notice: `<node, 16 hex> <op> <table> [<key hex>]`; op D (deleted), U (updated), P
/// (purged). Not secret: it names what the Redis key already names.
fn notice(node: u64, op: char, table: &Table, key: Option<&[u8]>) -> String {
    match key {
        Some(key) => format!("{node:016x} {op} {table} {}", hex::encode(key)),
        None => format!("{node:016x} {op} {table}"),
    }
}

/// What a notice asks of a node's local tier.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    Evict { node: u64, table: Table, key: Vec<u8> },
    Purge { node: u64, table: Table },
}

fn parse_notice(payload: &[u8]) -> Option<Notice> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.split(' ');
    let node = parts.next().filter(|n| n.len() == 16)?;
    let node = u64::from_str_radix(node, 16).ok()?;
    let op = parts.next()?;
    let table = Table::new(parts.next()?).ok()?;
    let notice = match op {
        "D" | "U" => Notice::Evict {
            node,
            table,
            key: hex::decode(parts.next()?).ok()?,
        },
        "P" => Notice::Purge { node, table },
        _ => return None,
    };
    parts.next().is_none().then_some(notice)
}

impl RedisStore {
    /// The store of node `cluster` on Redis at `url`, values sealed under `key`. Parses the
    /// URL but does not connect.
    pub fn new(
        url: &str,
        cluster: &str,
        key: &ClusterKey,
        opts: RedisOptions,
    ) -> Result<RedisStore, StoreError> {
        let sealer = Sealer::new(key, cluster)?;
        let (target, addr) = target(url)?;
        // 0 is the operator's id (`purge_table`); a node never draws it.
        let node = loop {
            let n: u64 = rand::random();
            if n != 0 {
                break n;
            }
        };
        Ok(RedisStore {
            inner: Arc::new(Inner {
                target,
                addr,
                prefix: format!("sudp:{cluster}:"),
                channel: format!("sudp:{cluster}:events"),
                node,
                sealer,
                local: MemoryTier::new(opts.local_capacity),
                opts,
                manager: Mutex::new(None),
                next_attempt: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                up: AtomicBool::new(true),
                outages: AtomicU64::new(0),
                subscribed: AtomicBool::new(false),
                notices: AtomicU64::new(0),
                subscriber: Mutex::new(None),
            }),
        })
    }

    /// Connects and starts the subscriber (idempotent; every operation also does). Needs a
    /// tokio runtime.
    pub fn start(&self) {
        let mut slot = lock(&self.inner.subscriber);
        if slot.is_none() {
            *slot = Some(tokio::spawn(subscriber(Arc::downgrade(&self.inner))));
        }
    }

    /// Whether the subscriber hears the other nodes' notices now.
    pub fn is_subscribed(&self) -> bool {
        self.inner.subscribed.load(Ordering::Acquire)
    }

    /// Starts the subscriber and waits (at most `limit`) until it is subscribed.
    pub async fn wait_subscribed(&self, limit: Duration) -> bool {
        self.start();
        let deadline = Instant::now() + limit;
        while !self.is_subscribed() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Redis outages this node has seen (and logged, once each) so far.
    pub fn outages(&self) -> u64 {
        self.inner.outages.load(Ordering::Relaxed)
    }

    /// The Redis key of a record.
    pub fn redis_key(&self, table: &Table, key: &[u8]) -> String {
        format!("{}{table}:{}", self.inner.prefix, hex::encode(key))
    }
}

impl Inner {
    fn note_down(&self, reason: &dyn std::fmt::Display) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.outages.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                redis = %self.addr,
                error = %reason,
                "store: Redis unreachable; serving from the local tier until it returns"
            );
        }
    }

    fn note_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            tracing::info!(redis = %self.addr, "store: Redis reachable again");
        }
    }

    /// The connection manager, connecting if there is none yet (one attempt at a time: a
    /// caller that finds one under way waits for it; after a failure, none for
    /// `retry_delay`). `None`: not available now.
    async fn manager(&self) -> Option<ConnectionManager> {
        if let Some(m) = lock(&self.manager).clone() {
            return Some(m);
        }
        let _attempt = self.connecting.lock().await;
        if let Some(m) = lock(&self.manager).clone() {
            return Some(m);
        }
        if lock(&self.next_attempt).is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.opts.connect_timeout))
            .set_response_timeout(Some(self.opts.op_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(self.opts.retry_delay);
        let connect = async {
            let client = self.target.resolve().await?;
            ConnectionManager::new_with_config(client, config).await
        };
        match tokio::time::timeout(self.opts.connect_timeout * 2, connect).await {
            Ok(Ok(m)) => {
                *lock(&self.manager) = Some(m.clone());
                Some(m)
            }
            Ok(Err(e)) => {
                self.note_down(&e);
                *lock(&self.next_attempt) = Some(Instant::now() + self.opts.retry_delay);
                None
            }
            Err(_) => {
                self.note_down(&"connect timed out");
                *lock(&self.next_attempt) = Some(Instant::now() + self.opts.retry_delay);
                None
            }
        }
    }

    /// Runs one command or pipeline; `None` (logged once per outage) if Redis fails.
    async fn query<T: FromRedisValue>(&self, req: Req<'_>) -> Option<T> {
        self.run(req, false).await
    }

    /// [`Inner::query`] for a read, tried a second time on a fresh connection if the first
    /// found the connection dropped (after a failover the sentinel closes every client
    /// connection). Writes are not retried: the first try may have been applied.
    async fn query_read<T: FromRedisValue>(&self, req: Req<'_>) -> Option<T> {
        self.run(req, true).await
    }

    async fn run<T: FromRedisValue>(&self, req: Req<'_>, retry: bool) -> Option<T> {
        let mut tries = if retry { 2 } else { 1 };
        loop {
            tries -= 1;
            let mut conn = self.manager().await?;
            let exec = async {
                match req {
                    Req::Cmd(c) => c.query_async::<T>(&mut conn).await,
                    Req::Pipe(p) => p.query_async::<T>(&mut conn).await,
                }
            };
            match tokio::time::timeout(self.opts.op_timeout, exec).await {
                Ok(Ok(v)) => {
                    self.note_up();
                    return Some(v);
                }
                Ok(Err(e)) => {
                    self.forget_primary();
                    let dropped = e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal();
                    if tries > 0 && dropped {
                        continue;
                    }
                    self.note_down(&e);
                    return None;
                }
                Err(_) => {
                    self.note_down(&"command timed out");
                    self.forget_primary();
                    return None;
                }
            }
        }
    }

    /// Behind Sentinel, a failed command may mean a failover: drop the connection so that
    /// the next operation asks the sentinels for the primary again. (A direct connection
    /// manager reconnects to its one address by itself.)
    fn forget_primary(&self) {
        if matches!(self.target, Target::Sentinel(_)) {
            *lock(&self.manager) = None;
        }
    }

    fn key(&self, table: &Table, key: &[u8]) -> String {
        format!("{}{table}:{}", self.prefix, hex::encode(key))
    }

    /// A snapshot to compare after a Redis round trip: fills are allowed only if nothing
    /// that could make them stale happened in between.
    fn fill_token(&self) -> Option<u64> {
        let n = self.notices.load(Ordering::Acquire);
        self.subscribed.load(Ordering::Acquire).then_some(n)
    }

    fn still(&self, token: Option<u64>) -> bool {
        token.is_some_and(|n| {
            self.subscribed.load(Ordering::Acquire) && self.notices.load(Ordering::Acquire) == n
        })
    }

    /// Writes a record Redis confirmed into the local tier if that is still safe, else makes
    /// sure no stale copy stays.
    fn settle(
        &self,
        token: Option<u64>,
        table: &Table,
        key: &[u8],
        value: &[u8],
        version: u64,
        ttl: Duration,
    ) {
        if self.still(token) {
            self.local.insert(table, key, value, version, ttl);
        } else {
            self.local.remove(table, key);
        }
    }

    fn open(&self, table: &Table, key: &[u8], stored: &[u8]) -> Option<Record> {
        match self.sealer.open(table, key, stored) {
            Ok((version, value)) => Some(Record { value, version }),
            Err(e) => {
                // Another cluster key, or tampering: treated as absent, and said, since it
                // means a misconfigured node or someone writing to Redis.
                tracing::warn!(%table, error = %e, "store: a value in Redis does not open; ignored");
                None
            }
        }
    }

    fn on_notice(&self, payload: &[u8]) {
        match parse_notice(payload) {
            Some(Notice::Evict { node, .. } | Notice::Purge { node, .. }) if node == self.node => {}
            Some(Notice::Evict { table, key, .. }) => {
                self.notices.fetch_add(1, Ordering::AcqRel);
                self.local.remove(&table, &key);
            }
            Some(Notice::Purge { table, .. }) => {
                self.notices.fetch_add(1, Ordering::AcqRel);
                self.local.purge_table(&table);
            }
            None => tracing::debug!("store: malformed notice on the cluster channel ignored"),
        }
    }
}

#[derive(Clone, Copy)]
enum Req<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

/// Subscribes to the cluster channel and applies the other nodes' notices, reconnecting
/// (100 ms doubling to 2 s) whenever the connection drops. Ends when the store is dropped.
async fn subscriber(store: Weak<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(inner) = store.upgrade() else { return };
        // The command connection too, so that the first handshake that needs Redis does not
        // pay for connecting (bounded by the connect timeout).
        let _ = inner.manager().await;
        let (channel, limit) = (inner.channel.clone(), inner.opts.connect_timeout);
        let attempt = async {
            let mut pubsub = inner.target.resolve().await?.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            redis::RedisResult::Ok(pubsub)
        };
        let result = tokio::time::timeout(limit, attempt).await;
        match result {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(100);
                // Notices sent while we were not listening are lost: forget what we hold.
                inner.notices.fetch_add(1, Ordering::AcqRel);
                inner.local.clear();
                inner.subscribed.store(true, Ordering::Release);
                // Recovery is declared by the command connection, not by this one: a PING
                // brings it back now (and logs the recovery once it answers), so that the
                // first command after an outage does not find it still broken and count a
                // second outage.
                // The first command on a connection broken by the outage fails and starts the
                // reconnection: a few tries, 200 ms apart.
                for _ in 0..10 {
                    if inner
                        .query::<String>(Req::Cmd(&redis::cmd("PING")))
                        .await
                        .is_some()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                drop(inner);
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let Some(inner) = store.upgrade() else { return };
                    inner.on_notice(msg.get_payload_bytes());
                }
                let Some(inner) = store.upgrade() else { return };
                inner.subscribed.store(false, Ordering::Release);
                inner.notices.fetch_add(1, Ordering::AcqRel);
                inner.note_down(&"pub/sub connection lost");
            }
            Ok(Err(e)) => inner.note_down(&e),
            Err(_) => inner.note_down(&"pub/sub connect timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

impl SessionStore for RedisStore {
    fn get<'a>(&'a self, table: &'a Table, key: &'a [u8]) -> StoreFuture<'a, Option<Record>> {
        Box::pin(async move {
            self.start();
            let s = &self.inner;
            if let Some(r) = s.local.get(table, key) {
                return Ok(Some(r));
            }
            let token = s.fill_token();
            let k = s.key(table, key);
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(&k).cmd("PTTL").arg(&k);
            let Some((stored, pttl)) = s.query_read::<(Option<Vec<u8>>, i64)>(Req::Pipe(&pipe)).await else {
                return Ok(None);
            };
            let Some(record) = stored.and_then(|v| s.open(table, key, &v)) else {
                return Ok(None);
            };
            if pttl > 0 && s.still(token) {
                s.local.insert(
                    table,
                    key,
                    &record.value,
                    record.version,
                    Duration::from_millis(pttl as u64),
                );
            }
            Ok(Some(record))
        })
    }

    fn take<'a>(&'a self, table: &'a Table, key: &'a [u8]) -> StoreFuture<'a, Option<Record>> {
        Box::pin(async move {
            self.start();
            let s = &self.inner;
            let local = s.local.remove(table, key);
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(TAKE_SCRIPT)
                .arg(1)
                .arg(s.key(table, key))
                .arg(&s.channel)
                .arg(notice(s.node, 'D', table, Some(key)));
            match s.query::<Option<Vec<u8>>>(Req::Cmd(&cmd)).await {
                Some(Some(stored)) => Ok(s.open(table, key, &stored)),
                // Redis answered: gone there (taken by another node, or never shared).
                Some(None) => Ok(None),
                // Redis down: what this node holds is all there is.
                None => Ok(local),
            }
        })
    }

    fn add<'a>(
        &'a self,
        table: &'a Table,
        key: &'a [u8],
        value: &'a [u8],
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            self.start();
            let ms = ttl_ms(ttl)?;
            let s = &self.inner;
            let stored = s.sealer.seal(table, key, 1, value)?;
            let token = s.fill_token();
            let mut cmd = redis::cmd("SET");
            cmd.arg(s.key(table, key)).arg(stored).arg("NX").arg("PX").arg(ms);
            match s.query::<Option<String>>(Req::Cmd(&cmd)).await {
                Some(Some(_)) => {
                    s.settle(token, table, key, value, 1, ttl);
                    Ok(true)
                }
                Some(None) => Ok(false),
                None => Ok(s.local.add(table, key, value, ttl)),
            }
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
            self.start();
            let ms = ttl_ms(ttl)?;
            let s = &self.inner;
            let version = expected.saturating_add(1);
            let stored = s.sealer.seal(table, key, version, value)?;
            let token = s.fill_token();
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(UPDATE_SCRIPT)
                .arg(1)
                .arg(s.key(table, key))
                .arg(&expected.to_be_bytes()[..])
                .arg(stored)
                .arg(ms)
                .arg(&s.channel)
                .arg(notice(s.node, 'U', table, Some(key)));
            match s.query::<i64>(Req::Cmd(&cmd)).await {
                Some(1) => {
                    s.settle(token, table, key, value, version, ttl);
                    Ok(Update::Updated { version })
                }
                Some(0) => {
                    s.local.remove(table, key);
                    Ok(Update::Missing)
                }
                Some(_) => {
                    s.local.remove(table, key);
                    Ok(Update::Conflict)
                }
                None => Ok(s.local.update(table, key, expected, value, ttl)),
            }
        })
    }

    fn delete<'a>(&'a self, table: &'a Table, key: &'a [u8]) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            self.start();
            let s = &self.inner;
            let local = s.local.remove(table, key).is_some();
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(DELETE_SCRIPT)
                .arg(1)
                .arg(s.key(table, key))
                .arg(&s.channel)
                .arg(notice(s.node, 'D', table, Some(key)));
            let remote = s.query::<i64>(Req::Cmd(&cmd)).await.is_some_and(|n| n > 0);
            Ok(local || remote)
        })
    }

    fn purge<'a>(&'a self, table: &'a Table) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            self.start();
            let s = &self.inner;
            let local = s.local.purge_table(table);
            let Some(mut conn) = s.manager().await else {
                return Err(unavailable(&s.addr, "not connected"));
            };
            let cluster = s.sealer.cluster();
            match tokio::time::timeout(
                s.opts.op_timeout * 20,
                purge_with(&mut conn, cluster, table, s.node),
            )
            .await
            {
                Ok(Ok(n)) => {
                    s.note_up();
                    // Our own notice is ignored by our subscriber: purge again, in case a
                    // fill raced with the scan.
                    s.local.purge_table(table);
                    Ok(n.max(local))
                }
                Ok(Err(e)) => Err(unavailable(&s.addr, e)),
                Err(_) => Err(unavailable(&s.addr, "purge timed out")),
            }
        })
    }

    fn local(&self) -> &MemoryTier {
        &self.inner.local
    }

    fn start(&self) {
        RedisStore::start(self);
    }

    fn is_shared(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_and_malformed_ones_are_refused() {
        let t = Table::TLS_SESSION;
        let n = notice(0xabc, 'D', &t, Some(b"\x00\xff"));
        assert_eq!(n, "0000000000000abc D tls-session 00ff");
        assert_eq!(
            parse_notice(n.as_bytes()),
            Some(Notice::Evict {
                node: 0xabc,
                table: t.clone(),
                key: vec![0, 0xff]
            })
        );
        let p = notice(7, 'P', &t, None);
        assert_eq!(
            parse_notice(p.as_bytes()),
            Some(Notice::Purge { node: 7, table: t })
        );
        for bad in [
            "",
            "zz D tls-session 00",
            "0000000000000abc X tls-session 00",
            "0000000000000abc D tls-session",
            "0000000000000abc D tls:session 00",
            "0000000000000abc D tls-session 0g",
            "0000000000000abc D tls-session 00 extra",
            "0000000000000abc P tls-session extra",
            "abc D tls-session 00",
        ] {
            assert_eq!(parse_notice(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(parse_notice(b"\xff\xfe"), None);
    }

    #[test]
    fn urls_are_checked_without_connecting() {
        let key = ClusterKey::from_bytes([1; 32]);
        let s = RedisStore::new("redis://127.0.0.1:1/0", "c1", &key, RedisOptions::default()).unwrap();
        assert_eq!(
            s.redis_key(&Table::TLS_SESSION, b"\x01\x02"),
            "sudp:c1:tls-session:0102"
        );
        assert!(s.is_shared());
        for bad in ["http://127.0.0.1:6379", "127.0.0.1:6379", "redis//x"] {
            let err = RedisStore::new(bad, "c1", &key, RedisOptions::default()).unwrap_err();
            assert!(matches!(err, StoreError::Url { .. }), "{bad}: {err}");
        }
        let err = RedisStore::new("redis://127.0.0.1:1", "a:b", &key, RedisOptions::default()).unwrap_err();
        assert!(
            matches!(err, StoreError::BadName { what: "cluster", .. }),
            "{err}"
        );
        // The password is never part of an error or a log line.
        let s = RedisStore::new(
            "redis://:hunter2@127.0.0.1:1/0",
            "c",
            &key,
            RedisOptions::default(),
        )
        .unwrap();
        assert!(!format!("{:?}", s.inner.addr).contains("hunter2"));
    }

    #[test]
    fn sentinel_urls() {
        for good in [
            "redis+sentinel://127.0.0.1:26379/mymaster",
            "redis+sentinel://127.0.0.1:26379,127.0.0.2:26379/mymaster/3",
            "redis+sentinel://:pw@127.0.0.1:26379/svc/0",
            "redis+sentinel://user:pw@[::1]:26379/svc",
        ] {
            let (t, name) = target(good).unwrap();
            assert!(matches!(t, Target::Sentinel(_)), "{good}");
            assert!(!name.contains("pw"), "{name}");
        }
        for bad in [
            "redis+sentinel://127.0.0.1:26379",
            "redis+sentinel:///svc",
            "redis+sentinel://127.0.0.1:26379/",
            "redis+sentinel://127.0.0.1:26379/svc/x",
        ] {
            assert!(matches!(target(bad), Err(StoreError::Url { .. })), "{bad}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_redis_falls_back_to_the_local_tier() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let key = ClusterKey::from_bytes([1; 32]);
        let opts = RedisOptions {
            connect_timeout: Duration::from_millis(200),
            ..RedisOptions::default()
        };
        let s = RedisStore::new("redis://127.0.0.1:1/0", "c", &key, opts).unwrap();
        let t = Table::TLS_SESSION;
        let ttl = Duration::from_secs(30);
        assert!(s.add(&t, b"k", b"v", ttl).await.unwrap());
        assert!(!s.add(&t, b"k", b"v", ttl).await.unwrap());
        assert_eq!(&s.get(&t, b"k").await.unwrap().unwrap().value[..], b"v");
        assert_eq!(
            s.update(&t, b"k", 1, b"w", ttl).await.unwrap(),
            Update::Updated { version: 2 }
        );
        assert_eq!(s.take(&t, b"k").await.unwrap().unwrap().version, 2);
        assert!(s.get(&t, b"k").await.unwrap().is_none());
        assert!(s.purge(&t).await.is_err(), "a purge must reach Redis");
        assert!(!s.inner.up.load(Ordering::Acquire));
    }
}
