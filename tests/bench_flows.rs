//! `sudp bench flows` end to end, small: 20 VoIP-shaped flows through the in-process shim
//! forward and gateway and directly; a shim limit below the flow count (the excess refused,
//! the admitted flows untouched); and a flow count beyond the bench's bound refused before
//! anything starts.

use std::time::Duration;

use sudp::bench::flows::{self, FlowMode, FlowsOptions, MAX_FLOWS};
use sudp::bench::BenchError;

/// Every run here is a few seconds; this bounds a hang.
const LIMIT: Duration = Duration::from_secs(60);

fn small(flows: usize) -> FlowsOptions {
    FlowsOptions {
        duration: Duration::from_secs(2),
        ramp: Duration::from_millis(200),
        ..FlowsOptions::new(flows)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_flows_through_the_shim_and_direct_all_admitted_and_echoed() {
    let opts = small(20);
    let report = tokio::time::timeout(LIMIT, flows::run(&opts))
        .await
        .expect("finished in time")
        .expect("ran");
    assert_eq!(report.runs.len(), 2);
    assert_eq!(report.runs[0].mode, FlowMode::Direct);
    assert_eq!(report.runs[1].mode, FlowMode::Sudp);
    for r in &report.runs {
        assert_eq!((r.flows, r.admitted), (20, 20), "{r:?}");
        // 2 s at one datagram every 20 ms: exactly 100 per flow.
        assert_eq!(r.sent, 20 * 100, "{r:?}");
        assert!(r.received <= r.sent);
        // Loopback at 1 000 datagrams/s loses nothing unless the machine stalls badly.
        assert!(r.loss_pct < 2.0 && r.worst_flow_loss_pct < 10.0, "{r:?}");
        assert!(
            0.0 < r.first_echo_p50_ms
                && r.first_echo_p50_ms <= r.first_echo_p99_ms
                && r.first_echo_p99_ms <= r.first_echo_max_ms,
            "{r:?}"
        );
        // Datagrams sent after each flow's first second: about half of them.
        assert!(r.steady_samples > 500 && r.steady_samples <= r.received, "{r:?}");
        assert!(
            0.0 < r.steady_rtt_p50_us && r.steady_rtt_p50_us <= r.steady_rtt_p99_us,
            "{r:?}"
        );
        // The way out is part of the round trip, datagram by datagram (one clock).
        assert!(
            0.0 < r.steady_out_p50_us && r.steady_out_p50_us <= r.steady_rtt_p50_us * 1.01,
            "{r:?}"
        );
        assert!(r.rss_kib_per_flow.is_some(), "{r:?}");
        assert!(r.load_generator_cpu_pct.is_some_and(|p| p > 0.0), "{r:?}");
    }
    let (direct, sudp) = (&report.runs[0], &report.runs[1]);
    assert!(direct.shim_open_cpu_us_per_flow.is_none() && direct.shim_flow_limit_drops.is_none());
    #[cfg(target_os = "linux")]
    for cpu in [
        sudp.shim_open_cpu_us_per_flow,
        sudp.gateway_open_cpu_us_per_flow,
        sudp.shim_steady_cpu_us_per_flow_s,
        sudp.gateway_steady_cpu_us_per_flow_s,
        sudp.proxy_steady_cpu_us_per_round_trip,
    ] {
        assert!(cpu.is_some_and(|c| c > 0.0), "{sudp:?}");
    }
    assert_eq!(sudp.shim_flow_limit_drops, Some(0), "{sudp:?}");
    // One association per flow (each source its own), over however many control connections.
    assert!(sudp.gateway_associations.is_some_and(|a| a >= 20), "{sudp:?}");
    assert!(
        sudp.gateway_control_connections
            .is_some_and(|c| (1..=sudp.gateway_associations.unwrap()).contains(&c)),
        "{sudp:?}"
    );
    assert!(direct.gateway_associations.is_none());
    let text = flows::table(&report);
    assert!(
        text.contains("direct") && text.contains("sudp") && text.contains("first echo"),
        "{text}"
    );
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "admitted",
        "loss_pct",
        "worst_flow_loss_pct",
        "first_echo_p99_ms",
        "steady_rtt_p99_us",
    ] {
        assert!(json["runs"][1].get(key).is_some(), "missing {key}");
    }
}

/// Above the shim's `max_flows`, the excess flows get nothing and are counted; the admitted
/// ones lose nothing (no flow is evicted for a new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_beyond_the_shim_limit_are_refused_and_the_admitted_carry_on() {
    let opts = FlowsOptions {
        modes: vec![FlowMode::Sudp],
        shim_max_flows: 8,
        ..small(12)
    };
    let report = tokio::time::timeout(LIMIT, flows::run(&opts))
        .await
        .expect("finished in time")
        .expect("ran");
    let r = &report.runs[0];
    assert_eq!((r.flows, r.admitted), (12, 8), "{r:?}");
    assert_eq!(r.sent, 8 * 100, "{r:?}");
    assert!(r.worst_flow_loss_pct < 10.0, "{r:?}");
    // Every datagram of the four refused flows, each counted once.
    assert_eq!(r.shim_flow_limit_drops, Some(4 * 100), "{r:?}");
    assert!(flows::table(&report).contains("refused 400 datagrams of 4 flows"));
}

#[tokio::test]
async fn a_flow_count_beyond_the_bound_is_refused_before_anything_starts() {
    let t = std::time::Instant::now();
    let e = flows::run(&FlowsOptions::new(MAX_FLOWS + 1)).await.unwrap_err();
    assert!(matches!(e, BenchError::Config(_)), "{e}");
    assert!(e.to_string().contains("--flows 10001: must be 1..=10000"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(1));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sudp"))
        .args(["bench", "flows", "--flows", "10001"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--flows 10001: must be 1..=10000"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing measured");
}
