//! The gateway: a SOCKS5 server reached over TLS, a UDP relay that serves naked and secure
//! clients on one socket, and the proxy function towards targets (seed 004, FIG. 3A/3B).
//!
//! [`Gateway::bind`] binds everything (so port 0 works and the caller can print what was
//! bound), [`Gateway::run`] serves until the shutdown future completes, then stops
//! accepting, closes every association and waits (bounded) for connections to drain.

pub mod control;
pub mod relay;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::auth::Users;
use crate::config::{Auth, GatewayConfig, ResumptionMode};
use crate::metrics::Metrics;
use crate::net::dns::Resolver;
use crate::policy::Policy;
use crate::proto::CipherSuite;
use crate::store::tls::{StoreSessions, StoreTicketer, DEFAULT_TICKET_PERIOD};
use crate::store::{ClusterKey, MemoryStore, RedisOptions, RedisStore, SessionStore};
use crate::tls::{Resumption, ServerTlsOptions};
use relay::{Relay, RelaySettings};

/// How long shutdown waits for connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Which client authentication the gateway offers.
#[derive(Clone, Default)]
pub struct AuthSettings {
    /// Offer "no authentication" to every client (tests and demos only).
    pub no_auth: bool,
    /// Username/password users (RFC 1929 and the sudp method's credentials).
    pub users: Option<Arc<Users>>,
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
    /// An association with no traffic this long is closed.
    pub idle_timeout: Duration,
    /// Most associations at once.
    pub max_associations: usize,
    /// Most control connections at once.
    pub max_connections: usize,
    /// Limit on TLS handshake plus SOCKS5 negotiation.
    pub handshake_timeout: Duration,
    /// Limit on a CONNECT's TCP connect.
    pub connect_timeout: Duration,
    /// Replay window size.
    pub replay_window: usize,
    /// Acceptable suites, in the gateway's order.
    pub suites: Vec<CipherSuite>,
    /// Relay receive workers (sockets sharing the relay port through SO_REUSEPORT).
    pub workers: usize,
    /// The session store (in-process, or shared by the cluster through Redis); `tls`
    /// resumes through the same store when built by [`Settings::from_config`].
    pub store: Arc<dyn SessionStore>,
}

impl Settings {
    /// Settings with the documented defaults (docs/CONFIG.md): no authentication method
    /// enabled (set `auth`), the default destination policy, restricted cone, 120 s idle
    /// timeout, 4096 associations, 1024 connections, 10 s handshake and connect timeouts,
    /// window 1024, both suites, one relay worker per core. The way to build settings in
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
            idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
            max_associations: crate::config::DEFAULT_MAX_ASSOCIATIONS,
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: crate::config::DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: Duration::from_secs(10),
            replay_window: crate::proto::replay::DEFAULT_WINDOW,
            suites: CipherSuite::ALL.to_vec(),
            workers: default_workers(),
            store: Arc::new(MemoryStore::default()),
        }
    }

    /// Loads the files a validated config names (certificates, key, users, client CA) and
    /// builds the runtime settings. Errors name the file and the problem.
    pub fn from_config(cfg: &GatewayConfig) -> anyhow::Result<Settings> {
        use anyhow::Context as _;
        let client_ca = match cfg.auth.client_ca() {
            Some(p) => Some(crate::tls::load_certs(p)?),
            None => None,
        };
        let require_client_cert = matches!(cfg.auth, Auth::ClientCert(_));
        let store: Arc<dyn SessionStore> = match (&cfg.store, &cfg.cluster_key) {
            (Some(url), Some(key_file)) => {
                let key = ClusterKey::load(key_file)?;
                Arc::new(RedisStore::new(
                    url.as_str(),
                    &cfg.cluster,
                    &key,
                    RedisOptions::default(),
                )?)
            }
            // The config refuses a store without a key; without a store the key is unused.
            _ => Arc::new(MemoryStore::default()),
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
                cert_chain: crate::tls::load_certs(&cfg.cert)?,
                key: crate::tls::load_key(&cfg.key)?,
                client_ca,
                require_client_cert,
                allow_tls12: cfg.tls12,
            },
            resumption,
        )?;
        let users = match cfg.auth.users() {
            Some(p) => Some(Arc::new(
                Users::load(p).with_context(|| format!("users file {}", p.display()))?,
            )),
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
            },
            policy: Arc::new(cfg.policy.clone()),
            full_cone: cfg.full_cone,
            idle_timeout: cfg.idle_timeout,
            max_associations: cfg.max_associations,
            max_connections: cfg.max_connections,
            handshake_timeout: cfg.handshake_timeout,
            connect_timeout: Duration::from_secs(10),
            replay_window: cfg.replay_window,
            suites: cfg.suites.clone(),
            workers: default_workers(),
            store,
        })
    }
}

/// One relay receive worker per available core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// State shared by every connection task.
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) relay: Arc<Relay>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) dns: Arc<Resolver>,
}

/// A bound, not yet running gateway.
pub struct Gateway {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Gateway {
    /// Binds the control listener and the relay socket.
    pub async fn bind(settings: Settings) -> io::Result<Gateway> {
        let listener = TcpListener::bind(settings.listen).await?;
        let control = listener.local_addr()?;
        let udp = settings.udp_listen.unwrap_or(SocketAddr::new(control.ip(), 0));
        let metrics = Arc::new(Metrics::default());
        let dns = Arc::new(Resolver::new(Duration::from_secs(60), 4096));
        let relay = Relay::bind(
            udp,
            RelaySettings {
                full_cone: settings.full_cone,
                max_associations: settings.max_associations,
                replay_window: settings.replay_window,
                workers: settings.workers,
            },
            metrics.clone(),
            dns.clone(),
            settings.policy.clone(),
        )?;
        // Connect to the shared store now, not in the first client's handshake.
        settings.store.start();
        let acceptor = TlsAcceptor::from(settings.tls.clone());
        Ok(Gateway {
            listener,
            shared: Arc::new(Shared {
                settings,
                acceptor,
                relay,
                metrics,
                dns,
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

    /// The gateway's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Serves until `shutdown` completes, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let Gateway { listener, shared } = self;
        let relay_task = tokio::spawn(shared.relay.clone().run());
        let limit = Arc::new(Semaphore::new(shared.settings.max_connections));
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
                        let (shared, stop) = (shared.clone(), stop_rx.clone());
                        conns.spawn(async move {
                            control::serve(shared, tcp, peer, stop).await;
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
        tracing::info!(
            forwarded = shared.metrics.forwarded.load(Ordering::Relaxed),
            returned = shared.metrics.returned.load(Ordering::Relaxed),
            drops = %shared.metrics.drop_summary(),
            "gateway stopped"
        );
        Ok(())
    }
}
