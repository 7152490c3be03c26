//! Delegated inspection, sans-IO (`docs/DELEGATION.md`, `docs/PROTOCOL.md` §2.8).
//!
//! * [`tls13`]: read-only TLS 1.3 decryption of a tunnel's two directions from delegated
//!   traffic secrets.
//! * [`http`]: HTTP/1.1 exchanges on the decrypted stream.
//! * [`keylog`]: NSS key log lines, gathered by ClientHello random (the shim's side).
//!
//! Like [`crate::proto`], nothing here does I/O, reads a clock or draws randomness; the
//! gateway's tunnel task and the shim's key log follower feed it.

pub mod http;
pub mod keylog;
pub mod tls13;

pub use tls13::{Dir, Opaque, Tap, TrafficSecrets};

/// Length of a tunnel tag (`docs/PROTOCOL.md` §2.8).
pub const TAG_LEN: usize = 16;
/// TLS exporter label both ends use to name a CONNECT tunnel by its own TLS connection.
pub const TAG_LABEL: &[u8] = b"EXPORTER-sudp-tunnel-tag";

/// A tunnel's tap and HTTP observer together: what the gateway's tunnel task drives.
#[derive(Default)]
pub struct Inspector {
    tap: Tap,
    http: http::Observer,
}

impl Inspector {
    /// A fresh inspector.
    pub fn new() -> Inspector {
        Inspector::default()
    }

    /// A copy of bytes forwarded in direction `dir`; returns the HTTP exchanges completed.
    pub fn feed(&mut self, dir: Dir, bytes: &[u8]) -> Vec<http::Exchange> {
        self.tap.feed(dir, bytes);
        self.drain()
    }

    /// Installs the secrets; returns the exchanges the buffered bytes completed.
    pub fn install(&mut self, secrets: TrafficSecrets) -> Vec<http::Exchange> {
        self.tap.install(secrets);
        self.drain()
    }

    /// The tunnel ended: an HTTP response delimited by the close completes.
    pub fn finish(&mut self) -> Vec<http::Exchange> {
        self.http.finish();
        let out = self.http.take();
        self.tap.forget();
        out
    }

    /// Drops the secrets (zeroized) and stops for good.
    pub fn forget(&mut self) {
        self.tap.forget();
    }

    /// Gives up (e.g. the secrets did not come in time).
    pub fn give_up(&mut self, why: Opaque) {
        self.tap.give_up(why);
    }

    /// The tap.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Whether the decrypted stream carried HTTP/1.1 requests.
    pub fn saw_http(&self) -> bool {
        self.http.saw_http()
    }

    /// Why HTTP observation stopped, if it did.
    pub fn http_broken(&self) -> Option<&'static str> {
        self.http.broken()
    }

    fn drain(&mut self) -> Vec<http::Exchange> {
        use zeroize::Zeroize;
        // Decrypted bytes first, then what went by undecrypted after them (the tap's order).
        let mut up = self.tap.take(Dir::ClientToServer);
        if !up.is_empty() {
            self.http.request_bytes(&up);
        }
        self.http.request_gap(self.tap.take_gap(Dir::ClientToServer));
        let mut down = self.tap.take(Dir::ServerToClient);
        if !down.is_empty() {
            self.http.response_bytes(&down);
        }
        self.http.response_gap(self.tap.take_gap(Dir::ServerToClient));
        up.zeroize();
        down.zeroize();
        self.http.take()
    }
}
