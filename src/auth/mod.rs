//! Client authentication behind one trait.
//!
//! A [`Backend`] turns [`Credentials`] into an [`Identity`]: the users file ([`Users`],
//! RFC 1929 username/password and the sudp method's credentials) and client certificates
//! ([`Certificates`], verified by rustls during the TLS handshake) are always built in; with
//! the `kerberos` cargo feature, `kerberos` adds Kerberos password verification against a
//! KDC (checked against the gateway's own keytab) and the GSS-API method of RFC 1961.
//! Several backends may check one kind of credentials in turn ([`FirstOf`]: the users file,
//! then the KDC). The limits on verification (bounded concurrency with a deadline-aware
//! queue, a per-source failure rate) wrap the trait once, in [`Authenticator`], so that
//! every backend gets them.
//!
//! **Identities do not collide.** An [`Identity`] is a method and a name. Policy lookups,
//! logs and (later) re-attach checks use its [qualified name](Identity::qualified):
//! a password user is its bare name (`ops`), a certificate identity is `cert:` and the
//! certificate's name (`cert:ops`), a Kerberos principal is `krb:` and the principal with its
//! realm (`krb:alice@EXAMPLE.COM`), however it authenticated (password checked by the KDC, or
//! a GSS-API ticket): one principal, one set of `[users_policy."krb:..."]` rules. A
//! users-file name cannot contain `:`, so no password user can ever be named like a
//! certificate or a principal, and a CA-issued certificate named `ops` never gets
//! `[users_policy.ops]`'s rules (it gets `[users_policy."cert:ops"]`'s). Two identities are
//! equal only if both method and name are.

#[cfg(feature = "kerberos")]
pub mod kerberos;
mod limits;
mod users;

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::pki_types::CertificateDer;
use zeroize::Zeroizing;

#[cfg(feature = "kerberos")]
pub use kerberos::ServiceKey;
pub use limits::{source_key, AuthLimits, Authenticator, Verdict};
pub use users::{
    hash_password, run_passwd, AuthError, PasswdArgs, ReloadableUsers, Users, MAX_LEN, MAX_M_COST,
    MAX_P_COST, MAX_T_COST,
};

/// Prefix of certificate identities in policy keys and logs.
pub const CERT_PREFIX: &str = "cert:";

/// The gateway's Kerberos service key. This build has no Kerberos (cargo feature
/// `kerberos`), so there is no value of this type: [`ServiceKey::load`] always fails, and
/// the config refuses Kerberos keys before it is reached.
#[cfg(not(feature = "kerberos"))]
#[derive(Debug, Clone)]
pub enum ServiceKey {}

#[cfg(not(feature = "kerberos"))]
impl ServiceKey {
    /// Always an error: this build has no Kerberos.
    pub fn load(_keytab: &std::path::Path, _service: &str) -> anyhow::Result<ServiceKey> {
        anyhow::bail!("this sudp was built without Kerberos support (cargo feature `kerberos`)")
    }
}

/// Prefix of Kerberos identities (password via the KDC, or GSS-API) in policy keys and logs.
pub const KRB_PREFIX: &str = "krb:";

/// How a client authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// A name and password checked against the users file.
    Password,
    /// A client certificate verified against the client CA (and CRLs) in the TLS handshake.
    Certificate,
    /// A name and password (RFC 1929 or the sudp hello) for which the KDC issued a ticket
    /// that the gateway's keytab verified (an identity's method only: on the wire these are
    /// [`Method::Password`] credentials).
    Kerberos,
    /// A GSS-API (Kerberos 5) security context accepted with the gateway's keytab (SOCKS5
    /// method 0x01, RFC 1961).
    Gssapi,
}

impl Method {
    /// Every method, in [`Method::index`] order.
    pub const ALL: [Method; 4] = [
        Method::Password,
        Method::Certificate,
        Method::Kerberos,
        Method::Gssapi,
    ];

    /// The methods credentials arrive with on the wire, which authentication failures are
    /// counted by (a password the KDC refused is a `password` failure).
    pub const CREDENTIALS: [Method; 3] = [Method::Password, Method::Certificate, Method::Gssapi];

    /// Stable lower-case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Method::Password => "password",
            Method::Certificate => "certificate",
            Method::Kerberos => "kerberos",
            Method::Gssapi => "gssapi",
        }
    }

    /// Dense index, for per-method counters.
    pub fn index(self) -> usize {
        match self {
            Method::Password => 0,
            Method::Certificate => 1,
            Method::Kerberos => 2,
            Method::Gssapi => 3,
        }
    }
}

/// Who a connection authenticated as: the method and the name it established.
///
/// Equality compares both, so a certificate named `ops` and the password user `ops` are
/// different identities (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    method: Method,
    name: String,
}

impl Identity {
    /// A password user (a users-file name, which never contains `:`).
    pub fn password(name: &str) -> Identity {
        Identity {
            method: Method::Password,
            name: name.to_owned(),
        }
    }

    /// The identity a verified client certificate names.
    pub fn certificate(name: &str) -> Identity {
        Identity {
            method: Method::Certificate,
            name: name.to_owned(),
        }
    }

    /// A Kerberos principal (`user@REALM`), established by `method` ([`Method::Kerberos`]
    /// or [`Method::Gssapi`]).
    pub fn kerberos(principal: &str, method: Method) -> Identity {
        Identity {
            method,
            name: principal.to_owned(),
        }
    }

    /// How it was established.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The bare name (user name, or the certificate's name without the prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name policy and logs use: `NAME` for a password user, `cert:NAME` for a
    /// certificate, `krb:user@REALM` for a Kerberos principal. This is the
    /// `[users_policy.KEY]` key that applies.
    pub fn qualified(&self) -> String {
        match self.method {
            Method::Password => self.name.clone(),
            Method::Certificate => format!("{CERT_PREFIX}{}", self.name),
            Method::Kerberos | Method::Gssapi => format!("{KRB_PREFIX}{}", self.name),
        }
    }

    /// The Kerberos realm of a principal identity (`EXAMPLE.COM` of `alice@EXAMPLE.COM`).
    pub fn realm(&self) -> Option<&str> {
        match self.method {
            Method::Kerberos | Method::Gssapi => self.name.rsplit_once('@').map(|(_, r)| r),
            Method::Password | Method::Certificate => None,
        }
    }
}

/// Escaped for logs (the name may come from a certificate or the wire).
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&crate::logsafe::Peer(self.qualified().as_bytes()), f)
    }
}

/// What a client presented.
pub enum Credentials {
    /// A name and password (RFC 1929, or the sudp hello).
    Password {
        /// The user name as sent (any bytes).
        user: Vec<u8>,
        /// The password as sent; zeroized on drop.
        pass: Zeroizing<Vec<u8>>,
    },
    /// The end-entity certificate of a TLS handshake that rustls already verified.
    Certificate(CertificateDer<'static>),
    /// A GSS-API initial context token (RFC 1961 §3), with the slot where the backend
    /// leaves the context it accepted and the token to send back.
    Gssapi(Arc<GssExchange>),
}

/// One GSS-API context establishment: the client's token in, the accepted context and the
/// reply token out. The caller keeps a clone of the `Arc` it passes in [`Credentials::Gssapi`]
/// and takes the [`GssAccepted`] once the [`Authenticator`] said `Accepted`.
pub struct GssExchange {
    token: Zeroizing<Vec<u8>>,
    accepted: Mutex<Option<GssAccepted>>,
}

impl GssExchange {
    /// An exchange for the client's initial token.
    pub fn new(token: Vec<u8>) -> Arc<GssExchange> {
        Arc::new(GssExchange {
            token: Zeroizing::new(token),
            accepted: Mutex::new(None),
        })
    }

    /// The client's token.
    pub fn token(&self) -> &[u8] {
        &self.token
    }

    /// Leaves the outcome of a successful acceptance (for the backend).
    pub fn set_accepted(&self, accepted: GssAccepted) {
        // A poisoned lock only means a thread panicked while storing the outcome.
        *self.accepted.lock().unwrap_or_else(|e| e.into_inner()) = Some(accepted);
    }

    /// Takes the outcome of a successful acceptance (for the caller).
    pub fn take_accepted(&self) -> Option<GssAccepted> {
        // A poisoned lock only means a thread panicked while storing the outcome.
        self.accepted.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// What an accepted GSS-API context leaves for the rest of the RFC 1961 exchange.
pub struct GssAccepted {
    /// The token for the client (Kerberos' AP-REP when the client asked for mutual
    /// authentication); empty: none to send.
    pub reply: Vec<u8>,
    /// The established context, for the protection-level sub-negotiation (RFC 1961 §4);
    /// dropping it deletes the context and its keys.
    pub context: Box<dyn GssContext>,
}

/// Per-message protection of an established GSS-API context (the only use sudp has for it:
/// the protection-level message of RFC 1961 §4).
pub trait GssContext: Send {
    /// `gss_unwrap`: the message inside a token from the peer.
    fn unwrap(&mut self, token: &[u8]) -> Option<Zeroizing<Vec<u8>>>;
    /// `gss_wrap` with integrity (and confidentiality where the mechanism offers it).
    fn wrap(&mut self, message: &[u8]) -> Option<Vec<u8>>;
}

impl Credentials {
    /// Credentials from a name and password.
    pub fn password(user: &[u8], pass: &[u8]) -> Credentials {
        Credentials::Password {
            user: user.to_vec(),
            pass: Zeroizing::new(pass.to_vec()),
        }
    }

    /// Which method checks them.
    pub fn method(&self) -> Method {
        match self {
            Credentials::Password { .. } => Method::Password,
            Credentials::Certificate(_) => Method::Certificate,
            Credentials::Gssapi(_) => Method::Gssapi,
        }
    }

    /// The name claimed, for logs (escape it: it is peer-supplied).
    pub fn claimed_name(&self) -> Vec<u8> {
        match self {
            Credentials::Password { user, .. } => user.clone(),
            Credentials::Certificate(cert) => {
                crate::tls::cert_identity(cert).unwrap_or_default().into_bytes()
            }
            // The name is inside the encrypted ticket: unknown until accepted.
            Credentials::Gssapi(_) => b"(gss-api token)".to_vec(),
        }
    }
}

/// Never shows the password.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Password { user, .. } => f
                .debug_struct("Password")
                .field("user", &crate::logsafe::Peer(user).to_string())
                .finish_non_exhaustive(),
            Credentials::Certificate(_) => f.write_str("Certificate(..)"),
            Credentials::Gssapi(x) => write!(f, "Gssapi({} bytes)", x.token.len()),
        }
    }
}

/// What a check costs, which decides how [`Authenticator`] runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Microseconds (parsing a verified certificate): run inline.
    Cheap,
    /// Milliseconds of CPU and megabytes of memory (Argon2, a KDC round trip): run on the
    /// blocking pool, at most [`AuthLimits::concurrency`] at once, queued with a deadline.
    Expensive,
}

/// One way of authenticating clients.
///
/// A backend only decides; [`Authenticator`] applies the limits, counts failures and
/// says what a client gets.
pub trait Backend: Send + Sync + 'static {
    /// The method whose credentials this backend checks.
    fn method(&self) -> Method;

    /// How expensive [`Backend::verify`] is.
    fn cost(&self) -> Cost;

    /// The identity `credentials` establish, or `None` if they do not (wrong password,
    /// unknown user, a certificate naming nobody, credentials of another method). May block
    /// for as long as [`Backend::cost`] says.
    fn verify(&self, credentials: &Credentials) -> Option<Identity>;
}

/// The client-certificate backend: rustls verified the chain (client CA, CRLs) in the
/// handshake; this names the client. The name is the certificate's first DNS or URI subject
/// alternative name, else its subject CN ([`crate::tls::cert_identity`]); a certificate
/// naming nothing establishes no identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Certificates;

impl Backend for Certificates {
    fn method(&self) -> Method {
        Method::Certificate
    }

    fn cost(&self) -> Cost {
        Cost::Cheap
    }

    fn verify(&self, credentials: &Credentials) -> Option<Identity> {
        let Credentials::Certificate(cert) = credentials else {
            return None;
        };
        let name = crate::tls::cert_identity(cert)?;
        (!name.is_empty()).then(|| Identity::certificate(&name))
    }
}

/// Backends that check the same credentials, tried in order until one accepts: the users
/// file, then the KDC. It costs what its dearest backend costs.
pub struct FirstOf(pub Vec<Arc<dyn Backend>>);

impl Backend for FirstOf {
    fn method(&self) -> Method {
        self.0.first().map_or(Method::Password, |b| b.method())
    }

    fn cost(&self) -> Cost {
        match self.0.iter().any(|b| b.cost() == Cost::Expensive) {
            true => Cost::Expensive,
            false => Cost::Cheap,
        }
    }

    fn verify(&self, credentials: &Credentials) -> Option<Identity> {
        self.0.iter().find_map(|b| b.verify(credentials))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_of_different_methods_never_compare_equal() {
        let user = Identity::password("ops");
        let cert = Identity::certificate("ops");
        assert_ne!(user, cert);
        assert_eq!(user, Identity::password("ops"));
        assert_eq!(user.qualified(), "ops");
        assert_eq!(cert.qualified(), "cert:ops");
        assert_eq!(cert.name(), "ops");
        assert_eq!(cert.method(), Method::Certificate);
        // Logged escaped and quoted.
        assert_eq!(Identity::certificate("a\nb").to_string(), "\"cert:a\\nb\"");
        // One principal is one policy key, whichever Kerberos method established it.
        let by_password = Identity::kerberos("ops@EXAMPLE.COM", Method::Kerberos);
        let by_ticket = Identity::kerberos("ops@EXAMPLE.COM", Method::Gssapi);
        assert_eq!(by_password.qualified(), "krb:ops@EXAMPLE.COM");
        assert_eq!(by_ticket.qualified(), by_password.qualified());
        assert_eq!(by_ticket.realm(), Some("EXAMPLE.COM"));
        assert_eq!(user.realm(), None);
        assert_ne!(by_password, user);
    }

    #[test]
    fn first_of_tries_backends_in_order() {
        struct Fixed(Option<&'static str>);
        impl Backend for Fixed {
            fn method(&self) -> Method {
                Method::Password
            }
            fn cost(&self) -> Cost {
                Cost::Cheap
            }
            fn verify(&self, _: &Credentials) -> Option<Identity> {
                self.0.map(Identity::password)
            }
        }
        let c = Credentials::password(b"a", b"b");
        let chain = FirstOf(vec![Arc::new(Fixed(None)), Arc::new(Fixed(Some("second")))]);
        assert_eq!(chain.verify(&c), Some(Identity::password("second")));
        let chain = FirstOf(vec![
            Arc::new(Fixed(Some("first"))),
            Arc::new(Fixed(Some("second"))),
        ]);
        assert_eq!(chain.verify(&c), Some(Identity::password("first")));
        assert_eq!(FirstOf(vec![Arc::new(Fixed(None))]).verify(&c), None);
    }

    #[test]
    fn no_password_user_can_be_named_like_a_certificate() {
        let hash = hash_password(b"pw").unwrap();
        let err = Users::parse(&format!("cert:ops:{hash}\n"), "users");
        // `cert` then parses as the name and `ops:...` as a (malformed) hash: refused.
        assert!(err.is_err());
    }

    #[test]
    fn certificate_backend_names_the_certificate() {
        let pki = crate::cert::ephemeral();
        let creds = Credentials::Certificate(pki.client_chain().remove(0));
        assert_eq!(creds.method(), Method::Certificate);
        assert_eq!(
            Certificates.verify(&creds),
            Some(Identity::certificate(crate::cert::DEFAULT_CLIENT_NAME))
        );
        assert_eq!(Certificates.verify(&Credentials::password(b"a", b"b")), None);
        assert_eq!(
            Certificates.verify(&Credentials::Certificate(CertificateDer::from(vec![0x30, 0]))),
            None
        );
        let dbg = format!("{:?}", Credentials::password(b"alice", b"hunter2"));
        assert!(
            !format!("{:?}", Credentials::Gssapi(GssExchange::new(b"secret".to_vec()))).contains("secret")
        );
        assert!(dbg.contains("alice") && !dbg.contains("hunter2"), "{dbg}");
    }
}
