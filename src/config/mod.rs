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

// This file holds what both roles share: errors, value syntax, reading the file and merging
// flags over it. `gateway.rs` and `shim.rs` hold each role's flags, file and config.

mod gateway;
mod shim;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::net::channel::Heartbeat;
use crate::policy::RuleError;
use crate::proto::keys::CipherSuite;
use crate::proto::replay;

pub use gateway::{
    Auth, GatewayArgs, GatewayConfig, KerberosConfig, ResumptionMode, StoreUrl, DEFAULT_CLUSTER,
    DEFAULT_CONNECT_IDLE_TIMEOUT, DEFAULT_E2E_TTL, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LISTEN, DEFAULT_MAX_ASSOCIATIONS, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_IP,
};
pub use shim::{
    parse_forward, parse_host_port, Forward, ForwardProto, PasswordLogin, ShimArgs, ShimConfig, Trust,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_FLOW_IDLE_TIMEOUT, DEFAULT_MAX_FLOWS, DEFAULT_SHIM_MAX_CONNECTIONS,
    DEFAULT_SOCKS,
};

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
         (--client-ca FILE) and/or `kerberos_keytab` with `kerberos_service`; for tests and \
         demos only, --no-auth accepts every client"
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
    /// An `e2e` entry that is neither a CIDR nor a domain name.
    #[error("invalid e2e entry: {0}")]
    E2e(String),
    /// Not a duration.
    #[error(transparent)]
    Duration(#[from] DurationError),
    /// Not a size.
    #[error(transparent)]
    Size(#[from] SizeError),
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
    /// A nice value outside the kernel's range.
    #[error("{0} is outside -20..=19 (the nice range: -20 most favoured, 19 least)")]
    Nice(i64),
    /// Not `HOST:PORT` with a nonzero port.
    #[error(
        "invalid HOST:PORT \"{0}\" (expected e.g. gw.example:8443, 192.0.2.1:8443 or \
         [2001:db8::1]:8443; the port must be nonzero)"
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
    /// Not a Kerberos principal name.
    #[error("invalid Kerberos principal \"{}\" (expected e.g. socks/gw.example.com or socks/gw.example.com@EXAMPLE.COM)", crate::logsafe::Peer::str(.0))]
    Principal(String),
    /// Kerberos configured in a build without it.
    #[error("this sudp was built without Kerberos support: rebuild with `cargo build --features kerberos` (needs libkrb5-dev and clang)")]
    NoKerberos,
    /// Not a TLS server name.
    #[error("invalid TLS server name \"{0}\" (expected a DNS name or an IP address)")]
    ServerName(String),
    /// A heartbeat timeout not longer than the interval: every peer would look dead.
    #[error(
        "the heartbeat timeout ({timeout:?}) must be longer than the heartbeat interval \
         ({interval:?}); a few intervals is usual"
    )]
    HeartbeatOrder {
        /// The interval.
        interval: Duration,
        /// The timeout.
        timeout: Duration,
    },
    /// Not a transport name.
    #[error("invalid transport \"{0}\" (expected udp, tls or auto)")]
    Transport(String),
    /// A user name that RFC 1929 cannot carry.
    #[error("a user name must be 1 to 255 bytes")]
    UserName,
    /// A `[users_policy.KEY]` that no identity can have.
    #[error(
        "no identity is named \"{0}\": password users have no ':' in their names, \
         certificate identities are cert:NAME and Kerberos principals krb:USER@REALM"
    )]
    PolicyKey(String),
    /// A store URL this build cannot use. The URL is not repeated: it may hold a password.
    #[error("invalid store URL: {0}")]
    StoreUrl(String),
    /// A cluster name outside `a-z A-Z 0-9 - _ .` or 1..=64 characters.
    #[error("invalid cluster name \"{0}\" (1 to 64 characters of a-z A-Z 0-9 - _ .)")]
    ClusterName(String),
    /// Not a resumption mode.
    #[error("invalid resumption mode \"{0}\" (expected `stateful` or `tickets`)")]
    Resumption(String),
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

/// Text that is not a size (see [`parse_size`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size \"{0}\" (expected a number of bytes with an optional unit B, KiB, MiB or \
     GiB (also K, M, G, KB, MB, GB as powers of 1024), e.g. 4MiB or 524288)"
)]
pub struct SizeError(pub String);

/// Parses `"4MiB"`, `"512KiB"`, `"1G"`, `"65536"` (bytes). Units are powers of 1024, whatever
/// the spelling; whitespace around the text and between number and unit is ignored.
pub fn parse_size(text: &str) -> Result<usize, SizeError> {
    let bad = || SizeError(text.to_owned());
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(bad());
    }
    let n: usize = number.parse().map_err(|_| bad())?;
    let shift = match unit.trim_start() {
        "" | "B" => 0,
        "K" | "KB" | "KiB" | "k" | "kB" => 10,
        "M" | "MB" | "MiB" => 20,
        "G" | "GB" | "GiB" => 30,
        _ => return Err(bad()),
    };
    n.checked_mul(1usize << shift).ok_or_else(bad)
}

/// A TOML size: a string for [`parse_size`] or a non-negative number of bytes.
fn size_value(v: toml::Value) -> Result<usize, Problem> {
    match v {
        toml::Value::String(s) => Ok(parse_size(&s)?),
        toml::Value::Integer(n) => usize::try_from(n).map_err(|_| SizeError(n.to_string()).into()),
        other => Err(Problem::Type {
            expected: "a size string such as \"4MiB\" or a number of bytes",
            found: other.type_str(),
        }),
    }
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

fn parse_socket_addr(text: &str) -> Result<SocketAddr, Problem> {
    text.trim()
        .parse()
        .map_err(|_| Problem::SocketAddr(text.to_owned()))
}

fn parse_suite(name: &str) -> Result<CipherSuite, Problem> {
    CipherSuite::from_name(name.trim()).ok_or_else(|| Problem::UnknownSuite {
        name: name.to_owned(),
    })
}

fn known_suites() -> String {
    CipherSuite::ALL.map(CipherSuite::name).join(", ")
}

/// The file `--config` names, parsed; with no `--config`, an empty file.
fn read_file<F: DeserializeOwned + Default>(path: Option<&Path>) -> Result<F, ConfigError> {
    let Some(path) = path else {
        return Ok(F::default());
    };
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_file(path, &text)
}

/// `text` as the config file `path`, key for key.
fn parse_file<F: DeserializeOwned>(path: &Path, text: &str) -> Result<F, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// Where to attribute a value: the file (`path`) or the flag named after `key`.
struct Origins {
    /// The `--config` file as named on the command line (empty without one).
    path: PathBuf,
}

impl Origins {
    fn new(config: Option<&Path>) -> Origins {
        Origins {
            path: config.map(Path::to_owned).unwrap_or_default(),
        }
    }

    fn file(&self, key: impl Into<String>) -> At {
        At::File {
            path: self.path.clone(),
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

    /// A path flag as given (relative to the working directory), else the file's key
    /// resolved against the file's directory.
    fn path(&self, flag: Option<PathBuf>, file: Option<PathBuf>) -> Option<PathBuf> {
        let dir = self.path.parent().unwrap_or(Path::new(""));
        // `join` keeps an absolute path as it is.
        flag.or(file.map(|p| dir.join(p)))
    }
}

/// A flag's value if given, else the file's; with whether it came from the flag.
fn pick<T>(flag: Option<T>, file: Option<T>) -> Option<(T, bool)> {
    flag.map(|v| (v, true)).or(file.map(|v| (v, false)))
}

/// A list given as a repeatable flag replaces the file's; which one won, and from where.
fn pick_list<T>(flag: Vec<T>, file: Option<Vec<T>>) -> Option<(Vec<T>, bool)> {
    if flag.is_empty() {
        file.map(|v| (v, false))
    } else {
        Some((flag, true))
    }
}

fn value_err(at: At, problem: impl Into<Problem>) -> ConfigError {
    ConfigError::Value {
        at,
        problem: problem.into(),
    }
}

/// A file's value, parsed; errors name the file and key.
fn file_value<T, E: Into<Problem>>(
    o: &Origins,
    key: &str,
    v: Option<String>,
    parse: fn(&str) -> Result<T, E>,
) -> Result<Option<T>, ConfigError> {
    v.map(|s| parse(&s).map_err(|e| value_err(o.file(key), e)))
        .transpose()
}

/// A file's list, each item parsed; errors name the file and key.
fn file_list<T, E: Into<Problem>>(
    o: &Origins,
    key: &str,
    v: Option<Vec<String>>,
    parse: fn(&str) -> Result<T, E>,
) -> Result<Option<Vec<T>>, ConfigError> {
    v.map(|items| file_items(o, key, &items, parse)).transpose()
}

/// Each item of a file's list, parsed; errors name the file and key.
fn file_items<T, E: Into<Problem>>(
    o: &Origins,
    key: &str,
    items: &[String],
    parse: fn(&str) -> Result<T, E>,
) -> Result<Vec<T>, ConfigError> {
    items
        .iter()
        .map(|s| parse(s).map_err(|e| value_err(o.file(key), e)))
        .collect()
}

/// A positive setting: the flag's value, else the file's, else `default`; zero is an error
/// naming where it came from.
fn nonzero<T: Default + PartialOrd>(
    o: &Origins,
    key: &str,
    flag: Option<T>,
    file: Option<T>,
    default: T,
) -> Result<T, ConfigError> {
    match pick(flag, file) {
        Some((n, _)) if n > T::default() => Ok(n),
        Some((_, from_flag)) => Err(value_err(o.at(key, from_flag), Problem::Zero)),
        None => Ok(default),
    }
}

/// A positive duration (see [`nonzero`]) whose file value is still raw TOML. The file's value
/// is parsed even when the flag overrides it: a broken file is an error.
fn nonzero_duration(
    o: &Origins,
    key: &str,
    flag: Option<Duration>,
    file: Option<toml::Value>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let file = file
        .map(|v| duration_value(v).map_err(|p| value_err(o.file(key), p)))
        .transpose()?;
    nonzero(o, key, flag, file, default)
}

/// The heartbeat of the control channel (PROTOCOL.md §2.4): `heartbeat_interval` (zero: no
/// PINGs) and `heartbeat_timeout` (nonzero, longer than the interval), each the flag's, else
/// the file's (a duration string or seconds), else `default`'s.
fn heartbeat(
    o: &Origins,
    interval: (Option<Duration>, Option<toml::Value>),
    timeout: (Option<Duration>, Option<toml::Value>),
    default: Heartbeat,
) -> Result<Heartbeat, ConfigError> {
    let file_interval = interval
        .1
        .map(|v| duration_value(v).map_err(|p| value_err(o.file("heartbeat_interval"), p)))
        .transpose()?;
    let (interval, interval_from_flag) = pick(interval.0, file_interval).unwrap_or((default.interval, false));
    let timeout_given = timeout.0.is_some() || timeout.1.is_some();
    let timeout_from_flag = timeout.0.is_some();
    let timeout = nonzero_duration(o, "heartbeat_timeout", timeout.0, timeout.1, default.timeout)?;
    if timeout <= interval {
        // Blame the key that was set: the timeout if it was, else the interval.
        let at = if timeout_given {
            o.at("heartbeat_timeout", timeout_from_flag)
        } else {
            o.at("heartbeat_interval", interval_from_flag)
        };
        return Err(value_err(at, Problem::HeartbeatOrder { interval, timeout }));
    }
    Ok(Heartbeat { interval, timeout })
}

/// The replay window: the flag's, else the file's, else the default; within
/// [`replay::MIN_WINDOW`]..=[`replay::MAX_WINDOW`].
fn replay_window(o: &Origins, flag: Option<usize>, file: Option<usize>) -> Result<usize, ConfigError> {
    match pick(flag, file) {
        Some((n, _)) if (replay::MIN_WINDOW..=replay::MAX_WINDOW).contains(&n) => Ok(n),
        Some((n, from_flag)) => Err(value_err(
            o.at("replay_window", from_flag),
            Problem::OutOfRange {
                value: n as u64,
                min: replay::MIN_WINDOW as u64,
                max: replay::MAX_WINDOW as u64,
            },
        )),
        None => Ok(replay::DEFAULT_WINDOW),
    }
}

/// The nice value (scheduling priority) the process takes at start: the flag's, else the
/// file's, within -20..=19; `None` keeps the one it inherited.
fn nice(o: &Origins, flag: Option<i32>, file: Option<i64>) -> Result<Option<i32>, ConfigError> {
    match pick(flag.map(i64::from), file) {
        // Invariant: the range fits an i32.
        Some((n, _)) if (-20..=19).contains(&n) => Ok(Some(n as i32)),
        Some((n, from_flag)) => Err(value_err(o.at("nice", from_flag), Problem::Nice(n))),
        None => Ok(None),
    }
}

/// The cipher suites to offer: the flag's list, else the file's, else all of them;
/// non-empty and without duplicates.
fn suites(
    o: &Origins,
    flag: Vec<CipherSuite>,
    file: Option<Vec<String>>,
) -> Result<Vec<CipherSuite>, ConfigError> {
    let file = file_list(o, "suites", file, parse_suite)?;
    let (suites, from_flag) = pick_list(flag, file).unwrap_or((CipherSuite::ALL.to_vec(), false));
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
    Ok(suites)
}

/// Scaffolding for the tests of both roles.
#[cfg(test)]
mod testing {
    use std::net::SocketAddr;
    use std::path::Path;

    use clap::{CommandFactory, Parser};
    use serde::de::DeserializeOwned;

    use super::{parse_file, ConfigError};

    /// `docs/CONFIG.md`, which documents both roles.
    pub(super) const CONFIG_MD: &str = include_str!("../../docs/CONFIG.md");

    /// The heading of the shim's part of `docs/CONFIG.md`.
    pub(super) const SHIM_SECTION: &str = "\n## Shim settings\n";

    /// A role's flags as a command of their own, as `main` flattens them into a subcommand.
    #[derive(Parser)]
    pub(super) struct Cli<A: clap::Args> {
        #[command(flatten)]
        pub(super) args: A,
    }

    /// Parses `argv` as the flags of the subcommand `name`.
    pub(super) fn flags<A: clap::Args>(name: &str, argv: &[&str]) -> A {
        Cli::<A>::try_parse_from(std::iter::once(name).chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    /// Builds with `build` from `text` as if read from `{name}.toml`, plus `argv` flags.
    pub(super) fn from_toml<A: clap::Args, F: DeserializeOwned, C>(
        name: &str,
        build: fn(A, F) -> Result<C, ConfigError>,
        text: &str,
        argv: &[&str],
    ) -> Result<C, ConfigError> {
        let path = format!("{name}.toml");
        let config = format!("--config={path}");
        let args = flags(name, &[&[config.as_str()], argv].concat());
        build(args, parse_file(Path::new(&path), text)?)
    }

    pub(super) fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// `doc` (a role's part of `docs/CONFIG.md`) names every flag of `A` and its key, and each
    /// of its TOML snippets passes `parses`.
    pub(super) fn check_config_md<A: clap::Args>(doc: &str, parses: impl Fn(&str)) {
        for arg in Cli::<A>::command().get_arguments() {
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
            parses(toml);
            snippets += 1;
        }
        assert!(snippets > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let ok = |s: &str| parse_size(s).unwrap();
        assert_eq!(ok("4MiB"), 4 << 20);
        assert_eq!(ok("4 MB"), 4 << 20);
        assert_eq!(ok("512KiB"), 512 << 10);
        assert_eq!(ok("1G"), 1 << 30);
        assert_eq!(ok(" 1000 "), 1000);
        assert_eq!(ok("0"), 0);
        for bad in [
            "",
            "MiB",
            "4 parsecs",
            "1.5M",
            "-1",
            "4 M B",
            "99999999999999999999",
            "18446744073709551615G",
        ] {
            assert_eq!(parse_size(bad), Err(SizeError(bad.into())), "{bad:?}");
        }
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

    use crate::proto::socks::Address;
    use crate::proto::testing::{assert_reached, counted};
    use proptest::prelude::*;

    /// `parse_duration` against its model: NUMBER, optional blanks, UNIT, with blanks around
    /// (ms, s, m, h or none for seconds; anything else refused; a product past u64 refused),
    /// then printed back as milliseconds it parses to the same duration. Counted per unit,
    /// overflow and refusal.
    #[test]
    fn durations_match_their_model_and_reparse() {
        let unit = prop::sample::select(vec!["", "s", "ms", "m", "h", "d", "S", "sec", "m s", "-"]);
        let number = prop_oneof![0u64..100_000, any::<u64>()];
        let blank = prop::sample::select(vec!["", " ", "\t", "  "]);
        let strategy = (number, unit, blank.clone(), blank.clone(), blank);
        let counts = counted(2000, strategy, |(n, unit, a, b, c)| {
            let text = format!("{a}{n}{b}{unit}{c}");
            let want = match unit {
                "" | "s" => n.checked_mul(1).map(Duration::from_secs),
                "ms" => Some(Duration::from_millis(n)),
                "m" => n.checked_mul(60).map(Duration::from_secs),
                "h" => n.checked_mul(3600).map(Duration::from_secs),
                _ => None,
            };
            let got = parse_duration(&text);
            prop_assert_eq!(got.clone().ok(), want, "{:?}", text);
            if let Ok(d) = got {
                let ms = format!("{}ms", d.as_millis());
                if d.as_millis() <= u128::from(u64::MAX) {
                    prop_assert_eq!(parse_duration(&ms), Ok(d));
                }
            } else {
                prop_assert_eq!(got, Err(DurationError(text.clone())));
            }
            Ok(match (unit, want) {
                ("" | "s" | "ms" | "m" | "h", Some(_)) => unit,
                ("m" | "h", None) => "overflow",
                _ => "refused",
            })
        });
        assert_reached(&counts, &["", "s", "ms", "m", "h", "overflow", "refused"], 20);
    }

    fn host_port() -> impl Strategy<Value = Address> {
        prop_oneof![
            (any::<[u8; 4]>(), 1u16..).prop_map(|(ip, p)| Address::Ip((ip, p).into())),
            (any::<[u16; 8]>(), 1u16..).prop_map(|(ip, p)| Address::Ip((ip, p).into())),
            ("[a-zA-Z][a-zA-Z0-9.-]{0,60}", 1u16..).prop_map(|(d, p)| Address::Domain(d, p)),
        ]
    }

    proptest! {
        /// HOST:PORT printed then parsed is the same address, blanks around ignored; port 0,
        /// a character a name cannot hold, or no port, is refused.
        #[test]
        fn host_port_round_trips_and_refuses_bad_names(addr in host_port(), bad in prop::sample::select(vec![" ", "[", "]", ":", "\u{7f}", "é"])) {
            let text = addr.to_string();
            prop_assert_eq!(parse_host_port(&format!(" {text}\t")), Ok(addr.clone()));
            let zero = match &addr {
                Address::Ip(a) => Address::Ip(std::net::SocketAddr::new(a.ip(), 0)).to_string(),
                Address::Domain(d, _) => format!("{d}:0"),
            };
            prop_assert!(parse_host_port(&zero).is_err());
            if let Address::Domain(d, p) = &addr {
                prop_assert!(parse_host_port(&format!("{d}{bad}x:{p}")).is_err(), "{}{}x:{}", d, bad, p);
                prop_assert!(parse_host_port(d).is_err());
                let big_port = format!("{d}:{}", u32::from(*p) + 65_536);
                prop_assert!(parse_host_port(&big_port).is_err());
            }
        }

        /// A forward printed in its own syntax parses back to itself (protocol in any case);
        /// without `=`, or with an unknown protocol, it is refused.
        #[test]
        fn forwards_round_trip(udp in any::<bool>(), upper in any::<bool>(), local in any::<([u8; 4], u16)>(), target in host_port()) {
            let f = Forward {
                proto: if udp { ForwardProto::Udp } else { ForwardProto::Tcp },
                local: local.into(),
                target,
            };
            let text = f.to_string();
            prop_assert_eq!(parse_forward(&text), Ok(f.clone()));
            let shouted = if upper { text.replacen(&f.proto.to_string(), &f.proto.to_string().to_uppercase(), 1) } else { text.clone() };
            prop_assert_eq!(parse_forward(&shouted), Ok(f.clone()));
            prop_assert!(parse_forward(&text.replacen('=', " ", 1)).is_err());
            let sctp = format!("sctp{}", &text[3..]);
            prop_assert!(parse_forward(&sctp).is_err());
        }
    }
}
