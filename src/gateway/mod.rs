//! The gateway: a SOCKS5 server reached over TLS, a UDP relay that serves naked and secure
//! clients on one socket, and the proxy function towards targets (seed 004, FIG. 3A/3B).
//!
//! [`Gateway::bind`] binds everything (so port 0 works and the caller can print what was
//! bound), [`Gateway::run`] serves until the shutdown future completes, then stops
//! accepting, closes every association and waits (bounded) for connections to drain.

pub mod control;
pub mod delegation;
mod moves;
pub mod relay;
mod reload;

pub use reload::{ReloadError, Reloader};

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::audit::AuditLog;
use crate::auth::{AuthLimits, Authenticator, Backend, Certificates, FirstOf, ReloadableUsers, Users};
use crate::config::{Auth, GatewayConfig, ResumptionMode};
use crate::metrics::{GaugeGuard, Metrics};
use crate::net::channel::Heartbeat;
use crate::net::dns::{Resolve, Resolver, SystemResolve};
use crate::policy::Policy;
use crate::proto::CipherSuite;
use crate::store::tls::{StoreSessions, StoreTicketer, DEFAULT_TICKET_PERIOD};
use crate::store::{ClusterKey, MemoryStore, RedisOptions, RedisStore, SessionStore};
use crate::tls::{Resumption, ServerTlsOptions};
use relay::{Relay, RelaySettings};

/// How long shutdown waits for connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a CONNECT tunnel may go on once shutdown began: it then closes itself (and logs
/// its end line), before [`DRAIN_TIMEOUT`] aborts what is left.
pub(crate) const CONNECT_DRAIN: Duration = Duration::from_secs(4);

/// Which client authentication the gateway offers.
#[derive(Clone, Default)]
pub struct AuthSettings {
    /// Offer "no authentication" to every client (tests and demos only).
    pub no_auth: bool,
    /// Username/password users (RFC 1929 and the sudp method's credentials).
    pub users: Option<Arc<Users>>,
    /// The Kerberos service key (`--kerberos-keytab`, `--kerberos-service`): passwords are
    /// checked against the KDC after the users file, and GSS-API (method 0x01) is offered.
    /// (Always `None` in a build without the `kerberos` feature, whose `ServiceKey` has no
    /// value.)
    pub kerberos: Option<crate::auth::ServiceKey>,
}

/// Everything the gateway needs to run, already validated.
#[derive(Clone)]
pub struct Settings {
    /// TLS control listener address.
    pub listen: SocketAddr,
    /// Relay socket address; `None`: same IP as `listen`, ephemeral port.
    pub udp_listen: Option<SocketAddr>,
    /// Address put in BND.ADDR of UDP ASSOCIATE replies.
    pub advertise: Option<IpAddr>,
    /// TLS server configuration (certificates, client-certificate verifier, versions).
    pub tls: Arc<rustls::ServerConfig>,
    /// Client authentication.
    pub auth: AuthSettings,
    /// Destination policy.
    pub policy: Arc<Policy>,
    /// Accept UDP replies from any source.
    pub full_cone: bool,
    /// Refuse naked UDP associations whose request gives no client port (DST.PORT 0).
    pub naked_require_port: bool,
    /// An association with no traffic this long is closed.
    pub idle_timeout: Duration,
    /// Most associations at once.
    pub max_associations: usize,
    /// Most control connections at once.
    pub max_connections: usize,
    /// Most control connections at once from one source (an IPv4 address or an IPv6 /64).
    pub max_connections_per_ip: usize,
    /// One deadline for the TLS handshake, SOCKS5 negotiation and authentication together,
    /// from the moment the connection is accepted.
    pub handshake_timeout: Duration,
    /// Limit on a CONNECT's TCP connect.
    pub connect_timeout: Duration,
    /// A CONNECT tunnel with no byte either way for this long is closed.
    pub connect_idle_timeout: Duration,
    /// Bounds on password checks (concurrency, queue, per-source failures).
    pub auth_limits: AuthLimits,
    /// Replay window size.
    pub replay_window: usize,
    /// Acceptable suites, in the gateway's order.
    pub suites: Vec<CipherSuite>,
    /// Relay receive workers (sockets sharing the relay port through SO_REUSEPORT).
    pub workers: usize,
    /// Where to serve `/metrics` and `/healthz` over HTTP, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Where audit lines go (one per ended tunnel and association); disabled by default.
    /// Also what enables delegated inspection: without it, delegated secrets are refused.
    pub audit: AuditLog,
    /// End-to-end destinations (`e2e`): never inspected, tunnels closed at `e2e_ttl`.
    pub e2e: delegation::E2e,
    /// Longest life of an end-to-end CONNECT tunnel.
    pub e2e_ttl: Duration,
    /// Receive buffer asked for each relay socket, in bytes (the kernel may grant less; see
    /// `net.core.rmem_max`).
    pub udp_buffer: usize,
    /// PINGs on secure control connections, and the silence after which a client that
    /// announced PINGs is dropped (PROTOCOL.md §2.4).
    pub heartbeat: Heartbeat,
    /// Where destination names are resolved: the system resolver by default; tests put a
    /// [`crate::net::dns::StaticResolve`] here so no query leaves the machine.
    pub resolver: Arc<dyn Resolve>,
    /// The session store (in-process, or shared by the cluster through Redis); `tls`
    /// resumes through the same store when built by [`Settings::from_config`].
    pub store: Arc<dyn SessionStore>,
}

/// The gateway's heartbeat: a PING every second, a client silent for 10 s is gone. Clients
/// ping more often (ours every 500 ms) when they need to notice a dead gateway quickly.
pub const DEFAULT_HEARTBEAT: Heartbeat = Heartbeat {
    interval: Duration::from_secs(1),
    timeout: Duration::from_secs(10),
};

impl Settings {
    /// Settings with the documented defaults (docs/CONFIG.md): no authentication method
    /// enabled (set `auth`), the default destination policy, restricted cone, 120 s idle
    /// timeout, 4096 associations, 1024 connections (256 per source), 10 s handshake and
    /// connect timeouts, 10 min CONNECT idle timeout, [`AuthLimits::default`], window 1024, both suites, one relay worker per core. The way to build settings in
    /// code: fields added later get their defaults here instead of breaking callers.
    pub fn new(listen: SocketAddr, tls: Arc<rustls::ServerConfig>) -> Settings {
        Settings {
            listen,
            udp_listen: None,
            advertise: None,
            tls,
            auth: AuthSettings::default(),
            policy: Arc::new(Policy::default()),
            full_cone: false,
            naked_require_port: false,
            idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
            max_associations: crate::config::DEFAULT_MAX_ASSOCIATIONS,
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: crate::config::DEFAULT_MAX_CONNECTIONS_PER_IP,
            handshake_timeout: crate::config::DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: Duration::from_secs(10),
            connect_idle_timeout: crate::config::DEFAULT_CONNECT_IDLE_TIMEOUT,
            auth_limits: AuthLimits::default(),
            replay_window: crate::proto::replay::DEFAULT_WINDOW,
            suites: CipherSuite::ALL.to_vec(),
            workers: default_workers(),
            heartbeat: DEFAULT_HEARTBEAT,
            udp_buffer: crate::net::UDP_BUFFER,
            metrics: None,
            audit: AuditLog::disabled(),
            e2e: delegation::E2e::default(),
            e2e_ttl: crate::config::DEFAULT_E2E_TTL,
            resolver: Arc::new(SystemResolve),
            store: Arc::new(MemoryStore::default()),
        }
    }

    /// Loads the files a validated config names (certificates, key, users, client CA) and
    /// builds the runtime settings. Errors name the file and the problem.
    pub fn from_config(cfg: &GatewayConfig) -> anyhow::Result<Settings> {
        Settings::from_config_in(cfg, None)
    }

    /// [`Settings::from_config`] that keeps `store` (the running gateway's, on a reload)
    /// instead of opening another: the TLS sessions resume through it as before.
    pub fn from_config_in(
        cfg: &GatewayConfig,
        store: Option<Arc<dyn SessionStore>>,
    ) -> anyhow::Result<Settings> {
        use anyhow::Context as _;
        let store_given = store.is_some();
        // Each error names the key (and flag) that named the file, then the file's problem.
        let client_ca = match cfg.auth.client_ca() {
            Some(p) => Some(crate::tls::load_certs(p).context("`client_ca` (--client-ca)")?),
            None => None,
        };
        let require_client_cert = matches!(cfg.auth, Auth::ClientCert(_));
        let mut client_crls = Vec::new();
        for path in &cfg.client_crl {
            client_crls.extend(crate::tls::load_crls(path)?);
        }
        let store: Arc<dyn SessionStore> = match (store, &cfg.store, &cfg.cluster_key) {
            (Some(running), _, _) => running,
            (None, Some(url), Some(key_file)) => {
                let key = ClusterKey::load(key_file)?;
                Arc::new(RedisStore::new(
                    url.as_str(),
                    &cfg.cluster,
                    &key,
                    RedisOptions::default(),
                )?)
            }
            // The config refuses a store without a key; without a store the key is unused.
            (None, _, _) => Arc::new(MemoryStore::default()),
        };
        let sessions = Arc::new(StoreSessions::new(store.clone()));
        let resumption = match cfg.resumption {
            ResumptionMode::Stateful => Resumption::Stateful(sessions),
            ResumptionMode::Tickets => Resumption::Tickets {
                ticketer: Arc::new(StoreTicketer::new(store.clone(), DEFAULT_TICKET_PERIOD)),
                storage: sessions,
            },
        };
        let tls = crate::tls::server_config_resuming(
            ServerTlsOptions {
                cert_chain: crate::tls::load_certs(&cfg.cert).context("`cert` (--cert)")?,
                key: crate::tls::load_key(&cfg.key).context("`key` (--key)")?,
                client_ca,
                require_client_cert,
                client_crls,
                allow_tls12: cfg.tls12,
            },
            resumption,
        )
        .context("`cert` and `key` (--cert, --key)")?;
        let users = match cfg.auth.users() {
            Some(p) => {
                Some(Arc::new(Users::load(p).with_context(|| {
                    format!("`users` (--users): users file {}", p.display())
                })?))
            }
            None => None,
        };
        Ok(Settings {
            listen: cfg.listen,
            udp_listen: Some(cfg.udp_listen),
            advertise: cfg.advertise,
            tls,
            auth: AuthSettings {
                no_auth: matches!(cfg.auth, Auth::NoAuth),
                users,
                kerberos: match &cfg.kerberos {
                    Some(k) => Some(crate::auth::ServiceKey::load(&k.keytab, &k.service)?),
                    None => None,
                },
            },
            policy: Arc::new(cfg.policy.clone()),
            full_cone: cfg.full_cone,
            naked_require_port: cfg.naked_require_port,
            idle_timeout: cfg.idle_timeout,
            max_associations: cfg.max_associations,
            max_connections: cfg.max_connections,
            max_connections_per_ip: cfg.max_connections_per_ip,
            handshake_timeout: cfg.handshake_timeout,
            connect_timeout: Duration::from_secs(10),
            connect_idle_timeout: cfg.connect_idle_timeout,
            e2e: cfg.e2e.clone(),
            e2e_ttl: cfg.e2e_ttl,
            auth_limits: AuthLimits::default(),
            replay_window: cfg.replay_window,
            suites: cfg.suites.clone(),
            workers: default_workers(),
            heartbeat: cfg.heartbeat,
            udp_buffer: cfg.udp_buffer,
            metrics: cfg.metrics,
            // A reload (a store handed over) keeps the running audit log: reopening it is
            // the reload's business, not a second writer's.
            audit: match store_given {
                false => AuditLog::from_option(cfg.audit_log.as_deref())?,
                true => AuditLog::disabled(),
            },
            resolver: Arc::new(SystemResolve),
            store,
        })
    }
}

/// One relay receive worker per available core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Control connections held per source, so that one source's peers cannot take every slot.
#[derive(Debug, Default)]
pub(crate) struct SourceSlots {
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One source's slot; given back on drop.
pub(crate) struct SourceSlot {
    slots: Arc<SourceSlots>,
    key: IpAddr,
}

impl SourceSlots {
    /// A slot for `ip` if its source holds fewer than `cap`.
    pub(crate) fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<SourceSlot> {
        let key = crate::auth::source_key(ip);
        // A poisoned lock only means another task panicked mid-update of a counter.
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(key).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            slots: self.clone(),
            key,
        })
    }

    /// Sources holding at least one slot.
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// State shared by every connection task.
///
/// `settings` are the start-time settings: what a reload cannot change is read from there.
/// What a reload can change sits behind swaps: the TLS server config (certificate, key,
/// client CA, CRLs) here, the users in `users`, the policy in the relay.
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    pub(crate) auth: Authenticator,
    /// Loaded once per accepted connection: a reload reaches new handshakes only, and
    /// established TLS sessions keep theirs.
    pub(crate) tls: ArcSwap<rustls::ServerConfig>,
    /// The users backend `auth` checks passwords against, if the gateway has users.
    pub(crate) users: Option<Arc<ReloadableUsers>>,
    pub(crate) relay: Arc<Relay>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) dns: Arc<Resolver>,
    /// Live CONNECT tunnels and delegating control sessions (PROTOCOL.md §2.8).
    pub(crate) delegations: Arc<delegation::Registry>,
}

/// A bound, not yet running gateway.
pub struct Gateway {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shared: Arc<Shared>,
}

impl Gateway {
    /// Binds the control listener and the relay socket. Errors name the socket and its
    /// address (`TLS control listener 127.0.0.1:8443: address in use ...`).
    pub async fn bind(settings: Settings) -> io::Result<Gateway> {
        let listener = crate::net::bind_tcp_listener(settings.listen).map_err(crate::net::bind_error(
            "TLS control listener",
            settings.listen,
            "--listen",
        ))?;
        let control = listener.local_addr()?;
        let udp = settings.udp_listen.unwrap_or(SocketAddr::new(control.ip(), 0));
        let metrics = Arc::new(Metrics::default());
        let dns = Arc::new(Resolver::with_source(
            Duration::from_secs(60),
            4096,
            settings.resolver.clone(),
        ));
        let relay = Relay::bind(
            udp,
            RelaySettings {
                full_cone: settings.full_cone,
                max_associations: settings.max_associations,
                replay_window: settings.replay_window,
                workers: settings.workers,
                recv_buffer: settings.udp_buffer,
                naked_require_port: settings.naked_require_port,
                e2e: Arc::new(settings.e2e.clone()),
            },
            metrics.clone(),
            dns.clone(),
            settings.policy.clone(),
        )
        .map_err(crate::net::bind_error("UDP relay socket", udp, "--udp-listen"))?;
        // Connect to the shared store now, not in the first client's handshake.
        settings.store.start();
        let tls = ArcSwap::new(settings.tls.clone());
        let metrics_listener = match settings.metrics {
            Some(a) => Some(crate::metrics::http::bind(a).await?),
            None => None,
        };
        let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
        let users = settings
            .auth
            .users
            .as_ref()
            .map(|u| Arc::new(ReloadableUsers::new(u.clone())));
        // Password credentials: the users file first, then (with Kerberos) the KDC.
        let mut password: Vec<Arc<dyn Backend>> = Vec::new();
        if let Some(users) = &users {
            password.push(users.clone());
        }
        #[cfg(feature = "kerberos")]
        if let Some(key) = &settings.auth.kerberos {
            password.push(Arc::new(crate::auth::kerberos::KerberosPassword::new(
                key.clone(),
            )));
            backends.push(Arc::new(crate::auth::kerberos::GssapiTokens::new(key.clone())));
        }
        match password.len() {
            0 => {}
            1 => backends.extend(password),
            _ => backends.push(Arc::new(FirstOf(password))),
        }
        backends.push(Arc::new(Certificates));
        let auth = Authenticator::new(backends, settings.auth_limits.clone(), metrics.clone());
        Ok(Gateway {
            listener,
            metrics_listener,
            shared: Arc::new(Shared {
                settings,
                auth,
                tls,
                users,
                relay,
                metrics,
                dns,
                delegations: Arc::default(),
            }),
        })
    }

    /// The bound TLS control address.
    pub fn control_addr(&self) -> SocketAddr {
        // Invariant: a bound listener has a local address.
        self.listener.local_addr().expect("bound listener")
    }

    /// The bound relay address.
    pub fn relay_addr(&self) -> SocketAddr {
        self.shared.relay.local_addr()
    }

    /// The bound metrics (HTTP) address, if `--metrics` is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        // Invariant: a bound listener has a local address.
        self.metrics_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
    }

    /// A handle that puts a re-read configuration in force while the gateway runs (SIGHUP).
    /// `running` is the configuration the gateway was built from: reloads are compared
    /// with it.
    pub fn reloader(&self, running: &GatewayConfig) -> Reloader {
        Reloader::new(self.shared.clone(), running)
    }

    /// The gateway's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Serves until `shutdown` completes, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let Gateway {
            listener,
            metrics_listener,
            shared,
        } = self;
        let relay_task = tokio::spawn(shared.relay.clone().run());
        let (draining_tx, draining) = watch::channel(false);
        let metrics_task = metrics_listener.map(|l| {
            let exporter = crate::metrics::export::Exporter::with_audit(
                "sudp_gateway",
                shared.metrics.clone(),
                vec![(
                    "relay_workers",
                    "Relay receive workers",
                    Box::new({
                        let n = shared.relay.workers() as i64;
                        move || n
                    }),
                )],
                shared.settings.audit.clone(),
            );
            let draining = draining.clone();
            let endpoints = Arc::new(crate::metrics::http::Endpoints {
                metrics: Box::new(move || exporter.render()),
                healthy: Box::new(move || !*draining.borrow()),
            });
            let mut stop = draining_tx.subscribe();
            tokio::spawn(crate::metrics::http::serve(l, endpoints, async move {
                // Served through the drain, so the last figures can be scraped; ends with it.
                let _ = stop.wait_for(|_| false).await;
            }))
        });
        let limit = Arc::new(Semaphore::new(shared.settings.max_connections));
        let per_source = Arc::new(SourceSlots::default());
        let cap = shared.settings.max_connections_per_ip;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            // Wait for a connection slot before accepting, so excess clients queue in the
            // kernel backlog instead of costing us a TLS handshake each.
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = &mut shutdown => break,
            };
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
                        // A source at its cap gets its connection closed at once, so that
                        // the global slot goes straight back: one source's silent peers
                        // hold at most `cap` of them.
                        let Some(slot) = per_source.take(peer.ip(), cap) else {
                            shared.metrics.connections_over_source_cap.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, cap, "source at its connection cap: closed");
                            drop(tcp);
                            drop(permit);
                            continue;
                        };
                        let active = GaugeGuard::new(shared.metrics.clone(), |m| &m.connections_active);
                        let (shared, stop) = (shared.clone(), stop_rx.clone());
                        conns.spawn(async move {
                            let _active = active;
                            control::serve(shared, tcp, peer, stop).await;
                            drop(slot);
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = &mut shutdown => break,
            }
        }
        tracing::info!(connections = conns.len(), "shutting down: draining");
        let _ = draining_tx.send(true);
        drop(listener);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(left = conns.len(), "drain timeout: closing remaining connections");
            conns.shutdown().await;
        }
        relay_task.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        tracing::info!(
            forwarded = shared.metrics.forwarded.load(Ordering::Relaxed),
            returned = shared.metrics.returned.load(Ordering::Relaxed),
            drops = %shared.metrics.drop_summary(),
            "gateway stopped"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_slots_cap_each_source_and_free_on_drop() {
        let slots = Arc::new(SourceSlots::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let s1 = slots.take(a, 2).unwrap();
        let s2 = slots.take(a, 2).unwrap();
        assert!(slots.take(a, 2).is_none());
        // The IPv4-mapped form is the same source; another address is not.
        assert!(slots.take("::ffff:192.0.2.1".parse().unwrap(), 2).is_none());
        let other = slots.take("192.0.2.2".parse().unwrap(), 2).unwrap();
        drop(s1);
        let s3 = slots.take(a, 2).unwrap();
        drop((s2, s3, other));
        assert_eq!(slots.sources(), 0, "empty entries are removed");
    }
}
