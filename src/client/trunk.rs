//! The client's side of one control connection, shared by the associations it carries.
//!
//! A [`Trunk`] owns the control channel's task: it answers the heartbeat, routes what the
//! gateway sends to the association it names (records inside TLS, CLOSE), and, with
//! feature ASSOCIATIONS (PROTOCOL.md §2.9), opens more associations on the same connection:
//!
//! ```text
//!   SecureUdp (own UDP socket)  ─┐                    ┌─ OPEN(req, port) ──────────▶
//!   SecureUdp (shared socket)   ─┼─ Trunk ── TLS ─────┤◀─ OPENED(req, status, id) ──
//!   SecureUdp (shared socket)   ─┘   routes by id     └─ REATTACH / CLOSE(released) ▶
//! ```
//!
//! Every association keeps its own keys and replay window; the control connection is
//! shared, so a new flow costs one round trip on it instead of a TLS handshake and a SOCKS
//! negotiation. The connection's first association has a UDP socket of its own; the ones
//! opened here share one more, read by one demux task ([`super::mux`]), so many small flows
//! cost one socket and batched reads instead of a socket and a wake-up per datagram each. The keys of an association opened here come from
//! this connection's exporter with its own id (§3.1), derived in the task when the answer
//! arrives, so no two associations of the connection share keys.
//!
//! The trunk lives as long as one of its associations ([`SecureUdp`] holds an `Arc`); the
//! last one dropped ends the task and with it the connection. Dropping an association
//! releases it at the gateway (CLOSE `0x07`) when the gateway speaks ASSOCIATIONS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::net::channel::{Channel, ChannelError, Event, FrameSender};
use crate::proto::frame::{feature, CloseReason, Frame, OpenStatus, RefuseReason};
use crate::proto::record::ASSOC_OFFSET;
use crate::proto::{AssociationId, CipherSuite, KeySchedule};

use super::mux::Mux;
use super::Control;

/// Records inside TLS the trunk holds per association for its receive path (more are
/// dropped and logged).
pub(crate) const TLS_INBOUND: usize = 4096;

/// What the gateway's HELLO said, once it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct PeerFeatures {
    /// It speaks RECORD frames (§6.4).
    pub records: bool,
    /// It speaks ASSOCIATIONS (§2.9).
    pub associations: bool,
}

/// The receiving ends of one association's route.
pub(crate) struct RouteEnds {
    /// Records the gateway sent inside TLS.
    pub inbound: mpsc::Receiver<Vec<u8>>,
    /// Raised when the association ends.
    pub closed: watch::Receiver<bool>,
    /// Why it ended.
    pub why: Arc<Mutex<Option<String>>>,
}

/// The trunk task's end of an association.
struct Route {
    inbound: mpsc::Sender<Vec<u8>>,
    closed: watch::Sender<bool>,
    why: Arc<Mutex<Option<String>>>,
}

impl Route {
    fn new() -> (Route, RouteEnds) {
        let (inbound_tx, inbound) = mpsc::channel(TLS_INBOUND);
        let (closed_tx, closed) = watch::channel(false);
        let why = Arc::new(Mutex::new(None));
        (
            Route {
                inbound: inbound_tx,
                closed: closed_tx,
                why: why.clone(),
            },
            RouteEnds { inbound, closed, why },
        )
    }

    fn end(self, why: String) {
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        let _ = self.closed.send(true);
    }
}

/// An association the gateway granted on this trunk: its id, epoch, keys and route.
pub(crate) struct Granted {
    pub assoc: AssociationId,
    pub epoch: u32,
    pub keys: KeySchedule,
    pub ends: RouteEnds,
}

/// Why a request on the trunk did not give an association.
#[derive(Debug)]
pub(crate) enum Denied {
    /// OPENED with a refusal.
    Open(OpenStatus),
    /// REATTACH_REFUSED.
    Reattach(RefuseReason),
    /// The connection ended, the frame could not be queued, the exporter failed, or no
    /// answer came in time.
    Gone(String),
}

type Reply = oneshot::Sender<Result<Granted, Denied>>;

#[derive(Default)]
struct Routes {
    members: HashMap<AssociationId, Route>,
    /// OPENs waiting for their OPENED, by request number, with the suite of their keys.
    opens: HashMap<u32, (CipherSuite, Reply)>,
    /// REATTACHes waiting for their answer, by association, with its suite.
    reattaches: HashMap<AssociationId, (CipherSuite, Reply)>,
    /// The connection ended: no new route.
    dead: bool,
}

/// One control connection and the associations it carries (see the module documentation).
pub struct Trunk {
    sender: FrameSender,
    routes: Arc<Mutex<Routes>>,
    hello: watch::Receiver<Option<PeerFeatures>>,
    /// The gateway's relay (BND of the connection's UDP ASSOCIATE).
    pub(crate) relay: SocketAddr,
    /// The suite the connection's SudpAccept chose: that of every association it opens.
    pub(crate) suite: CipherSuite,
    next_req: AtomicU32,
    /// The UDP socket of the associations opened on this connection, bound at the first.
    mux: tokio::sync::OnceCell<Arc<Mux>>,
    task: JoinHandle<()>,
}

impl Drop for Trunk {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Trunk {
    /// Starts the trunk's task on `channel`, with the connection's own association `first`
    /// already routed; returns the trunk and that association's route.
    pub(crate) fn start(
        channel: Channel<Control>,
        first: AssociationId,
        relay: SocketAddr,
        suite: CipherSuite,
    ) -> (Arc<Trunk>, RouteEnds) {
        let (route, ends) = Route::new();
        let mut routes = Routes::default();
        routes.members.insert(first, route);
        let routes = Arc::new(Mutex::new(routes));
        let (hello_tx, hello) = watch::channel(channel.peer().map(features_of));
        let sender = channel.sender();
        let task = tokio::spawn(run(channel, routes.clone(), hello_tx));
        let trunk = Arc::new(Trunk {
            sender,
            routes,
            hello,
            relay,
            suite,
            next_req: AtomicU32::new(1),
            mux: tokio::sync::OnceCell::new(),
            task,
        });
        (trunk, ends)
    }

    /// A trunk with no connection behind it (tests of the record paths).
    #[cfg(test)]
    pub(crate) fn detached(relay: SocketAddr, suite: CipherSuite) -> Arc<Trunk> {
        let (_hello_tx, hello) = watch::channel(Some(PeerFeatures::default()));
        Arc::new(Trunk {
            sender: crate::net::channel::test_sender(),
            routes: Arc::default(),
            hello,
            relay,
            suite,
            next_req: AtomicU32::new(1),
            mux: tokio::sync::OnceCell::new(),
            task: tokio::spawn(std::future::pending()),
        })
    }

    /// The socket the associations opened here share, bound and connected to the relay
    /// on first use.
    pub(crate) async fn mux(&self) -> std::io::Result<Arc<Mux>> {
        self.mux.get_or_try_init(|| Mux::start(self.relay)).await.cloned()
    }

    pub(crate) fn sender(&self) -> &FrameSender {
        &self.sender
    }

    /// The gateway's features, waiting for its HELLO (`None`: the connection ended first).
    pub(crate) async fn peer(&self) -> Option<PeerFeatures> {
        let mut h = self.hello.clone();
        let got = h.wait_for(Option::is_some).await.ok().and_then(|h| *h);
        got
    }

    /// Whether more associations can be opened on this connection now: the gateway said
    /// it speaks ASSOCIATIONS and the connection is alive.
    pub fn is_shared(&self) -> bool {
        let speaks = matches!(
            *self.hello.borrow(),
            Some(PeerFeatures {
                associations: true,
                ..
            })
        );
        speaks && !self.is_dead()
    }

    /// Whether the connection ended.
    pub fn is_dead(&self) -> bool {
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).dead || self.sender.is_closed()
    }

    /// Associations routed on this connection now, and those asked for and not answered
    /// yet (a burst of new flows does not overfill one connection).
    pub fn carried(&self) -> usize {
        let r = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        r.members.len() + r.opens.len() + r.reattaches.len()
    }

    /// Asks for one more association (OPEN from UDP `port`), waiting at most `timeout`.
    pub(crate) async fn open(&self, port: u16, timeout: Duration) -> Result<Granted, Denied> {
        self.speaks_associations(timeout).await?;
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut r = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            if r.dead {
                return Err(Denied::Gone("the control connection ended".to_owned()));
            }
            r.opens.insert(req, (self.suite, tx));
        }
        if let Err(e) = self.sender.send(&Frame::Open { req, port }) {
            self.forget(|r| drop(r.opens.remove(&req)));
            return Err(Denied::Gone(e.to_string()));
        }
        let answer = self.answer(rx, timeout).await;
        if answer.is_err() {
            self.forget(|r| drop(r.opens.remove(&req)));
        }
        answer
    }

    /// Asks to re-attach `assoc` (opened with `suite` on an earlier connection) to this one
    /// (REATTACH from UDP `port`; with ASSOCIATIONS it joins the others), waiting at most
    /// `timeout`.
    pub(crate) async fn reattach(
        &self,
        assoc: AssociationId,
        suite: CipherSuite,
        port: u16,
        timeout: Duration,
    ) -> Result<Granted, Denied> {
        self.speaks_associations(timeout).await?;
        let (tx, rx) = oneshot::channel();
        {
            let mut r = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            if r.dead {
                return Err(Denied::Gone("the control connection ended".to_owned()));
            }
            if r.members.contains_key(&assoc) || r.reattaches.contains_key(&assoc) {
                return Err(Denied::Reattach(RefuseReason::AlreadyAttached));
            }
            r.reattaches.insert(assoc, (suite, tx));
        }
        if let Err(e) = self.sender.send(&Frame::Reattach { assoc, port }) {
            self.forget(|r| drop(r.reattaches.remove(&assoc)));
            return Err(Denied::Gone(e.to_string()));
        }
        let answer = self.answer(rx, timeout).await;
        if answer.is_err() {
            self.forget(|r| drop(r.reattaches.remove(&assoc)));
        }
        answer
    }

    /// Frames of feature ASSOCIATIONS go only to a gateway whose HELLO listed it (§2.4).
    async fn speaks_associations(&self, timeout: Duration) -> Result<(), Denied> {
        match tokio::time::timeout(timeout, self.peer()).await {
            Ok(Some(PeerFeatures {
                associations: true, ..
            })) => Ok(()),
            Ok(Some(_)) => Err(Denied::Gone("the gateway does not speak ASSOCIATIONS".to_owned())),
            Ok(None) => Err(Denied::Gone("the control connection ended".to_owned())),
            Err(_) => Err(Denied::Gone(format!("no HELLO from the gateway in {timeout:?}"))),
        }
    }

    async fn answer(
        &self,
        rx: oneshot::Receiver<Result<Granted, Denied>>,
        timeout: Duration,
    ) -> Result<Granted, Denied> {
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Denied::Gone("the control connection ended".to_owned())),
            Err(_) => Err(Denied::Gone(format!("no answer from the gateway in {timeout:?}"))),
        }
    }

    fn forget(&self, f: impl FnOnce(&mut Routes)) {
        f(&mut self.routes.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The association `assoc` is no longer used here: its route goes, and while the
    /// connection carries others, a gateway that speaks ASSOCIATIONS is told to release it
    /// (CLOSE `0x07`), so that it ends for good while the connection carries on. The last
    /// one is not released: the connection closes with it, which ends it as a broken
    /// connection does (its owner may still re-attach it, §2.7).
    pub(crate) fn release(&self, assoc: AssociationId) {
        let routed = {
            let mut r = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            let was = r.members.remove(&assoc).is_some();
            was && r.members.len() + r.opens.len() + r.reattaches.len() > 0
        };
        let speaks = matches!(
            *self.hello.borrow(),
            Some(PeerFeatures {
                associations: true,
                ..
            })
        );
        if routed && speaks {
            let _ = self.sender.send(&Frame::Close {
                assoc,
                reason: CloseReason::Released,
            });
        }
    }
}

fn features_of(h: &crate::proto::frame::Hello) -> PeerFeatures {
    PeerFeatures {
        records: h.has(feature::RECORDS),
        associations: h.has(feature::ASSOCIATIONS),
    }
}

fn lock(r: &Mutex<Routes>) -> std::sync::MutexGuard<'_, Routes> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// The trunk's task: the control channel until the connection ends.
async fn run(
    mut channel: Channel<Control>,
    routes: Arc<Mutex<Routes>>,
    hello: watch::Sender<Option<PeerFeatures>>,
) {
    let reason = loop {
        match channel.next().await {
            Ok(Event::Hello(h)) => {
                tracing::debug!(
                    version = h.version,
                    ping_ms = h.ping_interval_ms,
                    "control channel: gateway hello"
                );
                let _ = hello.send(Some(features_of(&h)));
            }
            Ok(Event::Record(r)) => {
                let id = r
                    .get(ASSOC_OFFSET..ASSOC_OFFSET + 8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(AssociationId::from_bytes);
                let routes = lock(&routes);
                match id.and_then(|id| routes.members.get(&id)) {
                    Some(route) => {
                        if route.inbound.try_send(r).is_err() {
                            tracing::debug!("records inside TLS arrive faster than they are read: dropped");
                        }
                    }
                    None => {
                        tracing::debug!("a record inside TLS for no association of this connection: dropped")
                    }
                }
            }
            Ok(Event::Close { assoc, reason }) => {
                if let Some(route) = lock(&routes).members.remove(&assoc) {
                    route.end(format!(
                        "the gateway closed the association: {}",
                        reason.describe()
                    ));
                }
            }
            Ok(Event::Opened { req, status, assoc }) => {
                let Some((suite, reply)) = lock(&routes).opens.remove(&req) else {
                    continue;
                };
                let answer = if status == OpenStatus::Opened {
                    grant(&channel, &routes, assoc, suite, 0)
                } else {
                    Err(Denied::Open(status))
                };
                let _ = reply.send(answer);
            }
            Ok(Event::Reattached { assoc, epoch }) => {
                let Some((suite, reply)) = lock(&routes).reattaches.remove(&assoc) else {
                    continue;
                };
                let _ = reply.send(grant(&channel, &routes, assoc, suite, epoch));
            }
            Ok(Event::ReattachRefused { assoc, reason }) => {
                if let Some((_, reply)) = lock(&routes).reattaches.remove(&assoc) {
                    let _ = reply.send(Err(Denied::Reattach(reason)));
                }
            }
            // Frames only a client sends, and delegation frames (control sessions only).
            Ok(
                Event::Open { .. }
                | Event::Reattach { .. }
                | Event::Delegate { .. }
                | Event::DelegateReply { .. },
            ) => {}
            Err(ChannelError::Closed) => break "the gateway closed the control connection".to_owned(),
            Err(e) => break e.to_string(),
        }
    };
    let mut r = lock(&routes);
    r.dead = true;
    for (_, route) in r.members.drain() {
        route.end(reason.clone());
    }
    // Waiting requests learn that the connection ended from their dropped reply.
    r.opens.clear();
    r.reattaches.clear();
    drop(r);
    // A gateway that never said HELLO will not: whoever waits for it stops.
    hello.send_if_modified(|h| {
        let unset = h.is_none();
        if unset {
            *h = Some(PeerFeatures::default());
        }
        unset
    });
}

/// Keys of association `assoc` at `epoch` from this connection's exporter (§3.1), and its
/// route, registered before anything naming it can arrive.
fn grant(
    channel: &Channel<Control>,
    routes: &Arc<Mutex<Routes>>,
    assoc: AssociationId,
    suite: CipherSuite,
    epoch: u32,
) -> Result<Granted, Denied> {
    let keys = channel
        .with_stream(|c| {
            if epoch == 0 {
                crate::tls::export_keys(c.get_ref().1, assoc, suite)
            } else {
                crate::tls::export_epoch_keys(c.get_ref().1, assoc, suite, epoch)
            }
        })
        .map_err(|e| Denied::Gone(format!("no keys from the exporter: {e}")))?;
    let (route, ends) = Route::new();
    routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .members
        .insert(assoc, route);
    Ok(Granted {
        assoc,
        epoch,
        keys,
        ends,
    })
}
