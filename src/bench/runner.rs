//! Runs: a paced sender thread and a receiver task per stream, one run at a time, and the
//! search for the highest rate with loss below 1 %.
//!
//! The sender is an OS thread, not a task: it sleeps with nanosecond timer slack between
//! bursts (tokio's timer ticks in milliseconds, which at 100k pps would mean bursts of 100
//! datagrams and needless loss in socket buffers), and drives the link's async send through
//! the runtime handle. Datagram `k` of a run is due at `start + k / rate`; whatever is due is
//! sent back to back, at most [`BURST`] at a time. A sender that cannot keep up simply
//! offers less, and the run reports what it actually offered.
//!
//! Receivers live as long as the link and account into a per-stream [`Collector`] that each
//! run replaces; datagrams of an earlier run that arrive late are counted as stale, not
//! delivered.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::cpu::{self, ThreadClocks};
use super::link::{is_transient, Link, SEND_OVERHEAD};
use super::stats::{loss_pct, Collector, Latency, LatencyKind, Probe, PROBE_HEADER};
use super::{BenchError, Mode, Progress};

/// Most datagrams a sender sends back to back before looking at the clock again.
pub const BURST: u64 = 16;

/// The loss a search probe may show and still pass, in percent.
pub const LOSS_THRESHOLD_PCT: f64 = 1.0;

/// A probe also fails when the sender offered less than this share of the rate asked for
/// (the machine could not even generate the load).
const OFFERED_SHARE: f64 = 0.95;

/// Growth of the median latency from the first to the last third of a probe, in µs, that
/// counts as a queue building up (at least; half the early median if that is more).
pub const QUEUE_GROWTH_FLOOR_US: f64 = 1000.0;

/// A run whose median latency exceeds the warm-up's median by this factor, and
/// [`STANDING_QUEUE_FLOOR_US`], has a standing queue: the rate is not sustained.
pub const STANDING_QUEUE_FACTOR: f64 = 10.0;
/// See [`STANDING_QUEUE_FACTOR`].
pub const STANDING_QUEUE_FLOOR_US: f64 = 2000.0;

/// How long no straggler may arrive before the path counts as empty, and the longest wait.
const SETTLE_QUIET: Duration = Duration::from_millis(30);
const SETTLE_MAX: Duration = Duration::from_secs(3);

/// Search bounds, datagrams per second (all streams together).
const MIN_PPS: f64 = 100.0;
const MAX_PPS: f64 = 4_000_000.0;

/// The search stops once the passing and failing rates are this close (ratio).
const SEARCH_PRECISION: f64 = 1.1;

/// Most probes per search.
const MAX_PROBES: usize = 8;

/// One stream: a link and the receiver accounting for it.
struct Stream {
    link: Arc<Link>,
    collector: Arc<Mutex<Collector>>,
    receiver: JoinHandle<()>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.receiver.abort();
    }
}

/// What one run measured, summed over its streams.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Rate asked for, datagrams per second.
    pub requested_pps: f64,
    /// Datagrams handed to the link (including failed sends).
    pub sent: u64,
    /// Sends the socket refused.
    pub send_errors: u64,
    /// Distinct datagrams that came back in time.
    pub received: u64,
    /// Datagrams that came back more than once (extra copies).
    pub duplicates: u64,
    /// Datagrams that came back after a later-sent one.
    pub reordered: u64,
    /// Datagrams of earlier runs or not ours.
    pub stale: u64,
    /// How long the senders sent.
    pub window: Duration,
    /// Latency distribution.
    pub latency: Latency,
    /// Median latency above which the bed counts a standing queue, µs.
    pub latency_bound_us: f64,
    /// Median latency of the first third of the run's datagrams, µs.
    pub early_p50_us: f64,
    /// Median latency of the last third, µs.
    pub late_p50_us: f64,
    /// RFC 3550 jitter, ns (receive-weighted mean over streams).
    pub jitter_ns: f64,
    /// Process CPU time over the run (getrusage), ns.
    pub cpu_ns: Option<u64>,
    /// CPU time of the in-process gateway's threads over the run, ns.
    pub gateway_cpu_ns: Option<u64>,
    /// Share of the machine's CPU that other processes used during the run, percent.
    pub background_cpu_pct: Option<f64>,
}

impl Sample {
    /// Datagrams offered per second.
    pub fn offered_pps(&self) -> f64 {
        self.sent as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// Datagrams delivered (back at the sender) per second.
    pub fn delivered_pps(&self) -> f64 {
        self.received as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// Loss in percent.
    pub fn loss_pct(&self) -> f64 {
        loss_pct(self.sent, self.received)
    }

    /// Did the latency climb during the run: the last third's median above the first
    /// third's by more than [`QUEUE_GROWTH_FLOOR_US`] and by more than half? Then a queue
    /// was building up: the rate exceeds what the path carries, and a longer run would lose.
    pub fn queue_grew(&self) -> bool {
        self.late_p50_us > self.early_p50_us + (self.early_p50_us / 2.0).max(QUEUE_GROWTH_FLOOR_US)
    }

    /// Did a standing queue form: median latency above the bed's bound?
    pub fn queue_stood(&self) -> bool {
        self.latency.quantile_us(0.5) > self.latency_bound_us
    }

    /// Did this run sustain its rate: loss below the threshold, the rate actually offered,
    /// and no queue, neither building up nor standing?
    ///
    /// The latency conditions matter on few shared cores: a path that is overloaded at
    /// first can settle into a state with a standing queue of tens of milliseconds where its
    /// threads never sleep, batch their work and lose nothing; "no loss" at such a rate would
    /// name a rate no real-time stream could use.
    pub fn passes(&self) -> bool {
        self.loss_pct() < LOSS_THRESHOLD_PCT
            && self.offered_pps() >= OFFERED_SHARE * self.requested_pps
            && !self.queue_grew()
            && !self.queue_stood()
    }
}

/// A set of streams of one mode, ready to run.
pub struct Bed {
    mode: Mode,
    streams: Vec<Stream>,
    epoch: Instant,
    kind: LatencyKind,
    drain: Duration,
    latency_bound_us: f64,
    gateway_clocks: Option<ThreadClocks>,
    next_run: u32,
    handle: Handle,
}

/// How a sender thread paces one run.
struct SendPlan {
    pps: f64,
    duration: Duration,
    size: usize,
    run: u32,
    stream: u32,
    epoch: Instant,
}

struct SendOutcome {
    sent: u64,
    errors: u64,
    window: Duration,
}

impl Bed {
    /// Starts a receiver per link. Must run inside a multi-threaded tokio runtime: the sender
    /// threads drive sends through its handle while its workers drive the sockets.
    pub fn new(
        mode: Mode,
        links: Vec<Link>,
        epoch: Instant,
        kind: LatencyKind,
        gateway_clocks: Option<ThreadClocks>,
    ) -> Result<Bed, BenchError> {
        let handle = Handle::current();
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return Err(BenchError::Setup(
                "the bench needs a multi-threaded tokio runtime".into(),
            ));
        }
        let streams = links
            .into_iter()
            .map(|link| {
                let link = Arc::new(link);
                let collector = Arc::new(Mutex::new(Collector::idle()));
                let receiver = tokio::spawn(receive_loop(link.clone(), collector.clone(), epoch));
                Stream {
                    link,
                    collector,
                    receiver,
                }
            })
            .collect();
        Ok(Bed {
            mode,
            streams,
            epoch,
            kind,
            drain: Duration::from_secs(1),
            latency_bound_us: f64::INFINITY,
            gateway_clocks,
            next_run: 0,
            handle,
        })
    }

    /// The mode this bed runs.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Checks that datagrams come back at all (100 at a low rate) and sizes the drain wait
    /// from the latency seen: long enough for stragglers, short enough that a queue building
    /// up in socket buffers shows as loss.
    pub async fn warm_up(&mut self, size: usize, remote: bool) -> Result<(), BenchError> {
        self.drain = if remote {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(1)
        };
        let s = self.run(size, 500.0, Duration::from_millis(200)).await?;
        if s.received == 0 {
            return Err(BenchError::NoEcho {
                mode: self.mode,
                sent: s.sent,
            });
        }
        // The drain must cover a round trip; the latency figures are one-way (or RTT/2).
        let rtt = Duration::from_secs_f64(2.0 * s.latency.quantile_us(1.0) / 1e6);
        self.drain =
            (rtt * 4 + Duration::from_millis(30)).clamp(Duration::from_millis(50), Duration::from_secs(3));
        self.latency_bound_us =
            (s.latency.quantile_us(0.5) * STANDING_QUEUE_FACTOR).max(STANDING_QUEUE_FLOOR_US);
        Ok(())
    }

    /// One run: every stream sends `pps / streams` datagrams per second of `size` bytes for
    /// `duration`, then the bed waits the drain time for the last echoes.
    pub async fn run(&mut self, size: usize, pps: f64, duration: Duration) -> Result<Sample, BenchError> {
        self.next_run = self.next_run.wrapping_add(1) % (u32::MAX - 1);
        let run = self.next_run;
        let n = self.streams.len().max(1);
        let per_stream = pps / n as f64;
        let planned = planned(per_stream, duration);
        for s in &self.streams {
            *lock(&s.collector) = Collector::new(run, self.kind, planned);
        }
        let (t0, cpu0, machine0) = (Instant::now(), cpu::process_ns(), cpu::machine_busy_ns());
        let gw0 = self.gateway_clocks.as_ref().and_then(|c| c.total_ns());

        let mut waits = Vec::with_capacity(n);
        for (i, s) in self.streams.iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            let plan = SendPlan {
                pps: per_stream,
                duration,
                size,
                run,
                stream: i as u32,
                epoch: self.epoch,
            };
            let (handle, link) = (self.handle.clone(), s.link.clone());
            std::thread::Builder::new()
                .name(format!("bench-send-{i}"))
                .spawn(move || {
                    let _ = tx.send(send_loop(handle, link, plan));
                })
                .map_err(BenchError::Io)?;
            waits.push(rx);
        }
        let mut outcomes = Vec::with_capacity(n);
        for w in waits {
            outcomes.push(
                w.await
                    .map_err(|_| BenchError::Setup("a sender thread panicked".into()))?,
            );
        }
        // Wait for the last echoes: until everything came back, at most the drain time.
        let sent: u64 = outcomes.iter().map(|o| o.sent).sum();
        let drain_end = Instant::now() + self.drain;
        while Instant::now() < drain_end {
            let received: u64 = self
                .streams
                .iter()
                .map(|s| lock(&s.collector).seq.received())
                .sum();
            if received >= sent {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }

        let (wall, cpu1, machine1) = (t0.elapsed(), cpu::process_ns(), cpu::machine_busy_ns());
        let gw1 = self.gateway_clocks.as_ref().and_then(|c| c.total_ns());
        let collectors: Vec<Collector> = self
            .streams
            .iter()
            .map(|s| std::mem::replace(&mut *lock(&s.collector), Collector::idle()))
            .collect();
        self.settle().await;

        let (mut latency, mut early, mut late) = (Latency::default(), Latency::default(), Latency::default());
        let (mut received, mut duplicates, mut reordered, mut stale) = (0, 0, 0, 0);
        let mut jitter_weighted = 0.0;
        for c in &collectors {
            latency.merge(&c.latency);
            early.merge(&c.early);
            late.merge(&c.late);
            received += c.seq.received();
            duplicates += c.seq.duplicates();
            reordered += c.seq.reordered();
            stale += c.stale;
            jitter_weighted += c.jitter.ns() * c.seq.received() as f64;
        }
        Ok(Sample {
            requested_pps: pps,
            sent: outcomes.iter().map(|o| o.sent).sum(),
            send_errors: outcomes.iter().map(|o| o.errors).sum(),
            received,
            duplicates,
            reordered,
            stale,
            window: outcomes
                .iter()
                .map(|o| o.window)
                .max()
                .unwrap_or(duration)
                .max(duration),
            latency,
            latency_bound_us: self.latency_bound_us,
            early_p50_us: early.quantile_us(0.5),
            late_p50_us: late.quantile_us(0.5),
            jitter_ns: if received > 0 {
                jitter_weighted / received as f64
            } else {
                0.0
            },
            cpu_ns: cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a)),
            background_cpu_pct: background_pct(cpu0.zip(cpu1), machine0.zip(machine1), wall),
            gateway_cpu_ns: gw0.zip(gw1).map(|(a, b)| b.saturating_sub(a)),
        })
    }

    /// Waits until the path is empty: until no straggler of the last run has come back for
    /// [`SETTLE_QUIET`] (at most [`SETTLE_MAX`]). After an overloaded run, socket buffers hold
    /// a backlog that would otherwise delay the next run's first datagrams.
    async fn settle(&self) {
        let stale = || -> u64 { self.streams.iter().map(|s| lock(&s.collector).stale).sum() };
        let deadline = Instant::now() + SETTLE_MAX;
        let mut last = stale();
        while Instant::now() < deadline {
            tokio::time::sleep(SETTLE_QUIET).await;
            let now = stale();
            if now == last {
                return;
            }
            last = now;
        }
    }

    /// Finds the highest rate (datagrams per second, all streams) whose probe of `probe`
    /// length loses less than 1 % with no queue (see [`Sample::passes`]): from `hint`, double until a probe fails (or halve until
    /// one passes), then bisect (geometrically) until the bounds are within 10 %.
    /// Returns the highest passing rate (at least the search floor).
    pub async fn find_rate(
        &mut self,
        size: usize,
        hint: f64,
        probe: Duration,
        progress: &Progress,
        label: &str,
    ) -> Result<f64, BenchError> {
        let (mut lo, mut hi): (Option<f64>, Option<f64>) = (None, None);
        let mut rate = hint.clamp(MIN_PPS, MAX_PPS);
        for i in 1..=MAX_PROBES {
            progress.phase(format!("{label}: search probe {i} at {}", fmt_pps(rate)));
            let s = self.run(size, rate, probe).await?;
            tracing::debug!(
                label,
                probe = i,
                requested = rate,
                offered = s.offered_pps(),
                loss_pct = s.loss_pct(),
                early_p50_us = s.early_p50_us,
                late_p50_us = s.late_p50_us,
                p99_us = s.latency.quantile_us(0.99),
                pass = s.passes(),
                "search probe"
            );
            if s.passes() {
                lo = Some(lo.map_or(rate, |l: f64| l.max(rate)));
            } else {
                hi = Some(hi.map_or(rate, |h: f64| h.min(rate)));
            }
            rate = match (lo, hi) {
                (Some(l), None) if l >= MAX_PPS => break,
                (Some(l), None) => (l * 2.0).min(MAX_PPS),
                (None, Some(h)) if h <= MIN_PPS => break,
                (None, Some(h)) => (h / 2.0).max(MIN_PPS),
                (Some(l), Some(h)) if h / l <= SEARCH_PRECISION => break,
                (Some(l), Some(h)) => (l * h).sqrt(),
                // Every probe sets a bound, so this arm is never taken.
                (None, None) => break,
            };
        }
        Ok(lo.unwrap_or(MIN_PPS))
    }
}

/// The machine's busy time minus ours, as a percentage of all CPUs over `wall`.
pub(crate) fn background_pct(
    ours: Option<(u64, u64)>,
    machine: Option<(u64, u64)>,
    wall: Duration,
) -> Option<f64> {
    let (o0, o1) = ours?;
    let (m0, m1) = machine?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let other = (m1.saturating_sub(m0)).saturating_sub(o1.saturating_sub(o0)) as f64;
    Some((other * 100.0 / (wall.as_secs_f64().max(1e-3) * 1e9 * cpus)).min(100.0))
}

/// Datagrams a sender plans to send at `pps` for `duration`.
fn planned(pps: f64, duration: Duration) -> u64 {
    (duration.as_secs_f64() * pps).ceil().max(1.0) as u64
}

fn lock(c: &Mutex<Collector>) -> MutexGuard<'_, Collector> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// "12.3k pps" style.
pub fn fmt_pps(pps: f64) -> String {
    if pps >= 1e6 {
        format!("{:.2}M pps", pps / 1e6)
    } else if pps >= 1e3 {
        format!("{:.1}k pps", pps / 1e3)
    } else {
        format!("{pps:.0} pps")
    }
}

/// The sender thread: paces `plan` on the link, bursts of at most [`BURST`].
fn send_loop(handle: Handle, link: Arc<Link>, plan: SendPlan) -> SendOutcome {
    cpu::tight_timer_slack();
    let size = plan.size.max(PROBE_HEADER);
    let mut payload = vec![0u8; size];
    for (i, b) in payload[PROBE_HEADER..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let mut scratch = vec![0u8; size + SEND_OVERHEAD];
    let interval_ns = 1e9 / plan.pps.max(1e-3);
    let planned = planned(plan.pps, plan.duration);
    let start = Instant::now();
    let end = start + plan.duration;
    let (mut sent, mut errors) = (0u64, 0u64);
    while sent < planned {
        let now = Instant::now();
        if now >= end {
            break;
        }
        // Datagram k is due at start + k * interval.
        let due = ((now - start).as_nanos() as f64 / interval_ns) as u64 + 1;
        let n = due.min(planned).saturating_sub(sent).min(BURST);
        if n == 0 {
            let next = start + Duration::from_nanos((sent as f64 * interval_ns) as u64);
            std::thread::sleep(next.saturating_duration_since(now));
            continue;
        }
        handle.block_on(async {
            for _ in 0..n {
                let probe = Probe {
                    seq: sent,
                    tx_ns: plan.epoch.elapsed().as_nanos() as u64,
                    rx_ns: 0,
                    run: plan.run,
                    stream: plan.stream,
                };
                probe.encode(&mut payload);
                if link.send(&payload, &mut scratch).await.is_err() {
                    errors += 1;
                }
                sent += 1;
            }
        });
    }
    SendOutcome {
        sent,
        errors,
        window: start.elapsed(),
    }
}

/// A stream's receiver: accounts every echo into the current collector.
async fn receive_loop(link: Arc<Link>, collector: Arc<Mutex<Collector>>, epoch: Instant) {
    let mut buf = vec![0u8; crate::client::RECORD_BUF];
    loop {
        match link.recv(&mut buf).await {
            Ok(r) => {
                let now = epoch.elapsed().as_nanos() as u64;
                if let Some(p) = Probe::parse(&buf[r]) {
                    lock(&collector).record(&p, now);
                } else {
                    lock(&collector).stale += 1;
                }
            }
            Err(e) if is_transient(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "bench receiver stopped");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(requested: f64, sent: u64, received: u64, secs: f64) -> Sample {
        Sample {
            requested_pps: requested,
            sent,
            send_errors: 0,
            received,
            duplicates: 0,
            reordered: 0,
            stale: 0,
            window: Duration::from_secs_f64(secs),
            latency: Latency::default(),
            latency_bound_us: 2000.0,
            early_p50_us: 50.0,
            late_p50_us: 60.0,
            jitter_ns: 0.0,
            cpu_ns: None,
            gateway_cpu_ns: None,
            background_cpu_pct: None,
        }
    }

    #[test]
    fn pass_needs_low_loss_and_the_rate_offered() {
        assert!(sample(1000.0, 1000, 995, 1.0).passes());
        assert!(!sample(1000.0, 1000, 990, 1.0).passes(), "exactly 1 % loss fails");
        assert!(
            !sample(1000.0, 900, 900, 1.0).passes(),
            "sender could not keep up"
        );
        let mut queued = sample(1000.0, 1000, 1000, 1.0);
        queued.late_p50_us = 1200.0;
        assert!(
            queued.queue_grew() && !queued.passes(),
            "latency climbing by > 1 ms"
        );
        queued.early_p50_us = 10_000.0;
        queued.late_p50_us = 14_000.0;
        assert!(
            !queued.queue_grew(),
            "a long path may wobble by less than half its latency"
        );
        queued.late_p50_us = 16_000.0;
        assert!(queued.queue_grew());
        let mut standing = sample(1000.0, 1000, 1000, 1.0);
        standing.latency.record(5_000_000);
        assert!(
            standing.queue_stood() && !standing.passes(),
            "median 5 ms over a 2 ms bound"
        );
        let s = sample(1000.0, 2000, 1500, 2.0);
        assert_eq!(
            (s.offered_pps(), s.delivered_pps(), s.loss_pct()),
            (1000.0, 750.0, 25.0)
        );
    }

    #[test]
    fn pps_formatting() {
        assert_eq!(fmt_pps(950.0), "950 pps");
        assert_eq!(fmt_pps(12_345.0), "12.3k pps");
        assert_eq!(fmt_pps(1_500_000.0), "1.50M pps");
    }
}
