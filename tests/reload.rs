//! SIGHUP on real `sudp gateway` and `sudp shim` processes: the gateway reloads its users,
//! policy and certificate while a secure UDP stream and a CONNECT tunnel keep flowing, and
//! keeps the running configuration whole when a file is broken; the shim survives the
//! signal. Also the one line per CONNECT when it ends, and the shim's "connected to
//! gateway" line.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{GatewayProcess, WAIT};
use sudp::client::{connect_tcp, ClientError, ClientOptions, SecureUdp};
use sudp::proto::socks::{Address, ReplyCode};
use sudp::tls::{ClientTlsOptions, ServerTrust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_sudp");

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sudp-reload-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn users_line(name: &str, pass: &str) -> String {
    format!("{name}:{}\n", sudp::auth::hash_password(pass.as_bytes()).unwrap())
}

/// Options for a client trusting the CA in `ca_pem` and logging in as `user`.
fn options(control: SocketAddr, ca_pem: &Path, user: &str, pass: &str) -> ClientOptions {
    let tls = sudp::tls::client_config(ClientTlsOptions {
        trust: ServerTrust::Ca(sudp::tls::load_certs(ca_pem).unwrap()),
        client_auth: None,
        allow_tls12: false,
    })
    .unwrap();
    let mut o = ClientOptions::new(control, "localhost", tls);
    o.credentials = Some((user.to_owned(), pass.to_owned()));
    o.timeout = WAIT;
    o
}

/// `GET /metrics` from the gateway's metrics listener.
fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn policy_denied(metrics: SocketAddr) -> u64 {
    let text = scrape(metrics);
    text.lines()
        .find_map(|l| l.strip_prefix("sudp_gateway_dropped_datagrams_total{reason=\"policy_denied\"} "))
        .unwrap_or_else(|| panic!("no policy_denied counter in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Waits (bounded) until the process's stderr has `n` lines containing `needle`; returns
/// the last of them.
fn wait_for_log(gw: &GatewayProcess, needle: &str, n: usize) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = gw.stderr();
        let hits: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
        if hits.len() >= n {
            return hits[n - 1].to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no {n}th `{needle}` in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `payload` to the echo server `target` and waits for it to come back: 3 s when it
/// should (generous on a loaded machine), 700 ms when a refusal is expected (the policy
/// counter then confirms the drop).
async fn echo_once(udp: &SecureUdp, target: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    echo_within(udp, target, payload, Duration::from_secs(3)).await
}

async fn echo_within(udp: &SecureUdp, target: SocketAddr, payload: &[u8], wait: Duration) -> Option<Vec<u8>> {
    udp.send_to(payload, &Address::Ip(target)).await.unwrap();
    let mut buf = vec![0u8; 2048];
    match tokio::time::timeout(wait, udp.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

async fn connect_refusal(opts: &ClientOptions, target: SocketAddr) -> Option<ReplyCode> {
    match connect_tcp(opts, &Address::Ip(target)).await {
        Ok(_) => None,
        Err(ClientError::Refused(code)) => Some(code),
        Err(e) => panic!("CONNECT to {target} failed otherwise: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_users_policy_and_certificate_without_dropping_a_stream_or_tunnel() {
    let (e1, e2) = (common::udp_echo().await, common::udp_echo().await);
    let (t1, t2) = (common::tcp_echo().await, common::tcp_echo().await);
    let pki = common::pki();
    let dir = tempdir("gw");
    let ca_a = dir.join("ca-a.pem");
    std::fs::write(&ca_a, &pki.ca_pem).unwrap();
    let users = dir.join("users");
    std::fs::write(&users, users_line("alice", "alice-pw")).unwrap();
    let conf = dir.join("gateway.toml");
    let write_conf = |deny: &[SocketAddr]| {
        let deny: Vec<String> = deny.iter().map(|a| format!("\"{a}\"")).collect();
        std::fs::write(
            &conf,
            format!(
                "users = \"{}\"\nallow = [\"127.0.0.0/8\"]\ndeny = [{}]\n",
                users.display(),
                deny.join(", ")
            ),
        )
        .unwrap();
    };
    write_conf(&[]);
    let mut gw = GatewayProcess::start(
        &pki,
        "reload",
        &["--config", conf.to_str().unwrap(), "--metrics", "127.0.0.1:0"],
    );
    let metrics = gw.metrics.unwrap();

    // The old connections: a secure UDP stream and a CONNECT tunnel, both as alice, trusting
    // the first CA. Before the reload both second targets are allowed and bob is nobody.
    let alice = options(gw.control, &ca_a, "alice", "alice-pw");
    let udp = Arc::new(SecureUdp::connect(&alice).await.unwrap());
    // A second old association, for the probes of the second target (the first one's
    // replies belong to the stream task below).
    let probe = SecureUdp::connect(&alice).await.unwrap();
    assert_eq!(
        echo_once(&probe, e2, b"before").await.as_deref(),
        Some(&b"before"[..])
    );
    assert_eq!(connect_refusal(&alice, t2).await, None);
    let mut tunnel = connect_tcp(&alice, &Address::Ip(t1)).await.unwrap();
    let bob_a = options(gw.control, &ca_a, "bob", "bob-pw");
    assert!(matches!(
        SecureUdp::connect(&bob_a).await.err(),
        Some(ClientError::AuthFailed)
    ));

    // Both flow without pause through everything below; every datagram and every chunk
    // must come back (one at a time, so "nothing lost" is exact on loopback).
    let stop = Arc::new(AtomicBool::new(false));
    let (udp_ok, tcp_ok) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stream = tokio::spawn({
        let (udp, stop, ok) = (udp.clone(), stop.clone(), udp_ok.clone());
        async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = format!("dgram {i}");
                let got = echo_once(&udp, e1, p.as_bytes()).await;
                assert_eq!(got.as_deref(), Some(p.as_bytes()), "datagram {i} lost");
                ok.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let tunnel_task = tokio::spawn({
        let (stop, ok) = (stop.clone(), tcp_ok.clone());
        async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = format!("chunk {i:08}");
                tunnel.write_all(p.as_bytes()).await.unwrap();
                let mut back = vec![0u8; p.len()];
                tokio::time::timeout(WAIT, tunnel.read_exact(&mut back))
                    .await
                    .unwrap_or_else(|_| panic!("chunk {i} lost"))
                    .unwrap();
                assert_eq!(back, p.as_bytes());
                ok.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let progressed = |from: (u64, u64)| {
        let (u, t) = (udp_ok.clone(), tcp_ok.clone());
        async move {
            let deadline = Instant::now() + WAIT;
            while u.load(Ordering::Relaxed) < from.0 + 20 || t.load(Ordering::Relaxed) < from.1 + 20 {
                assert!(Instant::now() < deadline, "the stream or the tunnel stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    progressed((0, 0)).await;

    // The rewrite: a second user, both second targets denied, a certificate from another
    // `sudp cert` run (another CA).
    let second = dir.join("pki-b");
    let out = std::process::Command::new(BIN)
        .args(["cert", "--out"])
        .arg(&second)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(
        &users,
        users_line("alice", "alice-pw") + &users_line("bob", "bob-pw"),
    )
    .unwrap();
    write_conf(&[e2, t2]);
    std::fs::copy(second.join("gateway.pem"), gw.dir.join("gateway.pem")).unwrap();
    std::fs::copy(second.join("gateway.key"), gw.dir.join("gateway.key")).unwrap();
    let before = (udp_ok.load(Ordering::Relaxed), tcp_ok.load(Ordering::Relaxed));
    gw.signal("HUP");
    let line = wait_for_log(&gw, "configuration reloaded", 1);
    for part in [
        "users 1 -> 2",
        "global rules 1 -> 3",
        "certificate reloaded (changed)",
    ] {
        assert!(line.contains(part), "`{part}` missing from: {line}");
    }
    assert!(!line.contains("needs a restart"), "{line}");
    progressed(before).await;

    // New handshakes get the new certificate: a client trusting only the old CA is turned
    // away, one trusting the new CA logs in as the new user.
    let ca_b = second.join("ca.pem");
    let bob = options(gw.control, &ca_b, "bob", "bob-pw");
    let udp_bob = SecureUdp::connect(&bob).await.unwrap();
    assert_eq!(
        echo_once(&udp_bob, e1, b"bob").await.as_deref(),
        Some(&b"bob"[..])
    );
    let alice_a = options(gw.control, &ca_a, "alice", "alice-pw");
    let r = SecureUdp::connect(&alice_a).await;
    assert!(
        matches!(
            r,
            Err(ClientError::Tls {
                problem: sudp::tls::HandshakeProblem::UntrustedIssuer,
                ..
            })
        ),
        "old CA still trusted: {:?}",
        r.err()
    );

    // The denied destination: refused for the old association's datagrams (counted) and
    // for a new CONNECT (0x02).
    let denied_before = policy_denied(metrics);
    assert_eq!(
        echo_within(&probe, e2, b"after", Duration::from_millis(700)).await,
        None
    );
    assert_eq!(echo_once(&probe, e1, b"e1").await.as_deref(), Some(&b"e1"[..]));
    common::eventually(|| policy_denied(metrics) == denied_before + 1).await;
    assert_eq!(connect_refusal(&bob, t2).await, Some(ReplyCode::NotAllowed));
    assert_eq!(connect_refusal(&bob, t1).await, None);

    // A broken users file (and a policy change beside it): the reload fails as a whole,
    // the log names the file, and everything stays as it was.
    std::fs::write(&users, "this is not a users line\n").unwrap();
    write_conf(&[]);
    let before = (udp_ok.load(Ordering::Relaxed), tcp_ok.load(Ordering::Relaxed));
    gw.signal("HUP");
    let line = wait_for_log(&gw, "reload failed", 1);
    assert!(
        line.contains("`users`") && line.contains(users.to_str().unwrap()),
        "{line}"
    );
    assert!(line.contains("running configuration stays in force"), "{line}");
    assert_eq!(connect_refusal(&bob, t2).await, Some(ReplyCode::NotAllowed));
    let udp_bob2 = SecureUdp::connect(&bob).await.unwrap();
    assert_eq!(
        echo_once(&udp_bob2, e1, b"bob2").await.as_deref(),
        Some(&b"bob2"[..])
    );

    // A config file that does not parse: same.
    std::fs::write(
        &conf,
        format!("users = \"{}\"\nallow = [\"not a rule\"]\n", users.display()),
    )
    .unwrap();
    gw.signal("HUP");
    let line = wait_for_log(&gw, "reload failed", 2);
    assert!(line.contains("not a rule") && line.contains("allow"), "{line}");
    assert_eq!(connect_refusal(&bob, t2).await, Some(ReplyCode::NotAllowed));

    // Another authentication method (client certificates beside users): a restart's job;
    // refused whole, even with the users file fixed and the deny rules gone beside it.
    std::fs::write(
        &users,
        users_line("alice", "alice-pw") + &users_line("bob", "bob-pw"),
    )
    .unwrap();
    std::fs::write(
        &conf,
        format!(
            "users = \"{}\"\nclient_ca = \"{}\"\nallow = [\"127.0.0.0/8\"]\n",
            users.display(),
            ca_a.display()
        ),
    )
    .unwrap();
    gw.signal("HUP");
    let line = wait_for_log(&gw, "reload failed", 3);
    assert!(
        line.contains("`auth` methods changed (users -> users or client certificates): needs a restart"),
        "{line}"
    );
    assert_eq!(connect_refusal(&bob, t2).await, Some(ReplyCode::NotAllowed));
    progressed(before).await;

    stop.store(true, Ordering::Relaxed);
    stream.await.unwrap();
    tunnel_task.await.unwrap();
    eprintln!(
        "through four SIGHUPs (one reload, three refused): {} datagrams and {} tunnel chunks, each echoed",
        udp_ok.load(Ordering::Relaxed),
        tcp_ok.load(Ordering::Relaxed)
    );
    line_count_check(&gw);
    let status = common::terminate(&mut gw.child, "gateway");
    assert!(status.success(), "{status}\n{}", gw.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The one successful reload's line, checking there was only one.
fn line_count_check(gw: &GatewayProcess) -> String {
    let log = gw.stderr();
    let hits: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("configuration reloaded"))
        .collect();
    assert_eq!(hits.len(), 1, "{log}");
    hits[0].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connect_logs_one_line_when_it_ends() {
    let target = common::tcp_echo().await;
    let pki = common::pki();
    let gw = GatewayProcess::start(
        &pki,
        "connect-log",
        &[
            "--no-auth",
            "--allow",
            "127.0.0.0/8",
            "--connect-idle-timeout",
            "1s",
        ],
    );
    let opts = ClientOptions::new(gw.control, "localhost", common::client_tls(&pki, false));

    // EOF both ways, an HTTP GET: a short request up, a 5000-byte body down, then the server
    // closes and so does the client.
    let http = common::http_server(vec![b'x'; 5000]).await;
    let mut s = connect_tcp(&opts, &Address::Ip(http)).await.unwrap();
    let source = s.get_ref().0.local_addr().unwrap();
    let request = b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n";
    s.write_all(request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    assert!(response.len() > 5000);
    s.shutdown().await.unwrap();
    drop(s);
    let line = wait_for_log(&gw, "CONNECT ended", 1);
    for field in [
        "user=anonymous".to_owned(),
        format!("source={source}"),
        format!("target={http}"),
        format!("remote={http}"),
        format!("bytes_up={}", request.len()),
        format!("bytes_down={}", response.len()),
        "reason=\"eof\"".to_owned(),
        "duration_ms=".to_owned(),
    ] {
        assert!(line.contains(&field), "`{field}` missing from: {line}");
    }
    assert!(line.contains(" INFO "), "{line}");

    // An idle tunnel: closed after `connect_idle_timeout`, and said so.
    let mut idle = connect_tcp(&opts, &Address::Ip(target)).await.unwrap();
    idle.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    idle.read_exact(&mut one).await.unwrap();
    let line = wait_for_log(&gw, "CONNECT ended", 2);
    assert!(line.contains("reason=\"idle_timeout\""), "{line}");
    assert!(line.contains("bytes_up=1 bytes_down=1"), "{line}");
    let ms: u64 = line
        .split("duration_ms=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!((1000..5000).contains(&ms), "{line}");

    // A tunnel still open at shutdown (and busy, so the idle timeout does not end it first)
    // gets the drain's grace, then ends with reason shutdown.
    let mut open = connect_tcp(&opts, &Address::Ip(target)).await.unwrap();
    let busy = tokio::spawn(async move {
        let mut n = 0u64;
        let mut two = [0u8; 2];
        while open.write_all(b"yz").await.is_ok() && open.read_exact(&mut two).await.is_ok() {
            n += 2;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut gw = gw;
    let stopping = Instant::now();
    let status = common::terminate(&mut gw.child, "gateway");
    assert!(status.success(), "{status}");
    let sent = tokio::time::timeout(WAIT, busy).await.unwrap().unwrap();
    let line = wait_for_log(&gw, "CONNECT ended", 3);
    assert!(line.contains("reason=\"shutdown\""), "{line}");
    assert!(
        line.contains(&format!("bytes_up={sent} bytes_down={sent}")),
        "{line}"
    );
    let grace = stopping.elapsed();
    assert!(grace >= Duration::from_secs(3), "tunnel cut after {grace:?}");
}

/// One CONNECT through the shim's local SOCKS5 port to the echo server `target`.
async fn connect_via_shim(socks: SocketAddr, target: SocketAddr) -> Result<(), ReplyCode> {
    let mut s = tokio::net::TcpStream::connect(socks).await.unwrap();
    sudp::client::authenticate_plain(&mut s, None).await.unwrap();
    sudp::client::request(&mut s, sudp::proto::socks::Command::Connect, &Address::Ip(target))
        .await
        .map_err(|e| e.reply_code())?;
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shim_logs_each_gateway_connection_and_reloads_on_sighup() {
    let target = common::tcp_echo().await;
    let pki = common::pki();
    let dir = tempdir("shim");
    let users = dir.join("users");
    std::fs::write(&users, users_line("alice", "first-pw")).unwrap();
    let mut gw = GatewayProcess::start(
        &pki,
        "shim-log",
        &["--users", users.to_str().unwrap(), "--allow", "127.0.0.0/8"],
    );
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let password = dir.join("password");
    std::fs::write(&password, "first-pw\n").unwrap();
    let stderr = std::fs::File::create(dir.join("shim.log")).unwrap();
    let mut shim = std::process::Command::new(BIN)
        .args(["shim", "--gateway", &gw.control.to_string(), "--ca"])
        .arg(&ca)
        .args(["--user", "alice", "--password-file"])
        .arg(&password)
        .args(["--server-name", "localhost", "--socks", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(shim.stdout.take().unwrap()));
    let socks: SocketAddr = lines
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("socks ")
        .unwrap()
        .parse()
        .unwrap();
    let log = || std::fs::read_to_string(dir.join("shim.log")).unwrap_or_default();
    let wait_log = |needle: &str, n: usize| -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let l = log();
            let hits: Vec<String> = l
                .lines()
                .filter(|x| x.contains(needle))
                .map(str::to_owned)
                .collect();
            if hits.len() >= n {
                return hits;
            }
            assert!(Instant::now() < deadline, "fewer than {n} `{needle}` lines:\n{l}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let connected = format!("connected to gateway {}", gw.control);
    // The startup probe: the first connection, a full handshake.
    let first = wait_log(&connected, 1);
    assert!(
        first[0].contains(&format!("{connected} (TLS 1.3, full handshake)")) && first[0].contains(" INFO "),
        "{}",
        first[0]
    );
    // A CONNECT through the shim's SOCKS port: a second control connection, resumed.
    connect_via_shim(socks, target).await.unwrap();
    let two = wait_log(&connected, 2);
    assert!(
        two[1].contains(&format!("{connected} (TLS 1.3, resumed)")),
        "{}",
        two[1]
    );

    // Rotate the password and the certificate (another CA) at the gateway, and the shim's
    // password file and CA file to match; SIGHUP both.
    let second = dir.join("pki-b");
    let out = std::process::Command::new(BIN)
        .args(["cert", "--out"])
        .arg(&second)
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&users, users_line("alice", "second-pw")).unwrap();
    std::fs::copy(second.join("gateway.pem"), gw.dir.join("gateway.pem")).unwrap();
    std::fs::copy(second.join("gateway.key"), gw.dir.join("gateway.key")).unwrap();
    gw.signal("HUP");
    wait_for_log(&gw, "configuration reloaded", 1);
    // Refused until the shim reloads too. The shim resumes its TLS session from before the
    // reload (a resumption shows no certificate, so its old CA is not consulted), and the
    // gateway refuses the stale password: AUTH_FAILED, which the shim answers with 0x02
    // (not allowed, `ClientError::reply_code`).
    assert_eq!(connect_via_shim(socks, target).await, Err(ReplyCode::NotAllowed));
    std::fs::write(&password, "second-pw\n").unwrap();
    std::fs::copy(second.join("ca.pem"), &ca).unwrap();
    let pid = shim.id().to_string();
    let hup = || {
        assert!(std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success())
    };
    hup();
    let line = wait_log("SIGHUP: configuration reloaded", 1).remove(0);
    assert!(
        line.contains("gateway login changed") && !line.contains("second-pw"),
        "{line}"
    );
    assert!(shim.try_wait().unwrap().is_none(), "the shim died of SIGHUP");
    // The refusal of a moment ago is no longer held: the next connection uses the new
    // password and trust, in a full handshake (new TLS configs both sides).
    connect_via_shim(socks, target).await.unwrap();
    let all = wait_log(&connected, 3);
    assert!(
        all.last()
            .unwrap()
            .contains(&format!("{connected} (TLS 1.3, full handshake)")),
        "{all:?}"
    );

    // A broken password file: the reload fails, the shim keeps its login and runs on.
    std::fs::write(&password, "").unwrap();
    hup();
    let line = wait_log("SIGHUP: reload failed", 1).remove(0);
    assert!(line.contains(password.to_str().unwrap()), "{line}");
    connect_via_shim(socks, target).await.unwrap();

    let status = common::terminate(&mut shim, "shim");
    assert!(status.success(), "{status}\n{}", log());
    let status = common::terminate(&mut gw.child, "gateway");
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_crl_and_a_revoked_client_cannot_resume_its_session() {
    let target = common::tcp_echo().await;
    let mut ca = sudp::cert::DevCa::new().unwrap();
    let (gateway_cert_pem, gateway_key_pem) = ca.gateway(&[]).unwrap();
    let ops = ca.client("ops").unwrap();
    let pki = sudp::cert::DevPki {
        ca_pem: ca.ca_pem().to_owned(),
        gateway_cert_pem,
        gateway_key_pem,
        client_cert_pem: ops.cert_pem.clone(),
        client_key_pem: ops.key_pem.clone(),
    };
    let dir = tempdir("crl");
    let (ca_file, crl_file, conf) = (dir.join("ca.pem"), dir.join("crl.pem"), dir.join("gateway.toml"));
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    std::fs::write(&crl_file, ca.crl(&[]).unwrap()).unwrap();
    std::fs::write(
        &conf,
        format!(
            "client_ca = \"{}\"\nclient_crl = [\"{}\"]\nallow = [\"127.0.0.0/8\"]\n",
            ca_file.display(),
            crl_file.display()
        ),
    )
    .unwrap();
    let mut gw = GatewayProcess::start(&pki, "crl", &["--config", conf.to_str().unwrap()]);
    // One client config for every connection: its session cache resumes them.
    let tls = sudp::tls::client_config(ClientTlsOptions {
        trust: ServerTrust::Ca(vec![ca.ca_der()]),
        client_auth: Some((ops.chain(), ops.key())),
        allow_tls12: false,
    })
    .unwrap();
    let mut opts = ClientOptions::new(gw.control, "localhost", tls);
    opts.timeout = WAIT;
    let echo = |mut s: sudp::client::Control| async move {
        s.write_all(b"abc").await.unwrap();
        let mut back = [0u8; 3];
        tokio::time::timeout(WAIT, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&back, b"abc");
        s
    };
    let old = echo(connect_tcp(&opts, &Address::Ip(target)).await.unwrap()).await;
    let second = connect_tcp(&opts, &Address::Ip(target)).await.unwrap();
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the client resumes before the reload"
    );
    drop(second);

    // Revoke the client's certificate and reload.
    std::fs::write(&crl_file, ca.crl(&[ops.serial]).unwrap()).unwrap();
    gw.signal("HUP");
    let line = wait_for_log(&gw, "configuration reloaded", 1);
    assert!(
        line.contains("client CA reloaded (unchanged), CRL files 1 -> 1 (changed)"),
        "{line}"
    );
    // A new connection is refused, though the client offers a session from before the
    // reload (resuming it would skip the certificate check).
    let r = connect_tcp(&opts, &Address::Ip(target)).await;
    assert!(
        matches!(
            r,
            Err(ClientError::Tls {
                problem: sudp::tls::HandshakeProblem::ClientCertRefused(_),
                ..
            })
        ),
        "revoked certificate: {:?}",
        r.err()
    );
    // Refused in the handshake (the gateway may log it a moment after the client saw the
    // alert: a bounded wait, not a race).
    wait_for_log(&gw, "TLS handshake failed", 1);
    // The established tunnel goes on.
    let old = echo(old).await;
    drop(old);
    let status = common::terminate(&mut gw.child, "gateway");
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}
