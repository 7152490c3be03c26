//! Output: the text table, JSON, CSV and an SVG plot.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use plotters::prelude::*;

use super::{Mode, Report, RunResult};

/// The table printed at the end of a run, with its notes and the secure/naked ratios.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    out.push_str(&title(r));
    out.push_str(&columns());
    for x in r.runs.iter().filter(|x| x.rate_source != "half") {
        out.push_str(&row(x));
    }
    out.push_str(&rest(r));
    out
}

/// What [`table`] adds to rows printed one by one as they finished ([`columns`], then a
/// [`row`] each): the title, the half-rate latency table, the notes and the ratios.
pub fn summary(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out);
    out.push_str(&title(r));
    out.push_str(&rest(r));
    out
}

/// The title lines and a blank line.
fn title(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "sudp bench {} · {}", r.version, r.path);
    let _ = writeln!(out, "rates: {}", rate_line(r));
    let _ = writeln!(
        out,
        "streams: {} · pps and Mbit/s count round trips (sender -> proxy -> reflector -> proxy -> sender)",
        r.streams
    );
    let _ = writeln!(out);
    out
}

/// The column header of the measured runs.
pub fn columns() -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:>5} {:>10} {:>10} {:>8} {:>6} {:>6} {:>5} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>5}",
        "mode",
        "size",
        "offered/s",
        "deliv./s",
        "Mbit/s",
        "loss%",
        "reord",
        "dups",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "jit µs",
        "cpu µs*",
        "gw µs**",
        "bg%"
    );
    out
}

/// One measured run's line under [`columns`].
pub fn row(x: &RunResult) -> String {
    let mut out = String::new();
    {
        let _ = writeln!(
            out,
            "{:<6} {:>5} {:>10.0} {:>10.0} {:>8.1} {:>6.2} {:>6} {:>5} {:>8.1} {:>8.1} {:>8.1} {:>7.1} {:>8} {:>8} {:>5}",
            x.mode.name(),
            x.size,
            x.offered_pps,
            x.delivered_pps,
            x.mbps,
            x.loss_pct,
            x.reordered,
            x.duplicates,
            x.p50_us,
            x.p99_us,
            x.p999_us,
            x.jitter_us,
            opt(x.cpu_us_per_datagram),
            opt(x.gateway_cpu_us_per_datagram),
            x.background_cpu_pct.map_or_else(|| "-".into(), |p| format!("{p:.0}")),
        );
    }
    out
}

/// The half-rate latency table, the notes and the ratios.
fn rest(r: &Report) -> String {
    let mut out = String::new();
    let half: Vec<&RunResult> = r.runs.iter().filter(|x| x.rate_source == "half").collect();
    if !half.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "latency at half the sustained rate ({:.1} s runs):",
            half[0].duration_s
        );
        let _ = writeln!(
            out,
            "{:<6} {:>5} {:>10} {:>6} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>5}",
            "mode",
            "size",
            "offered/s",
            "loss%",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "jit µs",
            "cpu µs*",
            "gw µs**",
            "bg%"
        );
        for x in half {
            let _ = writeln!(
                out,
                "{:<6} {:>5} {:>10.0} {:>6.2} {:>8.1} {:>8.1} {:>8.1} {:>7.1} {:>8} {:>8} {:>5}",
                x.mode.name(),
                x.size,
                x.offered_pps,
                x.loss_pct,
                x.p50_us,
                x.p99_us,
                x.p999_us,
                x.jitter_us,
                opt(x.cpu_us_per_datagram),
                opt(x.gateway_cpu_us_per_datagram),
                x.background_cpu_pct
                    .map_or_else(|| "-".into(), |p| format!("{p:.0}")),
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "latency: {}; jitter: RFC 3550 §6.4.1 estimator on the same transit times",
        r.latency_note
    );
    let in_process = r.latency == super::LatencyKind::OneWay;
    let _ = writeln!(
        out,
        "*  cpu µs: user+sys CPU of this whole process (getrusage) per delivered datagram: INCLUDES the load \
         generator {}",
        if in_process {
            "(sender, receiver, reflector) and the in-process gateway"
        } else {
            "(sender and receiver; the proxy and reflector run elsewhere)"
        }
    );
    if in_process {
        let _ = writeln!(
            out,
            "** gw µs: the in-process gateway's threads alone (per-thread CPU clocks) per delivered datagram, \
             which it relayed twice (there and back)"
        );
    }
    let _ = writeln!(
        out,
        "bg%: share of the machine's CPU used by other processes during the run; above a few % the figures \
         understate what the machine can do"
    );
    let ratios = ratio_line(r, Mode::Secure, Mode::Naked);
    if !ratios.is_empty() {
        let _ = writeln!(out, "secure/naked delivered throughput: {ratios}");
    }
    let ratios = ratio_line(r, Mode::Secure, Mode::Direct);
    if !ratios.is_empty() {
        let _ = writeln!(out, "secure/direct delivered throughput: {ratios}");
    }
    let ratios = ratio_line(r, Mode::Naked, Mode::Direct);
    if !ratios.is_empty() {
        let _ = writeln!(out, "naked/direct delivered throughput: {ratios}");
    }
    out
}

fn rate_line(r: &Report) -> String {
    match r.runs.first() {
        Some(x) if x.rate_source == "search" => format!(
            "per size the highest with loss < {} % and no queue (median latency neither climbing nor over \
             max({:.0} ms, {:.0}x idle)), measured for {:.1} s",
            super::runner::LOSS_THRESHOLD_PCT,
            super::runner::STANDING_QUEUE_FLOOR_US / 1e3,
            super::runner::STANDING_QUEUE_FACTOR,
            x.duration_s
        ),
        Some(x) => format!("fixed, measured for {:.1} s", x.duration_s),
        None => "none".into(),
    }
}

fn opt(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

/// "64 B 0.81 · 200 B 0.79 ..." for each size measured in both modes.
pub fn ratio_line(r: &Report, num: Mode, den: Mode) -> String {
    ratios(r, num, den)
        .iter()
        .map(|(size, q)| format!("{size} B {q:.2}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// Delivered-throughput ratios `num / den` by size (of the searched or fixed-rate runs).
pub fn ratios(r: &Report, num: Mode, den: Mode) -> Vec<(usize, f64)> {
    let main = || r.runs.iter().filter(|x| x.rate_source != "half");
    let find = |m: Mode, size: usize| main().find(|x| x.mode == m && x.size == size);
    let mut out = Vec::new();
    for x in main().filter(|x| x.mode == num) {
        if let Some(d) = find(den, x.size).filter(|d| d.delivered_pps > 0.0) {
            out.push((x.size, x.delivered_pps / d.delivered_pps));
        }
    }
    out
}

/// Writes the report as pretty JSON.
pub fn write_json(r: &Report, path: &Path) -> io::Result<()> {
    let text = serde_json::to_string_pretty(r).map_err(io::Error::other)?;
    std::fs::write(path, text + "\n")
}

/// CSV columns, in order.
pub const CSV_COLUMNS: [&str; 23] = [
    "mode",
    "size",
    "streams",
    "rate_source",
    "requested_pps",
    "offered_pps",
    "delivered_pps",
    "mbps",
    "sent",
    "received",
    "loss_pct",
    "reordered",
    "duplicates",
    "p50_us",
    "p99_us",
    "p999_us",
    "max_us",
    "jitter_us",
    "cpu_us_per_datagram",
    "gateway_cpu_us_per_datagram",
    "background_cpu_pct",
    "send_errors",
    "duration_s",
];

/// The report as CSV text: a header and one row per run (empty cell for "not measured").
pub fn csv(r: &Report) -> String {
    let mut out = CSV_COLUMNS.join(",");
    out.push('\n');
    let o = |x: Option<f64>| x.map(|v| v.to_string()).unwrap_or_default();
    for x in &r.runs {
        let row = [
            x.mode.name().to_string(),
            x.size.to_string(),
            x.streams.to_string(),
            x.rate_source.to_string(),
            x.requested_pps.to_string(),
            x.offered_pps.to_string(),
            x.delivered_pps.to_string(),
            x.mbps.to_string(),
            x.sent.to_string(),
            x.received.to_string(),
            x.loss_pct.to_string(),
            x.reordered.to_string(),
            x.duplicates.to_string(),
            x.p50_us.to_string(),
            x.p99_us.to_string(),
            x.p999_us.to_string(),
            x.max_us.to_string(),
            x.jitter_us.to_string(),
            o(x.cpu_us_per_datagram),
            o(x.gateway_cpu_us_per_datagram),
            o(x.background_cpu_pct),
            x.send_errors.to_string(),
            x.duration_s.to_string(),
        ];
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

/// Writes [`csv`] to `path`.
pub fn write_csv(r: &Report, path: &Path) -> io::Result<()> {
    std::fs::write(path, csv(r))
}

fn color(m: Mode) -> RGBColor {
    match m {
        Mode::Secure => RGBColor(200, 40, 40),
        Mode::Tls => RGBColor(200, 140, 30),
        Mode::Naked => RGBColor(40, 90, 200),
        Mode::Direct => RGBColor(110, 110, 110),
    }
}

fn modes_in(r: &Report) -> Vec<Mode> {
    let mut modes: Vec<Mode> = Vec::new();
    for x in &r.runs {
        if !modes.contains(&x.mode) {
            modes.push(x.mode);
        }
    }
    modes
}

fn points(runs: &[&RunResult], m: Mode, f: impl Fn(&RunResult) -> f64) -> Vec<(f64, f64)> {
    runs.iter()
        .filter(|x| x.mode == m)
        .map(|x| (x.size as f64, f(x)))
        .collect()
}

/// Draws, by payload size on a log axis whose ticks are exactly the sizes measured, one
/// colour per mode with a marker at each measured point: delivered Mbit/s (left), latency
/// p50 / p99 / p99.9 (middle; at half the sustained rate when those runs exist) and the loss
/// of each measured run (right, with the 1 % that the rate search accepts), as SVG.
pub fn write_plot(r: &Report, path: &Path) -> io::Result<()> {
    draw(r, path).map_err(|e| io::Error::other(format!("plot {}: {e}", path.display())))
}

/// Size labels run vertically: measured sizes can sit close together on the log axis
/// (1200 and 1400 are 13 px apart), where horizontal labels would overlap.
fn size_style() -> TextStyle<'static> {
    ("sans-serif", 12)
        .into_font()
        .transform(FontTransform::Rotate90)
        .into()
}

/// The loss a searched rate may have (the search's pass criterion), drawn on the loss chart.
const LOSS_LIMIT_PCT: f64 = 1.0;

fn draw(r: &Report, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1800, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let (left, middle, right) = (&panels[0], &panels[1], &panels[2]);
    let modes = modes_in(r);
    let main: Vec<&RunResult> = r.runs.iter().filter(|x| x.rate_source != "half").collect();
    let half: Vec<&RunResult> = r.runs.iter().filter(|x| x.rate_source == "half").collect();
    let (lat_runs, lat_title) = if half.is_empty() {
        (&main, "Latency at the measured rate")
    } else {
        (&half, "Latency at half the sustained rate")
    };
    // The sizes measured, ascending: the x axis's ticks.
    let mut sizes: Vec<f64> = r.runs.iter().map(|x| x.size as f64).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    let (smin, smax) = match (sizes.first(), sizes.last()) {
        (Some(lo), Some(hi)) => (lo / 1.3, hi * 1.3),
        _ => (32.0, 65_000.0),
    };
    let x_axis = || (smin..smax).log_scale().with_key_points(sizes.clone());
    let size_fmt = |x: &f64| format!("{x:.0}");
    let num_fmt = |y: &f64| {
        if *y >= 1.0 {
            format!("{y:.0}")
        } else {
            format!("{y:.2}")
        }
    };

    let positive = |v: f64| v > 0.0;
    let mbps_max = main.iter().map(|x| x.mbps).fold(1.0f64, f64::max) * 1.5;
    let mbps_min = main
        .iter()
        .map(|x| x.mbps)
        .filter(|v| positive(*v))
        .fold(mbps_max, f64::min)
        / 1.5;
    let mut chart = ChartBuilder::on(left)
        .caption("Delivered payload throughput (round trips)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(56)
        .y_label_area_size(60)
        .build_cartesian_2d(x_axis(), (mbps_min.min(mbps_max / 10.0)..mbps_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("payload bytes (sizes measured)")
        .y_desc("Mbit/s")
        .x_label_formatter(&size_fmt)
        .x_label_style(size_style())
        .axis_desc_style(("sans-serif", 12))
        .y_label_formatter(&num_fmt)
        .draw()?;
    for &m in &modes {
        let c = color(m);
        let pts: Vec<(f64, f64)> = points(&main, m, |x| x.mbps)
            .into_iter()
            .filter(|p| positive(p.1))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(m.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()?;

    let lat_max = lat_runs.iter().map(|x| x.p999_us).fold(10.0f64, f64::max) * 1.5;
    let lat_min = lat_runs
        .iter()
        .map(|x| x.p50_us)
        .filter(|v| positive(*v))
        .fold(lat_max, f64::min)
        .max(0.5)
        / 1.5;
    let mut chart = ChartBuilder::on(middle)
        .caption(
            format!("{lat_title}: p50 ●, p99 ▲ dashed, p99.9 ■ dotted"),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(56)
        .y_label_area_size(60)
        .build_cartesian_2d(x_axis(), (lat_min..lat_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("payload bytes (sizes measured)")
        .y_desc("µs")
        .x_label_formatter(&size_fmt)
        .x_label_style(size_style())
        .axis_desc_style(("sans-serif", 12))
        .y_label_formatter(&num_fmt)
        .draw()?;
    for &m in &modes {
        let c = color(m);
        let series = |f: fn(&RunResult) -> f64| -> Vec<(f64, f64)> {
            points(lat_runs, m, f)
                .into_iter()
                .filter(|p| positive(p.1))
                .collect()
        };
        let (p50, p99, p999) = (series(|x| x.p50_us), series(|x| x.p99_us), series(|x| x.p999_us));
        chart
            .draw_series(LineSeries::new(p50.clone(), c.stroke_width(2)))?
            .label(m.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(DashedLineSeries::new(p99.clone(), 8, 5, c.stroke_width(2)))?;
        chart.draw_series(DashedLineSeries::new(p999.clone(), 2, 4, c.stroke_width(2)))?;
        chart.draw_series(p50.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
        chart.draw_series(p99.into_iter().map(|p| TriangleMarker::new(p, 5, c.filled())))?;
        chart.draw_series(
            p999.into_iter()
                .map(|p| EmptyElement::at(p) + Rectangle::new([(-3, -3), (3, 3)], c.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()?;

    // Loss of the measured runs (the ones the left chart shows), linear: 0 % is the news.
    let loss_max = main.iter().map(|x| x.loss_pct).fold(LOSS_LIMIT_PCT, f64::max) * 1.25;
    let mut chart = ChartBuilder::on(right)
        .caption(
            format!("Loss of the measured runs (search accepts < {LOSS_LIMIT_PCT} %)"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(56)
        .y_label_area_size(60)
        .build_cartesian_2d(x_axis(), 0.0..loss_max)?;
    chart
        .configure_mesh()
        .x_desc("payload bytes (sizes measured)")
        .y_desc("loss %")
        .x_label_formatter(&size_fmt)
        .x_label_style(size_style())
        .axis_desc_style(("sans-serif", 12))
        .y_label_formatter(&|y: &f64| format!("{y:.2}"))
        .draw()?;
    chart.draw_series(DashedLineSeries::new(
        vec![(smin, LOSS_LIMIT_PCT), (smax, LOSS_LIMIT_PCT)],
        6,
        6,
        BLACK.mix(0.5).stroke_width(1),
    ))?;
    for &m in &modes {
        let c = color(m);
        let pts = points(&main, m, |x| x.loss_pct);
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(m.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{LatencyKind, CPU_NOTE};
    use super::*;

    fn run(mode: Mode, size: usize, pps: f64) -> RunResult {
        RunResult {
            mode,
            size,
            streams: 1,
            rate_source: "search",
            requested_pps: pps,
            offered_pps: pps,
            delivered_pps: pps,
            mbps: pps * size as f64 * 8.0 / 1e6,
            sent: 1000,
            received: 1000,
            loss_pct: 0.0,
            reordered: 0,
            duplicates: 0,
            p50_us: 20.0,
            p99_us: 40.0,
            p999_us: 80.0,
            max_us: 100.0,
            jitter_us: 3.0,
            cpu_us_per_datagram: Some(5.0),
            gateway_cpu_us_per_datagram: None,
            background_cpu_pct: Some(1.5),
            send_errors: 0,
            duration_s: 3.0,
        }
    }

    fn report() -> Report {
        Report {
            tool: "sudp bench",
            version: "0",
            path: "test".into(),
            latency: LatencyKind::OneWay,
            latency_note: LatencyKind::OneWay.describe(),
            cpu_note: CPU_NOTE,
            streams: 1,
            cpus: 2,
            runs: vec![
                run(Mode::Secure, 64, 80_000.0),
                run(Mode::Secure, 1200, 60_000.0),
                run(Mode::Naked, 64, 100_000.0),
                run(Mode::Naked, 1200, 80_000.0),
                RunResult {
                    rate_source: "half",
                    ..run(Mode::Naked, 1200, 40_000.0)
                },
            ],
        }
    }

    #[test]
    fn ratios_by_size() {
        let r = report();
        assert_eq!(
            ratios(&r, Mode::Secure, Mode::Naked),
            vec![(64, 0.8), (1200, 0.75)]
        );
        assert_eq!(
            ratio_line(&r, Mode::Secure, Mode::Naked),
            "64 B 0.80 · 1200 B 0.75"
        );
        assert!(ratios(&r, Mode::Secure, Mode::Direct).is_empty());
        let t = table(&r);
        assert!(t.contains("secure/naked delivered throughput: 64 B 0.80"), "{t}");
        assert!(!t.contains("secure/direct"));
        assert!(t.contains("latency at half the sustained rate"), "{t}");
    }

    #[test]
    fn csv_has_header_and_rows() {
        let text = csv(&report());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6);
        assert!(lines[0].starts_with("mode,size,streams,"));
        assert_eq!(lines[1].split(',').count(), CSV_COLUMNS.len());
        assert!(lines[1].starts_with("secure,64,1,search,"));
        // Not measured: empty cell.
        assert!(lines[1].ends_with(",5,,1.5,0,3"), "{}", lines[1]);
    }

    #[test]
    fn plot_is_svg() {
        let path = std::env::temp_dir().join(format!("sudp-bench-plot-{}.svg", std::process::id()));
        write_plot(&report(), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        if std::env::var_os("SUDP_KEEP_PLOT").is_none() {
            let _ = std::fs::remove_file(&path);
        }
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("secure") && svg.contains("naked"));
        // The x axis is labelled with the sizes measured, on each of the three charts.
        for size in ["\n64\n</text>", "\n1200\n</text>"] {
            assert_eq!(svg.matches(size).count(), 3, "{size:?} labels");
        }
        assert!(svg.contains("Loss of the measured runs"), "no loss chart");
        // A marker for each point: 4 measured runs on the throughput and loss charts, one
        // half-rate run (p50 circle) on the latency chart.
        assert_eq!(svg.matches("<circle").count(), 4 + 4 + 1, "markers");
    }
}
