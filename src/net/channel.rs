//! The framed control channel's I/O (`docs/PROTOCOL.md` §2.4) over any byte stream (the TLS
//! control connection), for the gateway and the client alike.
//!
//! [`Channel::open`] splits the stream: a writer task sends queued frames (each write bounded
//! by the heartbeat timeout, so a peer that stops reading cannot block us), and
//! [`Channel::next`] reads and decodes frames ([`crate::proto::frame::Decoder`]), answers
//! PINGs, sends our own PINGs on schedule and watches the peer's liveness. It returns only
//! what the caller must act on. `next` is cancel-safe: it can sit in a `select!` beside other
//! events without losing or tearing a frame.
//!
//! Liveness: once the peer's HELLO said it sends PINGs, a silence (no byte at all) longer than
//! our `timeout` means the peer is gone ([`ChannelError::Silent`]): a frozen process or a
//! partition, which TCP alone would notice only after minutes. Our own PINGs make the peer
//! answer with PONGs, so with `interval` well below the timeout a live peer is never silent
//! that long. A peer that sent no HELLO (an older version) is never timed out.

use std::io;
use std::time::Duration;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::proto::frame::{self, Decoder, Frame, FrameError, Hello};

/// Frames queued for the writer. A full queue drops a record frame (counted by the caller)
/// and skips a PING; only the write timeout declares the peer gone.
const QUEUE: usize = 512;

/// How often to ping and how long a silence means the peer is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Time between our PINGs; zero sends none.
    pub interval: Duration,
    /// Silence after which a peer that announced PINGs is declared gone.
    pub timeout: Duration,
}

impl Heartbeat {
    /// No PINGs, and a timeout only as a bound on writes.
    pub const OFF: Heartbeat = Heartbeat {
        interval: Duration::ZERO,
        timeout: Duration::from_secs(30),
    };
}

/// What the peer sent that the caller must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer's capabilities (once, first).
    Hello(Hello),
    /// A secure-UDP record carried inside TLS (RECORD frame), for the record layer.
    Record(Vec<u8>),
    /// The client asks to re-attach an association to this connection (feature REATTACH).
    Reattach {
        /// The association.
        assoc: crate::proto::AssociationId,
        /// The client's UDP port (0: unknown).
        port: u16,
    },
    /// The gateway re-attached the association, under the keys of `epoch`.
    Reattached {
        /// The association.
        assoc: crate::proto::AssociationId,
        /// Its new epoch.
        epoch: u32,
    },
    /// The gateway refused the re-attach.
    ReattachRefused {
        /// The association.
        assoc: crate::proto::AssociationId,
        /// Why.
        reason: frame::RefuseReason,
    },
    /// The client asks for one more association on this connection (feature
    /// ASSOCIATIONS, PROTOCOL.md §2.9).
    Open {
        /// The request's number.
        req: u32,
        /// The client's UDP port (0: unknown).
        port: u16,
    },
    /// The gateway's answer to an OPEN.
    Opened {
        /// The OPEN's number.
        req: u32,
        /// The verdict.
        status: frame::OpenStatus,
        /// The new association (zero when refused).
        assoc: crate::proto::AssociationId,
    },
    /// An association ends: the gateway ended it, or (feature ASSOCIATIONS) the client
    /// releases it.
    Close {
        /// The association.
        assoc: crate::proto::AssociationId,
        /// Why.
        reason: frame::CloseReason,
    },
    /// The client delegates a tunnel's traffic secrets (DELEGATE, PROTOCOL.md §2.8). The
    /// frame's bytes are wiped from the decoder's buffer once copied here.
    Delegate {
        /// The tunnel's tag.
        tag: [u8; frame::TAG_LEN],
        /// The four secrets (zeroized on drop).
        secrets: crate::inspect::TrafficSecrets,
    },
    /// The gateway's verdict on a DELEGATE.
    DelegateReply {
        /// The tunnel's tag.
        tag: [u8; frame::TAG_LEN],
        /// The verdict.
        status: frame::DelegateStatus,
    },
}

/// Why the channel ended.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The peer closed the connection.
    #[error("the peer closed the control connection")]
    Closed,
    /// Reading or writing failed.
    #[error("control connection: {0}")]
    Io(#[from] io::Error),
    /// The peer sent a malformed frame.
    #[error("control connection: {0}")]
    Protocol(#[from] FrameError),
    /// No byte from a peer that promised PINGs for longer than the heartbeat timeout.
    #[error("no heartbeat from the peer for {0:?}")]
    Silent(Duration),
    /// A write did not complete within the heartbeat timeout (the peer stopped reading).
    #[error("the peer stopped reading the control connection")]
    Stalled,
    /// The writer's queue is full (a burst of records): this frame was not queued.
    #[error("the control connection's send queue is full")]
    Full,
}

fn queue_on(tx: &mpsc::Sender<Vec<u8>>, f: &Frame<'_>) -> Result<(), ChannelError> {
    let mut out = Vec::with_capacity(match f {
        Frame::Record(r) => frame::HEADER_LEN + r.len(),
        _ => 16,
    });
    f.encode(&mut out)?;
    tx.try_send(out).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => ChannelError::Full,
        mpsc::error::TrySendError::Closed(_) => ChannelError::Stalled,
    })
}

/// A sender whose channel is gone (tests of the record paths that need no control channel).
#[cfg(test)]
pub(crate) fn test_sender() -> FrameSender {
    FrameSender {
        tx: mpsc::channel(1).0,
    }
}

/// Queues frames on a [`Channel`] from another task (e.g. records sent inside TLS).
#[derive(Clone, Debug)]
pub struct FrameSender {
    tx: mpsc::Sender<Vec<u8>>,
}

impl FrameSender {
    /// Queues any frame (an OPEN, a client's CLOSE) from outside the channel's task.
    pub fn send(&self, f: &Frame<'_>) -> Result<(), ChannelError> {
        queue_on(&self.tx, f)
    }

    /// Queues one secure-UDP record as a RECORD frame; `Err(Full)` drops it (the caller
    /// counts it), `Err(Stalled)` means the channel is gone.
    pub fn send_record(&self, record: &[u8]) -> Result<(), ChannelError> {
        queue_on(&self.tx, &Frame::Record(record))
    }

    /// Whether the channel is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Both halves of the stream, behind one lock taken for the length of one poll (as
/// `tokio::io::split` does), so that the owner can still reach the stream itself: the TLS
/// exporter, for the keys of a re-attached association (PROTOCOL.md §3.1).
struct Half<S>(Arc<Mutex<S>>);

impl<S> Half<S> {
    fn lock(&self) -> std::sync::MutexGuard<'_, S> {
        // A poisoned lock only means a poll panicked; the stream's state is still whole.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Half<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Half<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}

/// One side of a framed control channel.
pub struct Channel<S> {
    reader: Half<S>,
    decoder: Decoder,
    tx: mpsc::Sender<Vec<u8>>,
    writer: JoinHandle<()>,
    heartbeat: Heartbeat,
    peer: Option<Hello>,
    last_rx: Instant,
    next_ping: Instant,
    pings: u64,
    /// Frames of types this version does not know, skipped.
    unknown: u64,
    /// The features our HELLO listed: a frame of an optional kind we did not list is
    /// skipped like an unknown one.
    features: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Channel<S> {
    /// Starts the channel on `stream` and queues our HELLO, listing `features`
    /// ([`crate::proto::frame::feature`]).
    pub fn open(stream: S, heartbeat: Heartbeat, features: &[u8]) -> Channel<S> {
        let stream = Arc::new(Mutex::new(stream));
        let (reader, writer) = (Half(stream.clone()), Half(stream));
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = tokio::spawn(write_loop(writer, rx, heartbeat.timeout));
        let now = Instant::now();
        let ch = Channel {
            reader,
            decoder: Decoder::default(),
            tx,
            writer,
            heartbeat,
            peer: None,
            last_rx: now,
            next_ping: now + heartbeat.interval,
            pings: 0,
            unknown: 0,
            features: features.to_vec(),
        };
        let hello = Frame::Hello(Hello {
            version: frame::VERSION,
            ping_interval_ms: heartbeat.interval.as_millis().min(u16::MAX as u128) as u16,
            features: features.to_vec(),
        });
        // Invariant: the queue is empty, so a fresh channel always has room for its HELLO.
        ch.queue(&hello).expect("room for the HELLO");
        ch
    }

    /// Runs `f` on the stream (e.g. the TLS exporter), between two polls of the halves.
    pub fn with_stream<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.reader.lock())
    }

    /// The peer's HELLO, once it arrived.
    pub fn peer(&self) -> Option<&Hello> {
        self.peer.as_ref()
    }

    /// Frames of unknown types skipped so far.
    pub fn unknown_frames(&self) -> u64 {
        self.unknown
    }

    /// Queues a frame for the writer; `Err(Stalled)` when the peer has stopped reading.
    pub fn send(&self, f: &Frame<'_>) -> Result<(), ChannelError> {
        self.queue(f)
    }

    /// A handle that queues frames on this channel from elsewhere (the record paths).
    pub fn sender(&self) -> FrameSender {
        FrameSender { tx: self.tx.clone() }
    }

    fn queue(&self, f: &Frame<'_>) -> Result<(), ChannelError> {
        queue_on(&self.tx, f)
    }

    /// Sends what is queued, then closes our sending side (TLS close_notify), bounded by the
    /// heartbeat timeout.
    pub async fn close(mut self) {
        // Replacing the sender with a closed one drops ours: the writer sends what is queued,
        // then shuts the stream down.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        let _ = tokio::time::timeout(self.heartbeat.timeout, &mut self.writer).await;
    }

    /// Waits for the next event: reads and decodes, answers PINGs, sends ours, and watches
    /// the peer's liveness. Cancel-safe.
    pub async fn next(&mut self) -> Result<Event, ChannelError> {
        loop {
            if let Some(ev) = self.take_buffered()? {
                return Ok(ev);
            }
            let silent_after = match &self.peer {
                Some(p) if p.ping_interval_ms > 0 => Some(self.last_rx + self.heartbeat.timeout),
                _ => None,
            };
            let pinging = !self.heartbeat.interval.is_zero();
            let Channel {
                reader,
                decoder,
                next_ping,
                ..
            } = self;
            tokio::select! {
                r = reader.read(decoder.space()) => match r {
                    Ok(0) => return Err(ChannelError::Closed),
                    Ok(n) => {
                        decoder.filled(n);
                        self.last_rx = Instant::now();
                    }
                    Err(e) => return Err(e.into()),
                },
                _ = tokio::time::sleep_until(*next_ping), if pinging => {
                    self.pings += 1;
                    match self.queue(&Frame::Ping(self.pings.to_be_bytes())) {
                        // A queue full of records: the writer is busy, skip this PING.
                        Ok(()) | Err(ChannelError::Full) => {}
                        Err(e) => return Err(e),
                    }
                    self.next_ping = Instant::now() + self.heartbeat.interval;
                }
                _ = sleep_until_opt(silent_after) => {
                    return Err(ChannelError::Silent(self.last_rx.elapsed()));
                }
                _ = self.tx.closed() => return Err(ChannelError::Stalled),
            }
        }
    }

    /// Handles the frames already received; the first that needs the caller is returned.
    fn take_buffered(&mut self) -> Result<Option<Event>, ChannelError> {
        loop {
            let Some(f) = self.decoder.next_frame()? else {
                return Ok(None);
            };
            match f {
                Frame::Hello(h) => {
                    if self.peer.is_none() {
                        self.peer = Some(h.clone());
                        return Ok(Some(Event::Hello(h)));
                    }
                    // A second HELLO changes nothing (the first one is binding).
                }
                Frame::Ping(b) => match self.queue(&Frame::Pong(b)) {
                    // Records fill the queue: the peer sees them, it is alive anyway.
                    Ok(()) | Err(ChannelError::Full) => {}
                    Err(e) => return Err(e),
                },
                Frame::Pong(_) => {}
                Frame::Close { assoc, reason } => return Ok(Some(Event::Close { assoc, reason })),
                Frame::Reattach { assoc, port } => return Ok(Some(Event::Reattach { assoc, port })),
                Frame::Reattached { assoc, epoch } => return Ok(Some(Event::Reattached { assoc, epoch })),
                Frame::ReattachRefused { assoc, reason } => {
                    return Ok(Some(Event::ReattachRefused { assoc, reason }))
                }
                Frame::Record(r) => return Ok(Some(Event::Record(r.to_vec()))),
                // Frames of a feature this side did not list are skipped like unknown ones.
                Frame::Open { .. } | Frame::Opened { .. }
                    if !self.features.contains(&frame::feature::ASSOCIATIONS) =>
                {
                    self.unknown += 1;
                }
                Frame::Open { req, port } => return Ok(Some(Event::Open { req, port })),
                Frame::Opened { req, status, assoc } => {
                    return Ok(Some(Event::Opened { req, status, assoc }))
                }
                Frame::Delegate { .. } | Frame::DelegateReply { .. }
                    if !self.features.contains(&frame::feature::DELEGATION) =>
                {
                    self.decoder.wipe_taken();
                    self.unknown += 1;
                }
                Frame::Delegate { tag, secrets } => {
                    let n = secrets.0.len() / 4;
                    let part = |i: usize| zeroize::Zeroizing::new(secrets.0[i * n..(i + 1) * n].to_vec());
                    let secrets = crate::inspect::TrafficSecrets {
                        client_handshake: part(0),
                        server_handshake: part(1),
                        client_app: part(2),
                        server_app: part(3),
                    };
                    self.decoder.wipe_taken();
                    return Ok(Some(Event::Delegate { tag, secrets }));
                }
                Frame::DelegateReply { tag, status } => {
                    return Ok(Some(Event::DelegateReply { tag, status }))
                }
                Frame::Unknown { .. } => self.unknown += 1,
            }
        }
    }
}

impl<S> Drop for Channel<S> {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn write_loop<S: AsyncWrite + Unpin>(mut w: Half<S>, mut rx: mpsc::Receiver<Vec<u8>>, limit: Duration) {
    while let Some(bytes) = rx.recv().await {
        let wrote = tokio::time::timeout(limit, async {
            w.write_all(&bytes).await?;
            w.flush().await
        })
        .await;
        if !matches!(wrote, Ok(Ok(()))) {
            // Dropping the receiver tells `Channel::next` (through `tx.closed()`).
            return;
        }
    }
    let _ = tokio::time::timeout(limit, w.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Heartbeat = Heartbeat {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(300),
    };

    #[tokio::test]
    async fn hellos_cross_and_pings_keep_both_sides_alive() {
        let (a, b) = tokio::io::duplex(4096);
        let mut a = Channel::open(a, FAST, &[]);
        let mut b = Channel::open(b, FAST, &[]);
        let ea = tokio::time::timeout(Duration::from_secs(5), a.next())
            .await
            .unwrap()
            .unwrap();
        let eb = tokio::time::timeout(Duration::from_secs(5), b.next())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            ea,
            Event::Hello(Hello {
                version: 1,
                ping_interval_ms: 50,
                ..
            })
        ));
        assert!(matches!(eb, Event::Hello(_)));
        // Both keep reading for well over the timeout: pings and pongs keep them alive.
        let both = async {
            tokio::select! {
                r = a.next() => r,
                r = b.next() => r,
            }
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(1), both).await.is_err(),
            "a live peer was declared gone"
        );
        assert!(a.pings >= 10 && b.pings >= 10);
    }

    #[tokio::test]
    async fn a_silent_peer_is_noticed_after_the_timeout() {
        let (a, mut raw) = tokio::io::duplex(4096);
        let mut a = Channel::open(a, FAST, &[]);
        // The peer says HELLO with PINGs promised, then goes quiet (a frozen process).
        let mut hello = Vec::new();
        Frame::Hello(Hello {
            version: 1,
            ping_interval_ms: 50,
            features: vec![],
        })
        .encode(&mut hello)
        .unwrap();
        raw.write_all(&hello).await.unwrap();
        assert!(matches!(a.next().await.unwrap(), Event::Hello(_)));
        let start = Instant::now();
        // Keep draining what `a` writes so that only the silence can end it.
        let drain = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while raw.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        let err = tokio::time::timeout(Duration::from_secs(5), a.next())
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, ChannelError::Silent(_)), "{err}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{took:?}"
        );
        drain.abort();
    }

    #[tokio::test]
    async fn a_peer_without_hello_is_never_timed_out_and_unknown_frames_are_skipped() {
        let (a, mut raw) = tokio::io::duplex(4096);
        let mut a = Channel::open(a, FAST, &[]);
        let mut bytes = Vec::new();
        Frame::Unknown {
            kind: 0x70,
            body: b"future",
        }
        .encode(&mut bytes)
        .unwrap();
        Frame::Close {
            assoc: crate::proto::AssociationId(7),
            reason: frame::CloseReason::Idle,
        }
        .encode(&mut bytes)
        .unwrap();
        raw.write_all(&bytes).await.unwrap();
        let ev = a.next().await.unwrap();
        assert_eq!(
            ev,
            Event::Close {
                assoc: crate::proto::AssociationId(7),
                reason: frame::CloseReason::Idle
            }
        );
        assert_eq!(a.unknown_frames(), 1);
        let drain = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while raw.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        // No HELLO from the peer: silence is not a failure.
        assert!(tokio::time::timeout(Duration::from_millis(700), a.next())
            .await
            .is_err());
        drain.abort();
    }

    #[tokio::test]
    async fn a_malformed_frame_ends_the_channel() {
        let (a, mut raw) = tokio::io::duplex(4096);
        let mut a = Channel::open(a, FAST, &[]);
        raw.write_all(&[frame::kind::PING, 0, 2, 1, 2]).await.unwrap();
        let err = a.next().await.unwrap_err();
        assert!(
            matches!(err, ChannelError::Protocol(FrameError::Malformed { .. })),
            "{err}"
        );
        drop(raw);
    }

    #[tokio::test]
    async fn eof_is_closed() {
        let (a, raw) = tokio::io::duplex(4096);
        let mut a = Channel::open(a, FAST, &[]);
        drop(raw);
        assert!(matches!(
            a.next().await.unwrap_err(),
            ChannelError::Closed | ChannelError::Stalled
        ));
    }
}
