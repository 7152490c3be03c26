//! CPU time: the whole process's (getrusage), and the sum over a set of threads (the
//! in-process gateway's runtime), so the bench can say what the proxy alone spent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

/// User plus system CPU time of the whole process so far, in nanoseconds (getrusage
/// `RUSAGE_SELF`, microsecond resolution). `None` where the platform has no getrusage.
pub fn process_ns() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: `rusage` is plain old data, so all-zero is a valid value, and getrusage
        // only writes into the struct we pass.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: RUSAGE_SELF is a valid `who` and `u` is a valid, writable rusage.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
            return None;
        }
        let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
        Some(tv(u.ru_utime) + tv(u.ru_stime))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Busy CPU time of the whole machine so far, all CPUs together, in nanoseconds: user, nice,
/// system, irq, softirq and steal from `/proc/stat` (tick resolution). Minus the bench's own
/// [`process_ns`] over the same interval, it tells how much other processes (and kernel
/// threads) competed with the bench. `None` where there is no `/proc/stat`.
pub fn machine_busy_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    busy_ns_from_proc_stat(&stat, clock_ticks_per_sec())
}

fn clock_ticks_per_sec() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 {
            return t as u64;
        }
    }
    100
}

/// Parses the aggregate `cpu` line of `/proc/stat`.
fn busy_ns_from_proc_stat(stat: &str, ticks_per_sec: u64) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0usize, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum();
    Some(busy * (1_000_000_000 / ticks_per_sec.max(1)))
}

/// CPU time of a set of threads, live and exited.
///
/// Each thread calls [`ThreadClocks::register`] when it starts and
/// [`ThreadClocks::deregister`] before it ends (tokio's `on_thread_start`/`on_thread_stop`);
/// [`ThreadClocks::total_ns`] then reads every live thread's CPU clock and adds what exited
/// threads had used. Linux only (`pthread_getcpuclockid`); elsewhere it reports `None`.
#[derive(Clone, Default)]
pub struct ThreadClocks {
    inner: Arc<Mutex<Clocks>>,
}

#[derive(Default)]
struct Clocks {
    #[cfg(target_os = "linux")]
    live: HashMap<ThreadId, libc::clockid_t>,
    #[cfg(not(target_os = "linux"))]
    live: HashMap<ThreadId, ()>,
    exited_ns: u64,
}

impl ThreadClocks {
    /// Adds the calling thread to the set.
    pub fn register(&self) {
        #[cfg(target_os = "linux")]
        {
            let mut clock: libc::clockid_t = 0;
            // SAFETY: pthread_self() is the calling, live thread; `clock` is writable.
            if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } == 0 {
                self.lock().live.insert(std::thread::current().id(), clock);
            }
        }
    }

    /// Removes the calling thread, keeping the CPU time it used.
    pub fn deregister(&self) {
        #[cfg(target_os = "linux")]
        {
            let mut c = self.lock();
            if let Some(clock) = c.live.remove(&std::thread::current().id()) {
                c.exited_ns += read_clock(clock).unwrap_or(0);
            }
        }
    }

    /// CPU time of every thread ever registered, in nanoseconds; `None` if no thread could
    /// register (not Linux).
    pub fn total_ns(&self) -> Option<u64> {
        let c = self.lock();
        if c.live.is_empty() && c.exited_ns == 0 {
            return None;
        }
        #[cfg(target_os = "linux")]
        let live: u64 = c.live.values().filter_map(|&k| read_clock(k)).sum();
        #[cfg(not(target_os = "linux"))]
        let live = 0;
        Some(c.exited_ns + live)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Clocks> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads a thread CPU clock. The caller holds the lock, so a registered thread has not yet
/// passed `deregister` and its clock is still valid.
#[cfg(target_os = "linux")]
fn read_clock(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; an invalid clock id yields an error code,
    // never undefined behaviour.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Asks the kernel to wake the calling thread's sleeps as close to the deadline as it can
/// (Linux timer slack 1 ns instead of 50 µs), so a paced sender's bursts stay small.
pub fn tight_timer_slack() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_TIMERSLACK takes one unsigned long argument and only affects the
        // calling thread.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(ms: u64) {
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < ms as u128 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
    }

    #[test]
    fn proc_stat_busy_time() {
        let stat = "cpu  100 20 30 5000 7 1 2 3 0 0\ncpu0 50 10 15 2500 3 0 1 1 0 0\n";
        // user + nice + system + irq + softirq + steal = 156 ticks of 10 ms.
        assert_eq!(busy_ns_from_proc_stat(stat, 100), Some(1_560_000_000));
        assert_eq!(busy_ns_from_proc_stat("intr 5\n", 100), None);
    }

    #[test]
    fn process_time_advances() {
        let Some(a) = process_ns() else { return };
        spin(30);
        let b = process_ns().unwrap();
        assert!(b > a);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn thread_clocks_count_live_and_exited_threads() {
        let clocks = ThreadClocks::default();
        assert_eq!(clocks.total_ns(), None);
        let c = clocks.clone();
        std::thread::spawn(move || {
            c.register();
            spin(30);
            c.deregister();
        })
        .join()
        .unwrap();
        let after_exit = clocks.total_ns().unwrap();
        // Wall-clock spinning on a shared machine may get less CPU than it spins for.
        assert!(after_exit >= 1_000_000, "{after_exit}");
        clocks.register();
        spin(30);
        assert!(clocks.total_ns().unwrap() >= after_exit + 1_000_000);
        clocks.deregister();
    }
}
