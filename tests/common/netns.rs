//! Hosts of the tests' own: network namespaces, veth pairs and nftables rules, created by the
//! test, with addresses only inside them, and removed when dropped (also when the test
//! fails). Needs root, iproute2 and nftables (`.ci/run` installs them).
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Runs a command quietly; whether it succeeded.
pub fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command that must succeed.
pub fn must(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this machine can make the test's hosts: iproute2 and nftables present. (Whether
/// namespaces can be made at all shows when [`Namespace::new`] fails.)
pub fn have_netns_tools() -> bool {
    super::tool_available("nftables", "nft", &["--version"])
        && super::tool_available("iproute2", "ip", &["-V"])
}

/// One network namespace (a host), deleted when dropped; its loopback is up.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// `sudp-TAG-PID`; `None` where namespaces cannot be made (not root). Under
    /// `SUDP_REQUIRE_TOOLS` (set by `.ci/run`) that is a failure, else a visible skip.
    pub fn new(tag: &str) -> Option<Namespace> {
        let name = format!("sudp-{tag}-{}", std::process::id());
        let _ = sh(&["ip", "netns", "del", &name]);
        if !sh(&["ip", "netns", "add", &name]) {
            assert!(
                std::env::var_os("SUDP_REQUIRE_TOOLS").is_none(),
                "network namespaces are required here but `ip netns add` failed"
            );
            super::skipped("cannot create network namespaces (needs root)");
            return None;
        }
        must(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Some(Namespace { name })
    }

    /// A command run inside the namespace.
    pub fn exec(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]);
        c
    }

    /// `ip ARGS` inside the namespace; must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        must(&all);
    }

    /// `nft ARGS` inside the namespace; must succeed.
    pub fn nft(&self, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", &self.name, "nft"];
        all.extend_from_slice(args);
        must(&all);
    }

    /// Joins `self` and `other` with a veth pair named `dev_self`/`dev_other`, gives each end
    /// its addresses (CIDR notation) and sets both up. The pair goes with the namespaces.
    pub fn link(
        &self,
        dev_self: &str,
        addrs_self: &[&str],
        other: &Namespace,
        dev_other: &str,
        addrs_other: &[&str],
    ) {
        must(&[
            "ip", "link", "add", dev_self, "type", "veth", "peer", "name", dev_other,
        ]);
        must(&["ip", "link", "set", dev_self, "netns", &self.name]);
        must(&["ip", "link", "set", dev_other, "netns", &other.name]);
        for a in addrs_self {
            self.ip(&["addr", "add", a, "dev", dev_self]);
        }
        for a in addrs_other {
            other.ip(&["addr", "add", a, "dev", dev_other]);
        }
        self.ip(&["link", "set", dev_self, "up"]);
        other.ip(&["link", "set", dev_other, "up"]);
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Deleting a namespace removes its interfaces, and so the veth pairs.
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// Kills a child when dropped.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads lines of a child's stdout on a thread; receive them with a bound.
pub fn lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead as _;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (bounded) for `needle` in the file at `path`.
pub fn wait_file(path: &std::path::Path, needle: &str, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if std::fs::read_to_string(path).unwrap_or_default().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The application on a client host of the test's: one 200-byte datagram every 10 ms to
/// `127.0.0.1:ARGV1` for ARGV2 seconds, counting 200-byte echoes (and one more second of
/// draining); prints "sent echoed". Run as `python3 -c APP PORT SECS`.
pub const APP: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.1", int(sys.argv[1])))
s.setblocking(False)
sent = echoed = 0
end = time.time() + float(sys.argv[2])
while time.time() < end:
    s.send(bytes(200)); sent += 1
    t = time.time() + 0.01
    while time.time() < t:
        try:
            if len(s.recv(2048)) == 200: echoed += 1
        except BlockingIOError:
            time.sleep(0.001)
t = time.time() + 1.0
while time.time() < t:
    try:
        if len(s.recv(2048)) == 200: echoed += 1
    except BlockingIOError:
        time.sleep(0.005)
print(sent, echoed)
"#;
