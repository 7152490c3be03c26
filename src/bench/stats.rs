//! The bench's arithmetic, free of I/O and clocks: the probe header every datagram carries,
//! rate and duration parsing, and the per-run statistics (sequence accounting, RFC 3550
//! jitter, latency histogram). Times come in as nanoseconds since the bench's epoch.
//!
//! Probe header, at the start of every payload (big-endian, 32 bytes; the rest of the
//! payload is filler):
//!
//! ```text
//!  0               8               16              24      28      32
//! +---------------+---------------+---------------+-------+-------+--------- - -
//! | seq u64       | tx_ns u64     | rx_ns u64     | run   | stream| filler
//! +---------------+---------------+---------------+-------+-------+--------- - -
//! seq     per-run sequence number, from 0
//! tx_ns   sender's clock when it handed the datagram to the socket (ns since the epoch)
//! rx_ns   0 as sent; the in-process reflector writes its receive time here (same clock)
//! run     which run (probe or measured run) the datagram belongs to; others are stale
//! stream  which stream (association) sent it
//! ```

use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Length of the probe header; also the smallest payload the bench sends.
pub const PROBE_HEADER: usize = 32;

/// Offset of `rx_ns`, which the in-process reflector stamps.
pub const RX_NS_OFFSET: usize = 16;

/// Largest latency the histograms hold (60 s); longer ones are recorded as 60 s.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// The probe header of one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Per-run sequence number.
    pub seq: u64,
    /// Sender timestamp, ns since the epoch.
    pub tx_ns: u64,
    /// Reflector timestamp (0: not stamped).
    pub rx_ns: u64,
    /// Run id.
    pub run: u32,
    /// Stream index.
    pub stream: u32,
}

impl Probe {
    /// Writes the header into the first [`PROBE_HEADER`] bytes of `out`; `false` if `out`
    /// is shorter.
    pub fn encode(&self, out: &mut [u8]) -> bool {
        let Some(h) = out.get_mut(..PROBE_HEADER) else {
            return false;
        };
        h[0..8].copy_from_slice(&self.seq.to_be_bytes());
        h[8..16].copy_from_slice(&self.tx_ns.to_be_bytes());
        h[16..24].copy_from_slice(&self.rx_ns.to_be_bytes());
        h[24..28].copy_from_slice(&self.run.to_be_bytes());
        h[28..32].copy_from_slice(&self.stream.to_be_bytes());
        true
    }

    /// Reads the header at the start of `payload`; `None` if it is too short to hold one.
    pub fn parse(payload: &[u8]) -> Option<Probe> {
        let h = payload.get(..PROBE_HEADER)?;
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let u32_at = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&h[i..i + 4]);
            u32::from_be_bytes(b)
        };
        Some(Probe {
            seq: u64_at(0),
            tx_ns: u64_at(8),
            rx_ns: u64_at(16),
            run: u32_at(24),
            stream: u32_at(28),
        })
    }
}

/// A sending rate, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Datagrams per second.
    Pps(f64),
    /// Payload bits per second (UDP payload only, no headers).
    Bps(f64),
}

impl Rate {
    /// Datagrams per second for payloads of `size` bytes.
    pub fn pps(&self, size: usize) -> f64 {
        match *self {
            Rate::Pps(p) => p,
            Rate::Bps(b) => b / (size.max(1) as f64 * 8.0),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Pps(p) => write!(f, "{p} pps"),
            Rate::Bps(b) => write!(f, "{} Mbit/s", b / 1e6),
        }
    }
}

/// Parses a rate: a number with an optional decimal prefix `k`, `M` or `G` (case-insensitive;
/// `m` means mega, as in tc), followed by nothing or `pps` for datagrams per second, or by
/// `bit`, `bit/s` or `bps` for payload bits per second. Examples: `20000`, `50k`, `50kpps`,
/// `200Mbit`, `1.5Gbit/s`, `800kbps`.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("rate {text:?}: expected a number, e.g. 20000, 50k or 200Mbit"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let (mult, rest) = match unit.chars().next() {
        Some('k') => (1e3, &unit[1..]),
        Some('m') => (1e6, &unit[1..]),
        Some('g') => (1e9, &unit[1..]),
        _ => (1.0, &unit[..]),
    };
    let rate = match rest {
        "" | "pps" => Rate::Pps(value * mult),
        "bit" | "bit/s" | "bps" | "bits" | "bits/s" => Rate::Bps(value * mult),
        _ => {
            return Err(format!(
                "rate {text:?}: unknown unit {unit:?} (use pps, or k/M/G followed by bit)"
            ))
        }
    };
    let v = match rate {
        Rate::Pps(v) | Rate::Bps(v) => v,
    };
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("rate {text:?}: must be positive"));
    }
    Ok(rate)
}

/// Parses a duration: a number followed by `ms`, `s` or `m`; a bare number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("duration {text:?}: expected e.g. 3s, 500ms or 1m"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "m" | "min" => value * 60.0,
        u => return Err(format!("duration {text:?}: unknown unit {u:?} (ms, s or m)")),
    };
    if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("duration {text:?}: must be between 0 and 24 h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// How a datagram arrived, relative to the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Sequence number at or above the next expected one.
    InOrder,
    /// New, but below the next expected number: something sent after it arrived first.
    Reordered,
    /// Already received.
    Duplicate,
    /// Beyond what this run can have sent: not ours, ignored.
    OutOfRange,
}

/// Counts received, duplicate and reordered datagrams of one run of one stream.
///
/// Reordering follows RFC 4737 §3.3 ("Type-P-Reordered"): a datagram is reordered when its
/// sequence number is below the next expected one, i.e. a later datagram arrived first.
/// Each datagram is counted once: a duplicate is never also reordered. Loss is what was sent
/// and never arrived.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    seen: Vec<u64>,
    limit: u64,
    next_expected: u64,
    received: u64,
    duplicates: u64,
    reordered: u64,
}

impl SeqTracker {
    /// A tracker for sequence numbers below `limit` (a bound on what the run can send; it
    /// caps the bitmap so a stray datagram cannot make it huge).
    pub fn new(limit: u64) -> Self {
        SeqTracker {
            seen: Vec::new(),
            limit,
            next_expected: 0,
            received: 0,
            duplicates: 0,
            reordered: 0,
        }
    }

    /// Accounts one arrival.
    pub fn record(&mut self, seq: u64) -> Arrival {
        if seq >= self.limit {
            return Arrival::OutOfRange;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if word >= self.seen.len() {
            // Grow geometrically, never past the limit's worth of words.
            let cap = self.limit.div_ceil(64) as usize;
            let want = (word + 1).max(self.seen.len() * 2).min(cap);
            self.seen.resize(want, 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.seen[word] |= bit;
        self.received += 1;
        if seq < self.next_expected {
            self.reordered += 1;
            Arrival::Reordered
        } else {
            self.next_expected = seq + 1;
            Arrival::InOrder
        }
    }

    /// Distinct datagrams received.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Arrivals of a datagram already received.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Datagrams that arrived after a later-sent one.
    pub fn reordered(&self) -> u64 {
        self.reordered
    }

    /// Datagrams sent but never received, out of `sent`.
    pub fn lost(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.received)
    }
}

/// Loss in percent of `sent`; 0 when nothing was sent.
pub fn loss_pct(sent: u64, received: u64) -> f64 {
    if sent == 0 {
        0.0
    } else {
        sent.saturating_sub(received) as f64 * 100.0 / sent as f64
    }
}

/// The RFC 3550 §6.4.1 interarrival jitter estimator.
///
/// For consecutive arrivals i and j (in arrival order) with transit times `T = R − S`
/// (arrival minus send time), `D(i,j) = T_j − T_i` and `J += (|D(i,j)| − J) / 16`. A constant
/// clock offset between sender and receiver cancels out of `D`, so the estimate holds across
/// machines. Kept in nanoseconds as `f64` rather than RTP timestamp units.
#[derive(Debug, Clone, Copy, Default)]
pub struct Jitter {
    last_transit: Option<i64>,
    jitter: f64,
    samples: u64,
}

impl Jitter {
    /// Accounts one arrival with transit time `transit_ns` (any fixed offset is fine).
    pub fn update(&mut self, transit_ns: i64) {
        if let Some(prev) = self.last_transit {
            let d = (transit_ns - prev).unsigned_abs() as f64;
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.last_transit = Some(transit_ns);
        self.samples += 1;
    }

    /// The current estimate in nanoseconds.
    pub fn ns(&self) -> f64 {
        self.jitter
    }

    /// Arrivals accounted.
    pub fn samples(&self) -> u64 {
        self.samples
    }
}

/// What the latency figures measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyKind {
    /// Reflector receive time minus send time, both on the bench's one clock (in-process
    /// reflector): the true one-way latency of the forward path.
    OneWay,
    /// Round trip halved: the far end's clock is not ours, so one-way cannot be read off it.
    HalfRtt,
}

impl LatencyKind {
    /// A phrase for reports.
    pub fn describe(&self) -> &'static str {
        match self {
            LatencyKind::OneWay => {
                "one-way sender -> reflector, stamped by the in-process reflector on the sender's clock"
            }
            LatencyKind::HalfRtt => "round trip / 2 (the far end's clock differs from ours)",
        }
    }
}

/// A latency histogram in nanoseconds (3 significant digits).
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        // Invariant: the bounds are constants with low < high / 2 and 3 significant
        // figures, which `new_with_bounds` always accepts.
        Latency(Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds"))
    }
}

impl Latency {
    /// Records one latency.
    pub fn record(&mut self, ns: u64) {
        self.0.saturating_record(ns.clamp(1, MAX_LATENCY_NS));
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Latency) {
        // Both histograms have the same bounds and the values saturate on record, so
        // adding never overflows the range.
        let _ = self.0.add(&other.0);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The latency at quantile `q` (0..=1), in microseconds; 0 with no samples.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            0.0
        } else {
            self.0.value_at_quantile(q) as f64 / 1e3
        }
    }
}

/// Everything one stream's receiver accounts during one run.
///
/// Besides the whole run's latency it keeps the latency of the first and of the last third
/// of the datagrams (by sequence number): when the offered rate exceeds what the path
/// carries, a queue builds up in some socket buffer and the last third waits much longer
/// than the first, well before the buffers overflow into loss. A short search probe sees
/// that where its loss figure alone would not.
#[derive(Debug, Clone)]
pub struct Collector {
    run: u32,
    kind: LatencyKind,
    planned: u64,
    /// Sequence accounting.
    pub seq: SeqTracker,
    /// Interarrival jitter.
    pub jitter: Jitter,
    /// Latency distribution.
    pub latency: Latency,
    /// Latency of the first third of the planned datagrams.
    pub early: Latency,
    /// Latency of the last third of the planned datagrams.
    pub late: Latency,
    /// Datagrams of another run (late arrivals from an earlier run) or unparseable.
    pub stale: u64,
}

impl Collector {
    /// A collector for run `run` in which the sender plans to send `planned` datagrams.
    pub fn new(run: u32, kind: LatencyKind, planned: u64) -> Self {
        Collector {
            run,
            kind,
            planned,
            // Bound on what a run can send: the plan plus a margin for rounding.
            seq: SeqTracker::new(planned + planned / 8 + 1024),
            jitter: Jitter::default(),
            latency: Latency::default(),
            early: Latency::default(),
            late: Latency::default(),
            stale: 0,
        }
    }

    /// A collector that belongs to no run: everything it sees is stale.
    pub fn idle() -> Self {
        let mut c = Collector::new(u32::MAX, LatencyKind::HalfRtt, 0);
        c.seq = SeqTracker::new(0);
        c
    }

    /// Accounts a datagram that came back at `now_ns` (receiver clock, ns since the epoch).
    pub fn record(&mut self, p: &Probe, now_ns: u64) {
        if p.run != self.run {
            self.stale += 1;
            return;
        }
        match self.seq.record(p.seq) {
            Arrival::InOrder | Arrival::Reordered => {}
            Arrival::Duplicate => return,
            Arrival::OutOfRange => {
                self.stale += 1;
                return;
            }
        }
        let transit = match self.kind {
            LatencyKind::OneWay if p.rx_ns != 0 => p.rx_ns.saturating_sub(p.tx_ns),
            _ => now_ns.saturating_sub(p.tx_ns) / 2,
        };
        self.latency.record(transit);
        if p.seq < self.planned / 3 {
            self.early.record(transit);
        } else if p.seq >= self.planned - self.planned / 3 {
            self.late.record(transit);
        }
        self.jitter.update(transit.min(i64::MAX as u64) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_roundtrip() {
        let p = Probe {
            seq: 0x0102030405060708,
            tx_ns: 42,
            rx_ns: 0,
            run: 7,
            stream: 3,
        };
        let mut buf = [0u8; 40];
        assert!(p.encode(&mut buf));
        assert_eq!(&buf[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(Probe::parse(&buf), Some(p));
        assert_eq!(Probe::parse(&buf[..31]), None);
        assert!(!p.encode(&mut [0u8; 31]));
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("20000"), Ok(Rate::Pps(20000.0)));
        assert_eq!(parse_rate("50k"), Ok(Rate::Pps(50000.0)));
        assert_eq!(parse_rate("50kpps"), Ok(Rate::Pps(50000.0)));
        assert_eq!(parse_rate("200Mbit"), Ok(Rate::Bps(200e6)));
        assert_eq!(parse_rate("200mbit"), Ok(Rate::Bps(200e6)));
        assert_eq!(parse_rate("1.5Gbit/s"), Ok(Rate::Bps(1.5e9)));
        assert_eq!(parse_rate("800kbps"), Ok(Rate::Bps(800e3)));
        assert_eq!(parse_rate("64bit"), Ok(Rate::Bps(64.0)));
        for bad in ["", "fast", "10x", "0", "-5", "1e3", "10 Mbyte", "..5k"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} should be refused");
        }
        // 200 Mbit/s of 1250-byte payloads is 20 000 datagrams per second.
        assert_eq!(Rate::Bps(200e6).pps(1250), 20_000.0);
        assert_eq!(Rate::Pps(5.0).pps(1250), 5.0);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "0", "3h", "s", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn in_order_stream() {
        let mut t = SeqTracker::new(100);
        for s in 0..10 {
            assert_eq!(t.record(s), Arrival::InOrder);
        }
        assert_eq!(
            (t.received(), t.duplicates(), t.reordered(), t.lost(10)),
            (10, 0, 0, 0)
        );
    }

    #[test]
    fn loss_reorder_duplicates() {
        // Sent 0..10; 3 and 7 lost, 5 arrives after 6, 2 arrives twice, 9 arrives three
        // times.
        let arrivals = [0, 1, 2, 2, 4, 6, 5, 8, 9, 9, 9];
        let mut t = SeqTracker::new(1000);
        let got: Vec<Arrival> = arrivals.iter().map(|&s| t.record(s)).collect();
        use Arrival::*;
        assert_eq!(
            got,
            [
                InOrder, InOrder, InOrder, Duplicate, InOrder, InOrder, Reordered, InOrder, InOrder,
                Duplicate, Duplicate
            ]
        );
        assert_eq!(t.received(), 8);
        assert_eq!(t.lost(10), 2);
        assert_eq!(t.duplicates(), 3);
        assert_eq!(t.reordered(), 1);
        assert_eq!(loss_pct(10, t.received()), 20.0);
        assert_eq!(loss_pct(0, 0), 0.0);
    }

    #[test]
    fn late_arrival_after_big_jump_is_reordered_once() {
        // RFC 4737: after 10 arrives, 1..9 each count as reordered (each is below NextExp).
        let mut t = SeqTracker::new(1000);
        t.record(0);
        t.record(10);
        for s in 1..10 {
            assert_eq!(t.record(s), Arrival::Reordered);
        }
        assert_eq!(t.reordered(), 9);
        assert_eq!(t.record(5), Arrival::Duplicate);
        assert_eq!(t.reordered(), 9);
    }

    #[test]
    fn tracker_refuses_out_of_range() {
        let mut t = SeqTracker::new(128);
        assert_eq!(t.record(127), Arrival::InOrder);
        assert_eq!(t.record(128), Arrival::OutOfRange);
        assert_eq!(t.record(u64::MAX), Arrival::OutOfRange);
        assert!(t.seen.len() <= 2);
        assert_eq!(t.received(), 1);
    }

    #[test]
    fn jitter_constant_transit_is_zero() {
        let mut j = Jitter::default();
        for _ in 0..100 {
            j.update(1_000_000);
        }
        assert_eq!(j.ns(), 0.0);
        assert_eq!(j.samples(), 100);
    }

    #[test]
    fn jitter_known_sequence() {
        // Transit times alternate 100 and 200 (so |D| = 100 after the first packet):
        // J_n = J_{n-1} + (100 - J_{n-1}) / 16, i.e. J_n = 100 (1 - (15/16)^n).
        let mut j = Jitter::default();
        let transits = [100i64, 200, 100, 200, 100];
        let mut expect = 0.0f64;
        for (i, &t) in transits.iter().enumerate() {
            j.update(t);
            if i > 0 {
                expect += (100.0 - expect) / 16.0;
            }
            assert!((j.ns() - expect).abs() < 1e-9, "step {i}: {} vs {expect}", j.ns());
        }
        // Closed form after 4 differences.
        assert!((j.ns() - 100.0 * (1.0 - (15.0f64 / 16.0).powi(4))).abs() < 1e-9);
        // Hand-computed: 6.25, 12.109375, 17.6025390625, 22.752380371...
        assert!((j.ns() - 22.752_380_371_093_75).abs() < 1e-9);
    }

    #[test]
    fn jitter_ignores_clock_offset() {
        let (mut a, mut b) = (Jitter::default(), Jitter::default());
        for (i, t) in [5i64, 9, 4, 30, 7, 7, 12].iter().enumerate() {
            a.update(*t);
            b.update(*t - 1_000_000_000);
            assert_eq!(a.ns(), b.ns(), "step {i}");
        }
    }

    #[test]
    fn collector_one_way_and_stale() {
        let mut c = Collector::new(3, LatencyKind::OneWay, 3);
        let p = |seq, tx, rx, run| Probe {
            seq,
            tx_ns: tx,
            rx_ns: rx,
            run,
            stream: 0,
        };
        c.record(&p(0, 1_000, 21_000, 3), 50_000);
        c.record(&p(1, 2_000, 22_000, 3), 60_000);
        c.record(&p(1, 2_000, 22_000, 3), 60_000); // duplicate: no latency sample
        c.record(&p(2, 2_000, 22_000, 2), 60_000); // another run
        assert_eq!(c.seq.received(), 2);
        assert_eq!(c.seq.duplicates(), 1);
        assert_eq!(c.stale, 1);
        assert_eq!(c.latency.count(), 2);
        assert!((c.latency.quantile_us(0.5) - 20.0).abs() < 0.1);
        // Of 3 planned, seq 0 is the first third and seq 2 the last; 1 is neither.
        assert_eq!((c.early.count(), c.late.count()), (1, 0));

        let mut h = Collector::new(1, LatencyKind::HalfRtt, 100);
        h.record(&p(0, 1_000, 0, 1), 41_000);
        assert!((h.latency.quantile_us(0.99) - 20.0).abs() < 0.1);
        let mut idle = Collector::idle();
        idle.record(&p(0, 0, 0, 1), 1);
        assert_eq!((idle.stale, idle.seq.received()), (1, 0));
    }

    #[test]
    fn latency_merge_and_empty() {
        let mut a = Latency::default();
        assert_eq!(a.quantile_us(0.99), 0.0);
        let mut b = Latency::default();
        for i in 1..=100u64 {
            a.record(i * 1000);
            b.record(i * 1000 + 100_000);
        }
        a.merge(&b);
        assert_eq!(a.count(), 200);
        assert!((a.quantile_us(0.5) - 100.0).abs() < 1.0);
        a.record(u64::MAX);
        assert_eq!(a.count(), 201);
    }

    use crate::proto::testing::{assert_reached, counted};
    use proptest::prelude::*;

    /// `parse_rate` against its model: a decimal number, an optional k/M/G (any case), then
    /// nothing or `pps` (datagrams) or a bit unit (payload bits); zero and unknown units
    /// refused. An accepted rate printed (`Display`) parses back to the same rate. Counted
    /// per unit kind and refusal.
    #[test]
    fn rates_match_their_model_and_reparse() {
        let number = prop::sample::select(vec![
            "0", "1", "20000", "1.5", "0.001", "50", ".5", "1.", "007", "1e3",
        ]);
        let prefix = prop::sample::select(vec![
            ("", 1.0),
            ("k", 1e3),
            ("K", 1e3),
            ("m", 1e6),
            ("M", 1e6),
            ("g", 1e9),
            ("G", 1e9),
        ]);
        let unit = prop::sample::select(vec![
            "", "pps", "PPS", "bit", "bit/s", "bps", "bits", "Bits/s", "byte", "x",
        ]);
        let counts = counted(
            2000,
            (number, prefix, unit, any::<bool>()),
            |(number, (p, mult), unit, space)| {
                let text = format!("{number}{}{p}{unit}", if space { " " } else { "" });
                let value: Option<f64> = number.parse().ok().filter(|_| !number.contains('e'));
                let want = match (value, unit.to_ascii_lowercase().as_str()) {
                    (Some(v), "" | "pps") if v > 0.0 => Some(Rate::Pps(v * mult)),
                    (Some(v), "bit" | "bit/s" | "bps" | "bits" | "bits/s") if v > 0.0 => {
                        Some(Rate::Bps(v * mult))
                    }
                    _ => None,
                };
                let got = parse_rate(&text);
                prop_assert_eq!(got.clone().ok(), want, "{:?}", text);
                if let Ok(r) = got {
                    let back = parse_rate(&r.to_string()).unwrap();
                    let (a, b) = match (r, back) {
                        (Rate::Pps(a), Rate::Pps(b)) | (Rate::Bps(a), Rate::Bps(b)) => (a, b),
                        _ => return Err(TestCaseError::fail(format!("{r} reparsed as another kind"))),
                    };
                    prop_assert!((a - b).abs() <= a * 1e-12, "{} -> {}", a, b);
                }
                Ok(match want {
                    Some(Rate::Pps(_)) => "pps",
                    Some(Rate::Bps(_)) => "bit/s",
                    None if value.is_some_and(|v| v > 0.0) => "unknown unit",
                    None => "bad number",
                })
            },
        );
        assert_reached(&counts, &["pps", "bit/s", "unknown unit", "bad number"], 50);
    }

    /// The bench's `parse_duration` against its model: a decimal number and ms, s, m or
    /// min (none: seconds), within (0, 24 h]; everything else refused. Counted per outcome.
    #[test]
    fn bench_durations_match_their_model() {
        let number = prop_oneof![
            (0u32..100_000).prop_map(|n| n.to_string()),
            (0u32..1000, 0u32..1000).prop_map(|(a, b)| format!("{a}.{b}"))
        ];
        let unit = prop::sample::select(vec![
            ("", 1.0),
            ("s", 1.0),
            ("ms", 1e-3),
            ("m", 60.0),
            ("min", 60.0),
            ("h", f64::NAN),
            ("sec", f64::NAN),
        ]);
        let counts = counted(
            2000,
            (number, unit, any::<bool>()),
            |(number, (unit, mult), space)| {
                let text = format!(" {number}{}{unit} ", if space { " " } else { "" });
                let secs = number.parse::<f64>().unwrap() * mult;
                let want = (secs > 0.0 && secs <= 86_400.0).then(|| Duration::from_secs_f64(secs));
                prop_assert_eq!(parse_duration(&text).ok(), want, "{:?}", text);
                Ok(match want {
                    Some(_) => "accepted",
                    None if mult.is_nan() => "unknown unit",
                    None => "out of range",
                })
            },
        );
        assert_reached(&counts, &["accepted", "unknown unit", "out of range"], 50);
    }
}
