//! The client shim: runs next to unmodified applications and gives them secure UDP through a
//! gateway (seed 004: the "modified SOCKS client", FIG. 3B record detector on the client
//! side).
//!
//! ```text
//!  application ── plain SOCKS5 (loopback) ──┐
//!  application ── UDP to a forward port ────┼─▶ shim ══ TLS control + secure-UDP records ══▶ gateway ─▶ targets
//!  application ── TCP to a forward port ────┘
//! ```
//!
//! * [`socks`]: a local SOCKS5 server. CONNECT becomes a SOCKS5 CONNECT inside TLS to the
//!   gateway; UDP ASSOCIATE gets a local relay socket whose naked RFC 1928 §7 datagrams are
//!   converted to secure records and back, in place.
//! * [`forward`]: port forwards. A UDP forward gives each local source address its own flow
//!   (its own secure association), so replies reach the right local peer; a TCP forward
//!   opens one CONNECT per accepted connection.
//! * [`link`]: a secure association that survives its gateway: when the control connection
//!   drops it reconnects with exponential backoff, failing over along the gateway list,
//!   while the local sockets stay open.
//!
//! [`Shim::bind`] binds every local socket (so port 0 works and the caller can print what
//! was bound); [`Shim::run`] serves until the shutdown future completes.
//!
//! Why one association per local source in a UDP forward: replies from the gateway carry
//! only the target's address, and the gateway sends every datagram of one association to
//! the target from one socket, so neither end could tell two local peers' replies apart on
//! a shared association. A separate association per source keeps them apart, bounded by
//! `max_flows` and closed after `idle_timeout`. With one local peer, the usual case, a
//! forward holds exactly one. The associations share control connections where the gateway
//! speaks ASSOCIATIONS (PROTOCOL.md §2.9): the [`Dialer`] keeps a pool of them, up to
//! [`PER_CONNECTION`] associations each, and dials one connection at a time per gateway, so
//! a new flow costs one OPEN round trip on an open connection (a burst of new flows, or every
//! flow of a lost connection re-attaching, shares the connection the first one dials). The
//! associations opened on one connection also share one UDP socket to the relay
//! ([`crate::client`]'s demux), and a forward's records for several of them leave in one
//! GSO train ([`forward::Train`]): many small flows cost batched system calls, not a socket
//! and a wake-up per datagram each.

mod delegate;
pub mod forward;
pub mod link;
pub mod socks;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::client::{self, ClientError, ClientOptions, Control, SecureUdp, Transport};
use crate::config::{ConfigError, Forward, ForwardProto, PasswordLogin, ShimArgs, ShimConfig, Trust};
use crate::metrics::Metrics;
use crate::net::channel::Heartbeat;
use crate::proto::socks::Address;
use crate::proto::CipherSuite;
use crate::tls::{ClientTlsOptions, ServerTrust};

/// How long shutdown lets local TCP connections finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// After a gateway refused the shim for good (credentials, certificate: see
/// [`ClientError::is_permanent`]), requests within this time get the same answer at once
/// instead of another attempt, so an application that retries in a loop does not hammer
/// the gateway; the next attempt after it asks the gateway again (its users file or
/// certificate may have been fixed and reloaded meanwhile).
pub const REFUSAL_HOLD: Duration = Duration::from_secs(10);

/// One gateway of the fail-over list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayEndpoint {
    /// Control address: an IP socket address, or a name resolved at each connection.
    pub addr: Address,
    /// Name the gateway's certificate must carry (SNI).
    pub server_name: String,
}

impl GatewayEndpoint {
    /// An endpoint whose certificate name is its host (the IP for an IP address).
    pub fn new(addr: Address) -> Self {
        let server_name = match &addr {
            Address::Ip(a) => a.ip().to_string(),
            Address::Domain(host, _) => host.clone(),
        };
        GatewayEndpoint { addr, server_name }
    }
}

/// Everything the shim needs to run, already validated and loaded.
///
/// `Debug` is deliberately not derived: it would print the passwords.
#[derive(Clone)]
pub struct ShimSettings {
    /// Gateways in fail-over order (non-empty).
    pub gateways: Vec<GatewayEndpoint>,
    /// TLS client configuration, shared by every connection so sessions resume.
    pub tls: Arc<rustls::ClientConfig>,
    /// Username and password for the gateway.
    pub credentials: Option<(String, String)>,
    /// GSS-API (RFC 1961) to this service principal for CONNECT, instead of a password.
    pub gssapi: Option<String>,
    /// Local SOCKS5 listener, if any.
    pub socks: Option<SocketAddr>,
    /// Username and password local SOCKS5 clients must give, if any.
    pub socks_credentials: Option<(String, String)>,
    /// Port forwards.
    pub forwards: Vec<Forward>,
    /// Suites to offer, preferred first.
    pub suites: Vec<CipherSuite>,
    /// Replay window for records from the gateway.
    pub replay_window: usize,
    /// A UDP forward closes a local source's flow after this long without traffic.
    pub idle_timeout: Duration,
    /// Most flows per UDP forward.
    pub max_flows: usize,
    /// Most local TCP connections at once.
    pub max_connections: usize,
    /// Limit on reaching and negotiating with one gateway.
    pub connect_timeout: Duration,
    /// The control channel's heartbeat towards each gateway.
    pub heartbeat: Heartbeat,
    /// Bytes each flow may queue while its association opens ([`link::DEFAULT_FLOW_QUEUE`]).
    pub flow_queue: usize,
    /// Where to serve `/metrics` and `/healthz` over HTTP, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// How records travel to the gateway (UDP, inside TLS, or `auto`).
    pub transport: Transport,
    /// How the gateway is trusted, as configured (`/etc/sudp/ca.pem (--ca)`), for the
    /// messages of refused certificates; `None`: said generically.
    pub trust_origin: Option<String>,
    /// The NSS key log file whose TLS 1.3 secrets are delegated to the gateway, if any
    /// (docs/DELEGATION.md).
    pub delegate_keylog: Option<PathBuf>,
}

impl ShimSettings {
    /// Settings with the configuration defaults: SOCKS5 on 127.0.0.1:0 (any free port), no
    /// forwards, no credentials.
    pub fn new(gateways: Vec<GatewayEndpoint>, tls: Arc<rustls::ClientConfig>) -> Self {
        ShimSettings {
            gateways,
            tls,
            credentials: None,
            gssapi: None,
            socks: Some(SocketAddr::new(crate::config::DEFAULT_SOCKS.ip(), 0)),
            socks_credentials: None,
            forwards: Vec::new(),
            suites: CipherSuite::ALL.to_vec(),
            replay_window: crate::proto::replay::DEFAULT_WINDOW,
            idle_timeout: crate::config::DEFAULT_FLOW_IDLE_TIMEOUT,
            max_flows: crate::config::DEFAULT_MAX_FLOWS,
            max_connections: crate::config::DEFAULT_SHIM_MAX_CONNECTIONS,
            connect_timeout: crate::config::DEFAULT_CONNECT_TIMEOUT,
            heartbeat: crate::client::DEFAULT_HEARTBEAT,
            flow_queue: link::DEFAULT_FLOW_QUEUE,
            metrics: None,
            transport: Transport::Auto,
            trust_origin: None,
            delegate_keylog: None,
        }
    }

    /// Loads the files a validated config names (CA, client certificate and key, password
    /// files) and builds the runtime settings. Errors name the file, never its content.
    pub fn from_config(cfg: &ShimConfig) -> anyhow::Result<ShimSettings> {
        use anyhow::Context as _;
        // Each error names the key (and flag) that named the file, then the file's problem.
        let trust = match &cfg.trust {
            Trust::Ca(path) => ServerTrust::Ca(crate::tls::load_certs(path).context("`ca` (--ca)")?),
            Trust::Pin(pin) => ServerTrust::Pin(*pin),
        };
        let client_auth = match &cfg.client_cert {
            Some((cert, key)) => Some((
                crate::tls::load_certs(cert).context("`cert` (--cert)")?,
                crate::tls::load_key(key).context("`key` (--key)")?,
            )),
            None => None,
        };
        let tls = crate::tls::client_config(ClientTlsOptions {
            trust,
            client_auth,
            allow_tls12: cfg.tls12,
        })
        .context("`ca`, `cert` and `key` (--ca, --cert, --key)")?;
        let gateways = cfg
            .gateways
            .iter()
            .map(|a| {
                let mut g = GatewayEndpoint::new(a.clone());
                if let Some(name) = &cfg.server_name {
                    g.server_name = name.clone();
                }
                g
            })
            .collect();
        Ok(ShimSettings {
            gateways,
            tls,
            credentials: cfg
                .login
                .as_ref()
                .map(read_login)
                .transpose()
                .context("`password_file` (--password-file)")?,
            gssapi: cfg.gssapi.clone(),
            socks: cfg.socks,
            socks_credentials: cfg
                .socks_login
                .as_ref()
                .map(read_login)
                .transpose()
                .context("`socks_password_file` (--socks-password-file)")?,
            forwards: cfg.forwards.clone(),
            suites: cfg.suites.clone(),
            replay_window: cfg.replay_window,
            idle_timeout: cfg.idle_timeout,
            max_flows: cfg.max_flows,
            max_connections: cfg.max_connections,
            connect_timeout: cfg.connect_timeout,
            heartbeat: cfg.heartbeat,
            flow_queue: cfg.flow_queue,
            metrics: cfg.metrics,
            transport: cfg.transport,
            delegate_keylog: cfg.delegate_keylog.clone(),
            trust_origin: Some(match &cfg.trust {
                Trust::Ca(path) => format!("{} (--ca)", path.display()),
                Trust::Pin(pin) => format!("the pinned SHA-256 {} (--pin)", crate::tls::pin_hex(pin)),
            }),
        })
    }
}

/// Reads a login's password: the first line of its file, without the line ending.
fn read_login(login: &PasswordLogin) -> anyhow::Result<(String, String)> {
    let path = &login.password_file;
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("password file {}: cannot read: {e}", path.display()))?;
    let password = text.lines().next().unwrap_or("").to_owned();
    if password.is_empty() {
        anyhow::bail!("password file {}: the first line is empty", path.display());
    }
    if password.len() > 255 {
        anyhow::bail!(
            "password file {}: the password is longer than 255 bytes (RFC 1929 limit)",
            path.display()
        );
    }
    Ok((login.user.clone(), password))
}

/// Opens connections and associations through the gateway list.
pub(crate) struct Dialer {
    gateways: Vec<GatewayEndpoint>,
    /// Swapped whole on reload (SIGHUP): CA or pin, client certificate, versions. Each
    /// connection loads it once; a new config also means a new session cache.
    tls: ArcSwap<rustls::ClientConfig>,
    /// The gateway login, swapped on reload (the password file read again).
    credentials: ArcSwap<Option<(String, String)>>,
    /// GSS-API service principal (`--gssapi`), instead of `credentials`, for CONNECT.
    gssapi: Option<String>,
    suites: Vec<CipherSuite>,
    timeout: Duration,
    replay_window: usize,
    heartbeat: Heartbeat,
    transport: Transport,
    /// Bytes a link's flow-start queue may hold.
    pub(crate) flow_queue: usize,
    /// The gateway that worked last: new connections start there.
    preferred: AtomicUsize,
    metrics: Arc<Metrics>,
    /// How the gateway is trusted, for certificate messages.
    trust_origin: Option<String>,
    refusals: Refusals,
    /// Shared control connections (PROTOCOL.md §2.9), by gateway.
    pub(crate) pool: Pool,
}

/// Associations the shim opens on one shared control connection before it dials another
/// (the gateway takes up to [`crate::gateway::control::MAX_PER_CONNECTION`]): a new flow costs one
/// round trip on an open connection, and no single connection carries every flow.
pub const PER_CONNECTION: usize = 256;

/// A dial is shared for this long: a flow that waited for another's dial to a gateway and
/// saw it fail does not dial that gateway again at once (a reconnect storm to a dead gateway
/// costs one timeout, not one per flow).
const DIAL_SHARED_FOR: Duration = Duration::from_secs(1);

/// The shim's shared control connections: those whose gateway speaks ASSOCIATIONS, by
/// gateway index, and one dial at a time per gateway, so that a burst of new flows (or every
/// flow of a lost connection) shares the connection the first one opens instead of each
/// dialing its own.
#[derive(Default)]
pub(crate) struct Pool {
    trunks: std::sync::Mutex<Vec<(usize, std::sync::Weak<crate::client::Trunk>)>>,
    /// Per gateway: when its last dial ended and whether it worked.
    dials: std::sync::Mutex<HashMap<usize, DialTurn>>,
}

/// One gateway's dial turn: when its last dial ended and whether it worked.
type DialTurn = Arc<tokio::sync::Mutex<Option<(std::time::Instant, bool)>>>;

impl Pool {
    /// Live connections to gateway `i` with room, fullest first (fewer connections).
    fn candidates(&self, i: usize) -> Vec<Arc<crate::client::Trunk>> {
        let mut trunks = self.trunks.lock().unwrap_or_else(|e| e.into_inner());
        trunks.retain(|(_, w)| w.upgrade().is_some_and(|t| !t.is_dead()));
        let mut c: Vec<_> = trunks
            .iter()
            .filter(|(g, _)| *g == i)
            .filter_map(|(_, w)| w.upgrade())
            .filter(|t| t.carried() < PER_CONNECTION)
            .collect();
        c.sort_by_key(|t| std::cmp::Reverse(t.carried()));
        c
    }

    fn add(&self, i: usize, trunk: &Arc<crate::client::Trunk>) {
        self.trunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((i, Arc::downgrade(trunk)));
    }

    fn dial_lock(&self, i: usize) -> DialTurn {
        self.dials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(i)
            .or_default()
            .clone()
    }

    /// Forgets the connections (a reload: new flows dial with the new configuration; the
    /// associations already open keep theirs).
    fn clear(&self) {
        self.trunks.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// A gateway's permanent refusal of this shim (see [`Shim::probe`]).
#[derive(Debug, thiserror::Error)]
#[error("gateway {gateway} refused this shim: {error}")]
pub struct Refused {
    /// The gateway, as configured.
    pub gateway: Address,
    /// Why: a permanent [`ClientError`].
    pub error: ClientError,
}

/// The permanent refusals a [`Dialer`] met: the last one (answered again for
/// [`REFUSAL_HOLD`]) and the causes already logged (each is logged once at error level).
#[derive(Default)]
pub(crate) struct Refusals {
    last: std::sync::Mutex<Option<(std::time::Instant, ClientError)>>,
    logged: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Dialer {
    /// The refusal still held, if any: the caller answers with it instead of dialing.
    pub(crate) fn held_refusal(&self) -> Option<ClientError> {
        let last = self.refusals.last.lock().unwrap_or_else(|e| e.into_inner());
        match &*last {
            Some((at, e)) if at.elapsed() < REFUSAL_HOLD => e.permanent_copy(),
            _ => None,
        }
    }

    /// Forgets the refusals met so far (a reload may have fixed their cause): the next
    /// request dials again, and a refusal met again is logged again.
    fn forget_refusals(&self) {
        self.pool.clear();
        *self.refusals.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.refusals
            .logged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Notes that a gateway accepted the shim: any held refusal is lifted.
    fn accepted(&self) {
        *self.refusals.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Notes an error of an attempt on gateway `i` and returns it, with the trust origin
    /// named in certificate messages; a permanent refusal is held and its cause logged once.
    fn refused(&self, i: usize, e: ClientError) -> ClientError {
        let e = match &self.trust_origin {
            Some(t) => e.with_trust(t),
            None => e,
        };
        if let Some(copy) = e.permanent_copy() {
            *self.refusals.last.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((std::time::Instant::now(), copy));
            let cause = format!("{}: {e}", self.name(i));
            let first = self
                .refusals
                .logged
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(cause);
            if first {
                tracing::error!(
                    gateway = %self.name(i),
                    error = %e,
                    "the gateway refused this shim; requests fail until the configuration is fixed"
                );
            } else {
                tracing::debug!(gateway = %self.name(i), error = %e, "refused again");
            }
        }
        e
    }

    /// Startup check: one secure association through the first gateway that answers
    /// (TLS, authentication and the UDP ASSOCIATE, exactly as traffic would open one), closed
    /// again at once. A permanent refusal is returned; gateways that do not answer are
    /// logged and skipped (the shim serves anyway and connects when traffic arrives).
    pub(crate) async fn probe(&self) -> Result<(), Refused> {
        for i in 0..self.len() {
            match self.udp_via(i).await {
                Ok(udp) => {
                    tracing::info!(
                        gateway = %self.name(i),
                        relay = %udp.relay(),
                        suite = %udp.suite(),
                        "connected to gateway: certificate and login accepted"
                    );
                    return Ok(());
                }
                Err(error) if error.is_permanent() => {
                    return Err(Refused {
                        gateway: self.name(i).clone(),
                        error,
                    })
                }
                Err(e) => {
                    tracing::warn!(gateway = %self.name(i), error = %e, "gateway not reachable at startup")
                }
            }
        }
        tracing::warn!("no gateway answered at startup: serving anyway, connecting when traffic arrives");
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        self.gateways.len()
    }

    pub(crate) fn preferred(&self) -> usize {
        self.preferred.load(Ordering::Relaxed) % self.len()
    }

    pub(crate) fn set_preferred(&self, i: usize) {
        self.preferred.store(i, Ordering::Relaxed);
    }

    /// The gateway's address, for logs.
    pub(crate) fn name(&self, i: usize) -> &Address {
        &self.gateways[i % self.len()].addr
    }

    /// Client options for each address of gateway `i` (a name may resolve to several).
    async fn options(&self, i: usize) -> Result<Vec<ClientOptions>, ClientError> {
        let g = &self.gateways[i % self.len()];
        let addrs: Vec<SocketAddr> = match &g.addr {
            Address::Ip(a) => vec![*a],
            Address::Domain(host, port) => {
                tokio::time::timeout(self.timeout, tokio::net::lookup_host((host.as_str(), *port)))
                    .await
                    .map_err(|_| ClientError::Timeout)??
                    .collect()
            }
        };
        if addrs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{}: no addresses", g.addr)).into());
        }
        Ok(addrs
            .into_iter()
            .map(|a| ClientOptions {
                credentials: (**self.credentials.load()).clone(),
                gssapi: self.gssapi.clone(),
                suites: self.suites.clone(),
                timeout: self.timeout,
                replay_window: self.replay_window,
                heartbeat: self.heartbeat,
                transport: self.transport,
                ..ClientOptions::new(a, &g.server_name, self.tls.load_full())
            })
            .collect())
    }

    /// Opens a secure association through gateway `i`, trying each of its addresses; while
    /// a permanent refusal is held, answers with it without dialing.
    pub(crate) async fn udp_via(&self, i: usize) -> Result<SecureUdp, ClientError> {
        self.udp_reattach_via(i, None).await
    }

    /// [`Dialer::udp_via`] that asks the gateway to re-attach association `previous` (one
    /// this shim lost) to the new connection ([`SecureUdp::connect_reattach`]).
    pub(crate) async fn udp_reattach_via(
        &self,
        i: usize,
        previous: Option<(crate::proto::AssociationId, crate::proto::CipherSuite)>,
    ) -> Result<SecureUdp, ClientError> {
        if let Some(e) = self.held_refusal() {
            return Err(e);
        }
        if let Some(u) = self.via_pool(i, previous).await {
            return Ok(u);
        }
        // One dial at a time to this gateway; who waited for another's uses its outcome.
        let asked = std::time::Instant::now();
        let lock = self.pool.dial_lock(i);
        let mut last_dial = lock.lock().await;
        if let Some((at, ok)) = *last_dial {
            if at >= asked {
                if let Some(e) = self.held_refusal() {
                    return Err(e);
                }
                if let Some(u) = self.via_pool(i, previous).await {
                    return Ok(u);
                }
                if !ok && at.elapsed() < DIAL_SHARED_FOR {
                    return Err(ClientError::Trunk(format!(
                        "a connection to {} failed a moment ago",
                        self.name(i)
                    )));
                }
            }
        }
        let dialed = self.dial(i, previous).await;
        *last_dial = Some((std::time::Instant::now(), dialed.is_ok()));
        if let Ok(u) = &dialed {
            self.pool.add(i, u.trunk());
        }
        dialed
    }

    /// The association on a shared connection to gateway `i` with room, if one works.
    async fn via_pool(
        &self,
        i: usize,
        previous: Option<(crate::proto::AssociationId, crate::proto::CipherSuite)>,
    ) -> Option<SecureUdp> {
        for trunk in self.pool.candidates(i) {
            // A connection just dialed may not have the gateway's HELLO yet.
            let speaks = tokio::time::timeout(self.timeout, trunk.peer())
                .await
                .ok()
                .flatten()
                .is_some_and(|p| p.associations);
            if !speaks {
                continue;
            }
            let opts = self.options(i).await.ok()?.into_iter().next()?;
            match SecureUdp::open_on(&trunk, &opts, previous).await {
                Ok(u) => {
                    self.metrics.opened_shared.fetch_add(1, Ordering::Relaxed);
                    return Some(u.with_metrics(self.metrics.clone()));
                }
                Err(e) => {
                    tracing::debug!(gateway = %self.name(i), error = %e, "shared connection did not open the association")
                }
            }
        }
        None
    }

    /// A new control connection to gateway `i` and its own association, trying each of the
    /// gateway's addresses.
    async fn dial(
        &self,
        i: usize,
        previous: Option<(crate::proto::AssociationId, crate::proto::CipherSuite)>,
    ) -> Result<SecureUdp, ClientError> {
        let mut last = None;
        for opts in self.options(i).await? {
            match SecureUdp::connect_reattach(&opts, previous).await {
                Ok(u) => {
                    self.accepted();
                    return Ok(u.with_metrics(self.metrics.clone()));
                }
                Err(e) if e.is_gateway_failure() => last = Some(e),
                Err(e) => return Err(self.refused(i, e)),
            }
        }
        Err(last.unwrap_or(ClientError::Timeout))
    }

    /// One round over the gateway list from the preferred one; returns the association and
    /// the index of the gateway that served it. Stops early on an answer that another
    /// gateway would give too (refused credentials, no common suite).
    pub(crate) async fn udp_any(&self) -> Result<(SecureUdp, usize), ClientError> {
        let start = self.preferred();
        let mut last = None;
        for k in 0..self.len() {
            let i = (start + k) % self.len();
            match self.udp_via(i).await {
                Ok(u) => {
                    self.set_preferred(i);
                    return Ok((u, i));
                }
                Err(e) if e.is_gateway_failure() => {
                    tracing::info!(gateway = %self.name(i), error = %e, "gateway unavailable");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(ClientError::Timeout))
    }

    /// A CONNECT to `target` through the first gateway that answers; returns the stream and
    /// the gateway's BND address. A refusal by a gateway (policy, target down) is final.
    pub(crate) async fn tcp_any(&self, target: &Address) -> Result<(Control, Address), ClientError> {
        if let Some(e) = self.held_refusal() {
            return Err(e);
        }
        let start = self.preferred();
        let mut last = None;
        for k in 0..self.len() {
            let i = (start + k) % self.len();
            let opts = match self.options(i).await {
                Ok(o) => o,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            for o in opts {
                match client::connect_tcp_bound(&o, target).await {
                    Ok(x) => {
                        self.set_preferred(i);
                        self.accepted();
                        return Ok(x);
                    }
                    Err(e) if e.is_gateway_failure() => {
                        tracing::info!(gateway = %self.name(i), error = %e, "gateway unavailable");
                        last = Some(e);
                    }
                    Err(e) if e.is_permanent() => return Err(self.refused(i, e)),
                    Err(e) => return Err(e),
                }
            }
        }
        Err(last.unwrap_or(ClientError::Timeout))
    }
}

/// State shared by every task of a shim.
pub(crate) struct Ctx {
    pub(crate) dialer: Arc<Dialer>,
    pub(crate) metrics: Arc<Metrics>,
    /// What local SOCKS5 clients must give; swapped on reload (its file read again).
    pub(crate) socks_credentials: ArcSwap<Option<(String, String)>>,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_flows: usize,
    /// Local TCP connections (SOCKS5 clients and TCP forwards).
    pub(crate) connections: Arc<Semaphore>,
    /// The key log file to follow for delegated inspection, if any.
    pub(crate) delegate_keylog: Option<PathBuf>,
    /// Delegated inspection, once running (`delegate_keylog` set).
    pub(crate) delegator: std::sync::OnceLock<Arc<delegate::Delegator>>,
}

/// A bound, not yet running shim.
pub struct Shim {
    socks: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    forwards: Vec<(Forward, Bound)>,
    ctx: Arc<Ctx>,
}

enum Bound {
    Udp(UdpSocket),
    Tcp(TcpListener),
}

impl Bound {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Bound::Udp(s) => s.local_addr(),
            Bound::Tcp(l) => l.local_addr(),
        }
    }
}

impl Shim {
    /// Binds the SOCKS5 listener and every forward's local socket. Errors name the socket.
    pub async fn bind(settings: ShimSettings) -> io::Result<Shim> {
        if settings.gateways.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no gateway configured",
            ));
        }
        if let Some(a) = settings.socks {
            if !a.ip().is_loopback() && settings.socks_credentials.is_none() {
                tracing::warn!(
                    listener = %a,
                    "SOCKS5 listener is not on loopback and asks for no authentication: \
                     anyone who can reach it can use the gateway with this shim's credentials"
                );
            }
        }
        let socks = match settings.socks {
            Some(a) => Some(TcpListener::bind(a).await.map_err(crate::net::bind_error(
                "SOCKS5 listener",
                a,
                "--socks",
            ))?),
            None => None,
        };
        let mut forwards = Vec::new();
        for f in &settings.forwards {
            let bound = match f.proto {
                ForwardProto::Udp => {
                    Bound::Udp(crate::net::bind_udp(f.local).map_err(crate::net::bind_error(
                        "UDP forward",
                        f.local,
                        "--forward",
                    ))?)
                }
                ForwardProto::Tcp => {
                    Bound::Tcp(TcpListener::bind(f.local).await.map_err(crate::net::bind_error(
                        "TCP forward",
                        f.local,
                        "--forward",
                    ))?)
                }
            };
            forwards.push((f.clone(), bound));
        }
        let metrics = Arc::new(Metrics::default());
        let dialer = Arc::new(Dialer {
            gateways: settings.gateways,
            tls: ArcSwap::new(settings.tls),
            credentials: ArcSwap::from_pointee(settings.credentials),
            gssapi: settings.gssapi,
            suites: settings.suites,
            timeout: settings.connect_timeout,
            replay_window: settings.replay_window,
            heartbeat: settings.heartbeat,
            transport: settings.transport,
            flow_queue: settings.flow_queue,
            preferred: AtomicUsize::new(0),
            metrics: metrics.clone(),
            trust_origin: settings.trust_origin,
            refusals: Refusals::default(),
            pool: Pool::default(),
        });
        let metrics_listener = match settings.metrics {
            Some(a) => Some(crate::metrics::http::bind(a).await?),
            None => None,
        };
        Ok(Shim {
            socks,
            metrics_listener,
            forwards,
            ctx: Arc::new(Ctx {
                dialer,
                metrics,
                socks_credentials: ArcSwap::from_pointee(settings.socks_credentials),
                idle_timeout: settings.idle_timeout,
                max_flows: settings.max_flows.max(1),
                connections: Arc::new(Semaphore::new(settings.max_connections.max(1))),
                delegate_keylog: settings.delegate_keylog,
                delegator: std::sync::OnceLock::new(),
            }),
        })
    }

    /// A handle that puts a re-read configuration in force while the shim runs (SIGHUP).
    /// `running` is the configuration the shim was built from.
    pub fn reloader(&self, running: &ShimConfig) -> ShimReloader {
        ShimReloader {
            ctx: self.ctx.clone(),
            running: std::sync::Mutex::new(running.clone()),
        }
    }

    /// The bound SOCKS5 address, if the listener is on.
    pub fn socks_addr(&self) -> Option<SocketAddr> {
        // Invariant: a bound listener has a local address.
        self.socks
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
    }

    /// Each forward as configured, with the local address it bound (its real port when
    /// configured with port 0), in configuration order.
    pub fn forward_addrs(&self) -> Vec<(Forward, SocketAddr)> {
        self.forwards
            .iter()
            // Invariant: a bound socket has a local address.
            .map(|(f, b)| (f.clone(), b.local_addr().expect("bound socket")))
            .collect()
    }

    /// The bound metrics (HTTP) address, if `--metrics` is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        // Invariant: a bound listener has a local address.
        self.metrics_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
    }

    /// Checks, before serving, that the first gateway that answers accepts this shim's
    /// certificate trust and login (one connection, closed again). Returns the refusal when
    /// it does not, so that the caller can exit with it instead of serving requests that
    /// would all fail; gateways that do not answer are only logged.
    /// The future owns what it needs, so it can run beside [`Shim::run`].
    pub fn probe(&self) -> impl Future<Output = Result<(), Refused>> + Send + 'static {
        let dialer = self.ctx.dialer.clone();
        async move { dialer.probe().await }
    }

    /// The shim's counters (datagrams forwarded and returned, drops by reason).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.ctx.metrics.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, closes every association
    /// and gives local TCP connections a bounded time to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let Shim {
            socks,
            metrics_listener,
            forwards,
            ctx,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut services = JoinSet::new();
        if let Some(path) = &ctx.delegate_keylog {
            tracing::info!(file = %path.display(), "delegating the TLS secrets of CONNECT tunnels found in this key log");
            let d = delegate::Delegator::start(
                path.clone(),
                ctx.dialer.clone(),
                ctx.metrics.clone(),
                stop_rx.clone(),
            );
            let _ = ctx.delegator.set(d);
        }
        if let Some(l) = metrics_listener {
            let exporter =
                crate::metrics::export::Exporter::new("sudp_shim", ctx.metrics.clone(), Vec::new());
            let stopping = stop_rx.clone();
            let endpoints = Arc::new(crate::metrics::http::Endpoints {
                metrics: Box::new(move || exporter.render()),
                healthy: Box::new(move || !*stopping.borrow()),
            });
            let mut stop = stop_rx.clone();
            services.spawn(crate::metrics::http::serve(l, endpoints, async move {
                stopped(&mut stop).await
            }));
        }
        if let Some(listener) = socks {
            services.spawn(socks::serve(ctx.clone(), listener, stop_rx.clone()));
        }
        for (spec, bound) in forwards {
            match bound {
                Bound::Udp(sock) => {
                    services.spawn(forward::serve_udp(ctx.clone(), spec, sock, stop_rx.clone()))
                }
                Bound::Tcp(listener) => {
                    services.spawn(forward::serve_tcp(ctx.clone(), spec, listener, stop_rx.clone()))
                }
            };
        }
        shutdown.await;
        tracing::info!("shim shutting down");
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(1), async {
            while services.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            services.shutdown().await;
        }
        tracing::info!(
            forwarded = ctx.metrics.forwarded.load(Ordering::Relaxed),
            returned = ctx.metrics.returned.load(Ordering::Relaxed),
            drops = %ctx.metrics.drop_summary(),
            "shim stopped"
        );
        Ok(())
    }
}

/// Waits for `stop` to turn true (or its sender to go away).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Accepts local TCP connections under the shim's connection limit until `stop`, running
/// `handle` for each in a task of its own; then drains them. `what` names the listener in
/// logs.
pub(crate) async fn accept_loop<F, Fut>(
    ctx: &Ctx,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    what: &str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = ctx.connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopped(&mut stop) => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let conn = handle(tcp, peer);
                    conns.spawn(async move {
                        conn.await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    drain(conns, what).await;
}

/// Waits for a set of local TCP connection tasks to finish, at most [`DRAIN_TIMEOUT`], then
/// aborts the rest.
pub(crate) async fn drain(mut conns: JoinSet<()>, what: &str) {
    if conns.is_empty() {
        return;
    }
    let done = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if done.is_err() {
        tracing::info!(
            what,
            left = conns.len(),
            "drain timeout: closing remaining connections"
        );
        conns.shutdown().await;
    }
}

/// Why a shim reload left the running configuration in force.
#[derive(Debug, thiserror::Error)]
pub enum ShimReloadError {
    /// The configuration (flags and file) does not validate.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A file the configuration names does not load (the message names key and file).
    #[error("{0:#}")]
    Load(anyhow::Error),
    /// A login was switched on or off: the local SOCKS5 methods (and the warning about an
    /// open listener) are decided at start.
    #[error("`{0}` switched on or off: needs a restart")]
    LoginSwitched(&'static str),
}

/// What one successful shim reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimReloaded {
    /// The changes, for a log line (never a password).
    pub changes: String,
    /// Configuration keys that changed but need a restart; kept at their running values.
    pub needs_restart: Vec<&'static str>,
}

/// Puts a re-read shim configuration in force: the trust (CA or pin), the client
/// certificate, `tls12`, and the passwords read from the password files again, for every
/// connection to a gateway and every local SOCKS5 login from then on. Associations and
/// tunnels already open go on; a link that reconnects later uses the new settings.
pub struct ShimReloader {
    ctx: Arc<Ctx>,
    running: std::sync::Mutex<ShimConfig>,
}

impl ShimReloader {
    /// Re-reads the configuration from `args` (the flags the shim started with) and the
    /// files it names, and swaps the reloadable pieces in. Blocks on file reads. On error
    /// nothing changed.
    pub fn reload(&self, args: ShimArgs) -> Result<ShimReloaded, ShimReloadError> {
        let cfg = ShimConfig::from_args(args)?;
        // A poisoned lock only means a reload panicked before it swapped anything.
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.login.is_some() != cfg.login.is_some() {
            return Err(ShimReloadError::LoginSwitched("user"));
        }
        if running.socks_login.is_some() != cfg.socks_login.is_some() {
            return Err(ShimReloadError::LoginSwitched("socks_user"));
        }
        let new = ShimSettings::from_config(&cfg).map_err(ShimReloadError::Load)?;
        let dialer = &self.ctx.dialer;
        let mut changes = vec![match &cfg.trust {
            Trust::Ca(p) => format!("trust: CA {}", p.display()),
            Trust::Pin(pin) => format!("trust: pin {}", crate::tls::pin_hex(pin)),
        }];
        if let Some((cert, _)) = &cfg.client_cert {
            changes.push(format!("client certificate {}", cert.display()));
        }
        dialer.tls.store(new.tls);
        let word = |same: bool| if same { "unchanged" } else { "changed" };
        if new.credentials.is_some() {
            let same = **dialer.credentials.load() == new.credentials;
            changes.push(format!("gateway login {}", word(same)));
        }
        dialer.credentials.store(Arc::new(new.credentials));
        if new.socks_credentials.is_some() {
            let same = **self.ctx.socks_credentials.load() == new.socks_credentials;
            changes.push(format!("local SOCKS5 login {}", word(same)));
        }
        self.ctx.socks_credentials.store(Arc::new(new.socks_credentials));
        dialer.forget_refusals();
        let needs_restart = shim_restart_only_changes(&running, &cfg);
        let mut kept = running.clone();
        kept.trust = cfg.trust.clone();
        kept.client_cert = cfg.client_cert.clone();
        kept.login = cfg.login.clone();
        kept.socks_login = cfg.socks_login.clone();
        kept.tls12 = cfg.tls12;
        *running = kept;
        Ok(ShimReloaded {
            changes: changes.join(", "),
            needs_restart,
        })
    }
}

/// The shim configuration keys whose change needs a restart.
fn shim_restart_only_changes(old: &ShimConfig, new: &ShimConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |key, changed: bool| {
        if changed {
            out.push(key);
        }
    };
    check("gateway", old.gateways != new.gateways);
    check("server_name", old.server_name != new.server_name);
    check("socks", old.socks != new.socks);
    check("forward", old.forwards != new.forwards);
    check("suites", old.suites != new.suites);
    check("replay_window", old.replay_window != new.replay_window);
    check("nice", old.nice != new.nice);
    check("idle_timeout", old.idle_timeout != new.idle_timeout);
    check("max_flows", old.max_flows != new.max_flows);
    check("max_connections", old.max_connections != new.max_connections);
    check("connect_timeout", old.connect_timeout != new.connect_timeout);
    check(
        "heartbeat_interval",
        old.heartbeat.interval != new.heartbeat.interval,
    );
    check(
        "heartbeat_timeout",
        old.heartbeat.timeout != new.heartbeat.timeout,
    );
    check("flow_queue", old.flow_queue != new.flow_queue);
    check("metrics", old.metrics != new.metrics);
    check("transport", old.transport != new.transport);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_keys_of_the_shim_are_named_and_others_are_not() {
        let config = |edit: fn(&mut crate::config::ShimArgs)| {
            let mut a = crate::config::ShimArgs {
                gateway: vec![crate::config::parse_host_port("127.0.0.1:1443").unwrap()],
                ca: Some("ca.pem".into()),
                ..Default::default()
            };
            edit(&mut a);
            ShimConfig::from_args(a).unwrap()
        };
        let old = config(|_| {});
        assert_eq!(
            shim_restart_only_changes(&old, &config(|_| {})),
            Vec::<&str>::new()
        );
        let new = config(|a| {
            a.nice = Some(5);
            a.replay_window = Some(64);
        });
        assert_eq!(shim_restart_only_changes(&old, &new), ["replay_window", "nice"]);
    }
}
