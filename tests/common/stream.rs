//! A numbered UDP stream through a shim's forward, for the fail-over tests (`failover.rs`,
//! `cluster.rs`): one datagram of `size` bytes every 1/`rate` s, each echo's sequence number
//! and arrival time recorded, so a test can ask for the gap and the loss around an event.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sudp::config::parse_forward;
use sudp::proto::socks::Address;
use sudp::shim::{GatewayEndpoint, Shim, ShimSettings};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// See the module documentation.
pub struct Stream {
    echoes: Arc<Mutex<Vec<(u64, Instant)>>>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Stream {
    /// Starts sending to `to` (a forward's local address) and recording echoes.
    pub async fn start(to: SocketAddr, rate: u64, size: usize) -> Stream {
        assert!(size >= 8 && rate > 0);
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        sock.connect(to).await.unwrap();
        let echoes = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (rs, re) = (sock.clone(), echoes.clone());
        let recv = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok(n) = rs.recv(&mut buf).await {
                if n == size {
                    let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
                    re.lock().unwrap().push((seq, Instant::now()));
                }
            }
        });
        let s2 = sent.clone();
        let send = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            let mut d = vec![0x5a; size];
            // Bounded: the tests end long before this many datagrams.
            for seq in 1..=(rate * 120) {
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

    /// The sequence number sent last.
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The highest sequence number echoed.
    pub fn highest(&self) -> u64 {
        self.echoes.lock().unwrap().iter().map(|e| e.0).max().unwrap_or(0)
    }

    /// Waits (at most `within`) for an echo of a datagram sent after `seq`.
    pub async fn wait_for_echo_after(&self, seq: u64, within: Duration) {
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
    pub fn longest_gap_after(&self, since: Instant) -> Duration {
        let e = self.echoes.lock().unwrap();
        let mut times: Vec<Instant> = e.iter().map(|x| x.1).filter(|t| *t >= since).collect();
        times.insert(0, since);
        times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }

    /// Datagrams sent in `from..=to` that never came back.
    pub fn lost_in(&self, from: u64, to: u64) -> u64 {
        let e = self.echoes.lock().unwrap();
        let got: std::collections::HashSet<u64> = e.iter().map(|x| x.0).collect();
        (from..=to).filter(|s| !got.contains(s)).count() as u64
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// An in-process shim with one UDP forward to `target` through `gateways` (in that order),
/// logging in as `login` if given; returns the forward's local address and the shim's task.
pub async fn shim_through(
    pki: &sudp::cert::DevPki,
    gateways: &[SocketAddr],
    target: SocketAddr,
    login: Option<(&str, &str)>,
) -> (SocketAddr, JoinHandle<std::io::Result<()>>) {
    let mut s = ShimSettings::new(
        gateways
            .iter()
            .map(|a| GatewayEndpoint::new(Address::Ip(*a)))
            .collect(),
        super::client_tls(pki, false),
    );
    s.connect_timeout = Duration::from_secs(3);
    s.credentials = login.map(|(u, p)| (u.to_owned(), p.to_owned()));
    s.socks = None;
    s.forwards = vec![parse_forward(&format!("udp:127.0.0.1:0={target}")).unwrap()];
    let shim = Shim::bind(s).await.unwrap();
    let local = shim.forward_addrs()[0].1;
    let task = tokio::spawn(shim.run(std::future::pending()));
    (local, task)
}
