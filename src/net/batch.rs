//! Batched UDP I/O: `recvmmsg` with GRO on receive, GSO on send, with a per-datagram
//! fallback where the kernel offers neither (quinn-udp probes the socket and degrades).
//!
//! * [`BatchSocket::recv_batch`] fills a [`RecvBatch`] with up to [`BATCH`] buffers in one
//!   system call; with GRO a buffer holds several datagrams of one sender cut at `stride`.
//! * [`GsoBatch`] collects equal-sized datagrams for one destination and hands them to the
//!   kernel in one `sendmsg` with `UDP_SEGMENT`; a smaller datagram may close a batch.
//!
//! Buffers are allocated once per loop, never per datagram.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use std::sync::Arc;

use crate::net::canonical;
use crate::net::drops::{DropTracker, Tracked};

/// Receive buffers per system call.
pub const BATCH: usize = 32;
/// Most datagrams [`RecvBatch::for_each_run`] hands over at once.
pub const RUN: usize = 8;
/// Size of one receive buffer: room for a 64 KiB GRO train or the largest datagram.
pub const RECV_BUF: usize = 65_536;
/// Largest GSO train we build (the kernel limit for one UDP_SEGMENT send is 64 KiB).
pub const GSO_MAX_BYTES: usize = 65_000;

/// A UDP socket with quinn-udp's batched, offloaded I/O, registered with tokio for
/// **read readiness only**.
///
/// `tokio::net::UdpSocket` registers every socket for both directions, and on Linux each
/// datagram that leaves a UDP socket frees send-buffer space and so raises an `EPOLLOUT`
/// edge: one extra `epoll_wait` return, and often one extra wake-up of a parked runtime
/// thread, per datagram sent, for readiness no task waits on. Here sends go straight to
/// the kernel; only when it reports a full send buffer ([`BatchSocket::send`]) does the
/// caller back off and retry (a UDP send buffer drains by itself, without a reader).
pub struct BatchSocket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// Counts what the kernel drops at this socket's receive queue, once tracked.
    drops: Option<Arc<Tracked>>,
}

/// How long [`BatchSocket::send`] waits before retrying a send the kernel refused for a
/// full send buffer.
const SEND_RETRY: Duration = Duration::from_millis(1);

impl BatchSocket {
    /// The socket's file descriptor (for options and queues quinn-udp does not cover).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self.io.get_ref())
    }

    /// Wraps a bound socket, probing GSO/GRO support. Must be called inside a tokio
    /// runtime.
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        let socket = socket.into_std()?;
        let state = UdpSocketState::new((&socket).into())?;
        // SAFETY: `socket` owns its descriptor, which stays open and unchanged until the
        // AsyncFd (which owns the socket) is dropped.
        let io = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(BatchSocket {
            io,
            state,
            drops: None,
        })
    }

    /// Counts the datagrams the kernel drops at this socket's receive queue in `tracker`
    /// (see [`crate::net::drops`]).
    pub fn track_drops(mut self, tracker: &Arc<DropTracker>) -> Self {
        self.set_drop_tracker(tracker);
        self
    }

    /// [`BatchSocket::track_drops`] in place.
    pub fn set_drop_tracker(&mut self, tracker: &Arc<DropTracker>) {
        use std::os::fd::AsRawFd;
        if let Some(old) = self.drops.take() {
            old.close();
        }
        self.drops = Some(tracker.track(self.io.get_ref().as_raw_fd()));
    }

    /// Wraps a bound socket for batched sends and `recvmmsg`, with GRO switched off, for
    /// sockets that are also read with plain `recv` (one datagram per call): with GRO on,
    /// a plain `recv` could return a train of coalesced datagrams as one.
    pub fn without_gro(socket: UdpSocket) -> io::Result<Self> {
        let s = BatchSocket::new(socket)?;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let off: libc::c_int = 0;
            // SAFETY: a valid socket descriptor owned by `s`, and a pointer to a c_int of
            // the size passed.
            let r = unsafe {
                libc::setsockopt(
                    s.io.get_ref().as_raw_fd(),
                    libc::SOL_UDP,
                    libc::UDP_GRO,
                    (&off as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            // Kernels without UDP_GRO never coalesce, so a refusal is harmless.
            let _ = r;
        }
        Ok(s)
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    /// Segments per GSO send the kernel takes (1: no GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Completes when the socket has an error pending (e.g. an ICMP error queued with
    /// `IP_RECVERR`: epoll reports it as an error, not as readable); the caller drains the
    /// error queue, after which the readiness is cleared.
    pub async fn error_ready(&self) -> io::Result<()> {
        let mut guard = self.io.ready(tokio::io::Interest::ERROR).await?;
        guard.clear_ready();
        Ok(())
    }

    /// Receives a batch; returns how many buffers were filled.
    pub async fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        loop {
            let mut ready = self.io.readable().await?;
            let buffers = batch.buffers;
            let mut rest = batch.storage.chunks_mut(RECV_BUF);
            let mut iovs: [IoSliceMut<'_>; BATCH] = std::array::from_fn(|_| {
                // Chunks past `buffers` are empty slices the call below never sees.
                IoSliceMut::new(rest.next().unwrap_or(&mut []))
            });
            let r = ready.try_io(|s| {
                self.state.recv(
                    s.get_ref().into(),
                    &mut iovs[..buffers],
                    &mut batch.meta[..buffers],
                )
            });
            match r {
                Ok(Ok(n)) => {
                    if n < buffers {
                        // Fewer datagrams than buffers: the queue was empty when the call
                        // returned, so skip the `recvmmsg` that would only say so. A
                        // datagram arriving since raises a new edge (epoll is edge-
                        // triggered, and a readiness event newer than this guard is kept).
                        ready.clear_ready();
                    }
                    batch.filled = n;
                    if let Some(d) = &self.drops {
                        // A full batch means a backlog: the one time the queue can overflow.
                        d.maybe_sync(n == buffers);
                    }
                    return Ok(n);
                }
                Ok(Err(e)) => return Err(e),
                // Readiness was stale: cleared, wait again.
                Err(_) => continue,
            }
        }
    }

    /// Receives one datagram into `buf` (a connected socket's `recv`); returns its length.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.io.readable().await?;
            match ready.try_io(|s| s.get_ref().recv(buf)) {
                Ok(r) => {
                    if let Some(d) = &self.drops {
                        d.maybe_sync(false);
                    }
                    return r;
                }
                Err(_) => continue,
            }
        }
    }

    /// Sends one datagram on a connected socket, backing off while the send buffer is full.
    pub async fn send_connected(&self, datagram: &[u8]) -> io::Result<()> {
        loop {
            match self.io.get_ref().send(datagram) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => tokio::time::sleep(SEND_RETRY).await,
                r => return r.map(|_| ()),
            }
        }
    }

    /// Sends `contents` (one datagram, or a GSO train of `segment`-byte datagrams) without
    /// waiting; `WouldBlock` when the socket buffer is full.
    pub fn try_send(&self, dest: SocketAddr, contents: &[u8], segment: Option<usize>) -> io::Result<()> {
        let t = Transmit {
            destination: dest,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        self.state.try_send(self.io.get_ref().into(), &t)
    }

    /// Sends like [`try_send`](Self::try_send), backing off while the send buffer is full.
    pub async fn send(&self, dest: SocketAddr, contents: &[u8], segment: Option<usize>) -> io::Result<()> {
        loop {
            match self.try_send(dest, contents, segment) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => tokio::time::sleep(SEND_RETRY).await,
                r => return r,
            }
        }
    }
}

impl Drop for BatchSocket {
    fn drop(&mut self) {
        // Before the descriptor closes (the fields drop after this).
        if let Some(d) = &self.drops {
            d.close();
        }
    }
}

/// Receive buffers and their metadata, reused across calls.
///
/// Memory: `buffers` × [`RECV_BUF`] bytes of address space, of which only the pages that
/// datagrams actually filled become resident (the buffer starts as untouched zero pages).
pub struct RecvBatch {
    storage: Vec<u8>,
    buffers: usize,
    meta: [RecvMeta; BATCH],
    filled: usize,
}

impl Default for RecvBatch {
    /// [`BATCH`] buffers: for shared loops that serve many peers.
    fn default() -> Self {
        RecvBatch::new(BATCH)
    }
}

/// Buffers of a per-association receive loop: enough to batch one stream, small enough
/// that thousands of associations stay cheap.
pub const SMALL_BATCH: usize = 8;

/// Position of [`RecvBatch::next`] in a batch.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cursor {
    buffer: usize,
    offset: usize,
}

impl RecvBatch {
    /// `buffers` receive buffers (1..=[`BATCH`]).
    pub fn new(buffers: usize) -> Self {
        let buffers = buffers.clamp(1, BATCH);
        RecvBatch {
            storage: vec![0u8; buffers * RECV_BUF],
            buffers,
            meta: [RecvMeta::default(); BATCH],
            filled: 0,
        }
    }

    /// The next datagram of the batch (GRO trains split at their stride) and its canonical
    /// source, or `None` when the batch is used up. Unlike [`for_each`](Self::for_each) the
    /// caller may await between calls.
    pub fn next(&mut self, cur: &mut Cursor) -> Option<(&mut [u8], SocketAddr)> {
        while cur.buffer < self.filled {
            let m = &self.meta[cur.buffer];
            if cur.offset < m.len {
                let stride = if m.stride == 0 { m.len } else { m.stride.max(1) };
                let start = cur.buffer * RECV_BUF + cur.offset;
                let len = stride.min(m.len - cur.offset);
                cur.offset += len;
                return Some((&mut self.storage[start..start + len], canonical(m.addr)));
            }
            cur.buffer += 1;
            cur.offset = 0;
        }
        None
    }

    /// Like [`for_each`](Self::for_each), but hands `f` runs of up to [`RUN`] consecutive
    /// datagrams from one source (a GRO train, or datagrams that queued back to back), so
    /// the caller can work on them together, e.g. check their tags in lockstep.
    pub fn for_each_run(&mut self, mut f: impl FnMut(&mut [&mut [u8]], SocketAddr)) {
        let mut run: [&mut [u8]; RUN] = Default::default();
        let mut n = 0;
        let mut from = None;
        for (i, chunk) in self.storage.chunks_mut(RECV_BUF).take(self.filled).enumerate() {
            let m = &self.meta[i];
            let src = canonical(m.addr);
            let stride = if m.stride == 0 { m.len } else { m.stride };
            // An empty datagram is a datagram too (the relay counts it, `unknown_kind`);
            // `chunks_mut` of nothing yields nothing, so it is added by hand.
            let empty = (m.len == 0).then(<&mut [u8]>::default);
            for seg in chunk[..m.len].chunks_mut(stride.max(1)).chain(empty) {
                if let Some(prev) = from.filter(|&p| n == RUN || p != src) {
                    f(&mut run[..n], prev);
                    n = 0;
                }
                run[n] = seg;
                n += 1;
                from = Some(src);
            }
        }
        if let Some(prev) = from.filter(|_| n > 0) {
            f(&mut run[..n], prev);
        }
        self.filled = 0;
    }

    /// Calls `f` with every datagram received (GRO trains split at their stride) and its
    /// canonical source address.
    pub fn for_each(&mut self, mut f: impl FnMut(&mut [u8], SocketAddr)) {
        for (i, chunk) in self.storage.chunks_mut(RECV_BUF).take(self.filled).enumerate() {
            let m = &self.meta[i];
            let from = canonical(m.addr);
            let stride = if m.stride == 0 { m.len } else { m.stride };
            let empty = (m.len == 0).then(<&mut [u8]>::default);
            for seg in chunk[..m.len].chunks_mut(stride.max(1)).chain(empty) {
                f(seg, from);
            }
        }
        self.filled = 0;
    }
}

/// The stretches of two or more consecutive datagrams of `run` that share a key (a datagram
/// whose key is `None` belongs to none), as index ranges with their key: the trains whose
/// records can be checked together.
pub fn stretches<'r, K: PartialEq>(
    run: &'r [&mut [u8]],
    key: impl Fn(&[u8]) -> Option<K> + 'r,
) -> impl Iterator<Item = (Range<usize>, K)> + 'r {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < run.len() {
            let start = i;
            i += 1;
            let Some(k) = key(run[start]) else {
                continue;
            };
            while i < run.len() && key(run[i]).as_ref() == Some(&k) {
                i += 1;
            }
            if i - start > 1 {
                return Some((start..i, k));
            }
        }
        None
    })
}

/// Equal-sized datagrams for one destination, sent in one GSO call.
pub struct GsoBatch {
    buf: Vec<u8>,
    segment: usize,
    count: usize,
    dest: Option<SocketAddr>,
    max_segments: usize,
    /// A shorter datagram was added: it must be the last one.
    closed: bool,
}

impl GsoBatch {
    /// A batch of at most `max_segments` datagrams (1 disables coalescing).
    pub fn new(max_segments: usize) -> Self {
        GsoBatch {
            buf: Vec::with_capacity(GSO_MAX_BYTES + 2048),
            segment: 0,
            count: 0,
            dest: None,
            max_segments: max_segments.max(1),
            closed: false,
        }
    }

    /// Empties the batch and sets a new segment limit, keeping the buffer (no allocation).
    pub fn reset(&mut self, max_segments: usize) {
        self.clear();
        self.max_segments = max_segments.max(1);
    }

    /// Whether `len` bytes for `dest` can join the batch.
    pub fn fits(&self, dest: SocketAddr, len: usize) -> bool {
        self.count == 0
            || (self.dest == Some(dest)
                && !self.closed
                && self.count < self.max_segments
                && len <= self.segment
                && self.buf.len() + len <= GSO_MAX_BYTES)
    }

    /// Space for the next datagram of at most `max_len` bytes; commit it with
    /// [`commit`](Self::commit). The caller has checked [`fits`](Self::fits).
    pub fn reserve(&mut self, max_len: usize) -> &mut [u8] {
        let start = self.buf.len();
        self.buf.resize(start + max_len, 0);
        &mut self.buf[start..]
    }

    /// Keeps `len` bytes of the space last reserved as the next datagram for `dest`.
    pub fn commit(&mut self, dest: SocketAddr, reserved: usize, len: usize) {
        let start = self.buf.len() - reserved;
        self.buf.truncate(start + len);
        if self.count == 0 {
            self.segment = len;
            self.dest = Some(dest);
        } else if len < self.segment {
            self.closed = true;
        }
        self.count += 1;
    }

    /// Drops the space last reserved (the datagram was not produced).
    pub fn unreserve(&mut self, reserved: usize) {
        let n = self.buf.len() - reserved;
        self.buf.truncate(n);
    }

    /// Appends a whole datagram.
    pub fn push(&mut self, dest: SocketAddr, data: &[u8]) {
        let n = data.len();
        self.reserve(n).copy_from_slice(data);
        self.commit(dest, n, n);
    }

    /// Bytes waiting (where the next reserved datagram will start).
    pub fn byte_len(&self) -> usize {
        self.buf.len()
    }

    /// The waiting bytes, for in-place work on datagrams already committed.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Datagrams waiting.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The pending train: destination, bytes, segment size (None for one datagram).
    pub fn pending(&self) -> Option<(SocketAddr, &[u8], Option<usize>)> {
        let dest = self.dest?;
        (self.count > 0).then(|| (dest, &self.buf[..], (self.count > 1).then_some(self.segment)))
    }

    /// The bytes placed so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Empties the batch (after sending or dropping it).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
        self.dest = None;
        self.closed = false;
    }
}

/// A [`GsoBatch`] of records whose plaintexts are placed as they come and sealed all at
/// once just before the train leaves (so the sealer can interleave their CBC chains).
/// Knows nothing of the record format: the caller places bytes and supplies the sealer.
pub struct RecordTrain {
    batch: GsoBatch,
    /// Per record: offset in `batch`, plaintext length, and (once sealed) record length.
    /// Reused, never shrunk.
    offsets: Vec<usize>,
    plaintexts: Vec<usize>,
    lens: Vec<usize>,
}

impl RecordTrain {
    /// An empty train of at most `max_segments` records per send.
    pub fn new(max_segments: usize) -> Self {
        RecordTrain {
            batch: GsoBatch::new(max_segments),
            offsets: Vec::with_capacity(64),
            plaintexts: Vec::with_capacity(64),
            lens: Vec::with_capacity(64),
        }
    }

    /// Empties the train and sets a new segment limit (no allocation).
    pub fn reset(&mut self, max_segments: usize) {
        self.clear();
        self.batch.reset(max_segments);
    }

    /// Whether a `len`-byte record for `dest` can join the train.
    pub fn fits(&self, dest: SocketAddr, len: usize) -> bool {
        self.batch.fits(dest, len)
    }

    /// Adds a `len`-byte record for `dest` whose plaintext (`plaintext_len` bytes) the caller
    /// writes into the returned space. The caller has checked [`fits`](Self::fits).
    pub fn place(&mut self, dest: SocketAddr, len: usize, plaintext_len: usize) -> &mut [u8] {
        let offset = self.batch.byte_len();
        self.offsets.push(offset);
        self.plaintexts.push(plaintext_len);
        self.batch.reserve(len);
        self.batch.commit(dest, len, len);
        &mut self.batch.bytes_mut()[offset..offset + len]
    }

    /// Seals every placed record in place with `seal(buf, offsets, plaintext_lens, lens)`.
    pub fn seal_with<E>(
        &mut self,
        seal: impl FnOnce(&mut [u8], &[usize], &[usize], &mut [usize]) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.offsets.is_empty() {
            return Ok(());
        }
        self.lens.resize(self.offsets.len(), 0);
        seal(
            self.batch.bytes_mut(),
            &self.offsets,
            &self.plaintexts,
            &mut self.lens,
        )
    }

    /// [`seal_with`](Self::seal_with) for the records `range` only (a train whose records
    /// belong to several sealers, one stretch each): `seal` gets the whole buffer and those
    /// records' offsets, plaintext and record lengths.
    pub fn seal_range_with<E>(
        &mut self,
        range: std::ops::Range<usize>,
        seal: impl FnOnce(&mut [u8], &[usize], &[usize], &mut [usize]) -> Result<(), E>,
    ) -> Result<(), E> {
        if range.is_empty() {
            return Ok(());
        }
        self.lens.resize(self.offsets.len(), 0);
        seal(
            self.batch.bytes_mut(),
            &self.offsets[range.clone()],
            &self.plaintexts[range.clone()],
            &mut self.lens[range],
        )
    }

    /// The bytes of records `range` (placed lengths) and their segment size, to send them
    /// apart from the rest of the train: `None` for one record.
    pub fn range_bytes(&self, range: std::ops::Range<usize>) -> (&[u8], Option<usize>) {
        if range.is_empty() {
            return (&[], None);
        }
        let start = self.offsets[range.start];
        let end = self
            .offsets
            .get(range.end)
            .copied()
            .unwrap_or(self.batch.byte_len());
        let first_len = self.offsets.get(range.start + 1).copied().unwrap_or(end) - start;
        let bytes = &self.batch.bytes()[start..end];
        (bytes, (range.len() > 1).then_some(first_len))
    }

    /// Records in the train.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// True when the train is empty.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// The train to send (see [`GsoBatch::pending`]).
    pub fn pending(&self) -> Option<(SocketAddr, &[u8], Option<usize>)> {
        self.batch.pending()
    }

    /// Empties the train.
    pub fn clear(&mut self) {
        self.batch.clear();
        self.offsets.clear();
        self.plaintexts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_batch_rules() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let mut g = GsoBatch::new(3);
        assert!(g.fits(a, 100));
        g.push(a, &[1; 100]);
        assert!(!g.fits(b, 100), "other destination");
        assert!(!g.fits(a, 101), "larger than the segment");
        assert!(g.fits(a, 100));
        g.push(a, &[2; 100]);
        g.push(a, &[3; 40]);
        assert!(!g.fits(a, 40), "a short datagram closes the train");
        let (d, bytes, seg) = g.pending().unwrap();
        assert_eq!((d, bytes.len(), seg), (a, 240, Some(100)));
        g.clear();
        g.push(b, &[0; 10]);
        assert_eq!(g.pending().unwrap().2, None, "single datagram: no segmentation");
    }

    #[tokio::test]
    async fn gso_train_arrives_as_separate_datagrams() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let mut g = GsoBatch::new(tx.max_gso_segments());
        let dest = rx.local_addr().unwrap();
        for i in 0..3u8 {
            if g.fits(dest, 500) {
                g.push(dest, &[i; 500]);
            }
        }
        let (d, bytes, seg) = g.pending().unwrap();
        tx.send(d, bytes, seg).await.unwrap();
        let n = g.len();
        let mut buf = [0u8; 2000];
        for i in 0..n {
            let len = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(len, 500);
            assert_eq!(buf[0], i as u8);
        }
    }

    /// A train of several sealers' stretches: each `seal_range_with` sees only its records
    /// (offsets into the whole buffer), and `range_bytes` cuts exactly their bytes, with the
    /// segment size of a train (none for one record).
    #[test]
    fn record_train_stretches_seal_and_send_apart() {
        let dest: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut t = RecordTrain::new(64);
        for i in 0..5u8 {
            let len = if i == 4 { 6 } else { 10 };
            let space = t.place(dest, len, 3);
            space.fill(i);
        }
        // Sealer A takes records 0..2, sealer B 2..5: each marks its records' first byte.
        for (range, mark) in [(0..2, 0xa0u8), (2..5, 0xb0)] {
            let want: Vec<usize> = range.clone().map(|i| i * 10).collect();
            t.seal_range_with(range.clone(), |buf, offsets, pts, lens| {
                assert_eq!(offsets, &want[..]);
                assert!(pts.iter().all(|&p| p == 3));
                for (k, (&o, l)) in offsets.iter().zip(lens.iter_mut()).enumerate() {
                    buf[o] = mark + k as u8;
                    *l = if o == 40 { 6 } else { 10 };
                }
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        assert_eq!(t.seal_range_with(3..3, |_, _, _, _| Err(())), Ok(()));
        let (a, seg) = t.range_bytes(0..2);
        assert_eq!((a.len(), seg), (20, Some(10)));
        assert_eq!((a[0], a[1], a[10], a[11]), (0xa0, 0, 0xa1, 1));
        let (b, seg) = t.range_bytes(2..5);
        assert_eq!((b.len(), seg), (26, Some(10)));
        assert_eq!((b[0], b[10], b[20], b[25]), (0xb0, 0xb1, 0xb2, 4));
        let (one, seg) = t.range_bytes(4..5);
        assert_eq!((one, seg), (&[0xb2, 4, 4, 4, 4, 4][..], None));
        assert_eq!(t.range_bytes(1..1), (&[][..], None));
        // The whole train is still one send.
        assert_eq!(t.pending().map(|(_, b, s)| (b.len(), s)), Some((46, Some(10))));
    }

    #[test]
    fn stretches_are_runs_of_two_or_more_with_one_key() {
        let mut data: Vec<Vec<u8>> = [1u8, 1, 0, 2, 3, 3, 3, 4, 4]
            .iter()
            .map(|&k| vec![k; 3])
            .collect();
        let run: Vec<&mut [u8]> = data.iter_mut().map(|d| &mut d[..]).collect();
        let key = |d: &[u8]| (d[0] != 0).then_some(d[0]);
        let got: Vec<_> = stretches(&run, key).collect();
        assert_eq!(got, [(0..2, 1), (4..7, 3), (7..9, 4)]);
        assert_eq!(stretches(&run[..1], key).count(), 0);
        assert_eq!(stretches(&[], key).count(), 0);
    }

    #[tokio::test]
    async fn runs_group_consecutive_datagrams_of_one_source() {
        let rx = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dest = rx.local_addr().unwrap();
        let (pa, pb) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut sent = 0u8;
        for (sock, count) in [(&a, 3), (&b, 2), (&a, 10)] {
            for _ in 0..count {
                sock.send_to(&[sent; 50], dest).await.unwrap();
                sent += 1;
            }
        }
        let mut batch = RecvBatch::default();
        let mut runs = Vec::new();
        let mut seen = 0;
        while seen < 15 {
            tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv_batch(&mut batch))
                .await
                .unwrap()
                .unwrap();
            batch.for_each_run(|run, from| {
                assert!(!run.is_empty() && run.len() <= RUN);
                let ids: Vec<u8> = run.iter().map(|d| d[0]).collect();
                seen += ids.len();
                runs.push((from, ids));
            });
        }
        // Every datagram once, in order, and a run never mixes sources.
        let order: Vec<u8> = runs.iter().flat_map(|(_, ids)| ids.clone()).collect();
        assert_eq!(order, (0..15).collect::<Vec<u8>>());
        for (from, ids) in &runs {
            let from_b = |i: u8| (3..5).contains(&i);
            let want = if from_b(ids[0]) { pb } else { pa };
            assert_eq!(*from, want, "run {ids:?}");
            assert!(
                ids.iter().all(|&i| from_b(i) == (want == pb)),
                "run {ids:?} mixes sources"
            );
        }
        // All were queued before the one receive: runs of 3, 2, then 8 + 2.
        if runs.len() == 4 {
            let lens: Vec<usize> = runs.iter().map(|(_, ids)| ids.len()).collect();
            assert_eq!(lens, [3, 2, 8, 2]);
        }
    }

    #[tokio::test]
    async fn recv_batch_splits_gro_trains() {
        let rx = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let tx = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let dest = rx.local_addr().unwrap();
        let mut g = GsoBatch::new(tx.max_gso_segments());
        for i in 0..8u8 {
            if g.fits(dest, 300) {
                g.push(dest, &[i; 300]);
            } else {
                let (d, b, s) = g.pending().unwrap();
                tx.send(d, b, s).await.unwrap();
                g.clear();
                g.push(dest, &[i; 300]);
            }
        }
        let (d, b, s) = g.pending().unwrap();
        tx.send(d, b, s).await.unwrap();
        let mut batch = RecvBatch::default();
        let mut seen = Vec::new();
        while seen.len() < 8 {
            tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv_batch(&mut batch))
                .await
                .unwrap()
                .unwrap();
            batch.for_each(|d, from| {
                assert_eq!(from, tx.local_addr().unwrap());
                assert_eq!(d.len(), 300);
                seen.push(d[0]);
            });
        }
        assert_eq!(seen, (0..8).collect::<Vec<u8>>());
    }

    #[tokio::test]
    async fn cursor_walks_every_datagram() {
        let rx = BatchSocket::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dest = rx.local_addr().unwrap();
        for i in 0..5u8 {
            tx.send_to(&vec![i; 10 + i as usize], dest).await.unwrap();
        }
        let mut batch = RecvBatch::default();
        let mut seen = Vec::new();
        while seen.len() < 5 {
            tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv_batch(&mut batch))
                .await
                .unwrap()
                .unwrap();
            let mut cur = Cursor::default();
            while let Some((d, _)) = batch.next(&mut cur) {
                assert_eq!(d.len(), 10 + d[0] as usize);
                seen.push(d[0]);
            }
        }
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    }
}
