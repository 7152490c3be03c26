//! The client side of the secure framing, for Rust programs and for the shim.
//!
//! [`SecureUdp::connect`] opens a TLS control connection to a gateway, negotiates the sudp
//! method (0x80), asks for a UDP association and derives the keys from the TLS exporter;
//! [`SecureUdp::send_to`] and [`SecureUdp::recv_from`] then carry datagrams to and from any
//! target as secure records. [`connect_tcp`] does a SOCKS5 CONNECT through the same kind of
//! control connection.
//!
//! The receive paths also answer the gateway's PATH_CHALLENGE records (docs/PROTOCOL.md
//! §6.3) from the association's socket, so that the gateway follows the client to a new
//! port (a NAT rebinding) once it has proven it is there; control records are never
//! handed to the application.
//!
//! ```no_run
//! # async fn demo(tls: std::sync::Arc<rustls::ClientConfig>) -> anyhow::Result<()> {
//! use sudp::client::{ClientOptions, SecureUdp};
//! let opts = ClientOptions::new("127.0.0.1:8443".parse()?, "localhost", tls);
//! let udp = SecureUdp::connect(&opts).await?;
//! udp.send_to(b"ping", &"127.0.0.1:7".parse::<std::net::SocketAddr>()?.into()).await?;
//! let mut buf = vec![0u8; 65_536];
//! let (n, from) = udp.recv_from(&mut buf).await?;
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::metrics::Metrics;
use crate::net::batch::{stretches, BatchSocket, RecvBatch, RUN};
use crate::net::channel::{Channel, ChannelError, Event, FrameSender, Heartbeat};
use crate::net::{canonical, DATAGRAM_BUF};
use crate::proto::frame::{feature, CloseReason, Frame, RefuseReason};
use crate::proto::path::ControlMessage;
use crate::proto::path::TOKEN_LEN;
use crate::proto::record::{record_len, PREFIX_LEN};
use crate::proto::session::{Content, RecvSession, SendSession};
use crate::proto::socks::{
    self, method, sudp_status, AddrRef, Address, Command, ReplyCode, SudpAccept, SudpHello,
};
use crate::proto::{AssociationId, CipherSuite, OpenError, Role, SealError, SocksError};
use crate::tls::HandshakeProblem;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

mod mux;
mod trunk;
pub use trunk::Trunk;
use trunk::{Denied, Granted, RouteEnds};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket or TLS failure.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The gateway spoke something we cannot parse.
    #[error("protocol: {0}")]
    Protocol(#[from] SocksError),
    /// The gateway accepted none of our methods.
    #[error(
        "the gateway accepted none of the offered authentication methods: it may want a user \
         and password (--user, --password-file) or a client certificate (--cert, --key)"
    )]
    NoAcceptableMethod,
    /// Credentials refused.
    #[error(
        "authentication failed: the gateway refused the user name or password (check --user \
         and --password-file against the gateway's users file)"
    )]
    AuthFailed,
    /// GSS-API (`--gssapi`) could not authenticate: no ticket, the gateway refused it, or
    /// the gateway does not offer GSS-API.
    #[error("GSS-API authentication failed: {0}")]
    Gssapi(String),
    /// No common cipher suite.
    #[error("no cipher suite in common with the gateway")]
    NoSuite,
    /// The gateway did not check the credentials now (its verification queue is full):
    /// retry after a backoff, or another gateway.
    #[error("the gateway is too busy to check credentials now (SudpAccept BUSY): retrying")]
    Busy,
    /// The gateway refused the request with a SOCKS5 reply code.
    #[error("request refused: {0:?}")]
    Refused(ReplyCode),
    /// Key export failed.
    #[error("TLS key export: {0}")]
    Keys(String),
    /// Timed out.
    #[error("timed out")]
    Timeout,
    /// A datagram could not be sealed.
    #[error("seal: {0}")]
    Seal(#[from] SealError),
    /// `transport = "tls"` but the gateway does not carry records inside TLS.
    #[error("the gateway cannot carry records inside TLS (transport \"tls\"); use \"auto\" or \"udp\"")]
    NoTlsTransport,
    /// A shared control connection did not give the association asked for (OPEN refused,
    /// the connection ended, no answer in time): another connection may.
    #[error("shared control connection: {0}")]
    Trunk(String),
    /// The TLS connection failed for a reason the operator can fix: a certificate refused
    /// either way, or a peer that does not speak TLS. The message says what to check.
    #[error("{}", tls_advice(problem, server_name, trust.as_deref()))]
    Tls {
        /// What went wrong.
        problem: HandshakeProblem,
        /// The name the gateway's certificate was checked against.
        server_name: String,
        /// How the client trusts the gateway, as configured (`--ca FILE`, `--pin HEX`),
        /// for the message; `None`: said generically.
        trust: Option<String>,
    },
}

/// The plain-words message of [`ClientError::Tls`].
fn tls_advice(problem: &HandshakeProblem, server_name: &str, trust: Option<&str>) -> String {
    match problem {
        HandshakeProblem::UntrustedIssuer => format!(
            "the gateway's certificate is not signed by the CA in {}: check that it names the CA \
             that issued the gateway's certificate (for `sudp cert`, the ca.pem written with it)",
            trust.unwrap_or("--ca")
        ),
        HandshakeProblem::PinMismatch => format!(
            "the gateway's certificate does not match {}: the pin is the SHA-256 of the \
             gateway's certificate (`sudp cert` prints it); a renewed certificate needs the new pin",
            trust.unwrap_or("--pin")
        ),
        HandshakeProblem::NameMismatch => format!(
            "the gateway's certificate is not valid for the name \"{server_name}\": set \
             --server-name to a name the certificate carries (`sudp cert`'s: localhost, 127.0.0.1, ::1)"
        ),
        HandshakeProblem::Expired => {
            "the gateway's certificate has expired: renew it, or check this machine's clock".to_owned()
        }
        HandshakeProblem::NotYetValid => {
            "the gateway's certificate is not valid yet: check this machine's clock".to_owned()
        }
        HandshakeProblem::OtherCertificate(why) => format!("the gateway's certificate was refused: {why}"),
        HandshakeProblem::ClientCertRefused(alert) => format!(
            "the gateway refused this client's certificate or wants one ({alert}): check --cert and \
             --key, and that the gateway's --client-ca signed the certificate"
        ),
        HandshakeProblem::NotTls(what) => format!(
            "the gateway's address did not answer with TLS ({what}): is it the gateway's TLS control \
             port (its --listen), not its UDP relay port, a plain SOCKS5 server or another service?"
        ),
    }
}

impl ClientError {
    /// The RFC 1928 reply code a SOCKS5 server relaying for a local application answers
    /// with when this error ends its request: the gateway's own code when it refused, else
    /// the closest general code. The one place the client side maps errors to reply codes.
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            ClientError::Refused(code) => *code,
            ClientError::Timeout => ReplyCode::TtlExpired,
            ClientError::AuthFailed | ClientError::NoAcceptableMethod | ClientError::Gssapi(_) => {
                ReplyCode::NotAllowed
            }
            // Socket errors here are the gateway's, not the target's (the gateway reports
            // the target's with a reply code): not "connection refused" to the application.
            ClientError::Io(_)
            | ClientError::Protocol(_)
            | ClientError::NoSuite
            | ClientError::Busy
            | ClientError::Tls { .. }
            | ClientError::Keys(_)
            | ClientError::NoTlsTransport
            | ClientError::Trunk(_)
            | ClientError::Seal(_) => ReplyCode::GeneralFailure,
        }
    }

    /// True when the error says the gateway itself (not the target) is unreachable or broke
    /// the protocol, so that another gateway of a list may do better.
    pub fn is_gateway_failure(&self) -> bool {
        !matches!(self, ClientError::Refused(_)) && !self.is_permanent()
    }

    /// True when retrying cannot help until someone changes a configuration: the gateway
    /// refused the credentials or wants others, no suite in common, or a certificate was
    /// refused (either way). A client should report it and stop, not retry in a loop.
    pub fn is_permanent(&self) -> bool {
        match self {
            ClientError::AuthFailed | ClientError::NoAcceptableMethod | ClientError::NoSuite => true,
            ClientError::Tls { problem, .. } => problem.is_certificate(),
            _ => false,
        }
    }

    /// A copy of a permanent error (see [`ClientError::is_permanent`]), to answer later
    /// requests with without asking the gateway again; `None` for any other error.
    pub fn permanent_copy(&self) -> Option<ClientError> {
        if !self.is_permanent() {
            return None;
        }
        Some(match self {
            ClientError::AuthFailed => ClientError::AuthFailed,
            ClientError::NoAcceptableMethod => ClientError::NoAcceptableMethod,
            ClientError::NoSuite => ClientError::NoSuite,
            ClientError::Tls {
                problem,
                server_name,
                trust,
            } => ClientError::Tls {
                problem: problem.clone(),
                server_name: server_name.clone(),
                trust: trust.clone(),
            },
            _ => return None,
        })
    }

    /// The same error with `trust` (how the client trusts the gateway, e.g. `--ca FILE`)
    /// named in a certificate message.
    pub fn with_trust(self, trust: &str) -> ClientError {
        match self {
            ClientError::Tls {
                problem, server_name, ..
            } => ClientError::Tls {
                problem,
                server_name,
                trust: Some(trust.to_owned()),
            },
            other => other,
        }
    }

    /// An I/O error of the control connection to `server_name`, with what its TLS layer
    /// said turned into advice where it can be ([`crate::tls::handshake_problem`]).
    fn from_tls_io(e: io::Error, server_name: &str) -> ClientError {
        match crate::tls::handshake_problem(&e) {
            Some(problem) => ClientError::Tls {
                problem,
                server_name: server_name.to_owned(),
                trust: None,
            },
            None => ClientError::Io(e),
        }
    }

    /// [`ClientError::from_tls_io`] for an error of any stage of a control connection.
    pub(crate) fn explained(self, server_name: &str) -> ClientError {
        match self {
            ClientError::Io(e) => ClientError::from_tls_io(e, server_name),
            other => other,
        }
    }
}

/// How to reach and authenticate to a gateway.
#[derive(Clone)]
pub struct ClientOptions {
    /// Gateway control address.
    pub gateway: SocketAddr,
    /// Name to verify the gateway certificate against (SNI).
    pub server_name: String,
    /// TLS client configuration (trust, client certificate).
    pub tls: Arc<rustls::ClientConfig>,
    /// Username and password, if the gateway wants them.
    pub credentials: Option<(String, String)>,
    /// Authenticate with GSS-API (SOCKS5 method 0x01, RFC 1961) to this service principal
    /// (e.g. `socks/gw.example.com`), with the user's tickets (`KRB5CCNAME`): CONNECT, and
    /// secure UDP through GSS-API's "secure UDP" level then a credential-less hello
    /// (PROTOCOL.md §2.6). Needs the `kerberos` feature.
    pub gssapi: Option<String>,
    /// Suites to offer, preferred first.
    pub suites: Vec<CipherSuite>,
    /// Limit on connecting and negotiating.
    pub timeout: Duration,
    /// Replay window size for records from the gateway.
    pub replay_window: usize,
    /// PINGs on the control connection, and the silence after which a gateway that said
    /// HELLO is taken for gone (PROTOCOL.md §2.4).
    pub heartbeat: Heartbeat,
    /// How records travel: UDP, inside TLS, or UDP with TLS when UDP is blocked.
    pub transport: Transport,
}

/// How an association's records travel between client and gateway (PROTOCOL.md §6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// UDP only.
    Udp,
    /// Inside the TLS control connection only (RECORD frames).
    Tls,
    /// UDP while UDP works both ways (PROBE/PROBE_ACK), inside TLS while it does not.
    #[default]
    Auto,
}

impl Transport {
    /// Parses `udp`, `tls` or `auto`.
    pub fn parse(s: &str) -> Option<Transport> {
        match s.trim() {
            "udp" => Some(Transport::Udp),
            "tls" => Some(Transport::Tls),
            "auto" => Some(Transport::Auto),
            _ => None,
        }
    }

    /// The name [`Transport::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tls => "tls",
            Transport::Auto => "auto",
        }
    }
}

/// How often an `auto` association probes UDP while it sends (a PROBE at most this often).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Time an association waits for the answer to its first PROBE before it carries records
/// inside TLS, per try; three tries.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(150);
/// Unanswered probing time after which UDP counts as blocked mid-stream.
pub const PROBE_SILENCE: Duration = Duration::from_secs(3);

/// The client's heartbeat: a PING every 500 ms, a gateway silent for 1.5 s is gone, so a
/// frozen or partitioned gateway is noticed within 2 s (live video cannot wait longer).
pub const DEFAULT_HEARTBEAT: Heartbeat = Heartbeat {
    interval: Duration::from_millis(500),
    timeout: Duration::from_millis(1500),
};

impl ClientOptions {
    /// Options with defaults: no credentials, both suites, 10 s timeout, window 1024,
    /// [`DEFAULT_HEARTBEAT`].
    pub fn new(gateway: SocketAddr, server_name: &str, tls: Arc<rustls::ClientConfig>) -> Self {
        ClientOptions {
            gateway,
            server_name: server_name.to_owned(),
            tls,
            credentials: None,
            gssapi: None,
            suites: CipherSuite::ALL.to_vec(),
            timeout: Duration::from_secs(10),
            replay_window: crate::proto::replay::DEFAULT_WINDOW,
            heartbeat: DEFAULT_HEARTBEAT,
            transport: Transport::Auto,
        }
    }
}

/// The control connection type.
pub type Control = TlsStream<TcpStream>;

/// Idle time before TCP keepalive probes start on a control connection.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes after which the connection is dead (where the OS lets us set it).
pub const KEEPALIVE_RETRIES: u32 = 3;

/// Opens the TLS control connection.
pub async fn connect_tls(opts: &ClientOptions) -> Result<Control, ClientError> {
    let name = ServerName::try_from(opts.server_name.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let tcp = TcpStream::connect(opts.gateway).await?;
    let _ = tcp.set_nodelay(true);
    // A gateway that vanishes without closing the connection (host down, path gone) is
    // noticed within about half a minute instead of never: the association's only sign of
    // life is this connection.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "freebsd"
    ))]
    let keepalive = keepalive.with_retries(KEEPALIVE_RETRIES);
    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
    let tls = TlsConnector::from(opts.tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| ClientError::from_tls_io(e, &opts.server_name))?;
    // One line per control connection: which gateway, and whether the session cache saved
    // the full handshake (a client that never resumes has lost its cache or its tickets).
    let conn = tls.get_ref().1;
    tracing::info!(
        "connected to gateway {} ({}, {})",
        opts.gateway,
        tls_version_name(conn.protocol_version()),
        match conn.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => "resumed",
            _ => "full handshake",
        }
    );
    Ok(tls)
}

/// `TLS 1.3` for the log line of [`connect_tls`].
fn tls_version_name(v: Option<rustls::ProtocolVersion>) -> String {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "TLS version unknown".to_owned(),
    }
}

/// Reads one message whose parser reports how many bytes it needs, byte-exactly.
async fn read_msg<S: AsyncRead + Unpin, T>(
    s: &mut S,
    parse: impl Fn(&[u8]) -> Result<(T, usize), SocksError>,
) -> Result<T, ClientError> {
    let mut buf = Vec::with_capacity(32);
    loop {
        match parse(&buf) {
            Ok((m, _)) => return Ok(m),
            Err(SocksError::Incomplete { need }) if need <= 600 => {
                let have = buf.len();
                buf.resize(need, 0);
                s.read_exact(&mut buf[have..]).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Method negotiation with username/password or none (standard RFC 1928/1929 client).
pub async fn authenticate_plain<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    credentials: Option<(&str, &str)>,
) -> Result<(), ClientError> {
    let mut out = Vec::new();
    let methods: &[u8] = if credentials.is_some() {
        &[method::USERPASS]
    } else {
        &[method::NO_AUTH]
    };
    socks::encode_greeting(methods, &mut out);
    s.write_all(&out).await?;
    let chosen = read_msg(s, socks::parse_method_selection).await?;
    match (chosen, credentials) {
        (method::NO_AUTH, None) => Ok(()),
        (method::USERPASS, Some((u, p))) => {
            out.clear();
            socks::encode_userpass(u.as_bytes(), p.as_bytes(), &mut out)?;
            s.write_all(&out).await?;
            let mut reply = [0u8; 2];
            s.read_exact(&mut reply).await?;
            if reply[1] != 0 {
                return Err(ClientError::AuthFailed);
            }
            Ok(())
        }
        _ => Err(ClientError::NoAcceptableMethod),
    }
}

/// Method negotiation as `opts` says: GSS-API when [`ClientOptions::gssapi`] names a
/// service, else [`authenticate_plain`] with the options' credentials.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    opts: &ClientOptions,
) -> Result<(), ClientError> {
    match &opts.gssapi {
        Some(service) => authenticate_gssapi(s, service).await,
        None => {
            let creds = opts.credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
            authenticate_plain(s, creds).await
        }
    }
}

/// Method negotiation with GSS-API (RFC 1961, PROTOCOL.md §2.6): a Kerberos context to
/// `service` from the user's ticket cache, mutual authentication, protection level "none"
/// (TLS protects the channel). The context is deleted when this returns.
pub async fn authenticate_gssapi<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    service: &str,
) -> Result<(), ClientError> {
    gssapi_exchange(s, service, crate::proto::gssapi::level::NONE).await
}

/// The RFC 1961 exchange asking for protection level `wish`: [`level::NONE`] before a
/// request, [`level::SUDP`] before a sudp hello (secure UDP, PROTOCOL.md §2.6).
///
/// [`level::NONE`]: crate::proto::gssapi::level::NONE
/// [`level::SUDP`]: crate::proto::gssapi::level::SUDP
#[cfg(feature = "kerberos")]
async fn gssapi_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    service: &str,
    wish: u8,
) -> Result<(), ClientError> {
    use crate::auth::kerberos::Initiator;
    use crate::proto::gssapi::{level, parse_level, GssMessage, MessageType};
    let mut out = Vec::new();
    socks::encode_greeting(&[method::GSSAPI], &mut out);
    s.write_all(&out).await?;
    let chosen = read_msg(s, socks::parse_method_selection).await?;
    if chosen != method::GSSAPI {
        return Err(ClientError::Gssapi(
            "the gateway does not offer GSS-API (is it started with --kerberos-keytab?)".to_owned(),
        ));
    }
    // Getting a service ticket may ask the KDC: blocking, so off the runtime's threads.
    let service = service.to_owned();
    let (mut initiator, token) = tokio::task::spawn_blocking(move || Initiator::start(&service))
        .await
        .map_err(|e| ClientError::Gssapi(e.to_string()))?
        .map_err(|e| ClientError::Gssapi(e.to_string()))?;
    out.clear();
    GssMessage::authentication(&token).encode(&mut out)?;
    s.write_all(&out).await?;
    let refused = || ClientError::Gssapi("the gateway refused the ticket".to_owned());
    if initiator.needs_reply() {
        let reply = read_gss(s).await?;
        let (m, _) = GssMessage::parse(&reply)?;
        if m.mtyp != MessageType::Authentication {
            return Err(refused());
        }
        initiator
            .finish(m.token)
            .map_err(|e| ClientError::Gssapi(e.to_string()))?;
    }
    let mut ctx = initiator.into_context();
    let wanted = wish;
    let wish = ctx
        .wrap(&[wanted])
        .ok_or_else(|| ClientError::Gssapi("cannot wrap the protection level".to_owned()))?;
    out.clear();
    GssMessage::protection(&wish).encode(&mut out)?;
    s.write_all(&out).await?;
    let answer = read_gss(s).await?;
    let (m, _) = GssMessage::parse(&answer)?;
    if m.mtyp != MessageType::Protection {
        return Err(refused());
    }
    let level = ctx.unwrap(m.token).map(|l| parse_level(&l));
    match level {
        Some(Ok(l)) if l == wanted => Ok(()),
        Some(Ok(level::NONE)) if wanted == level::SUDP => Err(ClientError::Gssapi(
            "the gateway cannot open secure UDP for GSS-API clients".to_owned(),
        )),
        other => Err(ClientError::Gssapi(format!(
            "the gateway chose a protection level this client does not implement: {other:?}"
        ))),
    }
}

/// Without the `kerberos` feature there is no GSS-API library to ask for a ticket.
#[cfg(not(feature = "kerberos"))]
async fn gssapi_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    _s: &mut S,
    _service: &str,
    _wish: u8,
) -> Result<(), ClientError> {
    Err(ClientError::Gssapi(
        "this sudp was built without Kerberos support (cargo feature `kerberos`)".to_owned(),
    ))
}

/// Reads one RFC 1961 message (its token bounded by the codec) byte-exactly.
#[cfg(feature = "kerberos")]
async fn read_gss<S: AsyncRead + Unpin>(s: &mut S) -> Result<Vec<u8>, ClientError> {
    let mut buf = Vec::with_capacity(4);
    loop {
        match crate::proto::gssapi::GssMessage::parse(&buf) {
            Ok(_) => return Ok(buf),
            Err(SocksError::Incomplete { need }) => {
                let have = buf.len();
                buf.resize(need, 0);
                s.read_exact(&mut buf[have..]).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends a SOCKS5 request and reads the reply; returns BND.
pub async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cmd: Command,
    addr: &Address,
) -> Result<Address, ClientError> {
    let mut out = Vec::new();
    socks::encode_request(cmd.to_u8(), &addr.as_ref(), &mut out)?;
    s.write_all(&out).await?;
    let reply = read_msg(s, socks::parse_request).await?;
    match ReplyCode::from_u8(reply.code) {
        ReplyCode::Succeeded => Ok(reply.addr),
        code => Err(ClientError::Refused(code)),
    }
}

/// Negotiates the sudp method on a fresh control connection; returns the chosen suite and
/// association id.
pub async fn negotiate_sudp(
    s: &mut Control,
    opts: &ClientOptions,
) -> Result<(CipherSuite, AssociationId), ClientError> {
    let suites: Vec<u8> = opts.suites.iter().map(|s| s.id()).collect();
    let mut out = Vec::new();
    if let Some(service) = &opts.gssapi {
        // GSS-API first, then a hello without credentials, bound to the GSS identity.
        gssapi_exchange(s, service, crate::proto::gssapi::level::SUDP).await?;
        SudpHello {
            suites: &suites,
            user: b"",
            pass: b"",
        }
        .encode(&mut out)?;
        s.write_all(&out).await?;
        return read_accept(s, opts).await;
    }
    socks::encode_greeting(&[method::SUDP], &mut out);
    let (user, pass) = match &opts.credentials {
        Some((u, p)) => (u.as_bytes(), p.as_bytes()),
        None => (&b""[..], &b""[..]),
    };
    // Greeting and hello in one write: the method is known to be the only one offered.
    SudpHello {
        suites: &suites,
        user,
        pass,
    }
    .encode(&mut out)?;
    s.write_all(&out).await?;
    let chosen = read_msg(s, socks::parse_method_selection).await?;
    if chosen != method::SUDP {
        return Err(ClientError::NoAcceptableMethod);
    }
    read_accept(s, opts).await
}

/// Reads the SudpAccept (§2.2) and checks it against what `opts` offered.
async fn read_accept(
    s: &mut Control,
    opts: &ClientOptions,
) -> Result<(CipherSuite, AssociationId), ClientError> {
    let accept = read_msg(s, SudpAccept::parse).await?;
    match accept.status {
        sudp_status::OK => {}
        sudp_status::NO_SUITE => return Err(ClientError::NoSuite),
        sudp_status::BUSY => return Err(ClientError::Busy),
        _ => return Err(ClientError::AuthFailed),
    }
    let suite = CipherSuite::from_id(accept.suite)
        .filter(|s| opts.suites.contains(s))
        .ok_or(ClientError::NoSuite)?;
    Ok((suite, accept.assoc))
}

/// Opens a control session (method 0x81, PROTOCOL.md §2.8): TLS, the sudp sub-negotiation
/// for the login, then the connection carries control frames at once. A gateway that does
/// not speak it answers `NoAcceptableMethod`.
pub async fn connect_control(opts: &ClientOptions) -> Result<Control, ClientError> {
    tokio::time::timeout(opts.timeout, async {
        let mut s = connect_tls(opts).await?;
        let mut out = Vec::new();
        socks::encode_greeting(&[method::CONTROL], &mut out);
        let suites: Vec<u8> = opts.suites.iter().map(|s| s.id()).collect();
        let (user, pass) = match &opts.credentials {
            Some((u, p)) => (u.as_bytes(), p.as_bytes()),
            None => (&b""[..], &b""[..]),
        };
        SudpHello {
            suites: &suites,
            user,
            pass,
        }
        .encode(&mut out)?;
        s.write_all(&out).await?;
        let chosen = read_msg(&mut s, socks::parse_method_selection)
            .await
            .map_err(|e| e.explained(&opts.server_name))?;
        if chosen != method::CONTROL {
            return Err(ClientError::NoAcceptableMethod);
        }
        let accept = read_msg(&mut s, SudpAccept::parse).await?;
        if accept.status != sudp_status::OK {
            return Err(ClientError::AuthFailed);
        }
        Ok(s)
    })
    .await
    .map_err(|_| ClientError::Timeout)?
}

/// The tag that names a CONNECT tunnel on a control session (PROTOCOL.md §2.8): the TLS
/// exporter of the tunnel's own connection, which only its two ends can compute.
pub fn tunnel_tag(tunnel: &Control) -> Result<[u8; crate::inspect::TAG_LEN], rustls::Error> {
    tunnel
        .get_ref()
        .1
        .export_keying_material([0u8; crate::inspect::TAG_LEN], crate::inspect::TAG_LABEL, None)
}

/// A SOCKS5 CONNECT through the gateway; returns the stream, ready for payload bytes.
pub async fn connect_tcp(opts: &ClientOptions, target: &Address) -> Result<Control, ClientError> {
    Ok(connect_tcp_bound(opts, target).await?.0)
}

/// [`connect_tcp`] that also returns the gateway's BND address (the local address of its
/// connection to the target), for relaying in a SOCKS5 reply.
pub async fn connect_tcp_bound(
    opts: &ClientOptions,
    target: &Address,
) -> Result<(Control, Address), ClientError> {
    tokio::time::timeout(opts.timeout, async {
        let mut s = connect_tls(opts).await?;
        // A TLS 1.3 server's verdict on our certificate arrives with its first reply.
        authenticate(&mut s, opts)
            .await
            .map_err(|e| e.explained(&opts.server_name))?;
        let bnd = request(&mut s, Command::Connect, target).await?;
        Ok((s, bnd))
    })
    .await
    .map_err(|_| ClientError::Timeout)?
}

/// Where the parts of a record opened in place by [`SecureUdp::recv_in_place`] lie in the
/// caller's buffer.
///
/// The plaintext starts at [`PREFIX_LEN`] (21), so `addr.start >= 3`: a SOCKS5 UDP request
/// header (RSV, FRAG) fits in front of the address, and `buf[addr.start - 3..payload.end]`
/// becomes the naked RFC 1928 §7 datagram of the same source without copying the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Source of the datagram (the target that sent it), IPv4-mapped addresses unmapped.
    pub from: Address,
    /// The encoded source address (ATYP, ADDR, PORT) in the buffer.
    pub addr: Range<usize>,
    /// The payload in the buffer.
    pub payload: Range<usize>,
}

/// A secure UDP association through a gateway.
pub struct SecureUdp {
    udp: UdpPath,
    send: Mutex<SendSession>,
    recv: Mutex<RecvSession>,
    assoc: AssociationId,
    suite: CipherSuite,
    /// 0, or the epoch this connection re-attached the association under.
    epoch: u32,
    /// Why the gateway refused the re-attach asked for, if it did.
    reattach_refused: Option<RefuseReason>,
    relay: SocketAddr,
    /// The control connection, shared with the other associations it carries.
    trunk: Arc<Trunk>,
    closed: tokio::sync::watch::Receiver<bool>,
    /// Why the association ended, once it has.
    why_closed: Arc<Mutex<Option<String>>>,
    /// Record buffers of `send_to` and of `recv_from` with a small buffer, allocated on first
    /// use and reused, so neither allocates per datagram.
    send_scratch: tokio::sync::Mutex<Vec<u8>>,
    recv_scratch: tokio::sync::Mutex<Vec<u8>>,
    metrics: Option<Arc<Metrics>>,
    /// How records travel (PROTOCOL.md §6.4).
    carrier: Carrier,
}

/// Where an association's records travel over UDP.
enum UdpPath {
    /// A socket of its own: the first association of a control connection (and every
    /// association of a gateway without ASSOCIATIONS).
    Own(BatchSocket),
    /// The socket its control connection's other associations share (PROTOCOL.md §2.9):
    /// records for it arrive through the trunk's demux ([`mux`]).
    Shared(mux::Route),
}

impl UdpPath {
    /// The socket records leave from.
    fn socket(&self) -> &BatchSocket {
        match self {
            UdpPath::Own(s) => s,
            UdpPath::Shared(r) => r.mux().socket(),
        }
    }

    /// The next datagram for this association into `buf` (cut to its length, as a socket
    /// does). Cancel-safe.
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            UdpPath::Own(s) => s.recv(buf).await,
            UdpPath::Shared(r) => {
                let rec = r.recv().await;
                let n = rec.len().min(buf.len());
                buf[..n].copy_from_slice(&rec[..n]);
                Ok(n)
            }
        }
    }
}

/// The transport state of one association: which way records go now, the control
/// channel's sender and the records it received, and the UDP probes of `auto`.
struct Carrier {
    mode: Transport,
    /// Records go inside TLS now.
    via_tls: AtomicBool,
    sender: FrameSender,
    /// Records the gateway sent inside TLS, from the control task.
    inbound: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Vec<u8>>>,
    epoch: std::time::Instant,
    /// Milliseconds since `epoch`: the last PROBE sent, the last PROBE_ACK received
    /// (`u64::MAX`: none yet), and the first PROBE sent since that answer.
    last_probe_ms: AtomicU64,
    last_ack_ms: AtomicU64,
    unanswered_since_ms: AtomicU64,
    /// The token of the probe in flight.
    token: Mutex<[u8; TOKEN_LEN]>,
}

impl Carrier {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Size of a buffer that holds any record: [`SecureUdp::recv_in_place`] and
/// [`SecureUdp::recv_from`] need no scratch buffer of their own when given one this large.
pub const RECORD_BUF: usize = DATAGRAM_BUF;

impl SecureUdp {
    /// Connects, negotiates, associates and derives keys.
    pub async fn connect(opts: &ClientOptions) -> Result<SecureUdp, ClientError> {
        Self::connect_reattach(opts, None).await
    }

    /// [`SecureUdp::connect`], then, with `previous` (the id and suite of an association
    /// this identity opened on an earlier control connection, e.g. [`SecureUdp::resume_token`]
    /// of one that was lost), asks the gateway to re-attach that association to the new
    /// connection (PROTOCOL.md §2.7 REATTACH): on success the result carries the old id
    /// under the keys of its new epoch ([`SecureUdp::epoch`]). A gateway that refuses (or
    /// does not speak REATTACH) leaves the association the connection opened, with a new
    /// id: [`SecureUdp::reattach_refused`] says why.
    pub async fn connect_reattach(
        opts: &ClientOptions,
        previous: Option<(AssociationId, CipherSuite)>,
    ) -> Result<SecureUdp, ClientError> {
        tokio::time::timeout(opts.timeout, Self::connect_inner(opts, previous))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    async fn connect_inner(
        opts: &ClientOptions,
        previous: Option<(AssociationId, CipherSuite)>,
    ) -> Result<SecureUdp, ClientError> {
        let mut control = connect_tls(opts).await?;
        // A TLS 1.3 server's verdict on our certificate arrives with its first reply.
        let (suite, assoc) = negotiate_sudp(&mut control, opts)
            .await
            .map_err(|e| e.explained(&opts.server_name))?;
        let keys = crate::tls::export_keys(control.get_ref().1, assoc, suite)
            .map_err(|e| ClientError::Keys(e.to_string()))?;
        let socket = crate::net::bind_udp(any_port_like(opts.gateway))?;
        let bnd = request(
            &mut control,
            Command::UdpAssociate,
            &Address::Ip(socket.local_addr()?),
        )
        .await?;
        let relay = match bnd {
            // An unspecified BND.ADDR means "the address you reached me on".
            Address::Ip(a) if a.ip().is_unspecified() => SocketAddr::new(opts.gateway.ip(), a.port()),
            Address::Ip(a) => a,
            Address::Domain(..) => {
                return Err(SocksError::BadAddressType(socks::atyp::DOMAIN).into());
            }
        };
        socket.connect(relay).await?;
        // The association lives as long as the control connection, which carries frames
        // (PROTOCOL.md §2.4): the heartbeat both ways, the gateway's CLOSE, records when UDP
        // is blocked, and (feature ASSOCIATIONS, §2.9) more associations.
        let mut channel = Channel::open(
            control,
            opts.heartbeat,
            &[feature::RECORDS, feature::REATTACH, feature::ASSOCIATIONS],
        );
        let own = assoc;
        let (mut assoc, mut assoc_suite, mut keys, mut assoc_epoch, mut reattach_refused) =
            (assoc, suite, keys, 0, None);
        if let Some((old, old_suite)) = previous {
            let port = socket.local_addr()?.port();
            match reattach_on(&mut channel, old, port).await? {
                Reattach::Done(e) => {
                    keys = channel
                        .with_stream(|c| crate::tls::export_epoch_keys(c.get_ref().1, old, old_suite, e))
                        .map_err(|e| ClientError::Keys(e.to_string()))?;
                    (assoc, assoc_suite, assoc_epoch) = (old, old_suite, e);
                    // With ASSOCIATIONS the re-attached association joins the connection's
                    // own instead of replacing it (§2.9): that one is released, unused.
                    if channel.peer().is_some_and(|h| h.has(feature::ASSOCIATIONS)) {
                        let _ = channel.send(&Frame::Close {
                            assoc: own,
                            reason: CloseReason::Released,
                        });
                    }
                }
                Reattach::Refused(r) => reattach_refused = Some(r),
            }
        }
        let (trunk, ends) = Trunk::start(channel, assoc, relay, suite);
        let granted = Granted {
            assoc,
            epoch: assoc_epoch,
            keys,
            ends,
        };
        // Read with plain `recv` too (recv_in_place): no GRO trains on this socket.
        let udp = UdpPath::Own(BatchSocket::without_gro(socket)?);
        SecureUdp::assemble(trunk, udp, assoc_suite, granted, reattach_refused, opts).await
    }

    /// One more association on `trunk`'s control connection (PROTOCOL.md §2.9: OPEN, or
    /// REATTACH of `previous`, falling back to OPEN when the gateway refuses it), sending
    /// from the UDP socket the trunk's other opened associations share (a demux task routes
    /// their records by id); `opts` gives the replay window, transport and timeout.
    pub async fn open_on(
        trunk: &Arc<Trunk>,
        opts: &ClientOptions,
        previous: Option<(AssociationId, CipherSuite)>,
    ) -> Result<SecureUdp, ClientError> {
        let mux = trunk.mux().await?;
        let port = mux.socket().local_addr()?.port();
        let denied = |d: Denied| match d {
            Denied::Open(s) => ClientError::Trunk(format!("OPEN refused: {}", s.name())),
            Denied::Reattach(r) => ClientError::Trunk(format!("REATTACH refused: {}", r.name())),
            Denied::Gone(why) => ClientError::Trunk(why),
        };
        let (granted, suite, refused) = match previous {
            Some((old, old_suite)) => match trunk.reattach(old, old_suite, port, opts.timeout).await {
                Ok(g) => (g, old_suite, None),
                Err(Denied::Reattach(r)) => {
                    let g = trunk.open(port, opts.timeout).await.map_err(denied)?;
                    (g, trunk.suite, Some(r))
                }
                Err(d) => return Err(denied(d)),
            },
            None => (
                trunk.open(port, opts.timeout).await.map_err(denied)?,
                trunk.suite,
                None,
            ),
        };
        let udp = UdpPath::Shared(mux.route(granted.assoc));
        SecureUdp::assemble(trunk.clone(), udp, suite, granted, refused, opts).await
    }

    /// The association `granted` on `trunk`, sending on `udp` (connected to the relay):
    /// its sessions, the first probe of `auto`, and which way records go.
    async fn assemble(
        trunk: Arc<Trunk>,
        udp: UdpPath,
        suite: CipherSuite,
        granted: Granted,
        reattach_refused: Option<RefuseReason>,
        opts: &ClientOptions,
    ) -> Result<SecureUdp, ClientError> {
        let Granted {
            assoc,
            epoch: assoc_epoch,
            keys,
            ends,
        } = granted;
        let RouteEnds {
            inbound,
            closed,
            why: why_closed,
        } = ends;
        let relay = trunk.relay;
        let mut send = SendSession::new(assoc, &keys, Role::Client);
        let mut recv = RecvSession::new(assoc, &keys, Role::Client, opts.replay_window);
        drop(keys);
        let udp_works = match opts.transport {
            Transport::Udp => true,
            Transport::Tls => false,
            Transport::Auto => first_probe(&udp, &mut send, &mut recv).await,
        };
        let via_tls = if udp_works {
            false
        } else {
            // Inside TLS only if the gateway said it speaks RECORD frames.
            let said = trunk.peer().await.is_some_and(|p| p.records);
            match (said, opts.transport) {
                (true, Transport::Tls) => true,
                (true, _) => {
                    tracing::warn!(
                        gateway = %opts.gateway,
                        relay = %relay,
                        "no UDP answer from the gateway's relay: carrying records inside TLS"
                    );
                    true
                }
                (false, Transport::Tls) => return Err(ClientError::NoTlsTransport),
                (false, _) => {
                    tracing::warn!(
                        gateway = %opts.gateway,
                        relay = %relay,
                        "no UDP answer from the gateway's relay, and the gateway cannot carry records inside TLS: trying UDP anyway"
                    );
                    false
                }
            }
        };
        let epoch = std::time::Instant::now();
        let sender = trunk.sender().clone();
        Ok(SecureUdp {
            udp,
            send: Mutex::new(send),
            recv: Mutex::new(recv),
            assoc,
            suite,
            epoch: assoc_epoch,
            reattach_refused,
            relay,
            trunk,
            closed,
            why_closed,
            send_scratch: tokio::sync::Mutex::new(Vec::new()),
            recv_scratch: tokio::sync::Mutex::new(Vec::new()),
            metrics: None,
            carrier: Carrier {
                mode: opts.transport,
                via_tls: AtomicBool::new(via_tls),
                sender,
                inbound: tokio::sync::Mutex::new(inbound),
                epoch,
                last_probe_ms: AtomicU64::new(0),
                last_ack_ms: AtomicU64::new(if udp_works { 0 } else { u64::MAX }),
                unanswered_since_ms: AtomicU64::new(u64::MAX),
                token: Mutex::new([0; TOKEN_LEN]),
            },
        })
    }

    /// The control connection this association travels on; with a gateway that speaks
    /// ASSOCIATIONS, [`SecureUdp::open_on`] opens more on it.
    pub fn trunk(&self) -> &Arc<Trunk> {
        &self.trunk
    }

    /// Whether records travel inside TLS now (PROTOCOL.md §6.4).
    pub fn via_tls(&self) -> bool {
        self.carrier.via_tls.load(Ordering::Relaxed)
    }

    /// Sends one sealed record the way records travel now.
    async fn send_record(&self, record: &[u8]) -> io::Result<()> {
        if self.via_tls() {
            return self.carrier.sender.send_record(record).map_err(channel_error);
        }
        self.udp.socket().send_connected(record).await
    }

    /// Whether this association and `other` send from one socket (both opened on the same
    /// control connection, §2.9): their sealed records can leave in one train.
    pub fn shares_socket_with(&self, other: &SecureUdp) -> bool {
        match (&self.udp, &other.udp) {
            (UdpPath::Shared(a), UdpPath::Shared(b)) => std::ptr::eq(a.mux(), b.mux()),
            _ => false,
        }
    }

    /// For `auto`: now and then (while sending) a PROBE over UDP; switches to TLS when UDP
    /// has been silent too long, and back when a PROBE_ACK arrives (see `note_probe_ack`).
    /// [`SecureUdp::send_train`] calls it; a caller that sends this association's records
    /// in another association's train calls it itself.
    pub(crate) fn maybe_probe(&self) {
        let c = &self.carrier;
        if c.mode != Transport::Auto {
            return;
        }
        let now = c.now_ms();
        if now.saturating_sub(c.last_probe_ms.load(Ordering::Relaxed)) < PROBE_INTERVAL.as_millis() as u64 {
            return;
        }
        c.last_probe_ms.store(now, Ordering::Relaxed);
        let since = c.unanswered_since_ms.load(Ordering::Relaxed);
        if since == u64::MAX {
            c.unanswered_since_ms.store(now, Ordering::Relaxed);
        } else if !self.via_tls()
            && now.saturating_sub(since) >= PROBE_SILENCE.as_millis() as u64
            && !c.sender.is_closed()
        {
            c.via_tls.store(true, Ordering::Relaxed);
            tracing::warn!(assoc = %self.assoc, relay = %self.relay, "UDP to the gateway went silent: carrying records inside TLS");
        }
        let token: [u8; TOKEN_LEN] = rand::random();
        *c.token.lock().unwrap_or_else(|e| e.into_inner()) = token;
        let mut buf = [0u8; record_len(crate::proto::path::PATH_MESSAGE_LEN)];
        let sealed = self
            .send
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seal_control(&ControlMessage::Probe(token), &mut buf);
        if let Ok(n) = sealed {
            // Lost when the socket buffer is full or UDP is blocked: that is what we measure.
            let _ = self.udp.socket().try_send(self.relay, &buf[..n], None);
        }
    }

    /// A PROBE_ACK arrived over UDP: UDP works both ways; records go back to UDP.
    fn note_probe_ack(&self, token: [u8; TOKEN_LEN]) {
        let c = &self.carrier;
        if *c.token.lock().unwrap_or_else(|e| e.into_inner()) != token {
            return;
        }
        c.last_ack_ms.store(c.now_ms(), Ordering::Relaxed);
        c.unanswered_since_ms.store(u64::MAX, Ordering::Relaxed);
        if c.mode == Transport::Auto && c.via_tls.swap(false, Ordering::Relaxed) {
            tracing::info!(assoc = %self.assoc, relay = %self.relay, "UDP to the gateway works again: records back on UDP");
        }
    }

    /// Counts records dropped on receipt (by [`crate::proto::DropReason`]) in `metrics`,
    /// and the datagrams the kernel drops at this association's socket (as `outbound`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        match &mut self.udp {
            UdpPath::Own(s) => s.set_drop_tracker(&metrics.socket_drops.outbound),
            UdpPath::Shared(r) => r.mux().set_metrics(&metrics),
        }
        self.metrics = Some(metrics);
        self
    }

    /// The association id.
    pub fn assoc(&self) -> AssociationId {
        self.assoc
    }

    /// The negotiated suite.
    pub fn suite(&self) -> CipherSuite {
        self.suite
    }

    /// The association's epoch on this connection: 0 when it was opened here, else the
    /// epoch of the re-attach (PROTOCOL.md §3.1).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// What a later connection needs to re-attach this association
    /// ([`SecureUdp::connect_reattach`]).
    pub fn resume_token(&self) -> (AssociationId, CipherSuite) {
        (self.assoc, self.suite)
    }

    /// Why the gateway refused the re-attach this connection asked for, if it did (the
    /// association is then a new one).
    pub fn reattach_refused(&self) -> Option<RefuseReason> {
        self.reattach_refused
    }

    /// The gateway's relay address.
    pub fn relay(&self) -> SocketAddr {
        self.relay
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.socket().local_addr()
    }

    /// True once the gateway closed the control connection (the association is gone).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Why the association ended (the gateway's CLOSE reason, a heartbeat timeout, the
    /// connection closing), once [`SecureUdp::is_closed`].
    pub fn close_reason(&self) -> Option<String> {
        self.why_closed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Completes once the gateway closed the control connection (the association is gone).
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        // An error means the watcher task ended, which it does only after the connection
        // closed (or when `self` is being dropped): closed either way.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Seals `payload` for `target` and sends it to the relay. Reuses one record buffer per
    /// association (concurrent callers take turns); see [`SecureUdp::send_to_buf`] and
    /// [`SecureUdp::send_in_place`] for the lock-free forms.
    pub async fn send_to(&self, payload: &[u8], target: &Address) -> Result<(), ClientError> {
        let mut scratch = self.send_scratch.lock().await;
        if scratch.len() < RECORD_BUF {
            scratch.resize(RECORD_BUF, 0);
        }
        self.send_to_buf(payload, target, &mut scratch).await
    }

    /// Seals into a caller buffer and sends (no allocation).
    pub async fn send_to_buf(
        &self,
        payload: &[u8],
        target: &Address,
        scratch: &mut [u8],
    ) -> Result<(), ClientError> {
        let n =
            self.send
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .seal(&target.as_ref(), payload, scratch)?;
        self.maybe_probe();
        self.send_record(&scratch[..n]).await?;
        Ok(())
    }

    /// Seals the plaintext (SOCKS5 address of the target, then the payload) that the caller
    /// placed at `buf[PREFIX_LEN..PREFIX_LEN + plaintext_len]`, in place, and sends the
    /// record; returns the record length. `buf` needs room for the record
    /// ([`crate::proto::record::record_len`]`(plaintext_len)` bytes). No copy, no allocation.
    ///
    /// The address is not parsed here: the caller has checked it (a malformed one is
    /// dropped by the gateway as `bad_address`).
    pub async fn send_in_place(&self, buf: &mut [u8], plaintext_len: usize) -> Result<usize, ClientError> {
        let n = self
            .send
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seal_in_place(buf, plaintext_len)?;
        self.maybe_probe();
        self.send_record(&buf[..n]).await?;
        Ok(n)
    }

    /// Seals several records at once (see [`crate::proto::record::Sealer::seal_many_in_place`]
    /// for the layout): the CBC chains advance together, about a third faster than one by one.
    pub fn seal_many(
        &self,
        buf: &mut [u8],
        offsets: &[usize],
        plaintext_lens: &[usize],
        lens: &mut [usize],
    ) -> Result<(), SealError> {
        self.send
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seal_many_in_place(buf, offsets, plaintext_lens, lens)
    }

    /// Records one GSO send may carry to the relay (1 where the kernel has no GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.udp.socket().max_gso_segments()
    }

    /// Sends sealed records to the relay: one record, or a train of `segment`-byte records
    /// (the last may be shorter) in one system call.
    pub async fn send_train(&self, bytes: &[u8], segment: Option<usize>) -> io::Result<()> {
        self.maybe_probe();
        if self.via_tls() {
            for rec in bytes.chunks(segment.unwrap_or(bytes.len()).max(1)) {
                self.carrier.sender.send_record(rec).map_err(channel_error)?;
            }
            return Ok(());
        }
        let socket = self.udp.socket();
        match socket.try_send(self.relay, bytes, segment) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket.send(self.relay, bytes, segment).await,
            r => r,
        }
    }

    /// Receives the next authentic datagram: copies its payload into `buf` (truncating it to
    /// `buf.len()`, as a UDP socket does) and returns its length and source. Records that fail
    /// any check are dropped (and counted, see [`SecureUdp::with_metrics`]).
    ///
    /// With `buf` of at least [`RECORD_BUF`] bytes the record is opened in `buf` itself;
    /// a smaller `buf` uses a record buffer kept by the association. Neither allocates per
    /// datagram.
    pub async fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, Address), ClientError> {
        if buf.len() >= RECORD_BUF {
            let r = self.recv_in_place(buf).await?;
            let n = r.payload.len();
            buf.copy_within(r.payload, 0);
            return Ok((n, r.from));
        }
        let mut rec = self.recv_scratch.lock().await;
        if rec.len() < RECORD_BUF {
            rec.resize(RECORD_BUF, 0);
        }
        let r = self.recv_in_place(&mut rec).await?;
        let n = r.payload.len().min(buf.len());
        buf[..n].copy_from_slice(&rec[r.payload.start..r.payload.start + n]);
        Ok((n, r.from))
    }

    /// Receives the next authentic record into `rec` and opens it there; returns where the
    /// source address and payload lie (see [`Received`]). `rec` should hold [`RECORD_BUF`]
    /// bytes: a longer record is cut short by the socket and then fails to open.
    ///
    /// Cancel-safe: a record is either returned or still in the socket.
    pub async fn recv_in_place(&self, rec: &mut [u8]) -> Result<Received, ClientError> {
        loop {
            let n = tokio::select! {
                n = self.udp.recv(rec) => n?,
                r = self.next_tls_record() => {
                    // Longer than the caller's buffer: cut short, as a socket would; it then
                    // fails to open and is counted.
                    let n = r.len().min(rec.len());
                    rec[..n].copy_from_slice(&r[..n]);
                    n
                }
            };
            match self.open(&mut rec[..n]) {
                Ok(Some(r)) => return Ok(r),
                // A control record, answered already: nothing for the application.
                Ok(None) => {}
                Err(e) => {
                    if let Some(m) = &self.metrics {
                        m.count_drop(e.reason());
                    }
                    tracing::debug!(error = %e, "dropped record from gateway");
                }
            }
        }
    }

    /// Receives one batch of records (recvmmsg, GRO where offered) and opens each in place;
    /// `f` gets every authentic payload and its source. Records that fail any check are
    /// dropped and counted. Returns the number delivered (possibly 0). Cancel-safe.
    pub async fn recv_batch(
        &self,
        batch: &mut RecvBatch,
        f: &mut (dyn FnMut(&[u8], &Address) + Send),
    ) -> Result<usize, ClientError> {
        let own = match &self.udp {
            UdpPath::Own(s) => s,
            UdpPath::Shared(route) => return self.recv_shared(route, f).await,
        };
        let mut from_tls = tokio::select! {
            r = own.recv_batch(batch) => {
                r?;
                None
            }
            r = self.next_tls_record() => Some(r),
        };
        if let Some(rec) = from_tls.as_mut() {
            // One record from the control channel (and what else is waiting there, bounded).
            let mut delivered = 0;
            let mut more = 0;
            loop {
                self.open_run(&mut [&mut rec[..]], f, &mut delivered);
                more += 1;
                // The bound before taking: a record taken from the queue is opened, never
                // left behind (what stays in the queue waits for the next call).
                if more >= crate::net::batch::BATCH {
                    break;
                }
                match self.carrier.inbound.lock().await.try_recv() {
                    Ok(next) => *rec = next,
                    Err(_) => break,
                }
            }
            return Ok(delivered);
        }
        let mut delivered = 0;
        batch.for_each_run(|run, _| self.open_run(run, f, &mut delivered));
        Ok(delivered)
    }

    /// [`SecureUdp::recv_batch`] of an association on the shared socket: what its queue
    /// holds (up to [`crate::net::batch::BATCH`] records), or records inside TLS.
    async fn recv_shared(
        &self,
        route: &mux::Route,
        f: &mut (dyn FnMut(&[u8], &Address) + Send),
    ) -> Result<usize, ClientError> {
        let mut recs = Vec::new();
        tokio::select! {
            () = route.recv_many(&mut recs, crate::net::batch::BATCH) => {}
            r = self.next_tls_record() => recs.push(r),
        }
        let mut delivered = 0;
        for chunk in recs.chunks_mut(RUN) {
            let mut run: [&mut [u8]; RUN] = Default::default();
            let n = chunk.len();
            for (slot, r) in run.iter_mut().zip(chunk.iter_mut()) {
                *slot = &mut r[..];
            }
            self.open_run(&mut run[..n], f, &mut delivered);
        }
        Ok(delivered)
    }

    /// Opens the records of `run` (checking the tags of equal-length stretches together),
    /// gives `f` each authentic payload and counts the rest as dropped.
    fn open_run(
        &self,
        run: &mut [&mut [u8]],
        f: &mut (dyn FnMut(&[u8], &Address) + Send),
        delivered: &mut usize,
    ) {
        let mut tags = [None; RUN];
        if run.len() > 1 {
            self.verify_run(run, &mut tags);
        }
        for (rec, tag) in run.iter_mut().zip(tags) {
            match self.open_checked(rec, tag) {
                Ok(Some(r)) => {
                    f(&rec[r.payload.clone()], &r.from);
                    *delivered += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    if let Some(m) = &self.metrics {
                        m.count_drop(e.reason());
                    }
                    tracing::debug!(error = %e, "dropped record from gateway");
                }
            }
        }
    }

    /// Checks together the tags of each stretch of equal-length records in `run` (a train
    /// from the gateway); `tags[i]` gets record `i`'s verdict.
    fn verify_run(&self, run: &[&mut [u8]], tags: &mut [Option<bool>; RUN]) {
        let recv = self.recv.lock().unwrap_or_else(|e| e.into_inner());
        for (range, _) in stretches(run, |d| Some(d.len())) {
            recv.verify_run(&run[range.clone()], &mut tags[range]);
        }
    }

    fn open(&self, rec: &mut [u8]) -> Result<Option<Received>, OpenError> {
        self.open_checked(rec, None)
    }

    /// Opens `rec`; `tag` is its tag verdict when [`SecureUdp::verify_run`] checked it.
    /// `Ok(None)`: a control record, handled here (a PATH_CHALLENGE is answered from this
    /// association's socket) and never delivered.
    fn open_checked(&self, rec: &mut [u8], tag: Option<bool>) -> Result<Option<Received>, OpenError> {
        let base = rec.as_ptr() as usize;
        let mut recv = self.recv.lock().unwrap_or_else(|e| e.into_inner());
        let o = match tag {
            Some(ok) => recv.open_verified(rec, ok)?,
            None => recv.open(rec)?,
        };
        drop(recv);
        let (addr, payload) = match o.content {
            Content::Data { addr, payload } => (addr, payload),
            Content::Control(ControlMessage::PathChallenge(token)) => {
                self.answer_challenge(token);
                return Ok(None);
            }
            Content::Control(ControlMessage::ProbeAck(token)) => {
                self.note_probe_ack(token);
                return Ok(None);
            }
            // A response and a probe travel c2g only.
            Content::Control(ControlMessage::PathResponse(_) | ControlMessage::Probe(_)) => {
                return Err(OpenError::BadControl {
                    kind: crate::proto::path::PATH_RESPONSE,
                })
            }
        };
        // Offsets from pointers: the opened parts are slices of `rec`.
        let payload_at = payload.as_ptr() as usize - base;
        let addr_at = payload_at - addr.encoded_len();
        debug_assert_eq!(addr_at, PREFIX_LEN);
        let from = match addr {
            AddrRef::Ip(a) => Address::Ip(canonical(a)),
            d => d.to_owned(),
        };
        Ok(Some(Received {
            from,
            addr: addr_at..payload_at,
            payload: payload_at..payload_at + payload.len(),
        }))
    }

    /// The next record the gateway sent inside TLS; never completes once the control task
    /// ended (the association is closed then, and UDP alone is read until it is dropped).
    async fn next_tls_record(&self) -> Vec<u8> {
        match self.carrier.inbound.lock().await.recv().await {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }

    /// Answers a PATH_CHALLENGE with its token, from this socket (wherever the network now
    /// maps it: that is the path the gateway validates). Without waiting: a full socket
    /// buffer drops the answer and the gateway challenges again.
    fn answer_challenge(&self, token: [u8; crate::proto::path::TOKEN_LEN]) {
        let mut buf = [0u8; record_len(crate::proto::path::PATH_MESSAGE_LEN)];
        let sealed = self
            .send
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seal_control(&ControlMessage::PathResponse(token), &mut buf);
        let sent = match sealed {
            Ok(n) => self
                .udp
                .socket()
                .try_send(self.relay, &buf[..n], None)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = sent {
            if let Some(m) = &self.metrics {
                m.count_drop(crate::proto::DropReason::SendFailed);
            }
            tracing::debug!(error = %e, "could not answer a path challenge");
        }
    }
}

fn channel_error(e: ChannelError) -> io::Error {
    match e {
        // The record is dropped; the caller counts it as any refused send.
        ChannelError::Full => io::Error::new(io::ErrorKind::WouldBlock, e.to_string()),
        e => io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()),
    }
}

/// The first PROBE of an `auto` association, sent on the connected socket before anything
/// else: `true` when a PROBE_ACK came back over UDP (three tries of [`PROBE_TIMEOUT`]).
async fn first_probe(udp: &UdpPath, send: &mut SendSession, recv: &mut RecvSession) -> bool {
    let mut buf = vec![0u8; RECORD_BUF];
    for _ in 0..3 {
        let token: [u8; TOKEN_LEN] = rand::random();
        let mut rec = [0u8; record_len(crate::proto::path::PATH_MESSAGE_LEN)];
        let Ok(n) = send.seal_control(&ControlMessage::Probe(token), &mut rec) else {
            return false;
        };
        if udp.socket().send_connected(&rec[..n]).await.is_err() {
            // Refused at once (ICMP unreachable): UDP does not work.
            return false;
        }
        let deadline = tokio::time::Instant::now() + PROBE_TIMEOUT;
        while let Ok(Ok(m)) = tokio::time::timeout_at(deadline, udp.recv(&mut buf)).await {
            if let Ok(o) = recv.open(&mut buf[..m]) {
                if o.content == Content::Control(ControlMessage::ProbeAck(token)) {
                    return true;
                }
            }
        }
    }
    false
}

/// What a REATTACH got.
enum Reattach {
    /// Re-attached under this epoch.
    Done(u32),
    /// Refused (or not spoken by the gateway): the connection's own association stays.
    Refused(RefuseReason),
}

/// Waits for the gateway's HELLO, sends REATTACH for `old` if the gateway speaks it, and
/// waits for the answer. Records that arrive meanwhile go to `inbound`.
async fn reattach_on(
    channel: &mut Channel<Control>,
    old: AssociationId,
    port: u16,
) -> Result<Reattach, ClientError> {
    let mut asked = false;
    loop {
        if !asked {
            if let Some(h) = channel.peer() {
                if !h.has(feature::REATTACH) {
                    return Ok(Reattach::Refused(RefuseReason::Other(0)));
                }
                channel
                    .send(&Frame::Reattach { assoc: old, port })
                    .map_err(|e| ClientError::Io(io::Error::other(e.to_string())))?;
                asked = true;
            }
        }
        match channel.next().await {
            Ok(Event::Hello(_)) => {}
            Ok(Event::Reattached { assoc, epoch }) if assoc == old && asked => {
                return Ok(Reattach::Done(epoch))
            }
            Ok(Event::ReattachRefused { assoc, reason }) if assoc == old && asked => {
                return Ok(Reattach::Refused(reason))
            }
            // Nothing names the association before the answer (§2.7: the client sends no
            // record until then, so the gateway has none to answer).
            Ok(_) => {}
            Err(e) => return Err(ClientError::Io(io::Error::other(e.to_string()))),
        }
    }
}

impl Drop for SecureUdp {
    fn drop(&mut self) {
        self.trunk.release(self.assoc);
    }
}

/// The unspecified address of `peer`'s family, port 0: where an association's UDP socket
/// binds before it connects to the relay.
fn any_port_like(peer: SocketAddr) -> SocketAddr {
    let ip: std::net::IpAddr = if peer.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    SocketAddr::new(ip, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::path::ControlMessage;
    use crate::proto::{DropReason, KeySchedule};
    use tokio::net::UdpSocket;

    /// A reply read from the gateway is bounded before it is read: a parser that asks for
    /// more than the largest SOCKS message (a peer claiming a huge length) ends the read
    /// with its error, and nothing past the bound is read or allocated.
    #[tokio::test]
    async fn a_message_longer_than_the_bound_is_refused_unread() {
        let wants = |need: usize| {
            move |b: &[u8]| {
                if b.len() >= need {
                    Ok(((), need))
                } else {
                    Err(SocksError::Incomplete { need })
                }
            }
        };
        let bytes = vec![5u8; 1000];
        // Up to the bound: read byte-exactly, whatever follows stays unread.
        let mut s: &[u8] = &bytes;
        read_msg(&mut s, wants(600)).await.unwrap();
        assert_eq!(s.len(), 400);
        // Past it: the parser's own error, and the stream untouched.
        let mut s: &[u8] = &bytes;
        let err = read_msg(&mut s, wants(601)).await.unwrap_err();
        assert!(
            matches!(err, ClientError::Protocol(SocksError::Incomplete { need: 601 })),
            "{err:?}"
        );
        assert_eq!(s.len(), 1000);
    }

    /// The connection log line names the TLS version as an operator reads it (a fleet
    /// still on TLS 1.2 is found by grepping for it).
    #[test]
    fn tls_versions_are_named_for_the_log() {
        use rustls::ProtocolVersion as V;
        assert_eq!(tls_version_name(Some(V::TLSv1_3)), "TLS 1.3");
        assert_eq!(tls_version_name(Some(V::TLSv1_2)), "TLS 1.2");
        assert_eq!(tls_version_name(Some(V::TLSv1_0)), "TLSv1_0");
        assert_eq!(tls_version_name(None), "TLS version unknown");
    }

    /// Every transport name parses to itself, spaces around it ignored; nothing else parses.
    #[test]
    fn transport_names_parse_to_themselves() {
        for t in [Transport::Udp, Transport::Tls, Transport::Auto] {
            assert_eq!(Transport::parse(t.name()), Some(t));
            assert_eq!(Transport::parse(&format!(" {} ", t.name())), Some(t));
        }
        for bad in ["", "UDP", "quic", "udp tls"] {
            assert_eq!(Transport::parse(bad), None, "{bad:?}");
        }
    }

    /// The permanent refusals are copied as themselves (a shim answers later requests with
    /// the copy instead of asking again); anything else has no copy.
    #[test]
    fn permanent_errors_copy_as_themselves_and_others_not_at_all() {
        for e in [
            ClientError::AuthFailed,
            ClientError::NoAcceptableMethod,
            ClientError::NoSuite,
            // An untrusted certificate: the shim answers from the copy instead of dialing a
            // gateway it cannot trust again and again.
            ClientError::Tls {
                problem: crate::tls::HandshakeProblem::PinMismatch,
                server_name: "gw.example".to_owned(),
                trust: Some("--pin 00".to_owned()),
            },
        ] {
            let copy = e.permanent_copy().expect("a permanent error has a copy");
            assert_eq!(copy.to_string(), e.to_string());
            assert_eq!(std::mem::discriminant(&copy), std::mem::discriminant(&e));
        }
        for e in [ClientError::Timeout, ClientError::NoTlsTransport] {
            assert!(!e.is_permanent());
            assert!(e.permanent_copy().is_none());
        }
    }

    /// Only a failure of the gateway itself sends a shim on to the next gateway of its list:
    /// not a target the gateway refused, and not an error no gateway will answer otherwise.
    #[test]
    fn only_the_gateway_failing_moves_on_to_another_gateway() {
        let refused = ClientError::Refused(ReplyCode::ConnectionRefused);
        assert!(!refused.is_gateway_failure());
        for permanent in [ClientError::AuthFailed, ClientError::NoSuite] {
            assert!(!permanent.is_gateway_failure(), "{permanent}");
        }
        for broken in [
            ClientError::Timeout,
            ClientError::Io(io::Error::from(io::ErrorKind::ConnectionRefused)),
        ] {
            assert!(broken.is_gateway_failure(), "{broken}");
        }
    }

    /// Built without the `kerberos` feature, a client asked for GSS-API refuses with an error
    /// that names the feature, and sends the gateway nothing.
    #[cfg(not(feature = "kerberos"))]
    #[tokio::test]
    async fn without_kerberos_gssapi_is_refused_with_the_reason_before_any_byte() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        let err = gssapi_exchange(&mut ours, "sudp@gw.example", crate::proto::gssapi::level::SUDP)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Gssapi(m) if m.contains("`kerberos`")),
            "{err:?}"
        );
        drop(ours);
        let mut sent = Vec::new();
        theirs.read_to_end(&mut sent).await.unwrap();
        assert!(sent.is_empty(), "{sent:?}");
    }

    /// A `SecureUdp` whose "relay" is a socket of the test, with the gateway's halves.
    async fn pair() -> (SecureUdp, UdpSocket, SendSession, RecvSession, Arc<Metrics>) {
        let suite = CipherSuite::Aes128CbcHmacSha256;
        let m: Vec<u8> = (0..suite.exporter_len()).map(|i| (i * 7) as u8).collect();
        let ks = KeySchedule::from_exporter(suite, &m).unwrap();
        let assoc = AssociationId(0x5344_5550);
        let gw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = gw.local_addr().unwrap();
        let sock = crate::net::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        sock.connect(relay).await.unwrap();
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        std::mem::forget(closed_tx);
        let metrics = Arc::new(Metrics::default());
        let udp = SecureUdp {
            udp: UdpPath::Own(BatchSocket::without_gro(sock).unwrap()),
            send: Mutex::new(SendSession::new(assoc, &ks, Role::Client)),
            recv: Mutex::new(RecvSession::new(assoc, &ks, Role::Client, 1024)),
            assoc,
            suite,
            epoch: 0,
            reattach_refused: None,
            relay,
            trunk: trunk::Trunk::detached(relay, suite),
            closed,
            why_closed: Arc::new(Mutex::new(None)),
            send_scratch: tokio::sync::Mutex::new(Vec::new()),
            recv_scratch: tokio::sync::Mutex::new(Vec::new()),
            metrics: Some(metrics.clone()),
            carrier: Carrier {
                mode: Transport::Udp,
                via_tls: AtomicBool::new(false),
                sender: crate::net::channel::test_sender(),
                inbound: tokio::sync::Mutex::new(tokio::sync::mpsc::channel(1).1),
                epoch: std::time::Instant::now(),
                last_probe_ms: AtomicU64::new(0),
                last_ack_ms: AtomicU64::new(0),
                unanswered_since_ms: AtomicU64::new(u64::MAX),
                token: Mutex::new([0; TOKEN_LEN]),
            },
        };
        let gw_send = SendSession::new(assoc, &ks, Role::Gateway);
        let gw_recv = RecvSession::new(assoc, &ks, Role::Gateway, 1024);
        (udp, gw, gw_send, gw_recv, metrics)
    }

    /// Sends, g2c: a challenge, an unknown control kind, a (misdirected) response, data.
    async fn send_mix(gw: &UdpSocket, tx: &mut SendSession, to: SocketAddr, token: [u8; 8]) {
        let mut b = vec![0u8; 256];
        let n = tx
            .seal_control(&ControlMessage::PathChallenge(token), &mut b)
            .unwrap();
        gw.send_to(&b[..n], to).await.unwrap();
        let pt = [0u8, 0x42, 1, 2, 3, 4, 5, 6, 7, 8];
        b[PREFIX_LEN..PREFIX_LEN + pt.len()].copy_from_slice(&pt);
        let n = tx.seal_in_place(&mut b, pt.len()).unwrap();
        gw.send_to(&b[..n], to).await.unwrap();
        let n = tx
            .seal_control(&ControlMessage::PathResponse(token), &mut b)
            .unwrap();
        gw.send_to(&b[..n], to).await.unwrap();
        let src: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let n = tx.seal(&AddrRef::Ip(src), b"data", &mut b).unwrap();
        gw.send_to(&b[..n], to).await.unwrap();
    }

    async fn expect_response(gw: &UdpSocket, rx: &mut RecvSession, token: [u8; 8], from: SocketAddr) {
        let mut b = vec![0u8; 256];
        let (n, src) = tokio::time::timeout(Duration::from_secs(5), gw.recv_from(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(src, from, "answered from the association's own socket");
        let o = rx.open(&mut b[..n]).unwrap();
        assert_eq!(o.content, Content::Control(ControlMessage::PathResponse(token)));
    }

    #[tokio::test]
    async fn recv_from_answers_a_challenge_and_delivers_only_data() {
        let (udp, gw, mut tx, mut rx, metrics) = pair().await;
        let me = udp.local_addr().unwrap();
        send_mix(&gw, &mut tx, me, [3; 8]).await;
        let mut buf = vec![0u8; 64];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"data"[..], Address::Ip("127.0.0.1:9".parse().unwrap()))
        );
        expect_response(&gw, &mut rx, [3; 8], me).await;
        // The unknown kind and the response sent the wrong way are dropped and counted.
        assert_eq!(metrics.drops(DropReason::BadControl), 2);
    }

    #[tokio::test]
    async fn recv_batch_answers_a_challenge_and_delivers_only_data() {
        let (udp, gw, mut tx, mut rx, metrics) = pair().await;
        let me = udp.local_addr().unwrap();
        send_mix(&gw, &mut tx, me, [4; 8]).await;
        let mut batch = RecvBatch::default();
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while got.is_empty() {
            assert!(tokio::time::Instant::now() < deadline);
            let mut f = |p: &[u8], _: &Address| got.push(p.to_vec());
            tokio::time::timeout(Duration::from_secs(5), udp.recv_batch(&mut batch, &mut f))
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(got, vec![b"data".to_vec()]);
        expect_response(&gw, &mut rx, [4; 8], me).await;
        assert_eq!(metrics.drops(DropReason::BadControl), 2);
    }
}
