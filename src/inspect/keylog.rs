//! NSS key log lines (the `SSLKEYLOGFILE` format of curl, Firefox, Chromium, Python's ssl
//! and rustls), sans-IO: [`parse_line`] reads one line, [`Collector`] gathers the four
//! TLS 1.3 traffic secrets of each connection by its ClientHello random.
//!
//! ```text
//! <LABEL> SP <client_random, 64 hex digits> SP <secret, 2n hex digits> LF
//! ```
//!
//! Lines starting with `#`, blank lines and labels other than the five below are skipped.
//! `CLIENT_RANDOM` (a TLS 1.2 master secret) is recognised so that the follower can say
//! that TLS 1.2 is not delegated, instead of silently waiting.

use std::collections::HashMap;

use zeroize::Zeroizing;

use super::tls13::TrafficSecrets;

/// Which secret a key log line carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// CLIENT_HANDSHAKE_TRAFFIC_SECRET.
    ClientHandshake,
    /// SERVER_HANDSHAKE_TRAFFIC_SECRET.
    ServerHandshake,
    /// CLIENT_TRAFFIC_SECRET_0.
    ClientApp,
    /// SERVER_TRAFFIC_SECRET_0.
    ServerApp,
    /// CLIENT_RANDOM: a TLS 1.2 master secret (not delegated).
    Tls12,
}

/// One parsed line. `Debug` hides the secret.
pub struct Line {
    /// The label.
    pub label: Label,
    /// The ClientHello random the line is about.
    pub client_random: [u8; 32],
    /// The secret.
    pub secret: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Line({:?}, [redacted])", self.label)
    }
}

/// Longest secret accepted (SHA-384 output is 48 bytes; a TLS 1.2 master secret too).
const MAX_SECRET: usize = 64;

/// Parses one line (without its newline); `None` for comments, blanks, other labels and
/// malformed lines.
pub fn parse_line(line: &[u8]) -> Option<Line> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let label = match parts.next()? {
        "CLIENT_HANDSHAKE_TRAFFIC_SECRET" => Label::ClientHandshake,
        "SERVER_HANDSHAKE_TRAFFIC_SECRET" => Label::ServerHandshake,
        "CLIENT_TRAFFIC_SECRET_0" => Label::ClientApp,
        "SERVER_TRAFFIC_SECRET_0" => Label::ServerApp,
        "CLIENT_RANDOM" => Label::Tls12,
        _ => return None,
    };
    let mut client_random = [0u8; 32];
    hex::decode_to_slice(parts.next()?, &mut client_random).ok()?;
    let secret_hex = parts.next()?;
    if parts.next().is_some() || secret_hex.len() > 2 * MAX_SECRET {
        return None;
    }
    let secret = Zeroizing::new(hex::decode(secret_hex).ok()?);
    if secret.is_empty() {
        return None;
    }
    Some(Line {
        label,
        client_random,
        secret,
    })
}

#[derive(Default)]
struct Partial {
    ch: Option<Zeroizing<Vec<u8>>>,
    sh: Option<Zeroizing<Vec<u8>>>,
    ca: Option<Zeroizing<Vec<u8>>>,
    sa: Option<Zeroizing<Vec<u8>>>,
}

/// What a line added.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// Nothing complete yet (or the line was skipped).
    Nothing,
    /// The four secrets of this connection are now known.
    Complete([u8; 32]),
    /// A TLS 1.2 connection: it will never be complete.
    Tls12([u8; 32]),
}

/// Gathers secrets by client random, for at most `capacity` connections at once (the
/// oldest-inserted are forgotten first; their memory is zeroized).
pub struct Collector {
    partial: HashMap<[u8; 32], Partial>,
    order: std::collections::VecDeque<[u8; 32]>,
    capacity: usize,
}

impl Collector {
    /// A collector holding at most `capacity` connections' secrets.
    pub fn new(capacity: usize) -> Collector {
        Collector {
            partial: HashMap::new(),
            order: Default::default(),
            capacity: capacity.max(1),
        }
    }

    /// Adds one line.
    pub fn add(&mut self, line: Line) -> Added {
        let r = line.client_random;
        if line.label == Label::Tls12 {
            return Added::Tls12(r);
        }
        if !self.partial.contains_key(&r) {
            while self.partial.len() >= self.capacity {
                let Some(old) = self.order.pop_front() else { break };
                self.partial.remove(&old);
            }
            self.order.push_back(r);
        }
        let p = self.partial.entry(r).or_default();
        let slot = match line.label {
            Label::ClientHandshake => &mut p.ch,
            Label::ServerHandshake => &mut p.sh,
            Label::ClientApp => &mut p.ca,
            Label::ServerApp => &mut p.sa,
            Label::Tls12 => return Added::Nothing,
        };
        *slot = Some(line.secret);
        if p.ch.is_some() && p.sh.is_some() && p.ca.is_some() && p.sa.is_some() {
            Added::Complete(r)
        } else {
            Added::Nothing
        }
    }

    /// Takes the complete secrets of `client_random` out of the collector.
    pub fn take(&mut self, client_random: &[u8; 32]) -> Option<TrafficSecrets> {
        let p = self.partial.get(client_random)?;
        if !(p.ch.is_some() && p.sh.is_some() && p.ca.is_some() && p.sa.is_some()) {
            return None;
        }
        let p = self.partial.remove(client_random)?;
        self.order.retain(|r| r != client_random);
        Some(TrafficSecrets {
            client_handshake: p.ch?,
            server_handshake: p.sh?,
            client_app: p.ca?,
            server_app: p.sa?,
        })
    }

    /// Connections with secrets held now.
    pub fn len(&self) -> usize {
        self.partial.len()
    }

    /// Whether no secrets are held.
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(label: &str, r: u8, s: u8) -> Vec<u8> {
        format!("{label} {} {}", hex::encode([r; 32]), hex::encode([s; 32])).into_bytes()
    }

    #[test]
    fn lines_parse_and_gather_by_client_random() {
        assert!(parse_line(b"# comment").is_none());
        assert!(parse_line(b"").is_none());
        assert!(parse_line(b"EXPORTER_SECRET aa bb").is_none());
        assert!(parse_line(b"CLIENT_TRAFFIC_SECRET_0 zz 00").is_none());
        assert!(parse_line(&line("CLIENT_TRAFFIC_SECRET_0", 1, 2)[..70]).is_none());
        let l = parse_line(&line("CLIENT_TRAFFIC_SECRET_0", 1, 2)).unwrap();
        assert_eq!(l.label, Label::ClientApp);
        assert!(!format!("{l:?}").contains("0202"));

        let mut c = Collector::new(8);
        for (i, label) in [
            "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
            "SERVER_HANDSHAKE_TRAFFIC_SECRET",
            "CLIENT_TRAFFIC_SECRET_0",
        ]
        .iter()
        .enumerate()
        {
            assert_eq!(
                c.add(parse_line(&line(label, 7, i as u8 + 1)).unwrap()),
                Added::Nothing
            );
        }
        assert!(c.take(&[7; 32]).is_none());
        assert_eq!(
            c.add(parse_line(&line("SERVER_TRAFFIC_SECRET_0", 7, 4)).unwrap()),
            Added::Complete([7; 32])
        );
        let s = c.take(&[7; 32]).unwrap();
        assert_eq!(&s.server_app[..], &[4; 32]);
        assert!(c.is_empty());
        assert_eq!(
            c.add(parse_line(&line("CLIENT_RANDOM", 9, 1)).unwrap()),
            Added::Tls12([9; 32])
        );
    }

    #[test]
    fn the_collector_is_bounded() {
        let mut c = Collector::new(2);
        for r in 0..5 {
            c.add(parse_line(&line("CLIENT_TRAFFIC_SECRET_0", r, 1)).unwrap());
        }
        assert_eq!(c.len(), 2);
    }
}
