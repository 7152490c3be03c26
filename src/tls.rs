//! TLS for the control connection: rustls configurations for the gateway and the client,
//! PEM loading, certificate pinning, client identities, and the exporter call that yields
//! each association's secure-UDP keys.
//!
//! Choices made here, once for every caller:
//!
//! * The crypto provider is always rustls' *ring* provider, passed explicitly, so the
//!   process-wide default provider (which another dependency might install) never decides.
//! * TLS 1.3 only, unless a side opts into TLS 1.2. When TLS 1.2 is allowed, both sides
//!   require the extended master secret (RFC 7627): without it the RFC 5705 exporter, and so
//!   every UDP key, is open to the triple-handshake attack (RFC 7627 §5.4).
//! * No ALPN, so a plain TLS client (`openssl s_client`, a SOCKS5-over-TLS library) works.
//! * No 0-RTT: early data is replayable, and the control channel carries authentication.
//! * Session resumption on both sides. On the gateway, [`Resumption`]: in this process
//!   (stateless tickets plus [`SessionCache`]), stateful in a store shared by the cluster
//!   ([`crate::store::tls::StoreSessions`]), or stateless tickets under keys the cluster
//!   shares ([`crate::store::tls::StoreTicketer`]). On the client, rustls' in-memory
//!   session store.
//! * Client certificates are off, optional (a client without one may still authenticate
//!   with a password inside SOCKS5) or required. Certificate revocation lists, if given, are
//!   checked for the client's end-entity certificate; once any CRL is given, a client whose
//!   issuer has none is refused (unknown status is not trusted).
//!
//! [`export_keys`] works on a finished connection of either side; both sides get the same
//! [`KeySchedule`] for the same association id and suite (see [`crate::proto::keys`]).

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::proto::keys::{AssociationId, CipherSuite, KeySchedule, EXPORTER_LABEL};

/// Errors of TLS configuration and key export. Messages name the file (or other origin)
/// and the problem, e.g. `gateway.key: no private key found`.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("{origin}: cannot read: {error}")]
    Read {
        /// The file.
        origin: String,
        /// What the OS said.
        error: io::Error,
    },
    /// A PEM file is malformed.
    #[error("{origin}: malformed PEM: {error}")]
    Pem {
        /// The file.
        origin: String,
        /// What the PEM parser said.
        error: io::Error,
    },
    /// A PEM file holds no certificate.
    #[error("{origin}: no certificate found")]
    NoCertificate {
        /// The file.
        origin: String,
    },
    /// A PEM file holds no certificate revocation list.
    #[error("{origin}: no certificate revocation list (X509 CRL) found")]
    NoCrl {
        /// The file.
        origin: String,
    },
    /// CRLs were given but client certificates are off.
    #[error("certificate revocation lists given but no client CA is configured")]
    CrlWithoutCa,
    /// A PEM file holds no private key.
    #[error("{origin}: no private key found")]
    NoPrivateKey {
        /// The file.
        origin: String,
    },
    /// A certificate pin is not 64 hex digits.
    #[error("invalid certificate pin: {reason}")]
    BadPin {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A list of trust anchors is empty.
    #[error("{what}: no certificates given")]
    EmptyCertList {
        /// Which list ("server CA", "client CA").
        what: &'static str,
    },
    /// Client certificates are required but no client CA was given to check them against.
    #[error("client certificates are required but no client CA is configured")]
    RequiredWithoutCa,
    /// rustls refused part of the configuration.
    #[error("{what}: {error}")]
    Rustls {
        /// Which part ("gateway certificate and key", "client CA", ...).
        what: &'static str,
        /// What rustls said.
        error: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the client CA.
    #[error("client CA: {0}")]
    ClientVerifier(rustls::server::VerifierBuilderError),
    /// The TLS exporter failed (the handshake has not finished).
    #[error("TLS exporter: {0}")]
    Export(rustls::Error),
}

/// Why a TLS connection to a gateway failed, in the terms an operator checks: the one place
/// where rustls' errors become advice ([`handshake_problem`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeProblem {
    /// The gateway's certificate does not chain to a trusted CA.
    UntrustedIssuer,
    /// The gateway's certificate is not the pinned one.
    PinMismatch,
    /// The gateway's certificate does not carry the name asked for (SNI).
    NameMismatch,
    /// The gateway's certificate has expired.
    Expired,
    /// The gateway's certificate is not valid yet.
    NotYetValid,
    /// The gateway's certificate was refused for another reason (rustls' words).
    OtherCertificate(String),
    /// The gateway refused our client certificate, or wanted one we did not send.
    ClientCertRefused(String),
    /// The peer does not speak TLS (or not TLS we accept): a wrong port or service.
    NotTls(String),
}

impl HandshakeProblem {
    /// A certificate problem that no retry can fix (as opposed to [`HandshakeProblem::NotTls`],
    /// which may be a service restarting).
    pub fn is_certificate(&self) -> bool {
        !matches!(self, HandshakeProblem::NotTls(_))
    }
}

/// What the rustls error inside `e` (an I/O error of a TLS stream: handshake, or the first
/// reads after it, where a TLS 1.3 server's verdict on a client certificate arrives) means;
/// `None` when `e` holds no rustls error worth explaining (a reset, a timeout).
pub fn handshake_problem(e: &io::Error) -> Option<HandshakeProblem> {
    use rustls::AlertDescription as A;
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        // tokio-rustls reports a peer that closed during the handshake as a bare EOF.
        return (e.kind() == io::ErrorKind::UnexpectedEof && e.to_string().contains("handshake")).then(
            || HandshakeProblem::NotTls("the peer closed the connection during the TLS handshake".into()),
        );
    };
    Some(match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                HandshakeProblem::UntrustedIssuer
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                HandshakeProblem::NameMismatch
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => HandshakeProblem::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                HandshakeProblem::NotYetValid
            }
            CertificateError::Other(other) if other.0.downcast_ref::<PinMismatch>().is_some() => {
                HandshakeProblem::PinMismatch
            }
            other => HandshakeProblem::OtherCertificate(format!("{other:?}")),
        },
        rustls::Error::AlertReceived(
            alert @ (A::BadCertificate
            | A::CertificateRequired
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::AccessDenied),
        ) => HandshakeProblem::ClientCertRefused(format!("{alert:?}")),
        rustls::Error::InvalidMessage(m) => HandshakeProblem::NotTls(format!("not a TLS record ({m:?})")),
        rustls::Error::InappropriateMessage { .. } | rustls::Error::InappropriateHandshakeMessage { .. } => {
            HandshakeProblem::NotTls(tls.to_string())
        }
        rustls::Error::AlertReceived(A::ProtocolVersion) | rustls::Error::PeerIncompatible(_) => {
            HandshakeProblem::NotTls(format!("no TLS version or cipher in common: {tls}"))
        }
        _ => return None,
    })
}

/// Reads every certificate of a PEM file, in order (end-entity first for a chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let origin = path.display().to_string();
    let pem = std::fs::read(path).map_err(|error| TlsError::Read {
        origin: origin.clone(),
        error,
    })?;
    parse_certs(&pem, &origin)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let origin = path.display().to_string();
    let pem = Zeroizing::new(std::fs::read(path).map_err(|error| TlsError::Read {
        origin: origin.clone(),
        error,
    })?);
    parse_key(&pem, &origin)
}

/// Reads every certificate revocation list of a PEM file (one or a bundle).
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let origin = path.display().to_string();
    let pem = std::fs::read(path).map_err(|error| TlsError::Read {
        origin: origin.clone(),
        error,
    })?;
    parse_crls(&pem, &origin)
}

/// Parses every CRL of PEM text; `origin` names it in errors. Whether a CRL is well formed
/// and signed by a client CA is checked when the verifier is built
/// ([`server_config`]) and at each handshake.
pub fn parse_crls(pem: &[u8], origin: &str) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let crls = rustls_pemfile::crls(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            origin: origin.to_owned(),
            error,
        })?;
    if crls.is_empty() {
        return Err(TlsError::NoCrl {
            origin: origin.to_owned(),
        });
    }
    Ok(crls)
}

/// Parses every certificate of PEM text; `origin` names it in errors.
pub fn parse_certs(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            origin: origin.to_owned(),
            error,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            origin: origin.to_owned(),
        });
    }
    Ok(certs)
}

/// Parses the first private key of PEM text; `origin` names it in errors.
pub fn parse_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|error| TlsError::Pem {
            origin: origin.to_owned(),
            error,
        })?
        .ok_or_else(|| TlsError::NoPrivateKey {
            origin: origin.to_owned(),
        })
}

/// SHA-256 of a certificate's DER: the value a [`ServerTrust::Pin`] compares.
pub fn cert_sha256(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}

/// A pin as 64 lowercase hex digits, the form [`parse_pin`] reads and `--pin` takes.
pub fn pin_hex(pin: &[u8; 32]) -> String {
    hex::encode(pin)
}

/// Parses a SHA-256 pin: 64 hex digits, either case, or 32 colon-separated pairs (the form
/// `openssl x509 -fingerprint -sha256` prints after the `=`).
pub fn parse_pin(s: &str) -> Result<[u8; 32], TlsError> {
    let s = s.trim();
    let digits = if s.contains(':') {
        if s.split(':').count() != 32 || s.split(':').any(|pair| pair.len() != 2) {
            return Err(TlsError::BadPin {
                reason: "colon form must be 32 pairs of hex digits",
            });
        }
        s.replace(':', "")
    } else {
        s.to_owned()
    };
    if digits.len() != 64 {
        return Err(TlsError::BadPin {
            reason: "expected 64 hex digits (a SHA-256)",
        });
    }
    let mut pin = [0u8; 32];
    hex::decode_to_slice(&digits, &mut pin).map_err(|_| TlsError::BadPin {
        reason: "not hexadecimal",
    })?;
    Ok(pin)
}

/// What the gateway needs for its TLS configuration.
pub struct ServerTlsOptions {
    /// The gateway's certificate chain, end-entity first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The gateway's private key.
    pub key: PrivateKeyDer<'static>,
    /// Trust anchors for client certificates; `None` turns client certificates off.
    pub client_ca: Option<Vec<CertificateDer<'static>>>,
    /// Refuse clients without a certificate. Needs `client_ca`; when false, a client
    /// certificate is checked if presented, and a client without one must use a password.
    pub require_client_cert: bool,
    /// Revocation lists for client certificates (needs `client_ca`); empty: none checked.
    pub client_crls: Vec<CertificateRevocationListDer<'static>>,
    /// Accept TLS 1.2 (with extended master secret) as well as TLS 1.3.
    pub allow_tls12: bool,
}

/// How the gateway's TLS sessions resume, and where their state lives.
pub enum Resumption {
    /// This process only: stateless tickets under keys rustls keeps (and rotates) in
    /// memory, TLS 1.2 session ids in an in-memory [`SessionCache`]. What
    /// [`server_config`] builds; a client resumes only on the node that issued its ticket.
    Local,
    /// Stateful: every session in `storage`, TLS 1.3 tickets being lookup keys into it. The
    /// ticketer is off, since rustls consults the session storage for TLS 1.3 only then. With
    /// a shared store every node resumes every client.
    Stateful(Arc<dyn StoresServerSessions>),
    /// Stateless tickets sealed by `ticketer` (keys shared by the cluster), and TLS 1.2
    /// clients without tickets resuming by session id from `storage`.
    Tickets {
        /// Seals and opens tickets.
        ticketer: Arc<dyn ProducesTickets>,
        /// TLS 1.2 session-id storage.
        storage: Arc<dyn StoresServerSessions>,
    },
}

impl fmt::Debug for Resumption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resumption::Local => "Local",
            Resumption::Stateful(_) => "Stateful",
            Resumption::Tickets { .. } => "Tickets",
        })
    }
}

/// Builds the gateway's rustls configuration, resuming in this process only
/// ([`Resumption::Local`]).
pub fn server_config(opts: ServerTlsOptions) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_resuming(opts, Resumption::Local)
}

/// Builds the gateway's rustls configuration with `store` as its server-side session storage
/// for stateful resumption ([`Resumption::Stateful`]): the ticketer is off, so TLS 1.3
/// resumption goes through `store` too.
pub fn server_config_with_store(
    opts: ServerTlsOptions,
    store: Arc<dyn StoresServerSessions>,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_resuming(opts, Resumption::Stateful(store))
}

/// Builds the gateway's rustls configuration with the given [`Resumption`].
pub fn server_config_resuming(
    opts: ServerTlsOptions,
    resumption: Resumption,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(opts.allow_tls12))
        .map_err(|error| TlsError::Rustls {
            what: "protocol versions",
            error,
        })?;
    if opts.client_ca.is_none() && !opts.client_crls.is_empty() {
        return Err(TlsError::CrlWithoutCa);
    }
    let builder = match (opts.client_ca, opts.require_client_cert) {
        (None, true) => return Err(TlsError::RequiredWithoutCa),
        (None, false) => builder.with_no_client_auth(),
        (Some(cas), required) => {
            let roots = Arc::new(root_store(cas, "client CA")?);
            let mut verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
            if !opts.client_crls.is_empty() {
                // The end entity only: an operator revokes client certificates; a CA chain
                // is the operator's own. Unknown status stays an error (rustls' default).
                verifier = verifier
                    .with_crls(opts.client_crls)
                    .only_check_end_entity_revocation();
            }
            let verifier = if required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().map_err(TlsError::ClientVerifier)?)
        }
    };
    if opts.cert_chain.is_empty() {
        return Err(TlsError::EmptyCertList {
            what: "gateway certificate chain",
        });
    }
    let mut config = builder
        .with_single_cert(opts.cert_chain, opts.key)
        .map_err(|error| TlsError::Rustls {
            what: "gateway certificate and key",
            error,
        })?;
    match resumption {
        Resumption::Local => {
            config.session_storage = Arc::new(SessionCache::default());
            config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|error| TlsError::Rustls {
                what: "session ticket keys",
                error,
            })?;
        }
        Resumption::Stateful(storage) => {
            // The builder's default ticketer never produces tickets: keep it so.
            config.session_storage = storage;
        }
        Resumption::Tickets { ticketer, storage } => {
            config.session_storage = storage;
            config.ticketer = ticketer;
        }
    }
    config.require_ems = true;
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// Server-side TLS session storage (stateful resumption: TLS 1.2 session ids, and TLS 1.3
/// when tickets are off), behind rustls' [`StoresServerSessions`].
///
/// The session storage of [`Resumption::Local`]. A cluster uses
/// [`crate::store::tls::StoreSessions`] instead (stateful resumption through the shared
/// store, ticketer off) or [`crate::store::tls::StoreTicketer`] (tickets under keys every
/// node shares); see docs/CLUSTER.md.
#[derive(Debug)]
pub struct SessionCache {
    inner: Arc<ServerSessionMemoryCache>,
}

impl SessionCache {
    /// Sessions kept by [`SessionCache::default`].
    pub const DEFAULT_CAPACITY: usize = 4096;

    /// A cache of at most `capacity` sessions; the oldest are evicted first.
    pub fn new(capacity: usize) -> Self {
        SessionCache {
            inner: ServerSessionMemoryCache::new(capacity),
        }
    }
}

impl Default for SessionCache {
    fn default() -> Self {
        SessionCache::new(Self::DEFAULT_CAPACITY)
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.inner.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.take(key)
    }

    fn can_cache(&self) -> bool {
        self.inner.can_cache()
    }
}

/// How a client decides to trust the gateway.
#[derive(Clone)]
pub enum ServerTrust {
    /// Certificates chaining to one of these CAs, for the name the client connects to.
    Ca(Vec<CertificateDer<'static>>),
    /// Exactly the certificate whose DER has this SHA-256 ([`cert_sha256`]). Name and
    /// validity period are not checked, as with an SSH host key: renewing the certificate
    /// changes the pin.
    Pin([u8; 32]),
}

impl fmt::Debug for ServerTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerTrust::Ca(cas) => write!(f, "Ca({} certificates)", cas.len()),
            ServerTrust::Pin(pin) => write!(f, "Pin({})", pin_hex(pin)),
        }
    }
}

/// What a client needs for its TLS configuration.
pub struct ClientTlsOptions {
    /// How to trust the gateway.
    pub trust: ServerTrust,
    /// A client certificate chain and its key, if the client has one.
    pub client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    /// Offer TLS 1.2 (with extended master secret) as well as TLS 1.3.
    pub allow_tls12: bool,
}

/// Builds a client's rustls configuration. Sessions are kept in rustls' default in-memory
/// store, so reconnections through the same configuration resume.
pub fn client_config(opts: ClientTlsOptions) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(opts.allow_tls12))
        .map_err(|error| TlsError::Rustls {
            what: "protocol versions",
            error,
        })?;
    let builder = match opts.trust {
        ServerTrust::Ca(cas) => builder.with_root_certificates(root_store(cas, "server CA")?),
        ServerTrust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier { pin, provider })),
    };
    let mut config = match opts.client_auth {
        Some((chain, key)) => {
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| TlsError::Rustls {
                    what: "client certificate and key",
                    error,
                })?
        }
        None => builder.with_no_client_auth(),
    };
    config.require_ems = true;
    config.resumption = rustls::client::Resumption::store(Arc::new(TicketStore::default()));
    Ok(Arc::new(config))
}

/// TLS 1.3 tickets a client keeps per server name ([`TicketStore`]).
pub const CLIENT_TICKETS_PER_SERVER: usize = 4096;
/// Server names a client keeps sessions for.
const CLIENT_SESSION_SERVERS: usize = 64;

/// The client's TLS session cache: rustls' default keeps 8 TLS 1.3 tickets per server name,
/// and each ticket resumes one connection. A shim opens one control connection per
/// association, to one gateway name, so after a gateway loss its hundreds of associations
/// reconnect at once and all but 8 would make full handshakes. This store keeps up to
/// [`CLIENT_TICKETS_PER_SERVER`] tickets per name (each used once, oldest first) for up to 64
/// names, the name used longest ago forgotten first.
#[derive(Debug, Default)]
pub struct TicketStore {
    inner: std::sync::Mutex<TicketStoreInner>,
}

#[derive(Debug, Default)]
struct TicketStoreInner {
    servers: std::collections::HashMap<ServerName<'static>, ServerSessions>,
    /// Bumped on every use, to find the name used longest ago.
    clock: u64,
}

#[derive(Debug, Default)]
struct ServerSessions {
    kx: Option<rustls::NamedGroup>,
    tls12: Option<rustls::client::Tls12ClientSessionValue>,
    tls13: std::collections::VecDeque<rustls::client::Tls13ClientSessionValue>,
    used: u64,
}

impl TicketStore {
    fn with<R>(&self, name: ServerName<'static>, f: impl FnOnce(&mut ServerSessions) -> R) -> R {
        // A poisoned lock only means a caller panicked mid-update of a cache entry.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock += 1;
        let now = inner.clock;
        if !inner.servers.contains_key(&name) && inner.servers.len() >= CLIENT_SESSION_SERVERS {
            if let Some(oldest) = inner
                .servers
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| k.clone())
            {
                inner.servers.remove(&oldest);
            }
        }
        let entry = inner.servers.entry(name).or_default();
        entry.used = now;
        f(entry)
    }

    fn with_existing<R>(
        &self,
        name: &ServerName<'_>,
        f: impl FnOnce(&mut ServerSessions) -> Option<R>,
    ) -> Option<R> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.servers.get_mut(&name.to_owned()).and_then(f)
    }

    /// TLS 1.3 tickets held for `name` (tests, metrics).
    pub fn tickets(&self, name: &ServerName<'_>) -> usize {
        self.with_existing(name, |s| Some(s.tls13.len())).unwrap_or(0)
    }
}

impl rustls::client::ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        self.with(name, |s| s.kx = Some(group));
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.with_existing(name, |s| s.kx)
    }

    fn set_tls12_session(&self, name: ServerName<'static>, value: rustls::client::Tls12ClientSessionValue) {
        self.with(name, |s| s.tls12 = Some(value));
    }

    fn tls12_session(&self, name: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.with_existing(name, |s| s.tls12.clone())
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.with_existing(name, |s| s.tls12.take());
    }

    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: rustls::client::Tls13ClientSessionValue) {
        self.with(name, |s| {
            if s.tls13.len() >= CLIENT_TICKETS_PER_SERVER {
                s.tls13.pop_front();
            }
            s.tls13.push_back(value);
        });
    }

    fn take_tls13_ticket(
        &self,
        name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.with_existing(name, |s| s.tls13.pop_front())
    }
}

/// A finished TLS connection that can run the exporter (RFC 8446 §7.5, RFC 5705).
///
/// Implemented for both sides' rustls connections so that [`export_keys`] serves the
/// gateway and the client alike.
pub trait ExportKeyingMaterial {
    /// Fills `output` with exporter output for `label` and `context`.
    fn export_material(&self, output: &mut [u8], label: &[u8], context: &[u8]) -> Result<(), rustls::Error>;
}

impl ExportKeyingMaterial for rustls::ServerConnection {
    fn export_material(&self, output: &mut [u8], label: &[u8], context: &[u8]) -> Result<(), rustls::Error> {
        self.export_keying_material(output, label, Some(context))
            .map(drop)
    }
}

impl ExportKeyingMaterial for rustls::ClientConnection {
    fn export_material(&self, output: &mut [u8], label: &[u8], context: &[u8]) -> Result<(), rustls::Error> {
        self.export_keying_material(output, label, Some(context))
            .map(drop)
    }
}

impl ExportKeyingMaterial for rustls::Connection {
    fn export_material(&self, output: &mut [u8], label: &[u8], context: &[u8]) -> Result<(), rustls::Error> {
        self.export_keying_material(output, label, Some(context))
            .map(drop)
    }
}

/// Derives the secure-UDP keys of association `assoc` under `suite` from a finished TLS
/// connection: exporter label [`EXPORTER_LABEL`], context
/// [`KeySchedule::exporter_context`]. The raw material is zeroized before returning.
pub fn export_keys(
    conn: &impl ExportKeyingMaterial,
    assoc: AssociationId,
    suite: CipherSuite,
) -> Result<KeySchedule, TlsError> {
    let mut material = Zeroizing::new(vec![0u8; suite.exporter_len()]);
    let context = KeySchedule::exporter_context(assoc, suite);
    conn.export_material(&mut material, EXPORTER_LABEL, &context)
        .map_err(TlsError::Export)?;
    // Invariant: `material` is exactly `suite.exporter_len()` bytes, the one length
    // `from_exporter` accepts.
    Ok(KeySchedule::from_exporter(suite, &material).expect("exporter output of the suite's length"))
}

/// [`export_keys`] for epoch `epoch` of a re-attached association (context
/// [`KeySchedule::epoch_context`]; epoch 0 is `export_keys` itself).
pub fn export_epoch_keys(
    conn: &impl ExportKeyingMaterial,
    assoc: AssociationId,
    suite: CipherSuite,
    epoch: u32,
) -> Result<KeySchedule, TlsError> {
    let mut material = Zeroizing::new(vec![0u8; suite.exporter_len()]);
    let context = KeySchedule::epoch_context(assoc, suite, epoch);
    conn.export_material(&mut material, EXPORTER_LABEL, &context)
        .map_err(TlsError::Export)?;
    // Invariant: as in `export_keys`.
    Ok(KeySchedule::from_exporter(suite, &material).expect("exporter output of the suite's length"))
}

/// The identity in the client's certificate, if it presented one: the first DNS or URI
/// subject alternative name, else the subject's common name.
///
/// The certificate has been verified against the client CA by the time the handshake
/// finishes, so this names an authenticated client.
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<String> {
    cert_identity(conn.peer_certificates()?.first()?)
}

/// The client's verified end-entity certificate, if it presented one.
pub fn peer_certificate(conn: &rustls::ServerConnection) -> Option<CertificateDer<'static>> {
    Some(conn.peer_certificates()?.first()?.clone().into_owned())
}

/// The identity a certificate names: its first DNS or URI subject alternative name, else
/// its subject's common name. `None` if it names neither or does not parse.
pub fn cert_identity(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;

    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) | GeneralName::URI(n) = name {
                return Some((*n).to_owned());
            }
        }
    }
    let cn = x509.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
static TLS13_AND_12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

fn versions(allow_tls12: bool) -> &'static [&'static SupportedProtocolVersion] {
    if allow_tls12 {
        TLS13_AND_12
    } else {
        TLS13_ONLY
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(cas: Vec<CertificateDer<'static>>, what: &'static str) -> Result<RootCertStore, TlsError> {
    if cas.is_empty() {
        return Err(TlsError::EmptyCertList { what });
    }
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|error| TlsError::Rustls { what, error })?;
    }
    Ok(roots)
}

/// Trusts exactly one server certificate, by the SHA-256 of its DER, and still checks that
/// the server holds its key (the handshake signature).
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

/// Why a pinned server was refused; surfaces as rustls' "invalid peer certificate".
#[derive(thiserror::Error)]
#[error("server certificate does not match the pinned SHA-256")]
struct PinMismatch;

// rustls shows the reason inside "invalid peer certificate: Other(..)" with `Debug`, so
// `Debug` says what `Display` does.
impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if ct_eq(&cert_sha256(end_entity), &self.pin) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch)),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Equality whose running time does not depend on where the inputs differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::time::Duration;

    use rustls::HandshakeKind;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::timeout;
    use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

    use super::*;
    use crate::cert::{self, DevPki};

    const LIMIT: Duration = Duration::from_secs(10);

    fn pki() -> &'static DevPki {
        static PKI: OnceLock<DevPki> = OnceLock::new();
        PKI.get_or_init(cert::ephemeral)
    }

    fn server(client_ca: bool, require_client_cert: bool, allow_tls12: bool) -> Arc<ServerConfig> {
        server_config(ServerTlsOptions {
            cert_chain: pki().gateway_chain(),
            key: pki().gateway_key(),
            client_ca: client_ca.then(|| vec![pki().ca_der()]),
            require_client_cert,
            client_crls: Vec::new(),
            allow_tls12,
        })
        .unwrap()
    }

    fn client(trust: ServerTrust, with_cert: bool) -> Arc<ClientConfig> {
        client_config(ClientTlsOptions {
            trust,
            client_auth: with_cert.then(|| (pki().client_chain(), pki().client_key())),
            allow_tls12: false,
        })
        .unwrap()
    }

    fn ca_trust() -> ServerTrust {
        ServerTrust::Ca(vec![pki().ca_der()])
    }

    struct Pair {
        server: io::Result<server::TlsStream<TcpStream>>,
        client: io::Result<client::TlsStream<TcpStream>>,
    }

    /// One handshake over loopback TCP; then, if both sides succeeded, the server sends a
    /// byte and the client reads it, so the client has processed any session tickets.
    async fn connect(server_cfg: Arc<ServerConfig>, client_cfg: Arc<ClientConfig>) -> Pair {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server_cfg);
        let connector = TlsConnector::from(client_cfg);
        let server = async {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            tls.write_all(b"!").await?;
            tls.flush().await?;
            Ok(tls)
        };
        let client = async {
            let tcp = TcpStream::connect(addr).await?;
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            Ok(tls)
        };
        let (server, client) = timeout(LIMIT, async { tokio::join!(server, client) })
            .await
            .expect("handshake finished in time");
        Pair { server, client }
    }

    fn same_keys(a: &KeySchedule, b: &KeySchedule) -> bool {
        let dir = |x: &crate::proto::DirectionKeys, y: &crate::proto::DirectionKeys| {
            x.enc() == y.enc() && x.mac() == y.mac() && x.iv() == y.iv()
        };
        dir(&a.c2g, &b.c2g) && dir(&a.g2c, &b.g2c)
    }

    #[tokio::test]
    async fn ca_trust_handshakes_and_keys_agree() {
        let pair = connect(server(false, false, false), client(ca_trust(), false)).await;
        let (s, c) = (pair.server.unwrap(), pair.client.unwrap());
        let (sc, cc) = (s.get_ref().1, c.get_ref().1);
        assert_eq!(sc.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert!(sc.alpn_protocol().is_none());
        assert_eq!(peer_identity(sc), None);
        for suite in CipherSuite::ALL {
            let a = AssociationId(0x0123_4567_89ab_cdef);
            let gw = export_keys(sc, a, suite).unwrap();
            let cl = export_keys(cc, a, suite).unwrap();
            assert!(same_keys(&gw, &cl));
            assert_eq!(gw.c2g.enc().len(), suite.enc_key_len());
            let other = export_keys(cc, AssociationId(a.0 + 1), suite).unwrap();
            assert!(!same_keys(&gw, &other));
            if !suite.is_aead() {
                assert_ne!(gw.c2g.mac(), gw.g2c.mac()); // AEAD suites have none
            }
            assert_ne!(gw.c2g.iv(), gw.g2c.iv());
        }
        // The suite is part of the context: the same id under another suite gives other keys.
        let a = AssociationId(7);
        let k1 = export_keys(sc, a, CipherSuite::Aes128CbcHmacSha256).unwrap();
        let k2 = export_keys(sc, a, CipherSuite::Aes256CbcHmacSha256).unwrap();
        assert_ne!(k1.c2g.mac(), k2.c2g.mac());
    }

    #[tokio::test]
    async fn ca_trust_refuses_a_server_from_another_ca() {
        let other = cert::ephemeral();
        let pair = connect(
            server(false, false, false),
            client(ServerTrust::Ca(vec![other.ca_der()]), false),
        )
        .await;
        assert!(pair.client.is_err());
        assert!(pair.server.is_err());
    }

    #[tokio::test]
    async fn pin_trust() {
        let good = ServerTrust::Pin(pki().gateway_pin());
        let pair = connect(server(false, false, false), client(good, false)).await;
        let (s, c) = (pair.server.unwrap(), pair.client.unwrap());
        let a = AssociationId(42);
        let suite = CipherSuite::Aes128CbcHmacSha256;
        assert!(same_keys(
            &export_keys(s.get_ref().1, a, suite).unwrap(),
            &export_keys(c.get_ref().1, a, suite).unwrap()
        ));

        let mut wrong = pki().gateway_pin();
        wrong[31] ^= 1;
        let pair = connect(
            server(false, false, false),
            client(ServerTrust::Pin(wrong), false),
        )
        .await;
        let err = pair.client.unwrap_err();
        assert!(err.to_string().contains("pinned SHA-256"), "{err}");
        assert!(pair.server.is_err());
    }

    #[tokio::test]
    async fn pin_still_checks_the_handshake_signature() {
        // An impostor presenting the pinned certificate without its key must fail the
        // CertificateVerify check rather than pass on the pin alone. rustls refuses a
        // mismatched certificate and key in `with_single_cert`, so serve them through a
        // resolver, which does not check.
        #[derive(Debug)]
        struct Fixed(Arc<rustls::sign::CertifiedKey>);
        impl rustls::server::ResolvesServerCert for Fixed {
            fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
                Some(self.0.clone())
            }
        }
        let other = cert::ephemeral();
        let key = provider()
            .key_provider
            .load_private_key(other.gateway_key())
            .unwrap();
        let stolen = rustls::sign::CertifiedKey::new(pki().gateway_chain(), key);
        let impostor = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(TLS13_ONLY)
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(Arc::new(stolen))));
        let pinned = client(ServerTrust::Pin(pki().gateway_pin()), false);
        let pair = connect(Arc::new(impostor), pinned).await;
        let err = pair.client.unwrap_err();
        assert!(err.to_string().contains("BadSignature"), "{err}");
        assert!(pair.server.is_err());
    }

    #[tokio::test]
    async fn mtls_required() {
        let pair = connect(server(true, true, false), client(ca_trust(), false)).await;
        assert!(
            pair.server.is_err(),
            "server accepted a client without a certificate"
        );
        // In TLS 1.3 the client finishes first; it learns of the refusal on its first read.
        assert!(pair.client.is_err());

        let pair = connect(server(true, true, false), client(ca_trust(), true)).await;
        let s = pair.server.unwrap();
        pair.client.unwrap();
        assert_eq!(
            peer_identity(s.get_ref().1).as_deref(),
            Some(cert::DEFAULT_CLIENT_NAME)
        );
    }

    #[tokio::test]
    async fn mtls_optional() {
        let pair = connect(server(true, false, false), client(ca_trust(), false)).await;
        assert_eq!(peer_identity(pair.server.unwrap().get_ref().1), None);
        pair.client.unwrap();

        let pair = connect(server(true, false, false), client(ca_trust(), true)).await;
        let s = pair.server.unwrap();
        assert_eq!(
            peer_identity(s.get_ref().1).as_deref(),
            Some(cert::DEFAULT_CLIENT_NAME)
        );

        // A certificate from another CA is refused even though certificates are optional.
        let other = cert::ephemeral();
        let stranger = client_config(ClientTlsOptions {
            trust: ca_trust(),
            client_auth: Some((other.client_chain(), other.client_key())),
            allow_tls12: false,
        })
        .unwrap();
        let pair = connect(server(true, false, false), stranger).await;
        assert!(pair.server.is_err());
    }

    #[test]
    fn required_client_cert_needs_a_ca() {
        let err = server_config(ServerTlsOptions {
            cert_chain: pki().gateway_chain(),
            key: pki().gateway_key(),
            client_ca: None,
            require_client_cert: true,
            client_crls: Vec::new(),
            allow_tls12: false,
        })
        .unwrap_err();
        assert!(matches!(err, TlsError::RequiredWithoutCa));
    }

    fn tls12_only_client() -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(pki().ca_der()).unwrap();
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    #[tokio::test]
    async fn tls12_refused_unless_allowed() {
        let pair = connect(server(false, false, false), tls12_only_client()).await;
        assert!(pair.server.is_err());
        assert!(pair.client.is_err());

        let pair = connect(server(false, false, true), tls12_only_client()).await;
        let (s, c) = (pair.server.unwrap(), pair.client.unwrap());
        let (sc, cc) = (s.get_ref().1, c.get_ref().1);
        assert_eq!(sc.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
        let a = AssociationId(9);
        let suite = CipherSuite::Aes256CbcHmacSha256;
        assert!(same_keys(
            &export_keys(sc, a, suite).unwrap(),
            &export_keys(cc, a, suite).unwrap()
        ));

        // Our own client offers 1.2 only when allowed; against a 1.3 server it still uses 1.3.
        let ours = client_config(ClientTlsOptions {
            trust: ca_trust(),
            client_auth: None,
            allow_tls12: true,
        })
        .unwrap();
        let pair = connect(server(false, false, false), ours).await;
        let c = pair.client.unwrap();
        assert_eq!(
            c.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
    }

    #[tokio::test]
    async fn sessions_resume_and_keep_the_client_identity() {
        let server_cfg = server(true, true, false);
        let client_cfg = client(ca_trust(), true);
        let first = connect(server_cfg.clone(), client_cfg.clone()).await;
        let first_c = first.client.unwrap();
        assert_eq!(first_c.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
        let first_s = first.server.unwrap();

        let second = connect(server_cfg, client_cfg).await;
        let (s, c) = (second.server.unwrap(), second.client.unwrap());
        assert_eq!(c.get_ref().1.handshake_kind(), Some(HandshakeKind::Resumed));
        assert_eq!(
            peer_identity(s.get_ref().1).as_deref(),
            Some(cert::DEFAULT_CLIENT_NAME)
        );
        // A resumed connection has its own exporter secret.
        let a = AssociationId(1);
        let suite = CipherSuite::Aes128CbcHmacSha256;
        let resumed = export_keys(s.get_ref().1, a, suite).unwrap();
        assert!(same_keys(
            &resumed,
            &export_keys(c.get_ref().1, a, suite).unwrap()
        ));
        assert!(!same_keys(
            &resumed,
            &export_keys(first_s.get_ref().1, a, suite).unwrap()
        ));
    }

    #[test]
    fn session_cache_stores() {
        let cache = SessionCache::new(2);
        assert!(cache.can_cache());
        assert!(cache.put(b"k".to_vec(), b"v".to_vec()));
        assert_eq!(cache.get(b"k").as_deref(), Some(&b"v"[..]));
        assert_eq!(cache.take(b"k").as_deref(), Some(&b"v"[..]));
        assert_eq!(cache.get(b"k"), None);
    }

    #[test]
    fn export_before_handshake_fails() {
        let conn = rustls::ClientConnection::new(
            client(ca_trust(), false),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let err = export_keys(&conn, AssociationId(1), CipherSuite::Aes128CbcHmacSha256);
        assert!(matches!(err, Err(TlsError::Export(_))));
    }

    #[test]
    fn pins_parse() {
        let pin = pki().gateway_pin();
        let hex = pin_hex(&pin);
        assert_eq!(hex.len(), 64);
        assert_eq!(parse_pin(&hex).unwrap(), pin);
        assert_eq!(parse_pin(&hex.to_uppercase()).unwrap(), pin);
        let colons = hex
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_pin(&format!(" {colons}\n")).unwrap(), pin);
        assert!(parse_pin(&hex[1..]).is_err());
        assert!(parse_pin(&format!("{}zz", &hex[2..])).is_err());
        assert!(parse_pin(&colons[1..]).is_err());
        assert!(parse_pin("").is_err());
    }

    #[test]
    fn ct_eq_compares() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(ct_eq(&a, &b));
        b[0] ^= 0x80;
        assert!(!ct_eq(&a, &b));
    }

    #[test]
    fn pem_errors_name_the_origin() {
        let err = parse_key(pki().gateway_cert_pem.as_bytes(), "gateway.key").unwrap_err();
        assert_eq!(err.to_string(), "gateway.key: no private key found");
        let err = parse_certs(pki().gateway_key_pem.as_bytes(), "gateway.pem").unwrap_err();
        assert_eq!(err.to_string(), "gateway.pem: no certificate found");
        let err = parse_certs(b"-----BEGIN CERTIFICATE-----\n!!!\n", "bad.pem").unwrap_err();
        assert!(err.to_string().starts_with("bad.pem: malformed PEM"), "{err}");
        let missing = Path::new("/nonexistent/sudp/gateway.key");
        let err = load_key(missing).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/sudp/gateway.key: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn identity_prefers_san_then_cn() {
        assert_eq!(
            cert_identity(&pki().client_chain()[0]).as_deref(),
            Some(cert::DEFAULT_CLIENT_NAME)
        );
        assert_eq!(
            cert_identity(&pki().gateway_chain()[0]).as_deref(),
            Some("localhost")
        );
        assert_eq!(cert_identity(&CertificateDer::from(vec![0x30, 0x00])), None);

        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cn-only");
        let cn_only = params.self_signed(&key).unwrap();
        assert_eq!(cert_identity(cn_only.der()).as_deref(), Some("cn-only"));
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        fn colon_form(pin: &[u8; 32]) -> String {
            pin.iter()
                .map(|b| format!("{b:02X}"))
                .collect::<Vec<_>>()
                .join(":")
        }

        proptest! {
            /// A pin in either printed form (64 hex digits in either case, or 32
            /// colon-separated pairs) parses back to itself; one digit missing, one digit
            /// not hex, or a pair of three digits is refused.
            #[test]
            fn pins_round_trip_and_refuse_one_wrong_digit(pin in any::<[u8; 32]>(), at in 0usize..64, upper in any::<bool>()) {
                let hex = pin_hex(&pin);
                let hex = if upper { hex.to_uppercase() } else { hex };
                prop_assert_eq!(parse_pin(&format!(" {hex} ")).unwrap(), pin);
                prop_assert_eq!(parse_pin(&colon_form(&pin)).unwrap(), pin);
                let mut short = hex.clone();
                short.remove(at);
                prop_assert!(parse_pin(&short).is_err());
                let mut not_hex = hex.clone();
                not_hex.replace_range(at..at + 1, "g");
                prop_assert!(parse_pin(&not_hex).is_err());
                let mut long_pair = colon_form(&pin);
                long_pair.insert(3 * (at / 2), '0');
                prop_assert!(parse_pin(&long_pair).is_err());
            }
        }

        /// A PEM file of generated certificates and a key, with arbitrary text between the
        /// blocks (as `openssl` and editors leave): every certificate comes back, in order,
        /// byte for byte, and the key too; a file whose one block is cut short is refused
        /// or loses that block, never yields other bytes.
        #[test]
        fn pem_blocks_survive_surrounding_text() {
            let certs: Vec<rcgen::CertifiedKey<rcgen::KeyPair>> = (0..3)
                .map(|i| rcgen::generate_simple_self_signed(vec![format!("h{i}.test")]).unwrap())
                .collect();
            let ders: Vec<Vec<u8>> = certs.iter().map(|c| c.cert.der().to_vec()).collect();
            let mut runner = proptest::test_runner::TestRunner::default();
            let junk = prop::collection::vec("[ -~]{0,30}", 0..3);
            let strategy = (
                prop::collection::vec((0usize..3, junk.clone()), 1..5),
                junk,
                0usize..3,
                any::<prop::sample::Index>(),
            );
            runner
                .run(&strategy, |(picks, tail, which, cut)| {
                    let mut pem = String::new();
                    let mut want = Vec::new();
                    for (i, junk) in &picks {
                        for line in junk {
                            // Text outside blocks may be anything but a boundary line.
                            if !line.contains("-----") {
                                pem.push_str(line);
                                pem.push('\n');
                            }
                        }
                        pem.push_str(&certs[*i].cert.pem());
                        want.push(ders[*i].clone());
                    }
                    for line in &tail {
                        if !line.contains("-----") {
                            pem.push_str(line);
                            pem.push('\n');
                        }
                    }
                    let got: Vec<Vec<u8>> = parse_certs(pem.as_bytes(), "p")
                        .unwrap()
                        .iter()
                        .map(|c| c.to_vec())
                        .collect();
                    prop_assert_eq!(got, want.clone());
                    let key_pem = format!("junk\n{}trailing\n", certs[which].signing_key.serialize_pem());
                    let key = parse_key(key_pem.as_bytes(), "k").unwrap();
                    prop_assert_eq!(key.secret_der(), &certs[which].signing_key.serialize_der()[..]);
                    // Cut one certificate's base64 short.
                    let one = certs[which].cert.pem();
                    let body_start = one.find('\n').unwrap() + 1;
                    let body_end = one.rfind("-----END").unwrap();
                    let cut_at = body_start + cut.index(body_end - body_start);
                    let broken = format!("{}{}", &one[..cut_at], &one[body_end..]);
                    if let Ok(got) = parse_certs(broken.as_bytes(), "p") {
                        prop_assert!(got
                            .iter()
                            .all(|c| c.as_ref() != &ders[which][..] || cut_at == body_end));
                    }
                    prop_assert!(
                        parse_certs(b"no pem here\n", "p").is_err()
                            || parse_certs(b"no pem here\n", "p").unwrap().is_empty()
                    );
                    Ok(())
                })
                .unwrap();
        }
    }
}
