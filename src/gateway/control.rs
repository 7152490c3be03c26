//! One control connection: TLS, SOCKS5 method negotiation (no-auth, GSS-API of RFC 1961,
//! RFC 1929 username/password, mTLS identity, the sudp method 0x80), then one command.
//!
//! The SOCKS5 flow runs on fast-socks5's server protocol API over the TLS stream. Its
//! `AuthMethod` trait lets us add our own methods; the sub-negotiations themselves are
//! parsed by the sans-IO codecs in [`crate::proto::socks`], read byte-exactly so that
//! nothing the client pipelined after them is swallowed.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fast_socks5::server::{AuthMethod, AuthMethodSuccessState, Socks5ServerProtocol};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use crate::audit;
use crate::auth::{Credentials, Identity, Method as AuthMethodKind, Verdict};
use crate::gateway::delegation::{self, TapTx, TunnelInfo};
use crate::gateway::moves;
use crate::gateway::relay::{AssocError, AssociationHandle};
use crate::gateway::Shared;
use crate::inspect::{Dir, TAG_LABEL, TAG_LEN};
use crate::logsafe::Peer;
use crate::net::canonical;
use crate::net::channel::{Channel, ChannelError, Event};
use crate::proto::frame::{feature, CloseReason, DelegateStatus, Frame, OpenStatus, RefuseReason};
use crate::proto::record::ASSOC_OFFSET;
use crate::proto::socks::{self, choose_suite, method, sudp_status, SudpAccept, SudpHello};
use crate::proto::{AssociationId, KeySchedule, SocksError};

/// Most of the handshake deadline kept back from authentication checks, to answer in.
const AUTH_REPLY_MARGIN: Duration = Duration::from_millis(500);

/// Largest sub-negotiation message we read (sudp hello with 16 suites and full credentials).
const MAX_SUBNEG: usize = 2 + socks::MAX_SUITES + 1 + 255 + 1 + 255;

/// Why a command was refused; [`reply_for`] maps each to its RFC 1928 reply code.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Destination refused by policy.
    #[error("destination not allowed by policy")]
    Policy,
    /// Name did not resolve (the name is the client's: logged escaped).
    #[error("cannot resolve {}", Peer::str(.0))]
    Resolve(String),
    /// TCP connect failed.
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// TCP connect timed out.
    #[error("connect timed out")]
    Timeout,
    /// Association limit or socket exhaustion.
    #[error("cannot open association: {0}")]
    Association(String),
    /// BIND or another command we do not serve.
    #[error("command not supported")]
    Unsupported,
}

/// The one place that maps refusals to RFC 1928 §6 reply codes.
pub fn reply_for(r: &Refusal) -> ReplyError {
    match r {
        Refusal::Policy => ReplyError::ConnectionNotAllowed,
        Refusal::Resolve(_) => ReplyError::HostUnreachable,
        Refusal::Connect(e) => match e.kind() {
            io::ErrorKind::ConnectionRefused => ReplyError::ConnectionRefused,
            io::ErrorKind::NetworkUnreachable => ReplyError::NetworkUnreachable,
            io::ErrorKind::HostUnreachable => ReplyError::HostUnreachable,
            io::ErrorKind::TimedOut => ReplyError::TtlExpired,
            _ => ReplyError::GeneralFailure,
        },
        Refusal::Timeout => ReplyError::TtlExpired,
        Refusal::Association(_) => ReplyError::GeneralFailure,
        Refusal::Unsupported => ReplyError::CommandNotSupported,
    }
}

/// The methods this gateway can select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    NoAuth,
    Gssapi,
    UserPass,
    Sudp,
    /// A control session (PROTOCOL.md §2.8): sudp's sub-negotiation, then frames.
    Control,
}

impl<T> AuthMethod<T> for Method {
    type StartingState = (Method, T);

    fn method_id(self) -> u8 {
        match self {
            Method::NoAuth => method::NO_AUTH,
            Method::Gssapi => method::GSSAPI,
            Method::UserPass => method::USERPASS,
            Method::Sudp => method::SUDP,
            Method::Control => method::CONTROL,
        }
    }

    fn new(self, inner: T) -> (Method, T) {
        (self, inner)
    }
}

struct Authenticated<T>(T);

impl<T> AuthMethodSuccessState<T> for Authenticated<T> {
    fn into_inner(self) -> T {
        self.0
    }
}

/// What authentication established.
struct Session {
    /// Who the client is; `None`: anonymous (`no_auth`).
    identity: Option<Identity>,
    /// The identity's qualified name, the key of its `[users_policy]` rules.
    user: Option<String>,
    secure: Option<(AssociationId, KeySchedule)>,
    /// The connection's tunnel tag (PROTOCOL.md §2.8), should it carry a CONNECT.
    tag: Option<[u8; TAG_LEN]>,
}

impl Session {
    fn new(identity: Option<Identity>) -> Session {
        Session {
            user: identity.as_ref().map(Identity::qualified),
            identity,
            secure: None,
            tag: None,
        }
    }

    fn set_identity(&mut self, identity: Identity) {
        self.user = Some(identity.qualified());
        self.identity = Some(identity);
    }

    /// For the audit log: the qualified name as is (JSON escapes it), or `anonymous`.
    fn audit_user(&self) -> String {
        self.user.clone().unwrap_or_else(|| "anonymous".to_owned())
    }

    /// For the audit log: how the client authenticated.
    fn audit_method(&self) -> &'static str {
        self.identity.as_ref().map_or("none", |i| i.method().name())
    }

    /// For logs: the escaped qualified name, or `anonymous`.
    fn who(&self) -> String {
        self.identity
            .as_ref()
            .map_or_else(|| "anonymous".to_owned(), Identity::to_string)
    }
}

type Tls = TlsStream<TcpStream>;

/// Serves one accepted TCP connection until it closes, the association idles out or the
/// gateway shuts down.
///
/// TLS, SOCKS5 negotiation and authentication share one deadline, counted from here (the
/// accept): a silent peer holds its slot for `handshake_timeout`, not once per phase.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let deadline = Instant::now() + shared.settings.handshake_timeout;
    let peer = canonical(peer);
    let local = match tcp.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout_at(
        deadline,
        tokio_rustls::TlsAcceptor::from(shared.tls.load_full()).accept(tcp),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            if is_certificate_error(&e) {
                shared.metrics.count_auth_failure(AuthMethodKind::Certificate);
            }
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "handshake timed out (TLS)");
            return;
        }
    };
    // Full or resumed (with a shared store, possibly a session another node issued).
    shared.metrics.count_handshake(tls.get_ref().1.handshake_kind());
    // Checks give up a little before the connection's deadline, so that a check that cannot
    // finish in time (a KDC that does not answer) still gets the failure reply, not a
    // connection closed without a word.
    let margin = (shared.settings.handshake_timeout / 10).min(AUTH_REPLY_MARGIN);
    let negotiated =
        tokio::time::timeout_at(deadline, negotiate(&shared, tls, peer, deadline - margin)).await;
    let (proto, cmd, target, session) = match negotiated {
        Ok(Ok(Some(Negotiated::Command(x)))) => x,
        Ok(Ok(Some(Negotiated::Control(stream, session)))) => {
            if let Err(e) = control_session(&shared, stream, session, peer, shutdown).await {
                tracing::debug!(%peer, error = %e, "control session ended");
            }
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "SOCKS5 negotiation failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "handshake timed out (SOCKS5)");
            return;
        }
    };
    let result = match cmd {
        Socks5Command::TCPConnect => connect(&shared, proto, target, &session, peer, shutdown).await,
        Socks5Command::UDPAssociate => {
            udp_associate(&shared, proto, target, session, peer, local, shutdown).await
        }
        Socks5Command::TCPBind => refuse(proto, Refusal::Unsupported).await,
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "control connection ended");
    }
}

/// Whether a failed TLS accept was the client certificate's fault (missing where required,
/// untrusted, revoked, expired): an authentication failure of the certificate method.
fn is_certificate_error(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        })
}

/// Completes when the client has gone away (FIN or RST), even with unread bytes pending.
async fn peer_gone(tcp: &TcpStream) {
    loop {
        match tcp.ready(Interest::READABLE).await {
            Ok(r) if r.is_read_closed() || r.is_error() => return,
            Err(_) => return,
            // Readable but open: bytes the client pipelined. Readiness stays set until they
            // are read, so look again a little later instead of spinning.
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

type Ready = (
    Socks5ServerProtocol<Tls, fast_socks5::server::states::CommandRead>,
    Socks5Command,
    TargetAddr,
    Session,
);

/// What negotiation led to: a SOCKS5 command, or a control session (method 0x81).
enum Negotiated {
    Command(Ready),
    Control(Tls, Session),
}

/// Method negotiation, authentication and the command request. `Ok(None)`: the client was
/// refused and answered; nothing more to do. `deadline` is the one checks must finish by
/// (a little before the connection's own).
///
/// With `no_auth`, every client is accepted as anonymous, also one that sends credentials
/// (RFC 1929 or the sudp hello): the gateway cannot check them, and accepting them as an
/// identity would let anyone claim one, so they are ignored (and logged as ignored).
async fn negotiate(
    shared: &Shared,
    tls: Tls,
    peer: SocketAddr,
    deadline: Instant,
) -> anyhow::Result<Option<Negotiated>> {
    let auth = &shared.settings.auth;
    // A certificate rustls verified (CA, CRLs) names the client through its backend.
    let mut cert_identity = None;
    if let Some(cert) = crate::tls::peer_certificate(tls.get_ref().1) {
        let verdict = shared
            .auth
            .authenticate(
                peer,
                Credentials::Certificate(cert),
                deadline,
                peer_gone(tls.get_ref().0),
            )
            .await;
        if let Verdict::Accepted(identity) = verdict {
            cert_identity = Some(identity);
        }
    }
    // A standard client never offers 0x81, so listing it changes nothing for one.
    let mut offered = vec![Method::Sudp, Method::Control];
    if auth.no_auth || cert_identity.is_some() {
        offered.push(Method::NoAuth);
    }
    // With a keytab: tickets (GSS-API) before passwords, which the KDC also checks.
    if shared.auth.has(AuthMethodKind::Gssapi) {
        offered.push(Method::Gssapi);
    }
    if auth.users.is_some() || auth.no_auth || auth.kerberos.is_some() {
        offered.push(Method::UserPass);
    }
    let (method, mut stream) = Socks5ServerProtocol::start(tls).negotiate_auth(&offered).await?;
    let mut session = Session::new(cert_identity.clone());
    // The sudp hello (§2.2) follows method 0x80, and GSS-API's "secure UDP" level (§2.6).
    let mut hello_follows = false;
    // The tunnel's name on control sessions: only the holder of this very TLS connection
    // can compute it. Taken now, so the tunnel is registered before the client hears of it.
    session.tag = stream
        .get_ref()
        .1
        .export_keying_material([0u8; TAG_LEN], TAG_LABEL, None)
        .ok();
    match method {
        Method::NoAuth => {}
        Method::Gssapi => match gssapi(shared, &mut stream, peer, deadline).await? {
            Some((identity, then_hello)) => {
                session.set_identity(identity);
                hello_follows = then_hello;
            }
            None => return Ok(None),
        },
        Method::UserPass => {
            let msg = read_message(&mut stream, |b| socks::parse_userpass(b).map(|(_, n)| n)).await?;
            let ((user, pass), _) = socks::parse_userpass(&msg)?;
            if auth.no_auth {
                tracing::info!(%peer, user = %Peer(user), "no_auth: credentials ignored, client is anonymous");
            } else {
                let creds = Credentials::password(user, pass);
                match shared
                    .auth
                    .authenticate(peer, creds, deadline, peer_gone(stream.get_ref().0))
                    .await
                {
                    Verdict::Accepted(identity) => session.set_identity(identity),
                    _ => {
                        stream.write_all(&[socks::USERPASS_VERSION, 0x01]).await?;
                        stream.shutdown().await?;
                        return Ok(None);
                    }
                }
            }
            stream.write_all(&[socks::USERPASS_VERSION, 0x00]).await?;
        }
        Method::Sudp | Method::Control => hello_follows = true,
    }
    if hello_follows {
        let msg = read_message(&mut stream, |b| SudpHello::parse(b).map(|(_, n)| n)).await?;
        let (hello, _) = SudpHello::parse(&msg)?;
        let authed = if hello.user.is_empty() {
            auth.no_auth || cert_identity.is_some() || method == Method::Gssapi
        } else if method == Method::Gssapi {
            // PROTOCOL.md §2.6: the hello after GSS-API is bound to the GSS identity.
            tracing::info!(%peer, "sudp hello after GSS-API carries credentials: refused");
            false
        } else if auth.no_auth {
            tracing::info!(%peer, user = %Peer(hello.user), "no_auth: credentials ignored, client is anonymous");
            true
        } else {
            let creds = Credentials::password(hello.user, hello.pass);
            match shared
                .auth
                .authenticate(peer, creds, deadline, peer_gone(stream.get_ref().0))
                .await
            {
                Verdict::Accepted(identity) => {
                    session.set_identity(identity);
                    true
                }
                // Not checked for want of capacity: the client may retry (BUSY), unlike a
                // refusal, which it must not retry in a loop.
                Verdict::Overloaded => {
                    stream
                        .write_all(&SudpAccept::refuse(sudp_status::BUSY).encode())
                        .await?;
                    stream.shutdown().await?;
                    return Ok(None);
                }
                _ => false,
            }
        };
        if !authed {
            if hello.user.is_empty() {
                // No credentials where some are needed: a failure of no backend.
                shared.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, "sudp authentication rejected: no credentials");
            }
            stream
                .write_all(&SudpAccept::refuse(sudp_status::AUTH_FAILED).encode())
                .await?;
            stream.shutdown().await?;
            return Ok(None);
        }
        if method == Method::Control {
            // No association: SUITE and ASSOC_ID are zero (PROTOCOL.md §2.8).
            stream
                .write_all(&SudpAccept::refuse(sudp_status::OK).encode())
                .await?;
            return Ok(Some(Negotiated::Control(stream, session)));
        }
        let Some(suite) = choose_suite(hello.suites, &shared.settings.suites) else {
            tracing::info!(%peer, offered = ?hello.suites, "no acceptable cipher suite");
            stream
                .write_all(&SudpAccept::refuse(sudp_status::NO_SUITE).encode())
                .await?;
            stream.shutdown().await?;
            return Ok(None);
        };
        let id = shared.relay.new_assoc_id();
        let keys = crate::tls::export_keys(stream.get_ref().1, id, suite)?;
        stream.write_all(&SudpAccept::ok(suite, id).encode()).await?;
        session.secure = Some((id, keys));
    }
    let proto = Socks5ServerProtocol::finish_auth(Authenticated(stream));
    let (proto, cmd, target) = proto.read_command().await?;
    Ok(Some(Negotiated::Command((proto, cmd, target, session))))
}

/// The GSS-API sub-negotiation (RFC 1961 §3-4, PROTOCOL.md §2.6): one context token in,
/// accepted by the Authenticator's GSS-API backend, the reply token out, then the
/// protection level: "none" (TLS protects the channel) for any RFC 1961 level, or sudp's
/// "secure UDP" level, after which a credential-less sudp hello follows (the `bool`).
/// `None`: refused, an abort message sent and the connection closed. The context is dropped
/// (deleted) on return: nothing after this message uses it.
async fn gssapi(
    shared: &Shared,
    stream: &mut Tls,
    peer: SocketAddr,
    deadline: Instant,
) -> anyhow::Result<Option<(Identity, bool)>> {
    use crate::auth::GssExchange;
    use crate::proto::gssapi::{self, level, GssMessage, MessageType};
    let msg = read_gss(stream).await?;
    let (first, _) = GssMessage::parse(&msg)?;
    if first.mtyp != MessageType::Authentication {
        // An abort, or a protection message before any context.
        tracing::info!(%peer, mtyp = ?first.mtyp, "GSS-API: expected a context token");
        abort(stream).await?;
        return Ok(None);
    }
    let exchange = GssExchange::new(first.token.to_vec());
    let verdict = shared
        .auth
        .authenticate(
            peer,
            Credentials::Gssapi(exchange.clone()),
            deadline,
            peer_gone(stream.get_ref().0),
        )
        .await;
    let accepted = match (verdict, exchange.take_accepted()) {
        (Verdict::Accepted(identity), Some(accepted)) => Some((identity, accepted)),
        _ => None,
    };
    let Some((identity, mut accepted)) = accepted else {
        abort(stream).await?;
        return Ok(None);
    };
    let mut out = Vec::new();
    if !accepted.reply.is_empty() {
        GssMessage::authentication(&accepted.reply).encode(&mut out)?;
        stream.write_all(&out).await?;
    }
    // Protection-level sub-negotiation: the client's wish, wrapped.
    let msg = read_gss(stream).await?;
    let (wish, _) = GssMessage::parse(&msg)?;
    let wanted = match wish.mtyp {
        MessageType::Protection => accepted
            .context
            .unwrap(wish.token)
            .and_then(|m| gssapi::parse_level(&m).ok()),
        _ => None,
    };
    let chosen = match wanted {
        Some(level::NONE | level::INTEGRITY | level::CONFIDENTIALITY | level::SELECTIVE) => level::NONE,
        Some(level::SUDP) => level::SUDP,
        _ => {
            tracing::info!(%peer, user = %identity, "GSS-API: no valid protection-level message");
            abort(stream).await?;
            return Ok(None);
        }
    };
    let Some(answer) = accepted.context.wrap(&[chosen]) else {
        abort(stream).await?;
        return Ok(None);
    };
    out.clear();
    GssMessage::protection(&answer).encode(&mut out)?;
    stream.write_all(&out).await?;
    Ok(Some((identity, chosen == level::SUDP)))
}

/// Sends the RFC 1961 abort message and closes.
async fn abort<S: AsyncWrite + Unpin>(stream: &mut S) -> anyhow::Result<()> {
    let mut out = Vec::new();
    crate::proto::gssapi::GssMessage::abort().encode(&mut out)?;
    stream.write_all(&out).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Reads one RFC 1961 message byte-exactly; its length is bounded before it is read.
async fn read_gss<S: AsyncRead + Unpin>(stream: &mut S) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(4);
    loop {
        match crate::proto::gssapi::GssMessage::parse(&buf) {
            Ok(_) => return Ok(buf),
            Err(SocksError::Incomplete { need }) => {
                let have = buf.len();
                buf.resize(need, 0);
                stream.read_exact(&mut buf[have..]).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads one sub-negotiation message byte-exactly: `parse` says how many bytes it needs.
async fn read_message<S, F>(stream: &mut S, parse: F) -> anyhow::Result<Vec<u8>>
where
    S: AsyncRead + Unpin,
    F: Fn(&[u8]) -> Result<usize, SocksError>,
{
    let mut buf = Vec::with_capacity(64);
    loop {
        match parse(&buf) {
            Ok(_) => return Ok(buf),
            Err(SocksError::Incomplete { need }) if need <= MAX_SUBNEG => {
                let have = buf.len();
                buf.resize(need, 0);
                stream.read_exact(&mut buf[have..]).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn refuse(
    proto: Socks5ServerProtocol<Tls, fast_socks5::server::states::CommandRead>,
    why: Refusal,
) -> anyhow::Result<()> {
    tracing::info!(reason = %why, "request refused");
    proto.reply_error(&reply_for(&why)).await?;
    Ok(())
}

async fn connect(
    shared: &Shared,
    proto: Socks5ServerProtocol<Tls, fast_socks5::server::states::CommandRead>,
    target: TargetAddr,
    session: &Session,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let candidates = match &target {
        TargetAddr::Ip(a) => vec![canonical(*a)],
        TargetAddr::Domain(name, port) => match shared.dns.resolve_all(name, *port).await {
            Ok(v) => v,
            Err(_) => return refuse(proto, Refusal::Resolve(name.clone())).await,
        },
    };
    // One policy for the whole request, even if a reload lands while it resolves.
    let policy = shared.relay.policy();
    let allowed: Vec<SocketAddr> = candidates
        .into_iter()
        .filter(|a| policy.check(session.user.as_deref(), *a).is_ok())
        .collect();
    if allowed.is_empty() {
        return refuse(proto, Refusal::Policy).await;
    }
    let mut last = Refusal::Timeout;
    let mut outbound = None;
    for a in allowed {
        match tokio::time::timeout(shared.settings.connect_timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                outbound = Some((s, a));
                break;
            }
            Ok(Err(e)) => last = Refusal::Connect(e),
            Err(_) => last = Refusal::Timeout,
        }
    }
    let Some((outbound, remote)) = outbound else {
        return refuse(proto, last).await;
    };
    let _ = outbound.set_nodelay(true);
    let bound = outbound.local_addr()?;
    // The target is the client's request (a name comes off the wire: escaped); `remote` is
    // the address the gateway connected to.
    let (target_name, target) = match &target {
        TargetAddr::Ip(a) => (None, canonical(*a).to_string()),
        TargetAddr::Domain(name, port) => (Some(name.as_str()), format!("{}:{port}", Peer::str(name))),
    };
    let user = session.audit_user();
    let settings = &shared.settings;
    let e2e = settings.e2e.matches(target_name, remote.ip());
    let tag = session.tag;
    // Tapped only when inspection is on, the destination is not end-to-end and the user has
    // a delegating session open: nobody else's bytes are ever copied.
    let tapped = settings.audit.enabled() && !e2e && tag.is_some() && shared.delegations.delegating(&user);
    let mut tap: Option<TapTx> = None;
    let mut registered = None;
    if let Some(tag) = tag {
        let (guard, msgs, opaque) = shared.delegations.tunnel(tag, &user, &target, e2e, tapped);
        if tapped {
            let (tx, rx) = delegation::tap();
            tap = Some(tx);
            let info = TunnelInfo {
                user: user.clone(),
                source: peer.to_string(),
                target: target.clone(),
            };
            tokio::spawn(delegation::inspect(
                guard,
                rx,
                msgs,
                opaque,
                info,
                settings.audit.clone(),
                shared.metrics.clone(),
                delegation::SECRETS_WAIT,
            ));
        } else {
            registered = Some(guard);
        }
    }
    let tls = proto.reply_success(bound).await?;
    let idle = settings.connect_idle_timeout;
    let activity = Activity::new();
    let (mut a, mut b) = (
        activity.watch(tls, tap.clone().map(|t| (t, Dir::ClientToServer))),
        activity.watch(outbound, tap.map(|t| (t, Dir::ServerToClient))),
    );
    let (up, down) = (a.read.clone(), b.read.clone());
    // An end-to-end tunnel lives at most `e2e_ttl`.
    let ttl = async {
        if e2e {
            tokio::time::sleep(settings.e2e_ttl).await
        } else {
            std::future::pending().await
        }
    };
    let (reason, error) = {
        // Half-close is carried through: EOF one way shuts down that direction's writer only.
        let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
        tokio::pin!(copy);
        tokio::pin!(ttl);
        let ended = |r: io::Result<(u64, u64)>| match r {
            Ok(_) => (TunnelEnd::Eof, None),
            Err(e) => (TunnelEnd::Error, Some(e)),
        };
        tokio::select! {
            r = &mut copy => ended(r),
            _ = activity.idle_for(idle) => (TunnelEnd::Idle, None),
            _ = &mut ttl => (TunnelEnd::E2eTtl, None),
            _ = shutdown.changed() => {
                // Draining: a transfer under way may finish, within the drain's bounds, then
                // the tunnel is closed (and logged) before the drain gives up on the task.
                tokio::select! {
                    r = &mut copy => ended(r),
                    _ = activity.idle_for(idle) => (TunnelEnd::Idle, None),
                    _ = &mut ttl => (TunnelEnd::E2eTtl, None),
                    _ = tokio::time::sleep(super::CONNECT_DRAIN) => (TunnelEnd::Shutdown, None),
                }
            }
        }
    };
    if reason == TunnelEnd::E2eTtl {
        // Closed cleanly: TLS close_notify and FIN to the client, FIN to the origin.
        shared.metrics.e2e_expired.fetch_add(1, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = a.shutdown().await;
            let _ = b.shutdown().await;
        })
        .await;
    }
    // The inspector ends when the copies' senders are gone.
    drop((a, b));
    if let Some(r) = registered {
        r.linger();
    }
    tracing::info!(
        user = %session.who(),
        source = %peer,
        target = %target,
        remote = %remote,
        e2e,
        bytes_up = up.load(Ordering::Relaxed),
        bytes_down = down.load(Ordering::Relaxed),
        duration_ms = activity.start.elapsed().as_millis() as u64,
        reason = reason.as_str(),
        error = error.as_ref().map(tracing::field::display),
        "CONNECT ended"
    );
    // The one line per tunnel (same field names as the UDP association's end line).
    settings.audit.write(&audit::Event::ConnectEnd {
        user,
        method: session.audit_method().to_owned(),
        source: peer.to_string(),
        target,
        remote: remote.to_string(),
        bytes_up: up.load(Ordering::Relaxed),
        bytes_down: down.load(Ordering::Relaxed),
        duration_ms: activity.start.elapsed().as_millis() as u64,
        reason: reason.as_str().to_owned(),
    });
    Ok(())
}

/// A control session (method 0x81, PROTOCOL.md §2.8): frames only, no association. It
/// carries the client's DELEGATE frames; every tunnel it delegated forgets its secrets when
/// it ends.
async fn control_session(
    shared: &Shared,
    stream: Tls,
    session: Session,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let user = session.audit_user();
    // Registered before our HELLO goes out: a client that has read it may open tunnels and
    // count on them being tapped.
    let guard = shared.delegations.session(&user);
    let _active = crate::metrics::GaugeGuard::new(shared.metrics.clone(), |m| &m.control_sessions_active);
    let mut channel = Channel::open(stream, shared.settings.heartbeat, &[feature::DELEGATION]);
    let inspecting = shared.settings.audit.enabled();
    tracing::info!(%peer, user = %session.who(), inspecting, "control session open");
    let why = loop {
        tokio::select! {
            ev = channel.next() => match ev {
                Ok(Event::Hello(h)) => {
                    tracing::debug!(%peer, version = h.version, ping_ms = h.ping_interval_ms, delegation = h.has(feature::DELEGATION), "control session: client hello");
                }
                Ok(Event::Delegate { tag, secrets }) => {
                    let v = shared.delegations.delegate(&guard, &tag, secrets, inspecting);
                    shared.metrics.count_delegation(v.status);
                    if v.status != DelegateStatus::Accepted {
                        tracing::info!(%peer, user = %session.who(), target = v.target.as_deref().unwrap_or("-"), reason = v.status.name(), "delegated secrets refused");
                        shared.settings.audit.write(&audit::Event::DelegationRefused {
                            user: user.clone(),
                            source: peer.to_string(),
                            target: v.target,
                            reason: v.status.name().to_owned(),
                        });
                    }
                    match channel.send(&Frame::DelegateReply { tag, status: v.status }) {
                        Ok(()) | Err(ChannelError::Full) => {}
                        Err(e) => break e.to_string(),
                    }
                }
                // Nothing else is spoken on a control session (yet): ignored.
                Ok(_) => {}
                Err(ChannelError::Closed) => break "control connection closed".to_owned(),
                Err(e) => break e.to_string(),
            },
            _ = shutdown.changed() => break "gateway shutting down".to_owned(),
        }
    };
    // Secrets go before anything else: each tunnel this session delegated is told now.
    drop(guard);
    tracing::info!(%peer, user = %session.who(), reason = %why, "control session closed");
    channel.close().await;
    Ok(())
}

/// Why a CONNECT tunnel ended, as its end line says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TunnelEnd {
    /// Both sides closed their direction (EOF each way).
    Eof,
    /// No byte either way for `connect_idle_timeout`.
    Idle,
    /// A read or write failed on either side (a reset, a TLS error).
    Error,
    /// The gateway shut down and the tunnel was still open after [`super::CONNECT_DRAIN`].
    Shutdown,
    /// An end-to-end tunnel reached `e2e_ttl`: closed cleanly.
    E2eTtl,
}

impl TunnelEnd {
    fn as_str(self) -> &'static str {
        match self {
            TunnelEnd::Eof => "eof",
            TunnelEnd::Idle => "idle_timeout",
            TunnelEnd::Error => "error",
            TunnelEnd::Shutdown => "shutdown",
            TunnelEnd::E2eTtl => "e2e_ttl",
        }
    }
}

/// When bytes last moved on a CONNECT tunnel, either way.
struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last read that returned bytes.
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// `io`, recording each read that returns bytes, and handing a copy of them to `tap`.
    fn watch<S>(&self, io: S, tap: Option<(TapTx, Dir)>) -> Watched<S> {
        Watched {
            io,
            start: self.start,
            last_ms: self.last_ms.clone(),
            read: Arc::new(AtomicU64::new(0)),
            tap,
        }
    }

    /// Completes once no byte has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let until = last + idle;
            if Instant::now() >= until {
                return;
            }
            tokio::time::sleep_until(until).await;
        }
    }
}

/// A stream whose reads are recorded in an [`Activity`]. Every byte written was read from the
/// other stream first, so reads alone tell when the tunnel moved.
struct Watched<S> {
    io: S,
    start: Instant,
    last_ms: Arc<AtomicU64>,
    /// Bytes read from `io`: what it sent into the tunnel. Shared, so that it can still be
    /// read when the copy ended in an error (which reports no totals).
    read: Arc<AtomicU64>,
    /// Delegated inspection: a copy of each read, for the inspector. Queued, never waited
    /// for: the bytes themselves go on unchanged and undelayed.
    tap: Option<(TapTx, Dir)>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last_ms.fetch_max(ms, Ordering::Relaxed);
            self.read.fetch_add(n as u64, Ordering::Relaxed);
            if let Some((tap, dir)) = &self.tap {
                tap.copy(*dir, &buf.filled()[before..]);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves a REATTACH (PROTOCOL.md §2.7): claims association `assoc` in the store for the
/// identity this connection authenticated, derives the keys of its new epoch from this
/// connection's exporter (§3.1), and opens it in the relay in place of any copy this node
/// still serves. The caller swaps it in for the association the connection opened.
async fn reattach(
    shared: &Shared,
    channel: &Channel<Tls>,
    session: &Session,
    peer: SocketAddr,
    assoc: AssociationId,
    port: u16,
    ttl: Duration,
) -> Result<(crate::gateway::relay::AssociationHandle, moves::Held), RefuseReason> {
    let owner = session.user.as_deref().ok_or(RefuseReason::Anonymous)?;
    let store = &*shared.settings.store;
    let held = moves::Held::claim(store, assoc, owner, moves::node_id(), ttl).await?;
    let (suite, epoch) = (held.record.suite, held.record.epoch);
    let keys = channel
        .with_stream(|s| crate::tls::export_epoch_keys(s.get_ref().1, assoc, suite, epoch))
        .map_err(|e| {
            tracing::warn!(%peer, assoc = %assoc, error = %e, "re-attach: no keys from the exporter");
            RefuseReason::Busy
        })?;
    let relay = &shared.relay;
    let here = relay.supersede(assoc);
    let port = (port != 0).then_some(port);
    let handle = relay
        .open_secure(assoc, &keys, peer.ip(), port, session.user.clone())
        .map_err(|e| {
            tracing::warn!(%peer, assoc = %assoc, error = %e, "re-attach: cannot open the association");
            RefuseReason::Busy
        })?;
    shared.metrics.reattached.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        %peer,
        assoc = %assoc,
        user = %session.who(),
        epoch,
        from = if here { "this node" } else { "another node or an ended connection" },
        "association re-attached"
    );
    Ok((handle, held))
}

async fn udp_associate(
    shared: &Shared,
    proto: Socks5ServerProtocol<Tls, fast_socks5::server::states::CommandRead>,
    target: TargetAddr,
    session: Session,
    peer: SocketAddr,
    local: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let relay = &shared.relay;
    // The port the client says it will send from, if it says one (PROTOCOL.md §2.3).
    let port = match target {
        TargetAddr::Ip(a) if a.port() != 0 => Some(a.port()),
        _ => None,
    };
    let opened = match &session.secure {
        Some((id, keys)) => relay.open_secure(*id, keys, peer.ip(), port, session.user.clone()),
        None => relay.open_naked(peer.ip(), port, session.user.clone()),
    };
    let handle = match opened {
        Ok(h) => h,
        // `naked_require_port`: a rule refuses it, RFC 1928's 0x02.
        Err(AssocError::PortRequired) => return refuse(proto, Refusal::Policy).await,
        Err(e) => return refuse(proto, Refusal::Association(e.to_string())).await,
    };
    let relay_addr = relay.local_addr();
    let bnd_ip = shared
        .settings
        .advertise
        .or_else(|| (!relay_addr.ip().is_unspecified()).then_some(relay_addr.ip()))
        .unwrap_or(local.ip());
    let mut stream = proto
        .reply_success(SocketAddr::new(bnd_ip, relay_addr.port()))
        .await?;
    tracing::info!(%peer, assoc = %handle.id(), secure = session.secure.is_some(), user = %session.who(), "UDP association open");

    let idle = shared.settings.idle_timeout;
    let mut tick = tokio::time::interval(idle.min(Duration::from_secs(1)).max(Duration::from_millis(50)));
    if let Some((_, keys)) = &session.secure {
        let suite = keys.c2g.suite();
        let store = shared.settings.store.clone();
        let ttl = moves::record_ttl(idle);
        // A secure association's control connection carries frames (PROTOCOL.md §2.4).
        let mut channel = Channel::open(
            stream,
            shared.settings.heartbeat,
            &[feature::RECORDS, feature::REATTACH, feature::ASSOCIATIONS],
        );
        handle.attach_tls(channel.sender());
        let first = Member::announce(shared, &session, handle, suite, ttl).await;
        // Every association this connection carries: its own, those it OPENed and those
        // re-attached to it (PROTOCOL.md §2.9); one only without feature ASSOCIATIONS.
        let mut members = vec![first];
        let mut reattached = false;
        let why = loop {
            // Whether both HELLOs listed ASSOCIATIONS (ours always does).
            let multi = channel.peer().is_some_and(|h| h.has(feature::ASSOCIATIONS));
            tokio::select! {
                ev = channel.next() => match ev {
                    Ok(Event::Hello(h)) => {
                        tracing::debug!(%peer, version = h.version, ping_ms = h.ping_interval_ms, "control channel: client hello");
                    }
                    Ok(Event::Reattach { assoc, port }) => {
                        let claimed = if members.iter().any(|m| m.handle.id() == assoc) || (reattached && !multi) {
                            Err(RefuseReason::AlreadyAttached)
                        } else if members.len() >= MAX_PER_CONNECTION {
                            Err(RefuseReason::Busy)
                        } else {
                            reattach(shared, &channel, &session, peer, assoc, port, ttl).await
                        };
                        match claimed {
                            Ok((new, new_held)) => {
                                new.attach_tls(channel.sender());
                                let epoch = new_held.record.epoch;
                                if !multi {
                                    // The association this connection opened gives way to
                                    // the re-attached one, whose id the client keeps (§2.7).
                                    for old in members.drain(..) {
                                        old.handle.detach_tls();
                                        if let Some(h) = &old.held {
                                            h.release(&*store).await;
                                        }
                                    }
                                }
                                members.push(Member::new(new, Some(new_held), epoch));
                                reattached = true;
                                let _ = channel.send(&Frame::Reattached { assoc, epoch });
                            }
                            Err(reason) => {
                                shared.metrics.count_reattach_refused(reason);
                                tracing::info!(%peer, assoc = %assoc, user = %session.who(), reason = reason.name(), "re-attach refused");
                                let _ = channel.send(&Frame::ReattachRefused { assoc, reason });
                            }
                        }
                    }
                    // Only with the feature both listed (the channel skips it when we did not).
                    Ok(Event::Open { req, port }) if multi => {
                        match open_more(shared, &channel, &session, peer, port, suite, members.len(), ttl).await {
                            Ok(m) => {
                                let assoc = m.handle.id();
                                members.push(m);
                                let _ = channel.send(&Frame::Opened { req, status: OpenStatus::Opened, assoc });
                            }
                            Err(status) => {
                                shared.metrics.count_open_refused(status);
                                let _ = channel.send(&Frame::Opened { req, status, assoc: AssociationId(0) });
                            }
                        }
                    }
                    // A client releases one of this connection's associations (feature
                    // ASSOCIATIONS); without the feature a gateway ignores a client's CLOSE.
                    Ok(Event::Close { assoc, .. }) if multi => {
                        if let Some(i) = members.iter().position(|m| m.handle.id() == assoc) {
                            let m = members.swap_remove(i);
                            shared.metrics.released.fetch_add(1, Ordering::Relaxed);
                            m.finish(shared, &session, peer, &channel, Some(CloseReason::Released), "released by the client").await;
                            if members.is_empty() {
                                break (None, "the client released its last association".to_owned());
                            }
                        }
                    }
                    // Only the gateway answers re-attaches and OPENs; such frames from a
                    // client are ignored, as an OPEN or CLOSE without the feature.
                    Ok(Event::Open { .. } | Event::Opened { .. } | Event::Close { .. } | Event::Reattached { .. } | Event::ReattachRefused { .. }) => {}
                    // Delegation frames travel on control sessions only (PROTOCOL.md §2.8).
                    Ok(Event::Delegate { .. } | Event::DelegateReply { .. }) => {}
                    Ok(Event::Record(mut record)) => {
                        // The association the record names, if this connection carries it;
                        // otherwise any member's handle counts it `foreign_source`.
                        let id = record.get(ASSOC_OFFSET..ASSOC_OFFSET + 8);
                        let m = members
                            .iter()
                            .find(|m| id == Some(&m.handle.id().to_bytes()[..]))
                            .unwrap_or(&members[0]);
                        m.handle.receive_tls_record(&mut record);
                    }
                    Err(ChannelError::Closed) => break (None, "control connection closed".to_owned()),
                    Err(e) => break (None, e.to_string()),
                },
                _ = tick.tick() => {
                    let mut i = 0;
                    while i < members.len() {
                        match members[i].due_end(shared, idle).await {
                            Some((reason, text)) => {
                                let m = members.swap_remove(i);
                                m.finish(shared, &session, peer, &channel, Some(reason), &text).await;
                            }
                            None => i += 1,
                        }
                    }
                    if members.is_empty() {
                        break (None, "no association left".to_owned());
                    }
                }
                _ = shutdown.changed() => break (Some(CloseReason::Shutdown), "gateway shutting down".to_owned()),
            }
        };
        for m in members {
            m.finish(shared, &session, peer, &channel, why.0, &why.1).await;
        }
        channel.close().await;
    } else {
        let opened_at = std::time::Instant::now();
        let mut scratch = [0u8; 512];
        let why = loop {
            tokio::select! {
                r = stream.read(&mut scratch) => match r {
                    Ok(0) | Err(_) => break "control connection closed".to_owned(),
                    // RFC 1928 leaves the control connection idle; bytes on it are ignored.
                    Ok(_) => continue,
                },
                _ = tick.tick() => {
                    if let Some(dest) = handle.unreachable() {
                        break format!("end-to-end destination {dest} unreachable");
                    }
                    if handle.idle_for() >= idle {
                        break "idle timeout".to_owned();
                    }
                }
                _ = shutdown.changed() => break "gateway shutting down".to_owned(),
            }
        };
        let _ = stream.shutdown().await;
        log_end(shared, &session, peer, &handle, opened_at, 0, &why);
    }
    Ok(())
}

/// Most associations one control connection carries (its own, those it OPENed and those
/// re-attached to it, PROTOCOL.md §2.9): a bound on what one authenticated peer makes the
/// gateway hold per connection; `max_associations` bounds the gateway's total.
pub const MAX_PER_CONNECTION: usize = 1024;

/// One association a secure control connection carries.
struct Member {
    handle: AssociationHandle,
    /// Its record in the store (associations with an owner), for re-attaching.
    held: Option<moves::Held>,
    /// 0, or the epoch it was re-attached under.
    epoch: u32,
    opened_at: std::time::Instant,
    /// When its store record was last checked for a move to another node.
    last_check: std::time::Instant,
}

impl Member {
    fn new(handle: AssociationHandle, held: Option<moves::Held>, epoch: u32) -> Member {
        let now = std::time::Instant::now();
        Member {
            handle,
            held,
            epoch,
            opened_at: now,
            last_check: now,
        }
    }

    /// A new association (epoch 0); one with an owner gets a record in the store, so that
    /// the owner can re-attach it to another connection, here or on another node (§2.7).
    async fn announce(
        shared: &Shared,
        session: &Session,
        handle: AssociationHandle,
        suite: crate::proto::CipherSuite,
        ttl: Duration,
    ) -> Member {
        let held = match &session.user {
            Some(owner) => {
                let record = moves::AssocRecord::new(suite, moves::node_id(), owner);
                moves::Held::announce(&*shared.settings.store, handle.id(), record, ttl).await
            }
            None => None,
        };
        Member::new(handle, held, 0)
    }

    /// Whether the association must end now, with the CLOSE reason and a log text.
    async fn due_end(&mut self, shared: &Shared, idle: Duration) -> Option<(CloseReason, String)> {
        let h = &self.handle;
        if let Some(dest) = h.unreachable() {
            return Some((
                CloseReason::Unreachable,
                format!("end-to-end destination {dest} unreachable"),
            ));
        }
        if h.is_superseded() {
            return Some((CloseReason::Moved, "re-attached to another connection".to_owned()));
        }
        if h.idle_for() >= idle {
            return Some((CloseReason::Idle, "idle timeout".to_owned()));
        }
        if h.is_dead() {
            return Some((CloseReason::KeyExhausted, "sending key exhausted".to_owned()));
        }
        if let Some(held) = self
            .held
            .as_mut()
            .filter(|_| self.last_check.elapsed() >= moves::CHECK_EVERY)
        {
            self.last_check = std::time::Instant::now();
            if held.check(&*shared.settings.store).await == moves::Standing::Moved {
                // Another node re-attached it: this copy ends (its client moved on; records
                // of our epoch fail there).
                self.held = None;
                shared.metrics.moved_away.fetch_add(1, Ordering::Relaxed);
                return Some((CloseReason::Moved, "re-attached on another node".to_owned()));
            }
        }
        None
    }

    /// Ends the association: its store record goes if it ended for good, a framing client
    /// is told with CLOSE (`reason`; not for one the client released), and the end is logged
    /// and audited.
    async fn finish(
        mut self,
        shared: &Shared,
        session: &Session,
        peer: SocketAddr,
        channel: &Channel<Tls>,
        reason: Option<CloseReason>,
        why: &str,
    ) {
        if self.handle.is_superseded() {
            shared.metrics.moved_away.fetch_add(1, Ordering::Relaxed);
            self.held = None;
        }
        // The record goes with an association that ended for good; one whose connection
        // broke stays (until its TTL) so that its owner can re-attach it.
        if matches!(
            reason,
            Some(CloseReason::Idle | CloseReason::KeyExhausted | CloseReason::Released)
        ) {
            if let Some(h) = &self.held {
                h.release(&*shared.settings.store).await;
            }
        }
        if let Some(reason) = reason.filter(|r| *r != CloseReason::Released) {
            let _ = channel.send(&Frame::Close {
                assoc: self.handle.id(),
                reason,
            });
        }
        // The association's reply path holds a sender of the channel: let go of it, so the
        // writer ends as soon as what is queued is written.
        self.handle.detach_tls();
        log_end(
            shared,
            session,
            peer,
            &self.handle,
            self.opened_at,
            self.epoch,
            why,
        );
    }
}

/// Serves an OPEN (PROTOCOL.md §2.9): one more association for this connection's identity
/// and suite, its keys from this connection's exporter with its own id (§3.1, epoch 0).
#[allow(clippy::too_many_arguments)]
async fn open_more(
    shared: &Shared,
    channel: &Channel<Tls>,
    session: &Session,
    peer: SocketAddr,
    port: u16,
    suite: crate::proto::CipherSuite,
    carried: usize,
    ttl: Duration,
) -> Result<Member, OpenStatus> {
    if carried >= MAX_PER_CONNECTION {
        return Err(OpenStatus::Limit);
    }
    let relay = &shared.relay;
    let id = relay.new_assoc_id();
    let keys = channel
        .with_stream(|s| crate::tls::export_keys(s.get_ref().1, id, suite))
        .map_err(|e| {
            tracing::warn!(%peer, error = %e, "OPEN: no keys from the exporter");
            OpenStatus::Failed
        })?;
    let port = (port != 0).then_some(port);
    let handle = relay
        .open_secure(id, &keys, peer.ip(), port, session.user.clone())
        .map_err(|e| match e {
            AssocError::Limit(_) => OpenStatus::Limit,
            e => {
                tracing::warn!(%peer, error = %e, "OPEN: cannot open the association");
                OpenStatus::Failed
            }
        })?;
    drop(keys);
    handle.attach_tls(channel.sender());
    shared.metrics.opened_shared.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%peer, assoc = %id, secure = true, shared = true, user = %session.who(), "UDP association open");
    Ok(Member::announce(shared, session, handle, suite, ttl).await)
}

/// The one line (and audit event) per association at its end (the same field names as
/// the CONNECT end line).
fn log_end(
    shared: &Shared,
    session: &Session,
    peer: SocketAddr,
    handle: &AssociationHandle,
    opened_at: std::time::Instant,
    epoch: u32,
    why: &str,
) {
    let stats = handle.stats();
    tracing::info!(
        user = %session.who(),
        source = %peer,
        assoc = %handle.id(),
        secure = session.secure.is_some(),
        targets = handle.destinations(),
        datagrams_up = stats.datagrams_up.load(Ordering::Relaxed),
        bytes_up = stats.bytes_up.load(Ordering::Relaxed),
        datagrams_down = stats.datagrams_down.load(Ordering::Relaxed),
        bytes_down = stats.bytes_down.load(Ordering::Relaxed),
        duration_ms = opened_at.elapsed().as_millis() as u64,
        epoch,
        reason = %why,
        "UDP association closed"
    );
    shared.settings.audit.write(&audit::Event::AssociationEnd {
        user: session.audit_user(),
        method: session.audit_method().to_owned(),
        source: peer.to_string(),
        assoc: handle.id().to_string(),
        secure: session.secure.is_some(),
        targets: handle.destination_list(),
        datagrams_up: stats.datagrams_up.load(Ordering::Relaxed),
        bytes_up: stats.bytes_up.load(Ordering::Relaxed),
        datagrams_down: stats.datagrams_down.load(Ordering::Relaxed),
        bytes_down: stats.bytes_down.load(Ordering::Relaxed),
        duration_ms: opened_at.elapsed().as_millis() as u64,
        epoch,
        reason: why.to_owned(),
    });
}
