//! One control connection: TLS, SOCKS5 method negotiation (no-auth, RFC 1929
//! username/password, mTLS identity, the sudp method 0x80), then one command.
//!
//! The SOCKS5 flow runs on fast-socks5's server protocol API over the TLS stream. Its
//! `AuthMethod` trait lets us add our own methods; the sub-negotiations themselves are
//! parsed by the sans-IO codecs in [`crate::proto::socks`], read byte-exactly so that
//! nothing the client pipelined after them is swallowed.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fast_socks5::server::{AuthMethod, AuthMethodSuccessState, Socks5ServerProtocol};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use crate::gateway::Shared;
use crate::net::canonical;
use crate::proto::socks::{self, choose_suite, method, sudp_status, SudpAccept, SudpHello};
use crate::proto::{AssociationId, KeySchedule, SocksError};

/// Largest sub-negotiation message we read (sudp hello with 16 suites and full credentials).
const MAX_SUBNEG: usize = 2 + socks::MAX_SUITES + 1 + 255 + 1 + 255;

/// Why a command was refused; [`reply_for`] maps each to its RFC 1928 reply code.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Destination refused by policy.
    #[error("destination not allowed by policy")]
    Policy,
    /// Name did not resolve.
    #[error("cannot resolve {0}")]
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
    UserPass,
    Sudp,
}

impl<T> AuthMethod<T> for Method {
    type StartingState = (Method, T);

    fn method_id(self) -> u8 {
        match self {
            Method::NoAuth => method::NO_AUTH,
            Method::UserPass => method::USERPASS,
            Method::Sudp => method::SUDP,
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
    user: Option<String>,
    secure: Option<(AssociationId, KeySchedule)>,
}

type Tls = TlsStream<TcpStream>;

/// Serves one accepted TCP connection until it closes, the association idles out or the
/// gateway shuts down.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let peer = canonical(peer);
    let local = match tcp.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let _ = tcp.set_nodelay(true);
    let hs = shared.settings.handshake_timeout;
    let tls = match tokio::time::timeout(hs, shared.acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            return;
        }
    };
    // Full or resumed (with a shared store, possibly a session another node issued).
    shared.metrics.count_handshake(tls.get_ref().1.handshake_kind());
    let identity = crate::tls::peer_identity(tls.get_ref().1);
    let negotiated = tokio::time::timeout(hs, negotiate(&shared, tls, identity, peer)).await;
    let (proto, cmd, target, session) = match negotiated {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "SOCKS5 negotiation failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "SOCKS5 negotiation timed out");
            return;
        }
    };
    let result = match cmd {
        Socks5Command::TCPConnect => connect(&shared, proto, target, &session).await,
        Socks5Command::UDPAssociate => {
            udp_associate(&shared, proto, target, session, peer, local, shutdown).await
        }
        Socks5Command::TCPBind => refuse(proto, Refusal::Unsupported).await,
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "control connection ended");
    }
}

type Ready = (
    Socks5ServerProtocol<Tls, fast_socks5::server::states::CommandRead>,
    Socks5Command,
    TargetAddr,
    Session,
);

/// Method negotiation, authentication and the command request. `Ok(None)`: the client was
/// refused and answered; nothing more to do.
async fn negotiate(
    shared: &Shared,
    tls: Tls,
    identity: Option<String>,
    peer: SocketAddr,
) -> anyhow::Result<Option<Ready>> {
    let auth = &shared.settings.auth;
    let mut offered = vec![Method::Sudp];
    if auth.users.is_some() {
        offered.push(Method::UserPass);
    }
    if auth.no_auth || identity.is_some() {
        offered.push(Method::NoAuth);
    }
    let (method, mut stream) = Socks5ServerProtocol::start(tls).negotiate_auth(&offered).await?;
    let mut session = Session {
        user: identity.clone(),
        secure: None,
    };
    match method {
        Method::NoAuth => {}
        Method::UserPass => {
            let msg = read_message(&mut stream, |b| socks::parse_userpass(b).map(|(_, n)| n)).await?;
            let ((user, pass), _) = socks::parse_userpass(&msg)?;
            let ok = verify(shared, user, pass).await;
            if !ok {
                shared.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, user = %String::from_utf8_lossy(user), "username/password rejected");
                stream.write_all(&[socks::USERPASS_VERSION, 0x01]).await?;
                stream.shutdown().await?;
                return Ok(None);
            }
            stream.write_all(&[socks::USERPASS_VERSION, 0x00]).await?;
            session.user = Some(String::from_utf8_lossy(user).into_owned());
        }
        Method::Sudp => {
            let msg = read_message(&mut stream, |b| SudpHello::parse(b).map(|(_, n)| n)).await?;
            let (hello, _) = SudpHello::parse(&msg)?;
            let authed = if hello.user.is_empty() {
                auth.no_auth || identity.is_some()
            } else {
                auth.users.is_some() && verify(shared, hello.user, hello.pass).await
            };
            if !authed {
                shared.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, user = %String::from_utf8_lossy(hello.user), "sudp authentication rejected");
                stream
                    .write_all(&SudpAccept::refuse(sudp_status::AUTH_FAILED).encode())
                    .await?;
                stream.shutdown().await?;
                return Ok(None);
            }
            let Some(suite) = choose_suite(hello.suites, &shared.settings.suites) else {
                tracing::info!(%peer, offered = ?hello.suites, "no acceptable cipher suite");
                stream
                    .write_all(&SudpAccept::refuse(sudp_status::NO_SUITE).encode())
                    .await?;
                stream.shutdown().await?;
                return Ok(None);
            };
            if !hello.user.is_empty() {
                session.user = Some(String::from_utf8_lossy(hello.user).into_owned());
            }
            let id = shared.relay.new_assoc_id();
            let keys = crate::tls::export_keys(stream.get_ref().1, id, suite)?;
            stream.write_all(&SudpAccept::ok(suite, id).encode()).await?;
            session.secure = Some((id, keys));
        }
    }
    let proto = Socks5ServerProtocol::finish_auth(Authenticated(stream));
    let (proto, cmd, target) = proto.read_command().await?;
    Ok(Some((proto, cmd, target, session)))
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

/// Checks credentials off the async threads (argon2 is deliberately slow).
async fn verify(shared: &Shared, user: &[u8], pass: &[u8]) -> bool {
    let Some(users) = shared.settings.auth.users.clone() else {
        return false;
    };
    let (user, pass) = (user.to_vec(), zeroize::Zeroizing::new(pass.to_vec()));
    tokio::task::spawn_blocking(move || users.verify(&user, &pass))
        .await
        .unwrap_or(false)
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
) -> anyhow::Result<()> {
    let candidates = match &target {
        TargetAddr::Ip(a) => vec![canonical(*a)],
        TargetAddr::Domain(name, port) => match shared.dns.resolve_all(name, *port).await {
            Ok(v) => v,
            Err(_) => return refuse(proto, Refusal::Resolve(name.clone())).await,
        },
    };
    let allowed: Vec<SocketAddr> = candidates
        .into_iter()
        .filter(|a| shared.settings.policy.check(session.user.as_deref(), *a).is_ok())
        .collect();
    if allowed.is_empty() {
        return refuse(proto, Refusal::Policy).await;
    }
    let mut last = Refusal::Timeout;
    let mut outbound = None;
    for a in allowed {
        match tokio::time::timeout(shared.settings.connect_timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                outbound = Some(s);
                break;
            }
            Ok(Err(e)) => last = Refusal::Connect(e),
            Err(_) => last = Refusal::Timeout,
        }
    }
    let Some(mut outbound) = outbound else {
        return refuse(proto, last).await;
    };
    let _ = outbound.set_nodelay(true);
    let bound = outbound.local_addr()?;
    let mut tls = proto.reply_success(bound).await?;
    // Half-close is carried through: EOF one way shuts down that direction's writer only.
    let (up, down) = tokio::io::copy_bidirectional(&mut tls, &mut outbound).await?;
    tracing::debug!(up, down, "CONNECT finished");
    Ok(())
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
    let opened = match &session.secure {
        Some((id, keys)) => relay.open_secure(*id, keys, peer.ip(), session.user.clone()),
        None => {
            // The port the client says it will send from, if it says one.
            let port = match target {
                TargetAddr::Ip(a) if a.port() != 0 => Some(a.port()),
                _ => None,
            };
            relay.open_naked(peer.ip(), port, session.user.clone())
        }
    };
    let handle = match opened {
        Ok(h) => h,
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
    tracing::info!(%peer, assoc = %handle.id(), secure = session.secure.is_some(), user = ?session.user, "UDP association open");

    let idle = shared.settings.idle_timeout;
    let mut tick = tokio::time::interval(idle.min(Duration::from_secs(1)).max(Duration::from_millis(50)));
    let mut scratch = [0u8; 512];
    let why = loop {
        tokio::select! {
            r = stream.read(&mut scratch) => match r {
                Ok(0) | Err(_) => break "control connection closed",
                // RFC 1928 leaves the control connection idle; bytes on it are ignored.
                Ok(_) => continue,
            },
            _ = tick.tick() => {
                if handle.idle_for() >= idle {
                    break "idle timeout";
                }
                if handle.is_dead() {
                    break "sending key exhausted";
                }
            }
            _ = shutdown.changed() => break "gateway shutting down",
        }
    };
    tracing::info!(%peer, assoc = %handle.id(), reason = why, "UDP association closed");
    drop(handle);
    let _ = stream.shutdown().await;
    Ok(())
}
