//! `sudp bench`: how many datagrams the path carries, how late and at what CPU cost.
//!
//! With no arguments it builds the whole path in this process on loopback and measures
//! three modes over the same reflector:
//!
//! ```text
//!             ┌──────────────────────────── one process ────────────────────────────────┐
//!  secure     │ sender ─ SecureUdp ══ records ══▶ gateway relay ─ plain UDP ─▶ reflector │
//!             │ receiver ◀══════════ records ════ (own runtime) ◀─ plain UDP ─┘          │
//!  naked      │ sender ─ NakedUdp ── RFC 1928 §7 ─▶ same relay  ─ plain UDP ─▶ reflector │
//!  direct     │ sender ─ UDP socket ─────────────────────────────────────────▶ reflector │
//!             └──────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! The gateway is the real one ([`crate::gateway::Gateway`], ephemeral certificate from
//! [`crate::cert::ephemeral`], policy allowing 127.0.0.0/8) on its own tokio runtime, so its
//! threads' CPU time can be told apart from the load generator's. Every datagram carries a
//! probe header ([`stats`]); the reflector echoes it, stamping its receive time, and the
//! sender's receiver accounts loss, reordering, duplicates, one-way latency and RFC 3550
//! jitter. Counts are round trips: a delivered datagram crossed the proxy twice.
//!
//! For each mode and payload size, unless `--rate` fixes the rate, a search of short probes
//! finds the highest rate with loss below 1 % ([`runner::Bed::find_rate`]), then one
//! measured run at that rate gives the figures.
//!
//! Against a real deployment, `--socks ADDR --target HOST:PORT` drives any plain SOCKS5 UDP
//! proxy (naked) and the target directly, with `sudp bench reflect --listen ADDR` (or any UDP
//! echo server) at the far end; latency is then the round trip halved.
//!
//! `sudp bench flows` ([`flows`]) is the many-flow scenario: N small VoIP-shaped flows, each
//! from its own local port, through one in-process shim UDP forward and the gateway, and
//! direct, all driven by one event loop.

pub mod cpu;
pub mod flows;
pub mod link;
pub mod report;
pub mod runner;
pub mod stats;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::client::{ClientError, ClientOptions, SecureUdp};
use crate::gateway::{AuthSettings, Gateway, Settings};
use crate::policy::{Action, Policy, Rule};
use crate::proto::socks::Address;
use crate::tls::{ClientTlsOptions, ServerTlsOptions, ServerTrust};
use cpu::ThreadClocks;
use link::Link;
use runner::{fmt_pps, Bed, Sample};
use stats::{LatencyKind, Rate, PROBE_HEADER};

/// Payload sizes measured by default: tiny, VoIP, small, typical QUIC/RTP, near the
/// Ethernet MTU, and a large (IP-fragmented) datagram.
pub const DEFAULT_SIZES: [usize; 6] = [64, 200, 512, 1200, 1400, 8192];

/// Largest payload the bench sends (fits a secure record in one IPv4 UDP datagram).
pub const MAX_SIZE: usize = 65_000;

/// Default length of each measured run.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(2);

/// Default length of each search probe.
pub const DEFAULT_PROBE: Duration = Duration::from_millis(500);

/// Measure datagram throughput, loss, latency and CPU cost through the gateway
#[derive(Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// Payload sizes in bytes (repeat or comma-separate); 32..=65000
    #[arg(long = "size", value_delimiter = ',', default_values_t = DEFAULT_SIZES)]
    sizes: Vec<usize>,
    /// Fixed rate for every run: datagrams/s ("20000", "50k") or payload bit/s ("200Mbit",
    /// "1.5Gbit"). Default: search each size for the highest rate with loss below 1 % and
    /// no queue building up
    #[arg(long, value_parser = stats::parse_rate)]
    rate: Option<Rate>,
    /// Length of each measured run ("3s", "500ms")
    #[arg(long, default_value = "2s", value_parser = stats::parse_duration)]
    duration: Duration,
    /// Length of each rate-search probe
    #[arg(long, default_value = "500ms", value_parser = stats::parse_duration)]
    probe: Duration,
    /// Parallel associations (each with its own sender thread, receiver and reflector)
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Skip the extra 1 s run at half the sustained rate that measures latency under
    /// moderate load (it follows each searched run by default)
    #[arg(long)]
    no_half: bool,
    /// What to measure: secure records through the gateway, naked SOCKS5 UDP through the
    /// gateway, direct (no proxy), both (secure + naked) or all three. Default: all (with
    /// --socks: naked and direct)
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// Write the results as JSON (one object per run under "runs")
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the results as CSV (one row per run)
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Draw throughput and latency by payload size as SVG
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Drive a running plain SOCKS5 proxy (TCP, no TLS) at ADDR instead of the in-process
    /// gateway; needs --target
    #[arg(long, value_name = "HOST:PORT", requires = "target")]
    socks: Option<String>,
    /// The far-end reflector (`sudp bench reflect`, or any UDP echo server)
    #[arg(long, value_name = "HOST:PORT")]
    target: Option<String>,
    /// Username for the SOCKS5 proxy (RFC 1929)
    #[arg(long, requires = "socks")]
    socks_user: Option<String>,
    /// Password for the SOCKS5 proxy
    #[arg(
        long,
        env = "SUDP_BENCH_SOCKS_PASSWORD",
        requires = "socks_user",
        hide_env_values = true
    )]
    socks_password: Option<String>,
}

/// Sub-commands of `sudp bench`.
#[derive(Subcommand, Debug, Clone)]
pub enum BenchCommand {
    /// Echo every UDP datagram back to its sender: the far end of `sudp bench --target`
    Reflect(ReflectArgs),
    /// Many small flows (VoIP-shaped, each from its own local port) through one in-process
    /// shim UDP forward and gateway, and directly as the baseline
    Flows(flows::FlowsArgs),
}

/// `sudp bench reflect`.
#[derive(Args, Debug, Clone)]
pub struct ReflectArgs {
    /// Address to listen on
    #[arg(long, default_value = "0.0.0.0:9000")]
    pub listen: SocketAddr,
}

/// `--mode` values.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeArg {
    /// Secure records through the gateway.
    Secure,
    /// Secure records carried inside the TLS control connection (`--transport tls`).
    Tls,
    /// Conventional SOCKS5 UDP through the proxy.
    Naked,
    /// No proxy.
    Direct,
    /// Secure and naked.
    Both,
    /// Secure, naked and direct.
    All,
}

/// One way of carrying the datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Secure-UDP records through the gateway.
    Secure,
    /// Secure-UDP records inside the TLS control connection (PROTOCOL.md §6.4).
    Tls,
    /// Conventional SOCKS5 UDP (RFC 1928 §7) through the proxy.
    Naked,
    /// Straight to the reflector.
    Direct,
}

impl Mode {
    /// Lower-case name.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Secure => "secure",
            Mode::Tls => "tls",
            Mode::Naked => "naked",
            Mode::Direct => "direct",
        }
    }
}

/// Bench errors.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Invalid options.
    #[error("{0}")]
    Config(String),
    /// Could not build the path (gateway, certificates, runtime).
    #[error("setup: {0}")]
    Setup(String),
    /// Socket failure.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Could not open an association.
    #[error("{mode} association: {source}")]
    Associate {
        /// Which mode.
        mode: &'static str,
        /// Why.
        source: ClientError,
    },
    /// Nothing came back during the warm-up.
    #[error("{} mode: none of {sent} warm-up datagrams came back (is the reflector running and reachable?)", mode.name())]
    NoEcho {
        /// Which mode.
        mode: Mode,
        /// Datagrams sent.
        sent: u64,
    },
}

/// Where the far end is, for runs against a real deployment.
#[derive(Debug, Clone)]
pub struct Remote {
    /// Plain SOCKS5 proxy (naked mode), host:port.
    pub socks: Option<String>,
    /// RFC 1929 credentials for the proxy.
    pub credentials: Option<(String, String)>,
    /// Reflector, host:port.
    pub target: String,
}

/// Validated bench options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Modes, in the order they run.
    pub modes: Vec<Mode>,
    /// Payload sizes, ascending.
    pub sizes: Vec<usize>,
    /// Fixed rate; `None` searches.
    pub rate: Option<Rate>,
    /// Measured run length.
    pub duration: Duration,
    /// Search probe length.
    pub probe: Duration,
    /// Parallel associations.
    pub streams: usize,
    /// After each searched run, measure latency at half the rate found.
    pub half: bool,
    /// Far end; `None`: everything in-process.
    pub remote: Option<Remote>,
}

impl Default for Options {
    /// The no-argument run: all modes, [`DEFAULT_SIZES`], searched rates, one stream.
    fn default() -> Self {
        Options {
            modes: vec![Mode::Secure, Mode::Naked, Mode::Direct],
            sizes: DEFAULT_SIZES.to_vec(),
            rate: None,
            duration: DEFAULT_DURATION,
            probe: DEFAULT_PROBE,
            streams: 1,
            half: true,
            remote: None,
        }
    }
}

impl Options {
    /// Validates command-line arguments.
    pub fn from_args(a: &BenchArgs) -> Result<Options, BenchError> {
        let remote = match (&a.socks, &a.target) {
            (None, None) => None,
            (socks, Some(target)) => Some(Remote {
                socks: socks.clone(),
                credentials: a
                    .socks_user
                    .clone()
                    .map(|u| (u, a.socks_password.clone().unwrap_or_default())),
                target: target.clone(),
            }),
            (Some(_), None) => return Err(BenchError::Config("--socks needs --target".into())),
        };
        let modes = match (a.mode, &remote) {
            (None, None) | (Some(ModeArg::All), None) => vec![Mode::Secure, Mode::Naked, Mode::Direct],
            (Some(ModeArg::Both), None) => vec![Mode::Secure, Mode::Naked],
            (None, Some(r)) if r.socks.is_some() => vec![Mode::Naked, Mode::Direct],
            (None, Some(_)) => vec![Mode::Direct],
            (Some(ModeArg::Secure), _) => vec![Mode::Secure],
            (Some(ModeArg::Tls), _) => vec![Mode::Tls],
            (Some(ModeArg::Naked), _) => vec![Mode::Naked],
            (Some(ModeArg::Direct), _) => vec![Mode::Direct],
            (Some(ModeArg::Both | ModeArg::All), Some(_)) => vec![Mode::Secure],
        };
        if let Some(r) = &remote {
            if modes.contains(&Mode::Secure) || modes.contains(&Mode::Tls) {
                return Err(BenchError::Config(
                    "secure mode runs against the in-process gateway only: with --socks/--target use \
                     --mode naked or direct"
                        .into(),
                ));
            }
            if modes.contains(&Mode::Naked) && r.socks.is_none() {
                return Err(BenchError::Config(
                    "naked mode with --target needs --socks".into(),
                ));
            }
        }
        let mut sizes = a.sizes.clone();
        sizes.sort_unstable();
        sizes.dedup();
        if sizes.is_empty() {
            return Err(BenchError::Config("--size: give at least one size".into()));
        }
        if let Some(bad) = sizes.iter().find(|&&s| !(PROBE_HEADER..=MAX_SIZE).contains(&s)) {
            return Err(BenchError::Config(format!(
                "--size {bad}: sizes must be {PROBE_HEADER}..={MAX_SIZE} bytes (the probe header takes \
                 {PROBE_HEADER})"
            )));
        }
        if !(1..=64).contains(&a.streams) {
            return Err(BenchError::Config("--streams must be 1..=64".into()));
        }
        Ok(Options {
            modes,
            sizes,
            rate: a.rate,
            duration: a.duration,
            probe: a.probe,
            streams: a.streams,
            half: !a.no_half,
            remote,
        })
    }
}

/// The results of a bench.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// "sudp bench".
    pub tool: &'static str,
    /// Crate version.
    pub version: &'static str,
    /// What was measured, in words.
    pub path: String,
    /// What the latency figures are.
    pub latency: LatencyKind,
    /// The same in words.
    pub latency_note: &'static str,
    /// What the CPU figures include.
    pub cpu_note: &'static str,
    /// Parallel associations.
    pub streams: usize,
    /// Logical CPUs of the machine.
    pub cpus: usize,
    /// One entry per measured run.
    pub runs: Vec<RunResult>,
}

/// Note on the CPU columns, for reports.
pub const CPU_NOTE: &str = "cpu_us_per_datagram: user+sys CPU time of the whole bench process \
    (getrusage) over the run divided by datagrams delivered; it includes the load generator \
    (sender, receiver, reflector) and, in-process, the gateway. gateway_cpu_us_per_datagram: the \
    in-process gateway runtime's threads alone (per-thread CPU clocks), both directions of the \
    round trip.";

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Mode.
    pub mode: Mode,
    /// Payload bytes per datagram.
    pub size: usize,
    /// Parallel associations.
    pub streams: usize,
    /// "search" (highest sustained rate), "half" (half of that, for latency) or "fixed"
    /// (`--rate`).
    pub rate_source: &'static str,
    /// Rate asked of the senders.
    pub requested_pps: f64,
    /// Rate the senders achieved.
    pub offered_pps: f64,
    /// Round trips completed per second.
    pub delivered_pps: f64,
    /// Payload Mbit/s delivered (UDP payload only).
    pub mbps: f64,
    /// Datagrams sent.
    pub sent: u64,
    /// Distinct datagrams that came back.
    pub received: u64,
    /// Loss, percent of sent.
    pub loss_pct: f64,
    /// Datagrams that came back after a later one (RFC 4737).
    pub reordered: u64,
    /// Extra copies received.
    pub duplicates: u64,
    /// Latency percentiles, µs (see the report's `latency`).
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// RFC 3550 interarrival jitter, µs.
    pub jitter_us: f64,
    /// Process CPU per delivered datagram, µs (includes the load generator).
    pub cpu_us_per_datagram: Option<f64>,
    /// Gateway threads' CPU per delivered datagram, µs (in-process secure/naked only).
    pub gateway_cpu_us_per_datagram: Option<f64>,
    /// Share of the machine's CPU that other processes (and kernel threads) used during the
    /// run, percent: above a few percent the figures are lower and noisier than the
    /// machine can do.
    pub background_cpu_pct: Option<f64>,
    /// Sends refused by the socket (counted as sent and lost).
    pub send_errors: u64,
    /// Measured run length, s.
    pub duration_s: f64,
}

impl RunResult {
    fn new(mode: Mode, size: usize, streams: usize, rate_source: &'static str, s: &Sample) -> Self {
        let per_dgram = |ns: Option<u64>| {
            ns.filter(|_| s.received > 0)
                .map(|ns| ns as f64 / 1e3 / s.received as f64)
        };
        RunResult {
            mode,
            size,
            streams,
            rate_source,
            requested_pps: s.requested_pps.round(),
            offered_pps: s.offered_pps().round(),
            delivered_pps: s.delivered_pps().round(),
            mbps: round2(s.delivered_pps() * size as f64 * 8.0 / 1e6),
            sent: s.sent,
            received: s.received,
            loss_pct: round3(s.loss_pct()),
            reordered: s.reordered,
            duplicates: s.duplicates,
            p50_us: round2(s.latency.quantile_us(0.5)),
            p99_us: round2(s.latency.quantile_us(0.99)),
            p999_us: round2(s.latency.quantile_us(0.999)),
            max_us: round2(s.latency.quantile_us(1.0)),
            jitter_us: round2(s.jitter_ns / 1e3),
            cpu_us_per_datagram: per_dgram(s.cpu_ns).map(round3),
            gateway_cpu_us_per_datagram: per_dgram(s.gateway_cpu_ns).map(round3),
            background_cpu_pct: s.background_cpu_pct.map(|p| (p * 10.0).round() / 10.0),
            send_errors: s.send_errors,
            duration_s: round3(s.window.as_secs_f64()),
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Progress on stderr (indicatif); hidden when stderr is not a terminal or for tests. With
/// [`Progress::with_rows`], each measured run's table row also goes to stdout as it
/// finishes, for a log or a pipe that would otherwise see nothing for minutes.
pub struct Progress {
    bar: ProgressBar,
    /// Rows streamed to stdout: `Some(header printed yet)`.
    rows: Option<std::sync::atomic::AtomicBool>,
}

impl Progress {
    /// A bar over `steps` (mode, size) pairs on stderr.
    pub fn stderr(steps: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
        // Invariant: the template is a constant in indicatif's syntax.
        let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:24} {pos}/{len} {msg}")
            .expect("valid progress template");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress { bar, rows: None }
    }

    /// No output.
    pub fn hidden() -> Self {
        Progress {
            bar: ProgressBar::hidden(),
            rows: None,
        }
    }

    /// Also prints each measured run's row on stdout as it finishes (`on`), the column
    /// header before the first.
    pub fn with_rows(mut self, on: bool) -> Self {
        self.rows = on.then(|| std::sync::atomic::AtomicBool::new(false));
        self
    }

    /// Whether rows are streamed (so the final table leaves them out).
    pub fn streams_rows(&self) -> bool {
        self.rows.is_some()
    }

    /// A measured run finished: its row, if rows are streamed.
    fn row(&self, x: &RunResult) {
        let Some(header_done) = &self.rows else { return };
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let mut text = String::new();
        if !header_done.swap(true, std::sync::atomic::Ordering::Relaxed) {
            text.push_str(&report::columns());
        }
        text.push_str(&report::row(x));
        // A closed stdout must not end the run; the summary's print reports it.
        let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    }

    /// Says what runs now.
    pub fn phase(&self, msg: String) {
        self.bar.set_message(msg);
    }

    fn step(&self) {
        self.bar.inc(1);
    }

    /// Prints a line above the bar.
    pub fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Runs the bench described by `opts`.
///
/// Must run on a multi-threaded tokio runtime (sender threads drive sends through it).
pub async fn run(opts: &Options, progress: &Progress) -> Result<Report, BenchError> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (path, latency, runs) = match &opts.remote {
        None => (
            format!("in-process on loopback: gateway, reflector and load generator share {cpus} CPUs"),
            LatencyKind::OneWay,
            local(opts, progress).await?,
        ),
        Some(r) => (
            match &r.socks {
                Some(s) => format!("SOCKS5 proxy {s} -> reflector {}", r.target),
                None => format!("direct -> reflector {}", r.target),
            },
            LatencyKind::HalfRtt,
            remote(opts, r, progress).await?,
        ),
    };
    Ok(Report {
        tool: "sudp bench",
        version: env!("CARGO_PKG_VERSION"),
        path,
        latency,
        latency_note: latency.describe(),
        cpu_note: CPU_NOTE,
        streams: opts.streams,
        cpus,
        runs,
    })
}

/// The in-process path: gateway, reflectors, links.
async fn local(opts: &Options, progress: &Progress) -> Result<Vec<RunResult>, BenchError> {
    let epoch = Instant::now();
    let needs_gateway = opts.modes.iter().any(|m| *m != Mode::Direct);
    let mut gateway = if needs_gateway {
        progress.phase("starting the gateway".into());
        Some(InProcessGateway::start(4 * opts.streams + 8).await?)
    } else {
        None
    };
    let mut runs = Vec::new();
    let mut result = Ok(());
    for &mode in &opts.modes {
        let mut reflectors = Vec::with_capacity(opts.streams);
        let mut targets = Vec::with_capacity(opts.streams);
        for _ in 0..opts.streams {
            // Invariant: a literal socket address parses.
            let s = Arc::new(crate::net::bind_udp(
                "127.0.0.1:0".parse().expect("literal address"),
            )?);
            targets.push(s.local_addr()?);
            reflectors.push(AbortOnDrop(tokio::spawn(link::reflect(s, Some(epoch)))));
        }
        let mut links = Vec::with_capacity(opts.streams);
        for t in targets {
            links.push(match (mode, &gateway) {
                (Mode::Direct, _) => Link::direct(t).await?,
                (Mode::Naked, Some(g)) => Link::Naked(
                    link::naked_via_gateway(&g.client)
                        .await
                        .map_err(|source| BenchError::Associate {
                            mode: "naked",
                            source,
                        })?,
                    Address::Ip(t),
                ),
                (Mode::Secure, Some(g)) => Link::Secure(
                    Box::new(SecureUdp::connect(&g.client).await.map_err(|source| {
                        BenchError::Associate {
                            mode: "secure",
                            source,
                        }
                    })?),
                    Address::Ip(t),
                ),
                (Mode::Tls, Some(g)) => {
                    let opts = ClientOptions {
                        transport: crate::client::Transport::Tls,
                        ..g.client.clone()
                    };
                    Link::Secure(
                        Box::new(
                            SecureUdp::connect(&opts)
                                .await
                                .map_err(|source| BenchError::Associate { mode: "tls", source })?,
                        ),
                        Address::Ip(t),
                    )
                }
                (_, None) => return Err(BenchError::Setup("no gateway".into())),
            });
        }
        let clocks = gateway
            .as_ref()
            .filter(|_| mode != Mode::Direct)
            .map(|g| g.clocks.clone());
        let mut bed = Bed::new(mode, links, epoch, LatencyKind::OneWay, clocks)?;
        result = measure_mode(&mut bed, opts, progress, false, &mut runs).await;
        drop(bed);
        drop(reflectors);
        if result.is_err() {
            break;
        }
    }
    if let Some(g) = gateway.take() {
        g.stop().await;
    }
    result.map(|()| runs)
}

/// The remote path: a plain SOCKS5 proxy and/or the target directly.
async fn remote(opts: &Options, r: &Remote, progress: &Progress) -> Result<Vec<RunResult>, BenchError> {
    let epoch = Instant::now();
    let target_addr = match r.target.parse::<SocketAddr>() {
        Ok(a) => Address::Ip(a),
        Err(_) => {
            let (host, port) = r
                .target
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .ok_or_else(|| BenchError::Config(format!("--target {}: expected HOST:PORT", r.target)))?;
            Address::Domain(host.to_owned(), port)
        }
    };
    let mut runs = Vec::new();
    for &mode in &opts.modes {
        let mut links = Vec::with_capacity(opts.streams);
        for _ in 0..opts.streams {
            links.push(match mode {
                Mode::Direct => Link::direct(resolve(&r.target).await?).await?,
                Mode::Naked => {
                    let socks = r
                        .socks
                        .as_deref()
                        .ok_or_else(|| BenchError::Config("naked needs --socks".into()))?;
                    let proxy = resolve(socks).await?;
                    let creds = r.credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
                    let udp = link::naked_via_socks(proxy, creds, Duration::from_secs(10))
                        .await
                        .map_err(|source| BenchError::Associate {
                            mode: "naked",
                            source,
                        })?;
                    Link::Naked(udp, target_addr.clone())
                }
                Mode::Secure | Mode::Tls => {
                    return Err(BenchError::Config(
                        "secure and tls modes need the in-process gateway".into(),
                    ))
                }
            });
        }
        let mut bed = Bed::new(mode, links, epoch, LatencyKind::HalfRtt, None)?;
        measure_mode(&mut bed, opts, progress, true, &mut runs).await?;
    }
    Ok(runs)
}

async fn resolve(hostport: &str) -> Result<SocketAddr, BenchError> {
    tokio::net::lookup_host(hostport)
        .await?
        .next()
        .ok_or_else(|| BenchError::Config(format!("{hostport}: no address")))
}

/// Where the search starts for the first size of the first mode, datagrams per second.
const FIRST_HINT_PPS: f64 = 20_000.0;

/// Length of the latency run at half the sustained rate.
pub const HALF_DURATION: Duration = Duration::from_secs(1);

/// How often, and by what factor, a searched rate is lowered when its measured run fails.
const MAX_BACKOFFS: usize = 3;
const BACKOFF: f64 = 0.85;

/// Warm-up, then for each size: search (unless the rate is fixed) and one measured run.
async fn measure_mode(
    bed: &mut Bed,
    opts: &Options,
    progress: &Progress,
    remote: bool,
    runs: &mut Vec<RunResult>,
) -> Result<(), BenchError> {
    let mode = bed.mode();
    progress.phase(format!("{}: warm-up", mode.name()));
    bed.warm_up(opts.sizes[0], remote).await?;
    let mut previous: Option<f64> = None;
    for &size in &opts.sizes {
        let label = format!("{} {size} B", mode.name());
        let (mut pps, source) = match opts.rate {
            Some(r) => (r.pps(size), "fixed"),
            None => {
                // Start from what an earlier mode sustained at this size, else from what this
                // mode sustained at the previous (smaller) size: usually within a factor of 2.
                let hint = runs
                    .iter()
                    .rev()
                    .find(|r| r.size == size && r.rate_source == "search")
                    .map(|r| r.requested_pps)
                    .or(previous)
                    .unwrap_or(FIRST_HINT_PPS);
                (
                    bed.find_rate(size, hint, opts.probe, progress, &label).await?,
                    "search",
                )
            }
        };
        progress.phase(format!(
            "{label}: measuring {:.1} s at {}",
            opts.duration.as_secs_f64(),
            fmt_pps(pps)
        ));
        let mut s = bed.run(size, pps, opts.duration).await?;
        // A short probe can pass at a rate a longer run cannot hold (the path's capacity
        // wanders on shared cores, and an overloaded path recovers slowly): step down until
        // the measured run itself passes.
        let mut backoffs = 0;
        while source == "search" && !s.passes() && backoffs < MAX_BACKOFFS {
            backoffs += 1;
            pps *= BACKOFF;
            progress.phase(format!(
                "{label}: measured run lost {:.1} %, again at {}",
                s.loss_pct(),
                fmt_pps(pps)
            ));
            s = bed.run(size, pps, opts.duration).await?;
        }
        previous = Some(pps);
        let searched = source == "search";
        runs.push(RunResult::new(mode, size, opts.streams, source, &s));
        if let Some(x) = runs.last() {
            progress.row(x);
        }
        if searched && opts.half {
            progress.phase(format!("{label}: latency at half rate, {}", fmt_pps(pps / 2.0)));
            let s = bed.run(size, pps / 2.0, HALF_DURATION).await?;
            runs.push(RunResult::new(mode, size, opts.streams, "half", &s));
        }
        progress.step();
    }
    Ok(())
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The real gateway on its own runtime, so its threads' CPU time can be read apart.
struct InProcessGateway {
    clocks: ThreadClocks,
    client: ClientOptions,
    /// The gateway's counters (connections and associations opened, for `bench flows`).
    metrics: Arc<crate::metrics::Metrics>,
    hosted: Hosted,
}

/// A service (the gateway, `bench flows`' shim) serving on a runtime of its own until
/// [`Hosted::stop`].
struct Hosted {
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Hosted {
    /// Spawns `serve(stopped)` on `runtime`; `stopped` resolves when [`Hosted::stop`] is
    /// called (or the `Hosted` dropped).
    fn serve<F>(
        runtime: tokio::runtime::Runtime,
        serve: impl FnOnce(tokio::sync::oneshot::Receiver<()>) -> F,
    ) -> Hosted
    where
        F: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = runtime.spawn(serve(stopped));
        Hosted {
            runtime: Some(runtime),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Graceful stop (bounded).
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for Hosted {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed on an async worker: let its
        // threads wind down in the background instead.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl InProcessGateway {
    /// A gateway for `capacity` associations (and as many control connections, all from
    /// loopback).
    async fn start(capacity: usize) -> Result<InProcessGateway, BenchError> {
        let pki = crate::cert::ephemeral();
        let setup = |e: &dyn std::fmt::Display| BenchError::Setup(e.to_string());
        let tls = crate::tls::server_config(ServerTlsOptions {
            cert_chain: pki.gateway_chain(),
            key: pki.gateway_key(),
            client_ca: None,
            require_client_cert: false,
            client_crls: Vec::new(),
            allow_tls12: false,
        })
        .map_err(|e| setup(&e))?;
        let loopback = |net: &str| Rule::parse(Action::Allow, net).map_err(|e| setup(&e));
        let settings = Settings {
            auth: AuthSettings {
                no_auth: true,
                users: None,
                ..Default::default()
            },
            policy: Arc::new(Policy::new(
                vec![loopback("127.0.0.0/8")?, loopback("::1/128")?],
                HashMap::new(),
            )),
            idle_timeout: Duration::from_secs(600),
            max_associations: capacity,
            max_connections: capacity,
            max_connections_per_ip: capacity,
            // Invariant: a literal socket address parses.
            ..Settings::new("127.0.0.1:0".parse().expect("literal address"), tls)
        };
        let clocks = ThreadClocks::default();
        let runtime = quiet_runtime("sudp-bench-gw", &clocks)?;
        let gateway = runtime
            .spawn(Gateway::bind(settings))
            .await
            .map_err(|e| setup(&e))??;
        let control = gateway.control_addr();
        let metrics = gateway.metrics();
        let hosted = Hosted::serve(runtime, |stopped| {
            gateway.run(async move {
                let _ = stopped.await;
            })
        });
        let client_tls = crate::tls::client_config(ClientTlsOptions {
            trust: ServerTrust::Ca(vec![pki.ca_der()]),
            client_auth: None,
            allow_tls12: false,
        })
        .map_err(|e| setup(&e))?;
        Ok(InProcessGateway {
            clocks,
            client: ClientOptions::new(control, "localhost", client_tls),
            metrics,
            hosted,
        })
    }

    /// Graceful stop (bounded), then the runtime goes.
    async fn stop(self) {
        self.hosted.stop().await;
    }
}

/// A multi-threaded runtime whose threads register with `clocks`. With the default log
/// level its threads log warnings only, so the per-association (or per-flow) info lines do not
/// break up the progress bar.
fn quiet_runtime(name: &str, clocks: &ThreadClocks) -> Result<tokio::runtime::Runtime, BenchError> {
    use tracing::level_filters::LevelFilter;
    let quiet = (LevelFilter::current() <= LevelFilter::INFO).then(|| {
        tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_writer(std::io::stderr)
                .finish(),
        )
    });
    let (start, stop) = (clocks.clone(), clocks.clone());
    tokio::runtime::Builder::new_multi_thread()
        .thread_name(name)
        .enable_all()
        .on_thread_start(move || {
            start.register();
            if let Some(d) = &quiet {
                // The guard would restore the global dispatcher when dropped; the thread
                // keeps this one for its whole life.
                std::mem::forget(tracing::dispatcher::set_default(d));
            }
        })
        .on_thread_stop(move || stop.deregister())
        .build()
        .map_err(BenchError::Io)
}

/// `sudp bench` from the command line: runs, prints the table, writes the requested files.
pub async fn run_cli(args: BenchArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    match &args.command {
        Some(BenchCommand::Reflect(r)) => return reflect_cli(r, shutdown).await,
        Some(BenchCommand::Flows(f)) => return flows::run_cli(f, shutdown).await,
        None => {}
    }
    let opts = Options::from_args(&args)?;
    // Rows as they finish when stdout is a file or a pipe (a terminal has the progress bar).
    let progress = Progress::stderr((opts.modes.len() * opts.sizes.len()) as u64)
        .with_rows(!std::io::IsTerminal::is_terminal(&std::io::stdout()));
    progress.phase("checking how busy the machine is".into());
    if let Some(pct) = background_now(Duration::from_millis(500))
        .await
        .filter(|p| *p > 15.0)
    {
        progress.println(&format!(
            "warning: other processes use {pct:.0} % of this machine's CPU: the figures will be lower and \
             noisier than it can do (see the bg% column)"
        ));
    }
    let report = tokio::select! {
        r = run(&opts, &progress) => r,
        _ = shutdown => {
            progress.finish();
            anyhow::bail!("interrupted");
        }
    };
    progress.finish();
    let report = report?;
    if progress.streams_rows() {
        print!("{}", report::summary(&report));
    } else {
        print!("{}", report::table(&report));
    }
    if let Some(p) = &args.json {
        report::write_json(&report, p)?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &args.csv {
        report::write_csv(&report, p)?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &args.plot {
        report::write_plot(&report, p)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// Share of the machine's CPU that other processes use over `window`, percent.
async fn background_now(window: Duration) -> Option<f64> {
    let (t0, ours0, machine0) = (Instant::now(), cpu::process_ns(), cpu::machine_busy_ns());
    tokio::time::sleep(window).await;
    let (ours1, machine1) = (cpu::process_ns(), cpu::machine_busy_ns());
    runner::background_pct(ours0.zip(ours1), machine0.zip(machine1), t0.elapsed())
}

/// `sudp bench reflect`: echo until `shutdown`.
async fn reflect_cli(args: &ReflectArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let socket = Arc::new(crate::net::bind_udp(args.listen)?);
    println!("reflecting UDP on {}", socket.local_addr()?);
    use std::io::Write as _;
    std::io::stdout().flush()?;
    tokio::select! {
        r = link::reflect(socket, None) => { r?; }
        _ = shutdown => {}
    }
    Ok(())
}
