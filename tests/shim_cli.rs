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

/// The file's `nice` key: every thread of the shim runs at that value (taken before the
/// runtime starts its threads), and a value outside the kernel's range is refused naming the
/// file and key.
#[test]
fn the_shim_takes_the_nice_value_of_its_file() {
    let dir = tempdir("nice");
    let want = common::another_nice_value();
    let file = dir.join("shim.toml");
    let body = |nice: i32| {
        format!(
            "gateway = [\"127.0.0.1:9\"]\npin = \"{}\"\nsocks = \"127.0.0.1:0\"\nnice = {nice}\n",
            "ab".repeat(32)
        )
    };
    std::fs::write(&file, body(want)).unwrap();
    // Killed on drop: a failed assertion below must not leave the shim running.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut shim = Killed(
        Command::new(BIN)
            .args(["shim", "--config"])
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut shim.0;
    // Bounded: the first line (the SOCKS5 listener) comes once the runtime runs.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Some(Ok(line)) = BufReader::new(stdout).lines().next() {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(common::WAIT)
        .expect("the shim printed its listener");
    assert!(line.starts_with("socks 127.0.0.1:"), "{line}");
    let threads = common::runtime_thread_nice_values(child.id());
    assert!(
        threads.iter().all(|&(_, n)| n == want),
        "want {want}: {threads:?}"
    );
    let status = common::terminate(child, "shim");
    assert!(status.success(), "{status}");

    std::fs::write(&file, body(-21)).unwrap();
    let out = Command::new(BIN)
        .args(["shim", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key `nice`: -21 is outside -20..=19"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sudp-shim-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn shim_check_validates_and_loads_files_without_binding_or_dialing() {
    let dir = tempdir("check");
    sudp::cert::write(&sudp::cert::ephemeral(), &dir).unwrap();
    std::fs::write(dir.join("alice.pass"), "pw\n").unwrap();
    // The SOCKS5 port is held by another socket and the gateway does not exist: --check
    // neither binds nor dials.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let socks = held.local_addr().unwrap().to_string();
    let check = |extra: &[&str]| {
        Command::new(BIN)
            .args(["shim", "--check", "--gateway", "127.0.0.1:9", "--socks", &socks])
            .args(extra)
            .output()
            .unwrap()
    };
    let ca = dir.join("ca.pem");
    let pass = dir.join("alice.pass");
    let ok = check(&[
        "--ca",
        ca.to_str().unwrap(),
        "--user",
        "alice",
        "--password-file",
        pass.to_str().unwrap(),
        "--forward",
        "udp:127.0.0.1:0=media.example:5004",
    ]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with("config OK: shim: gateway 127.0.0.1:9"),
        "{stdout}"
    );
    assert!(
        stdout.contains("user alice") && stdout.contains("1 forward"),
        "{stdout}"
    );
    assert!(!stdout.contains("pw"), "{stdout}");

    // Each file is loaded; errors name the key and flag, then the file.
    let empty = dir.join("empty.pass");
    std::fs::write(&empty, "\n").unwrap();
    let out = check(&[
        "--ca",
        ca.to_str().unwrap(),
        "--user",
        "alice",
        "--password-file",
        empty.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("`password_file` (--password-file)") && err.contains("first line is empty"),
        "{err}"
    );
    let key = dir.join("gateway.key");
    let out = check(&["--ca", key.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("`ca` (--ca)") && err.contains("no certificate"),
        "{err}"
    );
    let out = check(&[
        "--pin",
        &"ab".repeat(32),
        "--cert",
        ca.to_str().unwrap(),
        "--key",
        ca.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`key` (--key)"), "{err}");
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `sudp shim` with `args` and returns its stderr, checking that it exits non-zero
/// within a few seconds.
fn shim_fails(args: &[&str]) -> String {
    let mut child = Command::new(BIN)
        .arg("shim")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the shim did not exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    err
}

#[test]
fn address_in_use_names_the_listener_and_the_address() {
    let pin = "ab".repeat(32);
    let base = ["--gateway", "127.0.0.1:9", "--pin", pin.as_str()];
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = tcp.local_addr().unwrap().to_string();
    let err = shim_fails(&[&base[..], &["--socks", &taken]].concat());
    assert!(
        err.contains(&format!("SOCKS5 listener {taken}: cannot bind"))
            && err.contains("already uses")
            && err.contains("--socks"),
        "{err}"
    );
    let forward = format!("tcp:{taken}=127.0.0.1:80");
    let err = shim_fails(&[&base[..], &["--no-socks", "--forward", &forward]].concat());
    assert!(
        err.contains(&format!("TCP forward {taken}: cannot bind")),
        "{err}"
    );
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = udp.local_addr().unwrap().to_string();
    let forward = format!("udp:{taken}=127.0.0.1:80");
    let err = shim_fails(&[&base[..], &["--no-socks", "--forward", &forward]].concat());
    assert!(
        err.contains(&format!("UDP forward {taken}: cannot bind")) && err.contains("--forward"),
        "{err}"
    );
    drop((tcp, udp));
}
