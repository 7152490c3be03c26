//! A reconnect storm, measured (issue 9, item 6; figures in docs/CLUSTER.md).
//!
//! ```sh
//! cargo build --release && cargo run --release --example storm -- --flows 200 --kills 20
//! cargo run --release --example storm -- --flows 200 --kills 20 --no-resumption
//! ```
//!
//! Each round starts a real Redis (once), two `sudp gateway` processes (A and B) sharing it,
//! and one in-process shim holding `--flows` UDP forwards, each with its own secure
//! association and a paced stream (`--rate` datagrams/s per flow) to a local echo. All
//! associations open on A. Then A is killed (SIGKILL) and every association moves to B:
//! resumed TLS and a re-attach (or, with `--no-resumption`, full TLS handshakes), the shim
//! doing what it does in production. The round reports:
//!
//! * the time until **every** stream flows again (first echo after the kill, worst flow);
//! * each flow's own gap (last echo before the kill to first after);
//! * B's CPU per reconnection: B's CPU during the storm minus its CPU over an equally long
//!   window of the same traffic afterwards, divided by the flows;
//! * Redis commands per new association (opening the flows on A) and per failover (the storm),
//!   from Redis' `INFO commandstats`;
//! * B's handshake and re-attach counters.
//!
//! Everything runs on 127.0.0.1. Needs `redis-server` on PATH and the release binary
//! (`SUDP_BIN` overrides `target/release/sudp`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sudp::proto::socks::Address;
use sudp::shim::{GatewayEndpoint, Shim, ShimSettings};
use sudp::tls::{ClientTlsOptions, ServerTrust};
use tokio::net::UdpSocket;

struct Args {
    flows: usize,
    kills: usize,
    rate: u64,
    resumption: bool,
    /// Authenticate with a password (users file) instead of a client certificate.
    password: bool,
}

fn args() -> Args {
    let mut a = Args {
        flows: 200,
        kills: 20,
        rate: 20,
        resumption: true,
        password: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut num = || -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--flows" => a.flows = num() as usize,
            "--kills" => a.kills = num() as usize,
            "--rate" => a.rate = num().max(1),
            "--no-resumption" => a.resumption = false,
            "--password" => a.password = true,
            other => panic!("unknown flag {other} (--flows N --kills N --rate N --no-resumption --password)"),
        }
    }
    a
}

fn sudp_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SUDP_BIN") {
        return p.into();
    }
    // target/release/examples/storm -> target/release/sudp
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("sudp")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_call(port: u16, cmd: &[&str]) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut req = format!("*{}\r\n", cmd.len());
    for c in cmd {
        req.push_str(&format!("${}\r\n{c}\r\n", c.len()));
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    // Bulk replies: read until a short pause (the reply is small).
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.ends_with(b"\r\n") && out.len() > 4 {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Commands Redis has served, by command (from `INFO commandstats`, minus INFO itself).
fn redis_by_command(port: u16) -> std::collections::BTreeMap<String, u64> {
    let info = redis_call(port, &["INFO", "commandstats"]);
    info.lines()
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info"))
        .filter_map(|l| {
            let name = l.strip_prefix("cmdstat_")?.split(':').next()?.to_owned();
            let calls = l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok()?;
            Some((name, calls))
        })
        .collect()
}

/// Total commands Redis has served (minus INFO).
fn redis_commands(port: u16) -> u64 {
    redis_by_command(port).values().sum()
}

/// Per-flow command counts between two snapshots, e.g. `get 2.0, evalsha 1.0`.
fn per_flow(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    flows: usize,
) -> String {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| format!("{k} {:.2}", d as f64 / flows as f64))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

struct Gateway {
    proc: Proc,
    control: SocketAddr,
    metrics: SocketAddr,
}

fn start_gateway(dir: &Path, redis: u16, password: bool) -> Gateway {
    use std::io::BufRead;
    let (auth_flag, auth_file) = if password {
        ("--users", dir.join("users"))
    } else {
        ("--client-ca", dir.join("ca.pem"))
    };
    let mut child = Command::new(sudp_bin())
        .args(["gateway", "--listen", "127.0.0.1:0", "--cert"])
        .arg(dir.join("gateway.pem"))
        .arg("--key")
        .arg(dir.join("gateway.key"))
        .arg(auth_flag)
        .arg(auth_file)
        .args(["--allow", "127.0.0.0/8", "--metrics", "127.0.0.1:0"])
        .args([
            "--store",
            &format!("redis://127.0.0.1:{redis}/0"),
            "--cluster",
            "storm",
        ])
        .arg("--cluster-key")
        .arg(dir.join("cluster.key"))
        .args(["--max-connections", "4096", "--max-connections-per-ip", "4096"])
        .args(["--max-associations", "4096"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the sudp binary (cargo build --release first, or set SUDP_BIN)");
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut next = |prefix: &str| -> SocketAddr {
        let l = lines.next().expect("gateway output").unwrap();
        l.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("unexpected line {l:?}"))
            .parse()
            .unwrap()
    };
    let control = next("control (TLS) ");
    let _relay = next("relay (UDP) ");
    let metrics = next("metrics (HTTP) ");
    Gateway {
        proc: Proc(child),
        control,
        metrics,
    }
}

fn cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000_000 / hz
}

fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
        .unwrap_or(0.0) as u64
}

/// One flow: a paced sender and the arrival time of each echo.
struct Flow {
    echoes: Arc<Mutex<Vec<Instant>>>,
}

async fn start_flow(to: SocketAddr, rate: u64, stop: Arc<AtomicU64>) -> Flow {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    sock.connect(to).await.unwrap();
    let echoes = Arc::new(Mutex::new(Vec::new()));
    let (rs, re) = (sock.clone(), echoes.clone());
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok(_n) = rs.recv(&mut buf).await {
            re.lock().unwrap().push(Instant::now());
        }
    });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        let d = [0x5au8; 200];
        while stop.load(Ordering::Relaxed) == 0 {
            tick.tick().await;
            let _ = sock.send(&d).await;
        }
    });
    Flow { echoes }
}

async fn echo_server() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

struct Round {
    open_detail: String,
    fail_detail: String,
    all_back: Duration,
    gaps: Vec<Duration>,
    cpu_per_reconnect_us: f64,
    redis_per_open: f64,
    redis_per_failover: f64,
    resumed: u64,
    full: u64,
    reattached: u64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

async fn round(
    a_args: &Args,
    pki: &sudp::cert::DevPki,
    dir: &Path,
    redis: u16,
    echo: SocketAddr,
) -> Option<Round> {
    let a = start_gateway(dir, redis, a_args.password);
    let b = start_gateway(dir, redis, a_args.password);
    let mut tls = (*sudp::tls::client_config(ClientTlsOptions {
        trust: ServerTrust::Ca(vec![pki.ca_der()]),
        client_auth: (!a_args.password).then(|| (pki.client_chain(), pki.client_key())),
        allow_tls12: false,
    })
    .unwrap())
    .clone();
    if !a_args.resumption {
        tls.resumption = rustls::client::Resumption::disabled();
    }
    let mut s = ShimSettings::new(
        vec![
            GatewayEndpoint {
                addr: Address::Ip(a.control),
                server_name: "localhost".into(),
            },
            GatewayEndpoint {
                addr: Address::Ip(b.control),
                server_name: "localhost".into(),
            },
        ],
        Arc::new(tls),
    );
    if a_args.password {
        s.credentials = Some(("storm".into(), "storm pw".into()));
    }
    s.socks = None;
    s.connect_timeout = Duration::from_secs(10);
    s.forwards = (0..a_args.flows)
        .map(|_| sudp::config::parse_forward(&format!("udp:127.0.0.1:0={echo}")).unwrap())
        .collect();
    let shim = Shim::bind(s).await.unwrap();
    let locals: Vec<SocketAddr> = shim.forward_addrs().into_iter().map(|f| f.1).collect();
    let shim_task = tokio::spawn(shim.run(std::future::pending()));

    let before_open = redis_commands(redis);
    let open_map = redis_by_command(redis);
    let stop = Arc::new(AtomicU64::new(0));
    let mut flows = Vec::new();
    for l in &locals {
        flows.push(start_flow(*l, a_args.rate, stop.clone()).await);
    }
    // Every flow echoes through A.
    let deadline = Instant::now() + Duration::from_secs(60);
    while flows.iter().any(|f| f.echoes.lock().unwrap().is_empty()) {
        if Instant::now() > deadline {
            eprintln!("not every flow started within 60 s");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let redis_per_open = (redis_commands(redis) - before_open) as f64 / a_args.flows as f64;
    let before_fail = redis_commands(redis);
    let fail_map = redis_by_command(redis);
    let opened_map = fail_map.clone();
    let b_before = scrape(b.metrics);
    let b_pid = b.proc.0.id();
    let cpu0 = cpu_ns(b_pid);

    let killed = Instant::now();
    let mut a = a;
    let _ = a.proc.0.kill();
    let _ = a.proc.0.wait();
    let deadline = killed + Duration::from_secs(60);
    let back = |f: &Flow| f.echoes.lock().unwrap().iter().any(|t| *t > killed);
    while !flows.iter().all(back) {
        if Instant::now() > deadline {
            let n = flows.iter().filter(|f| back(f)).count();
            eprintln!("only {n} of {} flows came back within 60 s", flows.len());
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let storm = killed.elapsed();
    let cpu_storm = cpu_ns(b_pid) - cpu0;
    let mut gaps = Vec::new();
    let mut all_back = Duration::ZERO;
    for f in &flows {
        let e = f.echoes.lock().unwrap();
        let last_before = e
            .iter()
            .filter(|t| **t <= killed)
            .max()
            .copied()
            .unwrap_or(killed);
        let first_after = e.iter().filter(|t| **t > killed).min().copied().unwrap();
        gaps.push(first_after - last_before);
        all_back = all_back.max(first_after - killed);
    }
    // The same traffic, steady on B, for as long: what relaying alone costs.
    let steady = storm.max(Duration::from_millis(200));
    let cpu1 = cpu_ns(b_pid);
    tokio::time::sleep(steady).await;
    let cpu_steady = (cpu_ns(b_pid) - cpu1) as f64 * storm.as_secs_f64() / steady.as_secs_f64();
    let redis_per_failover = (redis_commands(redis) - before_fail) as f64 / a_args.flows as f64;
    let failed_map = redis_by_command(redis);
    let b_after = scrape(b.metrics);
    let d = |name: &str| sample(&b_after, name) - sample(&b_before, name);
    stop.store(1, Ordering::Relaxed);
    shim_task.abort();
    Some(Round {
        open_detail: per_flow(&open_map, &opened_map, a_args.flows),
        fail_detail: per_flow(&fail_map, &failed_map, a_args.flows),
        all_back,
        gaps,
        cpu_per_reconnect_us: (cpu_storm as f64 - cpu_steady).max(0.0) / a_args.flows as f64 / 1e3,
        redis_per_open,
        redis_per_failover,
        resumed: d("sudp_gateway_tls_handshakes_total{kind=\"resumed\"}"),
        full: d("sudp_gateway_tls_handshakes_total{kind=\"full\"}"),
        reattached: d("sudp_gateway_associations_reattached_total"),
    })
}

#[tokio::main]
async fn main() {
    let a = args();
    let dir = std::env::temp_dir().join(format!("sudp-storm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = sudp::cert::ephemeral();
    sudp::cert::write(&pki, &dir).unwrap();
    std::fs::write(
        dir.join("users"),
        format!("storm:{}\n", sudp::auth::hash_password(b"storm pw").unwrap()),
    )
    .unwrap();
    let out = Command::new(sudp_bin())
        .args(["cluster-key", "--out"])
        .arg(dir.join("cluster.key"))
        .output()
        .expect("run the sudp binary (cargo build --release first, or set SUDP_BIN)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let redis_port = free_port();
    let _redis = Proc(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH"),
    );
    let t0 = Instant::now();
    while !redis_call(redis_port, &["PING"]).contains("PONG") {
        assert!(t0.elapsed() < Duration::from_secs(10), "redis did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let echo = echo_server().await;
    println!(
        "storm: {} flows at {} datagrams/s each, {} kills, TLS resumption {}, {} authentication",
        a.flows,
        a.rate,
        a.kills,
        if a.resumption { "on" } else { "off" },
        if a.password {
            "password"
        } else {
            "client certificate"
        }
    );
    println!("round  all_back_ms  gap_median_ms  gap_max_ms  B_cpu_per_reconnect_us  redis_per_open  redis_per_failover  resumed  full  reattached");
    let mut rounds = Vec::new();
    for k in 0..a.kills {
        let Some(mut r) = round(&a, &pki, &dir, redis_port, echo).await else {
            continue;
        };
        let mut g: Vec<f64> = r.gaps.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        let gmax = g.iter().cloned().fold(0.0, f64::max);
        println!(
            "{k:>5}  {:>11.1}  {:>13.1}  {:>10.1}  {:>22.0}  {:>14.1}  {:>18.1}  {:>7}  {:>4}  {:>10}",
            r.all_back.as_secs_f64() * 1e3,
            median(&mut g),
            gmax,
            r.cpu_per_reconnect_us,
            r.redis_per_open,
            r.redis_per_failover,
            r.resumed,
            r.full,
            r.reattached
        );
        r.gaps.clear();
        rounds.push(r);
        // Let Redis forget the round's records (they carry on to their TTL otherwise, but
        // are never looked up again).
        redis_call(redis_port, &["FLUSHALL"]);
    }
    if let Some(r) = rounds.last() {
        println!(
            "Redis commands per new association (last round): {}",
            r.open_detail
        );
        println!("Redis commands per failover (last round): {}", r.fail_detail);
    }
    let mut all: Vec<f64> = rounds.iter().map(|r| r.all_back.as_secs_f64() * 1e3).collect();
    let worst = all.iter().cloned().fold(0.0, f64::max);
    let mut cpu: Vec<f64> = rounds.iter().map(|r| r.cpu_per_reconnect_us).collect();
    let mut open: Vec<f64> = rounds.iter().map(|r| r.redis_per_open).collect();
    let mut fail: Vec<f64> = rounds.iter().map(|r| r.redis_per_failover).collect();
    println!(
        "summary over {} kills: every stream back after median {:.1} ms, worst {:.1} ms; B CPU per reconnection median {:.0} us; Redis commands per new association {:.1}, per failover {:.1}",
        rounds.len(),
        median(&mut all),
        worst,
        median(&mut cpu),
        median(&mut open),
        median(&mut fail)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
