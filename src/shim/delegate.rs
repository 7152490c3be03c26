//! Delegated inspection, the shim's side (`--delegate-keylog FILE`, docs/DELEGATION.md).
//!
//! * A follower polls the NSS key log file for growth (every [`POLL`]), starting at its end
//!   as it is when the shim starts; a file that shrank or was replaced (truncation,
//!   rotation) is read again from its start. Lines are gathered by ClientHello random
//!   ([`crate::inspect::keylog::Collector`]).
//! * Each CONNECT tunnel whose client stream starts with a TLS ClientHello registers its
//!   random, its tag (the TLS exporter of the tunnel's own connection to the gateway) and
//!   its gateway ([`Delegator::tunnel`]).
//! * When both are known, the four TLS 1.3 traffic secrets go to that gateway in one
//!   DELEGATE frame on the shim's control session with it (method 0x81, opened at start and
//!   re-opened when it drops), and the shim forgets them.
//!
//! Secrets are held in zeroizing buffers, for at most [`MAX_HELD`] connections, and never
//! logged.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

use super::Dialer;
use crate::inspect::keylog::{self, Added, Collector};
use crate::inspect::{TrafficSecrets, TAG_LEN};
use crate::metrics::Metrics;
use crate::net::channel::{Channel, ChannelError, Event};
use crate::proto::frame::{feature, DelegateStatus, Frame, Secret};

/// How often the key log file is looked at.
pub const POLL: Duration = Duration::from_millis(50);
/// Connections whose secrets (or tunnels) are held at most, waiting for their match.
pub const MAX_HELD: usize = 1024;
/// How long a tunnel waits for its secrets to appear in the key log.
pub const TUNNEL_WAIT: Duration = Duration::from_secs(30);
/// Longest key log line kept while it is incomplete.
const MAX_LINE: usize = 1024;
/// Time between attempts to re-open a control session that dropped.
const RECONNECT: Duration = Duration::from_secs(1);

struct Pending {
    tag: [u8; TAG_LEN],
    gateway: SocketAddr,
    since: Instant,
    /// When the tunnel closed: its secrets are still sent for [`LINGER`] (a short connection
    /// often ends before its key log lines are read; the gateway holds its copy as long).
    ended: Option<Instant>,
}

/// How long a closed tunnel's secrets are still sent (the gateway's `TUNNEL_LINGER`).
pub const LINGER: Duration = Duration::from_secs(4);

struct State {
    secrets: Collector,
    tunnels: HashMap<[u8; 32], Pending>,
}

/// A session's outgoing frames, and the gateway address it is connected to now.
struct Session {
    addr: Arc<Mutex<Option<SocketAddr>>>,
    tx: mpsc::Sender<([u8; TAG_LEN], TrafficSecrets)>,
}

/// The shim's delegation state; cheap to share.
pub(crate) struct Delegator {
    state: Mutex<State>,
    sessions: Vec<Session>,
    metrics: Arc<Metrics>,
}

impl Delegator {
    /// Starts following `path` and one control session per gateway of `dialer`, until `stop`.
    pub(crate) fn start(
        path: PathBuf,
        dialer: Arc<Dialer>,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Arc<Delegator> {
        let mut sessions = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..dialer.len() {
            let (tx, rx) = mpsc::channel(64);
            sessions.push(Session {
                addr: Arc::new(Mutex::new(None)),
                tx,
            });
            receivers.push(rx);
        }
        let d = Arc::new(Delegator {
            state: Mutex::new(State {
                secrets: Collector::new(MAX_HELD),
                tunnels: HashMap::new(),
            }),
            sessions,
            metrics,
        });
        for (i, rx) in receivers.into_iter().enumerate() {
            tokio::spawn(session_task(
                dialer.clone(),
                i,
                d.sessions[i].addr.clone(),
                rx,
                d.metrics.clone(),
                stop.clone(),
            ));
        }
        tokio::spawn(follow(path, d.clone(), stop));
        d
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a holder panicked; the maps stay usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A CONNECT tunnel through `gateway`, named `tag`, carries the TLS connection whose
    /// ClientHello random is `random`.
    pub(crate) fn tunnel(&self, random: [u8; 32], tag: [u8; TAG_LEN], gateway: SocketAddr) {
        tracing::debug!(%gateway, "delegation: a tunnel carries a TLS ClientHello");
        let mut st = self.lock();
        let now = Instant::now();
        st.tunnels.retain(|_, p| {
            now.duration_since(p.since) < TUNNEL_WAIT
                && p.ended.is_none_or(|e| now.duration_since(e) < LINGER)
        });
        if st.tunnels.len() >= MAX_HELD {
            tracing::warn!(
                "delegation: too many tunnels waiting for their secrets; this one is not delegated"
            );
            return;
        }
        st.tunnels.insert(
            random,
            Pending {
                tag,
                gateway,
                since: now,
                ended: None,
            },
        );
        self.try_send(&mut st, random);
    }

    /// The tunnel ended: what waits for it is forgotten after [`LINGER`].
    pub(crate) fn tunnel_ended(&self, random: &[u8; 32]) {
        if let Some(p) = self.lock().tunnels.get_mut(random) {
            p.ended = Some(Instant::now());
        }
    }

    fn add_line(&self, line: keylog::Line) {
        let mut st = self.lock();
        tracing::trace!(label = ?line.label, "delegation: key log line");
        match st.secrets.add(line) {
            Added::Complete(r) => self.try_send(&mut st, r),
            Added::Tls12(r) => {
                if st.tunnels.remove(&r).is_some() {
                    tracing::info!("delegation: a tunnel's connection is TLS 1.2, which is not delegated");
                }
            }
            Added::Nothing => {}
        }
    }

    fn try_send(&self, st: &mut State, random: [u8; 32]) {
        if !st.tunnels.contains_key(&random) {
            return;
        }
        let Some(secrets) = st.secrets.take(&random) else {
            return;
        };
        // Invariant: checked just above.
        let p = st.tunnels.remove(&random).expect("tunnel present");
        if p.ended.is_some_and(|e| e.elapsed() >= LINGER) {
            return;
        }
        let session = self
            .sessions
            .iter()
            .find(|s| *s.addr.lock().unwrap_or_else(|e| e.into_inner()) == Some(p.gateway));
        match session {
            Some(s) => {
                if s.tx.try_send((p.tag, secrets)).is_err() {
                    tracing::warn!(gateway = %p.gateway, "delegation: control session queue full; secrets not sent");
                }
            }
            None => {
                tracing::info!(gateway = %p.gateway, "delegation: no control session with this tunnel's gateway; not delegated");
            }
        }
    }
}

/// Keeps one control session with gateway `i` open, sending what `rx` gives it.
async fn session_task(
    dialer: Arc<Dialer>,
    i: usize,
    addr: Arc<Mutex<Option<SocketAddr>>>,
    mut rx: mpsc::Receiver<([u8; TAG_LEN], TrafficSecrets)>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut warned = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let opened = async {
            let mut last = None;
            for o in dialer.options(i).await? {
                match crate::client::connect_control(&o).await {
                    Ok(c) => return Ok((c, crate::net::canonical(o.gateway), o.heartbeat)),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or(crate::client::ClientError::Timeout))
        };
        let (control, gateway, heartbeat) = tokio::select! {
            r = opened => match r {
                Ok(x) => x,
                Err(e) => {
                    if !warned {
                        tracing::warn!(gateway = %dialer.name(i), error = %e, "delegation: cannot open a control session; retrying");
                        warned = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(RECONNECT) => continue,
                        _ = super::stopped(&mut stop) => return,
                    }
                }
            },
            _ = super::stopped(&mut stop) => return,
        };
        warned = false;
        let mut channel = Channel::open(control, heartbeat, &[feature::DELEGATION]);
        *addr.lock().unwrap_or_else(|e| e.into_inner()) = Some(gateway);
        tracing::info!(%gateway, "delegation: control session open");
        let why = loop {
            tokio::select! {
                ev = channel.next() => match ev {
                    Ok(Event::Hello(h)) if !h.has(feature::DELEGATION) => {
                        break "the gateway does not speak delegation".to_owned();
                    }
                    Ok(Event::DelegateReply { status, .. }) => {
                        metrics.count_delegation(status);
                        if status == DelegateStatus::Accepted {
                            tracing::debug!(%gateway, "delegation: secrets accepted");
                        } else {
                            tracing::info!(%gateway, reason = status.name(), "delegation: the gateway refused a tunnel's secrets");
                        }
                    }
                    Ok(_) => {}
                    Err(ChannelError::Closed) => break "the gateway closed the control session".to_owned(),
                    Err(e) => break e.to_string(),
                },
                m = rx.recv() => {
                    let Some((tag, secrets)) = m else { break "shim stopping".to_owned() };
                    let mut body = Zeroizing::new(Vec::with_capacity(4 * secrets.hash_len()));
                    for s in [&secrets.client_handshake, &secrets.server_handshake, &secrets.client_app, &secrets.server_app] {
                        body.extend_from_slice(s);
                    }
                    if let Err(e) = channel.send(&Frame::Delegate { tag, secrets: Secret(&body) }) {
                        tracing::info!(%gateway, error = %e, "delegation: secrets not sent");
                    }
                }
                _ = super::stopped(&mut stop) => break "shim stopping".to_owned(),
            }
        };
        *addr.lock().unwrap_or_else(|e| e.into_inner()) = None;
        tracing::info!(%gateway, reason = %why, "delegation: control session closed");
        channel.close().await;
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT) => {}
            _ = super::stopped(&mut stop) => return,
        }
    }
}

/// Follows the key log file until `stop`.
async fn follow(path: PathBuf, d: Arc<Delegator>, mut stop: watch::Receiver<bool>) {
    let mut f = Follower::new(path);
    f.skip_existing();
    loop {
        for line in f.poll() {
            d.add_line(line);
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = super::stopped(&mut stop) => return,
        }
    }
}

/// Reads what was appended to a file since the last look (blocking reads of a local file,
/// a few KiB per poll).
struct Follower {
    path: PathBuf,
    offset: u64,
    ino: Option<u64>,
    partial: Zeroizing<Vec<u8>>,
    warned: bool,
}

impl Follower {
    fn new(path: PathBuf) -> Follower {
        Follower {
            path,
            offset: 0,
            ino: None,
            partial: Zeroizing::new(Vec::new()),
            warned: false,
        }
    }

    fn identity(meta: &std::fs::Metadata) -> Option<u64> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            Some(meta.ino())
        }
        #[cfg(not(unix))]
        {
            let _ = meta;
            None
        }
    }

    /// Starts at the file's current end: lines written before the shim started are not ours.
    fn skip_existing(&mut self) {
        if let Ok(meta) = std::fs::metadata(&self.path) {
            self.offset = meta.len();
            self.ino = Self::identity(&meta);
        }
    }

    fn poll(&mut self) -> Vec<keylog::Line> {
        let mut out = Vec::new();
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            // Not there (yet): the application creates it on its first connection.
            return out;
        };
        let Ok(meta) = file.metadata() else { return out };
        let ino = Self::identity(&meta);
        if ino != self.ino || meta.len() < self.offset {
            // Replaced or truncated: read it from the start.
            self.ino = ino;
            self.offset = 0;
            self.partial.clear();
        }
        if meta.len() == self.offset {
            return out;
        }
        let mut buf = Zeroizing::new(Vec::new());
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return out;
        }
        match file.take(1 << 20).read_to_end(&mut buf) {
            Ok(n) => self.offset += n as u64,
            Err(e) => {
                if !self.warned {
                    tracing::warn!(file = %self.path.display(), error = %e, "delegation: cannot read the key log");
                    self.warned = true;
                }
                return out;
            }
        }
        self.partial.extend_from_slice(&buf);
        let mut start = 0;
        while let Some(i) = self.partial[start..].iter().position(|&b| b == b'\n') {
            if let Some(l) = keylog::parse_line(&self.partial[start..start + i]) {
                out.push(l);
            }
            start += i + 1;
        }
        zeroize::Zeroize::zeroize(&mut self.partial[..start]);
        self.partial.drain(..start);
        if self.partial.len() > MAX_LINE {
            self.partial.clear();
        }
        out
    }
}

/// The application's side of a CONNECT tunnel, read through unchanged; the first bytes are
/// looked at for a TLS ClientHello, whose random registers the tunnel with the
/// [`Delegator`].
pub(crate) struct Sniff<S> {
    io: S,
    delegator: Arc<Delegator>,
    tag: [u8; TAG_LEN],
    gateway: SocketAddr,
    head: Vec<u8>,
    /// `Some(r)`: registered under random `r`; `None` after the scan: not delegated.
    done: Option<Option<[u8; 32]>>,
}

impl<S> Sniff<S> {
    /// Wraps the application's stream of a tunnel named `tag` through `gateway`.
    pub(crate) fn new(io: S, delegator: Arc<Delegator>, tag: [u8; TAG_LEN], gateway: SocketAddr) -> Sniff<S> {
        Sniff {
            io,
            delegator,
            tag,
            gateway,
            head: Vec::new(),
            done: None,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        use crate::inspect::tls13::{client_random, HelloScan, HELLO_PREFIX};
        let room = HELLO_PREFIX - self.head.len();
        self.head.extend_from_slice(&bytes[..bytes.len().min(room)]);
        match client_random(&self.head) {
            HelloScan::Incomplete => {}
            HelloScan::Random(r) => {
                self.delegator.tunnel(r, self.tag, self.gateway);
                self.done = Some(Some(r));
                self.head = Vec::new();
            }
            HelloScan::NotTls => {
                self.done = Some(None);
                self.head = Vec::new();
            }
        }
    }
}

impl<S> Drop for Sniff<S> {
    fn drop(&mut self) {
        if let Some(Some(r)) = &self.done {
            self.delegator.tunnel_ended(r);
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Sniff<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if self.done.is_none() && buf.filled().len() > before {
            let this = &mut *self;
            let fresh = &buf.filled()[before..];
            this.scan(fresh);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Sniff<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_follower_reads_growth_and_survives_truncation_and_rotation() {
        let dir = std::env::temp_dir().join(format!("sudp-keylog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.log");
        let line = |r: u8| {
            format!(
                "CLIENT_TRAFFIC_SECRET_0 {} {}\n",
                hex::encode([r; 32]),
                hex::encode([1u8; 32])
            )
        };
        std::fs::write(&path, line(1)).unwrap();
        let mut f = Follower::new(path.clone());
        f.skip_existing();
        assert!(f.poll().is_empty(), "lines from before the start are skipped");
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        let l2 = line(2);
        file.write_all(&l2.as_bytes()[..30]).unwrap();
        assert!(f.poll().is_empty(), "half a line waits");
        file.write_all(&l2.as_bytes()[30..]).unwrap();
        let got = f.poll();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].client_random, [2; 32]);
        // Truncated and rewritten shorter.
        std::fs::write(&path, "# new\n").unwrap();
        assert!(f.poll().is_empty());
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(line(3).as_bytes())
            .unwrap();
        assert_eq!(f.poll()[0].client_random, [3; 32]);
        // Rotated: a new file under the same name.
        std::fs::rename(&path, dir.join("keys.log.1")).unwrap();
        std::fs::write(&path, line(4)).unwrap();
        assert_eq!(f.poll()[0].client_random, [4; 32]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
