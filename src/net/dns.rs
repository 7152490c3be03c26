//! A bounded name cache in front of a name source, so a name is resolved once per TTL
//! rather than once per datagram.
//!
//! The source is a [`Resolve`]: the system resolver ([`SystemResolve`]) in production, a
//! fixed table ([`StaticResolve`]) in tests, which must never send a DNS query off the
//! machine (a test that asks for `no-such-host.invalid` gets its failure from the table).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The future a [`Resolve`] returns: every address of the name, port attached.
pub type Lookup<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// A source of name answers (boxed future, so `Arc<dyn Resolve>` can sit in settings).
pub trait Resolve: Send + Sync {
    /// Every address `name` has, with `port`; an error when it has none.
    fn lookup<'a>(&'a self, name: &'a str, port: u16) -> Lookup<'a>;
}

/// The system resolver (`getaddrinfo` through tokio): `/etc/hosts`, then DNS.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolve;

impl Resolve for SystemResolve {
    fn lookup<'a>(&'a self, name: &'a str, port: u16) -> Lookup<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host((name, port)).await?.collect()) })
    }
}

/// A fixed name table; every other name fails with `NotFound`, without any query.
#[derive(Debug, Clone, Default)]
pub struct StaticResolve {
    names: HashMap<String, Vec<IpAddr>>,
}

impl StaticResolve {
    /// A table that knows `localhost` (127.0.0.1 and ::1, in that order) and nothing else.
    pub fn localhost() -> Self {
        StaticResolve::default().with(
            "localhost",
            &[IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)],
        )
    }

    /// Adds (or replaces) `name`'s addresses. Names are matched ASCII case-insensitively, as
    /// DNS does.
    pub fn with(mut self, name: &str, ips: &[IpAddr]) -> Self {
        self.names.insert(name.to_ascii_lowercase(), ips.to_vec());
        self
    }
}

impl Resolve for StaticResolve {
    fn lookup<'a>(&'a self, name: &'a str, port: u16) -> Lookup<'a> {
        let found = self
            .names
            .get(&name.to_ascii_lowercase())
            .filter(|ips| !ips.is_empty());
        let answer = match found {
            Some(ips) => Ok(ips.iter().map(|&ip| SocketAddr::new(ip, port)).collect()),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{name}: not in the static name table"),
            )),
        };
        Box::pin(std::future::ready(answer))
    }
}

/// Resolver with a bounded, time-limited cache.
pub struct Resolver {
    cache: Mutex<HashMap<String, (IpAddr, Instant)>>,
    ttl: Duration,
    max_entries: usize,
    source: Arc<dyn Resolve>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("ttl", &self.ttl)
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver over the system resolver whose answers live `ttl` and whose cache holds
    /// at most `max_entries`.
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Resolver::with_source(ttl, max_entries, Arc::new(SystemResolve))
    }

    /// [`new`](Self::new) with answers from `source`.
    pub fn with_source(ttl: Duration, max_entries: usize, source: Arc<dyn Resolve>) -> Self {
        Resolver {
            cache: Mutex::new(HashMap::new()),
            ttl,
            max_entries: max_entries.max(1),
            source,
        }
    }

    /// The cached address of `name`, if fresh.
    pub fn cached(&self, name: &str) -> Option<IpAddr> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(name) {
            Some((ip, at)) if at.elapsed() < self.ttl => Some(*ip),
            _ => None,
        }
    }

    /// Every address `name` resolves to (cache not consulted), first one cached.
    pub async fn resolve_all(&self, name: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = self
            .source
            .lookup(name, port)
            .await?
            .into_iter()
            .map(crate::net::canonical)
            .collect();
        let first = addrs
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name}: no addresses")))?;
        self.insert(name, first.ip());
        Ok(addrs)
    }

    /// The address of `name`: from the cache when fresh, else from the source.
    pub async fn resolve(&self, name: &str, port: u16) -> io::Result<SocketAddr> {
        if let Some(ip) = self.cached(name) {
            return Ok(SocketAddr::new(ip, port));
        }
        Ok(self.resolve_all(name, port).await?[0])
    }

    fn insert(&self, name: &str, ip: IpAddr) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.max_entries && !cache.contains_key(name) {
            let ttl = self.ttl;
            cache.retain(|_, (_, at)| at.elapsed() < ttl);
            if cache.len() >= self.max_entries {
                // Still full of fresh entries: forget the oldest one.
                if let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone())
                {
                    cache.remove(&oldest);
                }
            }
        }
        cache.insert(name.to_owned(), (ip, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Arc<dyn Resolve> {
        Arc::new(StaticResolve::localhost().with("mapped.test", &["::ffff:10.1.2.3".parse().unwrap()]))
    }

    #[tokio::test]
    async fn localhost_resolves_and_is_cached() {
        let r = Resolver::with_source(Duration::from_secs(60), 2, table());
        assert!(r.cached("localhost").is_none());
        let a = r.resolve("localhost", 80).await.unwrap();
        assert_eq!(a, "127.0.0.1:80".parse().unwrap());
        assert_eq!(r.cached("localhost"), Some(a.ip()));
        let all = r.resolve_all("LocalHost", 9).await.unwrap();
        assert_eq!(all, ["127.0.0.1:9".parse().unwrap(), "[::1]:9".parse().unwrap()]);
    }

    #[tokio::test]
    async fn unknown_names_fail_without_a_query_and_are_not_cached() {
        let r = Resolver::with_source(Duration::from_secs(60), 2, table());
        let e = r.resolve("no-such-host.invalid", 80).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(r.cached("no-such-host.invalid").is_none());
        // A name with an empty address list is an error too, never an empty success.
        let empty = StaticResolve::default().with("empty.test", &[]);
        let r = Resolver::with_source(Duration::from_secs(60), 2, Arc::new(empty));
        assert!(r.resolve_all("empty.test", 1).await.is_err());
    }

    #[tokio::test]
    async fn answers_are_canonical() {
        let r = Resolver::with_source(Duration::from_secs(60), 2, table());
        let a = r.resolve("mapped.test", 5).await.unwrap();
        assert_eq!(a, "10.1.2.3:5".parse().unwrap());
    }

    #[tokio::test]
    async fn system_source_answers_ip_literals_without_a_query() {
        // getaddrinfo answers a numeric host itself (no /etc/hosts, no DNS): the one check
        // of the production path that cannot leave the machine.
        let r = Resolver::new(Duration::from_secs(60), 2);
        assert_eq!(
            r.resolve("127.0.0.1", 7).await.unwrap(),
            "127.0.0.1:7".parse().unwrap()
        );
        assert_eq!(r.resolve("::1", 7).await.unwrap(), "[::1]:7".parse().unwrap());
    }

    #[test]
    fn cache_is_bounded() {
        let r = Resolver::new(Duration::from_secs(60), 2);
        for (i, n) in ["a", "b", "c", "d"].iter().enumerate() {
            r.insert(n, IpAddr::from([10, 0, 0, i as u8]));
        }
        assert_eq!(r.cache.lock().unwrap().len(), 2);
        assert!(r.cached("d").is_some());
    }
}
