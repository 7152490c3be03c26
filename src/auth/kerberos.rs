//! Kerberos through the system's GSS-API library (MIT krb5): password verification against
//! the KDC and the GSS-API method of RFC 1961 (cargo feature `kerberos`).
//!
//! * [`KerberosPassword`] checks RFC 1929 and sudp-hello credentials. The gateway asks the
//!   KDC for a ticket-granting ticket with the user's password (`gss_acquire_cred_with_password`,
//!   an AS exchange; the ticket lands in a memory cache private to the credential), then asks
//!   for a service ticket to its own principal (`gss_init_sec_context`, a TGS exchange) and
//!   **accepts that ticket with its key from the keytab** (`gss_accept_sec_context`). Only a
//!   KDC that knows the service's key can mint a ticket the keytab opens, so a spoofed KDC
//!   (one that answers the AS request for a password it chose) logs nobody in.
//! * [`GssapiTokens`] accepts a client's initial context token (RFC 1961 §3) with the same
//!   keytab credential. The mechanism must finish in one round from the gateway's side
//!   (Kerberos 5, RFC 4121, and SPNEGO wrapping it do): a mechanism that asks for more
//!   tokens is refused.
//!
//! Both run on the [`Authenticator`](super::Authenticator)'s verification threads, under its
//! deadline and per-source failure buckets: a KDC that does not answer holds a thread for as
//! long as libkrb5 retries (a few seconds, per krb5.conf), never the client beyond the
//! connection's handshake deadline.
//!
//! **No secret kept.** The password is borrowed from the zeroizing credentials and handed to
//! libkrb5, which frees its copy with the credential; the user's tickets live in the
//! credential's memory cache and go with it at the end of [`KerberosPassword::verify`]; the
//! accepted contexts are deleted (`gss_delete_sec_context`, which frees their keys) when
//! dropped. Nothing of them is logged: log lines carry the principal and libkrb5's message.
//!
//! Identities are [`Identity::kerberos`] principals, `krb:user@REALM` in policy and logs.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libgssapi::context::{ClientCtx, CtxFlags, SecurityContext, ServerCtx};
use libgssapi::credential::{Cred, CredUsage};
use libgssapi::name::Name;
use libgssapi::oid::{OidSet, GSS_MECH_KRB5, GSS_NT_KRB5_PRINCIPAL};
use zeroize::Zeroizing;

use super::{Backend, Cost, Credentials, GssAccepted, GssContext, Identity, Method};
use crate::logsafe::Peer;

/// libkrb5's "Cannot contact any KDC for requested realm" (`KRB5_KDC_UNREACH`), as the minor
/// status of a GSS-API call.
const KRB5_KDC_UNREACH: u32 = -1_765_328_228i32 as u32;

/// Errors of setting Kerberos up (at start, so a broken keytab is found before clients are).
#[derive(Debug, thiserror::Error)]
pub enum KerberosError {
    /// The service principal name is not a valid Kerberos principal.
    #[error("`kerberos_service` (--kerberos-service) {}: not a Kerberos principal name: {error}", Peer::str(.service))]
    BadService {
        /// The name as configured.
        service: String,
        /// libkrb5's message.
        error: String,
    },
    /// The keytab could not give a key for the service principal.
    #[error(
        "`kerberos_keytab` (--kerberos-keytab) {}: no usable key for {}: {error} \
         (check the file exists, is readable, and holds `ktadd` keys of that principal)",
        .keytab.display(), Peer::str(.service)
    )]
    Keytab {
        /// The keytab file.
        keytab: PathBuf,
        /// The service principal.
        service: String,
        /// libkrb5's message.
        error: String,
    },
    /// The GSS-API library refused a call of the client side (the shim).
    #[error("GSS-API: {0}")]
    Gss(String),
}

/// The gateway's acceptor credential: the service principal's key, read from the keytab.
#[derive(Clone)]
pub struct ServiceKey {
    service: String,
    cred: Cred,
}

impl std::fmt::Debug for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceKey")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// A GSS-API name of the Kerberos principal name type (`user`, `user@REALM`, `svc/host`).
fn principal(name: &str) -> Result<Name, libgssapi::error::Error> {
    Name::new(name.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL))
}

/// The display form of a GSS-API name (`alice@EXAMPLE.COM`).
fn display(name: &Name) -> Option<String> {
    let buf = name.display_name().ok()?;
    String::from_utf8(buf.to_vec()).ok()
}

impl ServiceKey {
    /// Reads the key of `service` (e.g. `socks/gw.example.com`; the realm defaults to
    /// krb5.conf's `default_realm`) from `keytab`, through `gss_acquire_cred_from`, so
    /// that no process-wide setting (`KRB5_KTNAME`) is needed.
    pub fn load(keytab: &Path, service: &str) -> Result<ServiceKey, KerberosError> {
        use libgssapi_sys as sys;
        let bad_service = |e: String| KerberosError::BadService {
            service: service.to_owned(),
            error: e,
        };
        let keytab_error = |e: String| KerberosError::Keytab {
            keytab: keytab.to_owned(),
            service: service.to_owned(),
            error: e,
        };
        let value = CString::new(format!("FILE:{}", keytab.display()))
            .map_err(|_| keytab_error("the path contains a NUL byte".to_owned()))?;
        // 1.2.840.113554.1.2.2.1, GSS_KRB5_NT_PRINCIPAL_NAME (RFC 1964 §2.1.1).
        let mut oid_bytes = *b"\x2a\x86\x48\x86\xf7\x12\x01\x02\x02\x01";
        let mut oid = sys::gss_OID_desc {
            length: oid_bytes.len() as u32,
            elements: oid_bytes.as_mut_ptr().cast(),
        };
        let mut name_buf = sys::gss_buffer_desc {
            length: service.len(),
            value: service.as_ptr() as *mut _,
        };
        let mut minor: sys::OM_uint32 = 0;
        let mut name: sys::gss_name_t = ptr::null_mut();
        // SAFETY: every pointer is to a live local of the right type; gss_import_name copies
        // the buffer and the OID.
        let major = unsafe { sys::gss_import_name(&mut minor, &mut name_buf, &mut oid, &mut name) };
        if major != sys::GSS_S_COMPLETE {
            return Err(bad_service(status_text(major, minor)));
        }
        let mut element = sys::gss_key_value_element_desc {
            key: c"keytab".as_ptr(),
            value: value.as_ptr(),
        };
        let store = sys::gss_key_value_set_desc {
            count: 1,
            elements: &mut element,
        };
        let mut cred: sys::gss_cred_id_t = ptr::null_mut();
        // SAFETY: `name` was imported above; `store` and its strings outlive the call; the
        // out-pointers we do not want are null, which the API allows.
        let major = unsafe {
            sys::gss_acquire_cred_from(
                &mut minor,
                name,
                sys::_GSS_C_INDEFINITE,
                ptr::null_mut(),
                sys::GSS_C_ACCEPT as sys::gss_cred_usage_t,
                &store,
                &mut cred,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        let mut release_minor = 0;
        // SAFETY: `name` is a valid name we own, released exactly once.
        unsafe { sys::gss_release_name(&mut release_minor, &mut name) };
        if major != sys::GSS_S_COMPLETE {
            return Err(keytab_error(status_text(major, minor)));
        }
        // SAFETY: `cred` is a credential the call above gave us; Cred takes it over and
        // releases it once.
        let cred = unsafe { Cred::from_c(cred) };
        let key = ServiceKey {
            service: service.to_owned(),
            cred,
        };
        // MIT reads the keytab lazily: look for the key now, so that a keytab without it
        // fails the start, not the first client.
        key.check_keytab().map_err(keytab_error)?;
        Ok(key)
    }

    /// Checks that the keytab can serve the principal (`gss_inquire_cred` reads it).
    fn check_keytab(&self) -> Result<(), String> {
        self.cred.name().map(drop).map_err(|e| e.to_string())
    }

    /// The configured service principal.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Accepts a client's initial token; `Ok` only if the context is complete.
    fn accept(&self, token: &[u8]) -> Result<(ServerCtx, Vec<u8>), String> {
        let mut ctx = ServerCtx::new(Some(self.cred.clone()));
        let reply = ctx.step(token, None).map_err(|e| e.to_string())?;
        if !ctx.is_complete() {
            return Err(
                "the mechanism needs more than one round trip (only Kerberos 5 is served)".to_owned(),
            );
        }
        Ok((ctx, reply.map(|b| b.to_vec()).unwrap_or_default()))
    }
}

/// The text of a GSS-API status, as libgssapi formats it.
fn status_text(major: u32, minor: u32) -> String {
    libgssapi::error::Error {
        major: libgssapi::error::MajorFlags::from_bits_retain(major),
        minor,
    }
    .to_string()
}

/// Lets a warning through at most once per second, so that a KDC that is down does not
/// flood the log (every failure is still counted by the Authenticator).
struct WarnGate(Mutex<Option<Instant>>);

impl WarnGate {
    const fn new() -> WarnGate {
        WarnGate(Mutex::new(None))
    }

    fn admit(&self) -> bool {
        // A poisoned lock only means a thread panicked while storing an instant.
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match *last {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }
}

static KDC_DOWN: WarnGate = WarnGate::new();

/// Why a password check failed, for the log.
#[derive(Debug)]
enum Refused {
    /// No KDC of the realm answered.
    KdcUnreachable(String),
    /// The KDC or the keytab said no (wrong password, unknown principal, a ticket the
    /// keytab does not open).
    Refused(String),
}

/// The Kerberos-password backend (see the module documentation).
#[derive(Debug, Clone)]
pub struct KerberosPassword {
    key: ServiceKey,
}

impl KerberosPassword {
    /// Verifies passwords with tickets for `key`'s service.
    pub fn new(key: ServiceKey) -> KerberosPassword {
        KerberosPassword { key }
    }

    fn check(&self, user: &str, pass: &str) -> Result<String, Refused> {
        let classify = |e: libgssapi::error::Error| {
            if e.minor == KRB5_KDC_UNREACH {
                Refused::KdcUnreachable(e.to_string())
            } else {
                Refused::Refused(e.to_string())
            }
        };
        let name = principal(user).map_err(|e| Refused::Refused(e.to_string()))?;
        let mechs = krb5_only().map_err(|e| Refused::Refused(e.to_string()))?;
        // AS exchange: a TGT for the user, in a memory cache owned by `cred`.
        let cred = Cred::acquire_with_password(Some(&name), pass, None, CredUsage::Initiate, Some(&mechs))
            .map_err(classify)?;
        let target = principal(&self.key.service).map_err(|e| Refused::Refused(e.to_string()))?;
        // TGS exchange: a service ticket to our own principal, as an AP-REQ token.
        let mut client = ClientCtx::new(Some(cred), target, CtxFlags::empty(), Some(GSS_MECH_KRB5));
        let token = client
            .step(None, None)
            .map_err(classify)?
            .ok_or_else(|| Refused::Refused("no token from the initiator".to_owned()))?;
        // The proof: the ticket opens with our key from the keytab.
        let (server, _) = self.key.accept(&token).map_err(Refused::Refused)?;
        let who = server
            .source_name()
            .ok()
            .as_ref()
            .and_then(display)
            .ok_or_else(|| Refused::Refused("the accepted context names nobody".to_owned()))?;
        Ok(who)
    }
}

/// A mechanism set of Kerberos 5 alone.
fn krb5_only() -> Result<OidSet, libgssapi::error::Error> {
    let mut set = OidSet::new();
    set.add(GSS_MECH_KRB5)?;
    Ok(set)
}

impl Backend for KerberosPassword {
    fn method(&self) -> Method {
        // Password credentials on the wire; the identity says Kerberos.
        Method::Password
    }

    fn cost(&self) -> Cost {
        // Two KDC round trips.
        Cost::Expensive
    }

    fn verify(&self, credentials: &Credentials) -> Option<Identity> {
        let Credentials::Password { user, pass } = credentials else {
            return None;
        };
        let (Ok(user), Ok(pass)) = (std::str::from_utf8(user), std::str::from_utf8(pass)) else {
            return None;
        };
        // A principal name holds no NUL (libkrb5 would cut it short) and is never empty.
        if user.is_empty() || user.contains('\0') || pass.contains('\0') {
            return None;
        }
        match self.check(user, pass) {
            Ok(principal) => Some(Identity::kerberos(&principal, Method::Kerberos)),
            Err(Refused::KdcUnreachable(why)) => {
                if KDC_DOWN.admit() {
                    tracing::warn!(user = %Peer::str(user), error = %why, "Kerberos: no KDC answered: password checks fail until one does (check krb5.conf's [realms] kdc)");
                }
                None
            }
            Err(Refused::Refused(why)) => {
                tracing::debug!(user = %Peer::str(user), error = %why, "Kerberos: password refused");
                None
            }
        }
    }
}

/// The GSS-API (RFC 1961) backend: accepts initial context tokens with the keytab.
#[derive(Debug, Clone)]
pub struct GssapiTokens {
    key: ServiceKey,
}

impl GssapiTokens {
    /// Accepts tokens for `key`'s service.
    pub fn new(key: ServiceKey) -> GssapiTokens {
        GssapiTokens { key }
    }
}

impl Backend for GssapiTokens {
    fn method(&self) -> Method {
        Method::Gssapi
    }

    fn cost(&self) -> Cost {
        // A decryption and a replay-cache lookup (a file): cheap, but not free of I/O.
        Cost::Expensive
    }

    fn verify(&self, credentials: &Credentials) -> Option<Identity> {
        let Credentials::Gssapi(exchange) = credentials else {
            return None;
        };
        let (ctx, reply) = match self.key.accept(exchange.token()) {
            Ok(x) => x,
            Err(why) => {
                tracing::debug!(error = %why, "GSS-API: token refused");
                return None;
            }
        };
        let who = ctx.source_name().ok().as_ref().and_then(display)?;
        exchange.set_accepted(GssAccepted {
            reply,
            context: Box::new(Context(ctx)),
        });
        Some(Identity::kerberos(&who, Method::Gssapi))
    }
}

/// An established context (either side) as [`GssContext`].
struct Context<C>(C);

impl<C: SecurityContext + Send> GssContext for Context<C> {
    fn unwrap(&mut self, token: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        self.0.unwrap(token).ok().map(|b| Zeroizing::new(b.to_vec()))
    }

    fn wrap(&mut self, message: &[u8]) -> Option<Vec<u8>> {
        self.0.wrap(true, message).ok().map(|b| b.to_vec())
    }
}

/// The client side of RFC 1961 (the shim's `--gssapi`): a context to the gateway's service
/// principal from the user's ticket cache (`KRB5CCNAME`, else the default cache).
pub struct Initiator {
    ctx: ClientCtx,
}

impl std::fmt::Debug for Initiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Initiator(..)")
    }
}

impl Initiator {
    /// Starts a context to `service` (e.g. `socks/gw.example.com`) with mutual
    /// authentication; returns it and the initial token.
    pub fn start(service: &str) -> Result<(Initiator, Vec<u8>), KerberosError> {
        let target = principal(service)
            .map_err(|e| KerberosError::Gss(format!("service {}: {e}", Peer::str(service))))?;
        let mut ctx = ClientCtx::new(None, target, CtxFlags::GSS_C_MUTUAL_FLAG, Some(GSS_MECH_KRB5));
        let token = ctx
            .step(None, None)
            .map_err(|e| {
                KerberosError::Gss(format!(
                    "no ticket for {} (kinit first? KRB5CCNAME): {e}",
                    Peer::str(service)
                ))
            })?
            .ok_or_else(|| KerberosError::Gss("the initiator produced no token".to_owned()))?;
        Ok((Initiator { ctx }, token.to_vec()))
    }

    /// Whether the context needs the gateway's reply token.
    pub fn needs_reply(&self) -> bool {
        !self.ctx.is_complete()
    }

    /// Feeds the gateway's reply token (mutual authentication: proves the gateway holds the
    /// service key).
    pub fn finish(&mut self, reply: &[u8]) -> Result<(), KerberosError> {
        match self.ctx.step(Some(reply), None) {
            Ok(None) if self.ctx.is_complete() => Ok(()),
            Ok(_) => Err(KerberosError::Gss(
                "the gateway's mechanism needs more than one round trip".to_owned(),
            )),
            Err(e) => Err(KerberosError::Gss(format!("the gateway's reply token: {e}"))),
        }
    }

    /// The established context, for the protection-level message.
    pub fn into_context(self) -> Box<dyn GssContext> {
        Box::new(Context(self.ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_keytab_fails_with_the_key_and_file_named() {
        let dir = std::env::temp_dir().join(format!("sudp-krb-{}", std::process::id()));
        let err =
            ServiceKey::load(&dir.join("missing.keytab"), "socks/gw.example.com@EXAMPLE.COM").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("kerberos_keytab") && text.contains("missing.keytab"),
            "{text}"
        );
    }

    #[test]
    fn kdc_warnings_are_gated() {
        let gate = WarnGate::new();
        assert!(gate.admit());
        assert!(!gate.admit());
    }
}
