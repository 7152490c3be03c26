//! The binary as a user runs it: `sudp cert`, `sudp gateway` (prints what it bound, stops
//! gracefully on SIGTERM), config errors that name the key.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_sudp");

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sudp-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sudp "));
    let out = Command::new(BIN).args(["gateway", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--allow") && text.contains("loopback"), "{text}");
}

#[test]
fn limits_prints_the_largest_record_as_protocol_md_gives_it() {
    let out = Command::new(BIN).arg("limits").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // PROTOCOL.md §4.6: largest record 65 493 bytes; the datagram bound is 65 507.
    assert!(text.contains("largest record: 65493 bytes"), "{text}");
    assert!(
        text.contains("largest datagram (UDP payload over IPv4): 65507 bytes"),
        "{text}"
    );
    assert!(
        text.contains("largest plaintext (address header + payload): 65455 bytes"),
        "{text}"
    );
}

#[test]
fn gateway_prints_bound_addresses_and_exits_zero_on_sigterm() {
    let dir = tempdir("gw");
    let out = Command::new(BIN)
        .args(["cert", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["ca.pem", "gateway.pem", "gateway.key", "client.pem", "client.key"] {
        assert!(dir.join(f).exists(), "{f}");
    }
    let mut child = Command::new(BIN)
        .args(["gateway", "--listen", "127.0.0.1:0", "--no-auth", "--cert"])
        .arg(dir.join("gateway.pem"))
        .arg("--key")
        .arg(dir.join("gateway.key"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let control = lines.next().unwrap().unwrap();
    let relay = lines.next().unwrap().unwrap();
    assert!(
        control.starts_with("control (TLS) 127.0.0.1:") && !control.ends_with(":0"),
        "{control}"
    );
    assert!(
        relay.starts_with("relay (UDP) 127.0.0.1:") && !relay.ends_with(":0"),
        "{relay}"
    );
    let port: u16 = control.rsplit(':').next().unwrap().parse().unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());

    // SIGTERM: stop accepting, drain, exit 0.
    let status = common::terminate(&mut child, "gateway");
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--nice N`: every thread of the gateway runs at N (taken before the runtime starts its
/// threads, which inherit it), and a value outside the kernel's range is refused naming the
/// flag.
#[test]
fn the_gateway_takes_the_nice_value_it_is_given() {
    let pki = common::pki();
    let want = common::another_nice_value();
    let mut gw = common::GatewayProcess::start(&pki, "nice", &["--no-auth", "--nice", &want.to_string()]);
    let threads = common::runtime_thread_nice_values(gw.child.id());
    assert!(
        threads.iter().all(|&(_, n)| n == want),
        "want {want}: {threads:?}"
    );
    let status = common::terminate(&mut gw.child, "gateway");
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(gw.dir.join("stderr.log")).unwrap();
    assert!(log.contains(&format!("running at nice value {want}")), "{log}");

    let out = Command::new(BIN)
        .args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--no-auth",
            "--cert",
            "a.pem",
            "--key",
            "a.key",
            "--nice",
            "20",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("flag `--nice`: 20 is outside -20..=19"), "{err}");
}

#[test]
fn bad_config_names_the_key() {
    let dir = tempdir("cfg");
    let cfg = dir.join("gateway.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nno_auth = true\ncert = \"a.pem\"\nkey = \"a.key\"\nidle_timeout = \"5 parsecs\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("idle_timeout") && err.contains("gateway.toml"),
        "{err}"
    );

    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\nno_auth = true\ncert = \"a.pem\"\nkey = \"a.key\"\ncolour = 3\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"));

    // A missing certificate file is named too.
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\nno_auth = true\ncert = \"missing.pem\"\nkey = \"a.key\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.pem"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn passwd_prints_a_users_line_without_the_password() {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(["passwd", "--user", "alice"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret-pass\n").unwrap();
    let out = common::output_within(child, common::WAIT, "the child process");
    assert!(out.status.success());
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.starts_with("alice:$argon2id$"), "{line}");
    assert!(!line.contains("s3cret") && !String::from_utf8_lossy(&out.stderr).contains("s3cret"));
    let users = sudp::auth::Users::parse(&line, "stdout").unwrap();
    assert!(users.verify(b"alice", b"s3cret-pass"));
}

/// Passwords and keys never reach the logs, even at trace level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_gateway_logs_at_trace_level() {
    use sudp::client::{authenticate_plain, connect_tls, negotiate_sudp, request, ClientOptions, SecureUdp};
    use sudp::proto::keys::{CipherSuite, KeySchedule, Role, EXPORTER_LABEL};
    use sudp::proto::socks::{Address, Command as SocksCommand};
    use sudp::tls::{ClientTlsOptions, ServerTrust};

    let dir = tempdir("secrets");
    let pki = sudp::cert::ephemeral();
    sudp::cert::write(&pki, &dir).unwrap();
    let secret = "hunter2-very-secret";
    let line = format!(
        "alice:{}\n",
        sudp::auth::hash_password(secret.as_bytes()).unwrap()
    );
    std::fs::write(dir.join("users.txt"), line).unwrap();
    let mut child = Command::new(BIN)
        .args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--allow",
            "127.0.0.0/8",
            "--log",
            "trace",
        ])
        .arg("--cert")
        .arg(dir.join("gateway.pem"))
        .arg("--key")
        .arg(dir.join("gateway.key"))
        .arg("--users")
        .arg(dir.join("users.txt"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let control = lines.next().unwrap().unwrap();
    let addr: std::net::SocketAddr = control.rsplit(' ').next().unwrap().parse().unwrap();
    let tls = sudp::tls::client_config(ClientTlsOptions {
        trust: ServerTrust::Ca(vec![pki.ca_der()]),
        client_auth: None,
        allow_tls12: false,
    })
    .unwrap();
    let mut opts = ClientOptions::new(addr, "localhost", tls);
    // A wrong password that contains the real one, then the real one, on both methods.
    let wrong = format!("{secret}-nope");
    let mut c = connect_tls(&opts).await.unwrap();
    let r = authenticate_plain(&mut c, Some(("alice", &wrong))).await;
    assert!(matches!(r, Err(sudp::client::ClientError::AuthFailed)), "{r:?}");
    let mut c = connect_tls(&opts).await.unwrap();
    authenticate_plain(&mut c, Some(("alice", secret))).await.unwrap();
    opts.credentials = Some(("alice".into(), secret.into()));
    let udp = SecureUdp::connect(&opts).await.unwrap();
    drop(udp);
    drop(c);

    // An association whose keys the test knows: the client side's exporter output, and the
    // six keys cut from it, for both suites (the gateway logs at trace while it derives,
    // seals and opens with them). One record each way, so every key is used.
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    echo.set_read_timeout(Some(common::WAIT)).unwrap();
    let echo_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for _ in 0..CipherSuite::ALL.len() {
            let Ok((n, from)) = echo.recv_from(&mut buf) else {
                return;
            };
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    for suite in CipherSuite::ALL {
        let mut o = opts.clone();
        o.suites = vec![suite];
        let mut control = connect_tls(&o).await.unwrap();
        let (suite, assoc) = negotiate_sudp(&mut control, &o).await.unwrap();
        let conn = control.get_ref().1;
        let mut material = vec![0u8; suite.exporter_len()];
        conn.export_keying_material(
            &mut material,
            EXPORTER_LABEL,
            Some(&KeySchedule::exporter_context(assoc, suite)),
        )
        .unwrap();
        secrets.push((format!("{} exporter output", suite.name()), material.clone()));
        let keys = sudp::tls::export_keys(conn, assoc, suite).unwrap();
        let (c2g, g2c) = keys.for_role(Role::Client);
        for (dir, k) in [("c2g", c2g), ("g2c", g2c)] {
            secrets.push((format!("{} {dir} enc", suite.name()), k.enc().to_vec()));
            secrets.push((format!("{} {dir} mac", suite.name()), k.mac().to_vec()));
            secrets.push((format!("{} {dir} iv", suite.name()), k.iv().to_vec()));
        }
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let bnd = request(
            &mut control,
            SocksCommand::UdpAssociate,
            &Address::Ip(sock.local_addr().unwrap()),
        )
        .await
        .unwrap();
        let Address::Ip(relay) = bnd else {
            panic!("BND is a domain")
        };
        let (mut send, mut recv) = keys.into_sessions(assoc, Role::Client, 1024);
        let mut rec = vec![0u8; 256];
        let n = send
            .seal(&Address::Ip(echo_addr).as_ref(), b"keyed", &mut rec)
            .unwrap();
        sock.send_to(&rec[..n], relay).await.unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = tokio::time::timeout(common::WAIT, sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(recv.open(&mut buf[..n]).unwrap().data().unwrap().1, b"keyed");
        drop(control);
    }
    echo_thread.join().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = common::output_within(child, common::WAIT, "the child process");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("UDP association open"), "trace log captured:\n{log}");
    assert!(!log.contains(secret), "password in the logs:\n{log}");
    // Every form a key could take in a log line: hex (either case), base64 (standard and
    // URL-safe) and Rust's `Debug` of a byte slice, of every 9-byte window of each secret
    // (a key printed whole, cut short, from an offset or wrapped across lines still shows
    // one; 9 bytes, a multiple of 3, so some window is aligned with any base64 encoding).
    assert_eq!(
        secrets.len(),
        7 * CipherSuite::ALL.len(),
        "every suite x (exporter output + six keys; an AEAD suite's mac keys are empty)"
    );
    let mut forms_checked = 0;
    for (what, key) in &secrets {
        for part in key.windows(9) {
            let debug = format!("{part:?}");
            let forms = [
                hex::encode(part),
                hex::encode_upper(part),
                base64(part, STANDARD_B64),
                base64(part, URL_SAFE_B64),
                debug[1..debug.len() - 1].to_owned(),
            ];
            for form in forms {
                assert!(!log.contains(&form), "{what} in the logs as {form:?}:\n{log}");
                forms_checked += 1;
            }
        }
    }
    assert!(forms_checked > 2_000, "{forms_checked}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes a dev PKI and a users file into a fresh temp dir.
fn pki_dir(tag: &str) -> std::path::PathBuf {
    let dir = tempdir(tag);
    sudp::cert::write(&sudp::cert::ephemeral(), &dir).unwrap();
    let line = format!("alice:{}\n", sudp::auth::hash_password(b"pw").unwrap());
    std::fs::write(dir.join("users.txt"), line).unwrap();
    dir
}

fn gateway_check(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["gateway", "--check", "--cert"])
        .arg(dir.join("gateway.pem"))
        .arg("--key")
        .arg(dir.join("gateway.key"))
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn gateway_check_validates_and_loads_files_without_binding() {
    let dir = pki_dir("check");
    // A port that another socket holds: --check must not try to bind it.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let users = dir.join("users.txt");
    let out = gateway_check(&dir, &["--listen", &listen, "--users", users.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("config OK: gateway: "), "{stdout}");
    assert!(
        stdout.contains(&listen) && stdout.contains("(1 user)"),
        "{stdout}"
    );

    // Each file it names is loaded: errors name the key and flag, then the file.
    let missing = dir.join("missing-users.txt");
    let out = gateway_check(&dir, &["--users", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`users` (--users)") && err.contains("missing-users.txt"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    std::fs::write(dir.join("bad.key"), "not a key\n").unwrap();
    let out = Command::new(BIN)
        .args(["gateway", "--check", "--no-auth", "--cert"])
        .arg(dir.join("gateway.pem"))
        .arg("--key")
        .arg(dir.join("bad.key"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`key` (--key)") && err.contains("no private key"),
        "{err}"
    );

    // A key that is not the certificate's.
    let out = Command::new(BIN)
        .args(["gateway", "--check", "--no-auth", "--cert"])
        .arg(dir.join("gateway.pem"))
        .arg("--key")
        .arg(dir.join("client.key"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`cert` and `key`"), "{err}");

    let ca = dir.join("nope-ca.pem");
    let out = gateway_check(&dir, &["--client-ca", ca.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("`client_ca` (--client-ca)"),
        "{err}"
    );

    // Config errors as without --check.
    let out = gateway_check(&dir, &["--no-auth", "--max-connections", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("flag `--max-connections`"),
        "{err}"
    );
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `sudp gateway` with `args` on a port another socket holds and returns its stderr,
/// checking that it exits non-zero (bounded wait).
fn gateway_bind_failure(dir: &std::path::Path, args: &[&str]) -> String {
    let mut child = Command::new(BIN)
        .args(["gateway", "--no-auth", "--cert"])
        .arg(dir.join("gateway.pem"))
        .arg("--key")
        .arg(dir.join("gateway.key"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("gateway did not exit on a port in use");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    err
}

#[test]
fn address_in_use_names_the_socket_and_the_address() {
    let dir = pki_dir("inuse");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = tcp.local_addr().unwrap().to_string();
    let err = gateway_bind_failure(&dir, &["--listen", &taken]);
    assert!(
        err.contains(&format!("TLS control listener {taken}: cannot bind"))
            && err.contains("already uses")
            && err.contains("--listen"),
        "{err}"
    );

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = udp.local_addr().unwrap().to_string();
    let err = gateway_bind_failure(&dir, &["--listen", "127.0.0.1:0", "--udp-listen", &taken]);
    assert!(
        err.contains(&format!("UDP relay socket {taken}: cannot bind")) && err.contains("--udp-listen"),
        "{err}"
    );
    drop((tcp, udp));

    // A relay port that another process holds with SO_REUSEPORT (as another gateway does):
    // the relay's workers share their port that way, but never with a stranger, which
    // would get half of the clients' datagrams.
    let shared = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    shared.set_reuse_port(true).unwrap();
    shared
        .bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into())
        .unwrap();
    let taken = shared.local_addr().unwrap().as_socket().unwrap().to_string();
    let err = gateway_bind_failure(&dir, &["--listen", "127.0.0.1:0", "--udp-listen", &taken]);
    assert!(
        err.contains(&format!("UDP relay socket {taken}: cannot bind")),
        "{err}"
    );
    drop(shared);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = pki_dir("json");
    let mut child = Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "--log",
            "debug",
            "gateway",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--no-auth", "--cert"])
        .arg(dir.join("gateway.pem"))
        .arg("--key")
        .arg(dir.join("gateway.key"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let control = lines.next().unwrap().unwrap();
    let port: u16 = control.rsplit(':').next().unwrap().parse().unwrap();
    // Something to log: a connection that is not TLS.
    {
        use std::io::Write as _;
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = c.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = std::io::Read::read(&mut c, &mut [0u8; 64]);
    }
    let status = common::terminate(&mut child, "gateway");
    assert!(status.success(), "{status}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let mut n = 0;
    for line in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
        n += 1;
    }
    // At least the shutdown lines.
    assert!(n >= 2, "{err}");
    assert!(err.contains("gateway stopped"), "{err}");

    // An error at startup is a JSON line too.
    let out = Command::new(BIN)
        .args([
            "--log-format=json",
            "gateway",
            "--no-auth",
            "--cert",
            "/nonexistent/c.pem",
        ])
        .args(["--key", "/nonexistent/k.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_str(err.trim()).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(v["level"], "ERROR");
    assert!(
        v["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/c.pem"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn completions_and_man_pages_are_generated() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(BIN).args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        // Subcommands and flags of the clap definitions are in it.
        assert!(
            text.contains("gateway") && text.contains("udp-listen") && text.contains("log-format"),
            "{shell}: {}",
            &text[..200.min(text.len())]
        );
    }
    let dir = tempdir("man");
    let out = Command::new(BIN)
        .args(["man", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for page in [
        "sudp.1",
        "sudp-gateway.1",
        "sudp-shim.1",
        "sudp-bench.1",
        "sudp-bench-reflect.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
    }
    let gw = std::fs::read_to_string(dir.join("sudp-gateway.1")).unwrap();
    assert!(
        gw.contains(".TH sudp-gateway") && gw.contains("udp\\-listen"),
        "{gw}"
    );
    assert!(gw.contains("\\-\\-check"), "{gw}");
    let _ = std::fs::remove_dir_all(&dir);
}

const STANDARD_B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE_B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 of `data` (RFC 4648) with `alphabet`, unpadded (a window of a longer encoding
/// has no padding): the forms a key would take if some code path logged it encoded.
fn base64(data: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(alphabet[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

#[test]
fn base64_matches_rfc4648() {
    assert_eq!(base64(b"", STANDARD_B64), "");
    assert_eq!(base64(b"f", STANDARD_B64), "Zg");
    assert_eq!(base64(b"fo", STANDARD_B64), "Zm8");
    assert_eq!(base64(b"foobar", STANDARD_B64), "Zm9vYmFy");
    assert_eq!(base64(&[0xfb, 0xff, 0xfe], STANDARD_B64), "+//+");
    assert_eq!(base64(&[0xfb, 0xff, 0xfe], URL_SAFE_B64), "-__-");
}

// --- Gateway flags end to end (the binary) -------------------------------------------------

/// Client options for a `sudp gateway` process started by [`common::GatewayProcess`].
fn process_options(gw: &common::GatewayProcess, pki: &sudp::cert::DevPki) -> sudp::client::ClientOptions {
    sudp::client::ClientOptions::new(gw.control, "localhost", common::client_tls(pki, false))
}

/// `--max-connections 2`: a third client waits (its TLS handshake is not served) until one
/// of the two connections closes, then gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_queues_the_third_client_until_a_slot_frees() {
    use sudp::client::connect_tls;
    let pki = common::pki();
    let gw = common::GatewayProcess::start(
        &pki,
        "max-conn",
        &["--no-auth", "--allow", "127.0.0.0/8", "--max-connections", "2"],
    );
    let opts = process_options(&gw, &pki);
    let first = connect_tls(&opts).await.unwrap();
    let _second = connect_tls(&opts).await.unwrap();
    let third = tokio::spawn({
        let opts = opts.clone();
        async move { connect_tls(&opts).await }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!third.is_finished(), "a third connection was served");
    drop(first);
    let third = tokio::time::timeout(common::WAIT, third)
        .await
        .expect("the third client got the freed slot")
        .unwrap();
    assert!(third.is_ok(), "{:?}", third.err());
}

/// `--handshake-timeout 500ms`: a client that connects and says nothing is closed after
/// about that long (not at once, and not after the 10 s default).
#[test]
fn handshake_timeout_closes_a_silent_client() {
    use std::io::Read as _;
    let pki = common::pki();
    let gw = common::GatewayProcess::start(
        &pki,
        "hs-timeout",
        &[
            "--no-auth",
            "--allow",
            "127.0.0.0/8",
            "--handshake-timeout",
            "500ms",
        ],
    );
    let mut tcp = std::net::TcpStream::connect(gw.control).unwrap();
    tcp.set_read_timeout(Some(common::WAIT)).unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tcp.read(&mut buf).unwrap_or(0);
    let waited = t0.elapsed();
    assert_eq!(n, 0, "closed, nothing sent");
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
}

/// `--replay-window 64`: a record 70 nonces behind the newest is refused (too old), one 60
/// behind is accepted; with the default window (1 024) both would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_window_flag_sets_the_gateways_window() {
    use sudp::client::{connect_tls, negotiate_sudp, request};
    use sudp::proto::socks::{Address, Command as SocksCommand};
    use sudp::proto::{Role, SendSession};
    let pki = common::pki();
    let gw = common::GatewayProcess::start(
        &pki,
        "replay-window",
        &["--no-auth", "--allow", "127.0.0.0/8", "--replay-window", "64"],
    );
    let echo = common::udp_echo().await;
    let opts = process_options(&gw, &pki);
    let mut control = connect_tls(&opts).await.unwrap();
    let (suite, assoc) = negotiate_sudp(&mut control, &opts).await.unwrap();
    let keys = sudp::tls::export_keys(control.get_ref().1, assoc, suite).unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bnd = request(
        &mut control,
        SocksCommand::UdpAssociate,
        &Address::Ip(sock.local_addr().unwrap()),
    )
    .await
    .unwrap();
    let Address::Ip(relay) = bnd else {
        panic!("BND is a domain")
    };
    let mut recv = sudp::proto::RecvSession::new(assoc, &keys, Role::Client, 1024);
    // Each record at a chosen nonce (the test door), each nonce used once; the echo
    // carries the nonce back as its payload.
    let mut buf = [0u8; 512];
    for (nonce, comes_back, why) in [
        (100u64, true, "the newest"),
        (30, false, "70 behind the newest: too old with W = 64"),
        (40, true, "60 behind the newest: inside W = 64"),
    ] {
        let mut send = SendSession::resume(assoc, &keys, Role::Client, nonce);
        let mut rec = vec![0u8; 256];
        let n = send
            .seal(&Address::Ip(echo).as_ref(), &nonce.to_be_bytes(), &mut rec)
            .unwrap();
        sock.send_to(&rec[..n], relay).await.unwrap();
        let got = match tokio::time::timeout(Duration::from_millis(700), sock.recv_from(&mut buf)).await {
            Ok(r) => {
                let n = r.unwrap().0;
                let o = recv.open(&mut buf[..n]).unwrap();
                Some(u64::from_be_bytes(o.data().unwrap().1.try_into().unwrap()))
            }
            Err(_) => None,
        };
        assert_eq!(got, comes_back.then_some(nonce), "nonce {nonce}, {why}");
    }
    drop(control);
}

/// `--advertise 127.0.0.9`: UDP ASSOCIATE replies name that address with the relay's port
/// (for a gateway behind a NAT or a load balancer), for secure and naked clients alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertise_flag_sets_bnd_addr() {
    use sudp::client::{authenticate_plain, connect_tls, negotiate_sudp, request};
    use sudp::proto::socks::{Address, Command as SocksCommand};
    let pki = common::pki();
    let gw = common::GatewayProcess::start(
        &pki,
        "advertise",
        &["--no-auth", "--allow", "127.0.0.0/8", "--advertise", "127.0.0.9"],
    );
    let opts = process_options(&gw, &pki);
    let want = Address::Ip(([127, 0, 0, 9], gw.relay.port()).into());
    let any = Address::Ip("0.0.0.0:0".parse().unwrap());
    let mut c = connect_tls(&opts).await.unwrap();
    negotiate_sudp(&mut c, &opts).await.unwrap();
    assert_eq!(
        request(&mut c, SocksCommand::UdpAssociate, &any).await.unwrap(),
        want
    );
    let mut c = connect_tls(&opts).await.unwrap();
    authenticate_plain(&mut c, None).await.unwrap();
    assert_eq!(
        request(&mut c, SocksCommand::UdpAssociate, &any).await.unwrap(),
        want
    );
}
