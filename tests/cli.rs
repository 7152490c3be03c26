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
    let out = child.wait_with_output().unwrap();
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
    use sudp::client::{authenticate_plain, connect_tls, ClientOptions, SecureUdp};
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
    assert!(authenticate_plain(&mut c, Some(("alice", &wrong))).await.is_err());
    let mut c = connect_tls(&opts).await.unwrap();
    authenticate_plain(&mut c, Some(("alice", secret))).await.unwrap();
    opts.credentials = Some(("alice".into(), secret.into()));
    let udp = SecureUdp::connect(&opts).await.unwrap();
    drop(udp);
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("UDP association open"), "trace log captured:\n{log}");
    assert!(!log.contains(secret), "password in the logs:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
