//! Many associations on one control connection (PROTOCOL.md §2.9, feature ASSOCIATIONS),
//! against an in-process gateway: OPEN gives associations of their own (ids, keys, replay
//! windows) on the connection without another handshake; records inside TLS are routed by
//! id; a released association ends alone, as does one the gateway ends (idle); OPENs past
//! the limit are refused and counted without disturbing the others; the opened ones share
//! one UDP socket, their records routed by id; and after the
//! connection breaks, each association is re-attached to one new connection.
//! The shim's use of it (one connection for many flows) is in `tests/shim.rs`.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sudp::auth::{hash_password, Users};
use sudp::client::{ClientError, SecureUdp, Transport};
use sudp::proto::socks::Address;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// One datagram to the echo and back, checked byte for byte.
async fn echoes(u: &SecureUdp, echo: std::net::SocketAddr, payload: &[u8]) {
    u.send_to(payload, &Address::Ip(echo)).await.unwrap();
    let mut buf = vec![0u8; sudp::client::RECORD_BUF];
    let (n, from) = tokio::time::timeout(WAIT, u.recv_from(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no echo of {:?}", String::from_utf8_lossy(payload)))
        .unwrap();
    assert_eq!(&buf[..n], payload);
    assert_eq!(from, Address::Ip(echo));
}

fn handshakes(gw: &TestGateway) -> u64 {
    gw.metrics.handshakes_full.load(Ordering::Relaxed) + gw.metrics.handshakes_resumed.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_associations_share_one_connection_each_with_its_own_id_and_keys() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let opts = gw.options(&pki);
    let first = SecureUdp::connect(&opts).await.unwrap();
    let trunk = first.trunk().clone();
    let mut all = vec![first];
    for _ in 0..20 {
        all.push(SecureUdp::open_on(&trunk, &opts, None).await.unwrap());
    }
    // One inside TLS (RECORD frames, §6.4): routed to it by the record's id.
    let mut tls = opts.clone();
    tls.transport = Transport::Tls;
    let inside = SecureUdp::open_on(&trunk, &tls, None).await.unwrap();
    assert!(inside.via_tls());
    all.push(inside);

    // The connection's own association has a socket of its own; the opened ones share one
    // (their records are told apart by id), so 21 flows cost 2 sockets, not 22.
    let shared = all[1].local_addr().unwrap();
    assert_ne!(all[0].local_addr().unwrap(), shared);
    assert!(all[1..].iter().all(|u| u.local_addr().unwrap() == shared));
    let mut ids: Vec<_> = all.iter().map(|u| u.assoc()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), all.len(), "every association has its own id");
    assert!(
        all.iter().all(|u| u.suite() == all[0].suite()),
        "the connection's suite"
    );
    // Each carries its own datagrams, all sent before any is read: a reply routed to the
    // wrong association would fail its tag there (other keys) and never arrive.
    for (i, u) in all.iter().enumerate() {
        u.send_to(format!("flow {i}").as_bytes(), &Address::Ip(echo))
            .await
            .unwrap();
    }
    let mut buf = vec![0u8; sudp::client::RECORD_BUF];
    for (i, u) in all.iter().enumerate() {
        let (n, _) = tokio::time::timeout(WAIT, u.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], format!("flow {i}").as_bytes());
    }
    assert_eq!(handshakes(&gw), 1, "one TLS handshake for all of them");
    assert_eq!(gw.metrics.connections.load(Ordering::Relaxed), 1);
    assert_eq!(gw.metrics.opened_shared.load(Ordering::Relaxed), 21);
    assert_eq!(gw.metrics.associations_active.load(Ordering::Relaxed), 22);
    assert_eq!(trunk.carried(), 22);
    drop(all);
    // Released one by one while others remain; the last one dropped (with the last handle
    // on the trunk) closes the connection, which ends it too.
    eventually(|| gw.metrics.released.load(Ordering::Relaxed) == 21).await;
    eventually(|| gw.metrics.associations_active.load(Ordering::Relaxed) == 1).await;
    drop(trunk);
    eventually(|| gw.metrics.associations_active.load(Ordering::Relaxed) == 0).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_association_ends_alone_and_the_connection_carries_on() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let opts = gw.options(&pki);
    let a = SecureUdp::connect(&opts).await.unwrap();
    let b = SecureUdp::open_on(a.trunk(), &opts, None).await.unwrap();
    let c = SecureUdp::open_on(a.trunk(), &opts, None).await.unwrap();
    echoes(&b, echo, b"b before").await;
    drop(b);
    eventually(|| gw.metrics.released.load(Ordering::Relaxed) == 1).await;
    eventually(|| gw.metrics.associations_active.load(Ordering::Relaxed) == 2).await;
    echoes(&a, echo, b"a after").await;
    echoes(&c, echo, b"c after").await;
    assert!(!a.is_closed() && !c.is_closed());
    assert_eq!(gw.metrics.connections.load(Ordering::Relaxed), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_ends_an_idle_association_and_keeps_the_busy_ones() {
    let pki = pki();
    let mut s = settings(&pki);
    s.idle_timeout = Duration::from_millis(800);
    let gw = TestGateway::start(s).await;
    let echo = udp_echo().await;
    let opts = gw.options(&pki);
    let busy = SecureUdp::connect(&opts).await.unwrap();
    let idle = SecureUdp::open_on(busy.trunk(), &opts, None).await.unwrap();
    echoes(&idle, echo, b"once").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !idle.is_closed() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle association was not closed"
        );
        echoes(&busy, echo, b"still here").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let why = idle.close_reason().unwrap();
    assert!(why.contains("idle timeout"), "{why}");
    // The busy one and its connection carry on past several idle timeouts.
    for _ in 0..20 {
        echoes(&busy, echo, b"busy").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!busy.is_closed());
    assert_eq!(gw.metrics.associations_active.load(Ordering::Relaxed), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_past_the_limit_are_refused_and_counted_and_the_others_carry_on() {
    let pki = pki();
    let mut s = settings(&pki);
    s.max_associations = 3;
    let gw = TestGateway::start(s).await;
    let echo = udp_echo().await;
    let opts = gw.options(&pki);
    let a = SecureUdp::connect(&opts).await.unwrap();
    let b = SecureUdp::open_on(a.trunk(), &opts, None).await.unwrap();
    let c = SecureUdp::open_on(a.trunk(), &opts, None).await.unwrap();
    for _ in 0..3 {
        match SecureUdp::open_on(a.trunk(), &opts, None).await {
            Err(ClientError::Trunk(why)) => assert!(why.contains("OPEN refused: limit"), "{why}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a fourth association past max_associations = 3"),
        }
    }
    assert_eq!(gw.metrics.open_refused[0].load(Ordering::Relaxed), 3);
    for (u, p) in [(&a, b"a"), (&b, b"b"), (&c, b"c")] {
        echoes(u, echo, p).await;
    }
    // Room again once one is released.
    drop(c);
    eventually(|| gw.metrics.associations_active.load(Ordering::Relaxed) == 2).await;
    let d = SecureUdp::open_on(a.trunk(), &opts, None).await.unwrap();
    echoes(&d, echo, b"d").await;
    gw.stop().await;
}

/// A TCP relay the test can cut: the client's control connection breaks without either end
/// closing it (as when a gateway's host dies).
async fn cuttable_relay(
    to: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (cut, _) = tokio::sync::watch::channel(false);
    let cut_rx = cut.subscribe();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let mut cut = cut_rx.clone();
            tokio::spawn(async move {
                let Ok(mut g) = TcpStream::connect(to).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut c, &mut g) => {}
                    _ = async { let _ = cut.wait_for(|c| *c).await; } => {
                        let _ = c.shutdown().await;
                    }
                }
            });
        }
    });
    (addr, cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_break_each_association_is_re_attached_to_one_new_connection() {
    let pki = pki();
    let mut s = settings(&pki);
    s.auth.no_auth = false;
    s.auth.users = Some(Arc::new(
        Users::parse(
            &format!("alice:{}\n", hash_password(b"alice pw").unwrap()),
            "test",
        )
        .unwrap(),
    ));
    let gw = TestGateway::start(s).await;
    let echo = udp_echo().await;
    let (via, cut) = cuttable_relay(gw.control).await;
    let mut opts = gw.options(&pki);
    opts.credentials = Some(("alice".into(), "alice pw".into()));
    let mut broken = opts.clone();
    broken.gateway = via;
    let a = SecureUdp::connect(&broken).await.unwrap();
    let b = SecureUdp::open_on(a.trunk(), &broken, None).await.unwrap();
    echoes(&a, echo, b"a, epoch 0").await;
    echoes(&b, echo, b"b, epoch 0").await;
    let (ta, tb) = (a.resume_token(), b.resume_token());
    let _ = cut.send(true);
    tokio::time::timeout(WAIT, a.closed()).await.expect("a lost");
    tokio::time::timeout(WAIT, b.closed()).await.expect("b lost");

    // A new connection re-attaches a (its own association, unused, is released), and b
    // joins it on the same connection.
    let a2 = SecureUdp::connect_reattach(&opts, Some(ta)).await.unwrap();
    assert_eq!((a2.assoc(), a2.epoch()), (ta.0, 1));
    let b2 = SecureUdp::open_on(a2.trunk(), &opts, Some(tb)).await.unwrap();
    assert_eq!((b2.assoc(), b2.epoch(), b2.reattach_refused()), (tb.0, 1, None));
    echoes(&a2, echo, b"a, epoch 1").await;
    echoes(&b2, echo, b"b, epoch 1").await;
    assert_eq!(gw.metrics.reattached.load(Ordering::Relaxed), 2);
    assert_eq!(
        gw.metrics.released.load(Ordering::Relaxed),
        1,
        "the new connection's own one"
    );
    assert_eq!(handshakes(&gw), 2);
    eventually(|| gw.metrics.associations_active.load(Ordering::Relaxed) == 2).await;
    // Asking again for one this connection carries: refused, and a new one is opened.
    let again = SecureUdp::open_on(a2.trunk(), &opts, Some(tb)).await.unwrap();
    assert_ne!(again.assoc(), tb.0);
    assert_eq!(
        again.reattach_refused(),
        Some(sudp::proto::frame::RefuseReason::AlreadyAttached)
    );
    gw.stop().await;
}

/// The gateway's side of §2.9 from raw frames, written from PROTOCOL.md alone: an OPEN or a
/// client's CLOSE from a client whose HELLO did not list ASSOCIATIONS is skipped; with it,
/// OPENED names a new id whose keys are the exporter's with context `ASSOC_ID || SUITE`, a
/// record sealed with them from a socket of the test is relayed and answered under them, a
/// second REATTACH of an association the connection carries is refused `0x05`, and a
/// client's CLOSE ends exactly the association it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_frames_open_release_and_refuse_as_the_contract_says() {
    use sudp::net::channel::{Channel, Event};
    use sudp::proto::frame::{feature, CloseReason, Frame, OpenStatus, RefuseReason};
    use sudp::proto::session::{Content, RecvSession, SendSession};
    use sudp::proto::socks::AddrRef;
    use sudp::proto::Role;

    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let heartbeat = sudp::client::DEFAULT_HEARTBEAT;

    /// The next event that is not a HELLO, or `None` after `within`.
    async fn next_event(ch: &mut Channel<sudp::client::Control>, within: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, ch.next()).await {
                Err(_) => return None,
                Ok(Ok(Event::Hello(_))) => continue,
                Ok(Ok(ev)) => return Some(ev),
                Ok(Err(e)) => panic!("channel ended: {e}"),
            }
        }
    }

    // Without the feature: OPEN and CLOSE are skipped, the association stays.
    let old = raw_secure(&gw, &pki).await;
    let mut ch = Channel::open(old.control, heartbeat, &[feature::RECORDS]);
    ch.send(&Frame::Open { req: 1, port: 0 }).unwrap();
    ch.send(&Frame::Close {
        assoc: old.assoc,
        reason: CloseReason::Released,
    })
    .unwrap();
    assert_eq!(next_event(&mut ch, Duration::from_millis(700)).await, None);
    assert_eq!(gw.metrics.opened_shared.load(Ordering::Relaxed), 0);
    assert_eq!(gw.metrics.released.load(Ordering::Relaxed), 0);
    assert_eq!(gw.metrics.associations_active.load(Ordering::Relaxed), 1);

    // With it.
    let raw = raw_secure(&gw, &pki).await;
    let suite = raw.keys.c2g.suite();
    let mut ch = Channel::open(raw.control, heartbeat, &[feature::RECORDS, feature::ASSOCIATIONS]);
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    // Wait for the gateway's HELLO before sending frames of the feature (§2.4).
    let deadline = tokio::time::Instant::now() + WAIT;
    while ch.peer().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no HELLO");
        let _ = tokio::time::timeout(Duration::from_millis(50), ch.next()).await;
    }
    assert!(ch.peer().unwrap().has(feature::ASSOCIATIONS));
    ch.send(&Frame::Open { req: 0xABCD, port }).unwrap();
    let Some(Event::Opened { req, status, assoc }) = next_event(&mut ch, WAIT).await else {
        panic!("no OPENED")
    };
    assert_eq!((req, status), (0xABCD, OpenStatus::Opened));
    assert_ne!(assoc, raw.assoc);
    let keys = ch
        .with_stream(|s| sudp::tls::export_keys(s.get_ref().1, assoc, suite))
        .unwrap();
    let mut send = SendSession::resume(assoc, &keys, Role::Client, 0);
    let mut recv = RecvSession::new(assoc, &keys, Role::Client, 64);
    let mut buf = vec![0u8; 2048];
    let n = send
        .seal(&AddrRef::Ip(echo), b"opened by frame", &mut buf)
        .unwrap();
    socket.send_to(&buf[..n], raw.relay).await.unwrap();
    let (m, _) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let o = recv
        .open(&mut buf[..m])
        .expect("the answer opens under the OPENED association's keys");
    match o.content {
        Content::Data { payload, .. } => assert_eq!(payload, b"opened by frame"),
        other => panic!("not data: {other:?}"),
    }
    // The connection's own association cannot be re-attached to it again.
    ch.send(&Frame::Reattach { assoc, port }).unwrap();
    assert_eq!(
        next_event(&mut ch, WAIT).await,
        Some(Event::ReattachRefused {
            assoc,
            reason: RefuseReason::AlreadyAttached
        })
    );
    // A CLOSE naming the opened one ends it alone; one naming nothing is ignored.
    ch.send(&Frame::Close {
        assoc: sudp::proto::AssociationId(99),
        reason: CloseReason::Released,
    })
    .unwrap();
    ch.send(&Frame::Close {
        assoc,
        reason: CloseReason::Released,
    })
    .unwrap();
    eventually(|| gw.metrics.released.load(Ordering::Relaxed) == 1).await;
    eventually(|| gw.metrics.associations_active.load(Ordering::Relaxed) == 2).await;
    gw.stop().await;
}
