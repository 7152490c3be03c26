//! Record-layer benchmarks: seal and open against the raw primitives in the same run.
//!
//! `cargo bench --bench record` measures, for each payload size,
//!
//! * `seal/N`: `Sealer::seal` (copy in, pad, derive IV, AES-CBC, HMAC-SHA256, header);
//! * `raw_seal/N`: AES-CBC encrypt + HMAC-SHA256 over the same number of bytes with
//!   prebuilt keyed states, nothing else;
//! * `open/N`: `RecvSession::open` (header, replay check, constant-time tag check, commit,
//!   IV, AES-CBC decrypt, unpad, address parse);
//! * `raw_open/N`: HMAC-SHA256 verify + AES-CBC decrypt of the same bytes;
//!
//! then prints the framing overhead as the ratio seal/raw_seal and open/raw_open.
//! `record_many` seals a train of `INTERLEAVE` records one by one and together
//! (`seal_many_in_place`: interleaved CBC chains, tags in lockstep), and checks their tags one
//! by one and together (`Opener::verify_many`). The replay window's check+commit is measured
//! for in-order and reordered nonces.
//!
//! `suites` puts the AEAD suites (AES-128-GCM, ChaCha20-Poly1305, `ring`) beside
//! AES-128-CBC + HMAC-SHA256 in one group: `seal/SUITE/N` (`Sealer::seal`), `open/SUITE/N`
//! (`RecvSession::open`) for 64, 200 and 1200-byte payloads, and trains of `INTERLEAVE`
//! records: `train_seal/SUITE/8xN` (`SendSession::seal_many_in_place`) and
//! `train_open/SUITE/8xN` (`RecvSession::verify_run` then `open_verified`, the relay's path),
//! then prints ns per record side by side.

use std::hint::black_box;
use std::time::Duration;

use aes::cipher::consts::U16;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::inout::InOutBuf;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, InnerIvInit, KeyInit};
use aes::Aes128;
use criterion::{BatchSize, Criterion, Throughput};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sudp::proto::keys::{AssociationId, CipherSuite, KeySchedule, Role};
use sudp::proto::record::{self, Sealer};
use sudp::proto::replay::ReplayWindow;
use sudp::proto::session::{RecvSession, SendSession};
use sudp::proto::socks::AddrRef;

const SIZES: [usize; 6] = [64, 200, 512, 1200, 1400, 8192];
type Block = GenericArray<u8, U16>;

fn schedule() -> KeySchedule {
    let suite = CipherSuite::Aes128CbcHmacSha256;
    let m: Vec<u8> = (0..suite.exporter_len()).map(|i| (i * 13) as u8).collect();
    KeySchedule::from_exporter(suite, &m).expect("exporter length matches the suite")
}

/// Plaintext length of a record carrying `payload` bytes to an IPv4 target.
fn plaintext_len(payload: usize) -> usize {
    payload + 7
}

fn bench_records(c: &mut Criterion) {
    let ks = schedule();
    let assoc = AssociationId(7);
    let dst = AddrRef::Ip("192.0.2.1:5004".parse().expect("literal address"));
    let sealer = Sealer::new(assoc, ks.for_role(Role::Client).0);
    let aes = Aes128::new_from_slice(ks.c2g.enc()).expect("16-byte key");
    let mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new_from_slice(ks.c2g.mac()).expect("any key length");
    let iv = Block::default();

    let mut g = c.benchmark_group("record");
    g.measurement_time(Duration::from_secs(2));
    g.warm_up_time(Duration::from_millis(500));
    for size in SIZES {
        let pt_len = plaintext_len(size);
        let rec_len = record::record_len(pt_len);
        let ct_len = rec_len - record::PREFIX_LEN - record::TAG_LEN;
        g.throughput(Throughput::Bytes(size as u64));

        let mut plaintext = vec![0u8; pt_len];
        dst.encode(&mut plaintext).expect("buffer is large enough");
        let mut out = vec![0u8; rec_len];
        let mut nonce = 0u64;
        g.bench_function(format!("seal/{size}"), |b| {
            b.iter(|| {
                nonce += 1;
                black_box(sealer.seal(nonce, black_box(&plaintext), &mut out).expect("fits"))
            })
        });

        let mut raw = vec![0x42u8; ct_len + record::TAG_LEN];
        g.bench_function(format!("raw_seal/{size}"), |b| {
            b.iter(|| {
                let (data, tag) = raw.split_at_mut(ct_len);
                let (blocks, _) = InOutBuf::from(&mut *data).into_chunks::<U16>();
                cbc::Encryptor::<&Aes128>::inner_iv_init(&aes, &iv).encrypt_blocks_inout_mut(blocks);
                let mut m = mac.clone();
                m.update(data);
                tag.copy_from_slice(&m.finalize().into_bytes()[..16]);
                black_box(&raw);
            })
        });

        // Records for the open benchmark: one per nonce so the replay window accepts each.
        // From nonce 0: the bench's door (feature `test-doors`), since `ks` also builds
        // the receivers below.
        let mut send = SendSession::resume(assoc, &ks, Role::Client, 0);
        let payload = vec![0x17u8; size];
        g.bench_function(format!("open/{size}"), |b| {
            let mut recv = RecvSession::new(assoc, &ks, Role::Gateway, 1024);
            b.iter_batched_ref(
                || {
                    let mut r = vec![0u8; rec_len];
                    send.seal(&dst, &payload, &mut r).expect("fits");
                    r
                },
                |r| {
                    black_box(recv.open(r).expect("valid record").data().map(|d| d.1.len()));
                },
                BatchSize::SmallInput,
            )
        });

        let mut m = mac.clone();
        m.update(&raw[..ct_len]);
        let tag: Vec<u8> = m.finalize().into_bytes()[..16].to_vec();
        raw[ct_len..].copy_from_slice(&tag);
        g.bench_function(format!("raw_open/{size}"), |b| {
            b.iter_batched_ref(
                || raw.clone(),
                |r| {
                    let (data, tag) = r.split_at_mut(ct_len);
                    let mut m = mac.clone();
                    m.update(data);
                    m.verify_truncated_left(tag).expect("tag matches");
                    let (blocks, _) = InOutBuf::from(&mut *data).into_chunks::<U16>();
                    cbc::Decryptor::<&Aes128>::inner_iv_init(&aes, &iv).decrypt_blocks_inout_mut(blocks);
                    black_box(&r[0]);
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// Eight 1200-byte records sealed one by one against the interleaved multi-record seal.
fn bench_many(c: &mut Criterion) {
    let ks = schedule();
    let sealer = Sealer::new(AssociationId(7), ks.for_role(Role::Client).0);
    let mut g = c.benchmark_group("record_many");
    g.measurement_time(Duration::from_secs(2));
    g.warm_up_time(Duration::from_millis(500));
    let n = record::INTERLEAVE;
    for size in [200usize, 1200] {
        let pt = plaintext_len(size);
        let stride = record::record_len(pt);
        let offsets: Vec<usize> = (0..n).map(|i| i * stride).collect();
        let pts = vec![pt; n];
        let mut lens = vec![0usize; n];
        let mut buf = vec![0x33u8; n * stride];
        g.throughput(Throughput::Bytes((size * n) as u64));
        let mut nonce = 0u64;
        g.bench_function(format!("one_by_one/{n}x{size}"), |b| {
            b.iter(|| {
                for &o in &offsets {
                    nonce += 1;
                    black_box(sealer.seal_in_place(nonce, &mut buf[o..], pt).expect("fits"));
                }
            })
        });
        g.bench_function(format!("interleaved/{n}x{size}"), |b| {
            b.iter(|| {
                nonce += n as u64;
                sealer
                    .seal_many_in_place(nonce, &mut buf, &offsets, &pts, &mut lens)
                    .expect("fits");
                black_box(&buf);
            })
        });
        // The receiving side's tag checks: one by one, and a train's together.
        let opener = record::Opener::new(AssociationId(7), ks.for_role(Role::Client).0);
        let records: Vec<&[u8]> = offsets.iter().zip(&lens).map(|(&o, &l)| &buf[o..o + l]).collect();
        g.bench_function(format!("verify_one_by_one/{n}x{size}"), |b| {
            b.iter(|| {
                for r in &records {
                    opener.verify(black_box(r)).expect("authentic");
                }
            })
        });
        let mut ok = vec![false; n];
        g.bench_function(format!("verify_many/{n}x{size}"), |b| {
            b.iter(|| {
                opener.verify_many(black_box(&records), &mut ok);
                assert!(ok.iter().all(|&v| v));
            })
        });
    }
    g.finish();
}

const SUITES: [CipherSuite; 3] = [
    CipherSuite::Aes128CbcHmacSha256,
    CipherSuite::Aes128Gcm,
    CipherSuite::ChaCha20Poly1305,
];
const SUITE_SIZES: [usize; 3] = [64, 200, 1200];

fn schedule_of(suite: CipherSuite) -> KeySchedule {
    let m: Vec<u8> = (0..suite.exporter_len()).map(|i| (i * 13) as u8).collect();
    KeySchedule::from_exporter(suite, &m).expect("exporter length matches the suite")
}

/// Every suite's seal, open and trains, in one group and one run.
fn bench_suites(c: &mut Criterion) {
    let assoc = AssociationId(7);
    let dst = AddrRef::Ip("192.0.2.1:5004".parse().expect("literal address"));
    let mut g = c.benchmark_group("suites");
    g.measurement_time(Duration::from_secs(2));
    g.warm_up_time(Duration::from_millis(500));
    for suite in SUITES {
        let ks = schedule_of(suite);
        let sealer = Sealer::new(assoc, ks.for_role(Role::Client).0);
        for size in SUITE_SIZES {
            let pt_len = plaintext_len(size);
            let rec_len = suite.record_len(pt_len);
            g.throughput(Throughput::Bytes(size as u64));
            let mut plaintext = vec![0u8; pt_len];
            dst.encode(&mut plaintext).expect("buffer is large enough");
            let mut out = vec![0u8; rec_len];
            let mut nonce = 0u64;
            g.bench_function(format!("seal/{suite}/{size}"), |b| {
                b.iter(|| {
                    nonce += 1;
                    black_box(sealer.seal(nonce, black_box(&plaintext), &mut out).expect("fits"))
                })
            });
            let mut send = SendSession::resume(assoc, &ks, Role::Client, 0);
            let payload = vec![0x17u8; size];
            g.bench_function(format!("open/{suite}/{size}"), |b| {
                let mut recv = RecvSession::new(assoc, &ks, Role::Gateway, 1024);
                b.iter_batched_ref(
                    || {
                        let mut r = vec![0u8; rec_len];
                        send.seal(&dst, &payload, &mut r).expect("fits");
                        r
                    },
                    |r| {
                        black_box(recv.open(r).expect("valid record").data().map(|d| d.1.len()));
                    },
                    BatchSize::SmallInput,
                )
            });
        }
        let n = record::INTERLEAVE;
        for size in [200usize, 1200] {
            let pt = plaintext_len(size);
            let stride = suite.record_len(pt);
            let offsets: Vec<usize> = (0..n).map(|i| i * stride).collect();
            let pts = vec![pt; n];
            let mut lens = vec![0usize; n];
            let mut buf = vec![0x33u8; n * stride];
            g.throughput(Throughput::Bytes((size * n) as u64));
            let mut send = SendSession::resume(assoc, &ks, Role::Client, 0);
            g.bench_function(format!("train_seal/{suite}/{n}x{size}"), |b| {
                b.iter(|| {
                    send.seal_many_in_place(&mut buf, &offsets, &pts, &mut lens)
                        .expect("fits");
                    black_box(&buf);
                })
            });
            let mut send = SendSession::resume(assoc, &ks, Role::Client, 0);
            g.bench_function(format!("train_open/{suite}/{n}x{size}"), |b| {
                let mut recv = RecvSession::new(assoc, &ks, Role::Gateway, 1024);
                b.iter_batched_ref(
                    || {
                        let mut train = vec![0u8; n * stride];
                        for &o in &offsets {
                            // An IPv4 address header, then a zero payload.
                            train[o + record::PREFIX_LEN..o + record::PREFIX_LEN + 7]
                                .copy_from_slice(&[1, 192, 0, 2, 1, 0x13, 0x8c]);
                        }
                        send.seal_many_in_place(&mut train, &offsets, &pts, &mut lens)
                            .expect("fits");
                        train
                    },
                    |train| {
                        let mut runs: Vec<&mut [u8]> = train.chunks_mut(stride).collect();
                        let mut tags = vec![None; n];
                        recv.verify_run(&runs, &mut tags);
                        for (r, t) in runs.iter_mut().zip(tags) {
                            let o = match t {
                                Some(ok) => recv.open_verified(r, ok),
                                None => recv.open(r),
                            };
                            black_box(o.expect("valid record").nonce);
                        }
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

fn print_suites() {
    println!("\nSuites (same run): ns per record");
    print!("{:>24}", "");
    for suite in SUITES {
        print!(" {:>22}", suite.name());
    }
    println!();
    let mut rows: Vec<(String, f64)> = Vec::new();
    for size in SUITE_SIZES {
        rows.push((format!("seal/{size}"), 1.0));
        rows.push((format!("open/{size}"), 1.0));
    }
    for size in [200usize, 1200] {
        let n = record::INTERLEAVE;
        rows.push((format!("train_seal/{n}x{size}"), n as f64));
        rows.push((format!("train_open/{n}x{size}"), n as f64));
    }
    for (row, per) in rows {
        let (kind, rest) = row.split_once('/').expect("kind/size");
        print!("{row:>24}");
        for suite in SUITES {
            match mean_ns("suites", &format!("{kind}/{suite}/{rest}")) {
                Some(ns) => print!(" {:>22.0}", ns / per),
                None => print!(" {:>22}", "-"),
            }
        }
        println!();
    }
}

fn bench_window(c: &mut Criterion) {
    let mut g = c.benchmark_group("replay");
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(1));
    for size in [1024usize, 8192] {
        g.bench_function(format!("in_order/{size}"), |b| {
            let mut w = ReplayWindow::new(size);
            let mut n = 0u64;
            b.iter(|| {
                n += 1;
                black_box(w.check_and_commit(n).is_ok())
            })
        });
        g.bench_function(format!("reordered/{size}"), |b| {
            let mut w = ReplayWindow::new(size);
            let mut n = 0u64;
            b.iter(|| {
                n += 1;
                // Pairs swapped, every 16th arrives 100 late: a realistic jittery stream.
                let k = if n % 16 == 0 { n.saturating_sub(100) } else { n ^ 1 };
                black_box(w.check_and_commit(k).is_ok())
            })
        });
    }
    g.finish();
}

/// Mean time of a finished benchmark, read from criterion's estimates.
fn mean_ns(group: &str, id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!(
        "{dir}/criterion/{group}/{}/new/estimates.json",
        id.replace('/', "_")
    );
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn print_ratios() {
    println!("\nFraming overhead (same run): record time / raw primitives time");
    println!(
        "{:>6}  {:>10} {:>10} {:>6}   {:>10} {:>10} {:>6}",
        "bytes", "seal ns", "raw ns", "ratio", "open ns", "raw ns", "ratio"
    );
    for size in SIZES {
        let get = |k: &str| mean_ns("record", &format!("{k}/{size}"));
        if let (Some(s), Some(rs), Some(o), Some(ro)) =
            (get("seal"), get("raw_seal"), get("open"), get("raw_open"))
        {
            println!(
                "{size:>6}  {s:>10.0} {rs:>10.0} {:>6.3}   {o:>10.0} {ro:>10.0} {:>6.3}",
                s / rs,
                o / ro
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_records(&mut c);
    bench_many(&mut c);
    bench_suites(&mut c);
    bench_window(&mut c);
    c.final_summary();
    print_ratios();
    print_suites();
}
