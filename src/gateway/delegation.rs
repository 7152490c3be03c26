//! Delegated inspection on the gateway (`docs/DELEGATION.md`, `docs/PROTOCOL.md` §2.8):
//! which tunnels are live and who may delegate them ([`Registry`]), which destinations are
//! end-to-end ([`E2e`]), and the task that decrypts one tunnel's copy ([`inspect`]).
//!
//! A tunnel is named by its tag, the TLS exporter of its own connection: only the holder of
//! that connection can compute it, so a tag is a capability, not a guessable id. A tunnel is
//! bound to the first control session that delegates it; the session must be of the
//! tunnel's identity; any other session naming it is refused and counted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::mpsc;

use crate::audit::{self, AuditLog};
use crate::inspect::{Dir, Inspector, Opaque, TrafficSecrets, TAG_LEN};
use crate::metrics::{GaugeGuard, Metrics};
use crate::proto::frame::DelegateStatus;

/// How long a tapped tunnel waits for its secrets before it stays opaque for good.
pub const SECRETS_WAIT: Duration = Duration::from_secs(30);
/// How long a tunnel stays known (and its copy held, if it has no secrets yet) after it
/// closed: a short connection often ends before its client's key log line is read, and its
/// exchanges are still audited when the secrets come within this time.
pub const TUNNEL_LINGER: Duration = Duration::from_secs(5);
/// Byte copies queued between a tunnel's copy loop and its inspector; beyond that the
/// inspector has fallen behind and the tunnel turns opaque (the copy loop never waits).
const TAP_QUEUE: usize = 512;

/// Destinations that must never be inspected (`e2e`): CIDRs (matched against the address
/// connected to) and domain names (the name and its subdomains, matched against a CONNECT
/// by name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct E2e {
    nets: Vec<IpNet>,
    domains: Vec<String>,
}

impl E2e {
    /// Parses `CIDR` (or a bare address) or `DOMAIN` entries.
    pub fn parse(items: &[String]) -> Result<E2e, String> {
        let mut e = E2e::default();
        for item in items {
            let item = item.trim();
            if let Ok(net) = item.parse::<IpNet>() {
                e.nets.push(net);
            } else if let Ok(ip) = item.parse::<IpAddr>() {
                e.nets.push(IpNet::from(ip));
            } else {
                let d = item
                    .trim_end_matches('.')
                    .trim_start_matches("*.")
                    .to_ascii_lowercase();
                let valid = !d.is_empty()
                    && d.len() <= 253
                    && d.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    });
                if !valid {
                    return Err(format!("`{item}` is neither a CIDR nor a domain name"));
                }
                e.domains.push(d);
            }
        }
        Ok(e)
    }

    /// Whether no class is configured.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty() && self.domains.is_empty()
    }

    /// Whether a CONNECT to `name` (if by name) reaching `addr` is end-to-end.
    pub fn matches(&self, name: Option<&str>, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            a => a,
        };
        if self.nets.iter().any(|n| n.contains(&addr)) {
            return true;
        }
        let Some(name) = name else { return false };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.domains
            .iter()
            .any(|d| name == *d || name.strip_suffix(d.as_str()).is_some_and(|p| p.ends_with('.')))
    }
}

/// What a tunnel's task receives from control sessions.
#[derive(Debug)]
pub(crate) enum TunnelMsg {
    /// The secrets of the tunnel's TLS connection.
    Secrets(TrafficSecrets),
    /// The delegating session ended: forget the secrets.
    Revoke,
}

struct Tunnel {
    user: String,
    target: String,
    e2e: bool,
    /// A tap (and inspector) exists for this tunnel.
    tapped: bool,
    /// Set by the inspector once the tunnel is opaque for good.
    opaque: Arc<AtomicBool>,
    bound: Option<u64>,
    tx: mpsc::Sender<TunnelMsg>,
}

#[derive(Default)]
struct Inner {
    tunnels: HashMap<[u8; TAG_LEN], Tunnel>,
    /// Live delegating control sessions per identity.
    sessions: HashMap<String, usize>,
}

/// Live tunnels and delegating sessions of one gateway.
#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
    next_session: AtomicU64,
}

/// The verdict on a DELEGATE, and the tunnel's target when the tag named one.
pub(crate) struct Verdict {
    pub(crate) status: DelegateStatus,
    pub(crate) target: Option<String>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means a holder panicked; the maps stay consistent (every
        // update is a single insert or remove).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `user` has a delegating control session open now (a new tunnel of theirs is
    /// worth tapping).
    pub(crate) fn delegating(&self, user: &str) -> bool {
        self.lock().sessions.get(user).is_some_and(|n| *n > 0)
    }

    /// Registers a live tunnel; it is forgotten when the guard drops.
    pub(crate) fn tunnel(
        self: &Arc<Self>,
        tag: [u8; TAG_LEN],
        user: &str,
        target: &str,
        e2e: bool,
        tapped: bool,
    ) -> (TunnelGuard, mpsc::Receiver<TunnelMsg>, Arc<AtomicBool>) {
        let (tx, rx) = mpsc::channel(4);
        let opaque = Arc::new(AtomicBool::new(false));
        self.lock().tunnels.insert(
            tag,
            Tunnel {
                user: user.to_owned(),
                target: target.to_owned(),
                e2e,
                tapped,
                opaque: opaque.clone(),
                bound: None,
                tx,
            },
        );
        (
            TunnelGuard {
                registry: self.clone(),
                tag,
            },
            rx,
            opaque,
        )
    }

    /// Opens a delegating session of `user`; it ends when the guard drops, and every tunnel
    /// it delegated forgets its secrets then.
    pub(crate) fn session(self: &Arc<Self>, user: &str) -> SessionGuard {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        *self.lock().sessions.entry(user.to_owned()).or_default() += 1;
        SessionGuard {
            registry: self.clone(),
            id,
            user: user.to_owned(),
        }
    }

    /// Hands `secrets` to the tunnel `tag` if session `session` of `user` may delegate it.
    pub(crate) fn delegate(
        &self,
        session: &SessionGuard,
        tag: &[u8; TAG_LEN],
        secrets: TrafficSecrets,
        inspecting: bool,
    ) -> Verdict {
        let mut inner = self.lock();
        let Some(t) = inner.tunnels.get_mut(tag) else {
            return Verdict {
                status: DelegateStatus::UnknownTunnel,
                target: None,
            };
        };
        let target = Some(t.target.clone());
        let status = if t.user != session.user {
            DelegateStatus::OtherIdentity
        } else if t.bound.is_some_and(|b| b != session.id) {
            DelegateStatus::OtherSession
        } else if t.bound == Some(session.id) {
            DelegateStatus::Duplicate
        } else if t.e2e {
            DelegateStatus::EndToEnd
        } else if !inspecting {
            DelegateStatus::InspectionOff
        } else if !t.tapped || t.opaque.load(Ordering::Relaxed) || !secrets.well_formed() {
            if secrets.well_formed() {
                DelegateStatus::TooLate
            } else {
                DelegateStatus::Malformed
            }
        } else {
            match t.tx.try_send(TunnelMsg::Secrets(secrets)) {
                Ok(()) => {
                    t.bound = Some(session.id);
                    DelegateStatus::Accepted
                }
                Err(_) => DelegateStatus::UnknownTunnel,
            }
        };
        Verdict { status, target }
    }
}

/// A live tunnel in the [`Registry`].
pub(crate) struct TunnelGuard {
    registry: Arc<Registry>,
    tag: [u8; TAG_LEN],
}

impl TunnelGuard {
    /// Keeps the tunnel known for [`TUNNEL_LINGER`] after it closed, so late secrets get their
    /// true verdict (`end_to_end`, `inspection_off`, ...) instead of `unknown_tunnel`.
    pub(crate) fn linger(self) {
        tokio::spawn(async move {
            tokio::time::sleep(TUNNEL_LINGER).await;
            drop(self);
        });
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.registry.lock().tunnels.remove(&self.tag);
    }
}

/// A live delegating control session in the [`Registry`].
pub(crate) struct SessionGuard {
    registry: Arc<Registry>,
    id: u64,
    user: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        if let Some(n) = inner.sessions.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                inner.sessions.remove(&self.user);
            }
        }
        for t in inner.tunnels.values_mut() {
            if t.bound == Some(self.id) {
                // A full queue means a Secrets message is still queued: the tunnel then
                // also sees its sender side close, see `inspect`.
                let _ = t.tx.try_send(TunnelMsg::Revoke);
            }
        }
    }
}

/// The copy loop's side of a tap: each read's bytes are queued for the inspector, never
/// waited for.
#[derive(Clone)]
pub(crate) struct TapTx {
    tx: mpsc::Sender<(Dir, Vec<u8>)>,
    lost: Arc<AtomicBool>,
}

impl TapTx {
    /// A copy of bytes just read in direction `dir` (the caller forwards them itself).
    pub(crate) fn copy(&self, dir: Dir, bytes: &[u8]) {
        if self.lost.load(Ordering::Relaxed) {
            return;
        }
        if self.tx.try_send((dir, bytes.to_vec())).is_err() {
            self.lost.store(true, Ordering::Relaxed);
        }
    }
}

/// Who and what a tunnel is, for its audit lines.
pub(crate) struct TunnelInfo {
    pub(crate) user: String,
    pub(crate) source: String,
    pub(crate) target: String,
}

/// A tap: the copy loop's sender and the inspector's receiver.
pub(crate) fn tap() -> (TapTx, TapRx) {
    let (tx, rx) = mpsc::channel(TAP_QUEUE);
    let lost = Arc::new(AtomicBool::new(false));
    (
        TapTx {
            tx,
            lost: lost.clone(),
        },
        TapRx { rx, lost },
    )
}

/// The inspector's side of a tap.
pub(crate) struct TapRx {
    rx: mpsc::Receiver<(Dir, Vec<u8>)>,
    lost: Arc<AtomicBool>,
}

/// Decrypts one tunnel's copy until the copy loop ends (its [`TapTx`] clones drop) and, if
/// the secrets have not come by then, for [`TUNNEL_LINGER`] more; writes one audit line per
/// HTTP exchange and one per inspected tunnel. The tunnel stays in the registry (`registered`)
/// as long.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn inspect(
    registered: TunnelGuard,
    mut bytes: TapRx,
    mut msgs: mpsc::Receiver<TunnelMsg>,
    opaque_flag: Arc<AtomicBool>,
    info: TunnelInfo,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    wait: Duration,
) {
    let mut insp = Inspector::new();
    let mut held: Option<GaugeGuard> = None;
    let mut requests = 0u64;
    let mut inspected = false;
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    let linger = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(linger);
    let mut ended = false;
    let mut msgs_open = true;
    let mut logged_opaque = false;
    let write = |ex: Vec<crate::inspect::http::Exchange>, requests: &mut u64| {
        for e in ex {
            *requests += 1;
            audit.write(&audit::Event::Http {
                user: info.user.clone(),
                source: info.source.clone(),
                target: info.target.clone(),
                host: e.host,
                method: e.method,
                path: e.path,
                status: e.status,
                request_body: e.request_body,
                response_body: e.response_body,
            });
        }
    };
    loop {
        let waiting = !insp.tap().has_secrets() && insp.tap().opaque().is_none();
        if ended && !(waiting && msgs_open) {
            break;
        }
        tokio::select! {
            b = bytes.rx.recv(), if !ended => match b {
                Some((dir, chunk)) => {
                    if bytes.lost.load(Ordering::Relaxed) {
                        insp.give_up(Opaque::Overrun);
                    }
                    let ex = insp.feed(dir, &chunk);
                    write(ex, &mut requests);
                }
                None => {
                    // The tunnel closed; its secrets may still be on their way.
                    ended = true;
                    linger.as_mut().reset(tokio::time::Instant::now() + TUNNEL_LINGER);
                }
            },
            m = msgs.recv(), if msgs_open => match m {
                Some(TunnelMsg::Secrets(s)) => {
                    if insp.tap().opaque().is_none() {
                        held = Some(GaugeGuard::new(metrics.clone(), |m| &m.delegation_secrets_held));
                        inspected = true;
                        metrics.tunnels_inspected.fetch_add(1, Ordering::Relaxed);
                    }
                    let ex = insp.install(s);
                    write(ex, &mut requests);
                }
                Some(TunnelMsg::Revoke) | None => {
                    // The delegating session ended (or the tunnel left the registry).
                    msgs_open = false;
                    if insp.tap().has_secrets() {
                        insp.forget();
                        held = None;
                    }
                }
            },
            _ = &mut deadline, if waiting => insp.give_up(Opaque::NoSecrets),
            _ = &mut linger, if ended => insp.give_up(Opaque::NoSecrets),
        }
        if let Some(why) = insp.tap().opaque() {
            if !logged_opaque {
                logged_opaque = true;
                opaque_flag.store(true, Ordering::Relaxed);
                held = None;
                if why != Opaque::Revoked {
                    metrics.tunnels_opaque.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(user = %crate::logsafe::Peer::str(&info.user), target = %info.target, reason = %why, "tunnel stays opaque");
                }
            }
        }
    }
    // The opaque reason as it stood before the end (finish() forgets the secrets).
    let ended_opaque = insp.tap().opaque();
    let ex = insp.finish();
    write(ex, &mut requests);
    drop(held);
    drop(registered);
    if inspected {
        audit.write(&audit::Event::TunnelInspected {
            user: info.user.clone(),
            source: info.source.clone(),
            target: info.target.clone(),
            suite: insp.tap().suite().map(|s| s.name().to_owned()),
            protocol: if insp.saw_http() { "http/1.1" } else { "other" }.to_owned(),
            requests,
            app_bytes_up: insp.tap().app_bytes(Dir::ClientToServer),
            app_bytes_down: insp.tap().app_bytes(Dir::ServerToClient),
            opaque: ended_opaque.map(|w| w.to_string()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2e_classes_match_cidrs_domains_and_subdomains() {
        let e = E2e::parse(&[
            "10.1.0.0/16".into(),
            "bank.example".into(),
            "*.health.test.".into(),
            "::1".into(),
        ])
        .unwrap();
        assert!(e.matches(None, "10.1.2.3".parse().unwrap()));
        assert!(e.matches(None, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!e.matches(None, "10.2.0.1".parse().unwrap()));
        assert!(e.matches(Some("bank.example"), "192.0.2.1".parse().unwrap()));
        assert!(e.matches(Some("WWW.Bank.Example."), "192.0.2.1".parse().unwrap()));
        assert!(!e.matches(Some("notbank.example"), "192.0.2.1".parse().unwrap()));
        assert!(e.matches(Some("a.health.test"), "192.0.2.1".parse().unwrap()));
        assert!(e.matches(None, "::1".parse().unwrap()));
        assert!(E2e::parse(&["bad name!".into()]).is_err());
        assert!(E2e::default().is_empty());
    }

    fn secrets() -> TrafficSecrets {
        let s = || zeroize::Zeroizing::new(vec![1u8; 32]);
        TrafficSecrets {
            client_handshake: s(),
            server_handshake: s(),
            client_app: s(),
            server_app: s(),
        }
    }

    #[test]
    fn a_tunnel_binds_to_the_first_session_of_its_identity() {
        let r = Arc::new(Registry::default());
        let a = r.session("alice");
        let a2 = r.session("alice");
        let m = r.session("mallory");
        assert!(r.delegating("alice"));
        let (_t, mut rx, _) = r.tunnel([1; 16], "alice", "x:443", false, true);
        let (_e, _erx, _) = r.tunnel([2; 16], "alice", "bank:443", true, true);
        fn verdict(r: &Registry, s: &SessionGuard, tag: &[u8; 16], insp: bool) -> DelegateStatus {
            r.delegate(s, tag, secrets(), insp).status
        }
        let v = |s: &SessionGuard, tag: &[u8; 16], insp: bool| verdict(&r, s, tag, insp);
        assert_eq!(v(&m, &[1; 16], true), DelegateStatus::OtherIdentity);
        assert_eq!(v(&a, &[9; 16], true), DelegateStatus::UnknownTunnel);
        assert_eq!(v(&a, &[1; 16], false), DelegateStatus::InspectionOff);
        assert_eq!(v(&a, &[2; 16], true), DelegateStatus::EndToEnd);
        assert_eq!(v(&a, &[1; 16], true), DelegateStatus::Accepted);
        assert!(matches!(rx.try_recv(), Ok(TunnelMsg::Secrets(_))));
        assert_eq!(v(&a2, &[1; 16], true), DelegateStatus::OtherSession);
        assert_eq!(v(&a, &[1; 16], true), DelegateStatus::Duplicate);
        drop(a2);
        assert!(rx.try_recv().is_err(), "only the binding session revokes");
        drop(a);
        assert!(matches!(rx.try_recv(), Ok(TunnelMsg::Revoke)));
        assert!(!r.delegating("alice"));
        drop(_t);
        assert_eq!(v(&m, &[1; 16], true), DelegateStatus::UnknownTunnel);
    }
}
