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

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::net::dns::Resolver;
use crate::net::{self, canonical, canonical_ip, for_socket, DATAGRAM_BUF};
use crate::policy::Policy;
use crate::proto::record;
use crate::proto::session::{RecvSession, SendSession};
use crate::proto::socks::{encode_udp_header, parse_udp_header, AddrRef};
use crate::proto::{classify, AssociationId, DatagramKind, DropReason, KeySchedule, Role, SealError};

/// Destinations remembered per association for the restricted-cone check.
const MAX_PEERS: usize = 4096;
/// Name resolutions one association may have in flight.
const MAX_PENDING_RESOLVES: usize = 16;
/// How long a name resolution may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an association could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AssocError {
    /// The gateway holds `--max-associations` already.
    #[error("association limit of {0} reached")]
    Limit(usize),
    /// No outbound socket could be bound.
    #[error("cannot bind an outbound socket: {0}")]
    Io(#[from] io::Error),
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
}

/// The relay: shared socket, association tables, counters.
pub struct Relay {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    secure: RwLock<HashMap<AssociationId, Arc<Association>>>,
    naked: RwLock<NakedTable>,
    live: AtomicUsize,
    settings: RelaySettings,
    metrics: Arc<Metrics>,
    dns: Arc<Resolver>,
    policy: Arc<Policy>,
    epoch: Instant,
}

#[derive(Default)]
struct NakedTable {
    by_addr: HashMap<SocketAddr, Arc<Association>>,
    /// Associations whose client port is not known yet, oldest first, by client IP.
    pending: HashMap<IpAddr, VecDeque<Arc<Association>>>,
}

/// One association (naked or secure).
pub struct Association {
    id: AssociationId,
    user: Option<String>,
    client_ip: IpAddr,
    outbound: UdpSocket,
    outbound_v6: bool,
    peers: Mutex<HashSet<SocketAddr>>,
    last_active: AtomicU64,
    pending_resolves: AtomicUsize,
    kind: Kind,
}

enum Kind {
    Naked { client: Mutex<Option<SocketAddr>> },
    Secure { rx: Box<Mutex<SecureRx>> },
}

struct SecureRx {
    session: RecvSession,
    /// Where replies go: the source of the latest authenticated record.
    client: Option<SocketAddr>,
}

impl Association {
    /// The association id (secure: the wire id; naked: an internal one).
    pub fn id(&self) -> AssociationId {
        self.id
    }

    fn client_addr(&self) -> Option<SocketAddr> {
        match &self.kind {
            Kind::Naked { client } => *client.lock().unwrap_or_else(|e| e.into_inner()),
            Kind::Secure { rx } => rx.lock().unwrap_or_else(|e| e.into_inner()).client,
        }
    }

    fn remember(&self, peer: SocketAddr) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() >= MAX_PEERS && !peers.contains(&peer) {
            // Bounded: a client spraying destinations forgets the old ones, and replies
            // from those are then refused as unsolicited.
            peers.clear();
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
        let socket = net::bind_udp(addr)?;
        let local = socket.local_addr()?;
        Ok(Arc::new(Relay {
            socket: Arc::new(socket),
            local,
            secure: RwLock::new(HashMap::new()),
            naked: RwLock::new(NakedTable::default()),
            live: AtomicUsize::new(0),
            settings,
            metrics,
            dns,
            policy,
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

    /// A fresh random association id not in use on this relay.
    pub fn new_assoc_id(&self) -> AssociationId {
        let table = self.secure.read().unwrap_or_else(|e| e.into_inner());
        loop {
            let id = AssociationId(rand::random::<u64>());
            if !table.contains_key(&id) {
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
        kind: Kind,
    ) -> Result<Arc<Association>, AssocError> {
        self.reserve()?;
        let (outbound, outbound_v6) = match net::bind_outbound() {
            Ok(s) => s,
            Err(e) => {
                self.live.fetch_sub(1, Ordering::AcqRel);
                return Err(e.into());
            }
        };
        self.metrics.associations.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Association {
            id,
            user,
            client_ip: canonical_ip(client_ip),
            outbound,
            outbound_v6,
            peers: Mutex::new(HashSet::new()),
            last_active: AtomicU64::new(self.now_ms()),
            pending_resolves: AtomicUsize::new(0),
            kind,
        }))
    }

    /// Opens a secure association with keys exported from the control connection.
    pub fn open_secure(
        self: &Arc<Self>,
        id: AssociationId,
        keys: &KeySchedule,
        client_ip: IpAddr,
        user: Option<String>,
    ) -> Result<AssociationHandle, AssocError> {
        let rx = SecureRx {
            session: RecvSession::new(id, keys, Role::Gateway, self.settings.replay_window),
            client: None,
        };
        let assoc = self.new_association(
            id,
            user,
            client_ip,
            Kind::Secure {
                rx: Box::new(Mutex::new(rx)),
            },
        )?;
        self.secure
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, assoc.clone());
        let send = SendSession::new(id, keys, Role::Gateway);
        let reply_task = tokio::spawn(reply_loop(self.clone(), assoc.clone(), Some(send)));
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
        let id = AssociationId(rand::random::<u64>());
        let client = client_port.map(|p| SocketAddr::new(canonical_ip(client_ip), p));
        let assoc = self.new_association(
            id,
            user,
            client_ip,
            Kind::Naked {
                client: Mutex::new(client),
            },
        )?;
        {
            let mut t = self.naked.write().unwrap_or_else(|e| e.into_inner());
            match client {
                Some(a) => {
                    t.by_addr.insert(a, assoc.clone());
                }
                None => t
                    .pending
                    .entry(assoc.client_ip)
                    .or_default()
                    .push_back(assoc.clone()),
            }
        }
        let reply_task = tokio::spawn(reply_loop(self.clone(), assoc.clone(), None));
        Ok(AssociationHandle {
            relay: self.clone(),
            assoc,
            reply_task,
        })
    }

    fn remove(&self, assoc: &Arc<Association>) {
        match &assoc.kind {
            Kind::Secure { .. } => {
                self.secure
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&assoc.id);
            }
            Kind::Naked { client } => {
                let mut t = self.naked.write().unwrap_or_else(|e| e.into_inner());
                let bound = *client.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(a) = bound {
                    if t.by_addr.get(&a).is_some_and(|x| x.id == assoc.id) {
                        t.by_addr.remove(&a);
                    }
                }
                if let Some(q) = t.pending.get_mut(&assoc.client_ip) {
                    q.retain(|x| x.id != assoc.id);
                    if q.is_empty() {
                        t.pending.remove(&assoc.client_ip);
                    }
                }
            }
        }
        self.live.fetch_sub(1, Ordering::AcqRel);
    }

    /// The receive loop; runs until the task is aborted or the socket fails for good.
    pub async fn run(self: Arc<Self>) {
        let mut buf = vec![0u8; DATAGRAM_BUF];
        loop {
            let (n, src) = match self.socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "relay receive error");
                    tokio::task::yield_now().await;
                    continue;
                }
            };
            self.handle(&mut buf[..n], canonical(src));
        }
    }

    /// Routes one datagram from a client.
    pub fn handle(self: &Arc<Self>, datagram: &mut [u8], src: SocketAddr) {
        match classify(datagram) {
            DatagramKind::Secure => self.handle_secure(datagram, src),
            DatagramKind::Naked => self.handle_naked(datagram, src),
            DatagramKind::Unknown => self.metrics.count_drop(DropReason::UnknownKind),
        }
    }

    fn handle_naked(self: &Arc<Self>, datagram: &[u8], src: SocketAddr) {
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
        self.forward(&assoc, h.addr, &datagram[h.payload_offset..]);
    }

    fn naked_lookup(&self, src: SocketAddr) -> Option<Arc<Association>> {
        if let Some(a) = self
            .naked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_addr
            .get(&src)
        {
            return Some(a.clone());
        }
        // First datagram from this port: bind it to the oldest association of this IP that
        // has no port yet (RFC 1928 leaves the port unknown when DST.PORT is 0).
        let mut t = self.naked.write().unwrap_or_else(|e| e.into_inner());
        let q = t.pending.get_mut(&src.ip())?;
        let assoc = q.pop_front()?;
        if q.is_empty() {
            t.pending.remove(&src.ip());
        }
        if let Kind::Naked { client } = &assoc.kind {
            *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(src);
        }
        t.by_addr.insert(src, assoc.clone());
        Some(assoc)
    }

    fn handle_secure(self: &Arc<Self>, datagram: &mut [u8], src: SocketAddr) {
        let h = match record::parse_header(datagram) {
            Ok(h) => h,
            Err(e) => return self.metrics.count_drop(e.reason()),
        };
        let assoc = self
            .secure
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&h.assoc)
            .cloned();
        let Some(assoc) = assoc else {
            return self.metrics.count_drop(DropReason::UnknownAssociation);
        };
        if src.ip() != assoc.client_ip {
            return self.metrics.count_drop(DropReason::ForeignSource);
        }
        let Kind::Secure { rx } = &assoc.kind else {
            return self.metrics.count_drop(DropReason::UnknownAssociation);
        };
        let opened = {
            let mut rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            let r = rx.session.open(datagram);
            if r.is_ok() {
                rx.client = Some(src);
            }
            r
        };
        match opened {
            Ok(o) => {
                assoc.last_active.store(self.now_ms(), Ordering::Relaxed);
                self.forward(&assoc, o.addr, o.payload);
            }
            Err(e) => self.metrics.count_drop(e.reason()),
        }
    }

    /// Sends a client's payload to its destination, resolving names through the cache.
    fn forward(self: &Arc<Self>, assoc: &Arc<Association>, dst: AddrRef<'_>, payload: &[u8]) {
        match dst {
            AddrRef::Ip(target) => self.send_out(assoc, target, payload),
            AddrRef::Domain(name, port) => match self.dns.cached(name) {
                Some(ip) => self.send_out(assoc, SocketAddr::new(ip, port), payload),
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
                Ok(Ok(target)) => relay.send_out(&assoc, target, &payload),
                _ => relay.metrics.count_drop(DropReason::ResolveFailed),
            }
            assoc.pending_resolves.fetch_sub(1, Ordering::AcqRel);
        });
    }

    fn send_out(&self, assoc: &Association, target: SocketAddr, payload: &[u8]) {
        let target = canonical(target);
        if self.policy.check(assoc.user.as_deref(), target).is_err() {
            return self.metrics.count_drop(DropReason::PolicyDenied);
        }
        if !self.settings.full_cone {
            assoc.remember(target);
        }
        match assoc
            .outbound
            .try_send_to(payload, for_socket(target, assoc.outbound_v6))
        {
            Ok(_) => self.metrics.forwarded(payload.len()),
            Err(_) => self.metrics.count_drop(DropReason::SendFailed),
        }
    }
}

/// Reads replies from the association's outbound socket and returns them to the client.
async fn reply_loop(relay: Arc<Relay>, assoc: Arc<Association>, mut send: Option<SendSession>) {
    let mut inbuf = vec![0u8; DATAGRAM_BUF];
    let mut out = vec![0u8; DATAGRAM_BUF + 64];
    loop {
        let (n, src) = match assoc.outbound.recv_from(&mut inbuf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "outbound receive error");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let src = canonical(src);
        if !relay.settings.full_cone && !assoc.knows(src) {
            relay.metrics.count_drop(DropReason::UnsolicitedReply);
            continue;
        }
        let Some(client) = assoc.client_addr() else {
            relay.metrics.count_drop(DropReason::UnsolicitedReply);
            continue;
        };
        let payload = &inbuf[..n];
        let len = match &mut send {
            Some(s) => match s.seal(&AddrRef::Ip(src), payload, &mut out) {
                Ok(len) => len,
                Err(e @ SealError::KeyExhausted { .. }) => {
                    // The key may seal no more: end the association (the control task
                    // notices) so the client opens a new one with fresh keys.
                    relay.metrics.count_drop(e.reason());
                    tracing::warn!(assoc = %assoc.id, "sending key exhausted: closing association");
                    return;
                }
                Err(e) => {
                    relay.metrics.count_drop(e.reason());
                    continue;
                }
            },
            None => {
                // Invariant: `out` is larger than any header plus any datagram.
                let h = encode_udp_header(&AddrRef::Ip(src), &mut out).expect("buffer holds a header");
                if h + n > record::MAX_DATAGRAM {
                    relay.metrics.count_drop(DropReason::TooLarge);
                    continue;
                }
                out[h..h + n].copy_from_slice(payload);
                h + n
            }
        };
        match relay.socket.send_to(&out[..len], client).await {
            Ok(_) => {
                relay.metrics.returned(n);
                assoc.last_active.store(relay.now_ms(), Ordering::Relaxed);
            }
            Err(_) => relay.metrics.count_drop(DropReason::SendFailed),
        }
    }
}
