//! The bench library end to end: in-process gateway, secure and naked modes, a fixed low
//! rate for about a second at one size, and the JSON report's keys.

mod common;

use std::time::Duration;

use sudp::bench::stats::Rate;
use sudp::bench::{report, Mode, Options, Progress};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_and_naked_at_a_fixed_rate() {
    let opts = Options {
        modes: vec![Mode::Secure, Mode::Naked],
        sizes: vec![200],
        rate: Some(Rate::Pps(2_000.0)),
        duration: Duration::from_millis(1000),
        ..Options::default()
    };
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        sudp::bench::run(&opts, &Progress::hidden()),
    )
    .await
    .expect("bench finished in time")
    .expect("bench ran");

    assert_eq!(report.runs.len(), 2);
    for (run, mode) in report.runs.iter().zip([Mode::Secure, Mode::Naked]) {
        assert_eq!((run.mode, run.size, run.rate_source), (mode, 200, "fixed"));
        assert!(run.delivered_pps > 0.0, "{run:?}");
        assert!(run.received > 0, "{run:?}");
        assert!(run.loss_pct < 5.0, "{run:?}");
        assert!(
            run.p50_us > 0.0 && run.p50_us <= run.p99_us && run.p99_us <= run.p999_us,
            "{run:?}"
        );
        // The gateway runs in-process on its own runtime: its CPU is measured apart.
        #[cfg(target_os = "linux")]
        assert!(run.gateway_cpu_us_per_datagram.is_some(), "{run:?}");
    }

    let path = std::env::temp_dir().join(format!("sudp-bench-test-{}.json", std::process::id()));
    report::write_json(&report, &path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(json["latency"], "one_way");
    let runs = json["runs"].as_array().expect("runs array");
    assert_eq!(runs.len(), 2);
    for run in runs {
        for key in [
            "mode",
            "size",
            "offered_pps",
            "delivered_pps",
            "mbps",
            "loss_pct",
            "p50_us",
            "p99_us",
            "p999_us",
            "jitter_us",
            "cpu_us_per_datagram",
            "reordered",
            "duplicates",
        ] {
            assert!(run.get(key).is_some(), "missing {key} in {run}");
        }
    }
    assert_eq!(runs[0]["mode"], "secure");
    assert_eq!(runs[1]["mode"], "naked");
    assert!(runs[0]["delivered_pps"].as_f64().unwrap() > 0.0);
}

/// `sudp bench` into a pipe prints each row as its run finishes, not all at the end.
#[test]
fn rows_are_printed_as_they_finish_when_stdout_is_not_a_terminal() {
    use std::io::BufRead as _;
    use std::time::Instant;
    let t0 = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sudp"))
        .args(["bench", "--mode", "secure", "--size", "200,400", "--rate", "2000"])
        .args(["--duration", "1500ms"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(x) = rx.recv_timeout(Duration::from_secs(60)) {
        lines.push(x);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let row = |size: &str| {
        lines
            .iter()
            .find(|(_, l)| l.starts_with("secure") && l.split_whitespace().nth(1) == Some(size))
            .unwrap_or_else(|| panic!("no row for {size}: {lines:?}"))
            .0
    };
    let (first, second) = (row("200"), row("400"));
    // The 200 B row came out a whole measured run (1.5 s) before the 400 B one.
    assert!(
        second.duration_since(first) > Duration::from_millis(1000),
        "rows printed together: {:?} then {:?} after the start",
        first - t0,
        second - t0
    );
    assert!(lines[0].1.starts_with("mode "), "{:?}", lines[0]);
    // Rows are not repeated in the summary, which still carries the notes.
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(
        text.iter().filter(|l| l.starts_with("secure ")).count(),
        2,
        "{text:#?}"
    );
    assert!(text.iter().any(|l| l.starts_with("sudp bench ")), "{text:#?}");
}

/// The rate search (no `--rate`): short probes, then the measured run at the rate found and
/// the half-rate latency run. On loopback without a proxy (`direct`) even a busy debug
/// build sustains far more than 1 000 datagrams/s of 200 B, so a search that gave up at its
/// floor (100/s) or never ran fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_search_finds_a_sustained_rate_and_measures_half_of_it() {
    let opts = Options {
        modes: vec![Mode::Direct],
        sizes: vec![200],
        rate: None,
        probe: Duration::from_millis(100),
        duration: Duration::from_millis(300),
        half: true,
        ..Options::default()
    };
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        sudp::bench::run(&opts, &Progress::hidden()),
    )
    .await
    .expect("bench finished in time")
    .expect("bench ran");
    let sources: Vec<&str> = report.runs.iter().map(|r| r.rate_source).collect();
    assert_eq!(sources, ["search", "half"], "{:?}", report.runs);
    let (found, half) = (&report.runs[0], &report.runs[1]);
    assert_eq!(found.mode, Mode::Direct);
    assert!(
        (1_000.0..=4_000_000.0).contains(&found.requested_pps),
        "{found:?}"
    );
    assert!(found.loss_pct < 5.0, "{found:?}");
    assert!(found.received > 0 && half.received > 0, "{half:?}");
    let ratio = half.requested_pps / found.requested_pps;
    assert!((0.49..=0.51).contains(&ratio), "half of {found:?}: {half:?}");
}

/// `--streams 2`: two associations through the in-process gateway, each with its own
/// sender and reflector; the report and the run say so, and both carried traffic (the
/// delivered count is above what one stream was asked to send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_run_side_by_side() {
    let opts = Options {
        modes: vec![Mode::Secure],
        sizes: vec![200],
        rate: Some(Rate::Pps(2_000.0)),
        duration: Duration::from_millis(600),
        streams: 2,
        ..Options::default()
    };
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        sudp::bench::run(&opts, &Progress::hidden()),
    )
    .await
    .expect("bench finished in time")
    .expect("bench ran");
    assert_eq!(report.streams, 2);
    assert_eq!(report.runs.len(), 1);
    let run = &report.runs[0];
    assert_eq!((run.streams, run.rate_source), (2, "fixed"), "{run:?}");
    assert!(run.loss_pct < 5.0, "{run:?}");
    assert!(run.received * 100 >= run.sent * 95, "{run:?}");
}

/// Reads lines of `child`'s stdout on a thread until one starts with `prefix`; returns the
/// rest of that line (bounded wait).
fn line_starting(child: &mut std::process::Child, prefix: &str) -> String {
    use std::io::BufRead as _;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = prefix.to_owned();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // Read on after the line (to EOF): a closed pipe would fail the child's next
            // print.
            if let Some(rest) = line.strip_prefix(&wanted) {
                let _ = tx.send(rest.trim().to_owned());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("no line starting with {prefix:?}"))
}

/// Kills and reaps a child when dropped, so a failing test leaves no process behind.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `sudp bench ARGS --json FILE` (bounded) and returns the JSON report's runs.
fn bench_json(args: &[&str], tag: &str) -> Vec<serde_json::Value> {
    let path = std::env::temp_dir().join(format!("sudp-bench-{tag}-{}.json", std::process::id()));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_sudp"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::output_within(child, Duration::from_secs(60), "sudp bench");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    json["runs"].as_array().expect("runs").clone()
}

/// The remote forms, as across machines but on loopback: `sudp bench reflect` as the far
/// end, `--mode direct --target` to it, and `--socks` through a running plain SOCKS5 proxy
/// (the `sudp shim`'s SOCKS5 port, in front of a `sudp gateway` process), naked mode with
/// `--streams 2`.
#[test]
fn reflect_direct_and_socks_through_a_running_proxy() {
    let bin = env!("CARGO_BIN_EXE_sudp");
    let mut reflect = Reaped(
        std::process::Command::new(bin)
            .args(["bench", "reflect", "--listen", "127.0.0.1:0"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let target = line_starting(&mut reflect.0, "reflecting UDP on ");
    let fixed = ["--size", "200", "--rate", "2000", "--duration", "500ms"];

    let runs = bench_json(
        &[&["--mode", "direct", "--target", &target][..], &fixed].concat(),
        "direct",
    );
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["mode"], "direct");
    assert!(runs[0]["received"].as_u64().unwrap() > 0, "{:?}", runs[0]);
    assert!(runs[0]["loss_pct"].as_f64().unwrap() < 5.0, "{:?}", runs[0]);

    let pki = common::pki();
    let gw = common::GatewayProcess::start(&pki, "bench-socks", &["--no-auth", "--allow", "127.0.0.0/8"]);
    let ca = gw.dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let mut shim = Reaped(
        std::process::Command::new(bin)
            .args([
                "shim",
                "--gateway",
                &gw.control.to_string(),
                "--server-name",
                "localhost",
            ])
            .arg("--ca")
            .arg(&ca)
            .args(["--socks", "127.0.0.1:0"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let socks = line_starting(&mut shim.0, "socks ");
    // Two streams through the proxy; the report says so (an ignored flag fails here).
    let runs = bench_json(
        &[
            &[
                "--socks",
                &socks,
                "--target",
                &target,
                "--mode",
                "naked",
                "--streams",
                "2",
            ][..],
            &fixed,
        ]
        .concat(),
        "socks",
    );
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["mode"], "naked");
    assert_eq!(runs[0]["streams"], 2);
    assert!(runs[0]["received"].as_u64().unwrap() > 0, "{:?}", runs[0]);
    assert!(runs[0]["loss_pct"].as_f64().unwrap() < 5.0, "{:?}", runs[0]);
    drop(shim);
    let log = gw.stderr();
    // The datagrams went through the gateway: it opened associations for the shim.
    assert!(log.contains("UDP association open"), "{log}");
}
