//! Reloading a running gateway (SIGHUP): the users file, the destination policy, the
//! certificate and key, and the client CA and CRLs.
//!
//! A reload re-reads the configuration from the same flags the gateway started with, builds
//! every reloadable piece first and swaps them in only when all of them loaded, so a broken
//! file leaves the running configuration in force whole. The swaps reach what starts after
//! them: new TLS handshakes, new authentications, and the policy check of every CONNECT and
//! every datagram. Established TLS sessions, CONNECT tunnels and UDP associations go on
//! untouched (an association's user was authenticated when it opened; its datagrams meet
//! the new policy from the next one on).
//!
//! What cannot change at runtime (sockets, sizes, timeouts the tasks read once, the auth
//! methods offered) is compared with the running value and reported as needing a restart.
//!
//! The new TLS config has a fresh session cache and ticket key: a client resumes no session
//! across a reload. That costs each client one full handshake, and it is what makes a CRL
//! or client CA change bind every client at once (a resumed TLS session skips the client
//! certificate check).

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use super::{Settings, Shared};
use crate::config::{Auth, ConfigError, GatewayArgs, GatewayConfig};

/// Why a reload left the running configuration in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration (flags and file) does not validate.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A file the configuration names does not load (the message names key and file).
    #[error("{0:#}")]
    Load(anyhow::Error),
    /// The authentication methods changed: which SOCKS5 methods are offered and which
    /// backends exist is fixed at start.
    #[error("`auth` methods changed ({from} -> {to}): needs a restart")]
    AuthMethods {
        /// The running methods.
        from: &'static str,
        /// The methods of the re-read configuration.
        to: &'static str,
    },
}

/// What one successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The changes, for a log line: `users 3 -> 4, global rules 2 -> 3, certificate changed`.
    pub changes: String,
    /// Configuration keys that changed but need a restart; kept at their running values.
    pub needs_restart: Vec<&'static str>,
}

/// Puts a re-read configuration in force while the gateway runs. Cheap to clone; reloads
/// are serialised.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// The running configuration: restart-only keys keep their start values here, the
    /// file digests follow each reload.
    running: Mutex<Running>,
}

struct Running {
    config: GatewayConfig,
    files: Digests,
}

/// SHA-256 of the TLS files in force, to tell "changed" from "loaded again".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Digests {
    cert: Option<[u8; 32]>,
    client_ca: Option<[u8; 32]>,
    crls: Option<[u8; 32]>,
}

impl Digests {
    fn of(cfg: &GatewayConfig) -> Digests {
        Digests {
            cert: digest(std::iter::once(cfg.cert.as_path())),
            client_ca: cfg.auth.client_ca().and_then(|p| digest(std::iter::once(p))),
            crls: digest(cfg.client_crl.iter().map(|p| p.as_path())),
        }
    }
}

/// SHA-256 over the contents of `paths`, each prefixed by its length; `None` when one does
/// not read (it then just loaded, so this is a race with a writer: reported as changed).
fn digest<'a>(paths: impl Iterator<Item = &'a std::path::Path>) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    for p in paths {
        let bytes = std::fs::read(p).ok()?;
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(&bytes);
    }
    Some(h.finalize().into())
}

/// The auth methods of `auth`, in words.
fn methods(auth: &Auth) -> &'static str {
    match auth {
        Auth::NoAuth => "none",
        Auth::Users(_) => "users",
        Auth::ClientCert(_) => "client certificates",
        Auth::UsersOrClientCert { .. } => "users or client certificates",
        Auth::Kerberos => "Kerberos",
    }
}

impl Reloader {
    pub(super) fn new(shared: Arc<Shared>, running: &GatewayConfig) -> Reloader {
        Reloader {
            inner: Arc::new(Inner {
                shared,
                running: Mutex::new(Running {
                    config: running.clone(),
                    files: Digests::of(running),
                }),
            }),
        }
    }

    /// Re-reads the configuration from `args` (the flags the gateway started with) and
    /// the files it names, and puts the reloadable pieces in force. Blocks on file reads:
    /// call it off the async workers. On error nothing changed.
    pub fn reload(&self, args: GatewayArgs) -> Result<Reloaded, ReloadError> {
        let cfg = GatewayConfig::from_args(args)?;
        self.apply(&cfg)
    }

    /// Puts the reloadable pieces of `cfg` in force (see [`Reloader::reload`]).
    pub fn apply(&self, cfg: &GatewayConfig) -> Result<Reloaded, ReloadError> {
        // A poisoned lock only means a reload panicked before it swapped anything.
        let mut running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
        let old = &running.config;
        if std::mem::discriminant(&old.auth) != std::mem::discriminant(&cfg.auth) {
            return Err(ReloadError::AuthMethods {
                from: methods(&old.auth),
                to: methods(&cfg.auth),
            });
        }
        // Everything loads before anything is swapped. The store stays the running one (a
        // cluster's sessions keep resuming), but a changed client CA or CRL set purges the
        // resumable sessions and ticket keys first: a resumed session skips the certificate
        // check, so a revoked client must not resume one (on any node of the cluster).
        let shared = &self.inner.shared;
        let files = Digests::of(cfg);
        let trust_changed = files.client_ca != running.files.client_ca || files.crls != running.files.crls;
        if trust_changed {
            purge_resumption(&shared.settings.store);
        }
        let new =
            Settings::from_config_in(cfg, Some(shared.settings.store.clone())).map_err(ReloadError::Load)?;
        // logrotate moved the audit log: carry on in a fresh file of the same name.
        if let Err(e) = shared.settings.audit.reopen() {
            tracing::error!(error = %e, "SIGHUP: could not reopen the audit log; still writing the old file");
        }

        let mut changes = String::new();
        let sep = |out: &mut String| {
            if !out.is_empty() {
                out.push_str(", ");
            }
        };
        if let (Some(swap), Some(users)) = (&shared.users, new.auth.users) {
            let before = swap.current().len();
            swap.replace(users.clone());
            sep(&mut changes);
            let _ = write!(changes, "users {before} -> {}", users.len());
        }
        let before = shared.relay.policy();
        let after = new.policy;
        sep(&mut changes);
        let _ = write!(
            changes,
            "global rules {} -> {}, users with rules {} -> {}",
            before.global_rules().len(),
            after.global_rules().len(),
            before.users_with_rules(),
            after.users_with_rules()
        );
        if before.denies_by_default() != after.denies_by_default() {
            let _ = write!(
                changes,
                ", default_deny {} -> {}",
                before.denies_by_default(),
                after.denies_by_default()
            );
        }
        shared.relay.set_policy(after.clone());
        // After `set_policy` both hold the same host addresses, so this compares rules only.
        if *before == *after {
            changes.push_str(" (policy unchanged)");
        }
        shared.tls.store(new.tls);
        let word = |a: &Option<[u8; 32]>, b: &Option<[u8; 32]>| {
            if a.is_some() && a == b {
                "unchanged"
            } else {
                "changed"
            }
        };
        sep(&mut changes);
        let _ = write!(
            changes,
            "certificate reloaded ({})",
            word(&running.files.cert, &files.cert)
        );
        if cfg.auth.client_ca().is_some() {
            let _ = write!(
                changes,
                ", client CA reloaded ({}), CRL files {} -> {} ({})",
                word(&running.files.client_ca, &files.client_ca),
                old.client_crl.len(),
                cfg.client_crl.len(),
                word(&running.files.crls, &files.crls)
            );
        }
        if old.tls12 != cfg.tls12 {
            let _ = write!(changes, ", tls12 {} -> {}", old.tls12, cfg.tls12);
        }
        let needs_restart = restart_only_changes(old, cfg);
        // The next reload compares with what is in force now; restart-only keys stay at
        // the values the gateway runs with.
        let mut kept = old.clone();
        kept.cert = cfg.cert.clone();
        kept.key = cfg.key.clone();
        kept.auth = cfg.auth.clone();
        kept.client_crl = cfg.client_crl.clone();
        kept.policy = cfg.policy.clone();
        kept.tls12 = cfg.tls12;
        running.config = kept;
        running.files = files;
        Ok(Reloaded {
            changes,
            needs_restart,
        })
    }
}

/// Empties the store's resumable TLS sessions and ticket keys (every node's, through the
/// store), waiting for it where the runtime allows and in the background elsewhere.
fn purge_resumption(store: &Arc<dyn crate::store::SessionStore>) {
    use crate::store::Table;
    let store = store.clone();
    let purge = async move {
        for table in [Table::TLS_SESSION, Table::TICKET_KEYS] {
            if let Err(e) = store.purge(&table).await {
                tracing::warn!(table = %table, error = %e, "SIGHUP: could not purge resumable sessions");
            }
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(purge))
        }
        Ok(h) => {
            h.spawn(purge);
        }
        Err(_) => {}
    }
}

/// The configuration keys whose change needs a restart, in file order.
fn restart_only_changes(old: &GatewayConfig, new: &GatewayConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |key, changed: bool| {
        if changed {
            out.push(key);
        }
    };
    check("listen", old.listen != new.listen);
    check("audit_log", old.audit_log != new.audit_log);
    check("udp_listen", old.udp_listen != new.udp_listen);
    check("advertise", old.advertise != new.advertise);
    check("full_cone", old.full_cone != new.full_cone);
    check(
        "naked_require_port",
        old.naked_require_port != new.naked_require_port,
    );
    check("idle_timeout", old.idle_timeout != new.idle_timeout);
    check("max_associations", old.max_associations != new.max_associations);
    check("max_connections", old.max_connections != new.max_connections);
    check(
        "max_connections_per_ip",
        old.max_connections_per_ip != new.max_connections_per_ip,
    );
    check(
        "handshake_timeout",
        old.handshake_timeout != new.handshake_timeout,
    );
    check(
        "connect_idle_timeout",
        old.connect_idle_timeout != new.connect_idle_timeout,
    );
    check("replay_window", old.replay_window != new.replay_window);
    check("nice", old.nice != new.nice);
    check("suites", old.suites != new.suites);
    check(
        "heartbeat_interval",
        old.heartbeat.interval != new.heartbeat.interval,
    );
    check(
        "heartbeat_timeout",
        old.heartbeat.timeout != new.heartbeat.timeout,
    );
    check("udp_buffer", old.udp_buffer != new.udp_buffer);
    check("metrics", old.metrics != new.metrics);
    // The store is the running one across reloads (its sessions, its connection).
    check("store", old.store != new.store);
    check("cluster", old.cluster != new.cluster);
    check("cluster_key", old.cluster_key != new.cluster_key);
    check("resumption", old.resumption != new.resumption);
    // The keytab is read once, at start (its key is the acceptor credential).
    let (k_old, k_new) = (old.kerberos.as_ref(), new.kerberos.as_ref());
    check(
        "kerberos_keytab",
        k_old.map(|k| &k.keytab) != k_new.map(|k| &k.keytab),
    );
    check(
        "kerberos_service",
        k_old.map(|k| &k.service) != k_new.map(|k| &k.service),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: impl FnOnce(&mut GatewayArgs)) -> GatewayConfig {
        let mut args = GatewayArgs {
            cert: Some("gateway.pem".into()),
            key: Some("gateway.key".into()),
            users: Some("users".into()),
            ..GatewayArgs::default()
        };
        extra(&mut args);
        GatewayConfig::from_args(args).unwrap()
    }

    #[test]
    fn restart_only_keys_are_named_and_reloadable_ones_are_not() {
        let old = config(|_| {});
        let same = config(|a| {
            a.cert = Some("other.pem".into());
            a.users = Some("other-users".into());
            a.allow = vec![crate::policy::Rule::parse(crate::policy::Action::Allow, "10.0.0.0/8").unwrap()];
            a.tls12 = true;
        });
        assert_eq!(restart_only_changes(&old, &same), Vec::<&str>::new());
        let moved = config(|a| {
            a.listen = Some("127.0.0.1:9443".parse().unwrap());
            a.max_connections = Some(7);
            a.nice = Some(5);
            a.udp_buffer = Some(1 << 20);
        });
        assert_eq!(
            restart_only_changes(&old, &moved),
            ["listen", "max_connections", "nice", "udp_buffer"]
        );
    }

    #[test]
    fn kerberos_keys_are_restart_only() {
        let old = config(|_| {});
        let mut new = old.clone();
        new.kerberos = Some(crate::config::KerberosConfig {
            keytab: "gw.keytab".into(),
            service: "socks/gw".into(),
        });
        assert_eq!(
            restart_only_changes(&old, &new),
            vec!["kerberos_keytab", "kerberos_service"]
        );
    }

    #[test]
    fn auth_methods_are_told_apart() {
        let users = config(|_| {});
        let both = config(|a| a.client_ca = Some("ca.pem".into()));
        assert_eq!(methods(&users.auth), "users");
        assert_eq!(methods(&both.auth), "users or client certificates");
        assert_ne!(
            std::mem::discriminant(&users.auth),
            std::mem::discriminant(&both.auth)
        );
    }

    #[test]
    fn digests_tell_a_changed_file_from_the_same_one() {
        let dir = std::env::temp_dir().join(format!("sudp-reload-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("cert.pem");
        std::fs::write(&p, "one").unwrap();
        let a = digest(std::iter::once(p.as_path()));
        assert!(a.is_some());
        assert_eq!(a, digest(std::iter::once(p.as_path())));
        std::fs::write(&p, "two").unwrap();
        assert_ne!(a, digest(std::iter::once(p.as_path())));
        assert_eq!(digest(std::iter::once(dir.join("missing").as_path())), None);
        // Lengths are hashed in: ["ab", "c"] is not ["a", "bc"].
        let (x, y) = (dir.join("x"), dir.join("y"));
        std::fs::write(&x, "ab").unwrap();
        std::fs::write(&y, "c").unwrap();
        let xy = digest([x.as_path(), y.as_path()].into_iter());
        std::fs::write(&x, "a").unwrap();
        std::fs::write(&y, "bc").unwrap();
        assert_ne!(xy, digest([x.as_path(), y.as_path()].into_iter()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
