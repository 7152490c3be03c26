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
        let doc = include_str!("../docs/CONFIG.md");
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
