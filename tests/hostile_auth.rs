//! Hostile clients against authentication and connection slots (issue 10, items 1, 2, 5, 6):
//!
//! * a flood of 500 concurrent wrong-password clients leaves the gateway binary's peak RSS
//!   under a bound while a legitimate client from another address still logs in quickly;
//! * silent peers from one address cannot take every connection slot, and a silent peer is
//!   dropped after the one handshake deadline, not once per phase;
//! * an idle CONNECT tunnel is closed, a busy one is not;
//! * a user name with a line break cannot forge a log line;
//! * a certificate named like a password user does not get that user's rules, and a revoked
//!   client certificate is refused in the handshake.
//!
//! Every address is on loopback; every wait is bounded.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sudp::auth::{hash_password, Method, Users};
use sudp::cert::DevCa;
use sudp::client::{authenticate_plain, request, ClientError, ClientOptions, Control};
use sudp::policy::{Action, Policy, Rule};
use sudp::proto::socks::{Address, Command, ReplyCode};
use sudp::tls::{ClientTlsOptions, ServerTlsOptions, ServerTrust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_sudp");

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sudp-hostile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A TCP connection to `to` from `from` (any port), bounded by [`WAIT`].
async fn tcp_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    tokio::time::timeout(WAIT, socket.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))?
}

/// TLS to the gateway at `to` from source address `from`.
async fn tls_from(from: IpAddr, to: SocketAddr, tls: Arc<rustls::ClientConfig>) -> std::io::Result<Control> {
    let tcp = tcp_from(from, to).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(WAIT, tokio_rustls::TlsConnector::from(tls).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS"))?
}

/// Peak resident set size of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The gateway binary, started on 127.0.0.1 with `users`, its stderr in `log`; returns the
/// child and its control address.
fn spawn_gateway(dir: &std::path::Path, bin: &str, extra: &[&str]) -> (std::process::Child, SocketAddr) {
    let log = std::fs::File::create(dir.join("gateway.log")).unwrap();
    // The flood test may measure another build; the others always run this one.
    let mut child = Process::new(bin)
        .args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--allow",
            "127.0.0.0/8",
            "--log",
            "info",
        ])
        .arg("--cert")
        .arg(dir.join("gateway.pem"))
        .arg("--key")
        .arg(dir.join("gateway.key"))
        .arg("--users")
        .arg(dir.join("users.txt"))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let control = lines.next().expect("control line").unwrap();
    let addr = control.rsplit(' ').next().unwrap().parse().unwrap();
    // Keep stdout open (the gateway prints its relay line next) until the child exits.
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}

/// `sudp cert` into `dir`, a users file with alice, and a client TLS config trusting the CA.
fn setup(dir: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let out = Process::new(BIN)
        .args(["cert", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = format!("alice:{}\n", hash_password(b"correct horse").unwrap());
    std::fs::write(dir.join("users.txt"), line).unwrap();
    let ca = sudp::tls::load_certs(&dir.join("ca.pem")).unwrap();
    sudp::tls::client_config(ClientTlsOptions {
        trust: ServerTrust::Ca(ca),
        client_auth: None,
        allow_tls12: false,
    })
    .unwrap()
}

/// Bound on the gateway's peak RSS under the flood, MiB. Measured (debug build, 2 shared
/// vCPUs): 34 MiB at rest, about 67 MiB peak under this flood; the code before the limits
/// peaked at 2.0 GiB with 16 such clients and 3.3 GiB with 64 (every attempt ran its own
/// Argon2, 19 MiB each, on the blocking pool, and the allocator kept the memory).
const RSS_BOUND_MIB: u64 = 100;
/// Bound on a legitimate login during the flood.
const LOGIN_BOUND: Duration = Duration::from_secs(5);

/// 500 concurrent wrong-password clients from 127.0.0.1 (RFC 1929 over TLS, half of them with
/// names that do not exist), each retrying as soon as it is refused; meanwhile alice logs in
/// from 127.0.0.2 and relays through CONNECT.
///
/// `SUDP_HOSTILE_BIN` and `SUDP_HOSTILE_CLIENTS` override the binary and the number of clients,
/// to measure another build (an older binary without `--max-connections-per-ip` is run without
/// it); the assertions hold for this build only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_flood_keeps_memory_bounded_and_a_legitimate_client_gets_in() {
    let dir = tempdir("flood");
    let tls = setup(&dir);
    let other_bin = std::env::var("SUDP_HOSTILE_BIN").ok();
    let clients: usize = std::env::var("SUDP_HOSTILE_CLIENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(500);
    let (mut child, gw) = match &other_bin {
        Some(bin) => spawn_gateway(&dir, bin, &[]),
        // All 500 must reach authentication: the per-source cap has its own test.
        None => spawn_gateway(&dir, BIN, &["--max-connections-per-ip", "1000"]),
    };
    let pid = child.id();
    let baseline = peak_rss_kib(pid);
    let echo = tcp_echo().await;

    let stop = Arc::new(AtomicBool::new(false));
    let (refused, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let flood_started = Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..clients {
        let (tls, stop, refused, errors) = (tls.clone(), stop.clone(), refused.clone(), errors.clone());
        flood.spawn(async move {
            let user = if i % 2 == 0 {
                "alice".to_owned()
            } else {
                format!("nobody{i}")
            };
            // Bounded in count and time.
            for round in 0..50 {
                if stop.load(Ordering::Relaxed) || flood_started.elapsed() > Duration::from_secs(40) {
                    break;
                }
                let attempt = async {
                    let mut c = tls_from([127, 0, 0, 1].into(), gw, tls.clone()).await?;
                    let pass = format!("wrong-{i}-{round}");
                    authenticate_plain(&mut c, Some((&user, &pass))).await
                };
                match tokio::time::timeout(Duration::from_secs(15), attempt).await {
                    Ok(Err(ClientError::AuthFailed)) => refused.fetch_add(1, Ordering::Relaxed),
                    Ok(Ok(())) => panic!("a wrong password was accepted"),
                    _ => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }

    // Let the flood build up, then log in from another address.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let login = async {
        let mut c = tls_from([127, 0, 0, 2].into(), gw, tls.clone()).await?;
        authenticate_plain(&mut c, Some(("alice", "correct horse"))).await?;
        let took = started.elapsed();
        request(&mut c, Command::Connect, &Address::Ip(echo)).await?;
        c.write_all(b"legit").await?;
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"legit");
        Ok::<_, ClientError>(took)
    };
    let took = tokio::time::timeout(WAIT * 2, login)
        .await
        .expect("legitimate login timed out")
        .expect("legitimate login failed");
    // Keep the flood up a little longer, then stop it and read the peak.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peak = peak_rss_kib(pid);
    if std::env::var("SUDP_HOSTILE_DEBUG").is_ok() {
        let mut names = std::collections::BTreeMap::<String, usize>::new();
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let comm = std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap_or_default();
            *names.entry(comm.trim().to_owned()).or_default() += 1;
        }
        eprintln!("threads: {names:?}");
        let _ = Process::new("sh").arg("-c").arg(format!("grep -E 'Rss|Anon' /proc/{pid}/smaps_rollup; awk '/^[0-9a-f]/{{r=$0}} /^Rss:/{{if ($2>8000) print $2, r}}' /proc/{pid}/smaps")).status();
    }
    stop.store(true, Ordering::Relaxed);
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        while flood.join_next().await.is_some() {}
    })
    .await;
    let peak = peak.max(peak_rss_kib(pid));
    let status = terminate(&mut child, "gateway");
    let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap();
    eprintln!(
        "clients={clients} baseline={} KiB peak={} KiB login={took:?} refused={} errors={}",
        baseline,
        peak,
        refused.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );
    assert!(drained.is_ok(), "flood did not stop");
    if other_bin.is_some() {
        return;
    }
    assert!(status.success(), "{status}");
    assert!(
        peak < RSS_BOUND_MIB * 1024,
        "peak RSS {} MiB >= {RSS_BOUND_MIB} MiB",
        peak / 1024
    );
    assert!(took < LOGIN_BOUND, "legitimate login took {took:?}");
    assert!(
        refused.load(Ordering::Relaxed) >= clients as u64,
        "every flood client was refused at least once"
    );
    // The source was rate-limited, and that was logged (rate-limited itself).
    let limited = log.lines().filter(|l| l.contains("rate-limited")).count();
    assert!(limited >= 1, "{log}");
    assert!(limited < 100, "rate-limited lines not rate-limited: {limited}");
    assert!(
        !log.contains("correct horse") && !log.contains("wrong-"),
        "password in the log"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A user name carrying a line break and a fake log line produces exactly one log line, at
/// info level, with the break escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_name_cannot_forge_a_log_line() {
    let dir = tempdir("forge");
    let tls = setup(&dir);
    let (mut child, gw) = spawn_gateway(&dir, BIN, &[]);
    let fake = "2026-12-01T00:00:00.000000Z  INFO sudp::gateway: FORGED login ok user=root";
    let name = format!("mallory\n{fake}");
    let mut c = tls_from([127, 0, 0, 1].into(), gw, tls).await.unwrap();
    let r = tokio::time::timeout(WAIT, authenticate_plain(&mut c, Some((&name, "pw")))).await;
    assert!(matches!(r, Ok(Err(ClientError::AuthFailed))), "{r:?}");
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(terminate(&mut child, "gateway").success());
    let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("FORGED") || l.contains("mallory"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    let line = lines[0];
    assert!(
        line.contains(" INFO ") && line.contains("authentication failed"),
        "{line}"
    );
    assert!(line.contains("\"mallory\\n2026-12-01T00:00:00.000000Z"), "{line}");
    assert!(
        !log.lines().any(|l| l.starts_with("2026-12-01T00:00:00")),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// With 4 slots and 2 per source, 20 silent peers from 127.0.0.1 leave room for a client from
/// 127.0.0.2, which gets in well before any silent peer's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_from_one_source_cannot_take_every_slot() {
    let pki = pki();
    let mut s = settings(&pki);
    s.max_connections = 4;
    s.max_connections_per_ip = 2;
    s.handshake_timeout = Duration::from_secs(4);
    let gw = TestGateway::start(s).await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        // Some may be refused or closed at once: that is the cap at work.
        if let Ok(t) = tcp_from([127, 0, 0, 1].into(), gw.control).await {
            silent.push(t);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let login = async {
        let mut c = tls_from([127, 0, 0, 2].into(), gw.control, client_tls(&pki, false)).await?;
        authenticate_plain(&mut c, None).await?;
        Ok::<_, ClientError>(())
    };
    tokio::time::timeout(WAIT, login)
        .await
        .expect("in time")
        .expect("login");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "waited for a silent peer's slot: {took:?}"
    );
    assert!(gw.metrics.connections_over_source_cap.load(Ordering::Relaxed) >= 10);
    drop(silent);
    gw.stop().await;
}

/// A peer that takes most of the deadline for its TLS handshake and then says nothing is
/// dropped at the one deadline (counted from the accept), not a fresh one after TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_then_silent_peer_is_dropped_after_one_deadline() {
    let pki = pki();
    let mut s = settings(&pki);
    let deadline = Duration::from_millis(1500);
    s.handshake_timeout = deadline;
    let gw = TestGateway::start(s).await;
    let started = Instant::now();
    let tcp = tcp_from([127, 0, 0, 1].into(), gw.control).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client_tls(&pki, false))
        .connect(name, tcp)
        .await
        .unwrap();
    // Silent now: wait for the gateway to close.
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(WAIT, tls.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let took = started.elapsed();
    assert!(took >= deadline - Duration::from_millis(100), "{took:?}");
    assert!(
        took < deadline + Duration::from_millis(600),
        "dropped after {took:?}, not at one deadline"
    );
    gw.stop().await;
}

/// A CONNECT tunnel closes after `connect_idle_timeout` without traffic and stays open while
/// bytes move (either way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connect_tunnels_are_closed() {
    let pki = pki();
    let mut s = settings(&pki);
    s.connect_idle_timeout = Duration::from_millis(600);
    let gw = TestGateway::start(s).await;
    let echo = tcp_echo().await;
    let mut c = sudp::client::connect_tcp(&gw.options(&pki), &Address::Ip(echo))
        .await
        .unwrap();
    // Busy for 1.5 s (a byte every 200 ms): still open.
    let mut buf = [0u8; 1];
    for _ in 0..8 {
        c.write_all(b"x").await.unwrap();
        tokio::time::timeout(WAIT, c.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Idle: closed after about the timeout.
    let started = Instant::now();
    let r = tokio::time::timeout(WAIT, c.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    gw.stop().await;
}

fn allow(cidr: &str) -> Rule {
    Rule::parse(Action::Allow, cidr).unwrap()
}

/// A dev CA that keeps its key, a gateway certificate, and clients `ops`, `svc` and a revoked
/// `gone`.
struct Pki {
    ca: DevCa,
    gateway: (String, String),
    ops: sudp::cert::Issued,
    svc: sudp::cert::Issued,
    gone: sudp::cert::Issued,
}

fn pki_with_crl() -> Pki {
    let mut ca = DevCa::new().unwrap();
    let gateway = ca.gateway(&[]).unwrap();
    let ops = ca.client("ops").unwrap();
    let svc = ca.client("svc").unwrap();
    let gone = ca.client("gone").unwrap();
    Pki {
        ca,
        gateway,
        ops,
        svc,
        gone,
    }
}

fn client_with(p: &Pki, cert: Option<&sudp::cert::Issued>) -> Arc<rustls::ClientConfig> {
    sudp::tls::client_config(ClientTlsOptions {
        trust: ServerTrust::Ca(vec![p.ca.ca_der()]),
        client_auth: cert.map(|c| (c.chain(), c.key())),
        allow_tls12: false,
    })
    .unwrap()
}

async fn gateway_with_crl(p: &Pki, policy: Policy) -> TestGateway {
    let crl = p.ca.crl(&[p.gone.serial]).unwrap();
    let tls = sudp::tls::server_config(ServerTlsOptions {
        cert_chain: sudp::tls::parse_certs(p.gateway.0.as_bytes(), "gw").unwrap(),
        key: sudp::tls::parse_key(p.gateway.1.as_bytes(), "gw").unwrap(),
        client_ca: Some(vec![p.ca.ca_der()]),
        require_client_cert: false,
        client_crls: sudp::tls::parse_crls(crl.as_bytes(), "crl").unwrap(),
        allow_tls12: false,
    })
    .unwrap();
    let pki = common::pki();
    let mut s = settings(&pki);
    s.tls = tls;
    s.auth.no_auth = false;
    let line = format!("ops:{}\n", hash_password(b"ops-pass").unwrap());
    s.auth.users = Some(Arc::new(Users::parse(&line, "test").unwrap()));
    s.policy = Arc::new(policy);
    TestGateway::start(s).await
}

/// CONNECT to `target` as the client `tls` makes, with optional password; the reply code.
async fn connect_code(
    gw: &TestGateway,
    tls: Arc<rustls::ClientConfig>,
    pass: Option<(&str, &str)>,
    target: SocketAddr,
) -> Result<(), ClientError> {
    let mut opts = ClientOptions::new(gw.control, "localhost", tls);
    opts.credentials = pass.map(|(u, p)| (u.to_owned(), p.to_owned()));
    let mut c = sudp::client::connect_tls(&opts).await?;
    authenticate_plain(&mut c, pass).await?;
    request(&mut c, Command::Connect, &Address::Ip(target))
        .await
        .map(drop)
}

/// The default policy denies loopback; `[users_policy.ops]` allows it for the password user
/// `ops` only, `[users_policy."cert:svc"]` for the certificate `svc`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_identities_do_not_share_the_password_namespace() {
    let p = pki_with_crl();
    let users = HashMap::from([
        ("ops".to_owned(), vec![allow("127.0.0.0/8")]),
        ("cert:svc".to_owned(), vec![allow("127.0.0.0/8")]),
    ]);
    let gw = gateway_with_crl(&p, Policy::new(vec![], users)).await;
    let echo = tcp_echo().await;
    // The password user ops gets its rules.
    connect_code(&gw, client_with(&p, None), Some(("ops", "ops-pass")), echo)
        .await
        .unwrap();
    // A certificate named ops does not.
    let r = connect_code(&gw, client_with(&p, Some(&p.ops)), None, echo).await;
    assert!(
        matches!(r, Err(ClientError::Refused(ReplyCode::NotAllowed))),
        "{r:?}"
    );
    // A certificate gets the rules of its own `cert:` key.
    connect_code(&gw, client_with(&p, Some(&p.svc)), None, echo)
        .await
        .unwrap();
    // The password wins over the certificate when a client gives both.
    connect_code(
        &gw,
        client_with(&p, Some(&p.ops)),
        Some(("ops", "ops-pass")),
        echo,
    )
    .await
    .unwrap();
    // Nobody can claim a certificate identity with a password.
    let r = connect_code(&gw, client_with(&p, None), Some(("cert:svc", "x")), echo).await;
    assert!(matches!(r, Err(ClientError::AuthFailed)), "{r:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_client_certificates_are_refused_in_the_handshake() {
    let p = pki_with_crl();
    let users = HashMap::from([("cert:gone".to_owned(), vec![allow("127.0.0.0/8")])]);
    let gw = gateway_with_crl(&p, Policy::new(vec![allow("127.0.0.0/8")], users)).await;
    let echo = tcp_echo().await;
    connect_code(&gw, client_with(&p, Some(&p.svc)), None, echo)
        .await
        .unwrap();
    let r = connect_code(&gw, client_with(&p, Some(&p.gone)), None, echo).await;
    // RFC 8446 §6.2: the alert `certificate_revoked`.
    assert!(
        matches!(&r, Err(ClientError::Io(e)) if alert(e) == Some(rustls::AlertDescription::CertificateRevoked)),
        "a revoked certificate got through: {r:?}"
    );
    assert!(
        !matches!(r, Err(ClientError::Refused(_))),
        "refused only at the request: {r:?}"
    );
    common::eventually(|| gw.metrics.auth_failures_by(Method::Certificate) == 1).await;
    gw.stop().await;
}

/// A `no_auth` gateway accepts every client, also one that sends credentials (RFC 1929 only,
/// or the sudp hello with a name): unchecked, so the client stays anonymous and the rules of
/// the name it claimed do not apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_auth_accepts_credentials_as_anonymous() {
    let pki = pki();
    let mut s = settings(&pki);
    let users = HashMap::from([(
        "alice".to_owned(),
        vec![Rule::parse(Action::Deny, "127.0.0.0/8").unwrap()],
    )]);
    s.policy = Arc::new(Policy::new(vec![allow("127.0.0.0/8")], users));
    let gw = TestGateway::start(s).await;
    let echo = tcp_echo().await;
    let mut c = sudp::client::connect_tls(&gw.options(&pki)).await.unwrap();
    authenticate_plain(&mut c, Some(("alice", "anything")))
        .await
        .unwrap();
    request(&mut c, Command::Connect, &Address::Ip(echo))
        .await
        .unwrap();
    drop(c);
    let mut o = gw.options(&pki);
    o.credentials = Some(("alice".into(), "anything".into()));
    let udp = sudp::client::SecureUdp::connect(&o).await.unwrap();
    drop(udp);
    assert_eq!(gw.metrics.auth_failures.load(Ordering::Relaxed), 0);
    gw.stop().await;
}

/// The TLS alert the peer sent, when `e` is one (rustls reports it inside an I/O error).
fn alert(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}
