//! Kerberos against a real KDC (MIT krb5kdc) in a throwaway realm: password checks through
//! the KDC and the keytab, GSS-API (RFC 1961) from the shim with `kinit`'s tickets, per-user
//! rules for principals, audit lines, and a KDC that is down.
//!
//! Each test makes its own realm in a temp dir (`kdb5_util create -s`, `kadmin.local`), runs
//! `krb5kdc` on an ephemeral 127.0.0.1 port, and gives the gateway and shim processes
//! `KRB5_CONFIG` / `KRB5_KDC_PROFILE` / `KRB5CCNAME` / `KRB5RCACHEDIR` pointing there: nothing
//! system-wide is read or changed, and no variable is set in this (multi-threaded) process.
#![cfg(feature = "kerberos")]

mod common;

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TempDir, WAIT};
use sudp::cert::DevPki;
use sudp::client::{connect_tls, ClientOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REALM: &str = "SUDP.TEST";
const SERVICE: &str = "socks/localhost";

fn have_krb5() -> bool {
    common::tool_available(
        "Debian's krb5-kdc, krb5-admin-server and krb5-user",
        "sh",
        &[
            "-c",
            "command -v krb5kdc && command -v kdb5_util && command -v kadmin.local && command -v kinit",
        ],
    )
}

/// A port free on 127.0.0.1 for both TCP and UDP right now (the KDC listens on both).
fn free_port() -> u16 {
    for _ in 0..50 {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP");
}

/// A throwaway realm and its KDC (killed and reaped on drop, with the directory).
struct Realm {
    kdc: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl Realm {
    /// The realm's files, principals `alice` (password `alice-pw`), `bob` (`bob-pw`) and the
    /// service with its keytab; the KDC started unless `start` is false (a KDC that is down).
    fn new(tag: &str, start: bool) -> Realm {
        let dir = TempDir::new(tag);
        let port = free_port();
        let d = dir.path();
        std::fs::write(
            d.join("krb5.conf"),
            format!(
                "[libdefaults]\n  default_realm = {REALM}\n  dns_lookup_kdc = false\n  dns_lookup_realm = false\n  \
                 rdns = false\n  dns_canonicalize_hostname = false\n  udp_preference_limit = 1\n\
                 [realms]\n  {REALM} = {{\n    kdc = 127.0.0.1:{port}\n  }}\n"
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("kdc.conf"),
            format!(
                "[kdcdefaults]\n  kdc_listen = 127.0.0.1:{port}\n  kdc_tcp_listen = 127.0.0.1:{port}\n\
                 [realms]\n  {REALM} = {{\n    database_name = {db}\n    key_stash_file = {stash}\n    \
                 acl_file = {acl}\n    kdc_listen = 127.0.0.1:{port}\n    kdc_tcp_listen = 127.0.0.1:{port}\n  }}\n\
                 [logging]\n  kdc = FILE:{log}\n",
                db = d.join("principal").display(),
                stash = d.join("stash").display(),
                acl = d.join("kadm5.acl").display(),
                log = d.join("kdc.log").display(),
            ),
        )
        .unwrap();
        let mut realm = Realm { kdc: None, port, dir };
        realm.run("kdb5_util", &["create", "-s", "-r", REALM, "-P", "master-pw"]);
        for q in [
            "addprinc -pw alice-pw alice".to_owned(),
            "addprinc -pw bob-pw bob".to_owned(),
            format!("addprinc -randkey {SERVICE}"),
            format!("ktadd -k {} {SERVICE}", realm.keytab().display()),
        ] {
            realm.run("kadmin.local", &["-q", &q]);
        }
        if start {
            realm.start_kdc();
        }
        realm
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn keytab(&self) -> PathBuf {
        self.path().join("gateway.keytab")
    }

    /// The environment of every Kerberos program of the test (KDC, tools, gateway, shim).
    fn env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("KRB5_CONFIG", self.path().join("krb5.conf")),
            ("KRB5_KDC_PROFILE", self.path().join("kdc.conf")),
            ("KRB5CCNAME", self.path().join("ccache")),
            ("KRB5RCACHEDIR", self.path().to_owned()),
        ]
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.envs(self.env()).stdin(Stdio::null());
        c
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self.command(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start_kdc(&mut self) {
        let pid = self.path().join("kdc.pid");
        let child = self
            .command("krb5kdc")
            .arg("-n")
            .arg("-P")
            .arg(&pid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.kdc = Some(child);
        let until = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < until,
                "krb5kdc did not listen on {} in time",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kinit user` into the realm's ticket cache.
    fn kinit(&self, user: &str, password: &str) {
        let mut child = self
            .command("kinit")
            .arg(user)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{password}\n").as_bytes())
            .unwrap();
        let out = common::output_within(child, WAIT, "kinit");
        assert!(
            out.status.success(),
            "kinit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Realm {
    fn drop(&mut self) {
        if let Some(mut kdc) = self.kdc.take() {
            let _ = kdc.kill();
            let _ = kdc.wait();
        }
    }
}

/// A child process killed and reaped when dropped (also when the test fails first).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `sudp gateway` child with the realm's environment, killed and reaped on drop.
struct Gateway {
    child: Child,
    control: SocketAddr,
    dir: PathBuf,
}

impl Gateway {
    /// Starts the gateway with Kerberos, the config file `config` (TOML, may be empty) and
    /// an audit log in the realm's directory.
    fn start(realm: &Realm, pki: &DevPki, config: &str) -> Gateway {
        Gateway::start_with_keytab(realm, &realm.keytab(), pki, config)
    }

    /// [`Gateway::start`] with the service key from `keytab` (another realm's, to play a
    /// spoofed KDC).
    fn start_with_keytab(realm: &Realm, keytab: &Path, pki: &DevPki, config: &str) -> Gateway {
        let dir = realm.path().to_owned();
        std::fs::write(dir.join("gateway.pem"), &pki.gateway_cert_pem).unwrap();
        std::fs::write(dir.join("gateway.key"), &pki.gateway_key_pem).unwrap();
        std::fs::write(dir.join("gateway.toml"), config).unwrap();
        let stderr = std::fs::File::create(dir.join("gateway.log")).unwrap();
        let mut child = realm
            .command(env!("CARGO_BIN_EXE_sudp"))
            .args(["gateway", "--listen", "127.0.0.1:0", "--cert"])
            .arg(dir.join("gateway.pem"))
            .arg("--key")
            .arg(dir.join("gateway.key"))
            .arg("--config")
            .arg(dir.join("gateway.toml"))
            .arg("--kerberos-keytab")
            .arg(keytab)
            .args(["--kerberos-service", SERVICE, "--allow", "127.0.0.0/8"])
            .arg("--audit-log")
            .arg(dir.join("audit.jsonl"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let line = first_line(&mut child, WAIT).unwrap_or_else(|| {
            panic!(
                "the gateway printed no address: {}",
                std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default()
            )
        });
        let control = line
            .strip_prefix("control (TLS) ")
            .unwrap_or_else(|| panic!("unexpected line {line:?}"))
            .parse()
            .unwrap();
        Gateway { child, control, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    /// The audit lines written so far, parsed.
    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits (bounded) for an audit line that `want` accepts.
    fn audit_line(&self, want: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let until = Instant::now() + WAIT;
        loop {
            if let Some(l) = self.audit().into_iter().find(&want) {
                return l;
            }
            assert!(Instant::now() < until, "no such audit line: {:?}", self.audit());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first `n` stdout lines of `child` (fewer if it printed fewer within `within`).
fn lines(child: &mut Child, n: usize, within: Duration) -> Vec<String> {
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
    let until = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(l) => out.push(l),
            Err(_) => break,
        }
    }
    out
}

/// The first stdout line of `child`, within `within`.
fn first_line(child: &mut Child, within: Duration) -> Option<String> {
    let stdout = child.stdout.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx.recv_timeout(within).ok()
}

fn options(gw: &Gateway, pki: &DevPki) -> ClientOptions {
    ClientOptions::new(gw.control, "localhost", common::client_tls(pki, false))
}

/// RFC 1929 over TLS by hand: returns the status byte of the gateway's reply, and the
/// stream (for a request after success).
async fn userpass(opts: &ClientOptions, user: &str, pass: &str) -> (u8, sudp::client::Control) {
    let mut s = connect_tls(opts).await.unwrap();
    s.write_all(&[0x05, 0x01, 0x02]).await.unwrap();
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).await.unwrap();
    assert_eq!(sel, [0x05, 0x02], "the gateway selects username/password");
    let mut msg = vec![0x01, user.len() as u8];
    msg.extend_from_slice(user.as_bytes());
    msg.push(pass.len() as u8);
    msg.extend_from_slice(pass.as_bytes());
    s.write_all(&msg).await.unwrap();
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[0], 0x01);
    (reply[1], s)
}

/// A CONNECT on an authenticated stream to `target`; returns the reply code.
async fn connect_code(s: &mut sudp::client::Control, target: SocketAddr) -> u8 {
    let mut req = vec![0x05, 0x01, 0x00, 0x01];
    match target.ip() {
        std::net::IpAddr::V4(ip) => req.extend_from_slice(&ip.octets()),
        std::net::IpAddr::V6(_) => unreachable!("tests use 127.0.0.1"),
    }
    req.extend_from_slice(&target.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    reply[1]
}

#[tokio::test]
async fn password_checked_by_the_kdc_and_the_keytab() {
    if !have_krb5() {
        return;
    }
    let pki = common::pki();
    let realm = Realm::new("krb-pw", true);
    let echo = common::tcp_echo().await;
    // bob's own rules deny the echo's port; alice has none and gets the global allow.
    let gw = Gateway::start(
        &realm,
        &pki,
        &format!(
            "[users_policy.\"krb:bob@{REALM}\"]\ndeny = [\"127.0.0.1/32:{}\"]\n",
            echo.port()
        ),
    );
    let opts = options(&gw, &pki);

    // Wrong password: the RFC 1929 failure reply, then the connection closes.
    let (status, mut s) = userpass(&opts, "alice", "not-her-password").await;
    assert_eq!(status, 0x01, "wrong password refused with status 1");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .unwrap();
    // An unknown principal likewise.
    let (status, _) = userpass(&opts, "mallory", "x").await;
    assert_eq!(status, 0x01);

    // Right password: accepted, and the CONNECT goes through with payload both ways.
    let (status, mut s) = userpass(&opts, "alice", "alice-pw").await;
    assert_eq!(status, 0x00, "gateway log: {}", gw.log());
    assert_eq!(connect_code(&mut s, echo).await, 0x00);
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    drop(s);
    let line = gw.audit_line(|l| l["event"] == "connect_end" && l["user"] == format!("krb:alice@{REALM}"));
    assert_eq!(line["method"], "kerberos");
    assert_eq!(line["bytes_up"], 4);
    assert_eq!(line["bytes_down"], 4);
    assert_eq!(line["target"], echo.to_string());

    // Per-user rules key on the principal: bob authenticates, his CONNECT is refused (0x02).
    let (status, mut s) = userpass(&opts, "bob", "bob-pw").await;
    assert_eq!(status, 0x00);
    assert_eq!(connect_code(&mut s, echo).await, 0x02, "bob's deny rule applies");

    // Nothing of the passwords reaches the log.
    let log = gw.log();
    for secret in ["alice-pw", "bob-pw", "not-her-password"] {
        assert!(!log.contains(secret), "{secret} logged: {log}");
    }
}

/// A KDC that is not the realm's (it knows the user's password, here: it chose it) issues
/// tickets the gateway's keytab cannot open: nobody gets in through it.
#[tokio::test]
async fn a_spoofed_kdc_logs_nobody_in() {
    if !have_krb5() {
        return;
    }
    let pki = common::pki();
    let genuine = Realm::new("krb-genuine", false);
    // Same realm name, same user and password, its own service key.
    let spoofed = Realm::new("krb-spoofed", true);
    let gw = Gateway::start_with_keytab(&spoofed, &genuine.keytab(), &pki, "");
    let opts = options(&gw, &pki);
    let (status, _) = userpass(&opts, "alice", "alice-pw").await;
    assert_eq!(
        status,
        0x01,
        "a ticket the keytab cannot open is no login: {}",
        gw.log()
    );
    // The same gateway with the spoofing realm's own key would have let her in: the refusal
    // above is the keytab's doing.
    let trusting = Gateway::start(&spoofed, &pki, "");
    let (status, _) = userpass(&options(&trusting, &pki), "alice", "alice-pw").await;
    assert_eq!(status, 0x00);
}

#[tokio::test]
async fn a_kdc_that_is_down_gives_a_clear_error_and_a_prompt_refusal() {
    if !have_krb5() {
        return;
    }
    let pki = common::pki();
    // The realm exists (the keytab is valid) but no KDC listens on its port.
    let realm = Realm::new("krb-down", false);
    let gw = Gateway::start(&realm, &pki, "");
    let opts = options(&gw, &pki);
    let t0 = Instant::now();
    let (status, _) = userpass(&opts, "alice", "alice-pw").await;
    let took = t0.elapsed();
    assert_eq!(status, 0x01, "refused with the RFC 1929 failure reply");
    assert!(took < Duration::from_secs(5), "refusal took {took:?}");
    let until = Instant::now() + WAIT;
    while !gw.log().contains("no KDC answered") {
        assert!(Instant::now() < until, "no clear log line: {}", gw.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!gw.log().contains("alice-pw"));
}

/// A KDC that accepts connections and never answers: the check cannot finish, yet the
/// client still gets the failure reply before the handshake deadline, not a silent close.
#[tokio::test]
async fn a_kdc_that_never_answers_still_gets_the_failure_reply_in_time() {
    if !have_krb5() {
        return;
    }
    let pki = common::pki();
    let realm = Realm::new("krb-hung", false);
    let tcp = TcpListener::bind(("127.0.0.1", realm.port)).unwrap();
    let _udp = UdpSocket::bind(("127.0.0.1", realm.port)).unwrap();
    tcp.set_nonblocking(true).unwrap();
    let holder = std::thread::spawn(move || {
        // Holds every connection open, silent, for a bounded time.
        let mut held = Vec::new();
        let until = Instant::now() + Duration::from_secs(7);
        while Instant::now() < until {
            if let Ok((c, _)) = tcp.accept() {
                held.push(c);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        held.len()
    });
    // The checks end 500 ms before the 5 s deadline: the reply is due between the two.
    let gw = Gateway::start(&realm, &pki, "handshake_timeout = \"5s\"\n");
    let opts = options(&gw, &pki);
    let t0 = Instant::now();
    let (status, _) = userpass(&opts, "alice", "alice-pw").await;
    let took = t0.elapsed();
    assert_eq!(
        status,
        0x01,
        "a failure reply, not a closed connection: {}",
        gw.log()
    );
    assert!(
        took < Duration::from_secs(5),
        "answered after {took:?}, past the deadline"
    );
    assert!(
        took >= Duration::from_millis(4000),
        "answered after {took:?}: did it ask the KDC?"
    );
    assert!(holder.join().unwrap() >= 1, "the gateway never reached the KDC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shim_authenticates_with_kinit_tickets_over_gssapi() {
    if !have_krb5() {
        return;
    }
    let pki = common::pki();
    let realm = Realm::new("krb-gss", true);
    let echo = common::tcp_echo().await;
    let gw = Gateway::start(&realm, &pki, "");
    realm.kinit("alice", "alice-pw");
    std::fs::write(realm.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let udp_echo = common::udp_echo().await;
    let shim = realm
        .command(env!("CARGO_BIN_EXE_sudp"))
        .args(["shim", "--gateway", &gw.control.to_string(), "--ca"])
        .arg(realm.path().join("ca.pem"))
        .args(["--server-name", "localhost", "--gssapi", SERVICE, "--no-socks"])
        .args(["--forward", &format!("tcp:127.0.0.1:0={echo}")])
        .args(["--forward", &format!("udp:127.0.0.1:0={udp_echo}")])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(realm.path().join("shim.log")).unwrap())
        .spawn()
        .unwrap();
    let mut shim = Reaped(shim);
    let lines = lines(&mut shim.0, 2, WAIT);
    let shim_log = || std::fs::read_to_string(realm.path().join("shim.log")).unwrap_or_default();
    assert_eq!(lines.len(), 2, "the shim printed {lines:?}: {}", shim_log());
    let local = |proto: &str| -> SocketAddr {
        let line = lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("forward {proto} ")))
            .unwrap_or_else(|| panic!("no {proto} forward in {lines:?}"));
        line.split(' ').next().unwrap().parse().unwrap()
    };
    // CONNECT (TCP forward) over GSS-API, protection level none.
    let mut c = TcpStream::connect(local("tcp")).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(b"ticket").unwrap();
    let mut back = [0u8; 6];
    let got = c.read_exact(&mut back);
    // Secure UDP (UDP forward) over GSS-API then a credential-less hello.
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut echoed = None;
    for _ in 0..20 {
        u.send_to(b"datagram", local("udp")).unwrap();
        let mut buf = [0u8; 64];
        if let Ok((n, _)) = u.recv_from(&mut buf) {
            echoed = Some(buf[..n].to_vec());
            break;
        }
    }
    drop(shim);
    got.unwrap_or_else(|e| panic!("no echo ({e}): shim: {} gateway: {}", shim_log(), gw.log()));
    assert_eq!(
        echoed.as_deref(),
        Some(&b"datagram"[..]),
        "no UDP echo: shim: {} gateway: {}",
        shim_log(),
        gw.log()
    );
    assert_eq!(&back, b"ticket");
    drop(c);
    let line = gw.audit_line(|l| l["event"] == "connect_end");
    assert_eq!(line["user"], format!("krb:alice@{REALM}"));
    assert_eq!(line["method"], "gssapi");
    assert_eq!(line["bytes_up"], 6);
    assert_eq!(line["bytes_down"], 6);
    // The shim killed, its association ends: one line, secure, the principal's.
    let line = gw.audit_line(|l| l["event"] == "association_end" && l["datagrams_up"].as_u64() > Some(0));
    assert_eq!(line["user"], format!("krb:alice@{REALM}"));
    assert_eq!(line["method"], "gssapi");
    assert_eq!(line["secure"], true);
    assert_eq!(line["targets"][0], udp_echo.to_string());
    let up = line["datagrams_up"].as_u64().unwrap();
    assert!(up >= 1 && line["bytes_up"].as_u64() == Some(8 * up), "{line}");
}

#[tokio::test]
async fn without_tickets_gssapi_is_refused_and_garbage_tokens_get_an_abort() {
    if !have_krb5() {
        return;
    }
    let pki = common::pki();
    let realm = Realm::new("krb-gss-bad", true);
    let gw = Gateway::start(&realm, &pki, "");
    let opts = options(&gw, &pki);
    // A token that is no Kerberos token: the RFC 1961 abort (ver 1, mtyp 0xff), then close.
    let mut s = connect_tls(&opts).await.unwrap();
    s.write_all(&[0x05, 0x01, 0x01]).await.unwrap();
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).await.unwrap();
    assert_eq!(sel, [0x05, 0x01], "GSS-API offered with a keytab");
    s.write_all(&[0x01, 0x01, 0x00, 0x04, 0x60, 0x02, 0x06, 0x00])
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut reply))
        .await
        .unwrap()
        .ok();
    assert_eq!(reply, [0x01, 0xff]);
    // A token length over the bound is refused before it is read: closed without reply.
    let mut s = connect_tls(&opts).await.unwrap();
    s.write_all(&[0x05, 0x01, 0x01]).await.unwrap();
    s.read_exact(&mut sel).await.unwrap();
    s.write_all(&[0x01, 0x01, 0xff, 0xff]).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut reply))
        .await
        .unwrap()
        .ok();
    assert!(reply.is_empty(), "{reply:?}");
}
