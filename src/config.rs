//! Configuration: command-line flags and TOML files parsed once into typed, validated configs.
//!
//! Each binary role has three layers:
//!
//! * an `*Args` struct (`clap::Args`) of flags, every one optional so a file can supply it;
//! * a private `*File` struct (`serde`, unknown keys rejected) mirroring the flags as
//!   snake_case keys;
//! * a public `*Config` of typed, validated values, built by `*Config::from_args`, which reads
//!   the file named by `--config`, lets flags override its keys (a repeatable flag given at
//!   least once replaces the file's whole list) and checks everything that can be checked
//!   without touching the filesystem or the network.
//!
//! Relative paths in a config file are resolved against the file's directory, so a config
//! works from any working directory; relative paths given as flags are left relative to the
//! working directory, as a shell user expects. Whether those files exist is checked when the
//! gateway starts, not here.
//!
//! Every error names where the bad value came from: the file and key
//! (`gateway.toml: key `idle_timeout`: invalid duration "5 parsecs" ...`) or the flag.
//! `docs/CONFIG.md` lists every key.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::policy::{self, Action, Policy, Rule, RuleError};
use crate::proto::keys::CipherSuite;
use crate::proto::replay;
use crate::proto::socks::Address;

/// Control (TLS) listener address when neither the file nor a flag gives one.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 1080));
/// Default idle timeout of a UDP association.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default limit on concurrent UDP associations.
pub const DEFAULT_MAX_ASSOCIATIONS: usize = 4096;
/// Default limit on concurrent control connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default time a client has to finish the TLS and SOCKS5 handshakes.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Run the secure-UDP gateway: SOCKS5 over TLS plus a UDP relay for naked and secure UDP.
///
/// Every flag is optional, so that a `--config` file can supply it; a flag given on the
/// command line overrides the file's key of the same name.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GatewayArgs {
    /// TOML config file (keys as in docs/CONFIG.md); flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// TLS control listener [default: 127.0.0.1:1080].
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

    /// Accept clients without any authentication. For tests and demos only; cannot be
    /// combined with --users or --client-ca.
    #[arg(long)]
    pub no_auth: bool,

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

    /// Close a UDP association after this long without traffic, e.g. 30s, 5m [default: 120s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,

    /// Most concurrent UDP associations [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_associations: Option<usize>,

    /// Most concurrent control connections [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Time a client has to finish the TLS and SOCKS5 handshakes [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub handshake_timeout: Option<Duration>,

    /// Replay window of secure-UDP records, in records, 64..=65536 (rounded up to a multiple
    /// of 64) [default: 1024].
    #[arg(long, value_name = "N")]
    pub replay_window: Option<usize>,

    /// Secure-UDP cipher suites to offer, most preferred first, comma-separated
    /// [default: aes128-cbc-hmac-sha256,aes256-cbc-hmac-sha256].
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_suite)]
    pub suites: Vec<CipherSuite>,

    /// Also accept TLS 1.2 on the control connection [default: TLS 1.3 only].
    #[arg(long)]
    pub tls12: bool,
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
    /// UDP relay socket (port 0: any free port).
    pub udp_listen: SocketAddr,
    /// Address for BND.ADDR replies; `None`: the relay socket's IP, or the control
    /// connection's local IP when the relay socket is bound to an unspecified address.
    pub advertise: Option<IpAddr>,
    /// Destination policy for CONNECT, naked UDP and secure UDP.
    pub policy: Policy,
    /// Accept UDP replies from any source, not only from destinations the client sent to.
    pub full_cone: bool,
    /// A UDP association with no traffic for this long is closed (nonzero).
    pub idle_timeout: Duration,
    /// Most concurrent UDP associations (nonzero).
    pub max_associations: usize,
    /// Most concurrent control connections (nonzero).
    pub max_connections: usize,
    /// Time a client has to finish the TLS and SOCKS5 handshakes (nonzero).
    pub handshake_timeout: Duration,
    /// Replay window size in records, within
    /// [`replay::MIN_WINDOW`]..=[`replay::MAX_WINDOW`].
    pub replay_window: usize,
    /// Cipher suites to offer, most preferred first: non-empty, no duplicates.
    pub suites: Vec<CipherSuite>,
    /// Accept TLS 1.2 as well as TLS 1.3.
    pub tls12: bool,
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
}

impl Auth {
    /// The username/password file, if that method is on.
    pub fn users(&self) -> Option<&Path> {
        match self {
            Auth::Users(users) | Auth::UsersOrClientCert { users, .. } => Some(users),
            Auth::NoAuth | Auth::ClientCert(_) => None,
        }
    }

    /// The client-certificate CA, if that method is on.
    pub fn client_ca(&self) -> Option<&Path> {
        match self {
            Auth::ClientCert(ca) | Auth::UsersOrClientCert { client_ca: ca, .. } => Some(ca),
            Auth::NoAuth | Auth::Users(_) => None,
        }
    }
}

/// Where a configuration value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    /// A key of a config file (`users_policy.alice.allow` for nested keys).
    File {
        /// The file as named on the command line.
        path: PathBuf,
        /// The dotted key.
        key: String,
    },
    /// A command-line flag, such as `--idle-timeout`.
    Flag(String),
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::File { path, key } => write!(f, "{}: key `{key}`", path.display()),
            At::Flag(flag) => write!(f, "flag `{flag}`"),
        }
    }
}

/// A configuration that cannot be used: which file, key or flag, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("{}: cannot read config file: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The config file is not valid TOML, has an unknown key or a value of the wrong type
    /// (toml's message names the key and shows the line).
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's description, with line and column.
        message: String,
    },
    /// A value is invalid.
    #[error("{at}: {problem}")]
    Value {
        /// The key or flag.
        at: At,
        /// What is wrong.
        problem: Problem,
    },
    /// `cert` or `key` (or both) is missing.
    #[error(
        "missing {missing}: the gateway needs a TLS certificate and private key \
         (--cert FILE --key FILE, or `cert` and `key` in the config file)"
    )]
    MissingTls {
        /// `` `cert` ``, `` `key` `` or both.
        missing: &'static str,
    },
    /// No authentication method is configured and `--no-auth` was not given.
    #[error(
        "no client authentication configured: set `users` (--users FILE) and/or `client_ca` \
         (--client-ca FILE); for tests and demos only, --no-auth accepts every client"
    )]
    NoAuthMethod,
    /// `no_auth` together with a real method.
    #[error(
        "`no_auth` (--no-auth) cannot be combined with `{with}` (--{}): with no-auth on, \
         any client could skip authentication; drop one of them",
        with.replace('_', "-")
    )]
    AuthConflict {
        /// The other key: `users` or `client_ca`.
        with: &'static str,
    },
    /// Shim: no gateway to connect to.
    #[error("missing `gateway`: the shim needs at least one gateway (--gateway HOST:PORT, or `gateway` in the config file)")]
    MissingGateway,
    /// Shim: no way to check the gateway's certificate.
    #[error(
        "missing `ca` or `pin`: the shim needs to know how to trust the gateway \
         (--ca FILE or --pin SHA256, or `ca` / `pin` in the config file)"
    )]
    MissingTrust,
    /// Two settings that exclude each other.
    #[error("`{a}` (--{}) and `{b}` (--{}) cannot be combined: {why}", a.replace('_', "-"), b.replace('_', "-"))]
    Conflict {
        /// One key.
        a: &'static str,
        /// The other key.
        b: &'static str,
        /// Why not.
        why: &'static str,
    },
    /// A setting given without the one it needs.
    #[error("`{key}` (--{}) needs `{needs}` (--{})", key.replace('_', "-"), needs.replace('_', "-"))]
    Requires {
        /// The key given.
        key: &'static str,
        /// The key missing.
        needs: &'static str,
    },
    /// Shim: neither the SOCKS5 listener nor any forward.
    #[error("nothing to serve: the SOCKS5 listener is off (`no_socks`) and no `forward` is given")]
    NothingToServe,
}

/// What is wrong with one configuration value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// Not a duration.
    #[error(transparent)]
    Duration(#[from] DurationError),
    /// Not an `IP:PORT` socket address.
    #[error("invalid socket address \"{0}\" (expected IP:PORT, e.g. 127.0.0.1:1080 or [::1]:1080)")]
    SocketAddr(String),
    /// Not an IP address.
    #[error("invalid IP address \"{0}\"")]
    IpAddr(String),
    /// A policy rule that does not parse.
    #[error(transparent)]
    Rule(#[from] RuleError),
    /// A value of the wrong TOML type.
    #[error("expected {expected}, found {found}")]
    Type {
        /// What the key takes.
        expected: &'static str,
        /// The TOML type found.
        found: &'static str,
    },
    /// A number outside its range.
    #[error("{value} is outside {min}..={max}")]
    OutOfRange {
        /// The value given.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// Zero where only a positive value makes sense.
    #[error("must be greater than zero")]
    Zero,
    /// A cipher suite name this build does not know.
    #[error("unknown cipher suite \"{name}\" (known: {})", known_suites())]
    UnknownSuite {
        /// The name given.
        name: String,
    },
    /// A cipher suite listed twice.
    #[error("cipher suite \"{0}\" is listed twice")]
    DuplicateSuite(CipherSuite),
    /// An empty suite list.
    #[error("at least one cipher suite is required (known: {})", known_suites())]
    NoSuites,
    /// Not `HOST:PORT` with a nonzero port.
    #[error(
        "invalid HOST:PORT \"{0}\" (expected e.g. gw.example:1080, 192.0.2.1:1080 or \
         [2001:db8::1]:1080; the port must be nonzero)"
    )]
    HostPort(String),
    /// An empty gateway list.
    #[error("at least one gateway is required")]
    NoGateway,
    /// A port forward that does not parse.
    #[error("invalid forward \"{text}\": {why}")]
    Forward {
        /// The text given.
        text: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Two forwards of one protocol on the same local address.
    #[error("forward \"{0}\": another forward of the same protocol binds the same local address")]
    DuplicateForward(String),
    /// Not a certificate pin.
    #[error(
        "invalid pin \"{0}\" (expected the certificate's SHA-256: 64 hex digits or 32 colon-separated pairs)"
    )]
    Pin(String),
    /// Not a TLS server name.
    #[error("invalid TLS server name \"{0}\" (expected a DNS name or an IP address)")]
    ServerName(String),
    /// A user name that RFC 1929 cannot carry.
    #[error("a user name must be 1 to 255 bytes")]
    UserName,
}

/// Text that is not a duration (see [`parse_duration`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration \"{0}\" (expected a number and a unit ms, s, m or h, e.g. 1500ms, 30s, \
     5m, 2h, or a bare number of seconds)"
)]
pub struct DurationError(pub String);

/// Parses `"1500ms"`, `"30s"`, `"5m"`, `"2h"` or a bare number of seconds (`"120"`).
/// Whitespace around the text and between number and unit is ignored.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let bad = || DurationError(text.to_owned());
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(bad());
    }
    let n: u64 = number.parse().map_err(|_| bad())?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs).ok_or_else(bad);
    match unit.trim_start() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(bad()),
    }
}

impl GatewayConfig {
    /// Builds the configuration from flags and, if `--config` names one, a TOML file: reads
    /// the file, lets flags override it, applies defaults and validates.
    pub fn from_args(args: GatewayArgs) -> Result<GatewayConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.clone(),
                    error,
                })?;
                parse_file(path, &text)?
            }
            None => GatewayFile::default(),
        };
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
    no_auth: Option<bool>,
    udp_listen: Option<String>,
    advertise: Option<String>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
    default_deny: Option<bool>,
    full_cone: Option<bool>,
    /// A duration string or a number of seconds, hence a raw value.
    idle_timeout: Option<toml::Value>,
    max_associations: Option<usize>,
    max_connections: Option<usize>,
    handshake_timeout: Option<toml::Value>,
    replay_window: Option<usize>,
    suites: Option<Vec<String>>,
    tls12: Option<bool>,
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

fn parse_file(path: &Path, text: &str) -> Result<GatewayFile, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// Where to attribute a value: the file (`path`) or the flag named after `key`.
struct Origins<'a> {
    path: &'a Path,
    dir: &'a Path,
}

impl Origins<'_> {
    fn file(&self, key: impl Into<String>) -> At {
        At::File {
            path: self.path.to_owned(),
            key: key.into(),
        }
    }

    fn at(&self, key: &str, from_flag: bool) -> At {
        if from_flag {
            At::Flag(format!("--{}", key.replace('_', "-")))
        } else {
            self.file(key)
        }
    }

    fn resolve(&self, p: PathBuf) -> PathBuf {
        // `join` keeps an absolute `p` as it is.
        self.dir.join(p)
    }
}

/// A flag's value if given, else the file's; with whether it came from the flag.
fn pick<T>(flag: Option<T>, file: Option<T>) -> Option<(T, bool)> {
    flag.map(|v| (v, true)).or(file.map(|v| (v, false)))
}

fn value_err(at: At, problem: impl Into<Problem>) -> ConfigError {
    ConfigError::Value {
        at,
        problem: problem.into(),
    }
}

/// Merges flags over the file, applies defaults and validates.
fn build(args: GatewayArgs, file: GatewayFile) -> Result<GatewayConfig, ConfigError> {
    let path = args.config.clone().unwrap_or_default();
    let o = Origins {
        path: &path,
        dir: path.parent().unwrap_or(Path::new("")),
    };

    // File values, parsed to their types (errors name the file and key).
    let file_addr = |key: &str, v: Option<String>| -> Result<Option<SocketAddr>, ConfigError> {
        v.map(|s| {
            s.trim()
                .parse()
                .map_err(|_| value_err(o.file(key), Problem::SocketAddr(s)))
        })
        .transpose()
    };
    let file_rules = |key: String, action, v: Vec<String>| -> Result<Vec<Rule>, ConfigError> {
        v.iter()
            .map(|s| Rule::parse(action, s).map_err(|e| value_err(o.file(key.clone()), e)))
            .collect()
    };
    let file_duration = |key: &str, v: Option<toml::Value>| {
        v.map(|v| duration_value(v).map_err(|p| value_err(o.file(key), p)))
            .transpose()
    };

    // Every file value is parsed, even one a flag overrides: a broken file is an error.
    let listen = args
        .listen
        .or(file_addr("listen", file.listen)?)
        .unwrap_or(DEFAULT_LISTEN);
    let udp_listen = args
        .udp_listen
        .or(file_addr("udp_listen", file.udp_listen)?)
        .unwrap_or(SocketAddr::new(listen.ip(), 0));
    let file_advertise = file
        .advertise
        .map(|s| {
            s.trim()
                .parse::<IpAddr>()
                .map_err(|_| value_err(o.file("advertise"), Problem::IpAddr(s)))
        })
        .transpose()?;
    let advertise = args.advertise.or(file_advertise);

    // TLS.
    let cert = args.cert.or(file.cert.map(|p| o.resolve(p)));
    let key = args.key.or(file.key.map(|p| o.resolve(p)));
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
    let users = args.users.or(file.users.map(|p| o.resolve(p)));
    let client_ca = args.client_ca.or(file.client_ca.map(|p| o.resolve(p)));
    let no_auth = args.no_auth || file.no_auth.unwrap_or(false);
    let auth = match (no_auth, users, client_ca) {
        (true, Some(_), _) => return Err(ConfigError::AuthConflict { with: "users" }),
        (true, None, Some(_)) => return Err(ConfigError::AuthConflict { with: "client_ca" }),
        (true, None, None) => Auth::NoAuth,
        (false, Some(users), Some(client_ca)) => Auth::UsersOrClientCert { users, client_ca },
        (false, Some(users), None) => Auth::Users(users),
        (false, None, Some(ca)) => Auth::ClientCert(ca),
        (false, None, None) => return Err(ConfigError::NoAuthMethod),
    };

    // Policy: within each scope deny rules come before allow rules (so a deny carves holes in
    // a wider allow); a flag given at least once replaces the file's list.
    let file_allow = file_rules("allow".into(), Action::Allow, file.allow.unwrap_or_default())?;
    let file_deny = file_rules("deny".into(), Action::Deny, file.deny.unwrap_or_default())?;
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
        let key = |list: &str| format!("users_policy.{user}.{list}");
        let mut list = file_rules(key("deny"), Action::Deny, rules.deny)?;
        list.extend(file_rules(key("allow"), Action::Allow, rules.allow)?);
        users_policy.insert(user, list);
    }
    let default_deny = args.default_deny || file.default_deny.unwrap_or(false);
    let policy =
        Policy::new(deny.into_iter().chain(allow).collect(), users_policy).deny_by_default(default_deny);

    // Limits.
    let duration = |key: &str, flag, file, default| match pick(flag, file) {
        Some((d, _)) if d > Duration::ZERO => Ok(d),
        Some((_, from_flag)) => Err(value_err(o.at(key, from_flag), Problem::Zero)),
        None => Ok(default),
    };
    let idle_timeout = duration(
        "idle_timeout",
        args.idle_timeout,
        file_duration("idle_timeout", file.idle_timeout)?,
        DEFAULT_IDLE_TIMEOUT,
    )?;
    let handshake_timeout = duration(
        "handshake_timeout",
        args.handshake_timeout,
        file_duration("handshake_timeout", file.handshake_timeout)?,
        DEFAULT_HANDSHAKE_TIMEOUT,
    )?;
    let nonzero = |key: &str, flag, file, default| match pick(flag, file) {
        Some((n, _)) if n > 0 => Ok(n),
        Some((_, from_flag)) => Err(value_err(o.at(key, from_flag), Problem::Zero)),
        None => Ok(default),
    };
    let max_associations = nonzero(
        "max_associations",
        args.max_associations,
        file.max_associations,
        DEFAULT_MAX_ASSOCIATIONS,
    )?;
    let max_connections = nonzero(
        "max_connections",
        args.max_connections,
        file.max_connections,
        DEFAULT_MAX_CONNECTIONS,
    )?;
    let replay_window = match pick(args.replay_window, file.replay_window) {
        Some((n, _)) if (replay::MIN_WINDOW..=replay::MAX_WINDOW).contains(&n) => n,
        Some((n, from_flag)) => {
            return Err(value_err(
                o.at("replay_window", from_flag),
                Problem::OutOfRange {
                    value: n as u64,
                    min: replay::MIN_WINDOW as u64,
                    max: replay::MAX_WINDOW as u64,
                },
            ))
        }
        None => replay::DEFAULT_WINDOW,
    };

    // Suites.
    let file_suites = file
        .suites
        .map(|names| {
            names
                .iter()
                .map(|n| parse_suite(n).map_err(|p| value_err(o.file("suites"), p)))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let flag_suites = Some(args.suites).filter(|s| !s.is_empty());
    let (suites, from_flag) = pick(flag_suites, file_suites).unwrap_or((CipherSuite::ALL.to_vec(), false));
    if suites.is_empty() {
        return Err(value_err(o.at("suites", from_flag), Problem::NoSuites));
    }
    for (i, suite) in suites.iter().enumerate() {
        if suites[..i].contains(suite) {
            return Err(value_err(
                o.at("suites", from_flag),
                Problem::DuplicateSuite(*suite),
            ));
        }
    }

    Ok(GatewayConfig {
        listen,
        cert,
        key,
        auth,
        udp_listen,
        advertise,
        policy,
        full_cone: args.full_cone || file.full_cone.unwrap_or(false),
        idle_timeout,
        max_associations,
        max_connections,
        handshake_timeout,
        replay_window,
        suites,
        tls12: args.tls12 || file.tls12.unwrap_or(false),
    })
}

/// A TOML duration: a string for [`parse_duration`] or a non-negative number of seconds.
fn duration_value(v: toml::Value) -> Result<Duration, Problem> {
    match v {
        toml::Value::String(s) => Ok(parse_duration(&s)?),
        toml::Value::Integer(n) => u64::try_from(n)
            .map(Duration::from_secs)
            .map_err(|_| DurationError(n.to_string()).into()),
        other => Err(Problem::Type {
            expected: "a duration string such as \"30s\" or a number of seconds",
            found: other.type_str(),
        }),
    }
}

fn parse_suite(name: &str) -> Result<CipherSuite, Problem> {
    CipherSuite::from_name(name.trim()).ok_or_else(|| Problem::UnknownSuite {
        name: name.to_owned(),
    })
}

fn known_suites() -> String {
    CipherSuite::ALL.map(CipherSuite::name).join(", ")
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

// --- The client shim ------------------------------------------------------------------------

/// The shim's local SOCKS5 listener when neither the file nor a flag gives one.
pub const DEFAULT_SOCKS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 1080));
/// Default idle time after which a UDP forward forgets a local source (and closes its flow).
pub const DEFAULT_FLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default limit on concurrent flows (local sources) of one UDP forward.
pub const DEFAULT_MAX_FLOWS: usize = 256;
/// Default limit on concurrent local TCP connections (SOCKS5 clients and TCP forwards).
pub const DEFAULT_SHIM_MAX_CONNECTIONS: usize = 1024;
/// Default limit on reaching and negotiating with one gateway.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Run the client shim: a local SOCKS5 server and port forwards whose traffic goes through
/// a gateway, UDP as secure records.
///
/// Every flag is optional, so that a `--config` file can supply it; a flag given on the
/// command line overrides the file's key of the same name.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ShimArgs {
    /// TOML config file (keys as in docs/CONFIG.md); flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Gateway control address, HOST:PORT (repeatable: tried in order, failing over to the
    /// next one when one is down).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub gateway: Vec<Address>,

    /// CA certificate, PEM, that the gateway's certificate must chain to (or use --pin).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// SHA-256 of the gateway's certificate, 64 hex digits or colon-separated pairs
    /// (instead of --ca; `sudp cert` prints it).
    #[arg(long, value_name = "SHA256", value_parser = parse_pin)]
    pub pin: Option<[u8; 32]>,

    /// Name the gateway's certificate must carry (TLS SNI) [default: each gateway's host].
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,

    /// User name for the gateway (with --password-file).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// File whose first line is the password for --user.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// Client certificate chain, PEM, for mutual TLS (with --key).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// Private key, PEM, of the client certificate (with --cert).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// Local SOCKS5 listener (plain TCP) [default: 127.0.0.1:1080].
    #[arg(long, value_name = "ADDR")]
    pub socks: Option<SocketAddr>,

    /// Run no local SOCKS5 listener (forwards only).
    #[arg(long)]
    pub no_socks: bool,

    /// User name local applications must give the SOCKS5 listener (with
    /// --socks-password-file) [default: no local authentication].
    #[arg(long, value_name = "USER")]
    pub socks_user: Option<String>,

    /// File whose first line is the password for --socks-user.
    #[arg(long, value_name = "FILE")]
    pub socks_password_file: Option<PathBuf>,

    /// Port forward udp:LOCAL_ADDR=TARGET_HOST:PORT or tcp:LOCAL_ADDR=TARGET_HOST:PORT
    /// (repeatable), e.g. udp:127.0.0.1:5000=media.example:5000.
    #[arg(long, value_name = "PROTO:LOCAL=TARGET", value_parser = parse_forward)]
    pub forward: Vec<Forward>,

    /// Secure-UDP cipher suites to offer, most preferred first, comma-separated
    /// [default: aes128-cbc-hmac-sha256,aes256-cbc-hmac-sha256].
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_suite)]
    pub suites: Vec<CipherSuite>,

    /// Replay window of records from the gateway, in records, 64..=65536 [default: 1024].
    #[arg(long, value_name = "N")]
    pub replay_window: Option<usize>,

    /// A UDP forward forgets a local source after this long without traffic, e.g. 30s
    /// [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,

    /// Most concurrent local sources (flows) per UDP forward; the least recently active is
    /// closed to make room [default: 256].
    #[arg(long, value_name = "N")]
    pub max_flows: Option<usize>,

    /// Most concurrent local TCP connections (SOCKS5 clients and TCP forwards)
    /// [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Time allowed to reach one gateway and finish the TLS and SOCKS5 handshakes
    /// [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,

    /// Also offer TLS 1.2 to the gateway [default: TLS 1.3 only].
    #[arg(long)]
    pub tls12: bool,
}

/// A port forward: a local socket whose traffic goes to one target through the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Forward {
    /// UDP or TCP.
    pub proto: ForwardProto,
    /// The local address to bind (port 0: any free port).
    pub local: SocketAddr,
    /// The target, as the gateway reaches it (a name is resolved by the gateway).
    pub target: Address,
}

/// The protocol of a [`Forward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardProto {
    /// Datagrams, as secure-UDP records.
    Udp,
    /// A stream, as a SOCKS5 CONNECT per accepted connection.
    Tcp,
}

impl fmt::Display for ForwardProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ForwardProto::Udp => "udp",
            ForwardProto::Tcp => "tcp",
        })
    }
}

impl fmt::Display for Forward {
    /// The `--forward` syntax, so that it parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = match &self.target {
            Address::Domain(host, port) => format!("{host}:{port}"),
            Address::Ip(a) => a.to_string(),
        };
        write!(f, "{}:{}={target}", self.proto, self.local)
    }
}

/// How the shim decides to trust the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Certificates chaining to the CA(s) in this PEM file.
    Ca(PathBuf),
    /// Exactly the certificate with this SHA-256.
    Pin([u8; 32]),
}

/// A user name and the file holding its password. The password itself is read when the
/// shim starts, never stored in a config value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordLogin {
    /// User name, 1..=255 bytes.
    pub user: String,
    /// File whose first line is the password.
    pub password_file: PathBuf,
}

/// The shim's configuration: typed and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimConfig {
    /// Gateways in fail-over order: non-empty, ports nonzero.
    pub gateways: Vec<Address>,
    /// How the gateway's certificate is checked.
    pub trust: Trust,
    /// TLS server name; `None`: each gateway's host.
    pub server_name: Option<String>,
    /// Username/password for the gateway, if any.
    pub login: Option<PasswordLogin>,
    /// Client certificate chain and key (mTLS), if any.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Local SOCKS5 listener; `None`: none.
    pub socks: Option<SocketAddr>,
    /// Credentials local SOCKS5 clients must give; `None`: no local authentication.
    pub socks_login: Option<PasswordLogin>,
    /// Port forwards; no two with the same protocol and (nonzero-port) local address.
    pub forwards: Vec<Forward>,
    /// Cipher suites to offer, most preferred first: non-empty, no duplicates.
    pub suites: Vec<CipherSuite>,
    /// Replay window size in records, within
    /// [`replay::MIN_WINDOW`]..=[`replay::MAX_WINDOW`].
    pub replay_window: usize,
    /// Idle time after which a UDP forward closes a local source's flow (nonzero).
    pub idle_timeout: Duration,
    /// Most flows per UDP forward (nonzero).
    pub max_flows: usize,
    /// Most local TCP connections (nonzero).
    pub max_connections: usize,
    /// Limit on reaching and negotiating with one gateway (nonzero).
    pub connect_timeout: Duration,
    /// Offer TLS 1.2 as well as TLS 1.3.
    pub tls12: bool,
}

/// Parses `HOST:PORT`: an IP socket address (`192.0.2.1:443`, `[2001:db8::1]:443`) or a
/// host name and port (`gw.example:443`). The port must be nonzero; a name must be a valid
/// SOCKS5 domain (1..=255 printable ASCII bytes).
pub fn parse_host_port(text: &str) -> Result<Address, Problem> {
    let bad = || Problem::HostPort(text.to_owned());
    let t = text.trim();
    if let Ok(a) = t.parse::<SocketAddr>() {
        return if a.port() == 0 {
            Err(bad())
        } else {
            Ok(Address::Ip(a))
        };
    }
    let (host, port) = t.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let name_ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|c| c.is_ascii_graphic() && c != b':' && c != b'[' && c != b']');
    if port == 0 || !name_ok {
        return Err(bad());
    }
    Ok(Address::Domain(host.to_owned(), port))
}

/// Parses `udp:LOCAL_ADDR=TARGET_HOST:PORT` or `tcp:...` (see [`Forward`]).
pub fn parse_forward(text: &str) -> Result<Forward, Problem> {
    let bad = |why: &'static str| Problem::Forward {
        text: text.to_owned(),
        why,
    };
    let t = text.trim();
    let (proto, rest) = t
        .split_once(':')
        .ok_or_else(|| bad("expected udp:LOCAL_ADDR=TARGET_HOST:PORT or tcp:..."))?;
    let proto = match proto.to_ascii_lowercase().as_str() {
        "udp" => ForwardProto::Udp,
        "tcp" => ForwardProto::Tcp,
        _ => return Err(bad("the protocol must be udp or tcp")),
    };
    let (local, target) = rest
        .split_once('=')
        .ok_or_else(|| bad("expected LOCAL_ADDR=TARGET_HOST:PORT after the protocol"))?;
    let local: SocketAddr = local
        .trim()
        .parse()
        .map_err(|_| bad("LOCAL_ADDR must be IP:PORT, e.g. 127.0.0.1:5000 or [::1]:5000"))?;
    let target = parse_host_port(target)
        .map_err(|_| bad("TARGET must be HOST:PORT with a nonzero port, e.g. media.example:5000"))?;
    Ok(Forward { proto, local, target })
}

fn pin_problem(text: &str) -> Problem {
    Problem::Pin(text.to_owned())
}

/// The shim's config file, key for key. Paths stay as written until [`build_shim`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShimFile {
    gateway: Option<Vec<String>>,
    ca: Option<PathBuf>,
    pin: Option<String>,
    server_name: Option<String>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    socks: Option<String>,
    no_socks: Option<bool>,
    socks_user: Option<String>,
    socks_password_file: Option<PathBuf>,
    forward: Option<Vec<String>>,
    suites: Option<Vec<String>>,
    replay_window: Option<usize>,
    idle_timeout: Option<toml::Value>,
    max_flows: Option<usize>,
    max_connections: Option<usize>,
    connect_timeout: Option<toml::Value>,
    tls12: Option<bool>,
}

impl ShimConfig {
    /// Builds the configuration from flags and, if `--config` names one, a TOML file: reads
    /// the file, lets flags override it, applies defaults and validates.
    pub fn from_args(args: ShimArgs) -> Result<ShimConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.clone(),
                    error,
                })?;
                parse_shim_file(path, &text)?
            }
            None => ShimFile::default(),
        };
        build_shim(args, file)
    }
}

fn parse_shim_file(path: &Path, text: &str) -> Result<ShimFile, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// A file's list, each item parsed; errors name the file and key.
fn file_list<T>(
    o: &Origins<'_>,
    key: &str,
    v: Option<Vec<String>>,
    parse: fn(&str) -> Result<T, Problem>,
) -> Result<Option<Vec<T>>, ConfigError> {
    v.map(|items| {
        items
            .iter()
            .map(|s| parse(s).map_err(|p| value_err(o.file(key), p)))
            .collect::<Result<Vec<_>, _>>()
    })
    .transpose()
}

/// A list given as a repeatable flag replaces the file's; which one won, and from where.
fn pick_list<T>(flag: Vec<T>, file: Option<Vec<T>>) -> Option<(Vec<T>, bool)> {
    if flag.is_empty() {
        file.map(|v| (v, false))
    } else {
        Some((flag, true))
    }
}

/// Merges the shim's flags over its file, applies defaults and validates.
fn build_shim(args: ShimArgs, file: ShimFile) -> Result<ShimConfig, ConfigError> {
    let path = args.config.clone().unwrap_or_default();
    let o = Origins {
        path: &path,
        dir: path.parent().unwrap_or(Path::new("")),
    };
    let file_duration = |key: &str, v: Option<toml::Value>| {
        v.map(|v| duration_value(v).map_err(|p| value_err(o.file(key), p)))
            .transpose()
    };

    // Gateways.
    let file_gateways = file_list(&o, "gateway", file.gateway, parse_host_port)?;
    let gateways = match pick_list(args.gateway, file_gateways) {
        Some((g, _)) if !g.is_empty() => g,
        Some((_, from_flag)) => {
            return Err(value_err(o.at("gateway", from_flag), Problem::NoGateway));
        }
        None => return Err(ConfigError::MissingGateway),
    };

    // Trust.
    let file_pin = file
        .pin
        .map(|s| parse_pin(&s).map_err(|_| value_err(o.file("pin"), pin_problem(&s))))
        .transpose()?;
    let ca = args.ca.or(file.ca.map(|p| o.resolve(p)));
    let pin = args.pin.or(file_pin);
    let trust = match (ca, pin) {
        (Some(ca), None) => Trust::Ca(ca),
        (None, Some(pin)) => Trust::Pin(pin),
        (Some(_), Some(_)) => {
            return Err(ConfigError::Conflict {
                a: "ca",
                b: "pin",
                why: "trust the gateway by a CA or by a pinned certificate, not both",
            })
        }
        (None, None) => return Err(ConfigError::MissingTrust),
    };
    let server_name = match pick(args.server_name, file.server_name) {
        Some((name, from_flag)) => {
            if rustls::pki_types::ServerName::try_from(name.trim()).is_err() {
                return Err(value_err(
                    o.at("server_name", from_flag),
                    Problem::ServerName(name),
                ));
            }
            Some(name.trim().to_owned())
        }
        None => None,
    };

    // Gateway authentication.
    let login = password_login(
        &o,
        ("user", pick(args.user, file.user)),
        (
            "password_file",
            args.password_file.or(file.password_file.map(|p| o.resolve(p))),
        ),
    )?;
    let cert = args.cert.or(file.cert.map(|p| o.resolve(p)));
    let key = args.key.or(file.key.map(|p| o.resolve(p)));
    let client_cert = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (Some(_), None) => {
            return Err(ConfigError::Requires {
                key: "cert",
                needs: "key",
            })
        }
        (None, Some(_)) => {
            return Err(ConfigError::Requires {
                key: "key",
                needs: "cert",
            })
        }
        (None, None) => None,
    };

    // Local SOCKS5 listener.
    let file_socks = file
        .socks
        .map(|s| {
            s.trim()
                .parse::<SocketAddr>()
                .map_err(|_| value_err(o.file("socks"), Problem::SocketAddr(s)))
        })
        .transpose()?;
    let socks = match (
        args.no_socks,
        args.socks,
        file.no_socks.unwrap_or(false),
        file_socks,
    ) {
        (true, Some(_), _, _) | (false, None, true, Some(_)) => {
            return Err(ConfigError::Conflict {
                a: "socks",
                b: "no_socks",
                why: "give a listener address or turn the listener off, not both",
            })
        }
        (true, None, _, _) => None,
        (false, Some(a), _, _) => Some(a),
        (false, None, true, None) => None,
        (false, None, false, a) => Some(a.unwrap_or(DEFAULT_SOCKS)),
    };
    let socks_login = password_login(
        &o,
        ("socks_user", pick(args.socks_user, file.socks_user)),
        (
            "socks_password_file",
            args.socks_password_file
                .or(file.socks_password_file.map(|p| o.resolve(p))),
        ),
    )?;
    if socks.is_none() && socks_login.is_some() {
        return Err(ConfigError::Conflict {
            a: "socks_user",
            b: "no_socks",
            why: "local authentication is for the SOCKS5 listener, which is off",
        });
    }

    // Forwards.
    let file_forwards = file_list(&o, "forward", file.forward, parse_forward)?;
    let (forwards, from_flag) = pick_list(args.forward, file_forwards).unwrap_or_default();
    for (i, f) in forwards.iter().enumerate() {
        let clash = f.local.port() != 0
            && forwards[..i]
                .iter()
                .any(|g| g.proto == f.proto && g.local == f.local);
        if clash {
            return Err(value_err(
                o.at("forward", from_flag),
                Problem::DuplicateForward(f.to_string()),
            ));
        }
    }
    if socks.is_none() && forwards.is_empty() {
        return Err(ConfigError::NothingToServe);
    }

    // Suites and limits.
    let file_suites = file_list(&o, "suites", file.suites, parse_suite)?;
    let (suites, from_flag) =
        pick_list(args.suites, file_suites).unwrap_or((CipherSuite::ALL.to_vec(), false));
    if suites.is_empty() {
        return Err(value_err(o.at("suites", from_flag), Problem::NoSuites));
    }
    for (i, suite) in suites.iter().enumerate() {
        if suites[..i].contains(suite) {
            return Err(value_err(
                o.at("suites", from_flag),
                Problem::DuplicateSuite(*suite),
            ));
        }
    }
    let replay_window = match pick(args.replay_window, file.replay_window) {
        Some((n, _)) if (replay::MIN_WINDOW..=replay::MAX_WINDOW).contains(&n) => n,
        Some((n, from_flag)) => {
            return Err(value_err(
                o.at("replay_window", from_flag),
                Problem::OutOfRange {
                    value: n as u64,
                    min: replay::MIN_WINDOW as u64,
                    max: replay::MAX_WINDOW as u64,
                },
            ))
        }
        None => replay::DEFAULT_WINDOW,
    };
    let nonzero_duration = |key: &str, flag, file, default| match pick(flag, file) {
        Some((d, _)) if d > Duration::ZERO => Ok(d),
        Some((_, from_flag)) => Err(value_err(o.at(key, from_flag), Problem::Zero)),
        None => Ok(default),
    };
    let idle_timeout = nonzero_duration(
        "idle_timeout",
        args.idle_timeout,
        file_duration("idle_timeout", file.idle_timeout)?,
        DEFAULT_FLOW_IDLE_TIMEOUT,
    )?;
    let connect_timeout = nonzero_duration(
        "connect_timeout",
        args.connect_timeout,
        file_duration("connect_timeout", file.connect_timeout)?,
        DEFAULT_CONNECT_TIMEOUT,
    )?;
    let nonzero = |key: &str, flag, file, default| match pick(flag, file) {
        Some((n, _)) if n > 0 => Ok(n),
        Some((_, from_flag)) => Err(value_err(o.at(key, from_flag), Problem::Zero)),
        None => Ok(default),
    };
    let max_flows = nonzero("max_flows", args.max_flows, file.max_flows, DEFAULT_MAX_FLOWS)?;
    let max_connections = nonzero(
        "max_connections",
        args.max_connections,
        file.max_connections,
        DEFAULT_SHIM_MAX_CONNECTIONS,
    )?;

    Ok(ShimConfig {
        gateways,
        trust,
        server_name,
        login,
        client_cert,
        socks,
        socks_login,
        forwards,
        suites,
        replay_window,
        idle_timeout,
        max_flows,
        max_connections,
        connect_timeout,
        tls12: args.tls12 || file.tls12.unwrap_or(false),
    })
}

/// A user name (flag or file, with its origin) and a password file: both or neither.
fn password_login(
    o: &Origins<'_>,
    (user_key, user): (&'static str, Option<(String, bool)>),
    (file_key, password_file): (&'static str, Option<PathBuf>),
) -> Result<Option<PasswordLogin>, ConfigError> {
    match (user, password_file) {
        (Some((user, from_flag)), Some(password_file)) => {
            if user.is_empty() || user.len() > 255 {
                return Err(value_err(o.at(user_key, from_flag), Problem::UserName));
            }
            Ok(Some(PasswordLogin { user, password_file }))
        }
        (Some(_), None) => Err(ConfigError::Requires {
            key: user_key,
            needs: file_key,
        }),
        (None, Some(_)) => Err(ConfigError::Requires {
            key: file_key,
            needs: user_key,
        }),
        (None, None) => Ok(None),
    }
}

fn parse_pin(text: &str) -> Result<[u8; 32], Problem> {
    crate::tls::parse_pin(text).map_err(|_| pin_problem(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GatewayArgs,
    }

    fn flags(argv: &[&str]) -> GatewayArgs {
        Cli::try_parse_from(std::iter::once("gateway").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    /// Builds from `text` as if read from `gateway.toml`, plus `argv` flags.
    fn from_toml(text: &str, argv: &[&str]) -> Result<GatewayConfig, ConfigError> {
        let path = Path::new("gateway.toml");
        let mut args = flags(argv);
        args.config = Some(path.to_owned());
        build(args, parse_file(path, text)?)
    }

    fn error(text: &str, argv: &[&str]) -> String {
        from_toml(text, argv).unwrap_err().to_string()
    }

    const MINIMAL: &str = "cert = \"c.pem\"\nkey = \"k.pem\"\nno_auth = true\n";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
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
        assert!(!c.full_cone && !c.tls12);
        assert_eq!(c.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.max_associations, 4096);
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.replay_window, 1024);
        assert_eq!(c.suites, CipherSuite::ALL.to_vec());
        assert_eq!(c.suites[0], CipherSuite::Aes128CbcHmacSha256);
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
            idle_timeout = 30
            max_associations = 7
            max_connections = 8
            handshake_timeout = "2s"
            replay_window = 65536
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
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.handshake_timeout, Duration::from_secs(2));
        assert_eq!((c.max_associations, c.max_connections), (7, 8));
        assert_eq!(c.replay_window, 65536);
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
        assert_eq!(c.suites, CipherSuite::ALL.to_vec());
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
                 aes128-cbc-hmac-sha256, aes256-cbc-hmac-sha256)",
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
    fn durations() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("5m"), Duration::from_secs(300));
        assert_eq!(ok("1500ms"), Duration::from_millis(1500));
        assert_eq!(ok("2h"), Duration::from_secs(7200));
        assert_eq!(ok("120"), Duration::from_secs(120));
        assert_eq!(ok(" 10 s "), Duration::from_secs(10));
        assert_eq!(ok("0"), Duration::ZERO);
        for bad in [
            "",
            "s",
            "5 parsecs",
            "1.5s",
            "-1s",
            "+5s",
            "5d",
            "5S",
            "5 m s",
            "99999999999999999999",
            "18446744073709551615h",
        ] {
            assert_eq!(parse_duration(bad), Err(DurationError(bad.into())), "{bad:?}");
        }
        assert!(DurationError("x".into())
            .to_string()
            .starts_with("invalid duration \"x\""));
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
        use clap::CommandFactory;
        // The gateway's part; the shim's section is checked in `shim_tests`.
        let doc = include_str!("../docs/CONFIG.md")
            .split(SHIM_SECTION)
            .next()
            .unwrap();
        for arg in Cli::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            assert!(
                doc.contains(&format!("`--{long}")),
                "--{long} is not in CONFIG.md"
            );
            if long != "config" {
                let key = long.replace('-', "_");
                assert!(doc.contains(&format!("`{key}`")), "`{key}` is not in CONFIG.md");
            }
        }
        let mut snippets = 0;
        for block in doc.split("```toml\n").skip(1) {
            let toml = block.split("```").next().unwrap();
            from_toml(&format!("{MINIMAL}{toml}"), &[]).unwrap();
            snippets += 1;
        }
        assert!(snippets > 0);
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
    }
}

/// The heading of the shim's part of `docs/CONFIG.md`.
#[cfg(test)]
const SHIM_SECTION: &str = "\n## Shim settings\n";

#[cfg(test)]
mod shim_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ShimArgs,
    }

    fn flags(argv: &[&str]) -> ShimArgs {
        Cli::try_parse_from(std::iter::once("shim").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    /// Builds from `text` as if read from `shim.toml`, plus `argv` flags.
    fn from_toml(text: &str, argv: &[&str]) -> Result<ShimConfig, ConfigError> {
        let path = Path::new("shim.toml");
        let mut args = flags(argv);
        args.config = Some(path.to_owned());
        build_shim(args, parse_shim_file(path, text)?)
    }

    fn error(text: &str, argv: &[&str]) -> String {
        from_toml(text, argv).unwrap_err().to_string()
    }

    const MINIMAL: &str = "gateway = [\"gw.example:1080\"]\nca = \"ca.pem\"\n";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_only_with_defaults() {
        let c = ShimConfig::from_args(flags(&["--gateway", "127.0.0.1:1443", "--ca", "ca.pem"])).unwrap();
        assert_eq!(c.gateways, vec![Address::Ip(sa("127.0.0.1:1443"))]);
        assert_eq!(c.trust, Trust::Ca("ca.pem".into()));
        assert_eq!(c.server_name, None);
        assert_eq!((c.login.clone(), c.client_cert.clone()), (None, None));
        assert_eq!(c.socks, Some(DEFAULT_SOCKS));
        assert_eq!(c.socks_login, None);
        assert!(c.forwards.is_empty());
        assert_eq!(c.suites, CipherSuite::ALL.to_vec());
        assert_eq!(c.replay_window, replay::DEFAULT_WINDOW);
        assert_eq!(c.idle_timeout, DEFAULT_FLOW_IDLE_TIMEOUT);
        assert_eq!(c.max_flows, DEFAULT_MAX_FLOWS);
        assert_eq!(c.max_connections, DEFAULT_SHIM_MAX_CONNECTIONS);
        assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert!(!c.tls12);
    }

    #[test]
    fn flags_only_every_flag() {
        let pin = "ab".repeat(32);
        let c = ShimConfig::from_args(flags(&[
            "--gateway=gw1.example:443",
            "--gateway=[::1]:8443",
            &format!("--pin={pin}"),
            "--server-name=gw.example",
            "--user=alice",
            "--password-file=pw.txt",
            "--cert=client.pem",
            "--key=client.key",
            "--socks=[::1]:1081",
            "--socks-user=app",
            "--socks-password-file=local-pw.txt",
            "--forward=udp:127.0.0.1:5000=media.example:5000",
            "--forward=tcp:127.0.0.1:5000=[2001:db8::1]:5201",
            "--suites=aes256-cbc-hmac-sha256",
            "--replay-window=2048",
            "--idle-timeout=5m",
            "--max-flows=8",
            "--max-connections=9",
            "--connect-timeout=1500ms",
            "--tls12",
        ]))
        .unwrap();
        assert_eq!(
            c.gateways,
            vec![
                Address::Domain("gw1.example".into(), 443),
                Address::Ip(sa("[::1]:8443"))
            ]
        );
        assert_eq!(c.trust, Trust::Pin([0xab; 32]));
        assert_eq!(c.server_name.as_deref(), Some("gw.example"));
        assert_eq!(
            c.login,
            Some(PasswordLogin {
                user: "alice".into(),
                password_file: "pw.txt".into()
            })
        );
        assert_eq!(c.client_cert, Some(("client.pem".into(), "client.key".into())));
        assert_eq!(c.socks, Some(sa("[::1]:1081")));
        assert_eq!(c.socks_login.as_ref().map(|l| l.user.as_str()), Some("app"));
        assert_eq!(
            c.forwards,
            vec![
                Forward {
                    proto: ForwardProto::Udp,
                    local: sa("127.0.0.1:5000"),
                    target: Address::Domain("media.example".into(), 5000)
                },
                Forward {
                    proto: ForwardProto::Tcp,
                    local: sa("127.0.0.1:5000"),
                    target: Address::Ip(sa("[2001:db8::1]:5201"))
                },
            ]
        );
        assert_eq!(c.suites, vec![CipherSuite::Aes256CbcHmacSha256]);
        assert_eq!(c.replay_window, 2048);
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
        assert_eq!((c.max_flows, c.max_connections), (8, 9));
        assert_eq!(c.connect_timeout, Duration::from_millis(1500));
        assert!(c.tls12);
    }

    #[test]
    fn file_only_and_flags_override() {
        let text = r#"
            gateway = ["gw1.example:443", "192.0.2.1:443"]
            ca = "tls/ca.pem"
            server_name = "gw.example"
            user = "alice"
            password_file = "pw.txt"
            cert = "client.pem"
            key = "/abs/client.key"
            socks = "127.0.0.1:1081"
            socks_user = "app"
            socks_password_file = "local-pw.txt"
            forward = ["udp:127.0.0.1:5000=media.example:5000"]
            suites = ["aes256-cbc-hmac-sha256"]
            replay_window = 64
            idle_timeout = 30
            max_flows = 3
            max_connections = 4
            connect_timeout = "2s"
            tls12 = true
        "#;
        let c = from_toml(text, &[]).unwrap();
        assert_eq!(c.gateways.len(), 2);
        assert_eq!(c.trust, Trust::Ca("tls/ca.pem".into()));
        assert_eq!(
            c.client_cert,
            Some(("client.pem".into(), "/abs/client.key".into()))
        );
        assert_eq!(c.socks, Some(sa("127.0.0.1:1081")));
        assert_eq!(c.forwards.len(), 1);
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!((c.max_flows, c.max_connections, c.replay_window), (3, 4, 64));
        assert!(c.tls12);

        // A repeatable flag replaces the file's list; a scalar flag its key.
        let c = from_toml(
            text,
            &[
                "--gateway=127.0.0.1:9",
                "--forward=tcp:127.0.0.1:0=127.0.0.1:80",
                "--no-socks",
                "--socks-user=x",
                "--max-flows=10",
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(c.contains("`socks_user` (--socks-user) and `no_socks`"), "{c}");
        let c = from_toml(
            text.replace("socks_user = \"app\"", "")
                .replace("socks_password_file = \"local-pw.txt\"", "")
                .as_str(),
            &[
                "--gateway=127.0.0.1:9",
                "--forward=tcp:127.0.0.1:0=127.0.0.1:80",
                "--no-socks",
                "--max-flows=10",
            ],
        )
        .unwrap();
        assert_eq!(c.gateways, vec![Address::Ip(sa("127.0.0.1:9"))]);
        assert_eq!(c.forwards[0].proto, ForwardProto::Tcp);
        assert_eq!(c.socks, None);
        assert_eq!(c.max_flows, 10);
    }

    #[test]
    fn relative_file_paths_resolve_against_the_file() {
        let mut args = flags(&["--password-file=flag-pw.txt", "--user=u"]);
        args.config = Some("/etc/sudp/shim.toml".into());
        let file = parse_shim_file(
            Path::new("x"),
            "gateway = [\"gw:1\"]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"/k.pem\"",
        )
        .unwrap();
        let c = build_shim(args, file).unwrap();
        assert_eq!(c.trust, Trust::Ca("/etc/sudp/ca.pem".into()));
        assert_eq!(c.client_cert, Some(("/etc/sudp/c.pem".into(), "/k.pem".into())));
        assert_eq!(c.login.unwrap().password_file, PathBuf::from("flag-pw.txt"));
    }

    #[test]
    fn each_value_error_names_file_and_key() {
        let cases: &[(&str, &str)] = &[
            ("gateway = [\"gw\"]", "shim.toml: key `gateway`: invalid HOST:PORT \"gw\""),
            ("gateway = [\"gw:0\"]", "shim.toml: key `gateway`: invalid HOST:PORT \"gw:0\""),
            ("gateway = [\"::1:80\"]", "shim.toml: key `gateway`: invalid HOST:PORT"),
            ("gateway = []", "shim.toml: key `gateway`: at least one gateway"),
            ("pin = \"abc\"", "shim.toml: key `pin`: invalid pin \"abc\""),
            ("server_name = \"not a name\"", "shim.toml: key `server_name`: invalid TLS server name"),
            ("socks = \"localhost:1080\"", "shim.toml: key `socks`: invalid socket address"),
            ("forward = [\"sctp:127.0.0.1:1=h:1\"]", "shim.toml: key `forward`: invalid forward \"sctp:127.0.0.1:1=h:1\": the protocol must be udp or tcp"),
            ("forward = [\"udp:127.0.0.1:1\"]", "shim.toml: key `forward`: invalid forward \"udp:127.0.0.1:1\": expected LOCAL_ADDR="),
            ("forward = [\"udp:localhost:1=h:1\"]", "shim.toml: key `forward`: invalid forward \"udp:localhost:1=h:1\": LOCAL_ADDR must be IP:PORT"),
            ("forward = [\"udp:127.0.0.1:1=h\"]", "shim.toml: key `forward`: invalid forward \"udp:127.0.0.1:1=h\": TARGET must be HOST:PORT"),
            (
                "forward = [\"udp:127.0.0.1:1=h:1\", \"udp:127.0.0.1:1=g:2\"]",
                "shim.toml: key `forward`: forward \"udp:127.0.0.1:1=g:2\": another forward",
            ),
            ("suites = [\"rot13\"]", "shim.toml: key `suites`: unknown cipher suite \"rot13\""),
            ("suites = []", "shim.toml: key `suites`: at least one cipher suite"),
            ("replay_window = 1", "shim.toml: key `replay_window`: 1 is outside 64..=65536"),
            ("idle_timeout = \"0s\"", "shim.toml: key `idle_timeout`: must be greater than zero"),
            ("connect_timeout = \"soon\"", "shim.toml: key `connect_timeout`: invalid duration \"soon\""),
            ("max_flows = 0", "shim.toml: key `max_flows`: must be greater than zero"),
            ("max_connections = 0", "shim.toml: key `max_connections`: must be greater than zero"),
            ("user = \"\"\npassword_file = \"p\"", "shim.toml: key `user`: a user name must be 1 to 255 bytes"),
        ];
        for (extra, want) in cases {
            let base = if extra.starts_with("gateway") {
                "ca = \"ca.pem\"\n"
            } else {
                MINIMAL
            };
            let text = format!("{base}{extra}\n");
            let got = error(&text, &[]);
            assert!(got.starts_with(want), "{extra}:\n got: {got}\nwant: {want}");
        }
    }

    #[test]
    fn flag_value_errors_name_the_flag() {
        let got = error(MINIMAL, &["--replay-window=10"]);
        assert_eq!(got, "flag `--replay-window`: 10 is outside 64..=65536");
        let got = error(MINIMAL, &["--max-flows=0"]);
        assert_eq!(got, "flag `--max-flows`: must be greater than zero");
        let got = error(MINIMAL, &["--server-name=a b"]);
        assert!(
            got.starts_with("flag `--server-name`: invalid TLS server name"),
            "{got}"
        );
        let got = error(
            MINIMAL,
            &["--forward=udp:127.0.0.1:7=h:1", "--forward=udp:127.0.0.1:7=h:2"],
        );
        assert!(got.starts_with("flag `--forward`: forward"), "{got}");
        // Same local address, different protocols: allowed (iperf3 needs both).
        from_toml(
            MINIMAL,
            &["--forward=udp:127.0.0.1:7=h:1", "--forward=tcp:127.0.0.1:7=h:1"],
        )
        .unwrap();
        // Port 0 (any free port) may repeat.
        from_toml(
            MINIMAL,
            &["--forward=udp:127.0.0.1:0=h:1", "--forward=udp:127.0.0.1:0=h:2"],
        )
        .unwrap();
    }

    #[test]
    fn clap_rejects_malformed_flags() {
        for argv in [
            ["--gateway", "nope"],
            ["--pin", "xyz"],
            ["--forward", "udp:1.2.3.4:5"],
            ["--socks", "localhost:1"],
            ["--suites", "rot13"],
            ["--idle-timeout", "forever"],
        ] {
            let err = Cli::try_parse_from(std::iter::once("shim").chain(argv))
                .err()
                .expect("must fail");
            assert!(err.to_string().contains(argv[0]), "{err}");
        }
    }

    #[test]
    fn required_and_conflicting_settings() {
        let got = error("ca = \"c\"", &[]);
        assert!(got.starts_with("missing `gateway`"), "{got}");
        let got = error("gateway = [\"g:1\"]", &[]);
        assert!(got.starts_with("missing `ca` or `pin`"), "{got}");
        let got = error(MINIMAL, &[&format!("--pin={}", "00".repeat(32))]);
        assert!(
            got.starts_with("`ca` (--ca) and `pin` (--pin) cannot be combined"),
            "{got}"
        );
        let got = error(MINIMAL, &["--user=alice"]);
        assert_eq!(got, "`user` (--user) needs `password_file` (--password-file)");
        let got = error(MINIMAL, &["--password-file=p"]);
        assert_eq!(got, "`password_file` (--password-file) needs `user` (--user)");
        let got = error(MINIMAL, &["--cert=c"]);
        assert_eq!(got, "`cert` (--cert) needs `key` (--key)");
        let got = error(MINIMAL, &["--socks-user=u"]);
        assert_eq!(
            got,
            "`socks_user` (--socks-user) needs `socks_password_file` (--socks-password-file)"
        );
        let got = error(MINIMAL, &["--no-socks"]);
        assert!(got.starts_with("nothing to serve"), "{got}");
        let got = error(MINIMAL, &["--no-socks", "--socks=127.0.0.1:1"]);
        assert!(
            got.starts_with("`socks` (--socks) and `no_socks` (--no-socks)"),
            "{got}"
        );
        let got = error(&format!("{MINIMAL}socks = \"127.0.0.1:1\"\nno_socks = true"), &[]);
        assert!(got.starts_with("`socks` (--socks) and `no_socks`"), "{got}");
        // A flag overrides the file's choice either way.
        let c = from_toml(&format!("{MINIMAL}no_socks = true"), &["--socks=127.0.0.1:2"]).unwrap();
        assert_eq!(c.socks, Some(sa("127.0.0.1:2")));
        let c = from_toml(
            &format!("{MINIMAL}socks = \"127.0.0.1:1\""),
            &["--no-socks", "--forward=udp:127.0.0.1:0=h:1"],
        )
        .unwrap();
        assert_eq!(c.socks, None);
        // Unknown keys are refused by name.
        let got = error(&format!("{MINIMAL}gateways = []"), &[]);
        assert!(
            got.starts_with("shim.toml: ") && got.contains("gateways"),
            "{got}"
        );
    }

    #[test]
    fn forwards_display_in_their_own_syntax() {
        for text in [
            "udp:127.0.0.1:5000=media.example:5000",
            "tcp:[::1]:80=[2001:db8::1]:8080",
            "udp:0.0.0.0:0=192.0.2.1:53",
        ] {
            let f = parse_forward(text).unwrap();
            assert_eq!(f.to_string(), text);
            assert_eq!(parse_forward(&f.to_string()).unwrap(), f);
        }
        assert_eq!(
            parse_host_port("localhost:7").unwrap(),
            Address::Domain("localhost".into(), 7)
        );
    }

    #[test]
    fn config_md_documents_every_flag_and_its_snippets_parse() {
        use clap::CommandFactory;
        let doc = include_str!("../docs/CONFIG.md");
        let (_, doc) = doc
            .split_once(SHIM_SECTION)
            .expect("CONFIG.md has a shim section");
        for arg in Cli::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            assert!(
                doc.contains(&format!("`--{long}")),
                "--{long} is not in CONFIG.md"
            );
            if long != "config" {
                let key = long.replace('-', "_");
                assert!(doc.contains(&format!("`{key}`")), "`{key}` is not in CONFIG.md");
            }
        }
        let mut snippets = 0;
        for block in doc.split("```toml\n").skip(1) {
            let toml = block.split("```").next().unwrap();
            from_toml(&format!("{MINIMAL}{toml}"), &[]).unwrap();
            snippets += 1;
        }
        assert!(snippets > 0);
    }

    #[test]
    fn example_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/shim.toml");
        let args = ShimArgs {
            config: Some(path.clone()),
            ..ShimArgs::default()
        };
        let c = ShimConfig::from_args(args).unwrap();
        let dir = path.parent().unwrap();
        match &c.trust {
            Trust::Ca(ca) => assert!(ca.starts_with(dir), "{}", ca.display()),
            Trust::Pin(_) => panic!("the example trusts a CA"),
        }
        assert!(!c.gateways.is_empty());
        assert!(c.socks.is_some());
        assert!(c.forwards.iter().any(|f| f.proto == ForwardProto::Udp));
        assert!(c.forwards.iter().any(|f| f.proto == ForwardProto::Tcp));
    }
}
