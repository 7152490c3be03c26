//! Delegated inspection and end-to-end classes (docs/DELEGATION.md, PROTOCOL.md §2.8), with
//! real clients: curl with SSLKEYLOGFILE through the shim's SOCKS5 port to a local HTTPS
//! origin (rustls, HTTP/1.1 keep-alive), and a Rust client that delegates by hand to check
//! the session rules. Everything runs on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use sudp::audit::AuditLog;
use sudp::gateway::delegation::E2e;
use sudp::net::channel::{Channel, Event, Heartbeat};
use sudp::proto::frame::{feature, DelegateStatus, Frame, Secret};
use sudp::proto::socks::Address;
use sudp::shim::{GatewayEndpoint, Shim, ShimSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::timeout;

// --- Harness -------------------------------------------------------------------------------

/// The body the origin serves for `path`: deterministic, a few KiB.
fn body_for(path: &str) -> Vec<u8> {
    let n = 1000 + path.len() * 333;
    (0..n)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[(i * 7 + path.len()) % 36])
        .collect()
}

/// An HTTPS origin on 127.0.0.1 (rustls, ALPN http/1.1, keep-alive): `/missing` is a 404,
/// `/chunked` is sent chunked, any other path gets [`body_for`] with a Content-Length.
async fn https_origin(pki: &sudp::cert::DevPki) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pki.gateway_chain(), pki.gateway_key())
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let close = head.to_ascii_lowercase().contains("connection: close");
                    let out = match path.as_str() {
                        "/missing" => {
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n".to_vec()
                        }
                        "/chunked" => {
                            let b = body_for(&path);
                            let mut o = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                            for c in b.chunks(700) {
                                o.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                                o.extend_from_slice(c);
                                o.extend_from_slice(b"\r\n");
                            }
                            o.extend_from_slice(b"0\r\n\r\n");
                            o
                        }
                        _ => {
                            let b = body_for(&path);
                            let mut o = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b.len())
                                .into_bytes();
                            o.extend_from_slice(&b);
                            o
                        }
                    };
                    if s.write_all(&out).await.is_err() || s.flush().await.is_err() {
                        return;
                    }
                    if close {
                        let _ = s.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

struct TestShim {
    socks: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestShim {
    async fn start(pki: &sudp::cert::DevPki, gateway: SocketAddr, keylog: Option<&Path>) -> TestShim {
        let mut s = ShimSettings::new(
            vec![GatewayEndpoint::new(Address::Ip(gateway))],
            client_tls(pki, false),
        );
        s.connect_timeout = Duration::from_secs(3);
        s.delegate_keylog = keylog.map(Path::to_owned);
        let shim = Shim::bind(s).await.unwrap();
        let socks = shim.socks_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(shim.run(async move {
            let _ = rx.await;
        }));
        TestShim {
            socks,
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            timeout(WAIT, t).await.unwrap().unwrap().unwrap();
        }
    }
}

impl Drop for TestShim {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A gateway allowing loopback, with an audit log at `audit` if given, and `e2e` classes.
async fn gateway(
    pki: &sudp::cert::DevPki,
    audit: Option<&Path>,
    e2e: &[&str],
    e2e_ttl: Duration,
) -> TestGateway {
    let mut s = settings(pki);
    s.audit = AuditLog::from_option(audit).unwrap();
    s.e2e = E2e::parse(&e2e.iter().map(|e| e.to_string()).collect::<Vec<_>>()).unwrap();
    s.e2e_ttl = e2e_ttl;
    TestGateway::start(s).await
}

/// Runs curl through the SOCKS5 proxy `socks` with SSLKEYLOGFILE `keylog`; returns stdout.
async fn curl(socks: SocketAddr, ca: &Path, keylog: &Path, urls: &[String]) -> Vec<u8> {
    let mut args: Vec<String> = vec![
        "--silent".into(),
        "--show-error".into(),
        "--max-time".into(),
        "20".into(),
        "--cacert".into(),
        ca.display().to_string(),
        "--socks5-hostname".into(),
        socks.to_string(),
    ];
    args.extend(urls.iter().cloned());
    let child = std::process::Command::new("curl")
        .args(&args)
        .env("SSLKEYLOGFILE", keylog)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl runs");
    let out = tokio::task::spawn_blocking(move || output_within(child, Duration::from_secs(25), "curl"))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The audit log's lines (JSON).
fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn events<'a>(lines: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|l| l["event"] == event).collect()
}

/// Waits until the audit log holds at least `n` lines of `event`.
async fn wait_lines(path: &Path, event: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let lines = audit_lines(path);
        if events(&lines, event).len() >= n {
            return lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "audit log: fewer than {n} `{event}` lines:\n{}",
            std::fs::read_to_string(path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- curl through the shim -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_a_delegating_shim_is_audited_per_request_and_byte_exact() {
    if !have_curl() {
        return;
    }
    let pki = pki();
    let dir = TempDir::new("deleg-curl");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let origin = https_origin(&pki).await;
    let url = |p: &str| format!("https://127.0.0.1:{}{p}", origin.port());
    let paths = ["/one", "/two?x=1", "/missing", "/chunked"];
    let urls: Vec<String> = paths.iter().map(|p| url(p)).collect();
    let mut expected = Vec::new();
    for p in paths {
        expected.extend(if p == "/missing" {
            b"not found\n".to_vec()
        } else {
            body_for(p)
        });
    }

    // Without delegation: curl writes its key log, the shim does not follow it, and the
    // gateway (with an audit log) writes no http line.
    let plain_audit = dir.path().join("plain.jsonl");
    let gw = gateway(&pki, Some(&plain_audit), &[], Duration::from_secs(60)).await;
    let shim = TestShim::start(&pki, gw.control, None).await;
    let plain = curl(shim.socks, &ca, &dir.path().join("plain-keys.log"), &urls).await;
    assert!(plain == expected, "curl's bytes without delegation");
    let lines = wait_lines(&plain_audit, "connect_end", 1).await;
    assert!(events(&lines, "http").is_empty(), "{lines:?}");
    assert!(events(&lines, "tunnel_inspected").is_empty());
    assert_eq!(
        gw.metrics
            .tunnels_inspected
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    shim.stop().await;
    gw.stop().await;

    // With delegation: four paths over one connection, then two more connections.
    let audit = dir.path().join("audit.jsonl");
    let keylog = dir.path().join("keys.log");
    let gw = gateway(&pki, Some(&audit), &[], Duration::from_secs(60)).await;
    let shim = TestShim::start(&pki, gw.control, Some(&keylog)).await;
    // The shim's control session is open before the first tunnel (the gateway taps only
    // the tunnels of a user who delegates).
    eventually(|| {
        gw.metrics
            .control_sessions_active
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    let got = curl(shim.socks, &ca, &keylog, &urls).await;
    assert!(got == plain, "curl's bytes differ with delegation");
    for p in ["/three", "/four"] {
        assert!(curl(shim.socks, &ca, &keylog, &[url(p)]).await == body_for(p));
    }
    let lines = wait_lines(&audit, "http", 6).await;
    let http = events(&lines, "http");
    let seen: Vec<(String, u64, u64)> = http
        .iter()
        .map(|l| {
            (
                l["path"].as_str().unwrap().to_owned(),
                l["status"].as_u64().unwrap(),
                l["response_body"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64, u64)> = ["/one", "/two?x=1", "/missing", "/chunked", "/three", "/four"]
        .iter()
        .map(|p| {
            let status = if *p == "/missing" { 404 } else { 200 };
            let size = if *p == "/missing" {
                10
            } else {
                body_for(p).len() as u64
            };
            (p.to_string(), status, size)
        })
        .collect();
    // Tunnels are audited when their secrets come, so lines of different tunnels may
    // interleave in any order; within one tunnel they are in request order.
    let (mut seen_sorted, mut want_sorted) = (seen.clone(), want.clone());
    seen_sorted.sort();
    want_sorted.sort();
    assert_eq!(seen_sorted, want_sorted);
    let first_source = http
        .iter()
        .find(|l| l["path"] == "/one")
        .map(|l| l["source"].clone())
        .unwrap();
    let first: Vec<_> = seen
        .iter()
        .zip(&http)
        .filter(|(_, l)| l["source"] == first_source)
        .map(|(s, _)| s.clone())
        .collect();
    assert_eq!(first, want[..4]);
    for l in &http {
        assert_eq!(l["method"], "GET");
        assert_eq!(l["user"], "anonymous");
        assert_eq!(l["target"], format!("127.0.0.1:{}", origin.port()));
        assert_eq!(l["request_body"], 0);
    }
    let lines = wait_lines(&audit, "tunnel_inspected", 3).await;
    let inspected = events(&lines, "tunnel_inspected");
    // One line per tunnel, written when it ends: in any order. The first tunnel (the
    // connection that fetched four paths) is the one from the first request's source.
    assert_eq!(inspected.len(), 3, "{inspected:?}");
    let first_tunnel = inspected
        .iter()
        .find(|l| l["source"] == first_source)
        .unwrap_or_else(|| panic!("no tunnel_inspected line from {first_source}: {inspected:?}"));
    assert_eq!(first_tunnel["protocol"], "http/1.1");
    assert_eq!(first_tunnel["requests"], 4);
    for l in &inspected {
        assert!(l["suite"].as_str().unwrap().starts_with("TLS_"), "{l}");
        let want = if l["source"] == first_source { 4 } else { 1 };
        assert_eq!(l["requests"], want, "{l}");
    }
    // Nothing secret in the log: no line carries a key log secret.
    let text = std::fs::read_to_string(&audit).unwrap();
    for l in std::fs::read_to_string(&keylog).unwrap().lines() {
        let secret = l.rsplit(' ').next().unwrap();
        assert!(!text.contains(secret), "a secret leaked into the audit log");
    }
    println!("audit log of the curl run:\n{text}");
    assert!(gw.metrics.delegations(DelegateStatus::Accepted) >= 3);
    shim.stop().await;
    eventually(|| {
        gw.metrics
            .delegation_secrets_held
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    })
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_e2e_origin_is_never_audited_even_when_secrets_are_offered() {
    if !have_curl() {
        return;
    }
    let pki = pki();
    let dir = TempDir::new("deleg-e2e");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let origin = https_origin(&pki).await;
    let audit = dir.path().join("audit.jsonl");
    let keylog = dir.path().join("keys.log");
    // By name: `localhost` and its subdomains are end to end.
    let gw = gateway(&pki, Some(&audit), &["localhost"], Duration::from_secs(60)).await;
    let shim = TestShim::start(&pki, gw.control, Some(&keylog)).await;
    eventually(|| {
        gw.metrics
            .control_sessions_active
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    let url = format!("https://localhost:{}/secret", origin.port());
    let got = curl(shim.socks, &ca, &keylog, &[url]).await;
    assert!(got == body_for("/secret"));
    let lines = wait_lines(&audit, "delegation_refused", 1).await;
    let refused = events(&lines, "delegation_refused");
    assert_eq!(refused[0]["reason"], "end_to_end");
    assert_eq!(refused[0]["target"], format!("\"localhost\":{}", origin.port()));
    wait_lines(&audit, "connect_end", 1).await;
    let lines = audit_lines(&audit);
    assert!(events(&lines, "http").is_empty(), "{lines:?}");
    assert!(events(&lines, "tunnel_inspected").is_empty());
    assert_eq!(gw.metrics.delegations(DelegateStatus::EndToEnd), 1);
    assert_eq!(gw.metrics.delegations(DelegateStatus::Accepted), 0);
    shim.stop().await;
    gw.stop().await;
}

// --- The session rules, by hand ------------------------------------------------------------

/// Secrets a rustls client logs.
#[derive(Debug, Default)]
struct Keys(Mutex<Vec<(String, Vec<u8>)>>);

impl rustls::KeyLog for Keys {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        self.0.lock().unwrap().push((label.to_owned(), secret.to_vec()));
    }
}

impl Keys {
    /// The DELEGATE body's secrets: CLIENT_HS, SERVER_HS, CLIENT_APP_0, SERVER_APP_0.
    fn delegate_body(&self) -> Vec<u8> {
        let v = self.0.lock().unwrap();
        let mut out = Vec::new();
        for l in [
            "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
            "SERVER_HANDSHAKE_TRAFFIC_SECRET",
            "CLIENT_TRAFFIC_SECRET_0",
            "SERVER_TRAFFIC_SECRET_0",
        ] {
            out.extend_from_slice(&v.iter().find(|(n, _)| n == l).unwrap().1);
        }
        out
    }
}

/// A control session; returns once the gateway's HELLO arrived (the gateway registers the
/// session before it sends its HELLO).
async fn control(gw: &TestGateway, pki: &sudp::cert::DevPki) -> Channel<sudp::client::Control> {
    let c = sudp::client::connect_control(&gw.options(pki)).await.unwrap();
    let mut ch = Channel::open(c, Heartbeat::OFF, &[feature::DELEGATION]);
    match timeout(WAIT, ch.next()).await.unwrap().unwrap() {
        Event::Hello(h) => assert!(h.has(feature::DELEGATION)),
        other => panic!("first frame: {other:?}"),
    }
    ch
}

/// Sends one DELEGATE and returns the gateway's verdict.
async fn delegate(ch: &mut Channel<sudp::client::Control>, tag: [u8; 16], body: &[u8]) -> DelegateStatus {
    ch.send(&Frame::Delegate {
        tag,
        secrets: Secret(body),
    })
    .unwrap();
    loop {
        match timeout(WAIT, ch.next()).await.unwrap().unwrap() {
            Event::DelegateReply { tag: t, status } if t == tag => return status,
            _ => {}
        }
    }
}

async fn get(tls: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin), path: &str) -> Vec<u8> {
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let want = body_for(path);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(&want) {
        let n = timeout(WAIT, tls.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "origin closed");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_binds_to_its_first_session_and_forgets_its_secrets_with_it() {
    let pki = pki();
    let dir = TempDir::new("deleg-rules");
    let audit = dir.path().join("audit.jsonl");
    let origin = https_origin(&pki).await;
    let gw = gateway(&pki, Some(&audit), &[], Duration::from_secs(60)).await;
    let held = || {
        gw.metrics
            .delegation_secrets_held
            .load(std::sync::atomic::Ordering::Relaxed)
    };

    let mut a = control(&gw, &pki).await;
    let tunnel = sudp::client::connect_tcp(&gw.options(&pki), &Address::Ip(origin))
        .await
        .unwrap();
    let tag = sudp::client::tunnel_tag(&tunnel).unwrap();
    let keys = Arc::new(Keys::default());
    let mut cfg = (*client_tls(&pki, false)).clone();
    cfg.key_log = keys.clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tunnel)
        .await
        .unwrap();
    get(&mut tls, "/before").await;
    let body = keys.delegate_body();

    // An unknown tag, then the real one: accepted, and the buffered exchange is audited.
    assert_eq!(
        delegate(&mut a, [0xEE; 16], &body).await,
        DelegateStatus::UnknownTunnel
    );
    assert_eq!(delegate(&mut a, tag, &body).await, DelegateStatus::Accepted);
    let lines = wait_lines(&audit, "http", 1).await;
    assert_eq!(events(&lines, "http")[0]["path"], "/before");
    eventually(|| held() == 1).await;
    get(&mut tls, "/during").await;
    wait_lines(&audit, "http", 2).await;

    // Another session naming the same tunnel is refused and counted, and said in the log.
    let mut b = control(&gw, &pki).await;
    assert_eq!(delegate(&mut b, tag, &body).await, DelegateStatus::OtherSession);
    assert_eq!(delegate(&mut a, tag, &body).await, DelegateStatus::Duplicate);
    assert_eq!(gw.metrics.delegations(DelegateStatus::OtherSession), 1);
    let lines = wait_lines(&audit, "delegation_refused", 3).await;
    let reasons: Vec<_> = events(&lines, "delegation_refused")
        .iter()
        .map(|l| l["reason"].clone())
        .collect();
    assert_eq!(reasons, ["unknown_tunnel", "other_session", "duplicate"]);
    assert_eq!(held(), 1);

    // The delegating session closes: the secrets go at once, the tunnel lives on, opaque.
    a.close().await;
    eventually(|| held() == 0).await;
    get(&mut tls, "/after").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = audit_lines(&audit);
    let paths: Vec<_> = events(&lines, "http").iter().map(|l| l["path"].clone()).collect();
    assert_eq!(paths, ["/before", "/during"]);
    drop(tls);
    drop(b);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_audit_log_secrets_are_refused_and_e2e_tunnels_end_at_their_ttl() {
    let pki = pki();
    let origin = https_origin(&pki).await;
    let echo = tcp_echo().await;
    let gw = gateway(&pki, None, &["127.0.0.1/32"], Duration::from_millis(700)).await;
    let mut a = control(&gw, &pki).await;
    let tunnel = sudp::client::connect_tcp(&gw.options(&pki), &Address::Ip(origin))
        .await
        .unwrap();
    let tag = sudp::client::tunnel_tag(&tunnel).unwrap();
    // e2e comes first: the destination is end to end whatever the gateway's audit.
    assert_eq!(delegate(&mut a, tag, &[1u8; 128]).await, DelegateStatus::EndToEnd);
    drop(tunnel);

    // An end-to-end tunnel is relayed byte-exact and closed cleanly at its lifetime.
    let mut t = sudp::client::connect_tcp(&gw.options(&pki), &Address::Ip(echo))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    t.write_all(b"ping through e2e").await.unwrap();
    let mut buf = [0u8; 16];
    t.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping through e2e");
    let mut rest = Vec::new();
    // A clean close: EOF (TLS close_notify), not a reset or a truncation error.
    timeout(WAIT, t.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(rest.is_empty());
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(600) && lived < Duration::from_secs(5),
        "{lived:?}"
    );
    eventually(|| gw.metrics.e2e_expired.load(std::sync::atomic::Ordering::Relaxed) == 1).await;
    gw.stop().await;

    // Not end to end, no audit log: inspection is off.
    let gw = gateway(&pki, None, &[], Duration::from_secs(60)).await;
    let mut a = control(&gw, &pki).await;
    let tunnel = sudp::client::connect_tcp(&gw.options(&pki), &Address::Ip(origin))
        .await
        .unwrap();
    let tag = sudp::client::tunnel_tag(&tunnel).unwrap();
    assert_eq!(
        delegate(&mut a, tag, &[1u8; 128]).await,
        DelegateStatus::InspectionOff
    );
    assert_eq!(
        gw.metrics
            .delegation_secrets_held
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    drop(tunnel);
    gw.stop().await;
}

/// A UDP association to an end-to-end destination ends when that destination answers ICMP
/// port unreachable, and the client is told so (CLOSE 0x06); without end-to-end classes, or
/// from a destination outside them while classes are set (the socket then hears every ICMP
/// error), the same ICMP changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_e2e_destination_that_answers_port_unreachable_ends_the_association() {
    use sudp::client::SecureUdp;
    use sudp::proto::socks::Address;
    let closed = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let pki = pki();
    for classes in [Some("127.0.0.1/32"), None, Some("127.0.0.2/32")] {
        let mut s = settings(&pki);
        if let Some(class) = classes {
            s.e2e = E2e::parse(&[class.to_owned()]).unwrap();
        }
        let e2e = classes == Some("127.0.0.1/32");
        let gw = TestGateway::start(s).await;
        let echo = udp_echo().await;
        let u = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
        u.send_to(b"anyone?", &Address::Ip(closed)).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(3), u.closed())
            .await
            .is_ok();
        if e2e {
            assert!(ended, "the association outlived the port unreachable");
            let why = u.close_reason().unwrap();
            assert!(why.contains("port unreachable"), "{why}");
        } else {
            assert!(!ended, "closed with classes {classes:?}: {:?}", u.close_reason());
            u.send_to(b"still here", &Address::Ip(echo)).await.unwrap();
            let mut buf = vec![0u8; sudp::client::RECORD_BUF];
            let (n, _) = tokio::time::timeout(WAIT, u.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], b"still here");
        }
        gw.stop().await;
    }
}
