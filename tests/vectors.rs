//! Known-answer vectors: `tests/vectors/records.json` pins the bytes of the record layer and
//! key schedule. The file is meant for other implementations too (see docs/PROTOCOL.md §9).
//!
//! Regenerate (only when the wire format deliberately changes):
//! `SUDP_REGEN_VECTORS=1 cargo test --test vectors regenerate -- --ignored`

use std::net::SocketAddr;

use serde_json::{json, Value};
use sudp::proto::keys::{AssociationId, CipherSuite, KeySchedule, Role, EXPORTER_LABEL};
use sudp::proto::record;
use sudp::proto::session::{RecvSession, SendSession};
use sudp::proto::socks::Address;
use sudp::proto::OpenError;

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/records.json");

fn exporter_material(suite: CipherSuite, seed: u8) -> Vec<u8> {
    (0..suite.exporter_len())
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn addr_json(a: &Address) -> Value {
    match a {
        Address::Ip(SocketAddr::V4(s)) => json!({"atyp": 1, "host": s.ip().to_string(), "port": s.port()}),
        Address::Ip(SocketAddr::V6(s)) => json!({"atyp": 4, "host": s.ip().to_string(), "port": s.port()}),
        Address::Domain(d, p) => json!({"atyp": 3, "host": d, "port": p}),
    }
}

fn addr_from_json(v: &Value) -> Address {
    let host = v["host"].as_str().unwrap();
    let port = v["port"].as_u64().unwrap() as u16;
    match v["atyp"].as_u64().unwrap() {
        1 | 4 => Address::Ip(SocketAddr::new(host.parse().unwrap(), port)),
        3 => Address::Domain(host.to_string(), port),
        t => panic!("bad atyp {t}"),
    }
}

struct Case {
    name: &'static str,
    suite: CipherSuite,
    direction: Role,
    nonce: u64,
    addr: Address,
    payload: Vec<u8>,
}

fn cases() -> Vec<Case> {
    let v4 = Address::Ip("192.0.2.10:5004".parse().unwrap());
    let v6 = Address::Ip("[2001:db8::7]:5060".parse().unwrap());
    let dom = Address::Domain("media.example.com".into(), 443);
    let mut out = Vec::new();
    // The CBC suites first, exactly as before the AEAD suites existed (their vectors, ids
    // and keys stay byte for byte what they were); the AEAD suites' cases follow.
    for suite in CipherSuite::ALL.into_iter().filter(|s| !s.is_aead()) {
        let tag = if suite == CipherSuite::Aes128CbcHmacSha256 {
            "aes128"
        } else {
            "aes256"
        };
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        out.push(Case {
            name: leak(format!("{tag}-ipv4-empty")),
            suite,
            direction: Role::Client,
            nonce: 0,
            addr: v4.clone(),
            payload: vec![],
        });
        out.push(Case {
            name: leak(format!("{tag}-ipv4-voip160")),
            suite,
            direction: Role::Client,
            nonce: 1,
            addr: v4.clone(),
            payload: (0..160).map(|i| i as u8).collect(),
        });
        out.push(Case {
            name: leak(format!("{tag}-ipv6-9bytes")),
            suite,
            direction: Role::Gateway,
            nonce: 0x0102_0304_0506,
            addr: v6.clone(),
            payload: b"hello sudp".to_vec()[..9].to_vec(),
        });
        out.push(Case {
            name: leak(format!("{tag}-domain-block-exact")),
            suite,
            direction: Role::Client,
            nonce: 65_535,
            addr: dom.clone(),
            payload: vec![0xAB; 11],
        });
    }
    // The largest plaintext one record carries: address header (7) + payload.
    out.push(Case {
        name: "aes128-ipv4-maximal",
        suite: CipherSuite::Aes128CbcHmacSha256,
        direction: Role::Gateway,
        nonce: record::MAX_RECORDS_PER_KEY - 1,
        addr: v4.clone(),
        payload: (0..record::MAX_PLAINTEXT - 7).map(|i| (i % 251) as u8).collect(),
    });
    // AEAD suites (PROTOCOL.md §4.7): no padding, so lengths of every residue mod 16.
    for (suite, tag) in [
        (CipherSuite::Aes128Gcm, "aes128gcm"),
        (CipherSuite::ChaCha20Poly1305, "chacha20poly1305"),
    ] {
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        out.push(Case {
            name: leak(format!("{tag}-ipv4-empty")),
            suite,
            direction: Role::Client,
            nonce: 0,
            addr: v4.clone(),
            payload: vec![],
        });
        out.push(Case {
            name: leak(format!("{tag}-ipv4-voip160")),
            suite,
            direction: Role::Client,
            nonce: 1,
            addr: v4.clone(),
            payload: (0..160).map(|i| i as u8).collect(),
        });
        out.push(Case {
            name: leak(format!("{tag}-ipv6-9bytes")),
            suite,
            direction: Role::Gateway,
            nonce: 0x0102_0304_0506,
            addr: v6.clone(),
            payload: b"hello sudp".to_vec()[..9].to_vec(),
        });
        out.push(Case {
            name: leak(format!("{tag}-domain-17bytes")),
            suite,
            direction: Role::Client,
            nonce: 65_535,
            addr: dom.clone(),
            payload: vec![0xAB; 17],
        });
        out.push(Case {
            name: leak(format!("{tag}-ipv4-maximal")),
            suite,
            direction: Role::Gateway,
            nonce: record::MAX_RECORDS_PER_KEY - 1,
            addr: v4.clone(),
            payload: (0..record::MAX_PLAINTEXT - 7).map(|i| (i % 251) as u8).collect(),
        });
    }
    out
}

/// AEAD nonce of PROTOCOL.md §4.7: the 12-byte IV XOR the nonce, big-endian, left-padded.
fn aead_nonce(iv: &[u8], nonce: u64) -> Vec<u8> {
    let mut n = iv.to_vec();
    for (b, x) in n[4..].iter_mut().zip(nonce.to_be_bytes()) {
        *b ^= x;
    }
    n
}

fn generate() -> Value {
    let mut valid = Vec::new();
    for (i, c) in cases().into_iter().enumerate() {
        let assoc = AssociationId(0x5344_5550_0000_0000 | i as u64);
        let material = exporter_material(c.suite, i as u8);
        let ks = KeySchedule::from_exporter(c.suite, &material).unwrap();
        let mut send = SendSession::resume(assoc, &ks, c.direction, c.nonce);
        let mut buf = vec![0u8; record::MAX_DATAGRAM];
        let n = send.seal(&c.addr.as_ref(), &c.payload, &mut buf).unwrap();
        let (keys, _) = ks.for_role(c.direction);
        let mut pt = vec![0u8; 300];
        let an = c.addr.as_ref().encode(&mut pt).unwrap();
        pt.truncate(an);
        pt.extend_from_slice(&c.payload);
        let mut v = json!({
            "name": c.name,
            "suite_id": c.suite.id(),
            "assoc_id": format!("{:016x}", assoc.0),
            "exporter_label": String::from_utf8(EXPORTER_LABEL.to_vec()).unwrap(),
            "exporter_context": hex::encode(KeySchedule::exporter_context(assoc, c.suite)),
            "exporter_output": hex::encode(&material),
            "direction": if c.direction == Role::Client { "c2g" } else { "g2c" },
            "enc_key": hex::encode(keys.enc()),
            "mac_key": hex::encode(keys.mac()),
            "iv_key": hex::encode(keys.iv()),
            "nonce": c.nonce,
            "address": addr_json(&c.addr),
            "payload": hex::encode(&c.payload),
            "plaintext": hex::encode(&pt),
            "record": hex::encode(&buf[..n]),
        });
        if c.suite.is_aead() {
            // Spelled out for other implementations: the AEAD's nonce and AAD inputs.
            v["aead_nonce"] = json!(hex::encode(aead_nonce(keys.iv(), c.nonce)));
            v["aad"] = json!(hex::encode(&buf[..record::PREFIX_LEN]));
        }
        valid.push(v);
    }
    // Invalid records: each is a valid record of vector 1 changed one way; `expect` is the
    // drop reason (docs/PROTOCOL.md §7) a receiver with those keys and a fresh window gives.
    let base = hex::decode(valid[1]["record"].as_str().unwrap()).unwrap();
    let mut invalid = Vec::new();
    let mut push_after = |name: &str, after: &[Vec<u8>], rec: Vec<u8>, expect: &str| {
        let mut v =
            json!({"name": name, "of": valid[1]["name"], "record": hex::encode(rec), "expect": expect});
        if !after.is_empty() {
            v["after"] = json!(after.iter().map(hex::encode).collect::<Vec<_>>());
        }
        invalid.push(v);
    };
    let mut push = |name: &str, rec: Vec<u8>, expect: &str| push_after(name, &[], rec, expect);
    // Records of vector 1's association and direction whose tags verify, sealed (at the
    // nonce given) around a plaintext placed by hand, so it need not be a valid one.
    let ks1 = KeySchedule::from_exporter(
        CipherSuite::Aes128CbcHmacSha256,
        &exporter_material(CipherSuite::Aes128CbcHmacSha256, 1),
    )
    .unwrap();
    let assoc1 = AssociationId(0x5344_5550_0000_0001);
    let crafted = |nonce: u64, pt: &[u8]| -> Vec<u8> {
        let mut send = SendSession::resume(assoc1, &ks1, Role::Client, nonce);
        let mut b = vec![0u8; 1024];
        b[record::PREFIX_LEN..record::PREFIX_LEN + pt.len()].copy_from_slice(pt);
        let n = send.seal_in_place(&mut b, pt.len()).unwrap();
        b.truncate(n);
        b
    };
    // A record whose padding is malformed and whose tag still verifies: seal 32 bytes (two
    // blocks, then a full block of padding), drop the padding block (CBC decrypts the first
    // two unchanged: same IV, same chain), fix the length and tag the result again.
    let bad_padding = |nonce: u64, last_block: [u8; 16]| -> Vec<u8> {
        let mut pt = [0x11u8; 32];
        pt[16..].copy_from_slice(&last_block);
        let mut r = crafted(nonce, &pt);
        r.truncate(record::PREFIX_LEN + 32);
        let l = (r.len() + record::TAG_LEN - record::HEADER_LEN) as u16;
        r[3..5].copy_from_slice(&l.to_be_bytes());
        let tag = sudp::proto::tag::TagKey::new(ks1.c2g.mac()).tag(&r);
        r.extend_from_slice(&tag);
        r
    };
    let mut r = base.clone();
    let last = r.len() - 1;
    r[last] ^= 1;
    push("tag-bit-flipped", r, "bad_mac");
    let mut r = base.clone();
    r[record::PREFIX_LEN] ^= 0x80;
    push("ciphertext-bit-flipped", r, "bad_mac");
    let mut r = base.clone();
    r[record::NONCE_OFFSET + 7] ^= 1;
    push("nonce-changed", r, "bad_mac");
    push(
        "truncated-by-one",
        base[..base.len() - 1].to_vec(),
        "length_mismatch",
    );
    push("too-short", base[..52].to_vec(), "truncated");
    let mut r = base.clone();
    r.push(0);
    push("trailing-byte", r, "length_mismatch");
    let mut r = base.clone();
    r[0] = 0x17;
    push("flag-bit-clear", r, "bad_header");
    let mut r = base.clone();
    r[2] = 0x04;
    push("wrong-version", r, "bad_header");
    let mut r = base[..base.len() - 8].to_vec();
    let l = (r.len() - record::HEADER_LEN) as u16;
    r[3..5].copy_from_slice(&l.to_be_bytes());
    push("ciphertext-not-block-multiple", r, "bad_ciphertext_length");
    let mut r = base.clone();
    r[record::ASSOC_OFFSET] ^= 0xFF;
    push("other-association", r, "unknown_association");
    let mut r = base.clone();
    r[record::NONCE_OFFSET..record::PREFIX_LEN].copy_from_slice(&record::MAX_RECORDS_PER_KEY.to_be_bytes());
    push("nonce-at-limit", r, "nonce_limit");
    // Authenticated records a correct sender never makes (§6.1 steps 10-11, §4.1).
    let mut last = [0x22u8; 16];
    last[15] = 0x00;
    push("padding-byte-zero", bad_padding(2, last), "bad_padding");
    let mut last = [0x22u8; 16];
    last[15] = 0x03;
    push("padding-bytes-differ", bad_padding(3, last), "bad_padding");
    let mut last = [0x22u8; 16];
    last[15] = 0x11;
    push("padding-byte-above-16", bad_padding(4, last), "bad_padding");
    push(
        "unknown-atyp",
        crafted(5, &[0x05, 192, 0, 2, 10, 0x13, 0x8c, 0xde, 0xad]),
        "bad_address",
    );
    push("address-cut-short", crafted(6, &[0x01, 192, 0, 2]), "bad_address");
    push(
        "domain-length-zero",
        crafted(7, &[0x03, 0x00, 0x13, 0x8c]),
        "bad_address",
    );
    push(
        "control-unknown-kind",
        crafted(8, &[0x00, 0x42, 1, 2, 3, 4, 5, 6, 7, 8]),
        "bad_control",
    );
    push(
        "control-challenge-short-token",
        crafted(9, &[0x00, 0x01, 1, 2, 3, 4, 5, 6, 7]),
        "bad_control",
    );
    // Left of the window: the receiver first accepts nonce 2000 (the `after` record), so
    // nonce 1 is below 2001 - 1024.
    let ahead = crafted(2000, &[0x01, 192, 0, 2, 10, 0x13, 0x8c, 0x01]);
    push_after("left-of-window", &[ahead], base.clone(), "too_old");
    invalid.extend(aead_invalid(&valid));
    json!({
        "format": "sudp record vectors v1; hex strings; see docs/PROTOCOL.md section 9",
        "valid": valid,
        "invalid": invalid,
    })
}

/// Invalid records of each AEAD suite, made from its `-voip160` vector (and, for the
/// authenticated ones, sealed by its sender at chosen nonces).
fn aead_invalid(valid: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    for tag in ["aes128gcm", "chacha20poly1305"] {
        let of_name = format!("{tag}-ipv4-voip160");
        let (i, of) = valid
            .iter()
            .enumerate()
            .find(|(_, v)| v["name"] == of_name.as_str())
            .unwrap();
        let suite = CipherSuite::from_id(of["suite_id"].as_u64().unwrap() as u8).unwrap();
        let ks = KeySchedule::from_exporter(suite, &exporter_material(suite, i as u8)).unwrap();
        let assoc = AssociationId(0x5344_5550_0000_0000 | i as u64);
        let base = hex::decode(of["record"].as_str().unwrap()).unwrap();
        let crafted = |nonce: u64, pt: &[u8]| -> Vec<u8> {
            let mut send = SendSession::resume(assoc, &ks, Role::Client, nonce);
            let mut b = vec![0u8; 1024];
            b[record::PREFIX_LEN..record::PREFIX_LEN + pt.len()].copy_from_slice(pt);
            let n = send.seal_in_place(&mut b, pt.len()).unwrap();
            b.truncate(n);
            b
        };
        let fix_len = |mut r: Vec<u8>| {
            let l = (r.len() - record::HEADER_LEN) as u16;
            r[3..5].copy_from_slice(&l.to_be_bytes());
            r
        };
        let mut push = |name: &str, rec: Vec<u8>, expect: &str| {
            out.push(json!({"name": format!("{tag}-{name}"), "of": of_name, "record": hex::encode(rec), "expect": expect}));
        };
        let mut r = base.clone();
        let last = r.len() - 1;
        r[last] ^= 1;
        push("tag-bit-flipped", r, "bad_mac");
        let mut r = base.clone();
        r[record::PREFIX_LEN] ^= 0x80;
        push("ciphertext-bit-flipped", r, "bad_mac");
        let mut r = base.clone();
        r[record::NONCE_OFFSET + 7] ^= 1;
        push("nonce-changed", r, "bad_mac");
        // Cut by one byte with the length field (AAD) fixed up: only the tag can tell.
        push(
            "truncated-length-fixed",
            fix_len(base[..base.len() - 1].to_vec()),
            "bad_mac",
        );
        push(
            "truncated-by-one",
            base[..base.len() - 1].to_vec(),
            "length_mismatch",
        );
        push(
            "tag-only",
            fix_len(base[..record::PREFIX_LEN + 15].to_vec()),
            "truncated",
        );
        let mut r = base.clone();
        r[record::ASSOC_OFFSET] ^= 0xFF;
        push("other-association", r, "unknown_association");
        let mut r = base.clone();
        r[record::NONCE_OFFSET..record::PREFIX_LEN]
            .copy_from_slice(&record::MAX_RECORDS_PER_KEY.to_be_bytes());
        push("nonce-at-limit", r, "nonce_limit");
        let mut r = base.clone();
        r[0] = 0x17;
        push("flag-bit-clear", r, "bad_header");
        push(
            "unknown-atyp",
            crafted(5, &[0x05, 192, 0, 2, 10, 0x13, 0x8c, 0xde, 0xad]),
            "bad_address",
        );
        push("empty-plaintext", crafted(6, &[]), "bad_address");
        push(
            "control-unknown-kind",
            crafted(8, &[0x00, 0x42, 1, 2, 3, 4, 5, 6, 7, 8]),
            "bad_control",
        );
    }
    out
}

fn load() -> Value {
    let text = std::fs::read_to_string(PATH).expect("tests/vectors/records.json is committed");
    serde_json::from_str(&text).unwrap()
}

#[test]
#[ignore = "writes tests/vectors/records.json; run only on a deliberate wire change"]
fn regenerate() {
    if std::env::var_os("SUDP_REGEN_VECTORS").is_none() {
        return;
    }
    let v = generate();
    std::fs::write(PATH, serde_json::to_string_pretty(&v).unwrap() + "\n").unwrap();
}

#[test]
fn committed_vectors_match_the_implementation() {
    // The committed file is the contract: the code must reproduce it byte for byte.
    assert_eq!(
        load(),
        generate(),
        "tests/vectors/records.json differs from what the code produces"
    );
}

#[test]
fn valid_vectors_seal_and_open() {
    let v = load();
    let valid = v["valid"].as_array().unwrap();
    assert!(valid.len() >= 9);
    for c in valid {
        let name = c["name"].as_str().unwrap();
        let suite = CipherSuite::from_id(c["suite_id"].as_u64().unwrap() as u8).unwrap();
        let assoc = AssociationId(u64::from_str_radix(c["assoc_id"].as_str().unwrap(), 16).unwrap());
        assert_eq!(
            hex::encode(KeySchedule::exporter_context(assoc, suite)),
            c["exporter_context"].as_str().unwrap()
        );
        let material = hex::decode(c["exporter_output"].as_str().unwrap()).unwrap();
        let ks = KeySchedule::from_exporter(suite, &material).unwrap();
        let sender = if c["direction"] == "c2g" {
            Role::Client
        } else {
            Role::Gateway
        };
        let receiver = if sender == Role::Client {
            Role::Gateway
        } else {
            Role::Client
        };
        let (k, _) = ks.for_role(sender);
        assert_eq!(hex::encode(k.enc()), c["enc_key"].as_str().unwrap(), "{name}");
        assert_eq!(hex::encode(k.mac()), c["mac_key"].as_str().unwrap(), "{name}");
        assert_eq!(hex::encode(k.iv()), c["iv_key"].as_str().unwrap(), "{name}");
        let nonce = c["nonce"].as_u64().unwrap();
        let addr = addr_from_json(&c["address"]);
        let payload = hex::decode(c["payload"].as_str().unwrap()).unwrap();
        let want = hex::decode(c["record"].as_str().unwrap()).unwrap();

        let mut send = SendSession::resume(assoc, &ks, sender, nonce);
        let mut buf = vec![0u8; record::MAX_DATAGRAM];
        let n = send.seal(&addr.as_ref(), &payload, &mut buf).unwrap();
        assert_eq!(&buf[..n], &want[..], "{name}: sealed bytes");

        let mut recv = RecvSession::new(assoc, &ks, receiver, 1024);
        let mut rec = want.clone();
        let o = recv.open(&mut rec).unwrap();
        assert_eq!(o.nonce, nonce);
        let (o_addr, o_payload) = o.data().unwrap();
        assert_eq!(o_addr.to_owned(), addr);
        assert_eq!(o_payload, &payload[..]);
        let mut again = want.clone();
        assert_eq!(
            recv.open(&mut again).unwrap_err(),
            OpenError::Duplicate { nonce },
            "{name}: replay"
        );
    }
}

#[test]
fn invalid_vectors_are_refused_for_the_stated_reason() {
    let v = load();
    let invalid = v["invalid"].as_array().unwrap();
    assert!(invalid.len() >= 10);
    for name in [
        "padding-byte-zero",
        "unknown-atyp",
        "control-unknown-kind",
        "left-of-window",
    ] {
        assert!(invalid.iter().any(|c| c["name"] == name), "{name} missing");
    }
    for c in invalid {
        // Each invalid record is refused by the receiver of the vector it was made from.
        let of = v["valid"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == c["of"])
            .unwrap();
        let suite = CipherSuite::from_id(of["suite_id"].as_u64().unwrap() as u8).unwrap();
        let assoc = AssociationId(u64::from_str_radix(of["assoc_id"].as_str().unwrap(), 16).unwrap());
        let material = hex::decode(of["exporter_output"].as_str().unwrap()).unwrap();
        let ks = KeySchedule::from_exporter(suite, &material).unwrap();
        let mut rec = hex::decode(c["record"].as_str().unwrap()).unwrap();
        let mut recv = RecvSession::new(assoc, &ks, Role::Gateway, 1024);
        // Records the receiver accepts first (e.g. to move the window).
        for first in c["after"].as_array().into_iter().flatten() {
            let mut first = hex::decode(first.as_str().unwrap()).unwrap();
            recv.open(&mut first).unwrap();
        }
        let err = recv.open(&mut rec).unwrap_err();
        assert_eq!(
            err.reason().name(),
            c["expect"].as_str().unwrap(),
            "{}",
            c["name"]
        );
    }
}
