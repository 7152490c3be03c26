//! Records inside TLS when UDP is blocked (PROTOCOL.md §6.4): a shim in `auto` mode that gets
//! no UDP answer from the relay carries its records inside the control connection, and goes
//! back to UDP as soon as UDP answers again; `tls` mode never uses UDP. The "firewall" is a
//! user-space relay on loopback that drops every datagram while closed (the gateway
//! advertises its address), so the test runs anywhere, with no network namespace.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use sudp::client::Transport;
use sudp::config::parse_forward;
use sudp::metrics::{Metrics, Path};
use sudp::proto::socks::Address;
use sudp::shim::{GatewayEndpoint, Shim, ShimSettings};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Forwards UDP between the client (which reaches it at `front`, the address the gateway
/// advertises) and the relay, from a socket of its own on 127.0.0.1; drops everything, both
/// ways, while `open` is false.
struct Firewall {
    open: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Firewall {
    async fn new(front: SocketAddr, relay: SocketAddr, open: bool) -> Firewall {
        let front = Arc::new(UdpSocket::bind(front).await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let open = Arc::new(AtomicBool::new(open));
        let dropped = Arc::new(AtomicU64::new(0));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let up = tokio::spawn({
            let (front, back, open, dropped, client) = (
                front.clone(),
                back.clone(),
                open.clone(),
                dropped.clone(),
                client.clone(),
            );
            async move {
                let mut buf = vec![0u8; 70_000];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().unwrap() = Some(from);
                    if open.load(Ordering::Relaxed) {
                        let _ = back.send_to(&buf[..n], relay).await;
                    } else {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        let down = tokio::spawn({
            let (open, dropped) = (open.clone(), dropped.clone());
            async move {
                let mut buf = vec![0u8; 70_000];
                while let Ok((n, from)) = back.recv_from(&mut buf).await {
                    let to = *client.lock().unwrap();
                    match to {
                        Some(to) if from == relay && open.load(Ordering::Relaxed) => {
                            let _ = front.send_to(&buf[..n], to).await;
                        }
                        _ => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        Firewall {
            open,
            dropped,
            tasks: vec![up, down],
        }
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A stream of numbered datagrams, one every 10 ms, through `to`; counts the echoes.
struct Stream {
    sent: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Stream {
    async fn start(to: SocketAddr) -> Stream {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        sock.connect(to).await.unwrap();
        let (sent, echoed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let recv = tokio::spawn({
            let (sock, echoed) = (sock.clone(), echoed.clone());
            async move {
                let mut buf = [0u8; 2048];
                while let Ok(n) = sock.recv(&mut buf).await {
                    if n == 200 {
                        echoed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        let send = tokio::spawn({
            let sent = sent.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                let mut d = vec![7u8; 200];
                // Bounded: the test ends long before.
                for seq in 0u64..6_000 {
                    tick.tick().await;
                    d[..8].copy_from_slice(&seq.to_be_bytes());
                    let _ = sock.send(&d).await;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Stream {
            sent,
            echoed,
            tasks: vec![recv, send],
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.echoed.load(Ordering::Relaxed),
        )
    }

    /// Runs for `d` and returns (sent, echoed) in that time.
    async fn during(&self, d: Duration) -> (u64, u64) {
        let (s0, e0) = self.counts();
        tokio::time::sleep(d).await;
        let (s1, e1) = self.counts();
        (s1 - s0, e1 - e0)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn forwarded(m: &Metrics, p: Path) -> u64 {
    m.forwarded_by[p as usize].datagrams.load(Ordering::Relaxed)
}

async fn shim(
    pki: &sudp::cert::DevPki,
    gw: &TestGateway,
    echo: SocketAddr,
    transport: Transport,
) -> (SocketAddr, Arc<Metrics>, JoinHandle<std::io::Result<()>>) {
    let mut s = ShimSettings::new(
        vec![GatewayEndpoint::new(Address::Ip(gw.control))],
        client_tls(pki, false),
    );
    s.socks = None;
    s.transport = transport;
    s.forwards = vec![parse_forward(&format!("udp:127.0.0.1:0={echo}")).unwrap()];
    let shim = Shim::bind(s).await.unwrap();
    let local = shim.forward_addrs()[0].1;
    let metrics = shim.metrics();
    (local, metrics, tokio::spawn(shim.run(std::future::pending())))
}

/// UDP blocked from the start: the first PROBE gets no answer, records travel inside TLS and
/// the stream flows; the firewall opens: the next PROBE is answered, records go back to UDP,
/// and the stream keeps flowing. Both phases show in the counters of both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_carries_records_inside_tls_while_udp_is_blocked_and_returns_to_udp() {
    let pki = pki();
    let front: std::net::IpAddr = "127.0.0.6".parse().unwrap();
    let mut s = settings(&pki);
    s.advertise = Some(front);
    let gw = TestGateway::start(s).await;
    let fw = Firewall::new(SocketAddr::new(front, gw.relay.port()), gw.relay, false).await;
    let echo = udp_echo().await;
    let (local, m, shim) = shim(&pki, &gw, echo, Transport::Auto).await;
    let stream = Stream::start(local).await;

    // Phase 1: UDP blocked. The association opens (about half a second of probing), then the
    // stream flows inside TLS.
    let t0 = Instant::now();
    while forwarded(&m, Path::Tls) == 0 {
        assert!(t0.elapsed() < WAIT, "no record went inside TLS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (sent, echoed) = stream.during(Duration::from_secs(2)).await;
    eprintln!(
        "UDP blocked: {echoed} of {sent} echoed inside TLS; firewall dropped {}",
        fw.dropped.load(Ordering::Relaxed)
    );
    assert!(
        echoed * 100 >= sent * 90,
        "{echoed} of {sent} echoed while UDP was blocked"
    );
    let gm = &gw.metrics;
    assert!(
        forwarded(gm, Path::Tls) > 0
            && gm.returned_by[Path::Tls as usize]
                .datagrams
                .load(Ordering::Relaxed)
                > 0
    );
    assert_eq!(
        forwarded(&m, Path::Secure),
        0,
        "nothing was sent over UDP while it was blocked"
    );
    assert!(
        fw.dropped.load(Ordering::Relaxed) > 0,
        "the shim kept probing UDP"
    );

    // Phase 2: the firewall opens. Within a couple of probe intervals the records are back on UDP.
    fw.open.store(true, Ordering::Relaxed);
    let t1 = Instant::now();
    let udp_before = forwarded(&m, Path::Secure);
    while forwarded(&m, Path::Secure) == udp_before {
        assert!(
            t1.elapsed() < Duration::from_secs(8),
            "records never went back to UDP"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("back on UDP {:?} after the firewall opened", t1.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tls_before = forwarded(&m, Path::Tls);
    let (sent, echoed) = stream.during(Duration::from_secs(2)).await;
    eprintln!("UDP open: {echoed} of {sent} echoed");
    assert!(
        echoed * 100 >= sent * 90,
        "{echoed} of {sent} echoed after UDP came back"
    );
    assert_eq!(forwarded(&m, Path::Tls), tls_before, "records stayed on UDP");
    assert!(
        gm.returned_by[Path::Secure as usize]
            .datagrams
            .load(Ordering::Relaxed)
            > 0,
        "replies came back over UDP"
    );

    // Phase 3: UDP goes silent mid-stream. After PROBE_SILENCE of unanswered probes the
    // records move inside TLS again, and the stream goes on there.
    fw.open.store(false, Ordering::Relaxed);
    let t2 = Instant::now();
    let tls_before = forwarded(&m, Path::Tls);
    while forwarded(&m, Path::Tls) == tls_before {
        assert!(
            t2.elapsed() < sudp::client::PROBE_SILENCE + Duration::from_secs(5),
            "records stayed on a silent UDP path"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("inside TLS {:?} after UDP went silent", t2.elapsed());
    assert!(
        t2.elapsed() >= sudp::client::PROBE_SILENCE - Duration::from_millis(500),
        "moved before the probes had been unanswered for PROBE_SILENCE"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sent, echoed) = stream.during(Duration::from_secs(1)).await;
    eprintln!("UDP silent again: {echoed} of {sent} echoed inside TLS");
    assert!(
        echoed * 100 >= sent * 90,
        "{echoed} of {sent} echoed after UDP went silent"
    );
    shim.abort();
}

/// `transport tls`: every record goes inside the control connection, none over UDP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_transport_never_uses_udp() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let (local, m, shim) = shim(&pki, &gw, echo, Transport::Tls).await;
    let stream = Stream::start(local).await;
    let t0 = Instant::now();
    while stream.counts().1 < 50 {
        assert!(t0.elapsed() < WAIT, "no echo through the TLS transport");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (sent, echoed) = stream.during(Duration::from_secs(1)).await;
    assert!(echoed * 100 >= sent * 95, "{echoed} of {sent}");
    assert_eq!(forwarded(&m, Path::Secure), 0);
    assert_eq!(forwarded(&gw.metrics, Path::Secure), 0);
    assert!(forwarded(&gw.metrics, Path::Tls) >= 50);
    shim.abort();
}

/// The gateway says once, not once per record, that an association's records arrive inside
/// TLS (the line an operator reads when a network blocks UDP): a `sudp gateway` process,
/// a client on the TLS transport, several round trips, one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_move_inside_tls_is_logged_once() {
    let pki = pki();
    let gw = GatewayProcess::start(&pki, "gw-tls-log", &["--no-auth", "--allow", "127.0.0.0/8"]);
    let echo = udp_echo().await;
    let mut opts = sudp::client::ClientOptions::new(gw.control, "localhost", client_tls(&pki, false));
    opts.transport = Transport::Tls;
    let udp = sudp::client::SecureUdp::connect(&opts).await.unwrap();
    let mut buf = vec![0u8; sudp::client::RECORD_BUF];
    for i in 0..5u8 {
        udp.send_to(&[i; 32], &Address::Ip(echo)).await.unwrap();
        let (n, _) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(&buf[..n], &[i; 32]);
    }
    const LINE: &str = "client records arrive inside TLS";
    let t0 = Instant::now();
    while !gw.stderr().contains(LINE) {
        assert!(t0.elapsed() < WAIT, "no line for the move:\n{}", gw.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.stderr().matches(LINE).count(), 1, "{}", gw.stderr());
}
