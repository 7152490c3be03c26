//! Client authentication behind one trait.
//!
//! A [`Backend`] turns [`Credentials`] into an [`Identity`]: the users file ([`Users`],
//! RFC 1929 username/password and the sudp method's credentials) and client certificates
//! ([`Certificates`], verified by rustls during the TLS handshake) are the two backends today;
//! Kerberos and GSS-API are meant to be further ones. The limits on verification (bounded
//! concurrency with a deadline-aware queue, a per-source failure rate) wrap the trait once,
//! in [`Authenticator`], so that every backend gets them.
//!
//! **Identities do not collide.** An [`Identity`] is a method and a name. Policy lookups,
//! logs and (later) re-attach checks use its [qualified name](Identity::qualified):
//! a password user is its bare name (`ops`), a certificate identity is `cert:` and the
//! certificate's name (`cert:ops`). A users-file name cannot contain `:`, so no password user
//! can ever be named like a certificate, and a CA-issued certificate named `ops` never gets
//! `[users_policy.ops]`'s rules (it gets `[users_policy."cert:ops"]`'s). Two identities are
//! equal only if both method and name are.

mod limits;
mod users;

use std::fmt;

use rustls::pki_types::CertificateDer;
use zeroize::Zeroizing;

pub use limits::{source_key, AuthLimits, Authenticator, Verdict};
pub use users::{
    hash_password, run_passwd, AuthError, PasswdArgs, ReloadableUsers, Users, MAX_LEN, MAX_M_COST,
    MAX_P_COST, MAX_T_COST,
};

/// Prefix of certificate identities in policy keys and logs.
pub const CERT_PREFIX: &str = "cert:";

/// How a client authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// A name and password checked against the users file.
    Password,
    /// A client certificate verified against the client CA (and CRLs) in the TLS handshake.
    Certificate,
}

impl Method {
    /// Every method, in [`Method::index`] order.
    pub const ALL: [Method; 2] = [Method::Password, Method::Certificate];

    /// Stable lower-case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Method::Password => "password",
            Method::Certificate => "certificate",
        }
    }

    /// Dense index, for per-method counters.
    pub fn index(self) -> usize {
        match self {
            Method::Password => 0,
            Method::Certificate => 1,
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

    /// How it was established.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The bare name (user name, or the certificate's name without the prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name policy and logs use: `NAME` for a password user, `cert:NAME` for a
    /// certificate. This is the `[users_policy.KEY]` key that applies.
    pub fn qualified(&self) -> String {
        match self.method {
            Method::Password => self.name.clone(),
            Method::Certificate => format!("{CERT_PREFIX}{}", self.name),
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
        }
    }

    /// The name claimed, for logs (escape it: it is peer-supplied).
    pub fn claimed_name(&self) -> Vec<u8> {
        match self {
            Credentials::Password { user, .. } => user.clone(),
            Credentials::Certificate(cert) => {
                crate::tls::cert_identity(cert).unwrap_or_default().into_bytes()
            }
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
        assert!(dbg.contains("alice") && !dbg.contains("hunter2"), "{dbg}");
    }
}
