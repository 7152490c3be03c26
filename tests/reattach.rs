//! Associations that move (PROTOCOL.md §2.7 REATTACH, §3.1 epochs), against one in-process
//! gateway: the owner re-attaches its association to a new control connection and keeps its
//! id under new keys; a stranger, an anonymous client and a second re-attach on one
//! connection are refused with their reasons; records of the old epoch fail authentication;
//! a copy still served on another connection is superseded and told so (CLOSE `moved`).
//! The cluster (two gateway processes sharing Redis) is `tests/cluster.rs`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sudp::auth::{hash_password, Users};
use sudp::client::{connect_tls, negotiate_sudp, request, ClientOptions, SecureUdp};
use sudp::proto::frame::RefuseReason;
use sudp::proto::socks::{Address, Command};
use sudp::proto::{DropReason, Role};
use tokio::net::UdpSocket;

async fn users_gateway(pki: &sudp::cert::DevPki) -> TestGateway {
    users_gateway_auditing(pki, None).await
}

/// [`users_gateway`], writing its audit log to `audit` if given.
async fn users_gateway_auditing(pki: &sudp::cert::DevPki, audit: Option<&std::path::Path>) -> TestGateway {
    let mut s = settings(pki);
    if let Some(path) = audit {
        s.audit = sudp::audit::AuditLog::open(path).unwrap();
    }
    let lines = format!(
        "alice:{}\nbob:{}\n",
        hash_password(b"alice pw").unwrap(),
        hash_password(b"bob pw").unwrap()
    );
    s.auth.no_auth = false;
    s.auth.users = Some(Arc::new(Users::parse(&lines, "test").unwrap()));
    TestGateway::start(s).await
}

fn as_user(gw: &TestGateway, pki: &sudp::cert::DevPki, user: &str) -> ClientOptions {
    let mut o = gw.options(pki);
    o.credentials = Some((user.into(), format!("{user} pw")));
    o
}

/// One datagram to the echo and back, checked byte for byte.
async fn echoes(u: &SecureUdp, echo: std::net::SocketAddr, payload: &[u8]) {
    u.send_to(payload, &Address::Ip(echo)).await.unwrap();
    let mut buf = vec![0u8; sudp::client::RECORD_BUF];
    let (n, from) = tokio::time::timeout(WAIT, u.recv_from(&mut buf))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no echo of {:?} within the wait",
                String::from_utf8_lossy(payload)
            )
        })
        .unwrap();
    assert_eq!(&buf[..n], payload);
    assert_eq!(from, Address::Ip(echo));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_re_attaches_under_a_new_epoch_and_strangers_are_refused() {
    let pki = pki();
    let audit_dir = TempDir::new("reattach-audit");
    let audit = audit_dir.path().join("audit.jsonl");
    let gw = users_gateway_auditing(&pki, Some(&audit)).await;
    let echo = udp_echo().await;
    let alice = as_user(&gw, &pki, "alice");

    let first = SecureUdp::connect(&alice).await.unwrap();
    assert_eq!(first.epoch(), 0);
    echoes(&first, echo, b"epoch 0").await;
    let token = first.resume_token();
    // The control connection breaks (the client's side goes away).
    drop(first);
    eventually(|| {
        gw.metrics
            .associations_active
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    })
    .await;

    // Another identity cannot take it: refused as not the owner, and it gets an
    // association of its own.
    let bob = SecureUdp::connect_reattach(&as_user(&gw, &pki, "bob"), Some(token))
        .await
        .unwrap();
    assert_eq!(bob.reattach_refused(), Some(RefuseReason::NotOwner));
    assert_ne!(bob.assoc(), token.0);
    echoes(&bob, echo, b"bob's own").await;
    assert_eq!(
        gw.metrics.reattach_refused[1].load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // The owner re-attaches it: same id, epoch 1, and it carries datagrams.
    let second = SecureUdp::connect_reattach(&alice, Some(token)).await.unwrap();
    assert_eq!(second.reattach_refused(), None);
    assert_eq!(second.assoc(), token.0);
    assert_eq!(second.epoch(), 1);
    echoes(&second, echo, b"epoch 1").await;

    // Again, while the epoch-1 copy is still served on its connection: the new connection
    // takes it over (epoch 2) and the old one is told it moved.
    let third = SecureUdp::connect_reattach(&alice, Some(token)).await.unwrap();
    assert_eq!((third.assoc(), third.epoch()), (token.0, 2));
    tokio::time::timeout(WAIT, second.closed())
        .await
        .expect("the superseded copy is closed");
    let why = second.close_reason().unwrap();
    assert!(why.contains("re-attached"), "{why}");
    // Ended because this gateway saw the re-attach, at once, not by the store check every
    // second that catches a re-attach on another node: the audit line says which.
    let deadline = std::time::Instant::now() + WAIT;
    let end = loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "association_end" && v["epoch"] == 1);
        if let Some(v) = found {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no end of epoch 1 in\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(end["assoc"], token.0.to_string(), "{end}");
    assert_eq!(end["reason"], "re-attached to another connection", "{end}");
    echoes(&third, echo, b"epoch 2").await;
    assert_eq!(
        gw.metrics.reattached.load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // An id nobody holds.
    let none = SecureUdp::connect_reattach(&alice, Some((sudp::proto::AssociationId(7), token.1)))
        .await
        .unwrap();
    assert_eq!(none.reattach_refused(), Some(RefuseReason::Unknown));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_associations_cannot_be_re_attached() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let first = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    let token = first.resume_token();
    drop(first);
    let again = SecureUdp::connect_reattach(&gw.options(&pki), Some(token))
        .await
        .unwrap();
    assert_eq!(again.reattach_refused(), Some(RefuseReason::Anonymous));
    assert_ne!(again.assoc(), token.0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_an_older_epoch_fail_authentication_after_a_re_attach() {
    let pki = pki();
    let gw = users_gateway(&pki).await;
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = echo.local_addr().unwrap();
    let alice = as_user(&gw, &pki, "alice");

    // Epoch 0 by hand, so the test holds its sealed records.
    let mut control = connect_tls(&alice).await.unwrap();
    let (suite, assoc) = negotiate_sudp(&mut control, &alice).await.unwrap();
    let keys = sudp::tls::export_keys(control.get_ref().1, assoc, suite).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bnd = request(
        &mut control,
        Command::UdpAssociate,
        &Address::Ip(socket.local_addr().unwrap()),
    )
    .await
    .unwrap();
    let Address::Ip(relay) = bnd else {
        panic!("BND is a domain")
    };
    let (mut send, _) = keys.into_sessions(assoc, Role::Client, 1024);
    let mut captured = Vec::new();
    for i in 0..5u8 {
        let mut buf = vec![0u8; 2048];
        let n = send
            .seal(&Address::Ip(target).as_ref(), &[b'0', i], &mut buf)
            .unwrap();
        buf.truncate(n);
        socket.send_to(&buf, relay).await.unwrap();
        captured.push(buf);
    }
    let mut got = [0u8; 64];
    for i in 0..5u8 {
        let (n, _) = tokio::time::timeout(WAIT, echo.recv_from(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got[..n], &[b'0', i]);
    }
    drop(control);
    eventually(|| {
        gw.metrics
            .associations_active
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    })
    .await;

    let moved = SecureUdp::connect_reattach(&alice, Some((assoc, suite)))
        .await
        .unwrap();
    assert_eq!((moved.assoc(), moved.epoch()), (assoc, 1));
    let bad_mac = gw.metrics.drops(DropReason::BadMac);
    let before = bad_mac + gw.metrics.drops(DropReason::Duplicate);
    // Epoch-0 records replayed from the client's own address: every one fails the MAC
    // under the epoch-1 keys, and none reaches the target.
    for r in &captured {
        socket.send_to(r, relay).await.unwrap();
    }
    // (The window is checked before the tag: a nonce the new epoch used already, such as
    // its first PROBE's, is dropped as a duplicate without a MAC computation.)
    let rejected = || gw.metrics.drops(DropReason::BadMac) + gw.metrics.drops(DropReason::Duplicate);
    eventually(|| rejected() == before + captured.len() as u64).await;
    assert!(gw.metrics.drops(DropReason::BadMac) >= bad_mac + captured.len() as u64 - 1);
    // The re-attached association carries traffic; the target sees only that.
    moved.send_to(b"epoch 1", &Address::Ip(target)).await.unwrap();
    let (n, _) = tokio::time::timeout(WAIT, echo.recv_from(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[..n], b"epoch 1");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), echo.recv_from(&mut got))
            .await
            .is_err(),
        "nothing else reached the target"
    );
    gw.stop().await;
}

/// A reconnect storm can fill the gateway's password-check queue. What does not fit is told
/// BUSY (SudpAccept 0x03), which the client retries, not AUTH_FAILED, which it must not:
/// with a queue of one and a check slot held by a slow client, a second login is BUSY and
/// the client's error is not permanent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_check_queue_answers_busy_not_auth_failed() {
    use sudp::client::ClientError;
    let pki = pki();
    let mut s = settings(&pki);
    let lines = format!("alice:{}\n", hash_password(b"alice pw").unwrap());
    s.auth.no_auth = false;
    s.auth.users = Some(Arc::new(Users::parse(&lines, "test").unwrap()));
    s.auth_limits.concurrency = 1;
    s.auth_limits.max_queued = 0;
    let gw = TestGateway::start(s).await;
    let alice = as_user(&gw, &pki, "alice");
    // Several logins at once against one check slot and no queue: at least one is BUSY,
    // every one is either accepted or BUSY (never AUTH_FAILED: the password is right).
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let o = alice.clone();
        tasks.push(tokio::spawn(
            async move { SecureUdp::connect(&o).await.map(|_| ()) },
        ));
    }
    let mut busy = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => {}
            Err(ClientError::Busy) => busy += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(busy >= 1, "no login was told BUSY");
    assert!(!ClientError::Busy.is_permanent());
    assert!(ClientError::Busy.is_gateway_failure());
    gw.stop().await;
}

/// After a gateway loss every association of a shim reconnects at once. Each TLS 1.3 ticket
/// resumes one connection, and rustls' default client cache keeps 8 per server name; sudp's
/// keeps thousands, so all of them resume (the reconnect storm's handshake cost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_resume_at_once() {
    const N: usize = 30;
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let opts = gw.options(&pki);
    let handshake = |o: ClientOptions| async move {
        let mut c = connect_tls(&o).await.unwrap();
        // The SOCKS exchange reads, so the client also takes in the session tickets.
        negotiate_sudp(&mut c, &o).await.unwrap();
        c.get_ref().1.handshake_kind().unwrap()
    };
    let mut first = Vec::new();
    for _ in 0..N {
        first.push(handshake(opts.clone()).await);
    }
    // Then all at once, as after a loss.
    let again: Vec<_> = futures_util::future::join_all((0..N).map(|_| handshake(opts.clone()))).await;
    let resumed = again
        .iter()
        .filter(|k| **k == rustls::HandshakeKind::Resumed)
        .count();
    assert_eq!(resumed, N, "{again:?}");
    gw.stop().await;
}
