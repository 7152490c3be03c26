//! MUST rules of docs/PROTOCOL.md that no other test exercised (issue 15): the client's
//! aborts on a wrong answer (§2.1, §2.2), the start of the reply path with DST.PORT 0
//! (§2.3, §6.3), naked DST.PORT 0 binding (§2.3), the gateway's drop reasons and the rule
//! that a dropped datagram is never answered (§7), the control connection after the
//! ASSOCIATE reply (§2.3, §2.4), CONNECT after method 0x80, and TLS 1.2 without the
//! extended master secret (§11). Loopback only.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sudp::client::{authenticate_plain, connect_tls, negotiate_sudp, request, ClientError, SecureUdp};
use sudp::proto::record::PREFIX_LEN;
use sudp::proto::socks::{self, method, AddrRef, Address, Command, SudpAccept};
use sudp::proto::{AssociationId, CipherSuite, DropReason, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// Nothing arrives on `sock` within `wait`.
async fn silent(sock: &UdpSocket, wait: Duration) -> bool {
    let mut buf = vec![0u8; 65_536];
    tokio::time::timeout(wait, sock.recv_from(&mut buf))
        .await
        .is_err()
}

/// Reads until the peer closes (bounded); returns what came before the close.
async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("the peer closes in time");
    rest
}

// --- §2.1/§2.2: the client aborts on an answer it did not ask for ---------------------------

/// How the fake gateway answers the client's greeting and SudpHello.
#[derive(Clone, Copy, Debug)]
enum Wrong {
    /// Selects method 0x00 though the client offered only 0x80.
    OtherMethod,
    /// Accepts with a suite the client did not offer.
    SuiteNotOffered,
    /// Accepts with suite 0x00 (never a suite).
    SuiteZero,
    /// A SudpAccept of version 2.
    Version2,
    /// A reserved non-zero status (any non-zero status is a failure).
    ReservedStatus,
}

/// A TLS server on 127.0.0.1 that speaks just enough of the gateway's side to give the
/// answer `wrong`, then records every byte the client sends after it until the client
/// closes. Returns its address and the task yielding those bytes.
async fn fake_gateway(
    pki: &sudp::cert::DevPki,
    wrong: Wrong,
) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls(pki, false, false));
    let task = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let mut s = acceptor.accept(tcp).await.unwrap();
        // Greeting: 05 01 80.
        let mut greeting = [0u8; 3];
        s.read_exact(&mut greeting).await.unwrap();
        assert_eq!(greeting, [5, 1, method::SUDP], "the client offers only 0x80");
        if let Wrong::OtherMethod = wrong {
            s.write_all(&[5, method::NO_AUTH]).await.unwrap();
            // The hello was sent with the greeting (one write); drain it, then see what
            // else comes: nothing but the close.
            let mut hello = [0u8; 4];
            s.read_exact(&mut hello).await.unwrap();
            return read_until_closed(&mut s).await;
        }
        // SudpHello offering suite 0x01 only, no credentials: 01 01 01 00.
        let mut hello = [0u8; 4];
        s.read_exact(&mut hello).await.unwrap();
        assert_eq!(hello, [1, 1, 0x01, 0]);
        let accept = match wrong {
            Wrong::OtherMethod => unreachable!("answered above"),
            Wrong::SuiteNotOffered => [1, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 7],
            Wrong::SuiteZero => [1, 0, 0x00, 0, 0, 0, 0, 0, 0, 0, 7],
            Wrong::Version2 => [2, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 7],
            Wrong::ReservedStatus => [1, 0x07, 0x01, 0, 0, 0, 0, 0, 0, 0, 7],
        };
        s.write_all(&[5, method::SUDP]).await.unwrap();
        s.write_all(&accept).await.unwrap();
        read_until_closed(&mut s).await
    });
    (addr, task)
}

/// PROTOCOL.md §2.1: "a client that requires secure UDP MUST offer only 0x80, or abort if
/// the gateway selects anything else"; §2.2: "the client MUST check that VER = 1 and that
/// SUITE is one it offered, else abort", and any non-zero status is a failure. The library
/// returns the error and sends nothing more (no UDP ASSOCIATE on a connection it did not
/// secure).
#[tokio::test]
async fn the_client_aborts_on_another_method_an_unoffered_suite_or_a_bad_accept() {
    let pki = pki();
    for wrong in [
        Wrong::OtherMethod,
        Wrong::SuiteNotOffered,
        Wrong::SuiteZero,
        Wrong::Version2,
        Wrong::ReservedStatus,
    ] {
        let (addr, gateway) = fake_gateway(&pki, wrong).await;
        let mut opts = sudp::client::ClientOptions::new(addr, "localhost", client_tls(&pki, false));
        opts.suites = vec![CipherSuite::Aes128CbcHmacSha256];
        opts.timeout = WAIT;
        let err = SecureUdp::connect(&opts)
            .await
            .err()
            .unwrap_or_else(|| panic!("{wrong:?}: the client went on"));
        let ok = match wrong {
            Wrong::OtherMethod => matches!(err, ClientError::NoAcceptableMethod),
            Wrong::SuiteNotOffered | Wrong::SuiteZero => matches!(err, ClientError::NoSuite),
            Wrong::Version2 => matches!(err, ClientError::Protocol(_)),
            Wrong::ReservedStatus => matches!(err, ClientError::AuthFailed),
        };
        assert!(ok, "{wrong:?}: {err:?}");
        let after = tokio::time::timeout(WAIT, gateway).await.unwrap().unwrap();
        assert!(
            after.is_empty(),
            "{wrong:?}: the client sent {after:02x?} after the wrong answer"
        );
    }
}

// --- §2.7: the client takes only the answer that names its association ---------------------

/// A fake gateway (TLS on 127.0.0.1) that opens association 7 for the connection, then,
/// when the client asks to re-attach `old`, answers first about another association (a
/// REATTACHED, then a REATTACH_REFUSED) and only then REATTACHED(`old`, epoch 7). A gateway
/// that answers about an association nobody asked for is broken or hostile: the client must
/// wait for the answer naming its own. Holds the connection until the client closes it.
async fn fake_reattaching_gateway(
    pki: &sudp::cert::DevPki,
    old: AssociationId,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use sudp::proto::frame::{feature, Decoder, Frame, Hello, RefuseReason};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls(pki, false, false));
    let task = tokio::spawn(async move {
        let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let mut s = acceptor.accept(tcp).await.unwrap();
        let mut greeting_and_hello = [0u8; 7];
        s.read_exact(&mut greeting_and_hello).await.unwrap();
        assert_eq!(greeting_and_hello, [5, 1, method::SUDP, 1, 1, 0x01, 0]);
        s.write_all(&[5, method::SUDP]).await.unwrap();
        s.write_all(&[1, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 7]).await.unwrap();
        // UDP ASSOCIATE for 0.0.0.0:PORT: VER CMD RSV ATYP(1) ADDR(4) PORT(2).
        let mut req = [0u8; 10];
        s.read_exact(&mut req).await.unwrap();
        assert_eq!(
            req[..4],
            [5, 3, 0, socks::atyp::V4],
            "UDP ASSOCIATE for an IPv4 address"
        );
        let bnd = relay.local_addr().unwrap();
        let mut reply = vec![5, 0, 0, socks::atyp::V4, 127, 0, 0, 1];
        reply.extend_from_slice(&bnd.port().to_be_bytes());
        s.write_all(&reply).await.unwrap();
        let send = |f: Frame<'_>| {
            let mut b = Vec::new();
            f.encode(&mut b).unwrap();
            b
        };
        s.write_all(&send(Frame::Hello(Hello {
            version: 1,
            ping_interval_ms: 0,
            features: vec![feature::REATTACH],
        })))
        .await
        .unwrap();
        let mut decoder = Decoder::default();
        let port = tokio::time::timeout(WAIT, async {
            loop {
                let n = s.read(decoder.space()).await.unwrap();
                assert!(n > 0, "the client closed before its REATTACH");
                decoder.filled(n);
                while let Some(f) = decoder.next_frame().unwrap() {
                    if let Frame::Reattach { assoc, port } = f {
                        assert_eq!(assoc, old);
                        return port;
                    }
                }
            }
        })
        .await
        .expect("a REATTACH in time");
        assert_ne!(port, 0);
        let other = AssociationId(old.0 ^ 1);
        let mut answers = send(Frame::Reattached {
            assoc: other,
            epoch: 5,
        });
        answers.extend(send(Frame::ReattachRefused {
            assoc: other,
            reason: RefuseReason::Busy,
        }));
        answers.extend(send(Frame::Reattached { assoc: old, epoch: 7 }));
        s.write_all(&answers).await.unwrap();
        let _ = read_until_closed(&mut s).await;
    });
    (addr, task)
}

/// PROTOCOL.md §2.7: a REATTACHED or REATTACH_REFUSED answers the REATTACH that names its
/// association; the client re-attaches `old` under the epoch of the answer naming `old`
/// (7), not under the REATTACHED of another association (5), and is not refused by another
/// association's REATTACH_REFUSED.
#[tokio::test]
async fn the_client_takes_only_the_reattach_answer_that_names_its_association() {
    let pki = pki();
    let old = AssociationId(0x5eed_0000_0000_0042);
    let (addr, gateway) = fake_reattaching_gateway(&pki, old).await;
    let mut opts = sudp::client::ClientOptions::new(addr, "localhost", client_tls(&pki, false));
    opts.suites = vec![CipherSuite::Aes128CbcHmacSha256];
    opts.timeout = WAIT;
    let udp = SecureUdp::connect_reattach(&opts, Some((old, CipherSuite::Aes128CbcHmacSha256)))
        .await
        .unwrap();
    assert_eq!(
        udp.reattach_refused(),
        None,
        "refused by another association's answer"
    );
    assert_eq!((udp.assoc(), udp.epoch()), (old, 7));
    drop(udp);
    tokio::time::timeout(WAIT, gateway).await.unwrap().unwrap();
}

// --- §2.3/§6.3: the reply path of a secure association with DST.PORT 0 ----------------------

/// The ports of the UDP sockets bound to a wildcard address (0.0.0.0 or ::) in this
/// network namespace, from /proc/net/udp{,6}: the gateway's outbound sockets are the only
/// ones the tests bind that way.
fn wildcard_udp_ports() -> HashSet<u16> {
    let mut ports = HashSet::new();
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let Some(local) = line.split_whitespace().nth(1) else {
                continue;
            };
            let Some((ip, port)) = local.split_once(':') else {
                continue;
            };
            if ip.bytes().all(|b| b == b'0') {
                if let Ok(p) = u16::from_str_radix(port, 16) {
                    ports.insert(p);
                }
            }
        }
    }
    ports
}

/// PROTOCOL.md §2.3/§6.3 rule 1: with DST.PORT 0 there is no reply path until the first
/// record that passes §6.1; a datagram for the client before it is dropped
/// (`unsolicited_reply`), even on a full-cone gateway where any source may answer; the
/// first authenticated record's source becomes the path.
#[tokio::test]
async fn with_dst_port_zero_replies_wait_for_the_first_authenticated_record() {
    let pki = pki();
    let mut s = settings(&pki);
    s.full_cone = true;
    let gw = TestGateway::start(s).await;
    // The association's outbound socket: the wildcard-bound UDP port that appears with it
    // (other tests of this binary may open associations at the same moment: retry until
    // exactly one appeared).
    let mut found = None;
    for _ in 0..10 {
        let before = wildcard_udp_ports();
        let raw = raw_secure(&gw, &pki).await;
        let new: Vec<u16> = wildcard_udp_ports().difference(&before).copied().collect();
        if let [port] = new[..] {
            found = Some((raw, port));
            break;
        }
    }
    let (raw, outbound) = found.expect("the association's outbound port");
    let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let outbound: SocketAddr = ([127, 0, 0, 1], outbound).into();
    // Before any record: dropped, counted, and nothing reaches the client.
    target.send_to(b"too early", outbound).await.unwrap();
    eventually(|| gw.metrics.drops(DropReason::UnsolicitedReply) == 1).await;
    assert!(silent(&raw.socket, Duration::from_millis(200)).await);

    // A record from a second socket of the client's IP (not the one that negotiated): the
    // path starts at the source of the first authenticated record, whichever it is.
    let (mut send, mut recv) = raw.keys.into_sessions(raw.assoc, Role::Client, 1024);
    let first = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rec = vec![0u8; 256];
    let to = Address::Ip(target.local_addr().unwrap());
    let n = send.seal(&to.as_ref(), b"hello", &mut rec).unwrap();
    first.send_to(&rec[..n], raw.relay).await.unwrap();
    let mut buf = [0u8; 256];
    let (n, from) = tokio::time::timeout(WAIT, target.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(from.port(), outbound.port(), "the same outbound socket");
    target.send_to(b"now", outbound).await.unwrap();
    let (n, _) = tokio::time::timeout(WAIT, first.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let opened = recv.open(&mut buf[..n]).unwrap();
    assert_eq!(opened.data().unwrap().1, b"now");
    assert!(
        silent(&raw.socket, Duration::from_millis(100)).await,
        "not the other socket"
    );
    assert_eq!(gw.metrics.drops(DropReason::UnsolicitedReply), 1);
    drop(raw.control);
    gw.stop().await;
}

// --- §2.3: naked DST.PORT 0 --------------------------------------------------------------

/// PROTOCOL.md §2.3: for a naked association with DST.PORT 0 the first datagram from the
/// control connection's IP binds the port; datagrams from another port of that IP are then
/// `foreign_source`, and replies go to the bound port only.
#[tokio::test]
async fn naked_dst_port_zero_binds_the_port_of_the_first_datagram() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let mut control = connect_tls(&gw.options(&pki)).await.unwrap();
    authenticate_plain(&mut control, None).await.unwrap();
    let bnd = request(
        &mut control,
        Command::UdpAssociate,
        &Address::Ip("0.0.0.0:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let Address::Ip(relay) = bnd else {
        panic!("BND is a domain")
    };
    let datagram = |payload: &[u8]| {
        let mut d = vec![0u8; 64];
        let n = socks::encode_udp_header(&Address::Ip(echo).as_ref(), &mut d).unwrap();
        d.truncate(n);
        d.extend_from_slice(payload);
        d
    };
    let (a, b) = (
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    a.send_to(&datagram(b"first"), relay).await.unwrap();
    let mut buf = [0u8; 256];
    let (n, _) = tokio::time::timeout(WAIT, a.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].ends_with(b"first"));
    for _ in 0..3 {
        b.send_to(&datagram(b"second"), relay).await.unwrap();
    }
    eventually(|| gw.metrics.drops(DropReason::ForeignSource) == 3).await;
    assert!(silent(&b, Duration::from_millis(200)).await);
    assert!(
        silent(&a, Duration::from_millis(1)).await,
        "no echo of b's datagrams"
    );
    assert_eq!(gw.metrics.forwarded.load(Ordering::Relaxed), 1);
    // The bound port still works.
    a.send_to(&datagram(b"third"), relay).await.unwrap();
    let (n, _) = tokio::time::timeout(WAIT, a.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].ends_with(b"third"));
    drop(control);
    gw.stop().await;
}

// --- §7: the gateway's drop reasons, never answered ------------------------------------------

/// Seals a plaintext given whole (so it may carry a malformed address) at the next nonce.
fn seal_plaintext(send: &mut sudp::proto::SendSession, plaintext: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 70_000];
    b[PREFIX_LEN..PREFIX_LEN + plaintext.len()].copy_from_slice(plaintext);
    let n = send.seal_in_place(&mut b, plaintext.len()).unwrap();
    b.truncate(n);
    b
}

/// PROTOCOL.md §7: `bad_address` (naked and in an authenticated record), `resolve_failed`,
/// `send_failed`, g2c `too_large` and `unknown_association` are each counted once for one
/// datagram that earns it, nothing else is counted, nothing is forwarded for it, and
/// nothing is sent back to its sender ("a receiver never answers a dropped datagram on the
/// wire").
#[tokio::test]
async fn gateway_drop_reasons_are_counted_and_never_answered() {
    let pki = pki();
    let mut s = settings(&pki);
    // `no-such-host.invalid` fails in a table the test owns, without a DNS query.
    s.resolver = Arc::new(sudp::net::dns::StaticResolve::localhost());
    let gw = TestGateway::start(s).await;
    let raw = raw_secure_announcing(&gw, &pki, true).await;
    let (mut send, _) = raw.keys.into_sessions(raw.assoc, Role::Client, 1024);
    // A target that answers anything with 65 460 bytes: more than a record can carry
    // with its 7-byte source address (65 455), less than a UDP datagram (65 507).
    let big = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let big_addr = big.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = big.recv_from(&mut buf).await {
            let _ = big.send_to(&vec![0x5a; 65_460], from).await;
        }
    });
    let forwarded = || gw.metrics.forwarded.load(Ordering::Relaxed);
    let check = |reason: DropReason, what: &str| {
        assert_eq!(
            gw.metrics.drops(reason),
            1,
            "{what}: {}",
            gw.metrics.drop_summary()
        );
        assert_eq!(
            gw.metrics.total_drops(),
            1,
            "{what}: {}",
            gw.metrics.drop_summary()
        );
    };

    // bad_address, in an authenticated record: ATYP 0x05.
    let rec = seal_plaintext(&mut send, &[0x05, 1, 2, 3, 4, 0, 80, b'x']);
    raw.socket.send_to(&rec, raw.relay).await.unwrap();
    eventually(|| gw.metrics.drops(DropReason::BadAddress) == 1).await;
    check(DropReason::BadAddress, "secure bad address");
    assert!(silent(&raw.socket, Duration::from_millis(200)).await);

    // resolve_failed: a name the resolver does not know.
    let mut b = vec![0u8; 256];
    let n = send
        .seal(&AddrRef::Domain("no-such-host.invalid", 9), b"x", &mut b)
        .unwrap();
    raw.socket.send_to(&b[..n], raw.relay).await.unwrap();
    eventually(|| gw.metrics.drops(DropReason::ResolveFailed) == 1).await;
    assert_eq!(gw.metrics.total_drops(), 2, "{}", gw.metrics.drop_summary());
    assert!(silent(&raw.socket, Duration::from_millis(200)).await);

    // send_failed: the outbound socket refuses port 0 (EINVAL).
    let n = send
        .seal(&AddrRef::Ip("127.0.0.1:0".parse().unwrap()), b"x", &mut b)
        .unwrap();
    raw.socket.send_to(&b[..n], raw.relay).await.unwrap();
    eventually(|| gw.metrics.drops(DropReason::SendFailed) == 1).await;
    assert_eq!(gw.metrics.total_drops(), 3, "{}", gw.metrics.drop_summary());
    assert!(silent(&raw.socket, Duration::from_millis(200)).await);
    assert_eq!(forwarded(), 0);

    // g2c too_large: the target's 65 460-byte answer cannot be sealed; the request went out.
    let n = send.seal(&AddrRef::Ip(big_addr), b"go", &mut b).unwrap();
    raw.socket.send_to(&b[..n], raw.relay).await.unwrap();
    eventually(|| gw.metrics.drops(DropReason::TooLarge) == 1).await;
    assert_eq!(forwarded(), 1);
    assert_eq!(gw.metrics.total_drops(), 4, "{}", gw.metrics.drop_summary());
    assert!(silent(&raw.socket, Duration::from_millis(200)).await);

    // unknown_association: a well-formed record under an id nobody holds.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rec = rec.clone();
    let other = AssociationId(raw.assoc.0 ^ 0x5a5a_5a5a_5a5a_5a5a);
    rec[5..13].copy_from_slice(&other.to_bytes());
    stranger.send_to(&rec, raw.relay).await.unwrap();
    eventually(|| gw.metrics.drops(DropReason::UnknownAssociation) == 1).await;
    assert_eq!(gw.metrics.total_drops(), 5, "{}", gw.metrics.drop_summary());
    assert!(silent(&stranger, Duration::from_millis(200)).await);

    // bad_address on the naked path: ATYP 0x05 in the RFC 1928 §7 header.
    let mut control = connect_tls(&gw.options(&pki)).await.unwrap();
    authenticate_plain(&mut control, None).await.unwrap();
    let naked = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    request(
        &mut control,
        Command::UdpAssociate,
        &Address::Ip(naked.local_addr().unwrap()),
    )
    .await
    .unwrap();
    naked
        .send_to(&[0, 0, 0, 0x05, 1, 2, 3, 4, 0, 80, b'x'], gw.relay)
        .await
        .unwrap();
    eventually(|| gw.metrics.drops(DropReason::BadAddress) == 2).await;
    assert_eq!(gw.metrics.total_drops(), 6, "{}", gw.metrics.drop_summary());
    assert!(silent(&naked, Duration::from_millis(200)).await);
    assert_eq!(forwarded(), 1, "only the request to the big target");
    drop(control);
    drop(raw.control);
    gw.stop().await;
}

// --- §2.3/§2.4: the control connection after the reply --------------------------------------

/// PROTOCOL.md §2.3: one request per control connection; after the UDP ASSOCIATE reply of
/// a standard client (methods 0x00 and 0x02) the connection stays idle and bytes the client
/// sends on it are ignored: a second request gets no reply and opens nothing, garbage does
/// not close the connection, and the association keeps working.
#[tokio::test]
async fn bytes_after_the_associate_reply_are_ignored_for_methods_00_and_02() {
    let pki = pki();
    let mut s = settings(&pki);
    let line = format!("alice:{}\n", sudp::auth::hash_password(b"pw").unwrap());
    s.auth.users = Some(Arc::new(sudp::auth::Users::parse(&line, "test").unwrap()));
    let gw = TestGateway::start(s).await;
    let echo = udp_echo().await;
    for creds in [None, Some(("alice", "pw"))] {
        let before = gw.metrics.associations.load(Ordering::Relaxed);
        let mut control = connect_tls(&gw.options(&pki)).await.unwrap();
        authenticate_plain(&mut control, creds).await.unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let me = Address::Ip(sock.local_addr().unwrap());
        let bnd = request(&mut control, Command::UdpAssociate, &me).await.unwrap();
        let Address::Ip(relay) = bnd else {
            panic!("BND is a domain")
        };
        // A second request (UDP ASSOCIATE, then CONNECT), then bytes that are no request.
        let mut out = Vec::new();
        socks::encode_request(Command::UdpAssociate.to_u8(), &me.as_ref(), &mut out).unwrap();
        socks::encode_request(Command::Connect.to_u8(), &Address::Ip(echo).as_ref(), &mut out).unwrap();
        out.extend_from_slice(&[0xff; 100]);
        control.write_all(&out).await.unwrap();
        control.flush().await.unwrap();
        let mut reply = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_millis(400), control.read(&mut reply)).await;
        assert!(r.is_err(), "{creds:?}: the gateway answered or closed: {r:?}");
        assert_eq!(
            gw.metrics.associations.load(Ordering::Relaxed),
            before + 1,
            "{creds:?}: one association per connection"
        );
        let mut d = vec![0u8; 64];
        let n = socks::encode_udp_header(&Address::Ip(echo).as_ref(), &mut d).unwrap();
        d.truncate(n);
        d.extend_from_slice(b"still");
        sock.send_to(&d, relay).await.unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(buf[..n].ends_with(b"still"), "{creds:?}");
        drop(control);
    }
    gw.stop().await;
}

/// PROTOCOL.md §2.3: "a CONNECT after method 0x80 is served as after method 0x00; the
/// association id and keys then go unused".
#[tokio::test]
async fn connect_after_method_0x80_is_served() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = tcp_echo().await;
    let opts = gw.options(&pki);
    let mut control = connect_tls(&opts).await.unwrap();
    negotiate_sudp(&mut control, &opts).await.unwrap();
    let bnd = request(&mut control, Command::Connect, &Address::Ip(echo))
        .await
        .unwrap();
    assert!(matches!(bnd, Address::Ip(_)), "{bnd:?}");
    control.write_all(b"through 0x80").await.unwrap();
    let mut back = [0u8; 12];
    tokio::time::timeout(WAIT, control.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"through 0x80");
    assert_eq!(gw.metrics.associations.load(Ordering::Relaxed), 0);
    gw.stop().await;
}

/// PROTOCOL.md §2.2: a wrong password on method 0x80 gets SudpAccept AUTH_FAILED exactly
/// (`01 01 00` and a zero id), then the gateway closes; RFC 1929 §2: on method 0x02 the
/// status is `01 01` (version 1, failure) and the connection closes.
#[tokio::test]
async fn auth_failed_replies_are_exact_and_the_gateway_closes() {
    let pki = pki();
    let mut s = settings(&pki);
    let line = format!("alice:{}\n", sudp::auth::hash_password(b"right").unwrap());
    s.auth.no_auth = false;
    s.auth.users = Some(Arc::new(sudp::auth::Users::parse(&line, "test").unwrap()));
    let gw = TestGateway::start(s).await;

    let mut c = connect_tls(&gw.options(&pki)).await.unwrap();
    let mut msg = vec![5, 1, method::SUDP, 1, 1, 0x01, 5];
    msg.extend_from_slice(b"alice");
    msg.push(5);
    msg.extend_from_slice(b"wrong");
    c.write_all(&msg).await.unwrap();
    let rest = read_until_closed(&mut c).await;
    let mut want = vec![5, method::SUDP];
    want.extend_from_slice(
        &SudpAccept {
            status: socks::sudp_status::AUTH_FAILED,
            suite: 0,
            assoc: AssociationId(0),
        }
        .encode(),
    );
    assert_eq!(
        rest, want,
        "05 80, then AUTH_FAILED with suite 0 and id 0, then close"
    );
    assert_eq!(&want[2..], &[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);

    let mut c = connect_tls(&gw.options(&pki)).await.unwrap();
    let mut msg = vec![5, 1, method::USERPASS, 1, 5];
    msg.extend_from_slice(b"alice");
    msg.push(5);
    msg.extend_from_slice(b"wrong");
    c.write_all(&msg).await.unwrap();
    let rest = read_until_closed(&mut c).await;
    assert_eq!(rest, [5, method::USERPASS, 1, 1], "RFC 1929 failure, then close");
    gw.stop().await;
}

/// RFC 1928 §4/§6: a request with an address type the gateway does not know gets REP
/// 0x08 (address type not supported), and the gateway closes.
#[tokio::test]
async fn an_unknown_address_type_gets_reply_0x08() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let mut c = connect_tls(&gw.options(&pki)).await.unwrap();
    authenticate_plain(&mut c, None).await.unwrap();
    c.write_all(&[5, 1, 0, 0x05, 127, 0, 0, 1, 0, 80]).await.unwrap();
    let rest = read_until_closed(&mut c).await;
    assert!(rest.len() >= 2, "no reply: {rest:02x?}");
    assert_eq!(&rest[..2], &[5, 0x08], "{rest:02x?}");
    gw.stop().await;
}

// --- §11: TLS 1.2 only with the extended master secret --------------------------------------

/// PROTOCOL.md §11: "an implementation MUST NOT derive sudp keys from a TLS 1.2 session
/// without EMS". A gateway that allows TLS 1.2 refuses a TLS 1.2 handshake without the
/// extension (Python's ssl over OpenSSL with SSL_OP_NO_EXTENDED_MASTER_SECRET, bit 0 in
/// OpenSSL 3) and completes one with it (so the refusal is about EMS, not TLS 1.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_without_extended_master_secret_is_refused() {
    if !tool_available("python3 with ssl", "/usr/bin/python3", &["-c", "import ssl"]) {
        return;
    }
    let pki = pki();
    let dir = TempDir::new("ems");
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let mut s = settings(&pki);
    s.tls = sudp::tls::server_config(sudp::tls::ServerTlsOptions {
        cert_chain: pki.gateway_chain(),
        key: pki.gateway_key(),
        client_ca: None,
        require_client_cert: false,
        client_crls: Vec::new(),
        allow_tls12: true,
    })
    .unwrap();
    let gw = TestGateway::start(s).await;
    let script = r#"
import socket, ssl, sys
port, ca, no_ems = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
if no_ems:
    ctx.options |= 1  # SSL_OP_NO_EXTENDED_MASTER_SECRET (OpenSSL 3)
try:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(bytes([5, 1, 0]))
            print("ok", s.version(), s.recv(2).hex())
except (ssl.SSLError, ConnectionError) as e:
    print("refused", type(e).__name__, e)
"#;
    let port = gw.control.port().to_string();
    let ca = dir.path().join("ca.pem");
    let run = move |no_ems: &str| {
        let child = std::process::Command::new("/usr/bin/python3")
            .args(["-c", script, &port])
            .arg(&ca)
            .arg(no_ems)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = output_within(child, WAIT, "python3 TLS 1.2 client");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let (with, without) = tokio::task::spawn_blocking(move || (run("0"), run("1")))
        .await
        .unwrap();
    assert_eq!(with, "ok TLSv1.2 0500", "TLS 1.2 with EMS works");
    assert!(without.starts_with("refused"), "TLS 1.2 without EMS: {without}");
    gw.stop().await;
}
