//! The one audit writer: JSON lines, one per event, appended to `--audit-log FILE`.
//!
//! Every audit line in sudp goes through [`AuditLog::write`]: the end of a CONNECT tunnel,
//! the end of a UDP association, and whatever later features add (delegated HTTP
//! exchanges, per-user records). A feature adds a variant (or fields) to [`Event`], never a
//! writer of its own.
//!
//! **Nothing secret is ever a field.** Every field is an identity, an address, a count, a
//! duration or a reason; peer-supplied strings (user names, domain names, HTTP paths) are
//! carried as JSON strings, which escape every control character, so a peer cannot forge a
//! line.
//!
//! Writing never blocks a connection's task: lines go through a bounded queue to one writer
//! thread. A line that does not fit (the disk is stalled) is counted in
//! [`AuditLog::dropped`], a line the file refused in [`AuditLog::failed`]; both are logged
//! once per burst, so no audit line is lost silently.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// How many lines may wait for the writer thread before new ones are dropped (and counted).
pub const QUEUE_LINES: usize = 16 * 1024;

/// One audit event. Serialized with `"event": "<snake_case variant>"` first, after the
/// line's `time`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A CONNECT tunnel ended.
    ConnectEnd {
        /// The qualified identity (`alice`, `cert:laptop`), or `anonymous`.
        user: String,
        /// How the user authenticated (`password`, `certificate`, `none`, ...).
        method: String,
        /// The client's address (of the TLS control connection).
        source: String,
        /// The target as the client asked for it (`host:port` or `ip:port`).
        target: String,
        /// The address the gateway connected to.
        remote: String,
        /// Bytes from the client towards the target.
        bytes_up: u64,
        /// Bytes from the target towards the client.
        bytes_down: u64,
        /// How long the tunnel lived.
        duration_ms: u64,
        /// Why it ended (`eof`, `idle_timeout`, `error`, `shutdown`, ...).
        reason: String,
    },
    /// A UDP association ended.
    AssociationEnd {
        /// The qualified identity, or `anonymous`.
        user: String,
        /// How the user authenticated.
        method: String,
        /// The client's address (of the TLS control connection).
        source: String,
        /// The association id (secure associations), else `naked`.
        assoc: String,
        /// Whether datagrams were secure records (`true`) or naked SOCKS5 UDP.
        secure: bool,
        /// Distinct destinations the association sent to (bounded list, see the relay).
        targets: Vec<String>,
        /// Datagrams from the client towards targets.
        datagrams_up: u64,
        /// Payload bytes from the client towards targets.
        bytes_up: u64,
        /// Datagrams from targets towards the client.
        datagrams_down: u64,
        /// Payload bytes from targets towards the client.
        bytes_down: u64,
        /// How long the association lived.
        duration_ms: u64,
        /// Its epoch on this connection (0, or the epoch of its latest re-attach); a moved
        /// association has one line per epoch, each with that epoch's figures.
        epoch: u32,
        /// Why it ended.
        reason: String,
    },
    /// One HTTP/1.1 request and its response, read inside a CONNECT tunnel whose client
    /// delegated its TLS secrets (docs/DELEGATION.md).
    Http {
        /// The qualified identity of the tunnel's client, or `anonymous`.
        user: String,
        /// The client's address (of the tunnel's TLS connection).
        source: String,
        /// The tunnel's target as the client asked for it (`host:port`).
        target: String,
        /// The request's `Host` header, if any.
        host: Option<String>,
        /// The request method.
        method: String,
        /// The request target (path and query), cut at 2048 bytes.
        path: String,
        /// The response status code.
        status: u16,
        /// Request body bytes (payload, after chunked decoding).
        request_body: u64,
        /// Response body bytes.
        response_body: u64,
    },
    /// A CONNECT tunnel that was decrypted with delegated secrets ended: one line per
    /// tunnel, also for protocols other than HTTP/1.1.
    TunnelInspected {
        /// The qualified identity, or `anonymous`.
        user: String,
        /// The client's address.
        source: String,
        /// The tunnel's target.
        target: String,
        /// The TLS 1.3 suite the connection used.
        suite: Option<String>,
        /// `http/1.1`, or `other` when no HTTP/1.1 request was seen.
        protocol: String,
        /// HTTP exchanges written as `http` lines.
        requests: u64,
        /// Decrypted application data bytes, client to origin.
        app_bytes_up: u64,
        /// Decrypted application data bytes, origin to client.
        app_bytes_down: u64,
        /// Why decryption stopped before the end, if it did.
        opaque: Option<String>,
    },
    /// A control session offered secrets that the gateway refused.
    DelegationRefused {
        /// The qualified identity of the session, or `anonymous`.
        user: String,
        /// The session's address.
        source: String,
        /// The named tunnel's target, when the tag named a live tunnel.
        target: Option<String>,
        /// Why (`end_to_end`, `other_session`, `other_identity`, `unknown_tunnel`, ...).
        reason: String,
    },
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    event: &'a Event,
}

struct Inner {
    path: PathBuf,
    queue: SyncSender<Vec<u8>>,
    file: Arc<Mutex<File>>,
    dropped: AtomicU64,
    failed: Arc<AtomicU64>,
    warned_drop: AtomicBool,
}

/// The audit writer. Cheap to clone; a disabled log ([`AuditLog::disabled`]) writes nothing.
#[derive(Clone, Default)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(i) => write!(f, "AuditLog({})", i.path.display()),
            None => f.write_str("AuditLog(disabled)"),
        }
    }
}

fn open_file(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Audit lines name users and destinations: readable by the operator only.
        o.mode(0o600);
    }
    o.open(path)
}

impl AuditLog {
    /// No audit log: [`AuditLog::write`] does nothing.
    pub fn disabled() -> AuditLog {
        AuditLog { inner: None }
    }

    /// Opens (creates, appends to) `path` and starts the writer thread. The error names the
    /// file.
    pub fn open(path: &Path) -> io::Result<AuditLog> {
        let file = open_file(path)
            .map_err(|e| io::Error::new(e.kind(), format!("audit log {}: {e}", path.display())))?;
        let file = Arc::new(Mutex::new(file));
        let failed = Arc::new(AtomicU64::new(0));
        let (queue, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE_LINES);
        let (writer_file, writer_failed, shown) = (file.clone(), failed.clone(), path.to_owned());
        std::thread::Builder::new()
            .name("sudp-audit".into())
            .spawn(move || {
                let mut warned = false;
                // Ends when every sender (every clone of the log) is gone.
                while let Ok(line) = rx.recv() {
                    // A poisoned lock only means a writer panicked mid-line; the file is
                    // still usable.
                    let mut f = writer_file.lock().unwrap_or_else(|p| p.into_inner());
                    match f.write_all(&line) {
                        Ok(()) => warned = false,
                        Err(e) => {
                            writer_failed.fetch_add(1, Ordering::Relaxed);
                            if !warned {
                                tracing::error!(file = %shown.display(), error = %e,
                                    "audit log write failed; lines are counted as failed");
                                warned = true;
                            }
                        }
                    }
                }
            })?;
        Ok(AuditLog {
            inner: Some(Arc::new(Inner {
                path: path.to_owned(),
                queue,
                file,
                dropped: AtomicU64::new(0),
                failed,
                warned_drop: AtomicBool::new(false),
            })),
        })
    }

    /// Opens `path` if given, else a disabled log.
    pub fn from_option(path: Option<&Path>) -> io::Result<AuditLog> {
        path.map_or(Ok(AuditLog::disabled()), AuditLog::open)
    }

    /// Whether lines are written anywhere.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues one line (`{"time": ..., "event": ..., fields}` and a newline). Never blocks.
    pub fn write(&self, event: &Event) {
        let Some(inner) = &self.inner else { return };
        let line = Line {
            time: rfc3339_utc(SystemTime::now()),
            event,
        };
        // Serializing plain strings and integers cannot fail.
        let mut bytes = serde_json::to_vec(&line).expect("audit lines serialize");
        bytes.push(b'\n');
        match inner.queue.try_send(bytes) {
            Ok(()) => {
                inner.warned_drop.store(false, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                inner.dropped.fetch_add(1, Ordering::Relaxed);
                if !inner.warned_drop.swap(true, Ordering::Relaxed) {
                    tracing::error!(file = %inner.path.display(),
                        "audit log queue full; lines are counted as dropped");
                }
            }
        }
    }

    /// Reopens the file (after logrotate moved it), keeping the old one on error.
    pub fn reopen(&self) -> io::Result<()> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let new = open_file(&inner.path)?;
        *inner.file.lock().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    /// Lines dropped because the writer fell more than [`QUEUE_LINES`] behind.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.dropped.load(Ordering::Relaxed))
    }

    /// Lines the file refused (disk full, I/O error).
    pub fn failed(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.failed.load(Ordering::Relaxed))
    }
}

/// `2026-12-01T11:35:21.123Z`: RFC 3339, UTC, milliseconds.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // leap day 2000
        assert_eq!(rfc3339_utc(t), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_796_125_521);
        assert_eq!(rfc3339_utc(t), "2026-12-01T11:45:21.000Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_107_542_399); // 2100 is not a leap year
        assert_eq!(rfc3339_utc(t), "2100-02-28T23:59:59.000Z");
    }

    #[test]
    fn lines_are_json_one_per_event_and_escape_peer_strings() {
        let dir = std::env::temp_dir().join(format!("sudp-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&path);
        let log = AuditLog::open(&path).unwrap();
        log.write(&Event::ConnectEnd {
            user: "eve\n{\"event\":\"forged\"}".into(),
            method: "password".into(),
            source: "127.0.0.1:5000".into(),
            target: "example.test:80".into(),
            remote: "127.0.0.1:80".into(),
            bytes_up: 10,
            bytes_down: 20,
            duration_ms: 5,
            reason: "eof".into(),
        });
        drop(log); // the writer thread drains and ends
        let mut text = String::new();
        for _ in 0..200 {
            text = std::fs::read_to_string(&path).unwrap();
            if text.ends_with('\n') {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(text.lines().count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["event"], "connect_end");
        assert_eq!(v["user"], "eve\n{\"event\":\"forged\"}");
        assert_eq!(v["bytes_down"], 20);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_disabled_log_writes_nothing() {
        let log = AuditLog::disabled();
        assert!(!log.enabled());
        log.write(&Event::AssociationEnd {
            user: "a".into(),
            method: "none".into(),
            source: "s".into(),
            assoc: "naked".into(),
            secure: false,
            targets: vec![],
            datagrams_up: 0,
            bytes_up: 0,
            datagrams_down: 0,
            bytes_down: 0,
            duration_ms: 0,
            epoch: 0,
            reason: "eof".into(),
        });
        assert_eq!((log.dropped(), log.failed()), (0, 0));
    }
}
