//! Secure UDP through the gateway with the library client.

mod common;

use std::net::SocketAddr;

use common::*;
use std::time::Duration;
use sudp::client::SecureUdp;
use sudp::proto::socks::{AddrRef, Address};
use sudp::proto::DropReason;

#[tokio::test]
async fn secure_udp_echo_ipv4_ipv6_and_domain() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo4 = udp_echo().await;
    let echo6 = udp_echo_on("[::1]:0").await;
    let udp = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    let targets = [
        Address::Ip(echo4),
        Address::Ip(echo6),
        Address::Domain("localhost".into(), echo4.port()),
    ];
    let mut buf = vec![0u8; 65_536];
    for t in &targets {
        for size in [1usize, 160, 1200, 8192, 60_000] {
            let payload: Vec<u8> = (0..size).map(|i| (i * 31 + size) as u8).collect();
            udp.send_to(&payload, t).await.unwrap();
            let (n, from) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], &payload[..], "{t} {size}");
            let want: SocketAddr = match t {
                Address::Ip(a) => *a,
                Address::Domain(..) => echo4,
            };
            assert_eq!(from, Address::Ip(want));
        }
    }
    assert_eq!(gw.metrics.total_drops(), 0, "{}", gw.metrics.drop_summary());
    drop(udp);
    gw.stop().await;
}

#[tokio::test]
async fn malformed_datagrams_are_dropped_counted_and_hurt_no_one() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let udp = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    udp.send_to(b"first", &Address::Ip(echo)).await.unwrap();
    let mut buf = vec![0u8; 2048];
    tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();

    // Malformed datagrams from a second socket on the same IP.
    let raw = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rec = vec![0u8; 256];
    rec[0] = 0x97;
    rec[1] = 3;
    rec[2] = 3;
    raw.send_to(&rec[..60], gw.relay).await.unwrap(); // length mismatch
    raw.send_to(&[0x42; 30], gw.relay).await.unwrap(); // unknown kind
    eventually(|| gw.metrics.drops(DropReason::LengthMismatch) == 1).await;
    eventually(|| gw.metrics.drops(DropReason::UnknownKind) == 1).await;

    // The association still works.
    udp.send_to(b"second", &Address::Ip(echo)).await.unwrap();
    let (n, _) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"second");
    gw.stop().await;
}

/// A real record captured and sent again is refused by the gateway's replay window, and a
/// reordered (older but unseen) record is still accepted.
#[tokio::test]
async fn gateway_refuses_replayed_records_and_accepts_reordered_ones() {
    use sudp::proto::Role;

    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let RawSecure {
        control,
        assoc,
        keys,
        socket: sock,
        relay,
    } = raw_secure(&gw, &pki).await;
    let (mut send, mut recv) = keys.into_sessions(assoc, Role::Client, 1024);
    let mut records = Vec::new();
    for i in 0..3u8 {
        let mut b = vec![0u8; 256];
        let n = send.seal(&Address::Ip(echo).as_ref(), &[i; 10], &mut b).unwrap();
        b.truncate(n);
        records.push(b);
    }
    // Send 2, then 0 (reordered), then 2 again and 0 again (replays), then 1.
    for i in [2usize, 0, 2, 0, 1] {
        sock.send_to(&records[i], relay).await.unwrap();
    }
    // Which records came back, not only how many: each echo is opened with the client's
    // keys, and the payloads must be exactly records 0, 1 and 2, each once, from the echo,
    // under g2c nonces 0, 1 and 2 (the gateway sealed three replies and no more).
    let mut payloads = Vec::new();
    let mut nonces = Vec::new();
    let mut buf = [0u8; 512];
    for _ in 0..3 {
        let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let opened = recv.open(&mut buf[..n]).unwrap();
        let (from, payload) = opened.data().expect("a data record");
        assert_eq!(from.to_owned(), Address::Ip(echo));
        payloads.push(payload.to_vec());
        nonces.push(opened.nonce);
    }
    payloads.sort();
    assert_eq!(payloads, vec![vec![0u8; 10], vec![1u8; 10], vec![2u8; 10]]);
    nonces.sort_unstable();
    assert_eq!(nonces, vec![0, 1, 2]);
    eventually(|| gw.metrics.drops(DropReason::Duplicate) == 2).await;
    assert_eq!(gw.metrics.forwarded.load(std::sync::atomic::Ordering::Relaxed), 3);
    // And no fourth reply: a replay that slipped through would be echoed once more.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf))
            .await
            .is_err(),
        "a replayed record was forwarded and echoed"
    );
    drop(control);
    gw.stop().await;
}

/// A target that answers one datagram with a burst: the gateway sends the burst as a GSO
/// train, and the library client must still see every record on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_replies_arrive_as_separate_records() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let burst = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = burst.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = burst.recv_from(&mut buf).await {
            for i in 0..40u8 {
                let _ = burst.send_to(&[i; 1200], from).await;
            }
        }
    });
    let udp = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    udp.send_to(b"go", &Address::Ip(target)).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let mut seen = Vec::new();
    while seen.len() < 40 {
        let (n, _) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("only {} of 40 replies arrived", seen.len()))
            .unwrap();
        assert_eq!(n, 1200);
        seen.push(buf[0]);
    }
    seen.sort();
    assert_eq!(seen, (0..40).collect::<Vec<u8>>());
    gw.stop().await;
}

/// Records that arrive as one train (a GSO send, read back as one GRO buffer) are verified
/// together; a forged record or a replay inside the train is dropped and counted as it would
/// be alone, and its neighbours go through.
#[tokio::test]
async fn forged_and_replayed_records_inside_a_train_are_dropped_alone() {
    use sudp::net::batch::{BatchSocket, GsoBatch};
    use sudp::proto::Role;

    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let RawSecure {
        control,
        assoc,
        keys,
        socket,
        relay,
    } = raw_secure(&gw, &pki).await;
    let sock = BatchSocket::new(socket).unwrap();
    let (mut send, mut recv) = keys.into_sessions(assoc, Role::Client, 64);
    let mut records: Vec<Vec<u8>> = (0..7u8)
        .map(|i| {
            let mut b = vec![0u8; 512];
            let n = send.seal(&Address::Ip(echo).as_ref(), &[i; 300], &mut b).unwrap();
            b.truncate(n);
            b
        })
        .collect();
    let len = records[0].len();
    records[2][len - 3] ^= 0x10; // tag
    records[5][40] ^= 0x01; // ciphertext
    records.push(records[1].clone()); // replay of record 1, in the same train
    let mut train = GsoBatch::new(sock.max_gso_segments());
    for r in &records {
        if !train.fits(relay, r.len()) {
            let (d, b, s) = train.pending().unwrap();
            sock.send(d, b, s).await.unwrap();
            train.clear();
        }
        train.push(relay, r);
    }
    let (d, b, s) = train.pending().unwrap();
    sock.send(d, b, s).await.unwrap();

    let mut got = Vec::new();
    let mut batch = sudp::net::batch::RecvBatch::default();
    while got.len() < 5 {
        tokio::time::timeout(WAIT, sock.recv_batch(&mut batch))
            .await
            .expect("the neighbours of the bad records come back")
            .unwrap();
        batch.for_each(|rec, _| {
            let o = recv.open(rec).expect("the gateway's replies open");
            assert_eq!(o.data().unwrap().1.len(), 300);
            got.push(o.data().unwrap().1[0]);
        });
    }
    got.sort_unstable();
    assert_eq!(got, [0, 1, 3, 4, 6]);
    eventually(|| gw.metrics.drops(DropReason::BadMac) == 2 && gw.metrics.drops(DropReason::Duplicate) == 1)
        .await;
    assert_eq!(gw.metrics.forwarded.load(std::sync::atomic::Ordering::Relaxed), 5);
    drop(control);
    gw.stop().await;
}

/// No loss inside the gateway goes uncounted: with a deliberately tiny relay receive buffer
/// (`udp_buffer`), a burst overflows the relay socket, and the kernel's drops are counted, so
/// that every datagram sent is either forwarded or counted as dropped, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_socket_overflow_is_counted_exactly() {
    use std::sync::atomic::Ordering;
    let pki = pki();
    let mut s = settings(&pki);
    s.udp_buffer = 1; // the kernel's minimum: a couple of datagrams
    s.workers = 1;
    let gw = TestGateway::start(s).await;
    let raw = raw_secure(&gw, &pki).await;
    // The target: counts what arrives (a large buffer, so it drops nothing itself).
    let sink = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_recv_buffer_size(4 << 20).unwrap();
        s.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into())
            .unwrap();
        s.set_nonblocking(true).unwrap();
        tokio::net::UdpSocket::from_std(s.into()).unwrap()
    };
    let target = sink.local_addr().unwrap();
    let RawSecure {
        control,
        assoc,
        keys,
        socket,
        relay,
    } = raw;
    let (mut send, _) = keys.into_sessions(assoc, sudp::proto::Role::Client, 1024);
    const N: u64 = 5000;
    let mut rec = vec![0u8; 2048];
    for i in 0..N {
        let n = send
            .seal(&AddrRef::Ip(target), &i.to_be_bytes().repeat(100), &mut rec)
            .unwrap();
        socket.send_to(&rec[..n], relay).await.unwrap();
    }
    let m = gw.metrics.clone();
    let accounted = || m.forwarded.load(Ordering::Relaxed) + m.total_drops() + m.socket_drops.relay.total();
    eventually(|| accounted() == N).await;
    let kernel = m.socket_drops.relay.total();
    let forwarded = m.forwarded.load(Ordering::Relaxed);
    let mut arrived = 0u64;
    let mut buf = [0u8; 2048];
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if sink.recv(&mut buf).await.is_ok() {
                arrived += 1;
            }
        }
    })
    .await;
    eprintln!(
        "relay overflow: sent {N}, forwarded {forwarded}, kernel drops at the relay socket \
         {kernel}, other drops {}, arrived {arrived}; exit line: {}",
        m.total_drops(),
        m.drop_summary()
    );
    assert!(kernel > 0, "the burst did not overflow the tiny buffer");
    assert_eq!(forwarded + kernel + m.total_drops(), N);
    assert_eq!(arrived, forwarded);
    assert!(m.drop_summary().contains(&format!("kernel_relay={kernel}")));
    let text = sudp::metrics::export::Exporter::new("sudp_gateway", m.clone(), Vec::new()).render();
    assert!(
        text.contains(&format!(
            "sudp_gateway_kernel_dropped_datagrams_total{{socket=\"relay\"}} {kernel}"
        )),
        "{text}"
    );
    drop(control);
    gw.stop().await;
}

/// What the gateway counts as returned: datagrams and payload bytes, in all and on `path`.
fn returned(gw: &TestGateway, path: sudp::metrics::Path) -> (u64, u64, u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = &gw.metrics;
    let p = &m.returned_by[path as usize];
    (
        m.returned.load(Relaxed),
        m.returned_bytes.load(Relaxed),
        p.datagrams.load(Relaxed),
        p.bytes.load(Relaxed),
    )
}

/// A secure association on `transport` and a target on 127.0.0.1 that has heard from it
/// once: the association, the target's socket and address, and the address the target saw
/// (the association's outbound socket at the gateway).
async fn association_and_target(
    gw: &TestGateway,
    pki: &sudp::cert::DevPki,
    transport: sudp::client::Transport,
) -> (SecureUdp, tokio::net::UdpSocket, Address, SocketAddr) {
    let mut opts = gw.options(pki);
    opts.transport = transport;
    let udp = SecureUdp::connect(&opts).await.unwrap();
    let target = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = Address::Ip(target.local_addr().unwrap());
    udp.send_to(b"go", &to).await.unwrap();
    let mut buf = [0u8; 64];
    let (_, outbound) = tokio::time::timeout(WAIT, target.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    (udp, target, to, outbound)
}

/// Replies inside TLS that pile up while the application is not reading are all delivered
/// by `recv_batch`, however many wait: it takes at most a batch per call and leaves the rest
/// queued for the next (a record taken from the queue at the bound used to be thrown away,
/// uncounted: one in 33 of a backlog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_replies_inside_tls_is_delivered_whole() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let (udp, target, _, outbound) = association_and_target(&gw, &pki, sudp::client::Transport::Tls).await;
    assert!(udp.via_tls());
    // Within the control channel's queues (512 records each way).
    const N: u16 = 300;
    let before = returned(&gw, sudp::metrics::Path::Tls).2;
    for i in 0..N {
        target.send_to(&i.to_be_bytes(), outbound).await.unwrap();
        if i % 50 == 49 {
            // The gateway's reply task and outbound socket keep up (its 208 KiB default
            // buffer would hold them anyway).
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }
    eventually(|| returned(&gw, sudp::metrics::Path::Tls).2 - before == u64::from(N)).await;
    // Every record read off the connection into the association's queue before the first
    // receive (bounded: the queue's length cannot be seen from here).
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut batch = sudp::net::batch::RecvBatch::default();
    let mut got = Vec::new();
    let (mut calls, mut most) = (0, 0);
    while got.len() < usize::from(N) {
        let n = tokio::time::timeout(
            WAIT,
            udp.recv_batch(&mut batch, &mut |d: &[u8], _: &Address| {
                got.push(u16::from_be_bytes([d[0], d[1]]))
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("{} of {N} replies delivered", got.len()))
        .unwrap();
        assert!(n <= sudp::net::batch::BATCH, "at most a batch per call: {n}");
        most = most.max(n);
        calls += 1;
    }
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "every reply, in order");
    assert!(calls >= usize::from(N) / sudp::net::batch::BATCH, "{calls} calls");
    // And a backlog is taken in batches, not a record per call.
    assert!(most > 1, "one record per call");
    gw.stop().await;
}

/// The restricted cone remembers every destination an association sent to (within its
/// bound), not only the latest: each of three targets answers after the client has sent
/// to all three, oldest first, and every answer arrives from its target. The gateway
/// counts exactly those datagrams and payload bytes as returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_destination_sent_to_may_answer_later() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let udp = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    let mut targets = Vec::new();
    for _ in 0..3 {
        targets.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    let mut buf = vec![0u8; 2048];
    let mut outbound = None;
    for t in &targets {
        udp.send_to(b"hello", &Address::Ip(t.local_addr().unwrap()))
            .await
            .unwrap();
        let (_, from) = tokio::time::timeout(WAIT, t.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        outbound = Some(from);
    }
    let outbound = outbound.unwrap();
    let mut bytes = 0;
    for (i, t) in targets.iter().enumerate() {
        let answer = format!("answer from target {i}");
        bytes += answer.len() as u64;
        t.send_to(answer.as_bytes(), outbound).await.unwrap();
        let (n, from) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], answer.as_bytes());
        assert_eq!(from, Address::Ip(t.local_addr().unwrap()));
    }
    assert_eq!(gw.metrics.drops(DropReason::UnsolicitedReply), 0);
    assert_eq!(returned(&gw, sudp::metrics::Path::Secure), (3, bytes, 3, bytes));
}

/// Replies of two sizes that reach the gateway together leave in several trains (a train
/// is one size), sent without waiting while the batch lasts: none is lost, the association
/// goes on, and the counters hold exactly what was returned. Then the same inside TLS
/// (records as RECORD frames), whose counters are kept apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_of_mixed_sizes_arriving_together_all_arrive() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    for transport in [sudp::client::Transport::Udp, sudp::client::Transport::Tls] {
        let (udp, target, to, outbound) = association_and_target(&gw, &pki, transport).await;
        let mut buf = vec![0u8; 2048];
        let path = if udp.via_tls() {
            sudp::metrics::Path::Tls
        } else {
            sudp::metrics::Path::Secure
        };
        let before = returned(&gw, path);
        const N: usize = 24;
        let mut bytes = 0u64;
        for i in 0..N {
            let size = if i % 2 == 0 { 100 } else { 300 };
            let d: Vec<u8> = (0..size).map(|k| (k + i) as u8).collect();
            bytes += size as u64;
            target.send_to(&d, outbound).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < N {
            let (n, _) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{transport:?}: {} of {N} replies", got.len()))
                .unwrap();
            got.push(buf[..n].to_vec());
        }
        for (i, d) in got.iter().enumerate() {
            let size = if i % 2 == 0 { 100 } else { 300 };
            assert_eq!(d.len(), size, "{transport:?}: reply {i}");
            assert_eq!(d[0], i as u8, "{transport:?}: reply {i} in order");
        }
        let after = returned(&gw, path);
        assert_eq!(
            (
                after.0 - before.0,
                after.1 - before.1,
                after.2 - before.2,
                after.3 - before.3
            ),
            (N as u64, bytes, N as u64, bytes),
            "{transport:?}: counted as returned"
        );
        // The association goes on.
        udp.send_to(b"still there?", &to).await.unwrap();
        let (n, _) = tokio::time::timeout(WAIT, target.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"still there?");
        target.send_to(b"yes", outbound).await.unwrap();
        let (n, _) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"yes");
    }
    for r in DropReason::ALL {
        assert_eq!(gw.metrics.drops(r), 0, "{r:?}");
    }
}

/// Each association's datagrams leave from its own outbound port, even when records of two
/// associations to one target, of one size, reach the gateway together (one receive batch):
/// the target sees exactly one source port per association, never one carrying the other's
/// datagrams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_associations_to_one_target_each_leave_from_their_own_port() {
    const EACH: usize = 300;
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let a = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    let b = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    let target = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Room for every datagram (2 x 300 small ones) however late the test reads.
    sudp::net::set_recv_buffer(&target, 4 << 20).unwrap();
    let to = Address::Ip(target.local_addr().unwrap());
    // Interleaved and without waiting, so that the relay reads both kinds in one batch.
    for i in 0..EACH {
        a.send_to(format!("a{i:04}").as_bytes(), &to).await.unwrap();
        b.send_to(format!("b{i:04}").as_bytes(), &to).await.unwrap();
    }
    let mut from: std::collections::HashMap<u8, std::collections::HashSet<std::net::SocketAddr>> =
        Default::default();
    let mut buf = [0u8; 64];
    for _ in 0..2 * EACH {
        let (n, src) = tokio::time::timeout(WAIT, target.recv_from(&mut buf))
            .await
            .expect("every datagram arrives")
            .unwrap();
        assert_eq!(n, 5);
        from.entry(buf[0]).or_default().insert(src);
    }
    let (pa, pb) = (&from[&b'a'], &from[&b'b']);
    assert_eq!((pa.len(), pb.len()), (1, 1), "a from {pa:?}, b from {pb:?}");
    assert_ne!(pa, pb);
    assert_eq!(gw.metrics.total_drops(), 0, "{}", gw.metrics.drop_summary());
    gw.stop().await;
}

/// A secure association built from the library's parts whose control connection speaks
/// RECORD frames (its HELLO sent), with the association's own client sessions, so that a
/// test picks each record's nonce and path.
struct RecordsClient {
    control: sudp::client::Control,
    socket: tokio::net::UdpSocket,
    relay: SocketAddr,
    tx: sudp::proto::session::SendSession,
    rx: sudp::proto::session::RecvSession,
}

impl RecordsClient {
    async fn open(gw: &TestGateway, pki: &sudp::cert::DevPki) -> RecordsClient {
        use sudp::proto::frame::{feature, Frame, Hello};
        use tokio::io::AsyncWriteExt;
        let RawSecure {
            mut control,
            assoc,
            keys,
            socket,
            relay,
        } = raw_secure_announcing(gw, pki, true).await;
        let mut hello = Vec::new();
        Frame::Hello(Hello {
            version: 1,
            ping_interval_ms: 0,
            features: vec![feature::RECORDS],
        })
        .encode(&mut hello)
        .unwrap();
        control.write_all(&hello).await.unwrap();
        let (tx, rx) = keys.into_sessions(assoc, sudp::proto::Role::Client, 1024);
        RecordsClient {
            control,
            socket,
            relay,
            tx,
            rx,
        }
    }
}

/// Replies follow the client's *newest* record between UDP and TLS (PROTOCOL.md §6.4): a
/// newer record inside TLS turns them inside TLS, and an older one arriving over UDP after
/// it (reordered, or late) does not turn them back; the next newest record over UDP, from
/// the validated path, does. Driven with the library's parts (a control connection that
/// speaks RECORD frames, the association's own sessions), so the test chooses each
/// record's nonce and path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_follow_the_newest_record_not_a_late_one_over_udp() {
    use sudp::proto::frame::{Decoder, Frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let RecordsClient {
        mut control,
        socket,
        relay,
        mut tx,
        mut rx,
    } = RecordsClient::open(&gw, &pki).await;
    let seal = |tx: &mut sudp::proto::session::SendSession, payload: &[u8]| {
        let mut rec = vec![0u8; 256];
        let n = tx.seal(&AddrRef::Ip(echo), payload, &mut rec).unwrap();
        rec.truncate(n);
        rec
    };
    let in_tls = |rec: &[u8]| {
        let mut f = Vec::new();
        Frame::Record(rec).encode(&mut f).unwrap();
        f
    };
    // Where the next reply arrives: over UDP or inside TLS, opened and checked.
    let mut decoder = Decoder::default();
    let mut udp_buf = vec![0u8; 2048];
    let mut reply = async |expect: &[u8], tx_control: &mut sudp::client::Control| -> &'static str {
        let (path, mut rec) = tokio::time::timeout(WAIT, async {
            loop {
                tokio::select! {
                    r = socket.recv_from(&mut udp_buf) => {
                        let (n, from) = r.unwrap();
                        assert_eq!(from, relay);
                        return ("udp", udp_buf[..n].to_vec());
                    }
                    r = tx_control.read(decoder.space()) => {
                        let n = r.unwrap();
                        assert!(n > 0, "control connection closed");
                        decoder.filled(n);
                        while let Some(f) = decoder.next_frame().unwrap() {
                            if let Frame::Record(r) = f {
                                return ("tls", r.to_vec());
                            }
                        }
                    }
                }
            }
        })
        .await
        .expect("a reply in time");
        let opened = rx.open(&mut rec).unwrap();
        assert_eq!(opened.data().unwrap().1, expect);
        path
    };

    let first = seal(&mut tx, b"first, over UDP");
    socket.send_to(&first, relay).await.unwrap();
    assert_eq!(reply(b"first, over UDP", &mut control).await, "udp");
    // Two records; the newer goes inside TLS first, then the older over UDP.
    let older = seal(&mut tx, b"older, over UDP");
    let newer = seal(&mut tx, b"newer, inside TLS");
    control.write_all(&in_tls(&newer)).await.unwrap();
    assert_eq!(reply(b"newer, inside TLS", &mut control).await, "tls");
    socket.send_to(&older, relay).await.unwrap();
    assert_eq!(
        reply(b"older, over UDP", &mut control).await,
        "tls",
        "a late record over UDP turned the replies back to UDP"
    );
    // The newest record over UDP, from the validated path: replies follow it back.
    let newest = seal(&mut tx, b"newest, over UDP");
    socket.send_to(&newest, relay).await.unwrap();
    assert_eq!(reply(b"newest, over UDP", &mut control).await, "udp");
    assert_eq!(gw.metrics.total_drops(), 0, "{}", gw.metrics.drop_summary());
    gw.stop().await;
}

/// A client whose control connection stops reading while its replies travel inside TLS:
/// once the connection's queue is full, each further reply is dropped and counted
/// (`send_failed`), nothing waits on it, and the association goes on: the client's next
/// record over UDP is answered over UDP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_a_stalled_control_connection_cannot_take_are_counted_and_the_association_lives() {
    use sudp::proto::frame::Frame;
    use tokio::io::AsyncWriteExt;
    // Enough replies to fill the gateway's queue (512 frames) and both TCP buffers.
    const RECORDS: usize = 20_000;
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let RecordsClient {
        mut control,
        socket,
        relay,
        mut tx,
        mut rx,
    } = RecordsClient::open(&gw, &pki).await;
    let mut out = Vec::new();
    let payload = vec![0x5au8; 1000];
    let mut rec = vec![0u8; 1100];
    for _ in 0..RECORDS {
        let n = tx.seal(&AddrRef::Ip(echo), &payload, &mut rec).unwrap();
        Frame::Record(&rec[..n]).encode(&mut out).unwrap();
    }
    // Written, never read: the gateway's replies inside TLS pile up.
    tokio::time::timeout(Duration::from_secs(30), control.write_all(&out))
        .await
        .expect("the gateway reads a client that does not read")
        .unwrap();
    eventually(|| gw.metrics.drops(DropReason::SendFailed) > 0).await;
    // The association still answers, over UDP now that the newest record came that way.
    let n = tx.seal(&AddrRef::Ip(echo), b"after the stall", &mut rec).unwrap();
    socket.send_to(&rec[..n], relay).await.unwrap();
    let mut buf = vec![0u8; 2048];
    tokio::time::timeout(WAIT, async {
        loop {
            let (n, _) = socket.recv_from(&mut buf).await.unwrap();
            // Replies to earlier records may come first, over UDP too from now on.
            if rx.open(&mut buf[..n]).unwrap().data().unwrap().1 == b"after the stall" {
                break;
            }
        }
    })
    .await
    .expect("the association answered after the stall");
    drop(control);
    gw.stop().await;
}

/// An unspecified BND.ADDR (a gateway that advertises 0.0.0.0: "the address you reached me
/// on") sends the client's records to the gateway's own address. Taken literally, 0.0.0.0
/// is "this host" to Linux: the records then happen to reach a gateway on loopback, and a
/// gateway on another machine never; so the test reads where the client sends, then that
/// the association works.
#[tokio::test]
async fn an_unspecified_bnd_addr_means_the_address_the_client_reached() {
    let pki = pki();
    let mut s = settings(&pki);
    s.listen = "127.0.0.2:0".parse().unwrap();
    s.udp_listen = Some("127.0.0.2:0".parse().unwrap());
    s.advertise = Some(std::net::Ipv4Addr::UNSPECIFIED.into());
    let gw = TestGateway::start(s).await;
    let udp = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    assert_eq!(
        udp.relay(),
        gw.relay,
        "the relay is where the client reached the gateway"
    );
    let target = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = Address::Ip(target.local_addr().unwrap());
    udp.send_to(b"ping", &to).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, outbound) = tokio::time::timeout(WAIT, target.recv_from(&mut buf))
        .await
        .expect("the record reached the relay at the gateway's address")
        .unwrap();
    assert_eq!(&buf[..n], b"ping");
    target.send_to(b"pong", outbound).await.unwrap();
    let (n, _) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"pong");
    gw.stop().await;
}
