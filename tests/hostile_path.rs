//! Issue 10, items 3 and 4, end to end on loopback only: the reply path of a secure
//! association cannot be steered by copied records, a genuine port change moves it after
//! validation, naked associations can be made to require their port, and the default
//! policy refuses what it should (shown with loopback addresses and rules, never with a
//! real private or public destination).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sudp::client::{authenticate_plain, connect_tcp, connect_tls, request, ClientError, SecureUdp};
use sudp::policy::{Action, Policy, Rule};
use sudp::proto::path::ControlMessage;
use sudp::proto::session::{Content, RecvSession, SendSession};
use sudp::proto::socks::{Address, Command, ReplyCode};
use sudp::proto::{DropReason, Role};
use tokio::net::UdpSocket;

/// A target that answers every datagram with `reply:` + the datagram.
async fn target() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let mut out = b"reply:".to_vec();
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from).await;
        }
    });
    addr
}

fn seal(send: &mut SendSession, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 2048];
    let n = send.seal(&Address::Ip(to).as_ref(), payload, &mut b).unwrap();
    b.truncate(n);
    b
}

/// The next record on `sock`, opened: `(Some(payload), _)` for data, `(None, Some(msg))`
/// for a control message. Bounded wait.
async fn next(sock: &UdpSocket, recv: &mut RecvSession) -> (Option<Vec<u8>>, Option<ControlMessage>) {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, sock.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let o = recv.open(&mut buf[..n]).unwrap();
    match o.content {
        Content::Data { payload, .. } => (Some(payload.to_vec()), None),
        Content::Control(m) => (None, Some(m)),
    }
}

/// Nothing arrives on `sock` within `wait`.
async fn silent(sock: &UdpSocket, wait: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(wait, sock.recv(&mut buf)).await.is_err()
}

#[tokio::test]
async fn a_copied_record_from_another_port_does_not_steer_replies() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let to = target().await;
    let raw = raw_secure_announcing(&gw, &pki, true).await;
    let (mut send, mut recv) = raw.keys.into_sessions(raw.assoc, Role::Client, 1024);
    let client = &raw.socket;

    // The path starts where the client announced: replies come back to its socket.
    client
        .send_to(&seal(&mut send, to, b"0"), raw.relay)
        .await
        .unwrap();
    assert_eq!(next(client, &mut recv).await.0.unwrap(), b"reply:0");

    // The attack: another socket on the client's IP sends a copy of a fresh record before
    // the genuine one arrives.
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let fresh = seal(&mut send, to, b"1");
    attacker.send_to(&fresh, raw.relay).await.unwrap();
    eventually(|| gw.metrics.forwarded.load(std::sync::atomic::Ordering::Relaxed) == 2).await;
    client.send_to(&fresh, raw.relay).await.unwrap();
    // The reply to the datagram (carried by whichever copy came first) goes to the client,
    // and so do the replies to everything after it.
    assert_eq!(next(client, &mut recv).await.0.unwrap(), b"reply:1");
    for i in 2..6u8 {
        client
            .send_to(&seal(&mut send, to, &[b'0' + i]), raw.relay)
            .await
            .unwrap();
        assert_eq!(
            next(client, &mut recv).await.0.unwrap(),
            [b"reply:".as_slice(), &[b'0' + i]].concat()
        );
    }
    assert_eq!(gw.metrics.drops(DropReason::Duplicate), 1, "the second copy");
    // The attacker got one challenge (which it cannot open) and no reply.
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(WAIT, attacker.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        n,
        sudp::proto::record::MIN_RECORD,
        "a PATH_CHALLENGE is one block"
    );
    assert!(
        silent(&attacker, Duration::from_millis(300)).await,
        "only the challenge"
    );
    // The client's own socket saw no challenge, and no reply was lost.
    assert_eq!(gw.metrics.drops(DropReason::UnsolicitedReply), 0);
    drop(raw.control);
    gw.stop().await;
}

#[tokio::test]
async fn a_genuine_port_change_moves_the_path_after_validation() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let to = target().await;
    let raw = raw_secure_announcing(&gw, &pki, true).await;
    let (mut send, mut recv) = raw.keys.into_sessions(raw.assoc, Role::Client, 1024);
    let old = &raw.socket;
    old.send_to(&seal(&mut send, to, b"a"), raw.relay).await.unwrap();
    assert_eq!(next(old, &mut recv).await.0.unwrap(), b"reply:a");

    // The client's socket rebinds (a NAT rebinding, a new interface) and keeps sending.
    let new = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    new.send_to(&seal(&mut send, to, b"b"), raw.relay).await.unwrap();
    // The gateway challenges the new source; until it answers, replies keep going to the
    // old path.
    let (data, control) = next(&new, &mut recv).await;
    assert!(data.is_none());
    let Some(ControlMessage::PathChallenge(token)) = control else {
        panic!("expected a challenge, got {control:?}")
    };
    assert_eq!(next(old, &mut recv).await.0.unwrap(), b"reply:b");
    // Answered from the new source: the path moves there and the stream continues.
    let mut b = vec![0u8; 128];
    let n = send
        .seal_control(&ControlMessage::PathResponse(token), &mut b)
        .unwrap();
    new.send_to(&b[..n], raw.relay).await.unwrap();
    for i in 0..5u8 {
        new.send_to(&seal(&mut send, to, &[i]), raw.relay).await.unwrap();
        assert_eq!(
            next(&new, &mut recv).await.0.unwrap(),
            [b"reply:".as_slice(), &[i]].concat()
        );
    }
    assert!(
        silent(old, Duration::from_millis(200)).await,
        "nothing more on the old path"
    );
    assert_eq!(gw.metrics.drops(DropReason::BadControl), 0);
    drop(raw.control);
    gw.stop().await;
}

#[tokio::test]
async fn a_wrong_or_misplaced_path_response_moves_nothing() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let to = target().await;
    let raw = raw_secure_announcing(&gw, &pki, true).await;
    let (mut send, mut recv) = raw.keys.into_sessions(raw.assoc, Role::Client, 1024);
    let old = &raw.socket;
    old.send_to(&seal(&mut send, to, b"a"), raw.relay).await.unwrap();
    assert_eq!(next(old, &mut recv).await.0.unwrap(), b"reply:a");
    let new = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    new.send_to(&seal(&mut send, to, b"b"), raw.relay).await.unwrap();
    let (_, Some(ControlMessage::PathChallenge(token))) = next(&new, &mut recv).await else {
        panic!("expected a challenge")
    };
    assert_eq!(next(old, &mut recv).await.0.unwrap(), b"reply:b");
    let mut b = vec![0u8; 128];
    // A wrong token from the new source, the right one from a third socket.
    let n = send
        .seal_control(&ControlMessage::PathResponse([0; 8]), &mut b)
        .unwrap();
    new.send_to(&b[..n], raw.relay).await.unwrap();
    let third = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let n = send
        .seal_control(&ControlMessage::PathResponse(token), &mut b)
        .unwrap();
    third.send_to(&b[..n], raw.relay).await.unwrap();
    // A challenge sent c2g is refused and counted.
    let n = send
        .seal_control(&ControlMessage::PathChallenge(token), &mut b)
        .unwrap();
    old.send_to(&b[..n], raw.relay).await.unwrap();
    eventually(|| gw.metrics.drops(DropReason::BadControl) == 1).await;
    old.send_to(&seal(&mut send, to, b"c"), raw.relay).await.unwrap();
    assert_eq!(next(old, &mut recv).await.0.unwrap(), b"reply:c");
    drop(raw.control);
    gw.stop().await;
}

#[tokio::test]
async fn naked_require_port_refuses_port_zero_with_not_allowed() {
    let pki = pki();
    let mut s = settings(&pki);
    s.naked_require_port = true;
    let gw = TestGateway::start(s).await;
    let opts = gw.options(&pki);
    let mut c = connect_tls(&opts).await.unwrap();
    authenticate_plain(&mut c, None).await.unwrap();
    let any: Address = Address::Ip("0.0.0.0:0".parse().unwrap());
    match request(&mut c, Command::UdpAssociate, &any).await {
        Err(ClientError::Refused(ReplyCode::NotAllowed)) => {}
        other => panic!("expected 0x02, got {other:?}"),
    }
    // With its port the same client is served.
    let mut c = connect_tls(&opts).await.unwrap();
    authenticate_plain(&mut c, None).await.unwrap();
    let with_port: Address = Address::Ip("127.0.0.1:40000".parse().unwrap());
    assert!(request(&mut c, Command::UdpAssociate, &with_port).await.is_ok());
    // A secure client (which always announces its port) is unaffected.
    let udp = SecureUdp::connect(&opts).await.unwrap();
    drop(udp);
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn deny_rules_and_the_default_policy_refuse_end_to_end() {
    let pki = pki();
    let echo = tcp_echo().await;
    let uecho = udp_echo().await;
    // 127.0.0.3 stands for a network the operator denies; the rest of loopback is allowed.
    let mut s = settings(&pki);
    s.policy = Arc::new(Policy::new(
        vec![
            Rule::parse(Action::Deny, "127.0.0.3/32").unwrap(),
            Rule::parse(Action::Allow, "127.0.0.0/8").unwrap(),
        ],
        Default::default(),
    ));
    let gw = TestGateway::start(s).await;
    let opts = gw.options(&pki);
    let denied = Address::Ip(SocketAddr::new("127.0.0.3".parse().unwrap(), echo.port()));
    assert!(matches!(
        connect_tcp(&opts, &denied).await,
        Err(ClientError::Refused(ReplyCode::NotAllowed))
    ));
    assert!(connect_tcp(&opts, &Address::Ip(echo)).await.is_ok());
    let udp = SecureUdp::connect(&opts).await.unwrap();
    udp.send_to(
        b"no",
        &Address::Ip(SocketAddr::new("127.0.0.3".parse().unwrap(), uecho.port())),
    )
    .await
    .unwrap();
    eventually(|| gw.metrics.drops(DropReason::PolicyDenied) == 1).await;
    drop(udp);
    gw.stop().await;

    // The built-in default: loopback is refused, and the gateway knows its own addresses.
    let mut s = settings(&pki);
    let policy = Arc::new(Policy::default());
    s.policy = policy.clone();
    let gw = TestGateway::start(s).await;
    let opts = gw.options(&pki);
    assert!(matches!(
        connect_tcp(&opts, &Address::Ip(echo)).await,
        Err(ClientError::Refused(ReplyCode::NotAllowed))
    ));
    let local = policy.local_addrs();
    assert!(
        local.is_local("127.0.0.1".parse().unwrap()),
        "interfaces enumerated at bind"
    );
    // Every address of this host is refused by the default (checked, never contacted).
    for (ip, _) in sudp::net::ifaddrs::interface_addrs().unwrap() {
        assert!(policy.check(None, SocketAddr::new(ip, 22)).is_err(), "{ip}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn empty_and_one_byte_datagrams_are_counted_under_one_reason_each() {
    // PROTOCOL.md §5/§7: an empty datagram is `unknown_kind`; a single byte with the flag
    // bit is a secure datagram cut short, `truncated`; a single 0x00 is `unknown_kind`.
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(b"", gw.relay).await.unwrap();
    s.send_to(b"\x97", gw.relay).await.unwrap();
    s.send_to(b"\x00", gw.relay).await.unwrap();
    eventually(|| {
        gw.metrics.drops(DropReason::UnknownKind) == 2 && gw.metrics.drops(DropReason::Truncated) == 1
    })
    .await;
    // A naked header cut short is `truncated` too, never also `bad_address`.
    s.send_to(b"\x00\x00\x00\x01\x7f", gw.relay).await.unwrap();
    eventually(|| gw.metrics.drops(DropReason::Truncated) == 2).await;
    assert_eq!(gw.metrics.drops(DropReason::BadAddress), 0);
    gw.stop().await;
}

/// The NAT's current outbound socket and the task carrying its answers back.
type Back = Arc<std::sync::Mutex<Option<(Arc<UdpSocket>, tokio::task::JoinHandle<()>)>>>;

/// A user-space NAT on loopback: the client talks to `front` (the address the gateway
/// advertises), the NAT forwards from its current `back` socket on 127.0.0.1 to the relay
/// and carries the answers back. `rebind` replaces the back socket (a new port; the old
/// mapping dies), as a NAT that lost its state would.
struct Nat {
    back: Back,
    client: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    front: Arc<UdpSocket>,
    relay: SocketAddr,
    front_task: tokio::task::JoinHandle<()>,
    /// Datagrams that came back from the relay, per back port.
    returned: Arc<std::sync::Mutex<Vec<(u16, usize)>>>,
}

impl Nat {
    async fn new(front: SocketAddr, relay: SocketAddr) -> Nat {
        let front = Arc::new(UdpSocket::bind(front).await.unwrap());
        let back: Back = Arc::default();
        let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
        let front_task = tokio::spawn({
            let (front, back, client) = (front.clone(), back.clone(), client.clone());
            async move {
                let mut buf = vec![0u8; 70_000];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().unwrap() = Some(from);
                    let b = back.lock().unwrap().as_ref().map(|(s, _)| s.clone());
                    if let Some(b) = b {
                        let _ = b.send_to(&buf[..n], relay).await;
                    }
                }
            }
        });
        let nat = Nat {
            back,
            client,
            front,
            relay,
            front_task,
            returned: Arc::default(),
        };
        nat.rebind().await;
        nat
    }

    async fn rebind(&self) -> u16 {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let port = sock.local_addr().unwrap().port();
        let task = tokio::spawn({
            let (sock, front, client, returned) = (
                sock.clone(),
                self.front.clone(),
                self.client.clone(),
                self.returned.clone(),
            );
            let relay = self.relay;
            async move {
                let mut buf = vec![0u8; 70_000];
                while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                    if from != relay {
                        continue;
                    }
                    returned.lock().unwrap().push((port, n));
                    let to = *client.lock().unwrap();
                    if let Some(to) = to {
                        let _ = front.send_to(&buf[..n], to).await;
                    }
                }
            }
        });
        if let Some((_, old)) = self.back.lock().unwrap().replace((sock, task)) {
            old.abort();
        }
        port
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        self.front_task.abort();
        if let Some((_, t)) = self.back.lock().unwrap().take() {
            t.abort();
        }
    }
}

#[tokio::test]
async fn secure_udp_behind_a_nat_follows_a_rebinding() {
    // The library client end to end: the gateway advertises 127.0.0.5 (the NAT's front),
    // so SecureUdp's records reach the relay from the NAT's port, not from the port the
    // client announced. The first record starts a validation that SecureUdp answers; after
    // the NAT rebinds, the next does again, and the stream carries on.
    let pki = pki();
    let mut s = settings(&pki);
    s.advertise = Some("127.0.0.5".parse().unwrap());
    let gw = TestGateway::start(s).await;
    let nat = Nat::new(
        SocketAddr::new("127.0.0.5".parse().unwrap(), gw.relay.port()),
        gw.relay,
    )
    .await;
    let to = target().await;
    let metrics = Arc::new(sudp::metrics::Metrics::default());
    let udp = SecureUdp::connect(&gw.options(&pki))
        .await
        .unwrap()
        .with_metrics(metrics.clone());
    assert_eq!(udp.relay().ip().to_string(), "127.0.0.5");

    // Sends `tag` datagrams, one per `wait`, until one comes back (replies to a path not
    // validated yet are lost, as through a real NAT); returns how many it took. Late
    // replies to earlier tags are skipped.
    async fn until_answered(udp: &SecureUdp, to: SocketAddr, tag: u8, wait: Duration) -> usize {
        let mut buf = vec![0u8; 2048];
        for attempt in 1..=50 {
            // 20 bytes: the reply's record (69 bytes) is longer than a challenge's (53).
            let mut payload = [0u8; 20];
            payload[..2].copy_from_slice(&[tag, attempt as u8]);
            udp.send_to(&payload, &Address::Ip(to)).await.unwrap();
            let deadline = tokio::time::Instant::now() + wait;
            while let Ok(r) = tokio::time::timeout_at(deadline, udp.recv_from(&mut buf)).await {
                let (n, from) = r.unwrap();
                assert_eq!(from, Address::Ip(to));
                assert_eq!(&buf[..6], b"reply:", "only data reaches the application");
                assert_eq!(n, 26);
                if buf[6] == tag {
                    return attempt;
                }
            }
        }
        panic!("no reply through the NAT")
    }
    let short = Duration::from_millis(100);
    let first = nat
        .back
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .0
        .local_addr()
        .unwrap()
        .port();
    until_answered(&udp, to, 1, short).await;
    // A steady stream on the validated path: nothing lost.
    for i in 0..5 {
        assert_eq!(until_answered(&udp, to, 10 + i, WAIT).await, 1);
    }
    let second = nat.rebind().await;
    until_answered(&udp, to, 3, short).await;
    for i in 0..5 {
        assert_eq!(
            until_answered(&udp, to, 20 + i, WAIT).await,
            1,
            "the stream continues after the move"
        );
    }
    // Each back port got a challenge (one 53-byte record) before its replies.
    let returned = nat.returned.lock().unwrap().clone();
    for port in [first, second] {
        let from_port: Vec<usize> = returned
            .iter()
            .filter(|(p, _)| *p == port)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(
            from_port.first(),
            Some(&sudp::proto::record::MIN_RECORD),
            "{port}: {from_port:?}"
        );
        assert!(from_port.len() > 1, "{port}: replies followed the challenge");
    }
    assert_eq!(metrics.drops(DropReason::BadControl), 0);
    assert_eq!(gw.metrics.drops(DropReason::BadControl), 0);
    drop(udp);
    gw.stop().await;
}
