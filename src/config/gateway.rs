//! The gateway's flags, config file and validated config.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{
    file_items, file_value, heartbeat, nice, nonzero, nonzero_duration, parse_duration, parse_socket_addr,
    parse_suite, read_file, replay_window, suites, value_err, ConfigError, Origins, Problem,
};
use crate::net::channel::Heartbeat;
use crate::policy::{self, Action, Policy, Rule, RuleError};
use crate::proto::keys::CipherSuite;

/// Control (TLS) listener address when neither the file nor a flag gives one.
///
/// Port 8443, not SOCKS5's 1080: the shim's local SOCKS5 listener keeps 1080 (what
/// applications expect), so a gateway and a shim on one host start with their defaults
/// without clashing. 8443 is the usual alternative TLS port, above 1024 so the gateway needs
/// no privilege to bind it, and it is what firewalls that pass "HTTPS-alt" already allow.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 8443));
/// Default idle timeout of a UDP association.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default limit on concurrent UDP associations.
pub const DEFAULT_MAX_ASSOCIATIONS: usize = 4096;
/// Default limit on concurrent control connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default time a client has to finish the TLS and SOCKS5 handshakes.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit on concurrent control connections from one source (IPv4 address or IPv6
/// /64): a quarter of [`DEFAULT_MAX_CONNECTIONS`], room for a shim forward's default 256
/// flows.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;
/// Default time a CONNECT tunnel may carry no byte either way before it is closed.
pub const DEFAULT_CONNECT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default longest life of an end-to-end CONNECT tunnel (`e2e_ttl`).
pub const DEFAULT_E2E_TTL: Duration = Duration::from_secs(3600);
/// Cluster name when neither the file nor a flag gives one.
pub const DEFAULT_CLUSTER: &str = "default";

/// Run the secure-UDP gateway: SOCKS5 over TLS plus a UDP relay for naked and secure UDP.
///
/// Every flag is optional, so that a `--config` file can supply it; a flag given on the
/// command line overrides the file's key of the same name.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GatewayArgs {
    /// TOML config file (keys as in docs/CONFIG.md); flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// TLS control listener [default: 127.0.0.1:8443].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// TLS certificate chain, PEM (required, with --key).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// TLS private key, PEM (required, with --cert).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// Username/password file for SOCKS5 authentication (RFC 1929).
    #[arg(long, value_name = "FILE")]
    pub users: Option<PathBuf>,

    /// CA certificate, PEM, for client certificates (mTLS): a client presenting a
    /// certificate it signed authenticates by that certificate's identity.
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,

    /// Certificate revocation list(s), PEM, for client certificates (repeatable; a file may
    /// hold several): a revoked client certificate is refused in the TLS handshake. Needs
    /// --client-ca.
    #[arg(long, value_name = "FILE")]
    pub client_crl: Vec<PathBuf>,

    /// Accept clients without any authentication. For tests and demos only; cannot be
    /// combined with --users, --client-ca or --kerberos-keytab.
    #[arg(long)]
    pub no_auth: bool,

    /// Keytab holding the key of --kerberos-service: user names and passwords (RFC 1929,
    /// sudp hello) are then checked against the KDC (after the users file, if any), and the
    /// GSS-API method (RFC 1961) is offered. Needs a build with `--features kerberos` and
    /// --kerberos-service; the realm and KDC come from krb5.conf (KRB5_CONFIG).
    #[arg(long, value_name = "FILE")]
    pub kerberos_keytab: Option<PathBuf>,

    /// The gateway's Kerberos service principal, e.g. socks/gw.example.com (realm: krb5.conf's
    /// default_realm unless given as @REALM). Needs --kerberos-keytab.
    #[arg(long, value_name = "PRINCIPAL")]
    pub kerberos_service: Option<String>,

    /// UDP relay socket [default: the --listen IP, port 0 (any free port)].
    #[arg(long, value_name = "ADDR")]
    pub udp_listen: Option<SocketAddr>,

    /// Address put in BND.ADDR of UDP ASSOCIATE replies [default: the relay socket's IP, or
    /// the control connection's local IP when the relay socket is bound to 0.0.0.0 or ::].
    #[arg(long, value_name = "IP")]
    pub advertise: Option<IpAddr>,

    /// Allow destinations in CIDR[:PORT[-PORT]] (repeatable).
    #[arg(long, value_name = "CIDR", value_parser = parse_allow, long_help = rule_long_help(Action::Allow))]
    pub allow: Vec<Rule>,

    /// Deny destinations in CIDR[:PORT[-PORT]] (repeatable).
    #[arg(long, value_name = "CIDR", value_parser = parse_deny, long_help = rule_long_help(Action::Deny))]
    pub deny: Vec<Rule>,

    /// Deny every destination that no allow rule matches (turns the rules into an allow-list).
    #[arg(long)]
    pub default_deny: bool,

    /// Accept UDP replies from any source (full cone) [default: only from destinations the
    /// client has sent to].
    #[arg(long)]
    pub full_cone: bool,

    /// Refuse a standard client's UDP ASSOCIATE that gives no port (DST.PORT 0) with reply
    /// 0x02 [default: accept it and bind the port of the first datagram from the client's
    /// IP, which another program on a shared IP could claim first].
    #[arg(long)]
    pub naked_require_port: bool,

    /// Close a UDP association after this long without traffic, e.g. 30s, 5m [default: 120s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,

    /// Most concurrent UDP associations [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_associations: Option<usize>,

    /// Most concurrent control connections [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Most concurrent control connections from one source IP (IPv6: one /64); further
    /// connections from it are closed at once [default: 256].
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<usize>,

    /// One deadline for the TLS handshake, SOCKS5 negotiation and authentication together,
    /// counted from the TCP accept [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub handshake_timeout: Option<Duration>,

    /// Close a CONNECT tunnel after this long without a byte either way [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub connect_idle_timeout: Option<Duration>,

    /// Replay window of secure-UDP records, in records, 64..=65536 (rounded up to a multiple
    /// of 64) [default: 1024].
    #[arg(long, value_name = "N")]
    pub replay_window: Option<usize>,

    /// Nice value (scheduling priority) to run at, -20..=19: a positive value lets the
    /// applications on the same machine, whose sockets have the kernel's default buffers,
    /// be scheduled before the proxy, whose sockets have 4 MiB [default: as inherited].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub nice: Option<i32>,

    /// Secure-UDP cipher suites to offer, most preferred first, comma-separated
    /// [default: aes128-cbc-hmac-sha256,aes256-cbc-hmac-sha256].
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_suite)]
    pub suites: Vec<CipherSuite>,

    /// Also accept TLS 1.2 on the control connection [default: TLS 1.3 only].
    #[arg(long)]
    pub tls12: bool,

    /// Time between the gateway's PINGs on a secure control connection; 0 sends none
    /// [default: 1s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,

    /// A client that announced PINGs and is silent this long is dropped, with its
    /// associations [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub heartbeat_timeout: Option<Duration>,

    /// Serve Prometheus metrics (GET /metrics) and a health check (GET /healthz) over HTTP
    /// on this address, e.g. 127.0.0.1:9108 [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// Append one JSON line per ended CONNECT tunnel and UDP association (user, method,
    /// source, targets, bytes and datagrams each way, duration, reason) to this file
    /// [default: off].
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,

    /// A destination that is end to end: a CIDR (matched against the address connected to)
    /// or a domain name (it and its subdomains, matched against a CONNECT by name);
    /// repeatable. Secrets offered for its tunnels are refused (and the refusal audited),
    /// its tunnels are relayed untouched and closed at --e2e-ttl [default: none].
    #[arg(long = "e2e", value_name = "CIDR|DOMAIN", value_parser = parse_e2e_item)]
    pub e2e: Vec<String>,

    /// Longest life of an end-to-end CONNECT tunnel; it is then closed cleanly
    /// [default: 1h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub e2e_ttl: Option<Duration>,

    /// Receive buffer asked of the kernel for each relay socket, e.g. 4MiB (it grants at most
    /// net.core.rmem_max) [default: 4MiB].
    #[arg(long, value_name = "SIZE", value_parser = super::parse_size)]
    pub udp_buffer: Option<usize>,
    /// Session store shared by the gateways of a cluster: redis://HOST:PORT/DB,
    /// rediss://HOST:PORT/DB (TLS to Redis) or
    /// redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] (needs --cluster-key)
    /// [default: in-process only].
    #[arg(long, value_name = "URL", value_parser = parse_store_url)]
    pub store: Option<StoreUrl>,

    /// Name of the cluster: the namespace of its records and channel in the store
    /// [default: default].
    #[arg(long, value_name = "NAME", value_parser = parse_cluster)]
    pub cluster: Option<String>,

    /// Cluster key file (written by `sudp cluster-key --out FILE`): seals every value put in
    /// the store. Required with --store.
    #[arg(long, value_name = "FILE")]
    pub cluster_key: Option<PathBuf>,

    /// TLS session resumption: `stateful` (sessions in the store) or `tickets` (stateless
    /// tickets under keys shared through the store) [default: stateful].
    #[arg(long, value_name = "MODE", value_parser = parse_resumption)]
    pub resumption: Option<ResumptionMode>,
}

/// A store URL (`redis://` or `rediss://`), checked. Its `Debug` hides any password.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl(String);

impl StoreUrl {
    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // scheme://[user:password@]host...: print the scheme and what follows the '@'.
        let (scheme, rest) = self.0.split_once("://").unwrap_or(("", &self.0));
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        write!(f, "StoreUrl({scheme}://{host})")
    }
}

/// How TLS sessions resume across the cluster (`resumption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResumptionMode {
    /// Sessions kept in the store; TLS 1.3 tickets are lookup keys.
    #[default]
    Stateful,
    /// Stateless tickets sealed under keys the cluster shares through the store.
    Tickets,
}

/// The gateway's configuration: typed and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// TLS control listener.
    pub listen: SocketAddr,
    /// TLS certificate chain (PEM).
    pub cert: PathBuf,
    /// TLS private key (PEM).
    pub key: PathBuf,
    /// How clients authenticate.
    pub auth: Auth,
    /// Kerberos password checks and GSS-API, if configured.
    pub kerberos: Option<KerberosConfig>,
    /// Revocation lists (PEM files) for client certificates; empty unless `auth` has a
    /// client CA.
    pub client_crl: Vec<PathBuf>,
    /// UDP relay socket (port 0: any free port).
    pub udp_listen: SocketAddr,
    /// Address for BND.ADDR replies; `None`: the relay socket's IP, or the control
    /// connection's local IP when the relay socket is bound to an unspecified address.
    pub advertise: Option<IpAddr>,
    /// Destination policy for CONNECT, naked UDP and secure UDP.
    pub policy: Policy,
    /// Accept UDP replies from any source, not only from destinations the client sent to.
    pub full_cone: bool,
    /// Refuse naked UDP associations whose request gives no client port (DST.PORT 0).
    pub naked_require_port: bool,
    /// A UDP association with no traffic for this long is closed (nonzero).
    pub idle_timeout: Duration,
    /// Most concurrent UDP associations (nonzero).
    pub max_associations: usize,
    /// Most concurrent control connections (nonzero).
    pub max_connections: usize,
    /// Most concurrent control connections from one source (nonzero).
    pub max_connections_per_ip: usize,
    /// One deadline for TLS, SOCKS5 negotiation and authentication (nonzero).
    pub handshake_timeout: Duration,
    /// A CONNECT tunnel idle this long either way is closed (nonzero).
    pub connect_idle_timeout: Duration,
    /// Replay window size in records, within
    /// [`replay::MIN_WINDOW`](crate::proto::replay::MIN_WINDOW)..=
    /// [`replay::MAX_WINDOW`](crate::proto::replay::MAX_WINDOW).
    pub replay_window: usize,
    /// Nice value to take at start (-20..=19); `None`: as inherited.
    pub nice: Option<i32>,
    /// Cipher suites to offer, most preferred first: non-empty, no duplicates.
    pub suites: Vec<CipherSuite>,
    /// Accept TLS 1.2 as well as TLS 1.3.
    pub tls12: bool,
    /// The control channel's heartbeat.
    pub heartbeat: Heartbeat,
    /// Receive buffer asked for each relay socket, in bytes (nonzero).
    pub udp_buffer: usize,
    /// Where to serve `/metrics` and `/healthz`, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The audit log (JSON lines), if any; it also enables delegated inspection.
    pub audit_log: Option<PathBuf>,
    /// End-to-end destinations.
    pub e2e: crate::gateway::delegation::E2e,
    /// Longest life of an end-to-end CONNECT tunnel (nonzero).
    pub e2e_ttl: Duration,
    /// The shared session store; `None`: in-process only.
    pub store: Option<StoreUrl>,
    /// The cluster's name (namespace in the store).
    pub cluster: String,
    /// The cluster key file; always set when `store` is.
    pub cluster_key: Option<PathBuf>,
    /// How TLS sessions resume.
    pub resumption: ResumptionMode,
}

/// How the gateway authenticates clients. At least one method is on, or authentication is
/// explicitly off; "no method configured" cannot be represented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// `--no-auth`: every client is anonymous (policy: global rules only). Tests and demos.
    NoAuth,
    /// SOCKS5 username/password (RFC 1929) checked against this file.
    Users(PathBuf),
    /// Client certificates signed by this CA (PEM) are required; the certificate's identity
    /// is the user name.
    ClientCert(PathBuf),
    /// Either: a client presenting a certificate signed by `client_ca` authenticates by its
    /// identity, any other client with username/password from `users`.
    UsersOrClientCert {
        /// Username/password file.
        users: PathBuf,
        /// CA for client certificates (PEM).
        client_ca: PathBuf,
    },
    /// Kerberos alone ([`GatewayConfig::kerberos`]): passwords checked against the KDC and
    /// GSS-API tickets, no users file, no client CA.
    Kerberos,
}

/// `kerberos_keytab` and `kerberos_service`: both or neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KerberosConfig {
    /// Keytab file with the service principal's key.
    pub keytab: PathBuf,
    /// The service principal (`socks/gw.example.com`, optionally `@REALM`).
    pub service: String,
}

impl Auth {
    /// The username/password file, if that method is on.
    pub fn users(&self) -> Option<&Path> {
        match self {
            Auth::Users(users) | Auth::UsersOrClientCert { users, .. } => Some(users),
            Auth::NoAuth | Auth::ClientCert(_) | Auth::Kerberos => None,
        }
    }

    /// The client-certificate CA, if that method is on.
    pub fn client_ca(&self) -> Option<&Path> {
        match self {
            Auth::ClientCert(ca) | Auth::UsersOrClientCert { client_ca: ca, .. } => Some(ca),
            Auth::NoAuth | Auth::Users(_) | Auth::Kerberos => None,
        }
    }
}

impl GatewayConfig {
    /// Builds the configuration from flags and, if `--config` names one, a TOML file: reads
    /// the file, lets flags override it, applies defaults and validates.
    pub fn from_args(args: GatewayArgs) -> Result<GatewayConfig, ConfigError> {
        let file = read_file(args.config.as_deref())?;
        build(args, file)
    }
}

/// The gateway's config file, key for key. Paths stay as written until [`build`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayFile {
    listen: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    users: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    client_crl: Option<Vec<PathBuf>>,
    no_auth: Option<bool>,
    kerberos_keytab: Option<PathBuf>,
    kerberos_service: Option<String>,
    udp_listen: Option<String>,
    advertise: Option<String>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
    default_deny: Option<bool>,
    full_cone: Option<bool>,
    naked_require_port: Option<bool>,
    /// A duration string or a number of seconds, hence a raw value.
    idle_timeout: Option<toml::Value>,
    max_associations: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    handshake_timeout: Option<toml::Value>,
    connect_idle_timeout: Option<toml::Value>,
    replay_window: Option<usize>,
    nice: Option<i64>,
    suites: Option<Vec<String>>,
    tls12: Option<bool>,
    heartbeat_interval: Option<toml::Value>,
    heartbeat_timeout: Option<toml::Value>,
    /// A size string such as "4MiB" or a number of bytes, hence a raw value.
    udp_buffer: Option<toml::Value>,
    metrics: Option<String>,
    audit_log: Option<PathBuf>,
    e2e: Option<Vec<String>>,
    e2e_ttl: Option<toml::Value>,
    store: Option<String>,
    cluster: Option<String>,
    cluster_key: Option<PathBuf>,
    resumption: Option<String>,
    /// Sorted, so that of several bad entries the same one is always reported.
    users_policy: Option<BTreeMap<String, UserPolicyFile>>,
}

/// `[users_policy.NAME]`: one user's rules.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserPolicyFile {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// Merges flags over the file, applies defaults and validates.
fn build(args: GatewayArgs, file: GatewayFile) -> Result<GatewayConfig, ConfigError> {
    let o = Origins::new(args.config.as_deref());

    // Every file value is parsed, even one a flag overrides: a broken file is an error.
    let listen = args
        .listen
        .or(file_value(&o, "listen", file.listen, parse_socket_addr)?)
        .unwrap_or(DEFAULT_LISTEN);
    let udp_listen = args
        .udp_listen
        .or(file_value(&o, "udp_listen", file.udp_listen, parse_socket_addr)?)
        .unwrap_or(SocketAddr::new(listen.ip(), 0));
    let advertise = args
        .advertise
        .or(file_value(&o, "advertise", file.advertise, parse_ip_addr)?);

    // TLS.
    let cert = o.path(args.cert, file.cert);
    let key = o.path(args.key, file.key);
    let (cert, key) = match (cert, key) {
        (Some(cert), Some(key)) => (cert, key),
        (None, Some(_)) => return Err(ConfigError::MissingTls { missing: "`cert`" }),
        (Some(_), None) => return Err(ConfigError::MissingTls { missing: "`key`" }),
        (None, None) => {
            return Err(ConfigError::MissingTls {
                missing: "`cert` and `key`",
            })
        }
    };

    // Authentication.
    let users = o.path(args.users, file.users);
    let client_ca = o.path(args.client_ca, file.client_ca);
    let no_auth = args.no_auth || file.no_auth.unwrap_or(false);
    let kerberos = kerberos_config(
        o.path(args.kerberos_keytab, file.kerberos_keytab),
        args.kerberos_service
            .map(|s| (s, true))
            .or(file.kerberos_service.map(|s| (s, false))),
        &o,
    )?;
    if no_auth && kerberos.is_some() {
        return Err(ConfigError::AuthConflict {
            with: "kerberos_keytab",
        });
    }
    let auth = match (no_auth, users, client_ca) {
        (true, Some(_), _) => return Err(ConfigError::AuthConflict { with: "users" }),
        (true, None, Some(_)) => return Err(ConfigError::AuthConflict { with: "client_ca" }),
        (true, None, None) => Auth::NoAuth,
        (false, Some(users), Some(client_ca)) => Auth::UsersOrClientCert { users, client_ca },
        (false, Some(users), None) => Auth::Users(users),
        (false, None, Some(ca)) => Auth::ClientCert(ca),
        (false, None, None) if kerberos.is_some() => Auth::Kerberos,
        (false, None, None) => return Err(ConfigError::NoAuthMethod),
    };
    let dir = o.path.parent().unwrap_or(Path::new(""));
    let client_crl = if args.client_crl.is_empty() {
        file.client_crl
            .unwrap_or_default()
            .into_iter()
            .map(|p| dir.join(p))
            .collect()
    } else {
        args.client_crl
    };
    if !client_crl.is_empty() && auth.client_ca().is_none() {
        return Err(ConfigError::Requires {
            key: "client_crl",
            needs: "client_ca",
        });
    }

    // Policy: within each scope deny rules come before allow rules (so a deny carves holes in
    // a wider allow); a flag given at least once replaces the file's list.
    let file_allow = file_items(&o, "allow", &file.allow.unwrap_or_default(), parse_allow)?;
    let file_deny = file_items(&o, "deny", &file.deny.unwrap_or_default(), parse_deny)?;
    let allow = if args.allow.is_empty() {
        file_allow
    } else {
        args.allow
    };
    let deny = if args.deny.is_empty() {
        file_deny
    } else {
        args.deny
    };
    let mut users_policy = HashMap::new();
    for (user, rules) in file.users_policy.unwrap_or_default() {
        // A password user's name has no ':'; a certificate's identity is `cert:NAME`, a
        // Kerberos principal's `krb:user@REALM` (crate::auth): a key of no such form would
        // silently never apply.
        let possible = match (
            user.strip_prefix(crate::auth::CERT_PREFIX),
            user.strip_prefix(crate::auth::KRB_PREFIX),
        ) {
            (Some(name), _) => !name.is_empty(),
            (_, Some(principal)) => principal
                .rsplit_once('@')
                .is_some_and(|(name, realm)| !name.is_empty() && !realm.is_empty()),
            (None, None) => !user.contains(':'),
        };
        if !possible {
            return Err(value_err(
                o.file(format!("users_policy.{user}")),
                Problem::PolicyKey(user),
            ));
        }
        let key = |list: &str| format!("users_policy.{user}.{list}");
        let mut list = file_items(&o, &key("deny"), &rules.deny, parse_deny)?;
        list.extend(file_items(&o, &key("allow"), &rules.allow, parse_allow)?);
        users_policy.insert(user, list);
    }
    let default_deny = args.default_deny || file.default_deny.unwrap_or(false);
    let policy =
        Policy::new(deny.into_iter().chain(allow).collect(), users_policy).deny_by_default(default_deny);

    // Limits.
    let idle_timeout = nonzero_duration(
        &o,
        "idle_timeout",
        args.idle_timeout,
        file.idle_timeout,
        DEFAULT_IDLE_TIMEOUT,
    )?;
    let handshake_timeout = nonzero_duration(
        &o,
        "handshake_timeout",
        args.handshake_timeout,
        file.handshake_timeout,
        DEFAULT_HANDSHAKE_TIMEOUT,
    )?;
    let max_associations = nonzero(
        &o,
        "max_associations",
        args.max_associations,
        file.max_associations,
        DEFAULT_MAX_ASSOCIATIONS,
    )?;
    let max_connections = nonzero(
        &o,
        "max_connections",
        args.max_connections,
        file.max_connections,
        DEFAULT_MAX_CONNECTIONS,
    )?;
    let max_connections_per_ip = nonzero(
        &o,
        "max_connections_per_ip",
        args.max_connections_per_ip,
        file.max_connections_per_ip,
        DEFAULT_MAX_CONNECTIONS_PER_IP,
    )?;
    let connect_idle_timeout = nonzero_duration(
        &o,
        "connect_idle_timeout",
        args.connect_idle_timeout,
        file.connect_idle_timeout,
        DEFAULT_CONNECT_IDLE_TIMEOUT,
    )?;
    let replay_window = replay_window(&o, args.replay_window, file.replay_window)?;
    let nice = nice(&o, args.nice, file.nice)?;
    // A flag given at least once replaces the file's list.
    let e2e_items = if args.e2e.is_empty() {
        file.e2e.unwrap_or_default()
    } else {
        args.e2e
    };
    // Flags were checked one by one by clap (`parse_e2e_item`): an error here is the file's.
    let e2e = crate::gateway::delegation::E2e::parse(&e2e_items)
        .map_err(|e| value_err(o.file("e2e"), Problem::E2e(e)))?;
    let e2e_ttl = nonzero_duration(&o, "e2e_ttl", args.e2e_ttl, file.e2e_ttl, DEFAULT_E2E_TTL)?;
    let suites = suites(&o, args.suites, file.suites)?;
    let heartbeat = heartbeat(
        &o,
        (args.heartbeat_interval, file.heartbeat_interval),
        (args.heartbeat_timeout, file.heartbeat_timeout),
        crate::gateway::DEFAULT_HEARTBEAT,
    )?;

    let udp_buffer = file
        .udp_buffer
        .map(|v| super::size_value(v).map_err(|p| super::value_err(o.file("udp_buffer"), p)))
        .transpose()?;
    let udp_buffer = nonzero(
        &o,
        "udp_buffer",
        args.udp_buffer,
        udp_buffer,
        crate::net::UDP_BUFFER,
    )?;

    // Cluster: a shared store seals what it holds, so it needs the key.
    let store = args
        .store
        .or(file_value(&o, "store", file.store, parse_store_url)?);
    let cluster = args
        .cluster
        .or(file_value(&o, "cluster", file.cluster, parse_cluster)?)
        .unwrap_or_else(|| DEFAULT_CLUSTER.to_owned());
    let cluster_key = o.path(args.cluster_key, file.cluster_key);
    if store.is_some() && cluster_key.is_none() {
        return Err(ConfigError::Requires {
            key: "store",
            needs: "cluster_key",
        });
    }
    let resumption = args
        .resumption
        .or(file_value(&o, "resumption", file.resumption, parse_resumption)?)
        .unwrap_or_default();

    Ok(GatewayConfig {
        listen,
        cert,
        key,
        auth,
        client_crl,
        udp_listen,
        advertise,
        policy,
        full_cone: args.full_cone || file.full_cone.unwrap_or(false),
        naked_require_port: args.naked_require_port || file.naked_require_port.unwrap_or(false),
        idle_timeout,
        max_associations,
        max_connections,
        max_connections_per_ip,
        handshake_timeout,
        connect_idle_timeout,
        replay_window,
        nice,
        suites,
        tls12: args.tls12 || file.tls12.unwrap_or(false),
        heartbeat,
        udp_buffer,
        metrics: args
            .metrics
            .or(file_value(&o, "metrics", file.metrics, parse_socket_addr)?),
        audit_log: o.path(args.audit_log, file.audit_log),
        kerberos,
        e2e,
        e2e_ttl,
        store,
        cluster,
        cluster_key,
        resumption,
    })
}

/// `kerberos_keytab` and `kerberos_service` (`(name, from_flag)`): both or neither, the
/// service a nonempty principal name, and a build that has Kerberos.
fn kerberos_config(
    keytab: Option<PathBuf>,
    service: Option<(String, bool)>,
    o: &Origins,
) -> Result<Option<KerberosConfig>, ConfigError> {
    let (keytab, (service, from_flag)) = match (keytab, service) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(ConfigError::Requires {
                key: "kerberos_keytab",
                needs: "kerberos_service",
            })
        }
        (None, Some(_)) => {
            return Err(ConfigError::Requires {
                key: "kerberos_service",
                needs: "kerberos_keytab",
            })
        }
        (Some(k), Some(s)) => (k, s),
    };
    let service = service.trim().to_owned();
    if service.is_empty() || service.contains(['\0', ' ', '\n']) {
        return Err(value_err(
            o.at("kerberos_service", from_flag),
            Problem::Principal(service),
        ));
    }
    if !cfg!(feature = "kerberos") {
        return Err(value_err(
            o.at("kerberos_service", from_flag),
            Problem::NoKerberos,
        ));
    }
    Ok(Some(KerberosConfig { keytab, service }))
}

fn parse_store_url(text: &str) -> Result<StoreUrl, Problem> {
    let url = text.trim();
    crate::store::redis::check_url(url).map_err(|e| match e {
        crate::store::StoreError::Url { reason } => Problem::StoreUrl(reason),
        other => Problem::StoreUrl(other.to_string()),
    })?;
    Ok(StoreUrl(url.to_owned()))
}

fn parse_cluster(text: &str) -> Result<String, Problem> {
    let name = text.trim();
    crate::store::check_name("cluster", name).map_err(|_| Problem::ClusterName(text.to_owned()))?;
    Ok(name.to_owned())
}

fn parse_resumption(text: &str) -> Result<ResumptionMode, Problem> {
    match text.trim() {
        "stateful" => Ok(ResumptionMode::Stateful),
        "tickets" => Ok(ResumptionMode::Tickets),
        _ => Err(Problem::Resumption(text.to_owned())),
    }
}

fn parse_ip_addr(text: &str) -> Result<IpAddr, Problem> {
    text.trim().parse().map_err(|_| Problem::IpAddr(text.to_owned()))
}

fn parse_e2e_item(text: &str) -> Result<String, String> {
    crate::gateway::delegation::E2e::parse(&[text.to_owned()])?;
    Ok(text.to_owned())
}

fn parse_allow(text: &str) -> Result<Rule, RuleError> {
    Rule::parse(Action::Allow, text)
}

fn parse_deny(text: &str) -> Result<Rule, RuleError> {
    Rule::parse(Action::Deny, text)
}

/// `--help` text of `--allow` and `--deny`: syntax, order and the default policy.
fn rule_long_help(action: Action) -> String {
    let (verb, example) = match action {
        Action::Allow => ("Allow", "--allow 127.0.0.0/8:8000-8999"),
        Action::Deny => ("Deny", "--deny 10.0.0.0/8 --deny [2001:db8::]/32:53"),
    };
    format!(
        "{verb} destinations in CIDR[:PORT[-PORT]] (repeatable), e.g. {example}. A host is \
         an address without /LEN; IPv6 with a port needs brackets. Given on the command line, \
         the list replaces the config file's.\n\n\
         Order: a user's own rules (config file, [users_policy.NAME]) first, then the global \
         ones; within each, deny rules before allow rules; the first match wins.\n\n{}",
        policy::DEFAULT_POLICY_HELP
    )
}
#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::parse_file;
    use crate::config::testing::{self, check_config_md, sa, CONFIG_MD, SHIM_SECTION};

    type Cli = testing::Cli<GatewayArgs>;

    fn flags(argv: &[&str]) -> GatewayArgs {
        testing::flags("gateway", argv)
    }

    /// Builds from `text` as if read from `gateway.toml`, plus `argv` flags.
    fn from_toml(text: &str, argv: &[&str]) -> Result<GatewayConfig, ConfigError> {
        testing::from_toml("gateway", build, text, argv)
    }

    fn error(text: &str, argv: &[&str]) -> String {
        from_toml(text, argv).unwrap_err().to_string()
    }

    const MINIMAL: &str = "cert = \"c.pem\"\nkey = \"k.pem\"\nno_auth = true\n";

    #[test]
    fn kerberos_keys_come_in_pairs_and_exclude_no_auth() {
        let base = "cert = \"c.pem\"\nkey = \"k.pem\"\n";
        assert_eq!(
            error(&format!("{base}kerberos_keytab = \"gw.keytab\""), &[]),
            "`kerberos_keytab` (--kerberos-keytab) needs `kerberos_service` (--kerberos-service)"
        );
        assert_eq!(
            error(base, &["--kerberos-service=socks/gw"]),
            "`kerberos_service` (--kerberos-service) needs `kerberos_keytab` (--kerberos-keytab)"
        );
        let got = error(MINIMAL, &["--kerberos-keytab=k", "--kerberos-service=socks/gw"]);
        let want = match cfg!(feature = "kerberos") {
            true => "cannot be combined with `kerberos_keytab`",
            false => "built without Kerberos support",
        };
        assert!(got.contains(want), "{got}");
        let got = error(
            &format!("{base}kerberos_keytab = \"k\"\nkerberos_service = \" \""),
            &[],
        );
        assert!(
            got.contains("key `kerberos_service`") && got.contains("invalid Kerberos principal"),
            "{got}"
        );
        let both = from_toml(
            &format!("{base}kerberos_keytab = \"gw.keytab\"\nkerberos_service = \"socks/gw.example.com\""),
            &[],
        );
        if cfg!(feature = "kerberos") {
            // Kerberos alone is a method; the keytab resolves against the file's directory.
            let c = both.unwrap();
            assert_eq!(c.auth, Auth::Kerberos);
            let k = c.kerberos.unwrap();
            assert_eq!(k.service, "socks/gw.example.com");
            assert!(k.keytab.ends_with("gw.keytab"));
        } else {
            let got = both.unwrap_err().to_string();
            assert!(got.contains("built without Kerberos support"), "{got}");
        }
    }

    #[test]
    fn principal_policy_keys_need_user_and_realm() {
        let ok = from_toml(
            &format!("{MINIMAL}[users_policy.\"krb:ops@EXAMPLE.COM\"]\nallow = []\n"),
            &[],
        );
        assert!(ok.is_ok(), "{ok:?}");
        for bad in ["krb:", "krb:ops", "krb:@EXAMPLE.COM", "krb:ops@"] {
            let got = error(&format!("{MINIMAL}[users_policy.\"{bad}\"]\nallow = []\n"), &[]);
            assert!(got.contains("no identity is named"), "{bad}: {got}");
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn aead_suite_names_are_accepted_in_order() {
        let c = GatewayConfig::from_args(flags(&[
            "--cert=c.pem",
            "--key=k.pem",
            "--users=u.txt",
            "--suites=chacha20-poly1305,aes128-gcm,aes128-cbc-hmac-sha256",
        ]))
        .unwrap();
        assert_eq!(
            c.suites,
            [
                CipherSuite::ChaCha20Poly1305,
                CipherSuite::Aes128Gcm,
                CipherSuite::Aes128CbcHmacSha256
            ]
        );
        // The default allows every suite, the AEAD ones included (the client's order picks).
        let d = GatewayConfig::from_args(flags(&["--cert=c.pem", "--key=k.pem", "--users=u.txt"])).unwrap();
        assert!(
            d.suites.contains(&CipherSuite::Aes128Gcm) && d.suites.contains(&CipherSuite::ChaCha20Poly1305)
        );
    }

    #[test]
    fn flags_only_with_defaults() {
        let c = GatewayConfig::from_args(flags(&[
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--users",
            "users.txt",
        ]))
        .unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.udp_listen, sa("127.0.0.1:0"));
        assert_eq!(c.cert, PathBuf::from("c.pem"));
        assert_eq!(c.key, PathBuf::from("k.pem"));
        assert_eq!(c.auth, Auth::Users("users.txt".into()));
        assert_eq!(c.advertise, None);
        assert_eq!(c.policy, Policy::default());
        assert!(!c.full_cone && !c.tls12 && !c.naked_require_port);
        assert_eq!(c.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.max_associations, 4096);
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.max_connections_per_ip, 256);
        assert_eq!(c.connect_idle_timeout, Duration::from_secs(600));
        assert!(c.client_crl.is_empty());
        assert_eq!(c.replay_window, 1024);
        assert_eq!(c.nice, None);
        assert_eq!(c.suites, CipherSuite::ALL.to_vec());
        assert_eq!(c.suites[0], CipherSuite::Aes128CbcHmacSha256);
    }

    #[test]
    fn users_policy_keys_name_password_users_or_certificates() {
        let c = from_toml(
            &format!("{MINIMAL}[users_policy.ops]\ndeny = [\"10.0.0.0/8\"]\n[users_policy.\"cert:ops\"]\nallow = [\"10.0.0.0/8\"]\n"),
            &[],
        )
        .unwrap();
        assert!(c.policy.check(Some("ops"), sa("10.1.1.1:1")).is_err());
        assert!(c.policy.check(Some("cert:ops"), sa("10.1.1.1:1")).is_ok());
        for bad in ["a:b", "cert:", "x:cert:y"] {
            let got = error(&format!("{MINIMAL}[users_policy.\"{bad}\"]\nallow = []\n"), &[]);
            assert!(
                got.starts_with(&format!("gateway.toml: key `users_policy.{bad}`: no identity")),
                "{got}"
            );
        }
    }

    #[test]
    fn e2e_classes_and_their_ttl_from_file_and_flags() {
        let c = from_toml(
            &format!("{MINIMAL}e2e = [\"10.9.0.0/16\", \"bank.test\"]\ne2e_ttl = \"5m\"\n"),
            &[],
        )
        .unwrap();
        assert!(c.e2e.matches(Some("www.bank.test"), "192.0.2.1".parse().unwrap()));
        assert!(c.e2e.matches(None, "10.9.1.1".parse().unwrap()));
        assert_eq!(c.e2e_ttl, Duration::from_secs(300));
        // A flag list replaces the file's.
        let c = from_toml(
            &format!("{MINIMAL}e2e = [\"bank.test\"]\n"),
            &["--e2e=10.0.0.0/8"],
        )
        .unwrap();
        assert!(!c.e2e.matches(Some("bank.test"), "192.0.2.1".parse().unwrap()));
        assert!(c.e2e.matches(None, "10.1.1.1".parse().unwrap()));
        assert_eq!(c.e2e_ttl, DEFAULT_E2E_TTL);
        let got = error(&format!("{MINIMAL}e2e = [\"not a name\"]\n"), &[]);
        assert!(got.contains("key `e2e`: invalid e2e entry"), "{got}");
        let got = error(&format!("{MINIMAL}e2e_ttl = 0\n"), &[]);
        assert!(got.contains("key `e2e_ttl`: must be greater than zero"), "{got}");
    }

    #[test]
    fn connection_limits_and_revocation_lists() {
        let c = GatewayConfig::from_args(flags(&[
            "--cert=c",
            "--key=k",
            "--client-ca=ca.pem",
            "--client-crl=a.crl",
            "--client-crl=b.crl",
            "--max-connections-per-ip=3",
            "--connect-idle-timeout=90s",
        ]))
        .unwrap();
        assert_eq!(c.client_crl, [PathBuf::from("a.crl"), PathBuf::from("b.crl")]);
        assert_eq!(c.max_connections_per_ip, 3);
        assert_eq!(c.connect_idle_timeout, Duration::from_secs(90));
        // From the file, relative to it; a flag list replaces the file's.
        let mut args = flags(&[]);
        args.config = Some("/etc/sudp/gateway.toml".into());
        let file = parse_file(
            Path::new("x"),
            "cert = \"c\"\nkey = \"k\"\nclient_ca = \"ca.pem\"\nclient_crl = [\"crl/one.pem\"]\n\
             max_connections_per_ip = 7\nconnect_idle_timeout = \"1h\"",
        )
        .unwrap();
        let c = build(args, file).unwrap();
        assert_eq!(c.client_crl, [PathBuf::from("/etc/sudp/crl/one.pem")]);
        assert_eq!(c.max_connections_per_ip, 7);
        assert_eq!(c.connect_idle_timeout, Duration::from_secs(3600));
        // A CRL needs a client CA; zero limits are refused by name.
        let got = error(MINIMAL, &["--client-crl=a.crl"]);
        assert_eq!(got, "`client_crl` (--client-crl) needs `client_ca` (--client-ca)");
        let got = error(MINIMAL, &["--max-connections-per-ip=0"]);
        assert_eq!(got, "flag `--max-connections-per-ip`: must be greater than zero");
        let got = error(&format!("{MINIMAL}connect_idle_timeout = 0"), &[]);
        assert!(
            got.contains("key `connect_idle_timeout`: must be greater than zero"),
            "{got}"
        );
    }

    #[test]
    fn flags_only_every_flag() {
        let c = GatewayConfig::from_args(flags(&[
            "--listen=[::1]:8443",
            "--cert=c.pem",
            "--key=k.pem",
            "--client-ca=ca.pem",
            "--udp-listen=0.0.0.0:9000",
            "--advertise=192.0.2.7",
            "--allow=127.0.0.0/8:7000",
            "--allow=10.0.0.0/8",
            "--deny=10.9.0.0/16",
            "--default-deny",
            "--full-cone",
            "--idle-timeout=5m",
            "--max-associations=10",
            "--max-connections=20",
            "--handshake-timeout=1500ms",
            "--replay-window=64",
            "--suites=aes256-cbc-hmac-sha256",
            "--tls12",
        ]))
        .unwrap();
        assert_eq!(c.listen, sa("[::1]:8443"));
        assert_eq!(c.auth, Auth::ClientCert("ca.pem".into()));
        assert_eq!(c.udp_listen, sa("0.0.0.0:9000"));
        assert_eq!(c.advertise, Some("192.0.2.7".parse().unwrap()));
        assert!(c.full_cone && c.tls12 && c.policy.denies_by_default());
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.handshake_timeout, Duration::from_millis(1500));
        assert_eq!((c.max_associations, c.max_connections), (10, 20));
        assert_eq!(c.replay_window, 64);
        assert_eq!(c.suites, vec![CipherSuite::Aes256CbcHmacSha256]);
        let rules: Vec<String> = c.policy.global_rules().iter().map(|r| r.to_string()).collect();
        assert_eq!(
            rules,
            ["deny 10.9.0.0/16", "allow 127.0.0.0/8:7000", "allow 10.0.0.0/8"]
        );
        assert!(c.policy.check(None, sa("10.9.1.1:1")).is_err());
        assert!(c.policy.check(None, sa("10.8.1.1:1")).is_ok());
        assert!(c.policy.check(None, sa("127.0.0.1:7000")).is_ok());
        assert!(c.policy.check(None, sa("192.0.2.1:1")).is_err());
    }

    #[test]
    fn udp_listen_defaults_to_the_listen_ip() {
        let c = GatewayConfig::from_args(flags(&[
            "--listen=192.0.2.1:443",
            "--cert=c",
            "--key=k",
            "--no-auth",
        ]))
        .unwrap();
        assert_eq!(c.udp_listen, sa("192.0.2.1:0"));
        assert_eq!(c.auth, Auth::NoAuth);
    }

    #[test]
    fn file_only() {
        let c = from_toml(
            r#"
            listen = "0.0.0.0:1443"
            cert = "tls/cert.pem"
            key = "/etc/sudp/key.pem"
            users = "users.txt"
            client_ca = "ca.pem"
            udp_listen = "0.0.0.0:5000"
            advertise = "2001:db8::1"
            allow = ["127.0.0.1:9000"]
            deny = ["192.0.2.0/24", "[2001:db8::]/32:53"]
            full_cone = true
            naked_require_port = true
            idle_timeout = 30
            max_associations = 7
            max_connections = 8
            handshake_timeout = "2s"
            replay_window = 65536
            nice = -20
            suites = ["aes256-cbc-hmac-sha256", "aes128-cbc-hmac-sha256"]
            tls12 = true

            [users_policy.alice]
            allow = ["192.0.2.0/25"]
            deny = ["192.0.2.1"]

            [users_policy.bob]
            deny = ["0.0.0.0/0"]
            "#,
            &[],
        )
        .unwrap();
        assert_eq!(c.listen, sa("0.0.0.0:1443"));
        // Relative file paths are resolved against the file's directory (here: none).
        assert_eq!(c.cert, PathBuf::from("tls/cert.pem"));
        assert_eq!(c.key, PathBuf::from("/etc/sudp/key.pem"));
        assert_eq!(
            c.auth,
            Auth::UsersOrClientCert {
                users: "users.txt".into(),
                client_ca: "ca.pem".into()
            }
        );
        assert_eq!(c.auth.users(), Some(Path::new("users.txt")));
        assert_eq!(c.auth.client_ca(), Some(Path::new("ca.pem")));
        assert_eq!(c.udp_listen, sa("0.0.0.0:5000"));
        assert_eq!(c.advertise, Some("2001:db8::1".parse().unwrap()));
        assert!(c.full_cone && c.tls12 && !c.policy.denies_by_default());
        assert!(c.naked_require_port);
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.handshake_timeout, Duration::from_secs(2));
        assert_eq!((c.max_associations, c.max_connections), (7, 8));
        assert_eq!(c.replay_window, 65536);
        assert_eq!(c.nice, Some(-20));
        assert_eq!(
            c.suites,
            [CipherSuite::Aes256CbcHmacSha256, CipherSuite::Aes128CbcHmacSha256]
        );
        let p = &c.policy;
        assert_eq!(p.global_rules().len(), 3);
        assert!(p.check(None, sa("127.0.0.1:9000")).is_ok());
        assert!(p.check(None, sa("192.0.2.9:1")).is_err());
        assert!(p.check(Some("alice"), sa("192.0.2.9:1")).is_ok());
        assert!(p.check(Some("alice"), sa("192.0.2.1:1")).is_err());
        assert!(p.check(Some("alice"), sa("192.0.2.200:1")).is_err());
        assert!(p.check(Some("bob"), sa("198.51.100.1:1")).is_err());
        assert!(p.check(Some("carol"), sa("198.51.100.1:1")).is_ok());
    }

    #[test]
    fn flags_override_the_file() {
        let file = r#"
            listen = "0.0.0.0:1443"
            cert = "c.pem"
            key = "k.pem"
            users = "users.txt"
            allow = ["10.0.0.0/8"]
            deny = ["192.0.2.0/24"]
            idle_timeout = "1h"
            max_connections = 8
            suites = ["aes256-cbc-hmac-sha256"]
        "#;
        let c = from_toml(
            file,
            &[
                "--listen=127.0.0.2:1",
                "--key=other.pem",
                "--allow=172.16.0.0/12",
                "--allow=198.51.100.0/24",
                "--idle-timeout=45",
                "--suites=aes128-cbc-hmac-sha256,aes256-cbc-hmac-sha256",
            ],
        )
        .unwrap();
        assert_eq!(c.listen, sa("127.0.0.2:1"));
        assert_eq!(c.udp_listen, sa("127.0.0.2:0"));
        assert_eq!(c.cert, PathBuf::from("c.pem"));
        assert_eq!(c.key, PathBuf::from("other.pem"));
        assert_eq!(c.idle_timeout, Duration::from_secs(45));
        assert_eq!(c.max_connections, 8);
        assert_eq!(c.suites, CipherSuite::ALL[..2].to_vec());
        // --allow replaced the file's allow list; the file's deny list stays.
        let rules: Vec<String> = c.policy.global_rules().iter().map(|r| r.to_string()).collect();
        assert_eq!(
            rules,
            [
                "deny 192.0.2.0/24",
                "allow 172.16.0.0/12",
                "allow 198.51.100.0/24"
            ]
        );
        // Boolean flags can only switch on.
        let c = from_toml(MINIMAL, &["--tls12", "--full-cone"]).unwrap();
        assert!(c.tls12 && c.full_cone);
    }

    #[test]
    fn relative_file_paths_resolve_against_the_file() {
        let mut args = flags(&["--users=flag-users.txt"]);
        args.config = Some("/etc/sudp/gateway.toml".into());
        let file = parse_file(
            Path::new("x"),
            "cert = \"cert.pem\"\nkey = \"/abs/key.pem\"\nclient_ca = \"ca/ca.pem\"",
        )
        .unwrap();
        let c = build(args, file).unwrap();
        assert_eq!(c.cert, PathBuf::from("/etc/sudp/cert.pem"));
        assert_eq!(c.key, PathBuf::from("/abs/key.pem"));
        assert_eq!(c.auth.client_ca(), Some(Path::new("/etc/sudp/ca/ca.pem")));
        assert_eq!(c.auth.users(), Some(Path::new("flag-users.txt")));
    }

    #[test]
    fn each_value_error_names_file_and_key() {
        let cases: &[(&str, &str)] = &[
            (
                "idle_timeout = \"5 parsecs\"",
                "gateway.toml: key `idle_timeout`: invalid duration \"5 parsecs\"",
            ),
            (
                "handshake_timeout = \"0s\"",
                "gateway.toml: key `handshake_timeout`: must be greater than zero",
            ),
            (
                "handshake_timeout = -3",
                "gateway.toml: key `handshake_timeout`: invalid duration \"-3\"",
            ),
            ("nice = 20", "gateway.toml: key `nice`: 20 is outside -20..=19"),
            ("nice = -21", "gateway.toml: key `nice`: -21 is outside -20..=19"),
            (
                "idle_timeout = 1.5",
                "gateway.toml: key `idle_timeout`: expected a duration string",
            ),
            (
                "listen = \"foo\"",
                "gateway.toml: key `listen`: invalid socket address \"foo\"",
            ),
            (
                "udp_listen = \"1.2.3.4\"",
                "gateway.toml: key `udp_listen`: invalid socket address \"1.2.3.4\"",
            ),
            (
                "advertise = \"host.example\"",
                "gateway.toml: key `advertise`: invalid IP address \"host.example\"",
            ),
            (
                "allow = [\"10.0.0.0/33\"]",
                "gateway.toml: key `allow`: invalid rule \"10.0.0.0/33\": prefix length 33",
            ),
            (
                "deny = [\"nope\"]",
                "gateway.toml: key `deny`: invalid rule \"nope\"",
            ),
            (
                "[users_policy.alice]\ndeny = [\"10.0.0.1/8\"]",
                "gateway.toml: key `users_policy.alice.deny`: invalid rule \"10.0.0.1/8\": \
                 host bits",
            ),
            (
                "max_associations = 0",
                "gateway.toml: key `max_associations`: must be greater than zero",
            ),
            (
                "max_connections = 0",
                "gateway.toml: key `max_connections`: must be greater than zero",
            ),
            (
                "replay_window = 32",
                "gateway.toml: key `replay_window`: 32 is outside 64..=65536",
            ),
            (
                "replay_window = 65537",
                "gateway.toml: key `replay_window`: 65537 is outside 64..=65536",
            ),
            (
                "suites = []",
                "gateway.toml: key `suites`: at least one cipher suite",
            ),
            (
                "suites = [\"rot13\"]",
                "gateway.toml: key `suites`: unknown cipher suite \"rot13\" (known: \
                 aes128-cbc-hmac-sha256, aes256-cbc-hmac-sha256, aes128-gcm, chacha20-poly1305)",
            ),
            (
                "suites = [\"aes128-cbc-hmac-sha256\", \"aes128-cbc-hmac-sha256\"]",
                "gateway.toml: key `suites`: cipher suite \"aes128-cbc-hmac-sha256\" is listed",
            ),
        ];
        for (extra, want) in cases {
            // Keys before MINIMAL's so that a [table] in `extra` does not swallow them.
            let text = format!("{MINIMAL}{extra}\n");
            let got = error(&text, &[]);
            assert!(got.starts_with(want), "{extra}:\n got: {got}\nwant: {want}");
        }
    }

    #[test]
    fn flag_value_errors_name_the_flag() {
        let got = error(MINIMAL, &["--replay-window=10"]);
        assert_eq!(got, "flag `--replay-window`: 10 is outside 64..=65536");
        let got = error(MINIMAL, &["--max-connections=0"]);
        assert_eq!(got, "flag `--max-connections`: must be greater than zero");
        let got = error(MINIMAL, &["--idle-timeout=0"]);
        assert_eq!(got, "flag `--idle-timeout`: must be greater than zero");
        let got = error(
            MINIMAL,
            &["--suites=aes128-cbc-hmac-sha256,aes128-cbc-hmac-sha256"],
        );
        assert!(got.starts_with("flag `--suites`: cipher suite"), "{got}");
        // A broken file is an error even where a flag overrides the broken key.
        let got = error(&format!("{MINIMAL}idle_timeout = \"x\""), &["--idle-timeout=5s"]);
        assert!(got.contains("key `idle_timeout`"), "{got}");
    }

    #[test]
    fn heartbeat_keys() {
        let c = from_toml(MINIMAL, &[]).unwrap();
        assert_eq!(c.heartbeat, crate::gateway::DEFAULT_HEARTBEAT);
        let c = from_toml(
            &format!("{MINIMAL}heartbeat_interval = \"250ms\"\nheartbeat_timeout = 3\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.heartbeat,
            Heartbeat {
                interval: Duration::from_millis(250),
                timeout: Duration::from_secs(3)
            }
        );
        // Zero turns PINGs off; the timeout still bounds writes.
        let c = from_toml(MINIMAL, &["--heartbeat-interval=0"]).unwrap();
        assert_eq!(c.heartbeat.interval, Duration::ZERO);
        let got = error(MINIMAL, &["--heartbeat-timeout=1s"]);
        assert!(
            got.starts_with("flag `--heartbeat-timeout`: the heartbeat timeout (1s) must be longer"),
            "{got}"
        );
        let got = error(&format!("{MINIMAL}heartbeat_interval = \"20s\""), &[]);
        assert!(
            got.starts_with("gateway.toml: key `heartbeat_interval`:"),
            "{got}"
        );
        let got = error(MINIMAL, &["--heartbeat-timeout=0"]);
        assert_eq!(got, "flag `--heartbeat-timeout`: must be greater than zero");
    }

    #[test]
    fn clap_rejects_malformed_flags() {
        for argv in [
            ["--listen", "foo"],
            ["--idle-timeout", "5 parsecs"],
            ["--allow", "10.0.0.0/33"],
            ["--deny", "x"],
            ["--suites", "rot13"],
            ["--advertise", "1.2.3.4:5"],
            ["--max-associations", "x"],
            ["--max-associations=-1", "--tls12"],
            ["--store", "memcached://x"],
            ["--cluster", "a b"],
            ["--resumption", "never"],
        ] {
            let args = std::iter::once("gateway").chain(argv);
            let err = Cli::try_parse_from(args).err().expect("must fail");
            let flag = argv[0].split('=').next().unwrap();
            assert!(err.to_string().contains(flag), "{err}");
        }
        let err = Cli::try_parse_from(["gateway", "--deny", "10.0.0.0/8:99999"])
            .err()
            .expect("must fail");
        assert!(
            err.to_string().contains("invalid rule \"10.0.0.0/8:99999\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_and_mistyped_keys_are_rejected_by_name() {
        let got = error(&format!("{MINIMAL}idle_timout = \"5s\""), &[]);
        assert!(got.starts_with("gateway.toml: "), "{got}");
        assert!(got.contains("idle_timout"), "{got}");
        let got = error(&format!("{MINIMAL}[users_policy.alice]\npermit = []"), &[]);
        assert!(got.contains("permit"), "{got}");
        let got = error(&format!("{MINIMAL}max_connections = \"many\""), &[]);
        assert!(got.contains("max_connections"), "{got}");
        let got = error("listen = ", &[]);
        assert!(got.starts_with("gateway.toml: "), "{got}");
    }

    #[test]
    fn cluster_keys() {
        let c = from_toml(MINIMAL, &[]).unwrap();
        assert_eq!((c.store.as_ref(), c.cluster.as_str()), (None, "default"));
        assert_eq!(c.resumption, ResumptionMode::Stateful);
        let file = "store = \"redis://127.0.0.1:6379/2\"\ncluster = \"edge-1\"\n\
                    cluster_key = \"keys/cluster.key\"\nresumption = \"tickets\"\n";
        let c = from_toml(&format!("{MINIMAL}{file}"), &[]).unwrap();
        assert_eq!(c.store.as_ref().unwrap().as_str(), "redis://127.0.0.1:6379/2");
        assert_eq!(c.cluster, "edge-1");
        assert_eq!(c.cluster_key, Some(PathBuf::from("keys/cluster.key")));
        assert_eq!(c.resumption, ResumptionMode::Tickets);
        let c = from_toml(
            &format!("{MINIMAL}{file}"),
            &[
                "--cluster=b",
                "--resumption=stateful",
                "--store=rediss://[::1]:6380/0",
            ],
        )
        .unwrap();
        assert_eq!(
            (c.cluster.as_str(), c.resumption),
            ("b", ResumptionMode::Stateful)
        );
        assert!(c.store.unwrap().as_str().starts_with("rediss://"));

        // A store without a key names both.
        let got = error(MINIMAL, &["--store=redis://127.0.0.1:6379/0"]);
        assert_eq!(got, "`store` (--store) needs `cluster_key` (--cluster-key)");
        let got = error(&format!("{MINIMAL}store = \"redis://127.0.0.1:6379\"\n"), &[]);
        assert!(got.contains("`cluster_key`"), "{got}");
        for (extra, want) in [
            (
                "store = \"http://x:1\"",
                "gateway.toml: key `store`: invalid store URL",
            ),
            (
                "cluster = \"a:b\"",
                "gateway.toml: key `cluster`: invalid cluster name",
            ),
            (
                "resumption = \"both\"",
                "gateway.toml: key `resumption`: invalid resumption mode",
            ),
        ] {
            let got = error(&format!("{MINIMAL}{extra}\n"), &[]);
            assert!(got.starts_with(want), "{got}");
        }
        // A password in the URL is never printed.
        let url = StoreUrl("redis://:hunter2@127.0.0.1:6379/0".into());
        assert_eq!(format!("{url:?}"), "StoreUrl(redis://127.0.0.1:6379/0)");
        let err = parse_store_url("redis://:hunter2@[::1/0")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn tls_files_are_required_together() {
        let got = error("no_auth = true\ncert = \"c\"", &[]);
        assert!(got.starts_with("missing `key`"), "{got}");
        let got = error("no_auth = true\nkey = \"k\"", &[]);
        assert!(got.starts_with("missing `cert`:"), "{got}");
        let got = error("no_auth = true", &[]);
        assert!(got.starts_with("missing `cert` and `key`"), "{got}");
        assert!(got.contains("--cert"), "{got}");
    }

    #[test]
    fn authentication_must_be_chosen() {
        let got = error("cert = \"c\"\nkey = \"k\"", &[]);
        assert!(got.contains("no client authentication"), "{got}");
        assert!(got.contains("--no-auth"), "{got}");
        let got = error(MINIMAL, &["--users=u.txt"]);
        assert!(got.contains("`no_auth` (--no-auth) cannot be combined with `users` (--users)"));
        let got = error(MINIMAL, &["--client-ca=ca.pem"]);
        assert!(got.contains("with `client_ca` (--client-ca)"), "{got}");
    }

    #[test]
    fn missing_file_is_reported_with_its_path() {
        let args = flags(&["--config=/nonexistent/sudp/gateway.toml"]);
        let got = GatewayConfig::from_args(args).unwrap_err().to_string();
        assert!(
            got.starts_with("/nonexistent/sudp/gateway.toml: cannot read config file"),
            "{got}"
        );
    }

    #[test]
    fn allow_and_deny_help_states_the_default_policy() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let help = cmd.render_long_help().to_string();
        assert!(help.contains("Default policy:"), "{help}");
        assert!(help.contains("first match wins"), "{help}");
    }

    #[test]
    fn config_md_documents_every_flag_and_its_snippets_parse() {
        // The gateway's part; the shim's section is checked in the shim's tests.
        let doc = CONFIG_MD.split(SHIM_SECTION).next().unwrap();
        check_config_md::<GatewayArgs>(doc, |toml| {
            from_toml(&format!("{MINIMAL}{toml}"), &[]).unwrap();
        });
    }

    #[test]
    fn example_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gateway.toml");
        let args = GatewayArgs {
            config: Some(path.clone()),
            ..GatewayArgs::default()
        };
        let c = GatewayConfig::from_args(args).unwrap();
        let dir = path.parent().unwrap();
        assert!(c.cert.starts_with(dir), "{}", c.cert.display());
        assert!(c.auth.users().is_some());
        assert!(c.policy.check(None, sa("127.0.0.1:1")).is_err());
        assert!(c.policy.check(None, sa("10.20.0.1:1")).is_err());
        assert!(c.policy.check(Some("ops"), sa("10.20.0.1:1")).is_ok());
        assert!(c.policy.check(None, sa("10.0.53.1:53")).is_ok());
        assert!(c.policy.check(None, sa("198.51.100.9:5000")).is_err());
        assert!(c.policy.check(None, sa("198.51.100.8:5000")).is_ok());
    }
}
