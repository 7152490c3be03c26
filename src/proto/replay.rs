//! The replay window: a sliding bitmap over record nonces (RFC 4303 §3.4.3, RFC 6479).
//!
//! ```text
//!            too old          |<------------- window: W nonces ------------>|   ahead
//!   ... ─────────────────────┼──────────────────────────────────────────────┼──────────▶ nonce
//!                       top - W                                          top - 1   top ...
//!                             bit (n mod W) of the ring says "n was received"
//! ```
//!
//! `top` is one more than the highest nonce accepted so far (0 before any). For a nonce `n`:
//!
//! * `n >= top` (ahead, however far): acceptable; committing it slides the window so that
//!   `top = n + 1`, clearing the bits of the nonces that enter the window;
//! * `top - W <= n < top`: acceptable unless its bit is set (**duplicate**);
//! * `n < top - W`: **too old**, refused.
//!
//! The ring holds exactly W bits, so every nonce inside the window owns a distinct bit. The
//! check ([`ReplayWindow::check`]) runs before any cryptography and changes nothing; the
//! commit ([`ReplayWindow::commit`]) runs only after the record's tag verified, so a forged
//! record can neither mark a nonce nor slide the window (boringtun's
//! `will_accept`/`mark_did_receive` split).

use crate::proto::error::OpenError;

/// Smallest window size.
pub const MIN_WINDOW: usize = 64;
/// Largest window size.
pub const MAX_WINDOW: usize = 65_536;
/// Default window size.
pub const DEFAULT_WINDOW: usize = 1024;

/// A sliding replay window over 64-bit nonces.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// Ring of W bits, W = 64 * words.len().
    words: Box<[u64]>,
    /// Highest accepted nonce + 1; 0 when nothing was accepted yet.
    top: u64,
}

/// What the window said of a nonce that it would accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Inside the window and not seen yet.
    InWindow,
    /// Right of the window; `jump` is how far `top` moves if committed.
    Ahead {
        /// `n + 1 - top`.
        jump: u64,
    },
}

impl ReplayWindow {
    /// A window of `size` nonces, rounded up to a multiple of 64 and clamped to
    /// [`MIN_WINDOW`]..=[`MAX_WINDOW`].
    pub fn new(size: usize) -> Self {
        let size = size.clamp(MIN_WINDOW, MAX_WINDOW);
        let words = size.div_ceil(64);
        ReplayWindow {
            words: vec![0u64; words].into_boxed_slice(),
            top: 0,
        }
    }

    /// Window size W in nonces.
    pub fn size(&self) -> u64 {
        self.words.len() as u64 * 64
    }

    /// One more than the highest accepted nonce (0 if none).
    pub fn top(&self) -> u64 {
        self.top
    }

    /// Would `nonce` be accepted? Changes nothing. Call before verifying the record.
    pub fn check(&self, nonce: u64) -> Result<Verdict, OpenError> {
        if nonce >= self.top {
            return Ok(Verdict::Ahead {
                jump: nonce - self.top + 1,
            });
        }
        if self.top - nonce > self.size() {
            return Err(OpenError::TooOld { nonce });
        }
        if self.bit(nonce) {
            return Err(OpenError::Duplicate { nonce });
        }
        Ok(Verdict::InWindow)
    }

    /// Marks `nonce` received and slides the window if it is ahead. Call only after the
    /// record authenticated, and only with a nonce [`check`](Self::check) accepted.
    /// `nonce` must be below `u64::MAX` (the record layer's per-key limit guarantees it).
    pub fn commit(&mut self, nonce: u64) {
        if nonce >= self.top {
            self.advance(nonce + 1);
        }
        let (w, b) = self.slot(nonce);
        self.words[w] |= 1 << b;
    }

    /// Check and, if acceptable, commit at once (for callers that have already
    /// authenticated the nonce).
    pub fn check_and_commit(&mut self, nonce: u64) -> Result<Verdict, OpenError> {
        let v = self.check(nonce)?;
        self.commit(nonce);
        Ok(v)
    }

    fn slot(&self, nonce: u64) -> (usize, u32) {
        let pos = nonce % self.size();
        ((pos / 64) as usize, (pos % 64) as u32)
    }

    fn bit(&self, nonce: u64) -> bool {
        let (w, b) = self.slot(nonce);
        self.words[w] & (1 << b) != 0
    }

    /// Moves `top` to `new_top`, clearing the bits of nonces `top..new_top`, which now
    /// enter the window (their slots belonged to nonces that leave it).
    fn advance(&mut self, new_top: u64) {
        let size = self.size();
        if new_top - self.top >= size {
            self.words.fill(0);
        } else {
            let mut pos = self.top % size;
            let mut left = new_top - self.top;
            while left > 0 {
                let w = (pos / 64) as usize;
                let b = pos % 64;
                let n = (64 - b).min(left);
                let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << b };
                self.words[w] &= !mask;
                left -= n;
                pos = (pos + n) % size;
            }
        }
        self.top = new_top;
    }
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow::new(DEFAULT_WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// The naive model: a set of every accepted nonce and the same window rule.
    struct Model {
        seen: BTreeSet<u64>,
        size: u64,
    }

    impl Model {
        fn accept(&mut self, n: u64) -> Result<(), &'static str> {
            let top = self.seen.iter().next_back().map_or(0, |m| m + 1);
            if n < top && top - n > self.size {
                return Err("too_old");
            }
            if self.seen.contains(&n) {
                return Err("duplicate");
            }
            self.seen.insert(n);
            Ok(())
        }
    }

    fn kind(e: OpenError) -> &'static str {
        match e {
            OpenError::TooOld { .. } => "too_old",
            OpenError::Duplicate { .. } => "duplicate",
            _ => "other",
        }
    }

    #[test]
    fn fresh_window_accepts_zero_and_rejects_duplicate() {
        let mut w = ReplayWindow::new(64);
        assert_eq!(w.check(0), Ok(Verdict::Ahead { jump: 1 }));
        w.commit(0);
        assert_eq!(w.check(0), Err(OpenError::Duplicate { nonce: 0 }));
        assert_eq!(w.top(), 1);
    }

    #[test]
    fn edges_of_the_window() {
        let mut w = ReplayWindow::new(64);
        w.commit(100);
        // Window is 37..=100.
        assert_eq!(w.check(36), Err(OpenError::TooOld { nonce: 36 }));
        assert_eq!(w.check(37), Ok(Verdict::InWindow));
        assert_eq!(w.check(99), Ok(Verdict::InWindow));
        assert_eq!(w.check(100), Err(OpenError::Duplicate { nonce: 100 }));
        assert_eq!(w.check(101), Ok(Verdict::Ahead { jump: 1 }));
        w.commit(37);
        assert_eq!(w.check(37), Err(OpenError::Duplicate { nonce: 37 }));
        // Sliding by one pushes 37 out.
        w.commit(101);
        assert_eq!(w.check(37), Err(OpenError::TooOld { nonce: 37 }));
        assert_eq!(w.check(38), Ok(Verdict::InWindow));
    }

    #[test]
    fn far_jump_clears_everything() {
        let mut w = ReplayWindow::new(128);
        for n in 0..128 {
            w.commit(n);
        }
        w.commit(1_000_000);
        for n in 1_000_000 - 127..1_000_000 {
            assert_eq!(w.check(n), Ok(Verdict::InWindow), "{n}");
        }
        assert!(w.check(1_000_000 - 128).is_err());
    }

    #[test]
    fn check_does_not_mutate() {
        let w0 = ReplayWindow::new(64);
        let mut w = w0.clone();
        let _ = w.check(5);
        assert_eq!(w.top(), 0);
        w.commit(5);
        assert_eq!(w.check(3), Ok(Verdict::InWindow));
    }

    #[test]
    fn sizes_round_and_clamp() {
        assert_eq!(ReplayWindow::new(0).size(), 64);
        assert_eq!(ReplayWindow::new(65).size(), 128);
        assert_eq!(ReplayWindow::new(1024).size(), 1024);
        assert_eq!(ReplayWindow::new(8192).size(), 8192);
        assert_eq!(ReplayWindow::new(usize::MAX).size(), MAX_WINDOW as u64);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Against the naive model on sequences with reordering, duplication and jumps.
        #[test]
        fn matches_naive_model(
            size in prop::sample::select(vec![64usize, 128, 1024, 8192]),
            steps in prop::collection::vec((0u8..10, 0u64..3000), 1..600),
        ) {
            let mut w = ReplayWindow::new(size);
            let mut m = Model { seen: BTreeSet::new(), size: w.size() };
            let mut cursor = 0u64;
            for (op, arg) in steps {
                // Mostly forward traffic with local reordering, some duplicates and jumps.
                let n = match op {
                    0..=4 => { cursor += 1; cursor }
                    5 | 6 => cursor.saturating_sub(arg % 80),
                    7 => cursor.saturating_sub(arg),
                    8 => { cursor += arg; cursor }
                    _ => cursor.saturating_sub(arg % (w.size() + 2)),
                };
                let got = w.check(n).map(|_| ()).map_err(kind);
                let want = m.accept(n);
                prop_assert_eq!(got, want, "nonce {}", n);
                if got.is_ok() {
                    w.commit(n);
                }
            }
        }
    }
}
