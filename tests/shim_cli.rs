//! `sudp shim` as a user runs it: prints what it bound (one line per listener), stops
//! gracefully on SIGTERM, and refuses bad configurations naming the key or flag.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_sudp");

#[test]
fn shim_prints_bound_listeners_and_exits_zero_on_sigterm() {
    let pin = "ab".repeat(32);
    // No gateway is needed to start: associations open when traffic arrives.
    let mut child = Command::new(BIN)
        .args([
            "shim",
            "--gateway",
            "127.0.0.1:9",
            "--pin",
            &pin,
            "--socks",
            "127.0.0.1:0",
            "--forward",
            "udp:127.0.0.1:0=media.example:5004",
            "--forward",
            "tcp:[::1]:0=[2001:db8::1]:80",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let socks = lines.next().unwrap().unwrap();
    let udp = lines.next().unwrap().unwrap();
    let tcp = lines.next().unwrap().unwrap();
    assert!(
        socks.starts_with("socks 127.0.0.1:") && !socks.ends_with(":0"),
        "{socks}"
    );
    assert!(
        udp.starts_with("forward udp 127.0.0.1:") && udp.ends_with(" -> media.example:5004"),
        "{udp}"
    );
    assert!(
        tcp.starts_with("forward tcp [::1]:") && tcp.ends_with(" -> [2001:db8::1]:80"),
        "{tcp}"
    );
    let port: u16 = socks.rsplit(':').next().unwrap().parse().unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());

    let status = common::terminate(&mut child, "shim");
    assert!(status.success(), "{status}");
}

#[test]
fn shim_config_errors_name_the_key_or_flag() {
    let dir = std::env::temp_dir().join(format!("sudp-shim-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("shim.toml");
    std::fs::write(
        &file,
        "gateway = [\"gw.example:8443\"]\nca = \"ca.pem\"\nidle_timeout = \"soon\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["shim", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("key `idle_timeout`: invalid duration \"soon\""),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["shim", "--gateway", "gw.example:8443"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing `ca` or `pin`"), "{err}");

    // A CA file that does not exist is reported with its path when the shim starts.
    let out = Command::new(BIN)
        .args(["shim", "--gateway", "gw.example:8443", "--ca"])
        .arg(dir.join("missing-ca.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing-ca.pem"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
