//! Records inside TLS against a real firewall: the gateway and the client each on a host of
//! their own (network namespaces this test creates, joined by a veth pair, addresses only
//! inside them), an nftables rule in the client's namespace that drops UDP to the gateway,
//! then the rule removed. The shim (`--transport auto`, the default) carries its records
//! inside TLS while UDP is blocked and goes back to UDP when it is not; the stream flows in
//! both phases and the switch shows in the shim's metrics.
//!
//! Needs root, iproute2 and nftables (`.ci/run` installs them); elsewhere it says SKIPPED.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{lines, must, sh, wait_file, Kill, APP};
use common::*;

/// Two namespaces and a veth pair between them, removed when dropped (also on failure).
struct Hosts {
    gw: String,
    cl: String,
    gw_ip: String,
}

impl Hosts {
    fn make() -> Option<Hosts> {
        let id = std::process::id();
        let (gw, cl) = (format!("sudp-gw-{id}"), format!("sudp-cl-{id}"));
        let n = id % 250 + 1;
        let hosts = Hosts {
            gw: gw.clone(),
            cl: cl.clone(),
            gw_ip: format!("10.213.{n}.1"),
        };
        if !sh(&["ip", "netns", "add", &gw]) || !sh(&["ip", "netns", "add", &cl]) {
            return None;
        }
        let (vg, vc) = (format!("sg{id}"), format!("sc{id}"));
        must(&["ip", "link", "add", &vg, "type", "veth", "peer", "name", &vc]);
        must(&["ip", "link", "set", &vg, "netns", &gw]);
        must(&["ip", "link", "set", &vc, "netns", &cl]);
        must(&[
            "ip",
            "-n",
            &gw,
            "addr",
            "add",
            &format!("10.213.{n}.1/30"),
            "dev",
            &vg,
        ]);
        must(&[
            "ip",
            "-n",
            &cl,
            "addr",
            "add",
            &format!("10.213.{n}.2/30"),
            "dev",
            &vc,
        ]);
        for (ns, dev) in [(&gw, &vg), (&cl, &vc)] {
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        Some(hosts)
    }

    fn exec(&self, ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        c
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth pair, and so the pair.
        let _ = sh(&["ip", "netns", "del", &self.gw]);
        let _ = sh(&["ip", "netns", "del", &self.cl]);
    }
}

fn scrape(h: &Hosts, port: u16, key: &str) -> f64 {
    let out = h
        .exec(&h.cl)
        .args([
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{port}/metrics"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[test]
fn a_firewall_that_drops_udp_moves_records_into_tls_and_back() {
    let have = tool_available("nftables", "nft", &["--version"])
        && tool_available("iproute2", "ip", &["-V"])
        && have_curl();
    if !have {
        return;
    }
    let Some(h) = Hosts::make() else {
        assert!(
            std::env::var_os("SUDP_REQUIRE_TOOLS").is_none(),
            "network namespaces are required here but `ip netns add` failed"
        );
        skipped("cannot create network namespaces (needs root)");
        return;
    };
    let pki = pki();
    let dir = std::env::temp_dir().join(format!("sudp-netns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("gateway.pem"), &pki.gateway_cert_pem).unwrap();
    std::fs::write(dir.join("gateway.key"), &pki.gateway_key_pem).unwrap();
    let pin = sudp::tls::pin_hex(&sudp::tls::cert_sha256(&pki.gateway_chain()[0]));
    let bin = env!("CARGO_BIN_EXE_sudp");

    // The gateway's host: the gateway and a UDP echo on its loopback (ports are free: the
    // namespace is new).
    let _echo = Kill(
        h.exec(&h.gw)
            .args([bin, "bench", "reflect", "--listen", "127.0.0.1:7000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let gw_listen = format!("{}:8443", h.gw_ip);
    let mut gw = h
        .exec(&h.gw)
        .args([
            bin,
            "gateway",
            "--listen",
            &gw_listen,
            "--udp-listen",
            &format!("{}:0", h.gw_ip),
        ])
        .args(["--no-auth", "--allow", "127.0.0.1/32", "--cert"])
        .arg(dir.join("gateway.pem"))
        .arg("--key")
        .arg(dir.join("gateway.key"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let gw_lines = lines(&mut gw);
    let _gw = Kill(gw);
    let first = gw_lines.recv_timeout(WAIT).expect("gateway started");
    assert!(first.starts_with("control (TLS)"), "{first}");

    // The client's host: UDP to the gateway dropped, then the shim.
    must(&[
        "ip", "netns", "exec", &h.cl, "nft", "add", "table", "inet", "sudp",
    ]);
    must(&[
        "ip",
        "netns",
        "exec",
        &h.cl,
        "nft",
        "add",
        "chain",
        "inet",
        "sudp",
        "out",
        "{ type filter hook output priority 0 ; }",
    ]);
    must(&[
        "ip", "netns", "exec", &h.cl, "nft", "add", "rule", "inet", "sudp", "out", "ip", "daddr", &h.gw_ip,
        "meta", "l4proto", "udp", "drop",
    ]);
    let shim_log = dir.join("shim.log");
    let mut shim = h
        .exec(&h.cl)
        .args([bin, "shim", "--gateway", &gw_listen, "--pin", &pin, "--no-socks"])
        .args([
            "--forward",
            "udp:127.0.0.1:5000=127.0.0.1:7000",
            "--metrics",
            "127.0.0.1:9109",
        ])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&shim_log).unwrap())
        .spawn()
        .unwrap();
    let shim_lines = lines(&mut shim);
    let _shim = Kill(shim);
    let deadline = Instant::now() + WAIT;
    while !shim_lines.try_iter().any(|l| l.starts_with("metrics (HTTP)")) {
        assert!(Instant::now() < deadline, "shim did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    // One flow from one socket for 10 s: UDP blocked for the first 5, open for the rest.
    let app = h
        .exec(&h.cl)
        .args(["python3", "-c", APP, "5000", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let tls = scrape(
        &h,
        9109,
        r#"sudp_shim_datagrams_total{direction="forwarded",path="tls"}"#,
    );
    let udp = scrape(
        &h,
        9109,
        r#"sudp_shim_datagrams_total{direction="forwarded",path="secure"}"#,
    );
    eprintln!("UDP blocked by nftables for 5 s: the shim forwarded tls={tls} udp={udp}");
    assert!(tls > 300.0 && udp == 0.0, "tls={tls} udp={udp}");
    assert!(wait_file(&shim_log, "carrying records inside TLS", WAIT));
    must(&[
        "ip", "netns", "exec", &h.cl, "nft", "delete", "table", "inet", "sudp",
    ]);
    // Bounded: the app ends by itself after 10 s (+1 s of draining).
    let out = output_within(app, Duration::from_secs(30), "the application");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    let (sent, echoed) = (it.next().unwrap(), it.next().unwrap());
    let tls2 = scrape(
        &h,
        9109,
        r#"sudp_shim_datagrams_total{direction="forwarded",path="tls"}"#,
    );
    let udp2 = scrape(
        &h,
        9109,
        r#"sudp_shim_datagrams_total{direction="forwarded",path="secure"}"#,
    );
    eprintln!("then open: {echoed} of {sent} echoed in all; the shim forwarded tls={tls2} udp={udp2}");
    assert!(
        echoed * 100 >= sent * 90,
        "{echoed} of {sent} echoed across the two phases"
    );
    assert!(udp2 > 200.0, "records never went back to UDP (udp={udp2})");
    assert!(wait_file(&shim_log, "records back on UDP", WAIT));
    let _ = std::fs::remove_dir_all(&dir);
}
