//! A bounded name cache in front of the system resolver, so a name is resolved once per
//! TTL rather than once per datagram.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Resolver with a bounded, time-limited cache.
#[derive(Debug)]
pub struct Resolver {
    cache: Mutex<HashMap<String, (IpAddr, Instant)>>,
    ttl: Duration,
    max_entries: usize,
}

impl Resolver {
    /// A resolver whose answers live `ttl` and whose cache holds at most `max_entries`.
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Resolver {
            cache: Mutex::new(HashMap::new()),
            ttl,
            max_entries: max_entries.max(1),
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
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name, port))
            .await?
            .map(crate::net::canonical)
            .collect();
        let first = addrs
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name}: no addresses")))?;
        self.insert(name, first.ip());
        Ok(addrs)
    }

    /// The address of `name`: from the cache when fresh, else from the system resolver.
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

    #[tokio::test]
    async fn localhost_resolves_and_is_cached() {
        let r = Resolver::new(Duration::from_secs(60), 2);
        assert!(r.cached("localhost").is_none());
        let a = r.resolve("localhost", 80).await.unwrap();
        assert!(a.ip().is_loopback());
        assert_eq!(r.cached("localhost"), Some(a.ip()));
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
