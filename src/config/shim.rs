//! The client shim's flags, config file and validated config.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{
    file_list, file_value, heartbeat, nice, nonzero, nonzero_duration, parse_duration, parse_size,
    parse_socket_addr, parse_suite, pick, pick_list, read_file, replay_window, size_value, suites, value_err,
    ConfigError, Origins, Problem,
};
use crate::client::Transport;
use crate::net::channel::Heartbeat;
use crate::proto::keys::CipherSuite;
use crate::proto::socks::Address;

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

    /// Authenticate to the gateway with GSS-API (Kerberos tickets from KRB5CCNAME, after
    /// kinit) for this service principal, e.g. socks/gw.example.com, for CONNECT and secure
    /// UDP alike. Needs a build with `--features kerberos`; cannot be combined with --user.
    #[arg(long, value_name = "PRINCIPAL")]
    pub gssapi: Option<String>,

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

    /// Nice value (scheduling priority) to run at, -20..=19: a positive value lets the
    /// applications on the same machine, whose sockets have the kernel's default buffers,
    /// be scheduled before the proxy, whose sockets have 4 MiB [default: as inherited].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub nice: Option<i32>,

    /// A UDP forward forgets a local source after this long without traffic, e.g. 30s
    /// [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,

    /// Most concurrent local sources (flows) per UDP forward; datagrams from a new source
    /// beyond it are refused and counted while the admitted flows go on [default: 256].
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

    /// Time between the shim's PINGs on each secure control connection; 0 sends none
    /// [default: 500ms].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,

    /// A gateway that said HELLO and is then silent this long is gone: the shim moves on to
    /// the next gateway [default: 1500ms].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub heartbeat_timeout: Option<Duration>,

    /// Serve Prometheus metrics (GET /metrics) and a health check (GET /healthz) over HTTP
    /// on this address, e.g. 127.0.0.1:9109 [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// How records travel to the gateway: udp, tls (inside the control connection), or auto
    /// (UDP while it works both ways, TLS while it does not) [default: auto].
    #[arg(long, value_name = "udp|tls|auto", value_parser = parse_transport)]
    pub transport: Option<Transport>,

    /// Delegate the TLS 1.3 secrets of connections through CONNECT tunnels to the gateway,
    /// for its audit: follow this NSS key log file (what SSLKEYLOGFILE names for curl,
    /// Firefox, Chromium, Python) and send each tunnel's secrets on a control session
    /// [default: off].
    #[arg(long, value_name = "FILE")]
    pub delegate_keylog: Option<PathBuf>,

    /// Bytes each flow may hold while its association opens (e.g. 4MiB, 512KiB, 1000000);
    /// what does not fit is dropped and counted [default: 4MiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub flow_queue: Option<usize>,
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
    /// GSS-API to this service principal, if set.
    pub gssapi: Option<String>,
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
    /// [`replay::MIN_WINDOW`](crate::proto::replay::MIN_WINDOW)..=
    /// [`replay::MAX_WINDOW`](crate::proto::replay::MAX_WINDOW).
    pub replay_window: usize,
    /// Nice value to take at start (-20..=19); `None`: as inherited.
    pub nice: Option<i32>,
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
    /// The control channel's heartbeat.
    pub heartbeat: Heartbeat,
    /// Bytes each flow may queue while its association opens (nonzero).
    pub flow_queue: usize,
    /// Where to serve `/metrics` and `/healthz`, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// How records travel to the gateway.
    pub transport: Transport,
    /// The NSS key log file to follow for delegated inspection, if any.
    pub delegate_keylog: Option<PathBuf>,
}

/// Parses a transport name: `udp`, `tls` or `auto`.
fn parse_transport(text: &str) -> Result<Transport, Problem> {
    Transport::parse(text).ok_or_else(|| Problem::Transport(text.to_owned()))
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

/// The shim's config file, key for key. Paths stay as written until [`build`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShimFile {
    gateway: Option<Vec<String>>,
    ca: Option<PathBuf>,
    pin: Option<String>,
    server_name: Option<String>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    gssapi: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    socks: Option<String>,
    no_socks: Option<bool>,
    socks_user: Option<String>,
    socks_password_file: Option<PathBuf>,
    forward: Option<Vec<String>>,
    suites: Option<Vec<String>>,
    replay_window: Option<usize>,
    nice: Option<i64>,
    idle_timeout: Option<toml::Value>,
    max_flows: Option<usize>,
    max_connections: Option<usize>,
    connect_timeout: Option<toml::Value>,
    tls12: Option<bool>,
    heartbeat_interval: Option<toml::Value>,
    heartbeat_timeout: Option<toml::Value>,
    /// A size string such as "4MiB" or a number of bytes, hence a raw value.
    flow_queue: Option<toml::Value>,
    metrics: Option<String>,
    transport: Option<String>,
    delegate_keylog: Option<PathBuf>,
}

impl ShimConfig {
    /// Builds the configuration from flags and, if `--config` names one, a TOML file: reads
    /// the file, lets flags override it, applies defaults and validates.
    pub fn from_args(args: ShimArgs) -> Result<ShimConfig, ConfigError> {
        let file = read_file(args.config.as_deref())?;
        build(args, file)
    }
}

/// Merges the shim's flags over its file, applies defaults and validates.
fn build(args: ShimArgs, file: ShimFile) -> Result<ShimConfig, ConfigError> {
    let o = Origins::new(args.config.as_deref());

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
    let file_pin = file_value(&o, "pin", file.pin, parse_pin)?;
    let ca = o.path(args.ca, file.ca);
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
        ("password_file", o.path(args.password_file, file.password_file)),
    )?;
    let gssapi = match pick(args.gssapi, file.gssapi) {
        Some((name, from_flag)) => {
            let name = name.trim().to_owned();
            if name.is_empty() || name.contains(['\0', ' ', '\n']) {
                return Err(value_err(o.at("gssapi", from_flag), Problem::Principal(name)));
            }
            if !cfg!(feature = "kerberos") {
                return Err(value_err(o.at("gssapi", from_flag), Problem::NoKerberos));
            }
            if login.is_some() {
                return Err(ConfigError::Conflict {
                    a: "gssapi",
                    b: "user",
                    why: "the gateway connection authenticates one way: tickets or a password",
                });
            }
            Some(name)
        }
        None => None,
    };
    let cert = o.path(args.cert, file.cert);
    let key = o.path(args.key, file.key);
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
    let file_socks = file_value(&o, "socks", file.socks, parse_socket_addr)?;
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
            o.path(args.socks_password_file, file.socks_password_file),
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
    let suites = suites(&o, args.suites, file.suites)?;
    let replay_window = replay_window(&o, args.replay_window, file.replay_window)?;
    let nice = nice(&o, args.nice, file.nice)?;
    let idle_timeout = nonzero_duration(
        &o,
        "idle_timeout",
        args.idle_timeout,
        file.idle_timeout,
        DEFAULT_FLOW_IDLE_TIMEOUT,
    )?;
    let connect_timeout = nonzero_duration(
        &o,
        "connect_timeout",
        args.connect_timeout,
        file.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
    )?;
    let max_flows = nonzero(&o, "max_flows", args.max_flows, file.max_flows, DEFAULT_MAX_FLOWS)?;
    let max_connections = nonzero(
        &o,
        "max_connections",
        args.max_connections,
        file.max_connections,
        DEFAULT_SHIM_MAX_CONNECTIONS,
    )?;
    let heartbeat = heartbeat(
        &o,
        (args.heartbeat_interval, file.heartbeat_interval),
        (args.heartbeat_timeout, file.heartbeat_timeout),
        crate::client::DEFAULT_HEARTBEAT,
    )?;

    let flow_queue = file
        .flow_queue
        .map(|v| size_value(v).map_err(|p| value_err(o.file("flow_queue"), p)))
        .transpose()?;
    let flow_queue = nonzero(
        &o,
        "flow_queue",
        args.flow_queue,
        flow_queue,
        crate::shim::link::DEFAULT_FLOW_QUEUE,
    )?;

    Ok(ShimConfig {
        gateways,
        trust,
        server_name,
        login,
        gssapi,
        client_cert,
        socks,
        socks_login,
        forwards,
        suites,
        replay_window,
        nice,
        idle_timeout,
        max_flows,
        max_connections,
        connect_timeout,
        tls12: args.tls12 || file.tls12.unwrap_or(false),
        heartbeat,
        flow_queue,
        metrics: args
            .metrics
            .or(file_value(&o, "metrics", file.metrics, parse_socket_addr)?),
        transport: args
            .transport
            .or(file_value(&o, "transport", file.transport, parse_transport)?)
            .unwrap_or_default(),
        delegate_keylog: o.path(args.delegate_keylog, file.delegate_keylog),
    })
}

/// A user name (flag or file, with its origin) and a password file: both or neither.
fn password_login(
    o: &Origins,
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
    crate::tls::parse_pin(text).map_err(|_| Problem::Pin(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;
    use crate::config::parse_file;
    use crate::config::testing::{self, check_config_md, sa, CONFIG_MD, SHIM_SECTION};
    use crate::proto::replay;

    type Cli = testing::Cli<ShimArgs>;

    fn flags(argv: &[&str]) -> ShimArgs {
        testing::flags("shim", argv)
    }

    /// Builds from `text` as if read from `shim.toml`, plus `argv` flags.
    fn from_toml(text: &str, argv: &[&str]) -> Result<ShimConfig, ConfigError> {
        testing::from_toml("shim", build, text, argv)
    }

    fn error(text: &str, argv: &[&str]) -> String {
        from_toml(text, argv).unwrap_err().to_string()
    }

    #[test]
    fn gssapi_takes_a_principal_and_excludes_a_password() {
        let base = "gateway = [\"gw.example:8443\"]\nca = \"ca.pem\"\n";
        let got = error(
            &format!("{base}gssapi = \"socks/gw.example\"\nuser = \"u\"\npassword_file = \"p\""),
            &[],
        );
        if cfg!(feature = "kerberos") {
            assert!(
                got.contains("`gssapi` (--gssapi) and `user` (--user) cannot be combined"),
                "{got}"
            );
            let c = from_toml(&format!("{base}gssapi = \"socks/gw.example\""), &[]).unwrap();
            assert_eq!(c.gssapi.as_deref(), Some("socks/gw.example"));
        } else {
            assert!(got.contains("built without Kerberos support"), "{got}");
        }
        let got = error(base, &["--gssapi="]);
        assert!(
            got.contains("--gssapi") && got.contains("invalid Kerberos principal"),
            "{got}"
        );
    }

    const MINIMAL: &str = "gateway = [\"gw.example:8443\"]\nca = \"ca.pem\"\n";

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
        assert_eq!(c.nice, None);
        assert_eq!(c.idle_timeout, DEFAULT_FLOW_IDLE_TIMEOUT);
        assert_eq!(c.max_flows, DEFAULT_MAX_FLOWS);
        assert_eq!(c.max_connections, DEFAULT_SHIM_MAX_CONNECTIONS);
        assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert!(!c.tls12);
    }

    #[test]
    fn aead_suite_names_are_accepted_in_order() {
        let c = ShimConfig::from_args(flags(&[
            "--gateway=127.0.0.1:1443",
            "--ca=ca.pem",
            "--suites=aes128-gcm,chacha20-poly1305",
        ]))
        .unwrap();
        assert_eq!(c.suites, [CipherSuite::Aes128Gcm, CipherSuite::ChaCha20Poly1305]);
        // By default CBC comes first, so a default shim negotiates suite 1.
        let d = ShimConfig::from_args(flags(&["--gateway=127.0.0.1:1443", "--ca=ca.pem"])).unwrap();
        assert_eq!(d.suites[0], CipherSuite::Aes128CbcHmacSha256);
        assert_eq!(
            &d.suites[2..],
            [CipherSuite::Aes128Gcm, CipherSuite::ChaCha20Poly1305]
        );
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
            nice = 19
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
        assert_eq!(c.nice, Some(19));
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
        let file = parse_file(
            Path::new("x"),
            "gateway = [\"gw:1\"]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"/k.pem\"",
        )
        .unwrap();
        let c = build(args, file).unwrap();
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
        let (_, doc) = CONFIG_MD
            .split_once(SHIM_SECTION)
            .expect("CONFIG.md has a shim section");
        check_config_md::<ShimArgs>(doc, |toml| {
            from_toml(&format!("{MINIMAL}{toml}"), &[]).unwrap();
        });
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
