//! Test harness: an in-process gateway on ephemeral ports with real TLS (certificates from
//! the `sudp cert` logic), echo servers, and client configurations.
#![allow(dead_code)]

pub mod netns;
pub mod stream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sudp::cert::DevPki;
use sudp::client::ClientOptions;
use sudp::gateway::{AuthSettings, Gateway, Settings};
use sudp::metrics::Metrics;
use sudp::policy::{Action, Policy, Rule};
use sudp::tls::{ClientTlsOptions, ServerTlsOptions, ServerTrust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Every network wait in tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn pki() -> DevPki {
    sudp::cert::ephemeral()
}

/// Policy that lets tests reach loopback targets (the default denies them).
pub fn loopback_policy() -> Policy {
    Policy::new(
        vec![
            Rule::parse(Action::Allow, "127.0.0.0/8").unwrap(),
            Rule::parse(Action::Allow, "::1/128").unwrap(),
        ],
        HashMap::new(),
    )
}

pub fn server_tls(pki: &DevPki, client_ca: bool, require: bool) -> Arc<rustls::ServerConfig> {
    sudp::tls::server_config(ServerTlsOptions {
        cert_chain: pki.gateway_chain(),
        key: pki.gateway_key(),
        client_ca: client_ca.then(|| vec![pki.ca_der()]),
        require_client_cert: require,
        client_crls: Vec::new(),
        allow_tls12: false,
    })
    .unwrap()
}

pub fn settings(pki: &DevPki) -> Settings {
    Settings {
        auth: AuthSettings {
            no_auth: true,
            users: None,
            ..Default::default()
        },
        policy: Arc::new(loopback_policy()),
        idle_timeout: Duration::from_secs(30),
        max_associations: 64,
        max_connections: 64,
        handshake_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        workers: 2,
        ..Settings::new("127.0.0.1:0".parse().unwrap(), server_tls(pki, false, false))
    }
}

pub fn client_tls(pki: &DevPki, with_cert: bool) -> Arc<rustls::ClientConfig> {
    sudp::tls::client_config(ClientTlsOptions {
        trust: ServerTrust::Ca(vec![pki.ca_der()]),
        client_auth: with_cert.then(|| (pki.client_chain(), pki.client_key())),
        allow_tls12: false,
    })
    .unwrap()
}

pub struct TestGateway {
    pub control: SocketAddr,
    pub relay: SocketAddr,
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestGateway {
    pub async fn start(settings: Settings) -> TestGateway {
        Self::try_start(settings).await.unwrap()
    }

    /// [`TestGateway::start`] that reports a bind failure (e.g. restarting on ports that
    /// are not free yet).
    pub async fn try_start(settings: Settings) -> std::io::Result<TestGateway> {
        let gw = Gateway::bind(settings).await?;
        let (control, relay, metrics) = (gw.control_addr(), gw.relay_addr(), gw.metrics());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gw.run(async move {
            let _ = rx.await;
        }));
        Ok(TestGateway {
            control,
            relay,
            metrics,
            stop: Some(tx),
            task: Some(task),
        })
    }

    pub fn options(&self, pki: &DevPki) -> ClientOptions {
        ClientOptions::new(self.control, "localhost", client_tls(pki, false))
    }

    /// Graceful shutdown; returns once the gateway drained.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t).await.unwrap().unwrap().unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A UDP echo server on 127.0.0.1 (or `bind`), running until the test ends.
pub async fn udp_echo_on(bind: &str) -> SocketAddr {
    let s = UdpSocket::bind(bind).await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

pub async fn udp_echo() -> SocketAddr {
    udp_echo_on("127.0.0.1:0").await
}

/// A TCP server that echoes each connection until EOF, then closes its side.
pub async fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Waits (bounded) until `f` holds.
pub async fn eventually(mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A tiny HTTP/1.0 server on 127.0.0.1: every request gets `body`, then the connection closes.
pub async fn http_server(body: Vec<u8>) -> SocketAddr {
    let body = Arc::new(body);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Whether a third-party program the test drives is installed. `.ci/run` installs every one
/// and sets `SUDP_REQUIRE_TOOLS=1`, so in CI a missing tool fails the test; on a machine
/// with only the Rust toolchain the test says what it skipped and passes.
pub fn tool_available(what: &str, program: &str, probe: &[&str]) -> bool {
    let ok = std::process::Command::new(program)
        .args(probe)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("SUDP_REQUIRE_TOOLS").is_none(),
            "{what} is required here (SUDP_REQUIRE_TOOLS is set) but `{program}` is missing"
        );
        skipped(&format!("{what} not installed (`bash .ci/run` installs it)"));
    }
    ok
}

/// `child.wait_with_output()` bounded by `within`: a child that does not finish in time is
/// killed (SIGKILL, reaped) and the test fails, instead of waiting for ever.
pub fn output_within(child: std::process::Child, within: Duration, what: &str) -> std::process::Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            // The waiting thread reaps it.
            let _ = rx.recv_timeout(Duration::from_secs(5));
            panic!("{what} did not finish within {within:?}");
        }
    }
}

/// Says that a test skipped, on the process's real stderr: the test harness captures what
/// `eprintln!` prints for a passing test, so a skip said that way would never be seen.
pub fn skipped(why: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

pub fn have_curl() -> bool {
    tool_available("curl", "curl", &["--version"])
}

pub fn have_python_socks() -> bool {
    tool_available(
        "Debian's python3-socks",
        "/usr/bin/python3",
        &["-c", "import socks"],
    )
}

pub fn have_iperf3() -> bool {
    tool_available("iperf3", "iperf3", &["--version"])
}

pub fn have_python_prometheus() -> bool {
    tool_available(
        "Python's prometheus_client (Debian's python3-prometheus-client)",
        "/usr/bin/python3",
        &["-c", "import prometheus_client.parser"],
    )
}

pub fn have_ffmpeg() -> bool {
    tool_available("ffmpeg", "ffmpeg", &["-version"]) && tool_available("ffprobe", "ffprobe", &["-version"])
}

/// The nice value of each thread of process `pid`, by thread name (`/proc/PID/task/*/stat`).
pub fn thread_nice_values(pid: u32) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(t.unwrap().path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        // `TID (NAME) STATE ...`: the name may hold spaces and parentheses, so split at the
        // last `)`; field 19 (nice) is then the 17th after it.
        let (head, rest) = stat.rsplit_once(')').unwrap();
        let name = head.split_once('(').unwrap().1.to_owned();
        let nice = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        out.push((name, nice));
    }
    out
}

/// [`thread_nice_values`] once the process's tokio runtime threads have their names (a
/// thread names itself just after it starts), waiting for that at most [`WAIT`].
pub fn runtime_thread_nice_values(pid: u32) -> Vec<(String, i32)> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let threads = thread_nice_values(pid);
        if threads.iter().any(|(name, _)| name.starts_with("tokio-rt")) {
            return threads;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no tokio runtime thread: {threads:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A nice value other than this process's (which a child would inherit) that an
/// unprivileged process may take: one more, or one less at the top of the range.
pub fn another_nice_value() -> i32 {
    let own = thread_nice_values(std::process::id())
        .first()
        .map_or(0, |(_, n)| *n);
    if own < 19 {
        own + 1
    } else {
        18
    }
}

/// Sends SIGTERM to `child` and waits (bounded) for it to exit; returns its status.
pub fn terminate(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A secure association built from the library's parts, so a test controls its UDP: the
/// control connection (keep it: the association lives as long as it), the association id,
/// the keys, a client socket on 127.0.0.1 and the relay address.
pub struct RawSecure {
    pub control: sudp::client::Control,
    pub assoc: sudp::proto::AssociationId,
    pub keys: sudp::proto::KeySchedule,
    pub socket: UdpSocket,
    pub relay: SocketAddr,
}

/// [`raw_secure_announcing`] with DST.PORT 0: the gateway's reply path starts at the source
/// of the first authenticated record (so a test may send through a relay of its own).
pub async fn raw_secure(gw: &TestGateway, pki: &DevPki) -> RawSecure {
    raw_secure_announcing(gw, pki, false).await
}

/// A [`RawSecure`] whose UDP ASSOCIATE announces the client socket's address (as
/// `SecureUdp` does) when `announce`, else `0.0.0.0:0`.
pub async fn raw_secure_announcing(gw: &TestGateway, pki: &DevPki, announce: bool) -> RawSecure {
    use sudp::client::{connect_tls, negotiate_sudp, request};
    use sudp::proto::socks::{Address, Command};
    let opts = gw.options(pki);
    let mut control = connect_tls(&opts).await.unwrap();
    let (suite, assoc) = negotiate_sudp(&mut control, &opts).await.unwrap();
    let keys = sudp::tls::export_keys(control.get_ref().1, assoc, suite).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let announced = if announce {
        socket.local_addr().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let bnd = request(&mut control, Command::UdpAssociate, &Address::Ip(announced))
        .await
        .unwrap();
    let Address::Ip(relay) = bnd else {
        panic!("BND is a domain")
    };
    RawSecure {
        control,
        assoc,
        keys,
        socket,
        relay,
    }
}

/// A `sudp gateway` process (real binary), killed and reaped when dropped.
pub struct GatewayProcess {
    pub child: std::process::Child,
    pub control: SocketAddr,
    pub relay: SocketAddr,
    /// The metrics (HTTP) address, when started with `--metrics`.
    pub metrics: Option<SocketAddr>,
    /// The directory holding its certificate, key and any other files it was given.
    pub dir: std::path::PathBuf,
}

impl GatewayProcess {
    /// Writes the gateway's certificate and key from `pki` into a fresh temp dir, starts
    /// `sudp gateway --listen 127.0.0.1:0 --cert .. --key ..` plus `args`, and waits (bounded)
    /// for the two lines that name the bound addresses. Stderr goes to `DIR/stderr.log`.
    pub fn start(pki: &DevPki, tag: &str, args: &[&str]) -> GatewayProcess {
        use std::io::BufRead as _;
        let dir = std::env::temp_dir().join(format!(
            "sudp-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("gateway.pem"), &pki.gateway_cert_pem).unwrap();
        std::fs::write(dir.join("gateway.key"), &pki.gateway_key_pem).unwrap();
        let stderr = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sudp"))
            .args(["gateway", "--listen", "127.0.0.1:0", "--cert"])
            .arg(dir.join("gateway.pem"))
            .arg("--key")
            .arg(dir.join("gateway.key"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let addr = |prefix: &str| -> SocketAddr {
            let line = rx
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("gateway {tag} did not print `{prefix}` in time"));
            line.strip_prefix(prefix)
                .unwrap_or_else(|| panic!("unexpected line {line:?}"))
                .parse()
                .unwrap()
        };
        let control = addr("control (TLS) ");
        let relay = addr("relay (UDP) ");
        let metrics = args.contains(&"--metrics").then(|| addr("metrics (HTTP) "));
        GatewayProcess {
            child,
            control,
            relay,
            metrics,
            dir,
        }
    }

    /// Sends `signal` (e.g. "STOP", "CONT", "KILL") to the process.
    pub fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} failed");
    }

    /// What the gateway logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        // A stopped process must be continued to die promptly on SIGKILL's reaping.
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn have_redis_server() -> bool {
    tool_available("Debian's redis-server", "redis-server", &["--version"])
}

/// A throwaway `redis-server` on 127.0.0.1, persistence off, in a directory of its own;
/// killed when dropped. Redis cannot bind port 0, so the port is one the kernel just handed
/// out (bound and closed here); if another process takes it first, Redis fails to bind and
/// the start is retried on another port.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    dir: std::path::PathBuf,
    role: RedisRole,
}

/// What a [`RedisServer`] runs as.
#[derive(Clone)]
pub enum RedisRole {
    /// A standalone server (or a primary).
    Primary,
    /// A replica of the server on this port.
    ReplicaOf(u16),
    /// A sentinel monitoring the primary on `primary` as `service` (quorum 1, down after
    /// 500 ms, so that a test's failover takes a few seconds).
    Sentinel { primary: u16, service: String },
    /// TLS only (`--port 0 --tls-port`), with `gateway.pem`/`gateway.key` of a PKI written
    /// into this directory (`sudp::cert::write`), no client certificates asked for.
    Tls(std::path::PathBuf),
}

impl RedisServer {
    /// Starts one, or `None` (with a note; a failure under `SUDP_REQUIRE_TOOLS`) when
    /// `redis-server` is not installed.
    pub fn start() -> Option<RedisServer> {
        Self::start_as(RedisRole::Primary)
    }

    /// [`RedisServer::start`] in another role.
    pub fn start_as(role: RedisRole) -> Option<RedisServer> {
        if !have_redis_server() {
            return None;
        }
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sudp-redis-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut server = RedisServer {
                child: None,
                port,
                dir: dir.clone(),
                role: role.clone(),
            };
            if server.spawn() {
                return Some(server);
            }
        }
        panic!("redis-server did not start on any of 10 free ports");
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts redis-server on `self.port`; false if it exited (port taken) or never
    /// answered.
    fn spawn(&mut self) -> bool {
        let mut cmd = std::process::Command::new("redis-server");
        if let RedisRole::Sentinel { primary, service } = &self.role {
            // A sentinel needs a config file it can rewrite.
            let conf = self.dir.join("sentinel.conf");
            let text = format!(
                "port {}\nbind 127.0.0.1\ndaemonize no\n\
                 sentinel monitor {service} 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds {service} 500\n\
                 sentinel failover-timeout {service} 2000\n",
                self.port
            );
            std::fs::write(&conf, text).unwrap();
            cmd.arg(&conf).arg("--sentinel");
        } else if let RedisRole::Tls(pki) = &self.role {
            cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--tls-cert-file")
                .arg(pki.join("gateway.pem"))
                .arg("--tls-key-file")
                .arg(pki.join("gateway.key"))
                .arg("--tls-ca-cert-file")
                .arg(pki.join("ca.pem"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.args(["--port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--protected-mode", "yes", "--daemonize", "no"]);
            if let RedisRole::ReplicaOf(primary) = self.role {
                cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
            }
        }
        let child = cmd
            .arg("--dir")
            .arg(&self.dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < deadline {
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                self.child = None;
                return false;
            }
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    /// Whether a PING gets a PONG (for a TLS server: whether it accepts connections).
    pub fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        if matches!(self.role, RedisRole::Tls(_)) {
            return true;
        }
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Kills the server (SIGKILL: no goodbye to the clients, as in a crash) and waits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (an empty database: persistence is off). Retries
    /// for a while in case the port is not free again at once.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = std::time::Instant::now() + WAIT;
        while !self.spawn() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A scratch directory of the test's own, removed when dropped (also when the test fails).
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// A fresh directory under the system's temporary directory, named after `tag`, the
    /// process and a counter, so parallel tests never share one.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sudp-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A TCP address on 127.0.0.1 where nobody listens, kept so while the returned socket
/// lives: the socket is bound but never listens, so a connection to it is refused (RST)
/// and no other test can take the port in the meantime (a port picked, closed and reused
/// later could be anyone's by then).
pub fn refusing_tcp_addr() -> (socket2::Socket, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    (s, addr)
}
