//! The UDP relay: one socket that serves naked and secure clients side by side.
//!
//! ```text
//!            clients                       relay socket                     targets
//!  naked  ── 00 00 FRAG ATYP ... ──┐                                 ┌── outbound socket A ── target
//!                                  ├─▶ detect ─▶ naked table (addr) ─┤
//!  secure ── 97 03 03 len id ... ──┘          ─▶ secure table (id)  ─┴── outbound socket B ── target
//! ```
//!
//! Inbound, the receive loop classifies each datagram by its first bytes
//! ([`crate::proto::classify`]). Naked datagrams are matched to their association by the
//! client's address; secure records by association id, then checked against the replay
//! window, verified and decrypted by the association's [`RecvSession`]. The loop never awaits
//! anything but the next datagram: outbound sends are non-blocking, names missing from the
//! cache are resolved in a task of their own, so one slow or hostile client never stalls
//! the others. Every refusal is counted once in [`Metrics`] by [`DropReason`].
//!
//! Outbound, each association has its own socket so replies map back to it; a task per
//! association reads replies, keeps only those from destinations the client sent to (unless
//! full cone), and returns them as records sealed with the association's keys or as naked
//! datagrams with the SOCKS5 UDP header of the source.
//!
//! The data path is batched both ways ([`crate::net::batch`]): `recvmmsg` (+ GRO) in, and
//! runs of equal-sized datagrams for one destination leave in one GSO send. The association
//! tables are read without locks (copy-on-write maps: associations come and go rarely,
//! datagrams often); the only per-datagram lock is the association's own receive state,
//! which only the receive loop takes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::task::JoinHandle;

use crate::net::batch::{stretches, BatchSocket, GsoBatch, RecordTrain, RecvBatch, RUN, SMALL_BATCH};

use crate::metrics::{Metrics, Path};
use crate::net::channel::FrameSender;
use crate::net::dns::Resolver;
use crate::net::{self, canonical, canonical_ip, for_socket};
use crate::policy::{LocalAddrs, Policy};
use crate::proto::path::{ControlMessage, PathAction, PathValidator, PATH_MESSAGE_LEN};
use crate::proto::record;
use crate::proto::session::{Content, RecvSession, SendSession};
use crate::proto::socks::{parse_udp_header, AddrRef};
use crate::proto::{classify, AssociationId, DatagramKind, DropReason, KeySchedule, Role, SealError};

/// Destinations remembered per association for the restricted-cone check.
const MAX_PEERS: usize = 4096;
/// Name resolutions one association may have in flight.
const MAX_PENDING_RESOLVES: usize = 16;
/// How long a name resolution may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the host's interface addresses are enumerated again for the policy (they
/// change with DHCP, VPNs, containers).
const LOCAL_ADDRS_REFRESH: Duration = Duration::from_secs(30);

/// Why an association could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AssocError {
    /// The gateway holds `--max-associations` already.
    #[error("association limit of {0} reached")]
    Limit(usize),
    /// No outbound socket could be bound.
    #[error("cannot bind an outbound socket: {0}")]
    Io(#[from] io::Error),
    /// The association id is in use by a live association (a collision of two random
    /// 64-bit ids: practically never, but refused rather than shared).
    #[error("association id in use")]
    IdInUse,
    /// A naked association without the client's port while `naked_require_port` is set.
    #[error("the client did not announce its UDP port (DST.PORT 0) and the gateway requires it")]
    PortRequired,
}

/// Relay-wide settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Accept replies from any source, not only from destinations the client sent to.
    pub full_cone: bool,
    /// Most associations open at once.
    pub max_associations: usize,
    /// Replay window size of secure associations.
    pub replay_window: usize,
    /// Receive workers (relay sockets sharing the port); at least 1.
    pub workers: usize,
    /// Receive buffer asked for each relay socket, in bytes (the kernel may grant less).
    pub recv_buffer: usize,
    /// Refuse naked associations whose UDP ASSOCIATE gives no port (DST.PORT 0), rather
    /// than binding the port of the first datagram from the client's IP.
    pub naked_require_port: bool,
    /// End-to-end destinations: an association that draws an ICMP port unreachable from
    /// one ends (PROTOCOL.md §2.4 CLOSE `0x06`). Empty: ICMP errors are not watched.
    pub e2e: Arc<crate::gateway::delegation::E2e>,
}

/// The relay: shared socket, association tables, counters.
pub struct Relay {
    /// The relay sockets: one per receive worker, all bound to `local` (SO_REUSEPORT);
    /// replies leave through the first.
    ios: Vec<BatchSocket>,
    local: SocketAddr,
    /// Copy-on-write: lookups per datagram are lock-free loads.
    secure: ArcSwap<HashMap<AssociationId, Arc<Association>>>,
    naked_by_addr: ArcSwap<HashMap<SocketAddr, Arc<Association>>>,
    /// Associations whose client port is not known yet, oldest first, by client IP. Also
    /// serialises every writer of the two maps above.
    naked_pending: Mutex<HashMap<IpAddr, VecDeque<Arc<Association>>>>,
    live: AtomicUsize,
    /// The ids of every live association, naked and secure: an id is unique among them.
    ids: Mutex<HashSet<AssociationId>>,
    settings: RelaySettings,
    metrics: Arc<Metrics>,
    dns: Arc<Resolver>,
    /// Swapped whole on reload ([`Relay::set_policy`]); one lock-free load per datagram.
    policy: ArcSwap<Policy>,
    epoch: Instant,
}

/// One association (naked or secure).
pub struct Association {
    id: AssociationId,
    /// Unique for the life of the process (ids are not: a re-attached association reuses
    /// one), for caches that must never mistake a successor for its predecessor.
    serial: u64,
    user: Option<String>,
    client_ip: IpAddr,
    /// Where replies go: naked, the client's port once known; secure, the path its
    /// [`PathValidator`] holds (announced, first record, or validated since).
    client: ArcSwapOption<SocketAddr>,
    outbound: BatchSocket,
    outbound_v6: bool,
    peers: Mutex<HashSet<SocketAddr>>,
    /// Bumped whenever `peers` is cleared, so cached "known peer" answers expire.
    peers_generation: AtomicU64,
    last_active: AtomicU64,
    pending_resolves: AtomicUsize,
    kind: Kind,
    /// The control channel's sender, for replies carried inside TLS (secure associations
    /// whose client speaks RECORD frames, PROTOCOL.md §2.4).
    tls: ArcSwapOption<FrameSender>,
    /// Replies go inside TLS: the client's newest data record came that way.
    via_tls: AtomicBool,
    /// What the association carried, for its end line.
    stats: AssocStats,
    /// Another control connection re-attached this association's id
    /// ([`Relay::supersede`]): it is out of the tables, and its task ends it.
    superseded: AtomicBool,
    /// An end-to-end destination answered ICMP port unreachable: its task ends it.
    unreachable: ArcSwapOption<SocketAddr>,
}

/// Datagrams and payload bytes one association carried each way (relaxed counters,
/// updated per send, i.e. per train).
#[derive(Debug, Default)]
pub struct AssocStats {
    /// Client to targets.
    pub datagrams_up: AtomicU64,
    /// Payload bytes client to targets.
    pub bytes_up: AtomicU64,
    /// Targets to client.
    pub datagrams_down: AtomicU64,
    /// Payload bytes targets to client.
    pub bytes_down: AtomicU64,
}

enum Kind {
    Naked,
    Secure {
        rx: Box<Mutex<SecureRx>>,
        /// The g2c sender: the reply task seals trains with it, the receive loop a path
        /// challenge now and then.
        tx: Box<Mutex<SendSession>>,
    },
}

/// What the receive loop keeps per secure association, under one lock.
struct SecureRx {
    session: RecvSession,
    path: PathValidator,
}

impl Association {
    /// The association id (secure: the wire id; naked: an internal one).
    pub fn id(&self) -> AssociationId {
        self.id
    }

    /// The path its client datagrams take, for the counters.
    fn path(&self) -> Path {
        match self.kind {
            Kind::Naked => Path::Naked,
            Kind::Secure { .. } => Path::Secure,
        }
    }

    fn client_addr(&self) -> Option<SocketAddr> {
        self.client.load().as_deref().copied()
    }

    fn set_client(&self, addr: SocketAddr) {
        if self.client_addr() != Some(addr) {
            self.client.store(Some(Arc::new(addr)));
        }
    }

    fn remember(&self, peer: SocketAddr) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() >= MAX_PEERS && !peers.contains(&peer) {
            // Bounded: a client spraying destinations forgets the old ones, and replies
            // from those are then refused as unsolicited.
            peers.clear();
            self.peers_generation.fetch_add(1, Ordering::AcqRel);
        }
        peers.insert(peer);
    }

    fn knows(&self, peer: SocketAddr) -> bool {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&peer)
    }
}

/// Remembers the last (association, peer) pair a loop checked, so a steady stream takes
/// the peer-set lock once, not once per datagram.
///
/// Keyed by the association's [`Association::serial`], not its id: a re-attached association
/// reuses its predecessor's id but starts with an empty peer set.
#[derive(Default)]
struct PeerCache {
    last: Option<(u64, SocketAddr, u64)>,
}

impl PeerCache {
    fn hit(&self, assoc: &Association, peer: SocketAddr) -> bool {
        self.last == Some((assoc.serial, peer, assoc.peers_generation.load(Ordering::Acquire)))
    }

    fn set(&mut self, assoc: &Association, peer: SocketAddr) {
        self.last = Some((assoc.serial, peer, assoc.peers_generation.load(Ordering::Acquire)));
    }
}

/// Source of [`Association::serial`].
static SERIALS: AtomicU64 = AtomicU64::new(0);

/// Keeps an association open; dropping it closes the association (tables, reply task).
pub struct AssociationHandle {
    relay: Arc<Relay>,
    assoc: Arc<Association>,
    reply_task: JoinHandle<()>,
}

impl AssociationHandle {
    /// The association id.
    pub fn id(&self) -> AssociationId {
        self.assoc.id
    }

    /// Lets replies travel inside TLS through `sender` (the association's control channel)
    /// once the client sends its records that way.
    pub fn attach_tls(&self, sender: FrameSender) {
        self.assoc.tls.store(Some(Arc::new(sender)));
    }

    /// Stops replies inside TLS (the control channel is closing); they go over UDP again.
    pub fn detach_tls(&self) {
        self.assoc.tls.store(None);
        self.assoc.via_tls.store(false, Ordering::Relaxed);
    }

    /// What the association carried so far.
    pub fn stats(&self) -> &AssocStats {
        &self.assoc.stats
    }

    /// Distinct destinations the client sent to (up to the bound the restricted cone keeps).
    pub fn destinations(&self) -> usize {
        self.assoc.peers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The distinct destinations so far (bounded like the set itself), sorted.
    pub fn destination_list(&self) -> Vec<String> {
        let peers = self.assoc.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<SocketAddr> = peers.iter().copied().collect();
        list.sort();
        list.into_iter().map(|a| a.to_string()).collect()
    }

    /// A record that arrived inside TLS on this association's control connection (a RECORD
    /// frame): opened and forwarded like a UDP one (PROTOCOL.md §6.1, same window), with
    /// no path rules (the control connection is the client); one naming another association
    /// is refused (`foreign_source`). The client's newest data record arriving this way
    /// turns replies to TLS.
    pub fn receive_tls_record(&self, record: &mut [u8]) {
        let relay = &self.relay;
        let assoc = &self.assoc;
        let h = match record::parse_header_with(record, |id| relay.is_aead(id)) {
            Ok(h) => h,
            Err(e) => return relay.metrics.count_drop(e.reason()),
        };
        if h.assoc != assoc.id {
            return relay.metrics.count_drop(DropReason::ForeignSource);
        }
        let Kind::Secure { rx, .. } = &assoc.kind else {
            return relay.metrics.count_drop(DropReason::UnknownAssociation);
        };
        let mut rx = rx.lock().unwrap_or_else(|e| e.into_inner());
        let o = match rx.session.open(record) {
            Ok(o) => o,
            Err(e) => return relay.metrics.count_drop(e.reason()),
        };
        let newest = o.is_newest();
        let Some((addr, payload)) = o.data() else {
            // Path messages and probes are about UDP; inside TLS they mean nothing.
            return relay.metrics.count_drop(DropReason::BadControl);
        };
        if newest && !assoc.via_tls.swap(true, Ordering::Relaxed) {
            tracing::info!(assoc = %assoc.id, "client records arrive inside TLS: replies follow");
        }
        assoc.last_active.store(relay.now_ms(), Ordering::Relaxed);
        let mut out = Forwarder {
            path: Path::Tls,
            ..Forwarder::default()
        };
        relay.forward(assoc, addr, payload, &mut out);
        out.flush(relay);
    }

    /// True once another control connection re-attached this association's id: the caller
    /// ends it (its CLOSE reason is `moved`).
    pub fn is_superseded(&self) -> bool {
        self.assoc.superseded.load(Ordering::Acquire)
    }

    /// The end-to-end destination that answered ICMP port unreachable, if one did: the
    /// caller ends the association (CLOSE `0x06`).
    pub fn unreachable(&self) -> Option<SocketAddr> {
        self.assoc.unreachable.load().as_deref().copied()
    }

    /// True when the association can carry no more replies (its sending key is exhausted).
    pub fn is_dead(&self) -> bool {
        self.reply_task.is_finished()
    }

    /// Time since the last datagram in either direction.
    pub fn idle_for(&self) -> Duration {
        let now = self.relay.now_ms();
        Duration::from_millis(now.saturating_sub(self.assoc.last_active.load(Ordering::Relaxed)))
    }
}

impl Drop for AssociationHandle {
    fn drop(&mut self) {
        self.reply_task.abort();
        self.relay.remove(&self.assoc);
    }
}

impl Relay {
    /// Binds the relay socket.
    pub fn bind(
        addr: SocketAddr,
        settings: RelaySettings,
        metrics: Arc<Metrics>,
        dns: Arc<Resolver>,
        policy: Arc<Policy>,
    ) -> io::Result<Arc<Relay>> {
        let sockets = net::bind_udp_group(addr, settings.workers.max(1))?;
        let local = sockets[0].local_addr()?;
        let ios = sockets
            .into_iter()
            .map(|s| {
                net::set_recv_buffer(&s, settings.recv_buffer)?;
                Ok(BatchSocket::new(s)?.track_drops(&metrics.socket_drops.relay))
            })
            .collect::<io::Result<Vec<_>>>()?;
        refresh_local_addrs(&policy)?;
        Ok(Arc::new(Relay {
            ios,
            local,
            secure: ArcSwap::from_pointee(HashMap::new()),
            naked_by_addr: ArcSwap::from_pointee(HashMap::new()),
            naked_pending: Mutex::new(HashMap::new()),
            live: AtomicUsize::new(0),
            ids: Mutex::new(HashSet::new()),
            settings,
            metrics,
            dns,
            policy: ArcSwap::new(policy),
            epoch: Instant::now(),
        }))
    }

    /// The bound relay address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Associations open now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A fresh association id from the operating system's CSPRNG (`rand`'s thread RNG,
    /// seeded from it) that no live association uses. Opening the association checks again
    /// ([`AssocError::IdInUse`]), so two negotiations that drew the same id at once cannot
    /// both get it.
    pub fn new_assoc_id(&self) -> AssociationId {
        let ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let id = AssociationId(rand::random::<u64>());
            if !ids.contains(&id) {
                return id;
            }
        }
    }

    fn reserve(&self) -> Result<(), AssocError> {
        let max = self.settings.max_associations;
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| ())
            .map_err(|_| AssocError::Limit(max))
    }

    fn new_association(
        &self,
        id: AssociationId,
        user: Option<String>,
        client_ip: IpAddr,
        client: Option<SocketAddr>,
        kind: Kind,
    ) -> Result<Arc<Association>, AssocError> {
        self.reserve()?;
        let watch_icmp = !self.settings.e2e.is_empty();
        let (outbound, outbound_v6) = match net::bind_outbound().and_then(|(s, v6)| {
            let s = BatchSocket::new(s)?.track_drops(&self.metrics.socket_drops.outbound);
            if watch_icmp {
                net::icmp::enable_errors(s.raw_fd(), v6)?;
            }
            Ok((s, v6))
        }) {
            Ok(s) => s,
            Err(e) => {
                self.live.fetch_sub(1, Ordering::AcqRel);
                return Err(e.into());
            }
        };
        if !self.ids.lock().unwrap_or_else(|e| e.into_inner()).insert(id) {
            self.live.fetch_sub(1, Ordering::AcqRel);
            return Err(AssocError::IdInUse);
        }
        self.metrics.associations.fetch_add(1, Ordering::Relaxed);
        self.metrics.associations_active.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Association {
            id,
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
            user,
            client_ip: canonical_ip(client_ip),
            client: ArcSwapOption::new(client.map(Arc::new)),
            outbound,
            outbound_v6,
            peers: Mutex::new(HashSet::new()),
            peers_generation: AtomicU64::new(0),
            last_active: AtomicU64::new(self.now_ms()),
            pending_resolves: AtomicUsize::new(0),
            tls: ArcSwapOption::empty(),
            via_tls: AtomicBool::new(false),
            stats: AssocStats::default(),
            superseded: AtomicBool::new(false),
            unreachable: ArcSwapOption::empty(),
            kind,
        }))
    }

    /// Opens a secure association with keys exported from the control connection.
    /// `client_port`: the port the client announced in its UDP ASSOCIATE (DST.PORT, if not
    /// 0); replies start there, else at the source of the first authenticated record
    /// (PROTOCOL.md §6.3).
    pub fn open_secure(
        self: &Arc<Self>,
        id: AssociationId,
        keys: &KeySchedule,
        client_ip: IpAddr,
        client_port: Option<u16>,
        user: Option<String>,
    ) -> Result<AssociationHandle, AssocError> {
        let announced = client_port.map(|p| SocketAddr::new(canonical_ip(client_ip), p));
        let rx = SecureRx {
            session: RecvSession::new(id, keys, Role::Gateway, self.settings.replay_window),
            path: PathValidator::new(announced),
        };
        #[cfg(not(feature = "test-doors"))]
        let tx = SendSession::new(id, keys, Role::Gateway);
        #[cfg(feature = "test-doors")]
        let tx = SendSession::resume(
            id,
            keys,
            Role::Gateway,
            TEST_G2C_FIRST_NONCE.load(Ordering::Relaxed),
        );
        let kind = Kind::Secure {
            rx: Box::new(Mutex::new(rx)),
            tx: Box::new(Mutex::new(tx)),
        };
        let assoc = self.new_association(id, user, client_ip, announced, kind)?;
        {
            // Writers of the tables serialise on this lock.
            let _writers = self.naked_pending.lock().unwrap_or_else(|e| e.into_inner());
            self.secure.rcu(|t| {
                let mut t = HashMap::clone(t);
                t.insert(id, assoc.clone());
                t
            });
        }
        let reply_task = tokio::spawn(reply_loop(self.clone(), assoc.clone()));
        Ok(AssociationHandle {
            relay: self.clone(),
            assoc,
            reply_task,
        })
    }

    /// Opens a naked association for a client at `client_ip`; `client_port` is the port the
    /// client said it will send from (RFC 1928 DST.PORT), if it said one.
    pub fn open_naked(
        self: &Arc<Self>,
        client_ip: IpAddr,
        client_port: Option<u16>,
        user: Option<String>,
    ) -> Result<AssociationHandle, AssocError> {
        if client_port.is_none() && self.settings.naked_require_port {
            return Err(AssocError::PortRequired);
        }
        let client = client_port.map(|p| SocketAddr::new(canonical_ip(client_ip), p));
        // Naked ids never go on the wire but key the reply path's caches: unique too. A
        // concurrent open may take the id drawn here; draw again then.
        let assoc = loop {
            let id = self.new_assoc_id();
            match self.new_association(id, user.clone(), client_ip, client, Kind::Naked) {
                Err(AssocError::IdInUse) => continue,
                r => break r?,
            }
        };
        {
            let mut pending = self.naked_pending.lock().unwrap_or_else(|e| e.into_inner());
            match client {
                Some(a) => {
                    self.naked_by_addr.rcu(|t| {
                        let mut t = HashMap::clone(t);
                        t.insert(a, assoc.clone());
                        t
                    });
                }
                None => pending
                    .entry(assoc.client_ip)
                    .or_default()
                    .push_back(assoc.clone()),
            }
        }
        let reply_task = tokio::spawn(reply_loop(self.clone(), assoc.clone()));
        Ok(AssociationHandle {
            relay: self.clone(),
            assoc,
            reply_task,
        })
    }

    /// Takes the live secure association `id`, if any, out of the tables at once, so that
    /// a re-attached association of the same id can take its place; the old one's task sees
    /// [`AssociationHandle::is_superseded`] and ends it. Returns whether there was one.
    pub fn supersede(&self, id: AssociationId) -> bool {
        let _writers = self.naked_pending.lock().unwrap_or_else(|e| e.into_inner());
        let Some(old) = self.secure.load().get(&id).cloned() else {
            return false;
        };
        old.superseded.store(true, Ordering::Release);
        self.secure.rcu(|t| {
            let mut t = HashMap::clone(t);
            t.remove(&id);
            t
        });
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        true
    }

    fn remove(&self, assoc: &Arc<Association>) {
        let mut pending = self.naked_pending.lock().unwrap_or_else(|e| e.into_inner());
        // A superseded association left the tables and its id already: they may hold its
        // successor now.
        let superseded = assoc.superseded.load(Ordering::Acquire);
        match &assoc.kind {
            Kind::Secure { .. } if superseded => {}
            Kind::Secure { .. } => {
                self.secure.rcu(|t| {
                    let mut t = HashMap::clone(t);
                    if t.get(&assoc.id).is_some_and(|x| Arc::ptr_eq(x, assoc)) {
                        t.remove(&assoc.id);
                    }
                    t
                });
            }
            Kind::Naked => {
                if let Some(a) = assoc.client_addr() {
                    self.naked_by_addr.rcu(|t| {
                        let mut t = HashMap::clone(t);
                        if t.get(&a).is_some_and(|x| x.id == assoc.id) {
                            t.remove(&a);
                        }
                        t
                    });
                }
                if let Some(q) = pending.get_mut(&assoc.client_ip) {
                    q.retain(|x| x.id != assoc.id);
                    if q.is_empty() {
                        pending.remove(&assoc.client_ip);
                    }
                }
            }
        }
        if !superseded {
            self.ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&assoc.id);
        }
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.metrics.associations_active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Runs one receive loop per relay socket until the task is aborted; also refreshes
    /// the host's own addresses in the policy every [`LOCAL_ADDRS_REFRESH`].
    pub async fn run(self: Arc<Self>) {
        let mut workers = tokio::task::JoinSet::new();
        for i in 0..self.ios.len() {
            workers.spawn(self.clone().receive_loop(i));
        }
        let relay = self.clone();
        workers.spawn(async move {
            let mut tick = tokio::time::interval(LOCAL_ADDRS_REFRESH);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = relay.refresh_local_addrs() {
                    tracing::warn!(error = %e, "cannot enumerate interface addresses; keeping the previous set");
                }
            }
        });
        while workers.join_next().await.is_some() {}
    }

    /// Enumerates the host's interface addresses now and hands them to the policy (which
    /// denies them by default). The relay does this when it binds and every
    /// [`LOCAL_ADDRS_REFRESH`] while it runs.
    pub fn refresh_local_addrs(&self) -> io::Result<()> {
        refresh_local_addrs(&self.policy.load())
    }

    /// The destination policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Puts `policy` in force for every datagram and CONNECT checked from now on (a reload).
    /// It inherits the host addresses the running policy knows, so the built-in default
    /// keeps denying them until the next refresh.
    pub fn set_policy(&self, policy: Arc<Policy>) {
        policy.set_local_addrs((*self.policy.load().local_addrs()).clone());
        self.policy.store(policy);
    }

    /// Receive workers in use.
    pub fn workers(&self) -> usize {
        self.ios.len()
    }

    fn io(&self) -> &BatchSocket {
        &self.ios[0]
    }

    async fn receive_loop(self: Arc<Self>, worker: usize) {
        let mut batch = RecvBatch::default();
        let mut out = Forwarder::default();
        loop {
            if let Err(e) = self.ios[worker].recv_batch(&mut batch).await {
                tracing::debug!(error = %e, "relay receive error");
                tokio::task::yield_now().await;
                continue;
            }
            let started = Instant::now();
            let mut datagrams = 0u64;
            batch.for_each_run(|run, src| {
                datagrams += run.len() as u64;
                self.handle_run(run, src, &mut out)
            });
            out.flush(&self);
            if datagrams > 0 {
                let each = started.elapsed() / datagrams as u32;
                self.metrics.processing.observe_many(each, datagrams);
            }
        }
    }

    /// Routes a run of datagrams from one client; what it forwards may wait in `out` until
    /// [`Forwarder::flush`]. The tags of equal-length records of one association in the
    /// run are checked together first ([`RecvSession::verify_run`]).
    fn handle_run(self: &Arc<Self>, run: &mut [&mut [u8]], src: SocketAddr, out: &mut Forwarder) {
        let mut tags = [None; RUN];
        if run.len() > 1 {
            self.preverify(run, src, &mut tags);
        }
        for (datagram, tag) in run.iter_mut().zip(tags) {
            match classify(datagram) {
                DatagramKind::Secure => self.handle_secure(datagram, src, out, tag),
                DatagramKind::Naked => self.handle_naked(datagram, src, out),
                DatagramKind::Unknown => self.metrics.count_drop(DropReason::UnknownKind),
            }
        }
    }

    /// Checks in lockstep the tags of each stretch of secure records in `run` that name one
    /// association and have one length (a train); `tags[i]` gets record `i`'s verdict.
    /// Records outside such stretches keep `None` and are verified one by one later.
    fn preverify(&self, run: &[&mut [u8]], src: SocketAddr, tags: &mut [Option<bool>; RUN]) {
        let key = |d: &[u8]| match classify(d) {
            DatagramKind::Secure => record::parse_header(d).ok().map(|h| (h.assoc, d.len())),
            _ => None,
        };
        for (range, (id, _)) in stretches(run, key) {
            let table = self.secure.load();
            let Some(assoc) = table.get(&id).filter(|a| a.client_ip == src.ip()) else {
                continue;
            };
            if let Kind::Secure { rx, .. } = &assoc.kind {
                rx.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .session
                    .verify_run(&run[range.clone()], &mut tags[range]);
            }
        }
    }

    /// Whether association `id` exists and uses an AEAD suite (its records have any length).
    fn is_aead(&self, id: AssociationId) -> bool {
        self.secure.load().get(&id).is_some_and(|a| match &a.kind {
            Kind::Secure { rx, .. } => rx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .session
                .suite()
                .is_aead(),
            Kind::Naked => false,
        })
    }

    fn handle_naked(self: &Arc<Self>, datagram: &[u8], src: SocketAddr, out: &mut Forwarder) {
        let h = match parse_udp_header(datagram) {
            Ok(h) => h,
            Err(crate::proto::SocksError::Incomplete { .. }) => {
                return self.metrics.count_drop(DropReason::Truncated)
            }
            Err(_) => return self.metrics.count_drop(DropReason::BadAddress),
        };
        if h.frag != 0 {
            return self.metrics.count_drop(DropReason::Fragmented);
        }
        let Some(assoc) = self.naked_lookup(src) else {
            return self.metrics.count_drop(DropReason::ForeignSource);
        };
        assoc.last_active.store(self.now_ms(), Ordering::Relaxed);
        self.forward(&assoc, h.addr, &datagram[h.payload_offset..], out);
    }

    fn naked_lookup(&self, src: SocketAddr) -> Option<Arc<Association>> {
        if let Some(a) = self.naked_by_addr.load().get(&src) {
            return Some(a.clone());
        }
        // First datagram from this port: bind it to the oldest association of this IP that
        // has no port yet (RFC 1928 leaves the port unknown when DST.PORT is 0).
        let mut pending = self.naked_pending.lock().unwrap_or_else(|e| e.into_inner());
        let q = pending.get_mut(&src.ip())?;
        let assoc = q.pop_front()?;
        if q.is_empty() {
            pending.remove(&src.ip());
        }
        assoc.set_client(src);
        self.naked_by_addr.rcu(|t| {
            let mut t = HashMap::clone(t);
            t.insert(src, assoc.clone());
            t
        });
        Some(assoc)
    }

    /// `tag`: the record's tag verdict when [`Relay::preverify`] checked it already.
    fn handle_secure(
        self: &Arc<Self>,
        datagram: &mut [u8],
        src: SocketAddr,
        out: &mut Forwarder,
        tag: Option<bool>,
    ) {
        let h = match record::parse_header_with(datagram, |id| self.is_aead(id)) {
            Ok(h) => h,
            Err(e) => return self.metrics.count_drop(e.reason()),
        };
        let Some(assoc) = self.secure.load().get(&h.assoc).cloned() else {
            return self.metrics.count_drop(DropReason::UnknownAssociation);
        };
        if src.ip() != assoc.client_ip {
            return self.metrics.count_drop(DropReason::ForeignSource);
        }
        let Kind::Secure { rx, tx } = &assoc.kind else {
            return self.metrics.count_drop(DropReason::UnknownAssociation);
        };
        let mut rx = rx.lock().unwrap_or_else(|e| e.into_inner());
        let opened = match tag {
            Some(ok) => rx.session.open_verified(datagram, ok),
            None => rx.session.open(datagram),
        };
        let o = match opened {
            Ok(o) => o,
            Err(e) => return self.metrics.count_drop(e.reason()),
        };
        let now = self.now_ms();
        // The reply path (PROTOCOL.md §6.3): only the newest records from a new source
        // start a validation, and only its answer moves the path.
        let (action, moved) = match o.content {
            Content::Data { .. } => {
                // Back from TLS only once the UDP path is the validated one (§6.4).
                if o.is_newest()
                    && rx.path.current() == Some(src)
                    && assoc.via_tls.swap(false, Ordering::Relaxed)
                {
                    tracing::info!(assoc = %assoc.id, "client records arrive over UDP again: replies follow");
                }
                (rx.path.on_record(src, o.is_newest(), now, rand::random), false)
            }
            Content::Control(ControlMessage::PathResponse(token)) => {
                (PathAction::None, rx.path.on_response(src, token))
            }
            Content::Control(ControlMessage::Probe(token)) => {
                // Answered where it came from: it asks whether UDP works both ways there.
                // It also starts validating that source as a path (a client coming back
                // from TLS finds its path ready), like a data record would.
                let action = rx.path.on_record(src, o.is_newest(), now, rand::random);
                drop(rx);
                assoc.last_active.store(now, Ordering::Relaxed);
                self.send_control(&assoc, tx, src, ControlMessage::ProbeAck(token));
                if let PathAction::Challenge { to, token } = action {
                    self.send_control(&assoc, tx, to, ControlMessage::PathChallenge(token));
                }
                return;
            }
            Content::Control(ControlMessage::PathChallenge(_) | ControlMessage::ProbeAck(_)) => {
                drop(rx);
                // These travel g2c only.
                return self.metrics.count_drop(DropReason::BadControl);
            }
        };
        let current = rx.path.current();
        drop(rx);
        if let Some(path) = current {
            assoc.set_client(path);
        }
        if moved {
            tracing::info!(assoc = %assoc.id, path = %src, "reply path moved (validated)");
        }
        assoc.last_active.store(now, Ordering::Relaxed);
        if let PathAction::Challenge { to, token } = action {
            tracing::debug!(assoc = %assoc.id, candidate = %to, "path challenge");
            self.send_control(&assoc, tx, to, ControlMessage::PathChallenge(token));
        }
        if let Some((addr, payload)) = o.data() {
            self.forward(&assoc, addr, payload, out);
        }
    }

    /// Sends a control message (PATH_CHALLENGE, PROBE_ACK) over UDP to `to`, sealed with the
    /// association's g2c key (one record, without waiting: a full socket buffer loses it, and
    /// the client or a later record asks again).
    fn send_control(
        &self,
        assoc: &Association,
        tx: &Mutex<SendSession>,
        to: SocketAddr,
        msg: ControlMessage,
    ) {
        let mut buf = [0u8; record::record_len(PATH_MESSAGE_LEN)];
        let sealed = tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seal_control(&msg, &mut buf);
        match sealed {
            Ok(n) => {
                if self.io().try_send(to, &buf[..n], None).is_err() {
                    self.metrics.count_drop(DropReason::SendFailed);
                }
            }
            Err(e) => {
                tracing::debug!(assoc = %assoc.id, error = %e, "control message not sealed");
                self.metrics.count_drop(e.reason())
            }
        }
    }

    /// Sends a client's payload to its destination, resolving names through the cache.
    fn forward(
        self: &Arc<Self>,
        assoc: &Arc<Association>,
        dst: AddrRef<'_>,
        payload: &[u8],
        out: &mut Forwarder,
    ) {
        match dst {
            AddrRef::Ip(target) => out.push(self, assoc, target, payload),
            AddrRef::Domain(name, port) => match self.dns.cached(name) {
                Some(ip) => out.push(self, assoc, SocketAddr::new(ip, port), payload),
                None => self.resolve_then_send(assoc, name, port, payload),
            },
        }
    }

    fn resolve_then_send(self: &Arc<Self>, assoc: &Arc<Association>, name: &str, port: u16, payload: &[u8]) {
        if assoc.pending_resolves.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING_RESOLVES {
            assoc.pending_resolves.fetch_sub(1, Ordering::AcqRel);
            return self.metrics.count_drop(DropReason::ResolveFailed);
        }
        let (relay, assoc, name, payload) = (self.clone(), assoc.clone(), name.to_owned(), payload.to_vec());
        tokio::spawn(async move {
            match tokio::time::timeout(RESOLVE_TIMEOUT, relay.dns.resolve(&name, port)).await {
                Ok(Ok(target)) => {
                    if let Some(dest) = admit(&relay, &assoc, target, &mut PeerCache::default()) {
                        match assoc.outbound.try_send(dest, &payload, None) {
                            Ok(()) => {
                                relay.metrics.forwarded_on(assoc.path(), 1, payload.len() as u64);
                                assoc.stats.datagrams_up.fetch_add(1, Ordering::Relaxed);
                                assoc
                                    .stats
                                    .bytes_up
                                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
                            }
                            Err(_) => relay.metrics.count_drop(DropReason::SendFailed),
                        }
                    }
                }
                _ => relay.metrics.count_drop(DropReason::ResolveFailed),
            }
            assoc.pending_resolves.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

fn refresh_local_addrs(policy: &Policy) -> io::Result<()> {
    let addrs = crate::net::ifaddrs::interface_addrs()?;
    policy.set_local_addrs(LocalAddrs::new(addrs));
    Ok(())
}

/// Policy and restricted-cone bookkeeping for one datagram to `target`; the address to
/// hand the association's outbound socket, or `None` when policy refuses (counted).
fn admit(
    relay: &Relay,
    assoc: &Association,
    target: SocketAddr,
    peers: &mut PeerCache,
) -> Option<SocketAddr> {
    let target = canonical(target);
    if relay.policy.load().check(assoc.user.as_deref(), target).is_err() {
        relay.metrics.count_drop(DropReason::PolicyDenied);
        return None;
    }
    if !relay.settings.full_cone && !peers.hit(assoc, target) {
        assoc.remember(target);
        peers.set(assoc, target);
    }
    Some(for_socket(target, assoc.outbound_v6))
}

/// Datagrams on their way to targets: runs of equal-sized payloads from one association to
/// one target wait here and leave in one GSO send.
struct Forwarder {
    assoc: Option<Arc<Association>>,
    batch: GsoBatch,
    peers: PeerCache,
    /// How the client's datagrams came (for the counters): from the association's kind,
    /// or `Tls` for records carried in the control connection.
    path: Path,
}

impl Default for Forwarder {
    fn default() -> Self {
        Forwarder {
            assoc: None,
            batch: GsoBatch::new(1),
            peers: PeerCache::default(),
            path: Path::Secure,
        }
    }
}

impl Forwarder {
    fn push(&mut self, relay: &Relay, assoc: &Arc<Association>, target: SocketAddr, payload: &[u8]) {
        let Some(dest) = admit(relay, assoc, target, &mut self.peers) else {
            return;
        };
        let same = self.assoc.as_ref().is_some_and(|a| Arc::ptr_eq(a, assoc));
        if !same || !self.batch.fits(dest, payload.len()) {
            self.flush(relay);
            if !same {
                self.batch.reset(assoc.outbound.max_gso_segments());
                self.assoc = Some(assoc.clone());
            }
        }
        self.batch.push(dest, payload);
    }

    fn flush(&mut self, relay: &Relay) {
        let (Some(assoc), Some((dest, bytes, seg))) = (&self.assoc, self.batch.pending()) else {
            return;
        };
        let n = self.batch.len();
        match assoc.outbound.try_send(dest, bytes, seg) {
            Ok(()) => {
                let path = if self.path == Path::Tls {
                    Path::Tls
                } else {
                    assoc.path()
                };
                relay.metrics.forwarded_on(path, n as u64, bytes.len() as u64);
                assoc.stats.datagrams_up.fetch_add(n as u64, Ordering::Relaxed);
                assoc
                    .stats
                    .bytes_up
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                for _ in 0..n {
                    relay.metrics.count_drop(DropReason::SendFailed);
                }
            }
        }
        self.batch.clear();
    }
}

/// Reads replies from the association's outbound socket and returns them to the client:
/// naked datagrams, or records whose plaintexts are placed as they come and sealed together
/// (interleaved CBC chains) just before their GSO train leaves.
async fn reply_loop(relay: Arc<Relay>, assoc: Arc<Association>) {
    let send = match &assoc.kind {
        Kind::Secure { tx, .. } => Some(&**tx),
        Kind::Naked => None,
    };
    let mut batch = RecvBatch::new(SMALL_BATCH);
    let mut out = Replies::new(relay.io().max_gso_segments());
    let mut peers = PeerCache::default();
    // Exact record lengths cut the trains; an association keeps its suite for life.
    let suite = send.map_or(crate::proto::CipherSuite::Aes128CbcHmacSha256, |s| {
        s.lock().unwrap_or_else(|e| e.into_inner()).suite()
    });
    loop {
        let watch_icmp = !relay.settings.e2e.is_empty();
        let received = tokio::select! {
            r = assoc.outbound.recv_batch(&mut batch) => r,
            // An ICMP error queued (IP_RECVERR) wakes no reader: watch for it apart.
            r = assoc.outbound.error_ready(), if watch_icmp => r.and(Err(io::ErrorKind::ConnectionRefused.into())),
        };
        if let Err(e) = received {
            // With end-to-end classes the socket reports ICMP errors (IP_RECVERR): a failed
            // receive, or the error readiness, says one is queued.
            if watch_icmp {
                for dest in net::icmp::take_unreachable(assoc.outbound.raw_fd()) {
                    let dest = canonical(dest);
                    if relay.settings.e2e.matches(None, dest.ip()) && assoc.unreachable.load().is_none() {
                        tracing::info!(assoc = %assoc.id, %dest, "end-to-end destination answered port unreachable: ending the association");
                        assoc.unreachable.store(Some(Arc::new(dest)));
                    }
                }
            }
            tracing::debug!(error = %e, "outbound receive error");
            tokio::task::yield_now().await;
            continue;
        }
        // Inside TLS no address is needed; the train still wants one to group by.
        let tls = assoc.via_tls.load(Ordering::Relaxed) && assoc.tls.load().is_some();
        let Some(client) = assoc
            .client_addr()
            .or(tls.then_some(SocketAddr::from(([0, 0, 0, 0], 0))))
        else {
            batch.for_each(|_, _| relay.metrics.count_drop(DropReason::UnsolicitedReply));
            continue;
        };
        let mut exhausted = false;
        batch.for_each(|payload, src| {
            if exhausted {
                return;
            }
            if !relay.settings.full_cone && !peers.hit(&assoc, src) {
                if !assoc.knows(src) {
                    return relay.metrics.count_drop(DropReason::UnsolicitedReply);
                }
                peers.set(&assoc, src);
            }
            let n = payload.len();
            let from = AddrRef::Ip(src);
            let alen = from.encoded_len();
            // Exact size of what this datagram becomes, so equal payloads form one train.
            let (len, at) = match send {
                Some(_) if alen + n > record::MAX_PLAINTEXT => {
                    return relay.metrics.count_drop(DropReason::TooLarge);
                }
                Some(_) => (suite.record_len(alen + n), record::PREFIX_LEN),
                None if 3 + alen + n > record::MAX_DATAGRAM => {
                    return relay.metrics.count_drop(DropReason::TooLarge);
                }
                None => (3 + alen + n, 3),
            };
            if !out.train.fits(client, len) {
                // Different size: send what is pending first (non-blocking; a full socket
                // buffer drops the train, as the kernel would drop datagrams).
                exhausted = !out.flush_now(&relay, &assoc, send);
            }
            let space = out.train.place(client, len, alen + n);
            // Invariant: `space` holds the address (at most 19 bytes) and the payload at `at`.
            from.encode(&mut space[at..]).expect("room reserved");
            space[at + alen..at + alen + n].copy_from_slice(payload);
            if send.is_none() {
                space[..3].fill(0);
            }
            out.payload_bytes += n;
        });
        exhausted |= !out.flush_wait(&relay, &assoc, send).await;
        assoc.last_active.store(relay.now_ms(), Ordering::Relaxed);
        if exhausted {
            // The key may seal no more: end the association (the control task notices) so
            // the client opens a new one with fresh keys.
            tracing::warn!(assoc = %assoc.id, "sending key exhausted: closing association");
            return;
        }
    }
}

/// Test door (feature `test-doors`, never enabled for library users): the first g2c nonce
/// of every secure association opened from now on, so that a test reaches key exhaustion
/// (PROTOCOL.md §8) without sealing 2^48 records. Process-wide, so only a test binary of
/// its own sets it (`tests/key_exhaustion.rs`); 0, the protocol's start, otherwise.
#[cfg(feature = "test-doors")]
pub static TEST_G2C_FIRST_NONCE: AtomicU64 = AtomicU64::new(0);

/// A train of replies for one client.
struct Replies {
    train: RecordTrain,
    payload_bytes: usize,
}

impl Replies {
    fn new(max_segments: usize) -> Self {
        Replies {
            train: RecordTrain::new(max_segments),
            payload_bytes: 0,
        }
    }

    /// Seals the pending records (secure associations); `false` when the key is exhausted
    /// (the train is then dropped and counted).
    fn seal(&mut self, relay: &Relay, send: Option<&Mutex<SendSession>>) -> bool {
        let Some(s) = send else {
            return true;
        };
        // One lock per train; the receive loop takes it only to seal a path challenge.
        let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
        match self
            .train
            .seal_with(|buf, offsets, pts, lens| s.seal_many_in_place(buf, offsets, pts, lens))
        {
            Ok(()) => true,
            Err(e) => {
                for _ in 0..self.train.len() {
                    relay.metrics.count_drop(e.reason());
                }
                self.clear();
                !matches!(e, SealError::KeyExhausted { .. })
            }
        }
    }

    fn sent(&mut self, relay: &Relay, assoc: &Association, path: Path, ok: bool) {
        let n = self.train.len() as u64;
        if ok {
            relay.metrics.returned_on(path, n, self.payload_bytes as u64);
            assoc.stats.datagrams_down.fetch_add(n, Ordering::Relaxed);
            assoc
                .stats
                .bytes_down
                .fetch_add(self.payload_bytes as u64, Ordering::Relaxed);
        } else {
            for _ in 0..n {
                relay.metrics.count_drop(DropReason::SendFailed);
            }
        }
        self.clear();
    }

    /// Seals and sends without waiting; `false` when the key is exhausted.
    fn flush_now(&mut self, relay: &Relay, assoc: &Association, send: Option<&Mutex<SendSession>>) -> bool {
        if !self.seal(relay, send) {
            return false;
        }
        if self.sent_in_tls(relay, assoc, send) {
            return true;
        }
        let ok = match self.train.pending() {
            Some((dest, bytes, seg)) => relay.io().try_send(dest, bytes, seg).is_ok(),
            None => true,
        };
        self.sent(
            relay,
            assoc,
            if send.is_some() { Path::Secure } else { Path::Naked },
            ok,
        );
        true
    }

    /// Seals and sends, waiting for socket space; `false` when the key is exhausted.
    async fn flush_wait(
        &mut self,
        relay: &Relay,
        assoc: &Association,
        send: Option<&Mutex<SendSession>>,
    ) -> bool {
        if !self.seal(relay, send) {
            return false;
        }
        if self.sent_in_tls(relay, assoc, send) {
            return true;
        }
        let ok = match self.train.pending() {
            Some((dest, bytes, seg)) => relay.io().send(dest, bytes, seg).await.is_ok(),
            None => true,
        };
        self.sent(
            relay,
            assoc,
            if send.is_some() { Path::Secure } else { Path::Naked },
            ok,
        );
        true
    }

    /// Sends the sealed train's records inside TLS, one RECORD frame each, when the
    /// association's replies travel that way; `false` (nothing done) otherwise. A record the
    /// control channel cannot take (its queue full) is dropped and counted.
    fn sent_in_tls(&mut self, relay: &Relay, assoc: &Association, send: Option<&Mutex<SendSession>>) -> bool {
        if send.is_none() || !assoc.via_tls.load(Ordering::Relaxed) {
            return false;
        }
        let tls = assoc.tls.load();
        let Some(tx) = tls.as_deref() else {
            return false;
        };
        let Some((_, bytes, seg)) = self.train.pending() else {
            return true;
        };
        let (mut sent, mut failed) = (0u64, 0u64);
        for rec in bytes.chunks(seg.unwrap_or(bytes.len()).max(1)) {
            match tx.send_record(rec) {
                Ok(()) => sent += 1,
                Err(_) => failed += 1,
            }
        }
        if sent > 0 {
            // Payload bytes of the records that left (a share when some were dropped).
            let n = self.train.len() as u64;
            let bytes = self.payload_bytes as u64 * sent / n.max(1);
            relay.metrics.returned_on(Path::Tls, sent, bytes);
            assoc.stats.datagrams_down.fetch_add(sent, Ordering::Relaxed);
            assoc.stats.bytes_down.fetch_add(bytes, Ordering::Relaxed);
        }
        for _ in 0..failed {
            relay.metrics.count_drop(DropReason::SendFailed);
        }
        self.clear();
        true
    }

    fn clear(&mut self) {
        self.train.clear();
        self.payload_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::CipherSuite;

    fn relay(naked_require_port: bool) -> Arc<Relay> {
        relay_with(naked_require_port, 1)
    }

    fn relay_with(naked_require_port: bool, workers: usize) -> Arc<Relay> {
        Relay::bind(
            "127.0.0.1:0".parse().unwrap(),
            RelaySettings {
                full_cone: false,
                max_associations: 16,
                replay_window: 64,
                workers,
                recv_buffer: crate::net::UDP_BUFFER,
                naked_require_port,
                e2e: Default::default(),
            },
            Arc::new(Metrics::default()),
            Arc::new(Resolver::new(Duration::from_secs(1), 8)),
            Arc::new(Policy::default()),
        )
        .unwrap()
    }

    fn keys() -> KeySchedule {
        let suite = CipherSuite::Aes128CbcHmacSha256;
        KeySchedule::from_exporter(suite, &vec![1; suite.exporter_len()]).unwrap()
    }

    #[tokio::test]
    async fn an_id_is_unique_among_live_associations() {
        let r = relay(false);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let id = r.new_assoc_id();
        let a = r.open_secure(id, &keys(), ip, Some(4000), None).unwrap();
        // The same id again (two negotiations that drew it at once) is refused, not shared.
        assert!(matches!(
            r.open_secure(id, &keys(), ip, None, None),
            Err(AssocError::IdInUse)
        ));
        assert_eq!(r.live(), 1);
        // Naked ids come from the same set.
        let n = r.open_naked(ip, Some(4001), None).unwrap();
        assert_ne!(n.id(), a.id());
        assert_eq!(r.ids.lock().unwrap().len(), 2);
        drop(a);
        // Freed with its association.
        assert_eq!(r.ids.lock().unwrap().len(), 1);
        let again = r.open_secure(id, &keys(), ip, None, None).unwrap();
        assert_eq!(again.id(), id);
        assert_eq!(r.live(), 2);
    }

    #[tokio::test]
    async fn naked_require_port_refuses_only_port_zero() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let r = relay(true);
        assert!(matches!(
            r.open_naked(ip, None, None),
            Err(AssocError::PortRequired)
        ));
        assert_eq!(r.live(), 0);
        assert!(r.open_naked(ip, Some(4000), None).is_ok());
        assert!(relay(false).open_naked(ip, None, None).is_ok());
    }

    #[tokio::test]
    async fn the_relay_runs_the_workers_it_was_given() {
        // Ephemeral port, SO_REUSEPORT group: every socket of the group joins.
        for n in [1, 3] {
            assert_eq!(relay_with(false, n).workers(), n);
        }
        // Zero means one.
        assert_eq!(relay_with(false, 0).workers(), 1);
    }

    #[tokio::test]
    async fn the_remembered_destinations_stay_within_their_bound() {
        let r = relay(false);
        let h = r
            .open_naked("127.0.0.1".parse().unwrap(), Some(4000), None)
            .unwrap();
        let peer = |i: usize| SocketAddr::from(([127, 0, (i >> 8) as u8, i as u8], 9));
        for i in 0..MAX_PEERS {
            h.assoc.remember(peer(i));
        }
        assert_eq!(h.destinations(), MAX_PEERS);
        // A known destination at the bound changes nothing.
        h.assoc.remember(peer(0));
        assert_eq!(h.destinations(), MAX_PEERS);
        assert!(h.assoc.knows(peer(MAX_PEERS - 1)));
        assert_eq!(h.assoc.peers_generation.load(Ordering::Acquire), 0);
        // One more: the set starts over with it (and cached answers expire).
        h.assoc.remember(peer(MAX_PEERS));
        assert_eq!(h.destinations(), 1);
        assert!(h.assoc.knows(peer(MAX_PEERS)) && !h.assoc.knows(peer(0)));
        assert_eq!(h.assoc.peers_generation.load(Ordering::Acquire), 1);
    }

    #[tokio::test]
    async fn binding_hands_the_host_addresses_to_the_policy() {
        let r = relay(false);
        assert!(r.policy().local_addrs().is_local("127.0.0.1".parse().unwrap()));
        r.refresh_local_addrs().unwrap();
        assert!(!r.policy().local_addrs().is_empty());
    }
}
