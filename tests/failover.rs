//! Gateways that die or go silent mid-stream, as real processes: the shim notices through
//! the control channel's heartbeat (PROTOCOL.md §2.4) and moves to the next gateway of its
//! list, so a UDP stream through a forward continues.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use sudp::config::parse_forward;
use sudp::proto::socks::Address;
use sudp::shim::{GatewayEndpoint, Shim, ShimSettings};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Datagrams per second of the test stream.
const RATE: u64 = 500;

/// A UDP stream through the shim's forward to a local echo: one numbered datagram every
/// 1/RATE s; records when each echo came back.
struct Stream {
    echoes: Arc<Mutex<Vec<(u64, Instant)>>>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Stream {
    async fn start(to: SocketAddr) -> Stream {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        sock.connect(to).await.unwrap();
        let echoes = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (rs, re) = (sock.clone(), echoes.clone());
        let recv = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok(n) = rs.recv(&mut buf).await {
                if n == 160 {
                    let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
                    re.lock().unwrap().push((seq, Instant::now()));
                }
            }
        });
        let s2 = sent.clone();
        let send = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
            let mut d = vec![0x5a; 160];
            // Bounded: the test ends long before this many datagrams.
            for seq in 1..=(RATE * 120) {
                tick.tick().await;
                d[..8].copy_from_slice(&seq.to_be_bytes());
                let _ = sock.send(&d).await;
                s2.store(seq, std::sync::atomic::Ordering::Relaxed);
            }
        });
        Stream {
            echoes,
            sent,
            tasks: vec![recv, send],
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn highest(&self) -> u64 {
        self.echoes.lock().unwrap().iter().map(|e| e.0).max().unwrap_or(0)
    }

    async fn wait_for_echo_after(&self, seq: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.highest() <= seq {
            assert!(
                Instant::now() < deadline,
                "no echo after #{seq} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The longest time without an echo after `since`, up to the last echo.
    fn longest_gap_after(&self, since: Instant) -> Duration {
        let e = self.echoes.lock().unwrap();
        let mut times: Vec<Instant> = e.iter().map(|x| x.1).filter(|t| *t >= since).collect();
        times.insert(0, since);
        times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn shim_through(pki: &sudp::cert::DevPki, gateways: &[SocketAddr], target: SocketAddr) -> (SocketAddr, JoinHandle<std::io::Result<()>>) {
    let mut s = ShimSettings::new(
        gateways
            .iter()
            .map(|a| GatewayEndpoint::new(Address::Ip(*a)))
            .collect(),
        client_tls(pki, false),
    );
    s.connect_timeout = Duration::from_secs(3);
    s.socks = None;
    s.forwards = vec![parse_forward(&format!("udp:127.0.0.1:0={target}")).unwrap()];
    let shim = Shim::bind(s).await.unwrap();
    let local = shim.forward_addrs()[0].1;
    let task = tokio::spawn(shim.run(std::future::pending()));
    (local, task)
}

/// A gateway frozen with SIGSTOP (no RST, no FIN: its TCP stack still ACKs) is noticed by the
/// heartbeat within its timeout (1.5 s by default) and the stream moves to the second gateway.
/// Before the control channel had a heartbeat, the stream stopped for good here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_gateway_is_noticed_by_the_heartbeat_and_the_stream_moves_on() {
    let pki = pki();
    let allow = ["--no-auth", "--allow", "127.0.0.0/8"];
    let a = GatewayProcess::start(&pki, "gw-a", &allow);
    let b = GatewayProcess::start(&pki, "gw-b", &allow);
    let echo = udp_echo().await;
    let (forward, shim) = shim_through(&pki, &[a.control, b.control], echo).await;
    let stream = Stream::start(forward).await;
    stream.wait_for_echo_after(100, WAIT).await;
    assert!(a.stderr().contains("UDP association open"), "the stream started on A");

    let frozen_at = Instant::now();
    a.signal("STOP");
    let at_stop = stream.sent();
    stream.wait_for_echo_after(at_stop, Duration::from_secs(6)).await;
    // Let the stream run on B for a while, then measure the whole interruption.
    let resumed = stream.highest();
    stream.wait_for_echo_after(resumed + RATE / 2, WAIT).await;
    let gap = stream.longest_gap_after(frozen_at);
    eprintln!("frozen gateway: the stream stopped for {gap:?}");
    assert!(gap < Duration::from_millis(2500), "interruption {gap:?}");
    assert!(gap >= Duration::from_millis(800), "too short a gap ({gap:?}): was A really frozen?");
    assert!(b.stderr().contains("UDP association open"), "the stream moved to B");
    shim.abort();
    drop(stream);
}

/// A gateway that is killed (its kernel resets the TCP connection) is noticed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_is_noticed_at_once() {
    let pki = pki();
    let allow = ["--no-auth", "--allow", "127.0.0.0/8"];
    let a = GatewayProcess::start(&pki, "gw-a", &allow);
    let b = GatewayProcess::start(&pki, "gw-b", &allow);
    let echo = udp_echo().await;
    let (forward, shim) = shim_through(&pki, &[a.control, b.control], echo).await;
    let stream = Stream::start(forward).await;
    stream.wait_for_echo_after(100, WAIT).await;

    let killed_at = Instant::now();
    a.signal("KILL");
    let at_kill = stream.sent();
    stream.wait_for_echo_after(at_kill, Duration::from_secs(5)).await;
    let resumed = stream.highest();
    stream.wait_for_echo_after(resumed + RATE / 2, WAIT).await;
    let gap = stream.longest_gap_after(killed_at);
    eprintln!("killed gateway: the stream stopped for {gap:?}");
    assert!(gap < Duration::from_millis(1000), "interruption {gap:?}");
    shim.abort();
    drop(stream);
}

/// The gateway drops a client that said HELLO with PINGs promised and then fell silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_drops_a_client_that_stops_answering() {
    use sudp::client::{connect_tls, negotiate_sudp, request};
    use sudp::proto::frame::{Frame, Hello};
    use sudp::proto::socks::Command;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = pki();
    let gw = GatewayProcess::start(
        &pki,
        "gw",
        &["--no-auth", "--heartbeat-interval", "200ms", "--heartbeat-timeout", "800ms"],
    );
    let opts = sudp::client::ClientOptions::new(gw.control, "localhost", client_tls(&pki, false));
    let mut control = connect_tls(&opts).await.unwrap();
    negotiate_sudp(&mut control, &opts).await.unwrap();
    request(
        &mut control,
        Command::UdpAssociate,
        &Address::Ip("127.0.0.1:9".parse().unwrap()),
    )
    .await
    .unwrap();
    let mut hello = Vec::new();
    Frame::Hello(Hello {
        version: 1,
        ping_interval_ms: 100,
        features: vec![],
    })
    .encode(&mut hello)
    .unwrap();
    control.write_all(&hello).await.unwrap();
    control.flush().await.unwrap();
    // Read (so the gateway's writes never block) but never answer: a hung client.
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match control.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the gateway kept a silent client");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(3), "{took:?}");
    let log = gw.stderr();
    assert!(log.contains("no heartbeat from the peer"), "{log}");
}
