//! Associations that move on real networks (issue 9, item 5 f and g): the gateways on a server
//! host and the shim on a client host of their own (network namespaces this test creates,
//! joined by a veth pair, addresses only inside them, removed when the test ends).
//!
//! * (f) **Roaming:** mid-stream the client's address changes (a new address on its interface,
//!   the old one removed, as when a phone moves from Wi-Fi to cellular). The shim notices, and
//!   re-attaches its association from the new address: same id, epoch 1, the stream goes on.
//! * (g) **Partition:** mid-stream an nftables rule on the client's host drops everything to
//!   gateway A (no RST). The heartbeat notices; the shim re-attaches its association on
//!   gateway B, which shares A's Redis.
//!
//! Needs root, iproute2, nftables and (for g) redis-server; `.ci/run` installs them.
//! Elsewhere the tests say SKIPPED.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::netns::*;
use common::*;

/// The two hosts, their files and processes.
struct World {
    /// First, so that the processes die before their namespaces go.
    procs: Vec<Kill>,
    sv: Namespace,
    cl: Namespace,
    /// 10.215.N.0/24: A is .1, B is .3, the client .2 (then .5 after roaming).
    net: String,
    dir: TempDir,
    pin: String,
}

fn world(tag: &str) -> Option<World> {
    if !have_netns_tools() || !tool_available("python3", "python3", &["--version"]) {
        return None;
    }
    let sv = Namespace::new(&format!("sv{tag}"))?;
    let cl = Namespace::new(&format!("cl{tag}"))?;
    let n = std::process::id() % 250 + 1;
    let net = format!("10.215.{n}");
    let id = std::process::id();
    sv.link(
        &format!("v{tag}s{id}"),
        &[&format!("{net}.1/24"), &format!("{net}.3/24")],
        &cl,
        &format!("v{tag}c{id}"),
        &[&format!("{net}.2/24")],
    );
    let pki = pki();
    let dir = TempDir::new(&format!("netns-{tag}"));
    let d = dir.path();
    std::fs::write(d.join("gateway.pem"), &pki.gateway_cert_pem).unwrap();
    std::fs::write(d.join("gateway.key"), &pki.gateway_key_pem).unwrap();
    std::fs::write(
        d.join("users"),
        format!("alice:{}\n", sudp::auth::hash_password(b"alice pw").unwrap()),
    )
    .unwrap();
    std::fs::write(d.join("password"), "alice pw\n").unwrap();
    let pin = sudp::tls::pin_hex(&sudp::tls::cert_sha256(&pki.gateway_chain()[0]));
    let mut w = World {
        sv,
        cl,
        net,
        dir,
        pin,
        procs: Vec::new(),
    };
    // The target: a UDP echo on the server host's loopback.
    let echo =
        w.sv.exec()
            .args([
                env!("CARGO_BIN_EXE_sudp"),
                "bench",
                "reflect",
                "--listen",
                "127.0.0.1:7000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
    w.procs.push(Kill(echo));
    Some(w)
}

impl World {
    fn log(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// A gateway on the server host at `{net}.{host}:8443`, with `extra` flags; its pid.
    fn gateway(&mut self, name: &str, host: u8, extra: &[&str]) -> u32 {
        let d = self.dir.path();
        let ip = format!("{}.{host}", self.net);
        let mut gw = self
            .sv
            .exec()
            .args([
                env!("CARGO_BIN_EXE_sudp"),
                "gateway",
                "--listen",
                &format!("{ip}:8443"),
            ])
            .args(["--udp-listen", &format!("{ip}:0"), "--allow", "127.0.0.1/32"])
            .arg("--users")
            .arg(d.join("users"))
            .arg("--cert")
            .arg(d.join("gateway.pem"))
            .arg("--key")
            .arg(d.join("gateway.key"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.log(name)).unwrap())
            .spawn()
            .unwrap();
        let out = lines(&mut gw);
        let pid = gw.id();
        self.procs.push(Kill(gw));
        let first = out.recv_timeout(WAIT).expect("gateway started");
        assert!(first.starts_with("control (TLS)"), "{first}");
        pid
    }

    /// Redis on the server host's loopback (a new namespace: the port is free); the store
    /// flags for gateways sharing it under one cluster key.
    fn redis(&mut self) -> Vec<String> {
        let key = self.dir.path().join("cluster.key");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sudp"))
            .args(["cluster-key", "--out"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success());
        let redis = self
            .sv
            .exec()
            .args([
                "redis-server",
                "--port",
                "6379",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.procs.push(Kill(redis));
        let deadline = std::time::Instant::now() + WAIT;
        while !self
            .sv
            .exec()
            .args(["redis-cli", "-p", "6379", "ping"])
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"PONG"))
        {
            assert!(std::time::Instant::now() < deadline, "redis did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        [
            "--store",
            "redis://127.0.0.1:6379/0",
            "--cluster",
            "netns",
            "--cluster-key",
            key.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// The shim on the client host, with a forward 127.0.0.1:5000 -> the echo, through the
    /// gateways at these hosts (in order).
    fn shim(&mut self, hosts: &[u8]) {
        let mut cmd = self.cl.exec();
        cmd.args([
            env!("CARGO_BIN_EXE_sudp"),
            "shim",
            "--pin",
            &self.pin,
            "--no-socks",
        ]);
        for h in hosts {
            cmd.args(["--gateway", &format!("{}.{h}:8443", self.net)]);
        }
        let mut shim = cmd
            .args(["--user", "alice", "--password-file"])
            .arg(self.dir.path().join("password"))
            .args(["--forward", "udp:127.0.0.1:5000=127.0.0.1:7000"])
            .args(["--metrics", "127.0.0.1:9109"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.log("shim")).unwrap())
            .spawn()
            .unwrap();
        let out = lines(&mut shim);
        self.procs.push(Kill(shim));
        let deadline = std::time::Instant::now() + WAIT;
        while !out.try_iter().any(|l| l.starts_with("metrics (HTTP)")) {
            assert!(std::time::Instant::now() < deadline, "shim did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the application for `secs`, calling `midway` after `at` seconds; (sent, echoed).
    fn stream(&self, secs: u64, at: u64, midway: impl FnOnce()) -> (u64, u64) {
        let app = self
            .cl
            .exec()
            .args(["python3", "-c", APP, "5000", &secs.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(at));
        midway();
        let out = output_within(app, Duration::from_secs(secs + 20), "the application");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace().map(|x| x.parse::<u64>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    }

    /// Whether gateway `gw` logged opening `assoc` for alice.
    fn opened(&self, gw: &str, assoc: &str) -> bool {
        let text = std::fs::read_to_string(self.log(gw)).unwrap_or_default();
        let needle = format!("assoc={assoc}");
        text.lines().any(|l| {
            l.contains("UDP association open") && l.contains("user=\"alice\"") && l.contains(&needle)
        })
    }

    /// Waits for gateway `gw` to log that it re-attached an association; returns the line
    /// and the association id.
    fn reattached(&self, gw: &str) -> (String, String) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(self.log(gw)).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.contains("association re-attached")) {
                let at = l.find("assoc=").unwrap() + 6;
                return (l.to_owned(), l[at..at + 16].to_owned());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{gw} did not re-attach:\n{text}\nshim:\n{}",
                std::fs::read_to_string(self.log("shim")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// (f) The client's address changes mid-stream: its association follows.
#[test]
fn roaming_the_association_follows_the_client_to_its_new_address() {
    let Some(mut w) = world("r") else { return };
    w.gateway("a", 1, &[]);
    w.shim(&[1]);
    let dev = format!("vrc{}", std::process::id());
    let (old, new) = (format!("{}.2/24", w.net), format!("{}.5/24", w.net));
    // Removing a subnet's primary address removes its secondaries too, unless they are
    // promoted: the new address must survive the old one's removal.
    let promote = format!("net.ipv4.conf.{dev}.promote_secondaries=1");
    must(&["ip", "netns", "exec", &w.cl.name, "sysctl", "-qw", &promote]);
    let (sent, echoed) = w.stream(10, 3, || {
        w.cl.ip(&["addr", "add", &new, "dev", &dev]);
        w.cl.ip(&["addr", "del", &old, "dev", &dev]);
    });
    let (line, assoc) = w.reattached("a");
    assert!(w.opened("a", &assoc), "{assoc} was opened on A");
    eprintln!("roaming: {echoed} of {sent} echoed; {line}");
    assert!(line.contains("epoch=1"), "{line}");
    assert!(
        line.contains(&format!("peer={}.5:", w.net)),
        "from the new address: {line}"
    );
    assert!(
        wait_file(&w.log("shim"), "secure association re-attached", WAIT),
        "the shim says it re-attached"
    );
    // The move costs the heartbeat timeout (1.5 s of 10 s) at most, plus a margin.
    assert!(echoed * 100 >= sent * 75, "{echoed} of {sent} echoed");
}

/// (g) A partition between the client and gateway A (a drop rule, no RST): the heartbeat
/// notices and the association continues on gateway B, through the shared Redis.
#[test]
fn a_partition_from_gateway_a_moves_the_association_to_b() {
    if !have_redis_server() {
        return;
    }
    let Some(mut w) = world("p") else { return };
    let store = w.redis();
    let store: Vec<&str> = store.iter().map(String::as_str).collect();
    w.gateway("a", 1, &store);
    w.gateway("b", 3, &store);
    w.shim(&[1, 3]);
    let a_ip = format!("{}.1", w.net);
    let (sent, echoed) = w.stream(10, 3, || {
        w.cl.nft(&["add", "table", "inet", "cut"]);
        w.cl.nft(&[
            "add",
            "chain",
            "inet",
            "cut",
            "out",
            "{ type filter hook output priority 0 ; }",
        ]);
        w.cl.nft(&["add", "rule", "inet", "cut", "out", "ip", "daddr", &a_ip, "drop"]);
    });
    let (line, assoc) = w.reattached("b");
    assert!(w.opened("a", &assoc), "{assoc} was opened on A");
    eprintln!("partition: {echoed} of {sent} echoed; {line}");
    assert!(line.contains("epoch=1"), "{line}");
    assert!(echoed * 100 >= sent * 75, "{echoed} of {sent} echoed");
}

/// (a, b) Gateway A killed (its kernel resets the connections) or frozen (no RST) on its
/// own host: the association continues on gateway B with the same id at epoch 1.
fn the_association_survives(signal: &str, tag: &str) {
    if !have_redis_server() {
        return;
    }
    let Some(mut w) = world(tag) else { return };
    let store = w.redis();
    let store: Vec<&str> = store.iter().map(String::as_str).collect();
    let a = w.gateway("a", 1, &store);
    w.gateway("b", 3, &store);
    w.shim(&[1, 3]);
    let (sent, echoed) = w.stream(10, 3, || must(&["kill", &format!("-{signal}"), &a.to_string()]));
    let (line, assoc) = w.reattached("b");
    assert!(w.opened("a", &assoc), "{assoc} was opened on A");
    eprintln!("SIG{signal} on its own host: {echoed} of {sent} echoed; {line}");
    assert!(line.contains("epoch=1"), "{line}");
    assert!(echoed * 100 >= sent * 75, "{echoed} of {sent} echoed");
    if signal == "STOP" {
        must(&["kill", "-CONT", &a.to_string()]);
    }
}

#[test]
fn a_killed_gateway_on_its_own_host_hands_the_association_to_b() {
    the_association_survives("KILL", "k");
}

#[test]
fn a_frozen_gateway_on_its_own_host_hands_the_association_to_b() {
    the_association_survives("STOP", "s");
}
