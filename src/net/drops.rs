//! Datagrams the kernel dropped at our own sockets' receive queues, so that no loss inside
//! sudp goes uncounted (a full receive buffer drops silently otherwise).
//!
//! Linux counts, per socket, the datagrams it dropped because the receive queue was full
//! (`sk_drops`, read with `getsockopt(SO_MEMINFO)[SK_MEMINFO_DROPS]`; also shown in the
//! `drops` column of `/proc/net/udp`). A [`DropTracker`] sums that counter over every socket
//! registered with it, alive or since closed: [`DropTracker::total`] reads the live sockets
//! again, so the figure is exact when it is read (a scrape, a log line at exit), not only as
//! of the last datagram. Sockets also refresh their count now and then as they receive
//! ([`Tracked::maybe_sync`]), so the figure moves while traffic flows.
//!
//! A closed socket's count is taken one last time before its descriptor closes (the owner
//! calls [`Tracked::close`] from its `Drop`), and never read after: a descriptor number can
//! be reused by another socket.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

/// `SOL_SOCKET` option returning the socket's memory counters (Linux `SO_MEMINFO`, the
/// asm-generic value, which the common architectures use; not in the `libc` crate).
#[cfg(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64"
    )
))]
const SO_MEMINFO: libc::c_int = 55;

/// How often a receiving socket refreshes its count on its own.
const REFRESH_MS: u64 = 100;

/// The sum of kernel receive-queue drops over a set of sockets (one role: relay sockets,
/// outbound sockets, local sockets).
#[derive(Debug, Default)]
pub struct DropTracker {
    /// Drops already taken from sockets (closed ones included).
    counted: AtomicU64,
    sockets: Mutex<Vec<Weak<Tracked>>>,
}

impl DropTracker {
    /// Registers socket `fd` (owned by the caller, open until it calls [`Tracked::close`]);
    /// drops it had before registration are not counted.
    pub fn track(self: &Arc<Self>, fd: RawFd) -> Arc<Tracked> {
        let t = Arc::new(Tracked {
            fd,
            tracker: Arc::downgrade(self),
            state: Mutex::new(State {
                seen: read_drops(fd).unwrap_or(0),
                closed: false,
            }),
            epoch: Instant::now(),
            last_sync_ms: AtomicU64::new(0),
        });
        let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        sockets.retain(|w| w.strong_count() > 0);
        sockets.push(Arc::downgrade(&t));
        t
    }

    /// Drops so far, every live socket read now.
    pub fn total(&self) -> u64 {
        let live: Vec<Arc<Tracked>> = {
            let sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
            sockets.iter().filter_map(Weak::upgrade).collect()
        };
        for t in live {
            t.sync();
        }
        self.counted.load(Ordering::Relaxed)
    }

    /// Sockets registered and still open.
    pub fn live(&self) -> usize {
        let sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        sockets.iter().filter(|w| w.strong_count() > 0).count()
    }
}

/// One registered socket.
#[derive(Debug)]
pub struct Tracked {
    fd: RawFd,
    tracker: Weak<DropTracker>,
    state: Mutex<State>,
    epoch: Instant,
    last_sync_ms: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// The socket's counter when last read.
    seen: u32,
    /// The descriptor is about to close: never read it again.
    closed: bool,
}

impl Tracked {
    /// Takes the socket's new drops into the tracker.
    pub fn sync(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.closed {
            return;
        }
        if let Some(now) = read_drops(self.fd) {
            // The kernel's counter is 32 bits and wraps.
            let new = now.wrapping_sub(st.seen);
            st.seen = now;
            if new > 0 {
                if let Some(t) = self.tracker.upgrade() {
                    t.counted.fetch_add(u64::from(new), Ordering::Relaxed);
                }
            }
        }
    }

    /// [`Tracked::sync`] if the last one is older than a tenth of a second, or `backlog`
    /// says the receive queue was not empty (the only time it can overflow).
    pub fn maybe_sync(&self, backlog: bool) {
        let now = self.epoch.elapsed().as_millis() as u64;
        if backlog || now.saturating_sub(self.last_sync_ms.load(Ordering::Relaxed)) >= REFRESH_MS {
            self.last_sync_ms.store(now, Ordering::Relaxed);
            self.sync();
        }
    }

    /// Takes the last drops and stops reading the descriptor; call before it closes.
    pub fn close(&self) {
        self.sync();
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
    }
}

/// The socket's receive-queue drop counter, where the OS tells it.
fn read_drops(fd: RawFd) -> Option<u32> {
    #[cfg(all(
        target_os = "linux",
        any(
            target_arch = "x86_64",
            target_arch = "x86",
            target_arch = "aarch64",
            target_arch = "arm",
            target_arch = "riscv64"
        )
    ))]
    {
        // SK_MEMINFO_VARS: the kernel fills as many as it has (9 today) and says how many.
        let mut info = [0u32; 16];
        let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
        // SAFETY: `fd` is an open socket (the owner guarantees it until `close`), and `info`
        // is a writable buffer of `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_MEMINFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 && len as usize > libc::SK_MEMINFO_DROPS as usize * 4 {
            return Some(info[libc::SK_MEMINFO_DROPS as usize]);
        }
        None
    }
    #[cfg(not(all(
        target_os = "linux",
        any(
            target_arch = "x86_64",
            target_arch = "x86",
            target_arch = "aarch64",
            target_arch = "arm",
            target_arch = "riscv64"
        )
    )))]
    {
        let _ = fd;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    #[cfg(target_os = "linux")]
    fn counts_what_a_full_receive_queue_dropped_and_keeps_it_after_close() {
        let tracker = Arc::new(DropTracker::default());
        let rx = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        rx.set_recv_buffer_size(1).unwrap(); // the kernel's minimum: a few datagrams
        rx.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into())
            .unwrap();
        let to = rx.local_addr().unwrap().as_socket().unwrap();
        let t = tracker.track(rx.as_raw_fd());
        assert_eq!(tracker.total(), 0);
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..200 {
            tx.send_to(&[0u8; 1000], to).unwrap();
        }
        // Nobody reads: what the queue could not hold was dropped, and counted exactly.
        let mut queued = 0;
        rx.set_nonblocking(true).unwrap();
        let mut buf = [std::mem::MaybeUninit::new(0u8); 2000];
        while rx.recv(&mut buf).is_ok() {
            queued += 1;
        }
        let dropped = tracker.total();
        assert!(dropped > 0 && queued > 0, "dropped {dropped}, queued {queued}");
        assert_eq!(dropped + queued, 200);
        assert_eq!(tracker.live(), 1);
        t.close();
        drop(t);
        drop(rx);
        assert_eq!(tracker.live(), 0);
        assert_eq!(tracker.total(), dropped, "a closed socket's drops stay counted");
    }
}
