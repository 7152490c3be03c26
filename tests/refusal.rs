//! A shim that the gateway refuses for good (wrong password, untrusted certificate, wrong
//! pin, wrong name) says so in plain words and does not retry in a loop: at startup it exits
//! non-zero within seconds after one attempt; while running it answers each application
//! request with an error (SOCKS5 0x02 for a refused login) without asking the gateway again
//! for a while.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sudp::proto::socks::Address;
use sudp::shim::{GatewayEndpoint, Shim, ShimSettings};

const BIN: &str = env!("CARGO_BIN_EXE_sudp");

/// A TCP relay in front of `target` that counts the connections it accepted, so that a
/// test sees how often the shim tried the gateway whatever the gateway logs. Stops when
/// dropped (and after a minute at most).
struct CountingProxy {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl CountingProxy {
    fn start(target: SocketAddr) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, halt) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !halt.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((client, _)) => {
                        n.fetch_add(1, Ordering::Relaxed);
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(target) else {
                            continue;
                        };
                        let pipe = |mut from: TcpStream, mut to: TcpStream| {
                            std::thread::spawn(move || {
                                let _ = from.set_read_timeout(Some(Duration::from_secs(30)));
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Write);
                            });
                        };
                        pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                        pipe(server, client);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        CountingProxy { addr, accepted, stop }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `sudp shim ARGS` and waits (at most `limit`) for it to exit; returns how long it
/// took, its exit status, and its stderr.
fn run_shim(args: &[String], limit: Duration) -> (Duration, Option<i32>, String) {
    let t0 = Instant::now();
    let mut child = Command::new(BIN)
        .args(["shim", "--socks", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("the shim is still running after {limit:?}:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (t0.elapsed(), status.code(), err)
}

#[test]
fn a_refused_shim_exits_at_startup_with_the_reason_after_one_attempt() {
    let pki = pki();
    let other = pki_other();
    let dir = std::env::temp_dir().join(format!("sudp-refusal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let users = dir.join("users.txt");
    let line = format!("alice:{}\n", sudp::auth::hash_password(b"right").unwrap());
    std::fs::write(&users, line).unwrap();
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
    std::fs::write(dir.join("other-ca.pem"), &other.ca_pem).unwrap();
    std::fs::write(dir.join("right.pass"), "right\n").unwrap();
    std::fs::write(dir.join("wrong.pass"), "wrong\n").unwrap();
    let gw = GatewayProcess::start(&pki, "refusal", &["--users", users.to_str().unwrap()]);
    let path = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    let login = |pass: &str| {
        vec![
            "--user".into(),
            "alice".into(),
            "--password-file".into(),
            path(pass),
        ]
    };
    let good_pin = sudp::tls::pin_hex(&sudp::tls::cert_sha256(&pki.gateway_chain()[0]));
    let wrong_pin = sudp::tls::pin_hex(&sudp::tls::cert_sha256(&other.gateway_chain()[0]));
    assert_ne!(good_pin, wrong_pin);

    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "wrong password",
            [vec!["--ca".into(), path("ca.pem")], login("wrong.pass")].concat(),
            vec!["authentication failed", "--password-file"],
        ),
        (
            "wrong CA",
            [vec!["--ca".into(), path("other-ca.pem")], login("right.pass")].concat(),
            vec![
                "the gateway's certificate is not signed by the CA in",
                "other-ca.pem (--ca)",
            ],
        ),
        (
            "wrong pin",
            [vec!["--pin".into(), wrong_pin.clone()], login("right.pass")].concat(),
            vec!["does not match the pinned SHA-256", wrong_pin.as_str(), "(--pin)"],
        ),
        (
            "wrong name",
            [
                vec![
                    "--ca".into(),
                    path("ca.pem"),
                    "--server-name".into(),
                    "gw.example".into(),
                ],
                login("right.pass"),
            ]
            .concat(),
            vec!["not valid for the name \"gw.example\"", "--server-name"],
        ),
    ];
    for (what, args, want) in cases {
        let proxy = CountingProxy::start(gw.control);
        let args = [vec!["--gateway".into(), proxy.addr.to_string()], args].concat();
        let (took, code, err) = run_shim(&args, Duration::from_secs(10));
        // 78 (EX_CONFIG): systemd's RestartPreventExitStatus= keeps it from looping.
        assert_eq!(code, Some(78), "{what}: the shim did not fail as refused:\n{err}");
        assert!(took < Duration::from_secs(5), "{what}: took {took:?}");
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: gateway "), "{what}: {err}");
        for w in want {
            assert!(last.contains(w), "{what}: {w:?} not in:\n{last}");
        }
        assert_eq!(proxy.accepted(), 1, "{what}: attempts on the gateway");
    }

    // The same shim with the right settings runs (and reports the accepted login).
    let proxy = CountingProxy::start(gw.control);
    let mut child = Command::new(BIN)
        .args([
            "shim",
            "--socks",
            "127.0.0.1:0",
            "--gateway",
            &proxy.addr.to_string(),
        ])
        .args(["--pin", &good_pin])
        .args(login("right.pass"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while proxy.accepted() < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "the shim stopped");
    assert!(terminate(&mut child, "shim").success());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(
        err.contains("connected to gateway: certificate and login accepted"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second, unrelated dev PKI (another CA, another gateway certificate).
fn pki_other() -> sudp::cert::DevPki {
    sudp::cert::ephemeral()
}

/// SOCKS5 (no local authentication) request `cmd` to `target` through `socks`; returns
/// the reply code.
fn socks_request(socks: SocketAddr, cmd: u8, target: SocketAddr) -> u8 {
    let mut s = TcpStream::connect(socks).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).unwrap();
    assert_eq!(sel, [5, 0]);
    let mut req = Vec::new();
    sudp::proto::socks::encode_request(cmd, &Address::Ip(target).as_ref(), &mut req).unwrap();
    s.write_all(&req).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    head[1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_shim_answers_each_request_without_hammering_the_gateway() {
    let pki = pki();
    let users = sudp::auth::Users::parse(
        &format!("alice:{}\n", sudp::auth::hash_password(b"right").unwrap()),
        "test",
    )
    .unwrap();
    let mut settings = common::settings(&pki);
    settings.auth = sudp::gateway::AuthSettings {
        no_auth: false,
        users: Some(Arc::new(users)),
        ..Default::default()
    };
    let gw = TestGateway::start(settings).await;
    let echo = udp_echo().await;
    let mut s = ShimSettings::new(
        vec![GatewayEndpoint::new(Address::Ip(gw.control))],
        client_tls(&pki, false),
    );
    s.credentials = Some(("alice".into(), "wrong".into()));
    s.forwards = vec![sudp::config::parse_forward(&format!("udp:127.0.0.1:0={echo}")).unwrap()];
    // In-process: no startup probe, so the refusal meets a running shim.
    let shim = Shim::bind(s).await.unwrap();
    let socks = shim.socks_addr().unwrap();
    let forward = shim.forward_addrs()[0].1;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(shim.run(async move {
        let _ = stop_rx.await;
    }));

    // Every request gets "not allowed" (0x02); only the first reaches the gateway.
    let codes = tokio::task::spawn_blocking(move || {
        let mut codes = Vec::new();
        for _ in 0..5 {
            codes.push(socks_request(socks, 1, echo));
            codes.push(socks_request(socks, 3, "0.0.0.0:0".parse().unwrap()));
        }
        codes
    })
    .await
    .unwrap();
    assert_eq!(codes, vec![2u8; 10]);
    // Datagrams on a UDP forward: its flow's link is refused too, and waits.
    let app = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..40 {
        app.send_to(b"hello", forward).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connections = gw.metrics.connections.load(Ordering::Relaxed);
    let failures = gw.metrics.auth_failures.load(Ordering::Relaxed);
    assert_eq!((connections, failures), (1, 1), "the gateway was asked again");
    let _ = stop_tx.send(());
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap().unwrap();
    gw.stop().await;
}

/// The plain-words messages of the TLS failures that are not the gateway's certificate: a
/// port that does not speak TLS, and a gateway that wants a client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_a_tls_port_and_a_refused_client_certificate_are_explained() {
    use sudp::client::{connect_tls, ClientOptions, SecureUdp};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let pki = pki();

    // An HTTP server where the gateway should be: transient (it may be a deployment in
    // progress), so not permanent, but the message says what to check.
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = http.accept().await {
            let _ = s.read(&mut [0u8; 512]).await;
            let _ = s.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n").await;
        }
    });
    let opts = ClientOptions::new(addr, "localhost", client_tls(&pki, false));
    let e = tokio::time::timeout(WAIT, connect_tls(&opts))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("did not answer with TLS"), "{e}");
    assert!(e.to_string().contains("its --listen"), "{e}");
    assert!(!e.is_permanent() && e.is_gateway_failure(), "{e:?}");

    // A gateway that requires client certificates, and a client without one: TLS 1.3
    // tells the client with the first reply after the handshake.
    let settings = sudp::gateway::Settings {
        tls: server_tls(&pki, true, true),
        ..common::settings(&pki)
    };
    let gw = TestGateway::start(settings).await;
    let opts = ClientOptions::new(gw.control, "localhost", client_tls(&pki, false));
    let e = tokio::time::timeout(WAIT, SecureUdp::connect(&opts))
        .await
        .unwrap()
        .err()
        .expect("refused");
    assert!(
        e.to_string()
            .contains("refused this client's certificate or wants one"),
        "{e}"
    );
    assert!(e.is_permanent(), "{e:?}");
    // With the certificate it works.
    let opts = ClientOptions::new(gw.control, "localhost", client_tls(&pki, true));
    assert!(SecureUdp::connect(&opts).await.is_ok());
    gw.stop().await;
}
