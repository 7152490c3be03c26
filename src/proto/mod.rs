//! The sans-IO protocol core.
//!
//! Everything in this module takes bytes (and, where it matters, time or randomness) in as
//! arguments and gives bytes and decisions out. Nothing here touches a socket, reads a clock
//! or draws randomness, and nothing imports the rest of the crate, so the module could become
//! its own crate without edits. The tokio layer (gateway, shim, bench) only moves bytes
//! between sockets and these types.
//!
//! * [`record`]: the secure-UDP record: header codec, seal and open.
//! * [`replay`]: the sliding replay window over record nonces.
//! * [`keys`]: cipher suites and the key schedule from TLS exporter output.
//! * [`socks`]: SOCKS5 message codecs (RFC 1928, RFC 1929, the sudp sub-negotiation and the
//!   UDP request header).
//! * [`session`]: one association's send and receive halves (sealer + nonce counter,
//!   opener + replay window).
//! * [`path`]: control messages inside records (PATH_CHALLENGE / PATH_RESPONSE) and the
//!   gateway's reply-path validation.
//! * [`detect`]: the record detector that routes a datagram to naked or secure processing.
//! * [`gssapi`]: the GSS-API sub-negotiation of method 0x01 (RFC 1961).
//! * [`frame`]: the framed control channel that follows a secure UDP ASSOCIATE.
//! * [`error`]: typed errors and drop reasons.
//!
//! `docs/PROTOCOL.md` is the wire contract these modules implement.

pub mod detect;
pub mod error;
pub mod frame;
pub mod gssapi;
pub mod keys;
pub mod path;
pub mod record;
pub mod replay;
pub mod session;
pub mod socks;
pub mod tag;

pub use detect::{classify, DatagramKind};
pub use error::{DropReason, OpenError, SealError, SocksError};
pub use keys::{AssociationId, CipherSuite, DirectionKeys, KeySchedule, Role};
pub use path::{ControlMessage, PathAction, PathValidator};
pub use record::{Opener, Sealer};
pub use replay::ReplayWindow;
pub use session::{Content, Opened, RecvSession, SendSession};

/// Property-test support shared by the crate's test modules.
#[cfg(test)]
pub(crate) mod testing {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use proptest::strategy::Strategy;
    use proptest::test_runner::{Config, TestCaseError, TestRng, TestRunner};

    /// Runs a property over `cases` inputs and counts the branch label each case returns,
    /// so that the caller can assert every branch it claims to test was reached. The
    /// runner's random source is proptest's fixed-seed RNG, so the inputs and the counts
    /// are the same on every run (a threshold that passes once always passes).
    pub(crate) fn counted<S: Strategy>(
        cases: u32,
        strategy: S,
        property: impl Fn(S::Value) -> Result<&'static str, TestCaseError>,
    ) -> BTreeMap<&'static str, usize> {
        let counts = RefCell::new(BTreeMap::new());
        let config = Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        };
        let rng = TestRng::deterministic_rng(config.rng_algorithm);
        let mut runner = TestRunner::new_with_rng(config, rng);
        let result = runner.run(&strategy, |v| {
            let label = property(v)?;
            *counts.borrow_mut().entry(label).or_insert(0) += 1;
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        counts.into_inner()
    }

    /// Asserts that every label in `want` was counted at least `min` times.
    pub(crate) fn assert_reached(counts: &BTreeMap<&'static str, usize>, want: &[&str], min: usize) {
        for w in want {
            let n = counts.get(w).copied().unwrap_or(0);
            assert!(n >= min, "branch {w:?} reached {n} times (< {min}): {counts:?}");
        }
    }
}
