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
