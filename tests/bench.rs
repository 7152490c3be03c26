//! The bench library end to end: in-process gateway, secure and naked modes, a fixed low
//! rate for about a second at one size, and the JSON report's keys.

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
