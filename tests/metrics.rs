//! `--metrics`: the gateway's Prometheus endpoint scraped with curl during a secure stream and
//! parsed with Python's `prometheus_client` text parser; the counters move exactly as the
//! stream and an injected replay say they must.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use sudp::client::{connect_tls, negotiate_sudp, request, ClientOptions};
use sudp::proto::socks::{AddrRef, Address, Command};
use sudp::proto::Role;
use tokio::net::UdpSocket;

/// Scrapes `/metrics` with curl and parses it with prometheus_client; returns every sample
/// as `name{label="v",...}` (labels sorted) → value.
fn scrape(addr: std::net::SocketAddr) -> HashMap<String, f64> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("http://{addr}/metrics")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parser = r#"
import sys, prometheus_client.parser as p
for fam in p.text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {s.value}")
"#;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", parser])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let parsed = output_within(child, WAIT, "the Prometheus text parser");
    assert!(
        parsed.status.success(),
        "the Prometheus text parser refused the exposition: {}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    String::from_utf8(parsed.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no sample {key}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_as_the_stream_and_a_replay_say() {
    if !have_curl() || !have_python_prometheus() {
        return;
    }
    let pki = pki();
    let audit_dir = common::TempDir::new("audit");
    let audit = audit_dir.path().join("audit.jsonl");
    let gw = GatewayProcess::start(
        &pki,
        "gw-metrics",
        &[
            "--no-auth",
            "--allow",
            "127.0.0.0/8",
            "--metrics",
            "127.0.0.1:0",
            "--audit-log",
            audit.to_str().unwrap(),
        ],
    );
    let metrics = gw.metrics.unwrap();
    let echo = udp_echo().await;

    let before = scrape(metrics);
    assert_eq!(get(&before, "sudp_gateway_associations_active{}"), 0.0);
    // One receive worker per relay socket, one per core by default.
    let workers = get(&before, "sudp_gateway_relay_workers{}");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    assert_eq!(workers, cores, "relay_workers");

    // A secure association built from the library's parts, so the test holds the records.
    let opts = ClientOptions::new(gw.control, "localhost", client_tls(&pki, false));
    let mut control = connect_tls(&opts).await.unwrap();
    let (suite, assoc) = negotiate_sudp(&mut control, &opts).await.unwrap();
    let keys = sudp::tls::export_keys(control.get_ref().1, assoc, suite).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let Address::Ip(relay) = request(
        &mut control,
        Command::UdpAssociate,
        &Address::Ip(sock.local_addr().unwrap()),
    )
    .await
    .unwrap() else {
        panic!("BND is a domain")
    };
    let (mut tx, mut rx) = keys.into_sessions(assoc, Role::Client, 1024);
    const N: usize = 200;
    let mut rec = vec![0u8; 2048];
    let mut first = Vec::new();
    let mut buf = vec![0u8; 4096];
    for i in 0..N {
        let n = tx.seal(&AddrRef::Ip(echo), &[i as u8; 100], &mut rec).unwrap();
        if i == 0 {
            first = rec[..n].to_vec();
        }
        sock.send_to(&rec[..n], relay).await.unwrap();
        let m = tokio::time::timeout(WAIT, sock.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let opened = rx.open(&mut buf[..m]).unwrap();
        assert_eq!(opened.data().unwrap().1, &[i as u8; 100]);
    }
    // The replay: the first record again. Dropped as a duplicate, never echoed.
    sock.send_to(&first, relay).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sock.recv(&mut buf))
            .await
            .is_err()
    );

    let m = scrape(metrics);
    let fwd = r#"sudp_gateway_datagrams_total{direction="forwarded",path="secure"}"#;
    let ret = r#"sudp_gateway_datagrams_total{direction="returned",path="secure"}"#;
    assert_eq!(get(&m, fwd), N as f64);
    assert_eq!(get(&m, ret), N as f64);
    assert_eq!(
        get(
            &m,
            r#"sudp_gateway_payload_bytes_total{direction="forwarded",path="secure"}"#
        ),
        (N * 100) as f64
    );
    assert_eq!(
        get(
            &m,
            r#"sudp_gateway_datagrams_total{direction="forwarded",path="naked"}"#
        ),
        0.0
    );
    assert_eq!(
        get(&m, r#"sudp_gateway_dropped_datagrams_total{reason="duplicate"}"#),
        1.0
    );
    assert_eq!(
        get(&m, r#"sudp_gateway_dropped_datagrams_total{reason="bad_mac"}"#),
        0.0
    );
    assert_eq!(get(&m, "sudp_gateway_associations_active{}"), 1.0);
    assert_eq!(get(&m, "sudp_gateway_connections_active{}"), 1.0);
    assert_eq!(
        get(
            &m,
            r#"sudp_gateway_kernel_dropped_datagrams_total{socket="relay"}"#
        ),
        0.0
    );
    assert!(get(&m, "sudp_gateway_record_processing_seconds_count{}") >= (N + 1) as f64);

    // The association ends with its control connection: the gauge follows.
    drop(control);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let m = scrape(metrics);
        if get(&m, "sudp_gateway_associations_active{}") == 0.0 {
            assert_eq!(get(&m, "sudp_gateway_connections_active{}"), 0.0);
            assert_eq!(get(&m, "sudp_gateway_associations_total{}"), 1.0);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "association gauge stuck");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The association's end line says what it carried, each way, and why it ended.
    let deadline = std::time::Instant::now() + WAIT;
    let line = loop {
        if let Some(l) = gw.stderr().lines().find(|l| l.contains("UDP association closed")) {
            break l.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no end line:\n{}",
            gw.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for field in [
        format!("datagrams_up={N}"),
        format!("bytes_up={}", N * 100),
        format!("datagrams_down={N}"),
        format!("bytes_down={}", N * 100),
        "targets=1".to_owned(),
        "secure=true".to_owned(),
        // Dropped without a TLS close_notify: "closed" or "reset", both name the connection.
        "reason=control connection".to_owned(),
    ] {
        assert!(line.contains(&field), "{field} missing in {line}");
    }
    assert!(
        line.contains("duration_ms=") && line.contains("source=127.0.0.1:"),
        "{line}"
    );
    // The audit log holds the same figures, as one JSON line (what a SIEM ingests).
    let deadline = std::time::Instant::now() + WAIT;
    let text = loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        if text.ends_with('\n') {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "no audit line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(text.lines().count(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(v["event"], "association_end", "{v}");
    assert_eq!(v["user"], "anonymous", "{v}");
    assert_eq!(v["method"], "none", "{v}");
    assert_eq!(v["secure"], true, "{v}");
    assert_eq!(v["datagrams_up"], N as u64, "{v}");
    assert_eq!(v["bytes_up"], (N * 100) as u64, "{v}");
    assert_eq!(v["datagrams_down"], N as u64, "{v}");
    assert_eq!(v["bytes_down"], (N * 100) as u64, "{v}");
    assert_eq!(v["targets"], serde_json::json!([echo.to_string()]), "{v}");
    assert!(
        v["reason"].as_str().unwrap().starts_with("control connection"),
        "{v}"
    );
    assert!(v["source"].as_str().unwrap().starts_with("127.0.0.1:"), "{v}");
    // The health check, as a load balancer sees it.
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{metrics}/healthz"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
}
