//! `sudp bench flows`: many small flows through one shim UDP forward, the VoIP shape.
//!
//! ```text
//!            ┌──────────────────────────────── one process ───────────────────────────────────┐
//!  sudp      │ N UDP sockets ─▶ shim UDP forward ══ N associations ══▶ gateway ─▶ reflector    │
//!            │ (one current-   (own runtime, the   (TLS control +     (own     ◀─┘            │
//!            │  thread loop)    real forward)       secure records)    runtime)               │
//!  direct    │ N UDP sockets ───────────────────────────────────────────────────▶ reflector   │
//!            └─────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Each flow is one local UDP socket (its own source port, default buffers, as an
//! application's) that sends a `--size`-byte datagram every `--interval` for `--duration`
//! and counts the echoes. The flows start spread evenly over `--ramp`. All of them are
//! tasks of **one** current-thread tokio runtime on one OS thread (the load generator), not
//! a thread each. The shim and the gateway are the real ones ([`crate::shim::Shim`] with one
//! UDP forward to the reflector, [`crate::gateway::Gateway`]), each on its own runtime whose
//! threads' CPU clocks are read apart ([`super::cpu::ThreadClocks`]). The shim is driven from
//! the outside only: whatever it does to open a flow (today a TLS connection and a SOCKS5
//! UDP ASSOCIATE per flow) is what the figures measure.
//!
//! Figures per mode (see [`FlowsRun`]): flows admitted (at least one echo), loss over the
//! admitted flows (total and the worst flow), first-echo latency (a flow's first send to its
//! first echo), steady round trip (datagrams sent at least [`STEADY_AFTER`] into their flow),
//! and for sudp the shim's and the gateway's CPU per flow and the process's RSS per flow.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::net::UdpSocket;

use super::cpu::{self, ThreadClocks};
use super::link::{self, is_transient};
use super::stats::{self, loss_pct, Latency, Probe, SeqTracker, PROBE_HEADER};
use super::{AbortOnDrop, BenchError, Hosted, InProcessGateway};
use crate::config::{Forward, ForwardProto};
use crate::proto::socks::Address;
use crate::proto::{CipherSuite, DropReason};
use crate::shim::{GatewayEndpoint, Shim, ShimSettings};

/// Flows by default: the issue's goal for one shim.
pub const DEFAULT_FLOWS: usize = 1000;

/// Most flows one run may ask for. Each sudp flow holds about [`FDS_PER_SUDP_FLOW`] file
/// descriptors in this process; beyond this the bench measures the fd table, not the proxy.
pub const MAX_FLOWS: usize = 10_000;

/// Payload bytes per datagram by default: 20 ms of G.711 (160 bytes) plus RTP's 12.
pub const DEFAULT_SIZE: usize = 172;

/// Largest payload a flow may send (fits one record in one Ethernet-sized datagram).
pub const MAX_FLOW_SIZE: usize = 1400;

/// Datagrams of a flow after this long into it count as steady; the earlier ones include
/// the flow's opening.
pub const STEADY_AFTER: Duration = Duration::from_secs(1);

/// How long a flow waits for its last echoes after its last send.
const DRAIN: Duration = Duration::from_secs(1);

/// Shortest steady window (all flows open and past their first second) that gets steady
/// CPU figures.
const MIN_STEADY_WINDOW: Duration = Duration::from_millis(500);

/// File descriptors this process holds per sudp flow, counted generously (for a shim that
/// gives each flow its own connection): the flow's socket; in the shim its association's
/// UDP socket and TLS connection; in the gateway the accepted connection and the
/// association's outbound socket; and slack for the epoll and timer machinery. Associations
/// opened on a shared connection have neither a connection nor a UDP socket of their own in
/// the shim, so today's flows need fewer.
pub const FDS_PER_SUDP_FLOW: u64 = 6;

/// Descriptors beside the flows (runtimes, listeners, the reflector, stdio).
const FDS_BASE: u64 = 256;

/// Run many small flows through one shim UDP forward (and directly, as the baseline)
#[derive(Args, Debug, Clone)]
pub struct FlowsArgs {
    /// Number of flows, each from its own local UDP port; 1..=10000
    #[arg(long, default_value_t = DEFAULT_FLOWS)]
    pub flows: usize,
    /// Payload bytes per datagram; 32..=1400
    #[arg(long, default_value_t = DEFAULT_SIZE)]
    pub size: usize,
    /// Time between two datagrams of one flow ("20ms")
    #[arg(long, default_value = "20ms", value_parser = stats::parse_duration)]
    pub interval: Duration,
    /// How long each flow sends (at least 2 s: steady figures start 1 s into each flow)
    #[arg(long, default_value = "10s", value_parser = stats::parse_duration)]
    pub duration: Duration,
    /// The flows start spread evenly over this time ("0ms": all at once)
    #[arg(long, default_value = "1s", value_parser = parse_ramp)]
    pub ramp: Duration,
    /// What to run: through the shim and gateway, direct to the reflector, or both
    #[arg(long, value_enum, default_value_t = FlowModeArg::Both)]
    pub mode: FlowModeArg,
    /// The shim's `max_flows` for its forward. Default: --flows (all admitted); below it,
    /// the run shows how the shim refuses the excess
    #[arg(long)]
    pub shim_max_flows: Option<usize>,
    /// The one cipher suite the shim offers (e.g. aes128-gcm). Default: the shim's list
    #[arg(long)]
    pub suite: Option<String>,
    /// Write the results as JSON
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// `--mode` of `sudp bench flows`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowModeArg {
    /// Through the in-process shim forward and gateway.
    Sudp,
    /// Straight to the reflector.
    Direct,
    /// Direct, then sudp.
    Both,
}

/// How the flows reach the reflector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowMode {
    /// Through one shim UDP forward and the gateway.
    Sudp,
    /// Straight to the reflector.
    Direct,
}

impl FlowMode {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            FlowMode::Sudp => "sudp",
            FlowMode::Direct => "direct",
        }
    }
}

/// Validated options of `sudp bench flows`.
#[derive(Debug, Clone)]
pub struct FlowsOptions {
    /// Flows per mode.
    pub flows: usize,
    /// Payload bytes.
    pub size: usize,
    /// Time between two datagrams of one flow.
    pub interval: Duration,
    /// How long each flow sends.
    pub duration: Duration,
    /// The flows' starts are spread over this.
    pub ramp: Duration,
    /// Modes, in the order they run.
    pub modes: Vec<FlowMode>,
    /// The shim forward's flow limit.
    pub shim_max_flows: usize,
    /// Suites the shim offers; `None`: its default list.
    pub suites: Option<Vec<CipherSuite>>,
}

impl FlowsOptions {
    /// The defaults for `flows` flows (both modes, 172 B every 20 ms for 10 s, 1 s ramp).
    pub fn new(flows: usize) -> Self {
        FlowsOptions {
            flows,
            size: DEFAULT_SIZE,
            interval: Duration::from_millis(20),
            duration: Duration::from_secs(10),
            ramp: Duration::from_secs(1),
            modes: vec![FlowMode::Direct, FlowMode::Sudp],
            shim_max_flows: flows,
            suites: None,
        }
    }

    /// Validates command-line arguments.
    pub fn from_args(a: &FlowsArgs) -> Result<FlowsOptions, BenchError> {
        let suites = match &a.suite {
            None => None,
            Some(name) => Some(vec![CipherSuite::from_name(name.trim()).ok_or_else(|| {
                BenchError::Config(format!(
                    "--suite {name:?}: unknown suite (known: {})",
                    CipherSuite::ALL.map(CipherSuite::name).join(", ")
                ))
            })?]),
        };
        let o = FlowsOptions {
            flows: a.flows,
            size: a.size,
            interval: a.interval,
            duration: a.duration,
            ramp: a.ramp,
            modes: match a.mode {
                FlowModeArg::Sudp => vec![FlowMode::Sudp],
                FlowModeArg::Direct => vec![FlowMode::Direct],
                FlowModeArg::Both => vec![FlowMode::Direct, FlowMode::Sudp],
            },
            shim_max_flows: a.shim_max_flows.unwrap_or(a.flows),
            suites,
        };
        o.validate()?;
        Ok(o)
    }

    /// Checks the bounds; [`run`] calls it too, for options built in code.
    pub fn validate(&self) -> Result<(), BenchError> {
        let err = |m: String| Err(BenchError::Config(m));
        if !(1..=MAX_FLOWS).contains(&self.flows) {
            return err(format!(
                "--flows {}: must be 1..={MAX_FLOWS} (each sudp flow holds about {FDS_PER_SUDP_FLOW} file \
                 descriptors in this process)",
                self.flows
            ));
        }
        if !(1..=MAX_FLOWS).contains(&self.shim_max_flows) {
            return err(format!(
                "--shim-max-flows {}: must be 1..={MAX_FLOWS}",
                self.shim_max_flows
            ));
        }
        if !(PROBE_HEADER..=MAX_FLOW_SIZE).contains(&self.size) {
            return err(format!(
                "--size {}: must be {PROBE_HEADER}..={MAX_FLOW_SIZE} bytes (the probe header takes {PROBE_HEADER})",
                self.size
            ));
        }
        if !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&self.interval) {
            return err("--interval: must be 1ms..=10s".into());
        }
        if self.duration < 2 * STEADY_AFTER || self.duration > Duration::from_secs(3600) {
            return err("--duration: must be 2s..=1h (steady figures start 1 s into each flow)".into());
        }
        if self.ramp > Duration::from_secs(600) {
            return err("--ramp: at most 10 minutes".into());
        }
        if self.modes.is_empty() {
            return err("no mode to run".into());
        }
        Ok(())
    }

    /// Datagrams each flow sends.
    fn planned(&self) -> u64 {
        (self.duration.as_nanos() / self.interval.as_nanos()).max(1) as u64
    }

    /// File descriptors the run needs at most.
    fn fds_needed(&self) -> u64 {
        let per_flow = if self.modes.contains(&FlowMode::Sudp) {
            FDS_PER_SUDP_FLOW
        } else {
            1
        };
        FDS_BASE + per_flow * self.flows as u64
    }
}

fn parse_ramp(text: &str) -> Result<Duration, String> {
    match text.trim() {
        "0" | "0s" | "0ms" => Ok(Duration::ZERO),
        t => stats::parse_duration(t),
    }
}

/// The results of `sudp bench flows`.
#[derive(Debug, Clone, Serialize)]
pub struct FlowsReport {
    /// "sudp bench flows".
    pub tool: &'static str,
    /// Crate version.
    pub version: &'static str,
    /// Flows per mode.
    pub flows: usize,
    /// Payload bytes per datagram.
    pub size: usize,
    /// Time between two datagrams of a flow, ms.
    pub interval_ms: f64,
    /// How long each flow sent, s.
    pub duration_s: f64,
    /// Over how long the flows started, s.
    pub ramp_s: f64,
    /// The shim forward's `max_flows`.
    pub shim_max_flows: usize,
    /// The suites the shim offered, by name.
    pub shim_suites: Vec<&'static str>,
    /// Logical CPUs of the machine.
    pub cpus: usize,
    /// What the figures mean, in words.
    pub notes: &'static str,
    /// One entry per mode.
    pub runs: Vec<FlowsRun>,
}

/// What each figure of a [`FlowsRun`] means, for the report.
pub const FLOWS_NOTES: &str = "admitted: flows with at least one echo. loss: over the admitted flows \
    (sent - distinct echoes) / sent; worst: the admitted flow that lost most. first echo: from a \
    flow's first send to its first echo (any datagram's). steady RTT: round trips of datagrams sent \
    at least 1 s into their flow; out: the way out alone (send to the reflector's receive, one clock). CPU (thread CPU clocks of the shim's and the gateway's runtimes): \
    open = CPU from the first flow's start to 1 s after the last flow's start, divided by the \
    flows (opening plus the first second of traffic); steady = CPU while every flow is past its \
    first second, in microseconds per flow per second of traffic (1 % of a core per flow = 10 000). \
    RSS: the whole process's resident set after the flows opened minus before, divided by the \
    flows (process-wide: includes the load generator, whose share the direct row shows). \
    load gen: CPU of the one thread that drives every flow, percent of one core.";

/// One mode's figures.
#[derive(Debug, Clone, Serialize)]
pub struct FlowsRun {
    /// Mode.
    pub mode: FlowMode,
    /// Flows started.
    pub flows: usize,
    /// Flows with at least one echo.
    pub admitted: usize,
    /// Datagrams sent by the admitted flows.
    pub sent: u64,
    /// Distinct echoes they received.
    pub received: u64,
    /// Loss over the admitted flows, percent.
    pub loss_pct: f64,
    /// The worst admitted flow's loss, percent.
    pub worst_flow_loss_pct: f64,
    /// Extra copies received.
    pub duplicates: u64,
    /// First-echo latency over the admitted flows, ms: median.
    pub first_echo_p50_ms: f64,
    /// 99th percentile.
    pub first_echo_p99_ms: f64,
    /// Largest.
    pub first_echo_max_ms: f64,
    /// Steady round trip, µs: median.
    pub steady_rtt_p50_us: f64,
    /// 99th percentile.
    pub steady_rtt_p99_us: f64,
    /// 99.9th percentile.
    pub steady_rtt_p999_us: f64,
    /// The way out alone (send to the reflector's receive, same clock) of the same datagrams,
    /// µs: median. The rest of the round trip is the way back.
    pub steady_out_p50_us: f64,
    /// 99th percentile.
    pub steady_out_p99_us: f64,
    /// Steady round trips measured.
    pub steady_samples: u64,
    /// Shim CPU from the first start to 1 s after the last, per flow, µs.
    pub shim_open_cpu_us_per_flow: Option<f64>,
    /// Shim CPU while every flow is steady, µs per flow per second.
    pub shim_steady_cpu_us_per_flow_s: Option<f64>,
    /// Gateway CPU, as `shim_open_cpu_us_per_flow`.
    pub gateway_open_cpu_us_per_flow: Option<f64>,
    /// Gateway CPU, as `shim_steady_cpu_us_per_flow_s`.
    pub gateway_steady_cpu_us_per_flow_s: Option<f64>,
    /// Shim + gateway CPU while steady, per round trip completed in that window, µs.
    pub proxy_steady_cpu_us_per_round_trip: Option<f64>,
    /// Process RSS after the flows opened minus before, per flow, KiB (process-wide).
    pub rss_kib_per_flow: Option<f64>,
    /// TLS control connections the gateway accepted during the run (the flows', not the
    /// shim's startup probe): one per flow while every association has its own connection.
    pub gateway_control_connections: Option<u64>,
    /// Associations the gateway opened during the run.
    pub gateway_associations: Option<u64>,
    /// Datagrams the shim refused for its flow limit (`flow_limit` drops).
    pub shim_flow_limit_drops: Option<u64>,
    /// CPU of the load generator's one thread over the run, percent of one core.
    pub load_generator_cpu_pct: Option<f64>,
    /// Share of the machine's CPU that other processes used during the run, percent.
    pub background_cpu_pct: Option<f64>,
    /// Wall time of the run, s.
    pub wall_s: f64,
}

/// Runs every mode of `opts`. Must run on a tokio runtime (the reflector is a task of it);
/// the flows get their own thread and runtime.
pub async fn run(opts: &FlowsOptions) -> Result<FlowsReport, BenchError> {
    opts.validate()?;
    raise_fd_limit(opts.fds_needed())?;
    let mut runs = Vec::with_capacity(opts.modes.len());
    for &mode in &opts.modes {
        runs.push(run_mode(opts, mode).await?);
    }
    Ok(FlowsReport {
        tool: "sudp bench flows",
        version: env!("CARGO_PKG_VERSION"),
        flows: opts.flows,
        size: opts.size,
        interval_ms: opts.interval.as_secs_f64() * 1e3,
        duration_s: opts.duration.as_secs_f64(),
        ramp_s: opts.ramp.as_secs_f64(),
        shim_max_flows: opts.shim_max_flows,
        // `ShimSettings::new` offers every suite unless told otherwise.
        shim_suites: opts
            .suites
            .clone()
            .unwrap_or_else(|| CipherSuite::ALL.to_vec())
            .into_iter()
            .map(CipherSuite::name)
            .collect(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        notes: FLOWS_NOTES,
        runs,
    })
}

/// The in-process shim with one UDP forward, on its own runtime.
struct InProcessShim {
    clocks: ThreadClocks,
    forward: SocketAddr,
    metrics: Arc<crate::metrics::Metrics>,
    hosted: Hosted,
}

impl InProcessShim {
    async fn start(
        gateway: &InProcessGateway,
        target: SocketAddr,
        opts: &FlowsOptions,
    ) -> Result<InProcessShim, BenchError> {
        let setup = |e: &dyn std::fmt::Display| BenchError::Setup(format!("shim: {e}"));
        let mut s = ShimSettings::new(
            vec![GatewayEndpoint {
                addr: Address::Ip(gateway.client.gateway),
                server_name: gateway.client.server_name.clone(),
            }],
            gateway.client.tls.clone(),
        );
        s.socks = None;
        s.forwards = vec![Forward {
            proto: ForwardProto::Udp,
            // Invariant: a literal socket address parses.
            local: "127.0.0.1:0".parse().expect("literal address"),
            target: Address::Ip(target),
        }];
        s.max_flows = opts.shim_max_flows;
        if let Some(suites) = &opts.suites {
            s.suites = suites.clone();
        }
        let clocks = ThreadClocks::default();
        let runtime = super::quiet_runtime("sudp-bench-shim", &clocks)?;
        let shim = runtime
            .spawn(Shim::bind(s))
            .await
            .map_err(|e| setup(&e))?
            .map_err(|e| setup(&e))?;
        let forward = shim
            .forward_addrs()
            .first()
            .map(|(_, a)| *a)
            .ok_or_else(|| BenchError::Setup("shim: no forward bound".into()))?;
        let metrics = shim.metrics();
        // As `sudp shim` does at startup: one association through the gateway, so a refused
        // setup fails here and the TLS session cache is primed as in a running shim.
        runtime
            .spawn(shim.probe())
            .await
            .map_err(|e| setup(&e))?
            .map_err(|e| setup(&e))?;
        let hosted = Hosted::serve(runtime, |stopped| {
            shim.run(async move {
                let _ = stopped.await;
            })
        });
        Ok(InProcessShim {
            clocks,
            forward,
            metrics,
            hosted,
        })
    }

    /// Graceful stop (bounded).
    async fn stop(self) {
        self.hosted.stop().await;
    }
}

/// One mode: reflector, (shim and gateway), the flows, the figures.
async fn run_mode(opts: &FlowsOptions, mode: FlowMode) -> Result<FlowsRun, BenchError> {
    // Invariant: a literal socket address parses.
    let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let reflector = Arc::new(crate::net::bind_udp(any)?);
    let reflector_addr = reflector.local_addr()?;
    // The reflector stamps its receive time on the probes' clock: the echo then tells the
    // way out (application -> reflector) apart from the way back.
    let epoch = Instant::now();
    let _reflect = AbortOnDrop(tokio::spawn(link::reflect(reflector, Some(epoch))));
    let (gateway, shim) = match mode {
        FlowMode::Direct => (None, None),
        FlowMode::Sudp => {
            let g = InProcessGateway::start(opts.flows + 16).await?;
            let s = InProcessShim::start(&g, reflector_addr, opts).await?;
            (Some(g), Some(s))
        }
    };
    let target = shim.as_ref().map_or(reflector_addr, |s| s.forward);
    let result = measure(opts, mode, target, epoch, gateway.as_ref(), shim.as_ref()).await;
    if let Some(s) = shim {
        s.stop().await;
    }
    if let Some(g) = gateway {
        g.stop().await;
    }
    result
}

/// Clock readings at one instant: shim, gateway, load generator (ns).
#[derive(Clone, Copy, Default)]
struct Clocks {
    shim: Option<u64>,
    gateway: Option<u64>,
    driver: Option<u64>,
}

async fn measure(
    opts: &FlowsOptions,
    mode: FlowMode,
    target: SocketAddr,
    epoch: Instant,
    gateway: Option<&InProcessGateway>,
    shim: Option<&InProcessShim>,
) -> Result<FlowsRun, BenchError> {
    let n = opts.flows;
    // The applications' sockets: default buffers, as an application gets unless it asks.
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| {
            BenchError::Setup(format!("binding flow socket {} of {n}: {e}", sockets.len() + 1))
        })?;
        s.connect(target)?;
        s.set_nonblocking(true)?;
        sockets.push(s);
    }
    let driver_clocks = ThreadClocks::default();
    let read = |c: &ThreadClocks| c.total_ns();
    let clocks_now = || Clocks {
        shim: shim.and_then(|s| read(&s.clocks)),
        gateway: gateway.and_then(|g| read(&g.clocks)),
        driver: read(&driver_clocks),
    };
    let plan = Plan {
        flows: n,
        size: opts.size,
        interval: opts.interval,
        duration: opts.duration,
        planned: opts.planned(),
        epoch,
        // Set by the driver once its runtime runs.
        start: Instant::now(),
        ramp: opts.ramp,
        steady_window: steady_window(opts),
    };
    let (ramp, window) = (plan.ramp, plan.steady_window);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let dc = driver_clocks.clone();
    std::thread::Builder::new()
        .name("bench-flows".into())
        .spawn(move || {
            dc.register();
            let r = drive(sockets, plan, ready_tx);
            dc.deregister();
            let _ = tx.send(r);
        })
        .map_err(BenchError::Io)?;
    // The baseline: everything set up (the driver's runtime and histogram included), no flow
    // started; the driver waits [`BASELINE_PAUSE`] before it touches the flows.
    let start = match ready_rx.await {
        Ok(start) => start,
        // The driver failed before it was ready: its own error says why.
        Err(_) => {
            return Err(match rx.await {
                Ok(Err(e)) => e,
                _ => BenchError::Setup("the flow driver did not start".into()),
            })
        }
    };
    let rss0 = rss_bytes();
    let (cpu0, machine0, t0) = (cpu::process_ns(), cpu::machine_busy_ns(), Instant::now());
    let c0 = clocks_now();
    let gw_counts = || {
        gateway.map(|g| {
            (
                g.metrics.connections.load(Ordering::Relaxed),
                g.metrics.associations.load(Ordering::Relaxed),
            )
        })
    };
    let counts0 = gw_counts();

    // The flows are open one second after the last one started.
    tokio::time::sleep_until((start + ramp + STEADY_AFTER).into()).await;
    let (rss1, c1) = (rss_bytes(), clocks_now());
    let c2 = match window {
        Some((_, end)) => {
            tokio::time::sleep_until((start + end).into()).await;
            Some(clocks_now())
        }
        None => None,
    };
    let deadline = start + ramp + opts.duration + DRAIN + Duration::from_secs(30);
    let outcome = tokio::time::timeout_at(deadline.into(), rx)
        .await
        .map_err(|_| BenchError::Setup("the flows did not finish in time".into()))?
        .map_err(|_| BenchError::Setup("the flow driver thread panicked".into()))??;
    let (wall, cpu1, machine1) = (t0.elapsed(), cpu::process_ns(), cpu::machine_busy_ns());
    let counts = counts0
        .zip(gw_counts())
        .map(|((conn0, assoc0), (conn1, assoc1))| {
            (conn1.saturating_sub(conn0), assoc1.saturating_sub(assoc0))
        });
    let c3 = Clocks {
        driver: driver_clocks.total_ns(),
        ..clocks_now()
    };

    let admitted: Vec<&FlowTally> = outcome
        .flows
        .iter()
        .filter(|f| f.first_echo_ns.is_some())
        .collect();
    let sent: u64 = admitted.iter().map(|f| f.sent).sum();
    let received: u64 = admitted.iter().map(|f| f.received).sum();
    let worst = admitted
        .iter()
        .map(|f| loss_pct(f.sent, f.received))
        .fold(0.0f64, f64::max);
    let mut first = Latency::default();
    for f in &admitted {
        if let Some(ns) = f.first_echo_ns {
            first.record(ns);
        }
    }
    let diff = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| b.saturating_sub(a) as f64);
    let open_per_flow = |a: Option<u64>, b: Option<u64>| diff(a, b).map(|ns| round2(ns / 1e3 / n as f64));
    let window_s = window.map(|(a, b)| (b - a).as_secs_f64());
    let steady_per_flow_s = |a: Option<u64>, b: Option<u64>| {
        window_s
            .zip(diff(a, b))
            .map(|(w, ns)| round2(ns / 1e3 / n as f64 / w))
    };
    let (shim_steady, gw_steady) = match c2 {
        Some(c2) => (
            steady_per_flow_s(c1.shim, c2.shim),
            steady_per_flow_s(c1.gateway, c2.gateway),
        ),
        None => (None, None),
    };
    let proxy_per_rt = c2.and_then(|c2| {
        let ns = diff(c1.shim, c2.shim)? + diff(c1.gateway, c2.gateway)?;
        (outcome.window_echoes > 0).then(|| round3(ns / 1e3 / outcome.window_echoes as f64))
    });
    let proxied = mode == FlowMode::Sudp;
    Ok(FlowsRun {
        mode,
        flows: n,
        admitted: admitted.len(),
        sent,
        received,
        loss_pct: round3(loss_pct(sent, received)),
        worst_flow_loss_pct: round3(worst),
        duplicates: outcome.flows.iter().map(|f| f.duplicates).sum(),
        first_echo_p50_ms: round3(first.quantile_us(0.5) / 1e3),
        first_echo_p99_ms: round3(first.quantile_us(0.99) / 1e3),
        first_echo_max_ms: round3(first.quantile_us(1.0) / 1e3),
        steady_rtt_p50_us: round2(outcome.steady.quantile_us(0.5)),
        steady_rtt_p99_us: round2(outcome.steady.quantile_us(0.99)),
        steady_rtt_p999_us: round2(outcome.steady.quantile_us(0.999)),
        steady_out_p50_us: round2(outcome.steady_out.quantile_us(0.5)),
        steady_out_p99_us: round2(outcome.steady_out.quantile_us(0.99)),
        steady_samples: outcome.steady.count(),
        shim_open_cpu_us_per_flow: open_per_flow(c0.shim, c1.shim),
        shim_steady_cpu_us_per_flow_s: shim_steady,
        gateway_open_cpu_us_per_flow: open_per_flow(c0.gateway, c1.gateway),
        gateway_steady_cpu_us_per_flow_s: gw_steady,
        proxy_steady_cpu_us_per_round_trip: proxy_per_rt,
        rss_kib_per_flow: rss0
            .zip(rss1)
            .map(|(a, b)| round2((b as f64 - a as f64) / 1024.0 / n as f64)),
        gateway_control_connections: counts.map(|(c, _)| c),
        gateway_associations: counts.map(|(_, a)| a),
        shim_flow_limit_drops: shim
            .filter(|_| proxied)
            .map(|s| s.metrics.drops(DropReason::FlowLimit)),
        load_generator_cpu_pct: diff(c0.driver.or(Some(0)), c3.driver)
            .map(|ns| round2(ns * 100.0 / wall.as_nanos().max(1) as f64)),
        background_cpu_pct: super::runner::background_pct(cpu0.zip(cpu1), machine0.zip(machine1), wall)
            .map(|p| (p * 10.0).round() / 10.0),
        wall_s: round3(wall.as_secs_f64()),
    })
}

/// The window (offsets from the first start) in which every flow is past its first second
/// and none has stopped; `None` if shorter than [`MIN_STEADY_WINDOW`].
fn steady_window(opts: &FlowsOptions) -> Option<(Duration, Duration)> {
    let (from, to) = (opts.ramp + STEADY_AFTER, opts.duration);
    (to >= from + MIN_STEADY_WINDOW).then_some((from, to))
}

/// What the driver thread runs.
struct Plan {
    flows: usize,
    size: usize,
    interval: Duration,
    duration: Duration,
    planned: u64,
    /// The probes' clock (shared with the reflector's stamps).
    epoch: Instant,
    start: Instant,
    ramp: Duration,
    steady_window: Option<(Duration, Duration)>,
}

impl Plan {
    /// When flow `i` starts: the starts are spread evenly over the ramp.
    fn flow_start(&self, i: usize) -> Instant {
        self.start + self.ramp.mul_f64(i as f64 / self.flows.max(1) as f64)
    }
}

/// One flow's counts.
#[derive(Debug, Clone, Default)]
struct FlowTally {
    sent: u64,
    received: u64,
    duplicates: u64,
    /// First send to first echo, ns.
    first_echo_ns: Option<u64>,
}

/// What every flow shares (one thread: no locks).
struct Shared {
    steady: Latency,
    steady_out: Latency,
    window_echoes: u64,
}

/// Everything the driver measured.
struct Outcome {
    flows: Vec<FlowTally>,
    steady: Latency,
    /// One way out (send to the reflector's receive) of the same datagrams.
    steady_out: Latency,
    /// Echoes received within the steady window (for CPU per round trip).
    window_echoes: u64,
}

/// How long the driver, once ready, leaves the controller to read its baseline before it
/// registers the flows' sockets; the first flow starts twice as long after ready.
const BASELINE_PAUSE: Duration = Duration::from_millis(100);

/// The load generator: one current-thread runtime, a task per flow. Says `ready` with the
/// time the first flow starts.
fn drive(
    sockets: Vec<std::net::UdpSocket>,
    mut plan: Plan,
    ready: tokio::sync::oneshot::Sender<Instant>,
) -> Result<Outcome, BenchError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Io)?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let shared = Rc::new(RefCell::new(Shared {
            steady: Latency::default(),
            steady_out: Latency::default(),
            window_echoes: 0,
        }));
        plan.start = Instant::now() + 2 * BASELINE_PAUSE;
        let _ = ready.send(plan.start);
        tokio::time::sleep(BASELINE_PAUSE).await;
        let plan = Rc::new(plan);
        let mut tasks = Vec::with_capacity(sockets.len());
        for (i, s) in sockets.into_iter().enumerate() {
            let sock = UdpSocket::from_std(s)?;
            tasks.push(tokio::task::spawn_local(flow(
                i as u32,
                sock,
                plan.clone(),
                shared.clone(),
            )));
        }
        let mut flows = Vec::with_capacity(tasks.len());
        for t in tasks {
            flows.push(
                t.await
                    .map_err(|e| BenchError::Setup(format!("flow task: {e}")))?,
            );
        }
        let shared = shared.borrow();
        Ok(Outcome {
            flows,
            steady: shared.steady.clone(),
            steady_out: shared.steady_out.clone(),
            window_echoes: shared.window_echoes,
        })
    })
}

/// One flow: a datagram every interval for the duration, then the drain; every echo counted.
async fn flow(id: u32, sock: UdpSocket, plan: Rc<Plan>, shared: Rc<RefCell<Shared>>) -> FlowTally {
    let begin = plan.flow_start(id as usize);
    let end = begin + plan.duration;
    let steady_from = begin + STEADY_AFTER;
    let window = plan.steady_window.map(|(a, b)| (plan.start + a, plan.start + b));
    let mut payload = vec![0u8; plan.size];
    for (i, b) in payload[PROBE_HEADER..].iter_mut().enumerate() {
        *b = i as u8;
    }
    // Echoes are our own datagrams; anything longer is not ours and is cut short harmlessly.
    let mut buf = vec![0u8; plan.size + 64];
    let mut seen = SeqTracker::new(plan.planned);
    let mut tally = FlowTally::default();
    let mut first_send: Option<Instant> = None;
    tokio::time::sleep_until(begin.into()).await;
    let mut next = begin;
    let give_up = end + DRAIN;
    loop {
        let sending = tally.sent < plan.planned && next < end;
        if !sending && tally.received >= tally.sent {
            break;
        }
        tokio::select! {
            r = sock.recv(&mut buf) => {
                let now = Instant::now();
                let n = match r {
                    Ok(n) => n,
                    Err(e) if is_transient(&e) => continue,
                    Err(_) => break,
                };
                let Some(p) = Probe::parse(&buf[..n]) else { continue };
                if p.stream != id || p.run != 0 {
                    continue;
                }
                match seen.record(p.seq) {
                    stats::Arrival::Duplicate => {
                        tally.duplicates += 1;
                        continue;
                    }
                    // A sequence number this flow never sends: not ours.
                    stats::Arrival::OutOfRange => continue,
                    stats::Arrival::InOrder | stats::Arrival::Reordered => {}
                }
                tally.received = seen.received();
                let sent_at = plan.epoch + Duration::from_nanos(p.tx_ns);
                let rtt = now.saturating_duration_since(sent_at).as_nanos() as u64;
                if tally.first_echo_ns.is_none() {
                    tally.first_echo_ns = first_send.map(|t| now.saturating_duration_since(t).as_nanos() as u64);
                }
                let mut sh = shared.borrow_mut();
                if sent_at >= steady_from {
                    sh.steady.record(rtt);
                    if p.rx_ns > 0 {
                        sh.steady_out.record(p.rx_ns.saturating_sub(p.tx_ns));
                    }
                }
                if window.is_some_and(|(a, b)| now >= a && now < b) {
                    sh.window_echoes += 1;
                }
            }
            _ = tokio::time::sleep_until(next.into()), if sending => {
                let now = Instant::now();
                let probe = Probe {
                    seq: tally.sent,
                    // On the reflector's clock, so the echo tells its own send time and the
                    // way out.
                    tx_ns: now.saturating_duration_since(plan.epoch).as_nanos() as u64,
                    rx_ns: 0,
                    run: 0,
                    stream: id,
                };
                probe.encode(&mut payload);
                // A refused send (buffer full) is a lost datagram, counted as sent.
                let _ = sock.try_send(&payload);
                first_send.get_or_insert(now);
                tally.sent += 1;
                next = begin + plan.interval * tally.sent as u32;
            }
            _ = tokio::time::sleep_until(give_up.into()), if !sending => break,
        }
    }
    tally
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, then checks that `needed` fit.
fn raise_fd_limit(needed: u64) -> Result<(), BenchError> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid, writable rlimit.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return Ok(());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: `raised` is a valid rlimit no higher than the hard limit.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        // rlim_t is u64 on Linux but not on every unix.
        #[allow(clippy::unnecessary_cast)]
        fd_limit_fits(needed, lim.rlim_cur as u64, lim.rlim_max as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = needed;
        Ok(())
    }
}

/// The check of [`raise_fd_limit`], apart for tests.
fn fd_limit_fits(needed: u64, soft: u64, hard: u64) -> Result<(), BenchError> {
    if soft >= needed {
        return Ok(());
    }
    Err(BenchError::Config(format!(
        "this many flows need about {needed} file descriptors, but this process may open only {soft} \
         (hard limit {hard}): raise it (`ulimit -n {needed}`, or LimitNOFILE= under systemd) or ask for \
         fewer --flows"
    )))
}

/// The process's resident set, bytes (`/proc/self/statm`); `None` where there is none.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    #[cfg(unix)]
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    #[cfg(not(unix))]
    let page = 4096;
    Some(pages * page)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The report as text: one row per mode, then the notes.
pub fn table(r: &FlowsReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "sudp bench flows {} · {} flows × {} B every {} ms, {:.1} s each, started over {:.1} s · one shim UDP \
         forward (max_flows {}, suites {}) · in-process on loopback, {} CPUs",
        r.version,
        r.flows,
        r.size,
        r.interval_ms,
        r.duration_s,
        r.ramp_s,
        r.shim_max_flows,
        r.shim_suites.join(","),
        r.cpus
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<7} {:>6} {:>8} {:>7} {:>7}  {:>27}  {:>21}  {:>15}  {:>15}  {:>8} {:>9} {:>7} {:>5}",
        "mode",
        "flows",
        "admitted",
        "loss%",
        "worst%",
        "first echo ms p50/p99/max",
        "steady µs RTT p50/p99 out p99",
        "shim µs open/s",
        "gw µs open/s",
        "µs/rt",
        "RSS KiB/f",
        "loadgen%",
        "bg%"
    );
    let opt = |x: Option<f64>, p: usize| x.map_or("-".to_owned(), |v| format!("{v:.p$}"));
    for x in &r.runs {
        let _ = writeln!(
            out,
            "{:<7} {:>6} {:>8} {:>7.3} {:>7.3}  {:>27}  {:>21}  {:>15}  {:>15}  {:>8} {:>9} {:>7} {:>5}",
            x.mode.name(),
            x.flows,
            x.admitted,
            x.loss_pct,
            x.worst_flow_loss_pct,
            format!(
                "{:.1}/{:.1}/{:.1}",
                x.first_echo_p50_ms, x.first_echo_p99_ms, x.first_echo_max_ms
            ),
            format!(
                "{:.0}/{:.0} {:.0}",
                x.steady_rtt_p50_us, x.steady_rtt_p99_us, x.steady_out_p99_us
            ),
            format!(
                "{}/{}",
                opt(x.shim_open_cpu_us_per_flow, 0),
                opt(x.shim_steady_cpu_us_per_flow_s, 0)
            ),
            format!(
                "{}/{}",
                opt(x.gateway_open_cpu_us_per_flow, 0),
                opt(x.gateway_steady_cpu_us_per_flow_s, 0)
            ),
            opt(x.proxy_steady_cpu_us_per_round_trip, 2),
            opt(x.rss_kib_per_flow, 1),
            opt(x.load_generator_cpu_pct, 0),
            opt(x.background_cpu_pct, 0),
        );
    }
    for x in &r.runs {
        if let (Some(c), Some(a)) = (x.gateway_control_connections, x.gateway_associations) {
            let _ = writeln!(
                out,
                "{}: the gateway accepted {c} control connections and opened {a} associations for {} admitted flows",
                x.mode.name(),
                x.admitted
            );
        }
    }
    for x in r.runs.iter().filter(|x| x.shim_flow_limit_drops.unwrap_or(0) > 0) {
        let _ = writeln!(
            out,
            "{}: the shim refused {} datagrams of {} flows beyond its max_flows (flow_limit drops)",
            x.mode.name(),
            x.shim_flow_limit_drops.unwrap_or(0),
            x.flows - x.admitted
        );
    }
    let find = |m: FlowMode| r.runs.iter().find(|x| x.mode == m);
    if let (Some(d), Some(s)) = (find(FlowMode::Direct), find(FlowMode::Sudp)) {
        let _ = writeln!(
            out,
            "sudp against direct: steady RTT p99 {:+.0} µs, first echo p99 {:.1} ms (direct {:.1}), \
             loss {:.3} % (worst flow {:.3} %), {} of {} flows admitted (issue 14 goals: no loss, \
             steady p99 within 1 ms of direct, first-echo p99 under 20 ms)",
            s.steady_rtt_p99_us - d.steady_rtt_p99_us,
            s.first_echo_p99_ms,
            d.first_echo_p99_ms,
            s.loss_pct,
            s.worst_flow_loss_pct,
            s.admitted,
            s.flows
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "{}", wrap(r.notes, 100));
    out
}

fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = 0;
    for w in text.split_whitespace() {
        if line > 0 && line + 1 + w.len() > width {
            out.push('\n');
            line = 0;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(w);
        line += w.len();
    }
    out
}

/// `sudp bench flows` from the command line.
pub async fn run_cli(
    args: &FlowsArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let opts = FlowsOptions::from_args(args)?;
    eprintln!(
        "sudp bench flows: {} flows per mode ({}), about {:.0} s per mode",
        opts.flows,
        opts.modes.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
        (opts.ramp + opts.duration + DRAIN).as_secs_f64() + 1.0
    );
    let report = tokio::select! {
        r = run(&opts) => r?,
        _ = shutdown => anyhow::bail!("interrupted"),
    };
    print!("{}", table(&report));
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(p, text + "\n")?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_counts_and_durations_are_bounded() {
        let ok = FlowsOptions::new(20);
        assert!(ok.validate().is_ok());
        for bad in [
            FlowsOptions::new(0),
            FlowsOptions::new(MAX_FLOWS + 1),
            FlowsOptions {
                shim_max_flows: 0,
                ..ok.clone()
            },
            FlowsOptions {
                duration: Duration::from_millis(1500),
                ..ok.clone()
            },
            FlowsOptions {
                size: PROBE_HEADER - 1,
                ..ok.clone()
            },
            FlowsOptions {
                interval: Duration::ZERO,
                ..ok.clone()
            },
        ] {
            assert!(matches!(bad.validate(), Err(BenchError::Config(_))), "{bad:?}");
        }
        let e = FlowsOptions::new(MAX_FLOWS + 1)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--flows 10001") && e.contains("1..=10000"), "{e}");
    }

    #[test]
    fn fd_limit_check_names_what_is_needed() {
        assert!(fd_limit_fits(1000, 1024, 4096).is_ok());
        let e = fd_limit_fits(6256, 1024, 4096).unwrap_err().to_string();
        assert!(
            e.contains("6256") && e.contains("1024") && e.contains("4096"),
            "{e}"
        );
        assert_eq!(FlowsOptions::new(1000).fds_needed(), FDS_BASE + 6000);
        let direct = FlowsOptions {
            modes: vec![FlowMode::Direct],
            ..FlowsOptions::new(1000)
        };
        assert_eq!(direct.fds_needed(), FDS_BASE + 1000);
    }

    #[test]
    fn steady_window_needs_every_flow_past_its_first_second() {
        let o = FlowsOptions::new(10);
        // 1 s ramp, 10 s flows: from 2 s (the last flow 1 s in) to 10 s (the first one ends).
        assert_eq!(
            steady_window(&o),
            Some((Duration::from_secs(2), Duration::from_secs(10)))
        );
        let short = FlowsOptions {
            duration: Duration::from_secs(2),
            ..o.clone()
        };
        assert_eq!(steady_window(&short), None);
        let plan = Plan {
            flows: 4,
            size: 172,
            interval: Duration::from_millis(20),
            duration: Duration::from_secs(2),
            planned: 100,
            epoch: Instant::now(),
            start: Instant::now(),
            ramp: Duration::from_secs(1),
            steady_window: None,
        };
        assert_eq!(plan.flow_start(2) - plan.start, Duration::from_millis(500));
        assert_eq!(o.planned(), 500);
    }

    #[test]
    fn ramp_zero_parses() {
        assert_eq!(parse_ramp("0"), Ok(Duration::ZERO));
        assert_eq!(parse_ramp("0ms"), Ok(Duration::ZERO));
        assert_eq!(parse_ramp("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_ramp("-1s").is_err());
    }
}
