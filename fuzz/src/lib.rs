//! The bodies of sudp's fuzz targets. Each asserts a property of the code under test, not
//! only that it does not panic; a failed assertion is a crash libFuzzer reports.
//!
//! | target             | property                                                          |
//! |--------------------|-------------------------------------------------------------------|
//! | `record_open`      | a record opens iff it is byte for byte one that was sealed        |
//! | `record_train`     | a train's verdicts (`verify_many`, `open_verified`) equal the     |
//! |                    | per-record verdicts (`verify`, `open`); nothing forged is opened  |
//! | `socks`            | every SOCKS5 parser: parse, encode, compare; no look-ahead; a     |
//! |                    | refusal is final, "incomplete" asks for more than it had          |
//! | `sudp_negotiation` | the same for SudpHello / SudpAccept; suite choice equals a model  |
//! | `config`           | gateway and shim TOML: deterministic, accepted configs satisfy    |
//! |                    | their documented invariants, errors name where they come from     |
//! | `users`            | users file accepted iff a model says so; errors hide the hashes   |
//!
//! The input's first bytes choose what to build (a mode, lengths, a nonce), the rest mutates
//! it, so that most executions get past the framing checks into the ones behind them.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use sudp::config::{GatewayArgs, GatewayConfig, ShimArgs, ShimConfig};
use sudp::proto::record::{self, Opener, Sealer, MAX_PLAINTEXT};
use sudp::proto::socks::{self, AddrRef, SudpAccept, SudpHello};
use sudp::proto::{AssociationId, CipherSuite, KeySchedule, RecvSession, Role, SocksError};

/// The association every record target seals under.
const ASSOC: AssociationId = AssociationId(0x5544_3322_1100_ffee);

/// Reads the input front to back; past the end it yields zeros, so every input is usable.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| acc << 8 | u64::from(self.byte()))
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }
}

fn suite(bit: u8) -> CipherSuite {
    if bit & 1 == 0 {
        CipherSuite::Aes128CbcHmacSha256
    } else {
        CipherSuite::Aes256CbcHmacSha256
    }
}

/// Fixed keys per suite (the fuzzer must not be able to know or choose them).
fn schedule(suite: CipherSuite) -> KeySchedule {
    let material: Vec<u8> = (0..suite.exporter_len())
        .map(|i| (i as u8).wrapping_mul(151) ^ 0x3c)
        .collect();
    // Invariant: the material has exactly the suite's exporter length.
    KeySchedule::from_exporter(suite, &material).expect("exporter length")
}

/// Applies mutations from `input` to `rec`: each is an operation byte and a position.
fn mutate(rec: &mut Vec<u8>, input: &mut Input<'_>, max_ops: usize) {
    for _ in 0..max_ops {
        if input.data.is_empty() {
            break;
        }
        let op = input.byte();
        let at = usize::from(input.u16());
        let value = input.byte();
        let len = rec.len();
        match op % 6 {
            0 if len > 0 => rec[at % len] ^= value | 1,
            1 => rec.truncate(at % (len + 1)),
            2 => rec.extend(std::iter::repeat_n(value, 1 + at % 32)),
            // The length field, so that framing errors past the length check happen.
            3 if len >= 5 => {
                let field = (len - 5) as u16;
                let field = field.wrapping_add(u16::from(value % 3)).wrapping_sub(1);
                rec[3..5].copy_from_slice(&field.to_be_bytes());
            }
            4 if len > 0 => rec[at % len] = value,
            5 if len > 21 => {
                // Swap two ciphertext blocks (CBC-level tampering that keeps the framing).
                let blocks = (len - 21) / 16;
                if blocks >= 2 {
                    let (i, j) = (at % blocks, usize::from(value) % blocks);
                    for k in 0..16 {
                        rec.swap(21 + i * 16 + k, 21 + j * 16 + k);
                    }
                }
            }
            _ => {}
        }
    }
}

/// `record_open`: seal a plaintext under a fixed key, mutate the record, open it. Property:
/// the record opens exactly when it equals the sealed one, and then yields the original
/// nonce and plaintext. Mode 0 opens the raw input instead: it never opens unless it is the
/// sealing of what it decrypts to (sealing is deterministic), i.e. never without the key.
pub fn record_open(data: &[u8]) {
    let mut input = Input { data };
    let mode = input.byte();
    let suite = suite(mode >> 1);
    let keys = schedule(suite);
    let sealer = Sealer::new(ASSOC, keys.for_role(Role::Client).0);
    let opener = Opener::new(ASSOC, keys.for_role(Role::Gateway).1);
    let mut out = vec![0u8; record::MAX_DATAGRAM];

    if mode & 1 == 0 {
        let mut raw = input.rest().to_vec();
        let original = raw.clone();
        if let Ok((nonce, pt)) = opener.open_in_place(&mut raw) {
            let pt = pt.to_vec();
            let n = sealer
                .seal(nonce, &pt, &mut out)
                .expect("an opened plaintext reseals");
            assert_eq!(
                &out[..n],
                &original[..],
                "opened a record that was not sealed under the key"
            );
        }
        return;
    }

    let nonce = input.u64() % record::MAX_RECORDS_PER_KEY;
    let len = usize::from(input.u16()) % 2048;
    let len = if mode & 0x80 != 0 {
        MAX_PLAINTEXT - len.min(MAX_PLAINTEXT)
    } else {
        len
    };
    let seed = input.take(32);
    let pt: Vec<u8> = (0..len)
        .map(|i| seed.get(i % seed.len().max(1)).copied().unwrap_or(i as u8))
        .collect();
    let n = sealer
        .seal(nonce, &pt, &mut out)
        .expect("plaintext within limits");
    let sealed = out[..n].to_vec();
    let mut rec = sealed.clone();
    mutate(&mut rec, &mut input, 4);
    let mutated = rec.clone();
    match opener.open_in_place(&mut rec) {
        Ok((got_nonce, got)) => {
            assert_eq!(mutated, sealed, "a modified record opened");
            assert_eq!((got_nonce, &got[..]), (nonce, &pt[..]));
        }
        Err(e) => assert_ne!(mutated, sealed, "the sealed record itself failed to open: {e}"),
    }
}

/// `record_train`: 1..=16 records (equal or mixed lengths, nonces that may repeat, some
/// mutated, some from another association), checked as a train and one by one. Property:
/// `verify_many` equals `check_header` + `verify` per record; `open_verified` after
/// `verify_many` gives exactly what `open` gives, record by record, replay window included;
/// whatever opens is byte for byte one of the sealed records.
pub fn record_train(data: &[u8]) {
    let mut input = Input { data };
    let mode = input.byte();
    let suite = suite(mode);
    let keys = schedule(suite);
    let sealer = Sealer::new(ASSOC, keys.for_role(Role::Client).0);
    let stranger = Sealer::new(AssociationId(ASSOC.0 ^ 1), keys.for_role(Role::Client).0);
    let opener = Opener::new(ASSOC, keys.for_role(Role::Gateway).1);
    let count = 1 + usize::from(input.byte() % 16);
    let equal = mode & 2 != 0;
    let base_len = usize::from(input.u16()) % 1500;
    let base_nonce = input.u64() % (record::MAX_RECORDS_PER_KEY - 4096);
    let window = [64usize, 1024][usize::from(mode >> 2 & 1)];

    let mut sealed = Vec::new();
    let mut records = Vec::new();
    let addr = AddrRef::Ip(([192, 0, 2, 7], 5004).into());
    for i in 0..count {
        let len = if equal {
            base_len
        } else {
            usize::from(input.u16()) % 1500
        };
        let step = input.byte();
        // Mostly increasing nonces, some repeats and some far behind (replays, too old).
        let nonce = match step % 8 {
            0 => base_nonce,
            1 => base_nonce.saturating_sub(2000),
            _ => base_nonce + i as u64 * u64::from(step % 4 + 1),
        };
        let mut pt = vec![0u8; addr.encoded_len() + len];
        let k = addr.encode(&mut pt).expect("room for the address");
        for (j, b) in pt[k..].iter_mut().enumerate() {
            *b = (i * 31 + j) as u8;
        }
        // Invalid addresses inside a valid record reach the address check.
        if step & 0x40 != 0 {
            pt[0] = 0x09;
        }
        let mut out = vec![0u8; record::record_len(pt.len())];
        // Some records come from another association sealed with the same keys: their tag
        // verifies, their header does not.
        let foreign = step & 0xa0 == 0xa0;
        let who = if foreign { &stranger } else { &sealer };
        let n = who.seal(nonce, &pt, &mut out).expect("plaintext within limits");
        out.truncate(n);
        if !foreign {
            sealed.push(out.clone());
        }
        if step & 0x10 != 0 {
            mutate(&mut out, &mut input, 1);
        }
        records.push(out);
    }
    let originals: HashSet<Vec<u8>> = sealed.into_iter().collect();

    // Train verdicts against per-record verdicts.
    let views: Vec<&[u8]> = records.iter().map(|r| &r[..]).collect();
    let mut many = vec![false; count];
    opener.verify_many(&views, &mut many);
    let mut recv = RecvSession::new(ASSOC, &keys, Role::Gateway, window);
    let mut session_many = vec![false; count];
    recv.verify_many(&views, &mut session_many);
    for (i, r) in records.iter().enumerate() {
        let tag_ok = r.len() >= record::MIN_RECORD && opener.verify(r).is_ok();
        assert_eq!(many[i], tag_ok, "Opener::verify_many vs verify, record {i}");
        let one = opener.check_header(r).is_ok() && tag_ok;
        assert_eq!(
            session_many[i], one,
            "RecvSession::verify_many vs check_header+verify, record {i}"
        );
    }

    // open_verified with the train's verdicts against open, in order, on two sessions.
    let mut alone = RecvSession::new(ASSOC, &keys, Role::Gateway, window);
    for (i, r) in records.iter().enumerate() {
        let (mut a, mut b) = (r.clone(), r.clone());
        let via_train = recv
            .open_verified(&mut a, session_many[i])
            .map(|o| format!("{o:?}"));
        let via_one = alone.open(&mut b).map(|o| format!("{o:?}"));
        assert_eq!(via_train, via_one, "record {i}");
        if via_one.is_ok() {
            assert!(originals.contains(r), "record {i} opened but was never sealed");
        }
    }
    assert_eq!(recv.window().top(), alone.window().top());
}

/// The checks every SOCKS-style parser must pass: the parsed message re-encodes to the
/// bytes it consumed; parsing is independent of what follows (no look-ahead); every proper
/// prefix is `Incomplete`; an `Incomplete` asks for more than it had; other errors are final
/// (more bytes do not turn them into a success).
macro_rules! stream_parser {
    ($buf:expr, $parse:expr, $encode:expr) => {{
        let buf: &[u8] = $buf;
        let parse = $parse;
        let encode = $encode;
        match parse(buf) {
            Ok((msg, n)) => {
                assert!(n <= buf.len());
                assert_eq!(encode(&msg), &buf[..n], "re-encoding {msg:?}");
                assert_eq!(parse(&buf[..n]).ok(), Some((msg, n)), "look-ahead");
                for k in 0..n {
                    assert!(
                        matches!(parse(&buf[..k]), Err(SocksError::Incomplete { .. })),
                        "prefix {k} of {n} is not incomplete"
                    );
                }
            }
            Err(SocksError::Incomplete { need }) => {
                assert!(need > buf.len(), "need {need} of {}", buf.len())
            }
            Err(e) => {
                let mut longer = buf.to_vec();
                longer.extend_from_slice(&[0u8; 300]);
                assert_eq!(parse(&longer).err(), Some(e), "a refusal changed with more bytes");
            }
        }
    }};
}

/// `socks`: the first byte picks a parser: greeting, method selection, RFC 1929 request,
/// request, reply (same layout, reply codes), UDP request header, bare address.
pub fn socks(data: &[u8]) {
    let Some((&which, buf)) = data.split_first() else {
        return;
    };
    match which % 7 {
        0 => stream_parser!(buf, socks::parse_greeting, |m: &&[u8]| {
            let mut v = Vec::new();
            socks::encode_greeting(m, &mut v);
            v
        }),
        1 => stream_parser!(buf, socks::parse_method_selection, |&m: &u8| vec![
            socks::SOCKS_VERSION,
            m
        ]),
        2 => stream_parser!(buf, socks::parse_userpass, |&(u, p): &(&[u8], &[u8])| {
            let mut v = Vec::new();
            socks::encode_userpass(u, p, &mut v).expect("parsed credentials re-encode");
            v
        }),
        3 | 4 => stream_parser!(buf, socks::parse_request, |r: &socks::Request| {
            if which % 7 == 4 {
                // As a reply: every known code maps back to its byte.
                let code = socks::ReplyCode::from_u8(r.code);
                if r.code <= 8 {
                    assert_eq!(code as u8, r.code);
                } else {
                    assert_eq!(code, socks::ReplyCode::GeneralFailure);
                }
            }
            let mut v = Vec::new();
            socks::encode_request(r.code, &r.addr.as_ref(), &mut v).expect("parsed request re-encodes");
            v
        }),
        5 => match socks::parse_udp_header(buf) {
            Ok(h) => {
                let mut out = vec![0u8; 3 + 1 + 1 + 255 + 2];
                let n = socks::encode_udp_header(&h.addr, &mut out).expect("parsed header re-encodes");
                assert_eq!(n, h.payload_offset);
                assert_eq!(&out[3..n], &buf[3..n]);
                assert_eq!(buf[..2], [0, 0]);
                assert_eq!(h.frag, buf[2]);
                assert_eq!(sudp::proto::classify(buf), sudp::proto::DatagramKind::Naked);
            }
            Err(SocksError::Incomplete { .. }) => {}
            Err(e) => {
                // A refusal does not depend on bytes after the header.
                let mut longer = buf.to_vec();
                longer.extend_from_slice(&[0u8; 300]);
                assert_eq!(socks::parse_udp_header(&longer).err(), Some(e));
            }
        },
        _ => stream_parser!(buf, AddrRef::parse, |a: &AddrRef<'_>| {
            let mut out = vec![0u8; a.encoded_len()];
            a.encode(&mut out).expect("parsed address re-encodes");
            out
        }),
    }
}

/// `sudp_negotiation`: SudpHello and SudpAccept through [`stream_parser`]'s checks, and
/// `choose_suite` against a model (the first offered id that is known and allowed).
pub fn sudp_negotiation(data: &[u8]) {
    let Some((&which, buf)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        stream_parser!(buf, SudpHello::parse, |h: &SudpHello<'_>| {
            let mut v = Vec::new();
            h.encode(&mut v).expect("parsed hello re-encodes");
            v
        });
        if let Ok((h, _)) = SudpHello::parse(buf) {
            assert!((1..=socks::MAX_SUITES).contains(&h.suites.len()));
            assert!(
                h.user.is_empty() <= h.pass.is_empty(),
                "a password without a user"
            );
            let allowed: Vec<CipherSuite> = CipherSuite::ALL
                .into_iter()
                .filter(|s| which & (2 << s.id()) != 0)
                .collect();
            let model = h
                .suites
                .iter()
                .find(|&&id| allowed.iter().any(|s| s.id() == id))
                .map(|&id| CipherSuite::from_id(id).expect("allowed ids are known"));
            assert_eq!(socks::choose_suite(h.suites, &allowed), model);
        }
    } else {
        stream_parser!(buf, SudpAccept::parse, |a: &SudpAccept| a.encode().to_vec());
    }
}

/// A scratch directory of this process's own for config files.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("sudp-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}

/// `config`: the input (UTF-8) as a gateway or shim TOML file, through the public
/// `from_args` path with only `--config` given. Properties: the result is a function of the
/// text (parsed twice, equal); an accepted config has the invariants its type documents;
/// every error names the file or the key it comes from.
pub fn config(data: &[u8]) {
    let Some((&which, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let path = scratch().join(if which & 1 == 0 {
        "gateway.toml"
    } else {
        "shim.toml"
    });
    std::fs::write(&path, text).expect("write scratch config");
    let window = sudp::proto::replay::MIN_WINDOW..=sudp::proto::replay::MAX_WINDOW;
    let unique = |s: &[CipherSuite]| s.iter().collect::<HashSet<_>>().len() == s.len();
    let named = |e: &dyn std::fmt::Display| {
        let m = e.to_string();
        // Errors about one value name the file (and key); the rest name the keys involved.
        assert!(
            m.contains(&*path.to_string_lossy()) || m.contains('`') || m.starts_with("--"),
            "error names neither file nor key: {m}"
        );
        m
    };
    if which & 1 == 0 {
        let run = || {
            GatewayConfig::from_args(GatewayArgs {
                config: Some(path.clone()),
                ..GatewayArgs::default()
            })
        };
        match (run(), run()) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b);
                assert!(a.max_connections > 0 && a.max_associations > 0);
                assert!(!a.idle_timeout.is_zero() && !a.handshake_timeout.is_zero());
                assert!(window.contains(&a.replay_window));
                assert!(!a.suites.is_empty() && unique(&a.suites));
                assert!(!a.cert.as_os_str().is_empty() && !a.key.as_os_str().is_empty());
            }
            (Err(a), Err(b)) => assert_eq!(named(&a), b.to_string()),
            (a, b) => panic!("two parses of one file differ: {a:?} / {b:?}"),
        }
    } else {
        let run = || {
            ShimConfig::from_args(ShimArgs {
                config: Some(path.clone()),
                ..ShimArgs::default()
            })
        };
        match (run(), run()) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b);
                assert!(!a.gateways.is_empty() && a.gateways.iter().all(|g| g.port() != 0));
                assert!(a.max_connections > 0 && a.max_flows > 0);
                assert!(!a.idle_timeout.is_zero() && !a.connect_timeout.is_zero());
                assert!(window.contains(&a.replay_window));
                assert!(!a.suites.is_empty() && unique(&a.suites));
                assert!(a.socks.is_some() || !a.forwards.is_empty(), "nothing to serve");
                for f in &a.forwards {
                    // Forwards print in the form they are written in and parse back.
                    let again = sudp::config::parse_forward(&f.to_string()).expect("printed forward parses");
                    assert_eq!(&again, f);
                }
            }
            (Err(a), Err(b)) => assert_eq!(named(&a), b.to_string()),
            (a, b) => panic!("two parses of one file differ: {a:?} / {b:?}"),
        }
    }
}

/// The users-file line model: what `Users::parse` must accept, given whether the hash part
/// is a valid Argon2 PHC string (decided by the library: the model covers the structure).
fn model_name_ok(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 255
        && !b.contains(&b':')
        && !b.contains(&b'\r')
        && b[0] != b'#'
        && !b[0].is_ascii_whitespace()
        && !b[b.len() - 1].is_ascii_whitespace()
}

/// `users`: the input (UTF-8) as a users file. Properties: accepted iff every content line
/// (not blank, not `#`) is `name:hash` with a name the model accepts, no name twice, and a
/// hash the library accepts on its own line; the count equals the content lines; an error
/// names the first bad line and never echoes a line's hash part.
pub fn users(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Argon2 dummy hashing per accepted file: keep costs fuzzable.
    if text.len() > 4096 {
        return;
    }
    let mut names = HashSet::new();
    let mut first_bad = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let ok = match line.split_once(':') {
            Some((name, _)) => model_name_ok(name) && names.insert(name.to_owned()),
            None => false,
        };
        if !ok {
            first_bad = Some(i + 1);
            break;
        }
    }
    if names.is_empty() && first_bad.is_none() {
        return;
    }
    let got = sudp::auth::Users::parse(text, "fuzz-users");
    match (&got, first_bad) {
        // (An empty file's dummy hash has Argon2's default cost, about 19 MiB and tens of
        // milliseconds: it is skipped above; auth.rs tests it.)
        (Ok(u), None) => assert_eq!(u.len(), names.len()),
        (Ok(_), Some(line)) => panic!("accepted a file whose line {line} the model refuses"),
        (Err(e), bad) => {
            let m = e.to_string();
            assert!(m.starts_with("fuzz-users:"), "{m}");
            if bad.is_none() {
                // The model accepts the structure: only a hash can be wrong.
                assert!(m.contains("hash") || m.contains("Argon2"), "{m}");
            }
            if let Some(line) = bad {
                // The library may refuse an earlier line for its hash; never a later one.
                let at: usize = m["fuzz-users:".len()..]
                    .split(':')
                    .next()
                    .and_then(|d| d.parse().ok())
                    .unwrap_or(usize::MAX);
                assert!(at <= line, "error at line {at}, model refuses line {line}: {m}");
            }
            for line in text.lines() {
                if let Some((_, hash)) = line.trim().split_once(':') {
                    let hash = hash.trim();
                    // Only PHC-looking text: a line's tail may happen to spell out
                    // one of the fixed problem texts (libFuzzer found
                    // `c1: malformed PHC hash stri`, a harness false positive).
                    if hash.len() >= 12 && hash.contains('$') {
                        assert!(!m.contains(hash), "error echoes a hash: {m}");
                    }
                }
            }
        }
    }
}
