//! The gateway's control side and naked UDP, driven by a standard RFC 1928/1929 client
//! inside TLS (no sudp-specific bytes), plus the refusals and their reply codes.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sudp::auth::{hash_password, Users};
use sudp::client::{authenticate_plain, connect_tls, request, ClientError, Control, SecureUdp};
use sudp::policy::Policy;
use sudp::proto::socks::{self, Address, Command, ReplyCode};
use sudp::proto::DropReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// A standard SOCKS5 UDP client: UDP ASSOCIATE over TLS, RFC 1928 §7 datagrams.
struct NakedClient {
    _control: Control,
    socket: UdpSocket,
    relay: SocketAddr,
}

impl NakedClient {
    async fn connect(gw: &TestGateway, pki: &sudp::cert::DevPki, announce_port: bool) -> NakedClient {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut control = connect_tls(&gw.options(pki)).await.unwrap();
        authenticate_plain(&mut control, None).await.unwrap();
        let dst = if announce_port {
            Address::Ip(socket.local_addr().unwrap())
        } else {
            Address::Ip("0.0.0.0:0".parse().unwrap())
        };
        let bnd = request(&mut control, Command::UdpAssociate, &dst).await.unwrap();
        let Address::Ip(relay) = bnd else {
            panic!("BND is a domain")
        };
        assert!(!relay.ip().is_unspecified(), "BND.ADDR must be usable");
        assert_eq!(relay, gw.relay);
        NakedClient {
            _control: control,
            socket,
            relay,
        }
    }

    async fn send(&self, target: &Address, payload: &[u8]) {
        let mut d = vec![0u8; 300];
        let n = socks::encode_udp_header(&target.as_ref(), &mut d).unwrap();
        d.truncate(n);
        d.extend_from_slice(payload);
        self.socket.send_to(&d, self.relay).await.unwrap();
    }

    async fn recv(&self) -> (Address, Vec<u8>) {
        let mut buf = vec![0u8; 65_536];
        let (n, from) = tokio::time::timeout(WAIT, self.socket.recv_from(&mut buf))
            .await
            .expect("reply in time")
            .unwrap();
        assert_eq!(from, self.relay);
        let h = socks::parse_udp_header(&buf[..n]).unwrap();
        (h.addr.to_owned(), buf[h.payload_offset..n].to_vec())
    }
}

/// Sends a raw request after no-auth negotiation and returns the reply code.
async fn raw_request_code(gw: &TestGateway, pki: &sudp::cert::DevPki, cmd: u8, dst: &Address) -> u8 {
    let mut c = connect_tls(&gw.options(pki)).await.unwrap();
    authenticate_plain(&mut c, None).await.unwrap();
    let mut out = Vec::new();
    socks::encode_request(cmd, &dst.as_ref(), &mut out).unwrap();
    c.write_all(&out).await.unwrap();
    let mut reply = [0u8; 10];
    tokio::time::timeout(WAIT, c.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply[0], 5);
    reply[1]
}

#[tokio::test]
async fn connect_relays_one_mebibyte_each_way_with_half_close() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    // Target: reads until EOF (the client's half-close), then answers with 1 MiB of its own.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    let upload: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let download: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    let (up, down) = (upload.clone(), download.clone());
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, up, "upload byte-exact");
        s.write_all(&down).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let opts = gw.options(&pki);
    let mut s = sudp::client::connect_tcp(&opts, &Address::Ip(target))
        .await
        .unwrap();
    s.write_all(&upload).await.unwrap();
    s.shutdown().await.unwrap(); // half-close: the download must still arrive
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), download.len());
    assert!(got == download, "download byte-exact");
    tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn connect_by_domain_name() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = tcp_echo().await;
    let mut s = sudp::client::connect_tcp(
        &gw.options(&pki),
        &Address::Domain("localhost".into(), echo.port()),
    )
    .await
    .unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut b = [0u8; 5];
    tokio::time::timeout(WAIT, s.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"hello");
    gw.stop().await;
}

#[tokio::test]
async fn naked_udp_echo_and_naked_beside_secure_on_one_relay() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let naked = NakedClient::connect(&gw, &pki, false).await;
    let secure = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    assert_eq!(secure.relay(), naked.relay, "one relay socket serves both kinds");
    let mut buf = vec![0u8; 65_536];
    for i in 0..50u32 {
        let size = [1usize, 200, 1200, 9000, 60_000][i as usize % 5];
        let p: Vec<u8> = (0..size).map(|k| (k as u32 ^ i) as u8).collect();
        naked.send(&Address::Ip(echo), &p).await;
        secure.send_to(&p, &Address::Ip(echo)).await.unwrap();
        let (from, got) = naked.recv().await;
        assert_eq!(from, Address::Ip(echo));
        assert_eq!(got, p);
        let (n, from) = tokio::time::timeout(WAIT, secure.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from, Address::Ip(echo));
        assert_eq!(&buf[..n], &p[..]);
    }
    // Domain target on the naked path too.
    naked
        .send(&Address::Domain("localhost".into(), echo.port()), b"by name")
        .await;
    assert_eq!(naked.recv().await.1, b"by name");
    assert_eq!(gw.metrics.total_drops(), 0, "{}", gw.metrics.drop_summary());
    gw.stop().await;
}

/// A naked UDP ASSOCIATE announcing `from` as the client's address; the association lives
/// as long as the returned control connection.
async fn naked_association(gw: &TestGateway, pki: &sudp::cert::DevPki, from: SocketAddr) -> Control {
    let mut control = connect_tls(&gw.options(pki)).await.unwrap();
    authenticate_plain(&mut control, None).await.unwrap();
    let bnd = request(&mut control, Command::UdpAssociate, &Address::Ip(from))
        .await
        .unwrap();
    assert_eq!(bnd, Address::Ip(gw.relay));
    control
}

/// A naked association that ended takes its client address out of the relay's table: a
/// datagram from that address is then dropped (`foreign_source`), not relayed by the dead
/// association's socket. And ending one association leaves alone another that announced
/// the same address after it (the table holds the newest).
#[tokio::test]
async fn an_ended_naked_association_relays_nothing_more_and_leaves_its_successor_alone() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let active = || gw.metrics.associations_active.load(Ordering::Relaxed);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = socket.local_addr().unwrap();
    let datagram = |payload: &[u8]| {
        let mut d = vec![0u8; 64];
        let n = socks::encode_udp_header(&Address::Ip(echo).as_ref(), &mut d).unwrap();
        d.truncate(n);
        d.extend_from_slice(payload);
        d
    };
    let mut buf = vec![0u8; 2048];
    let mut echoed = async |payload: &[u8]| {
        socket.send_to(&datagram(payload), gw.relay).await.unwrap();
        let (n, from) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
            .await
            .expect("reply in time")
            .unwrap();
        assert_eq!(from, gw.relay);
        let h = socks::parse_udp_header(&buf[..n]).unwrap();
        assert_eq!(&buf[h.payload_offset..n], payload);
    };

    let first = naked_association(&gw, &pki, me).await;
    echoed(b"while open").await;
    drop(first);
    eventually(|| active() == 0).await;
    let forwarded = gw.metrics.forwarded.load(Ordering::Relaxed);
    socket
        .send_to(&datagram(b"after the end"), gw.relay)
        .await
        .unwrap();
    eventually(|| gw.metrics.drops(DropReason::ForeignSource) == 1).await;
    assert_eq!(gw.metrics.forwarded.load(Ordering::Relaxed), forwarded);

    // Two associations announce one address; the older one ends; the newer still relays.
    let older = naked_association(&gw, &pki, me).await;
    let newer = naked_association(&gw, &pki, me).await;
    eventually(|| active() == 2).await;
    drop(older);
    eventually(|| active() == 1).await;
    echoed(b"the newer one").await;
    drop(newer);
    assert_eq!(gw.metrics.total_drops(), 1, "{}", gw.metrics.drop_summary());
    gw.stop().await;
}

#[tokio::test]
async fn foreign_sources_and_fragments_are_dropped() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let naked = NakedClient::connect(&gw, &pki, true).await;
    naked.send(&Address::Ip(echo), b"mine").await;
    assert_eq!(naked.recv().await.1, b"mine");

    // Same IP, another port: not the client's announced port.
    let intruder = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut d = vec![0u8; 64];
    let n = socks::encode_udp_header(&Address::Ip(echo).as_ref(), &mut d).unwrap();
    intruder.send_to(&d[..n], gw.relay).await.unwrap();
    eventually(|| gw.metrics.drops(DropReason::ForeignSource) == 1).await;

    // FRAG != 0 from the real client.
    d[2] = 1;
    naked.socket.send_to(&d[..n], gw.relay).await.unwrap();
    eventually(|| gw.metrics.drops(DropReason::Fragmented) == 1).await;

    // A secure record for a live association from another IP (127.0.0.2 is loopback too).
    let secure = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let mut rec = vec![0u8; 53];
    rec[..5].copy_from_slice(&[0x97, 3, 3, 0, 48]);
    rec[5..13].copy_from_slice(&secure.assoc().to_bytes());
    // A nonce ahead of the window (the association's own probe took nonce 0), so the
    // record gets as far as the tag.
    rec[13..21].copy_from_slice(&1000u64.to_be_bytes());
    other.send_to(&rec, gw.relay).await.unwrap();
    eventually(|| gw.metrics.drops(DropReason::ForeignSource) == 2).await;
    // Same from the right IP: reaches the tag check and fails there.
    UdpSocket::bind("127.0.0.1:0")
        .await
        .unwrap()
        .send_to(&rec, gw.relay)
        .await
        .unwrap();
    eventually(|| gw.metrics.drops(DropReason::BadMac) == 1).await;

    // Nothing of this hurt the real client.
    naked.send(&Address::Ip(echo), b"still here").await;
    assert_eq!(naked.recv().await.1, b"still here");
    gw.stop().await;
}

#[tokio::test]
async fn unsolicited_replies_are_dropped_unless_full_cone() {
    for full_cone in [false, true] {
        let pki = pki();
        let mut s = settings(&pki);
        s.full_cone = full_cone;
        let gw = TestGateway::start(s).await;
        let naked = NakedClient::connect(&gw, &pki, true).await;
        // A target that answers from a second socket the client never sent to.
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let target = a.local_addr().unwrap();
        naked.send(&Address::Ip(target), b"hi").await;
        let mut buf = [0u8; 64];
        let (_, from) = tokio::time::timeout(WAIT, a.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        b.send_to(b"from elsewhere", from).await.unwrap();
        if full_cone {
            let (src, got) = naked.recv().await;
            assert_eq!(src, Address::Ip(b.local_addr().unwrap()));
            assert_eq!(got, b"from elsewhere");
        } else {
            eventually(|| gw.metrics.drops(DropReason::UnsolicitedReply) == 1).await;
        }
        gw.stop().await;
    }
}

#[tokio::test]
async fn refusals_get_the_rfc_reply_and_others_lose_nothing() {
    let pki = pki();
    let mut s = settings(&pki);
    // Names come from a table the test owns: `no-such-host.invalid` fails there, without a
    // DNS query leaving the machine.
    s.resolver = Arc::new(sudp::net::dns::StaticResolve::localhost());
    // Only 127.0.0.1 is allowed; 127.0.0.3 falls to the default (loopback denied).
    s.policy = Arc::new(Policy::new(
        vec![sudp::policy::Rule::parse(sudp::policy::Action::Allow, "127.0.0.1/32").unwrap()],
        Default::default(),
    ));
    let gw = TestGateway::start(s).await;
    let echo = udp_echo().await;
    let secure = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    // A stream that runs through every refusal below.
    let stream = tokio::spawn({
        let echo = Address::Ip(echo);
        async move {
            let mut buf = vec![0u8; 2048];
            for i in 0..200u32 {
                secure.send_to(&i.to_be_bytes(), &echo).await.unwrap();
                let (n, _) = tokio::time::timeout(WAIT, secure.recv_from(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(&buf[..n], &i.to_be_bytes());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let denied = Address::Ip("127.0.0.3:80".parse().unwrap());
    assert_eq!(
        raw_request_code(&gw, &pki, 1, &denied).await,
        ReplyCode::NotAllowed as u8
    );
    assert_eq!(
        raw_request_code(&gw, &pki, 2, &denied).await,
        ReplyCode::CommandNotSupported as u8,
        "BIND"
    );
    assert_eq!(
        raw_request_code(&gw, &pki, 0x09, &denied).await,
        ReplyCode::CommandNotSupported as u8
    );
    // Connection refused: a port nobody listens on (held, so nobody else takes it).
    let (_held, closed) = refusing_tcp_addr();
    assert_eq!(
        raw_request_code(&gw, &pki, 1, &Address::Ip(closed)).await,
        ReplyCode::ConnectionRefused as u8
    );
    assert_eq!(
        raw_request_code(&gw, &pki, 1, &Address::Domain("no-such-host.invalid".into(), 80)).await,
        ReplyCode::HostUnreachable as u8
    );
    // Naked datagrams to a denied destination are dropped and counted.
    let naked = NakedClient::connect(&gw, &pki, true).await;
    naked.send(&denied, b"nope").await;
    eventually(|| gw.metrics.drops(DropReason::PolicyDenied) == 1).await;
    tokio::time::timeout(Duration::from_secs(30), stream)
        .await
        .unwrap()
        .unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn wrong_password_gets_rfc1929_failure_and_connection_closes() {
    let pki = pki();
    let mut s = settings(&pki);
    let line = format!("alice:{}\n", hash_password(b"correct horse").unwrap());
    s.auth.no_auth = false;
    s.auth.users = Some(Arc::new(Users::parse(&line, "test").unwrap()));
    let gw = TestGateway::start(s).await;
    let echo = tcp_echo().await;

    let mut c = connect_tls(&gw.options(&pki)).await.unwrap();
    let err = authenticate_plain(&mut c, Some(("alice", "wrong")))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::AuthFailed), "{err}");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, c.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed after failure");

    // No-auth is not offered: 0xFF.
    let mut c = connect_tls(&gw.options(&pki)).await.unwrap();
    assert!(matches!(
        authenticate_plain(&mut c, None).await,
        Err(ClientError::NoAcceptableMethod)
    ));

    // The sudp method with wrong and right credentials.
    let mut o = gw.options(&pki);
    o.credentials = Some(("alice".into(), "nope".into()));
    assert!(matches!(
        SecureUdp::connect(&o).await,
        Err(ClientError::AuthFailed)
    ));
    o.credentials = Some(("alice".into(), "correct horse".into()));
    SecureUdp::connect(&o).await.unwrap();

    // Right password works for CONNECT.
    let mut s = sudp::client::connect_tcp(&o, &Address::Ip(echo)).await.unwrap();
    s.write_all(b"ok").await.unwrap();
    let mut b = [0u8; 2];
    tokio::time::timeout(WAIT, s.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        gw.metrics
            .auth_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    gw.stop().await;
}

#[tokio::test]
async fn mtls_client_certificate_is_required_and_identifies_the_user() {
    let pki = pki();
    let mut s = settings(&pki);
    s.tls = server_tls(&pki, true, true);
    s.auth.no_auth = false;
    let gw = TestGateway::start(s).await;
    let echo = udp_echo().await;
    // Without a certificate the handshake is refused.
    let r = async {
        let mut c = connect_tls(&gw.options(&pki)).await?;
        authenticate_plain(&mut c, None).await
    }
    .await;
    // TLS 1.3: the server's verdict on the missing certificate arrives with the client's
    // first read, as the alert `certificate_required` (RFC 8446 §4.4.2.4).
    assert!(
        matches!(&r, Err(ClientError::Io(e)) if alert(e) == Some(rustls::AlertDescription::CertificateRequired)),
        "a client without certificate must not get through: {r:?}"
    );
    // With one, no password is needed: identity comes from the certificate.
    let mut o = gw.options(&pki);
    o.tls = client_tls(&pki, true);
    let udp = SecureUdp::connect(&o).await.unwrap();
    udp.send_to(b"mtls", &Address::Ip(echo)).await.unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"mtls");
    gw.stop().await;
}

#[tokio::test]
async fn association_ends_with_its_control_connection_and_on_idle() {
    let pki = pki();
    let mut s = settings(&pki);
    s.idle_timeout = Duration::from_millis(300);
    let gw = TestGateway::start(s).await;
    let udp = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    assert!(!udp.is_closed());
    // No traffic: the gateway closes it after the idle timeout, and says why (CLOSE frame).
    let deadline = tokio::time::Instant::now() + WAIT;
    while !udp.is_closed() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle association not closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let why = udp.close_reason().unwrap();
    assert!(why.contains("idle timeout"), "{why}");
    eventually(|| gw.metrics.associations_active.load(Ordering::Relaxed) == 0).await;

    // The other half: the client closes its control connection, and the association ends
    // with it (its id is unknown to the relay from then on).
    let mut s = settings(&pki);
    s.idle_timeout = Duration::from_secs(60);
    let gw2 = TestGateway::start(s).await;
    let RawSecure {
        control,
        assoc,
        keys,
        socket,
        relay,
    } = raw_secure(&gw2, &pki).await;
    assert_eq!(gw2.metrics.associations_active.load(Ordering::Relaxed), 1);
    drop(control);
    eventually(|| gw2.metrics.associations_active.load(Ordering::Relaxed) == 0).await;
    let (mut tx, _) = keys.into_sessions(assoc, sudp::proto::Role::Client, 1024);
    let mut rec = vec![0u8; 256];
    let echo = udp_echo().await;
    let n = tx
        .seal(&sudp::proto::socks::AddrRef::Ip(echo), b"late", &mut rec)
        .unwrap();
    socket.send_to(&rec[..n], relay).await.unwrap();
    eventually(|| gw2.metrics.drops(DropReason::UnknownAssociation) == 1).await;
    assert_eq!(gw2.metrics.forwarded.load(Ordering::Relaxed), 0);
    gw2.stop().await;
    gw.stop().await;
}

#[tokio::test]
async fn association_limit_answers_general_failure_and_frees_on_close() {
    let pki = pki();
    let mut s = settings(&pki);
    s.max_associations = 1;
    let gw = TestGateway::start(s).await;
    let first = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    let err = SecureUdp::connect(&gw.options(&pki))
        .await
        .err()
        .expect("second association refused");
    assert!(
        matches!(err, ClientError::Refused(ReplyCode::GeneralFailure)),
        "{err}"
    );
    // Naked associations count against the same limit.
    let mut c = connect_tls(&gw.options(&pki)).await.unwrap();
    authenticate_plain(&mut c, None).await.unwrap();
    let r = request(
        &mut c,
        Command::UdpAssociate,
        &Address::Ip("0.0.0.0:0".parse().unwrap()),
    )
    .await;
    assert!(matches!(r, Err(ClientError::Refused(ReplyCode::GeneralFailure))));
    // Closing the first frees the slot.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match SecureUdp::connect(&gw.options(&pki)).await {
            Ok(_) => break,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "slot never freed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    gw.stop().await;
}

/// PROTOCOL.md §2.2: no offered suite the gateway allows gets NO_SUITE (0x02), then the
/// gateway closes; the library client reports `NoSuite`.
#[tokio::test]
async fn no_common_suite_gets_no_suite_and_the_connection_closes() {
    use sudp::proto::CipherSuite;
    let pki = pki();
    let mut s = settings(&pki);
    s.suites = vec![CipherSuite::Aes256CbcHmacSha256];
    let gw = TestGateway::start(s).await;
    // Raw: greeting and a hello offering suite 0x01 only, without credentials.
    let mut c = connect_tls(&gw.options(&pki)).await.unwrap();
    c.write_all(&[5, 1, 0x80, 0x01, 1, 0x01, 0]).await.unwrap();
    let mut reply = [0u8; 2 + 11];
    tokio::time::timeout(WAIT, c.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&reply[..2], &[5, 0x80], "method 0x80 selected");
    assert_eq!(
        &reply[2..],
        &[1, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        "NO_SUITE, suite 0, id 0"
    );
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(WAIT, c.read(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the gateway closes after the refusal");
    // The library client says so.
    let mut opts = gw.options(&pki);
    opts.suites = vec![CipherSuite::Aes128CbcHmacSha256];
    let err = SecureUdp::connect(&opts).await.err().expect("refused");
    assert!(matches!(err, ClientError::NoSuite), "{err}");
    gw.stop().await;
}

/// PROTOCOL.md §2.2: a malformed SudpHello (NSUITES = 0) gets no reply: the gateway closes.
#[tokio::test]
async fn a_malformed_hello_is_closed_without_a_reply() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    for hello in [
        &[1u8, 0, 0][..],
        &[2, 1, 1, 0],
        &[1, 17, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
    ] {
        let mut c = connect_tls(&gw.options(&pki)).await.unwrap();
        let mut msg = vec![5, 1, 0x80];
        msg.extend_from_slice(hello);
        c.write_all(&msg).await.unwrap();
        let mut sel = [0u8; 2];
        tokio::time::timeout(WAIT, c.read_exact(&mut sel))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sel, [5, 0x80]);
        let mut rest = [0u8; 16];
        let n = tokio::time::timeout(WAIT, c.read(&mut rest))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "hello {hello:?}: no SudpAccept, the connection closes");
    }
    gw.stop().await;
}

/// PROTOCOL.md §5/§11: a secure association never accepts naked datagrams (no downgrade):
/// a naked datagram from the secure client's own socket is refused, nothing forwarded.
#[tokio::test]
async fn a_secure_association_never_accepts_naked_datagrams() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let raw = raw_secure(&gw, &pki).await;
    let mut d = vec![0u8; 64];
    let n = socks::encode_udp_header(&Address::Ip(echo).as_ref(), &mut d).unwrap();
    d[n..n + 5].copy_from_slice(b"naked");
    raw.socket.send_to(&d[..n + 5], raw.relay).await.unwrap();
    eventually(|| gw.metrics.drops(DropReason::ForeignSource) == 1).await;
    assert_eq!(gw.metrics.forwarded.load(Ordering::Relaxed), 0);
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), raw.socket.recv_from(&mut buf))
            .await
            .is_err()
    );
    gw.stop().await;
}

/// The TLS alert the peer sent, when `e` is one (rustls reports it inside an I/O error).
fn alert(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// The largest naked reply that fits one datagram with its SOCKS5 header (65 507 bytes over
/// IPv4: 10 of header for an IPv4 source, 65 497 of payload) is relayed whole; one byte more
/// cannot be, and is dropped and counted as `too_large`, and the association goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_naked_reply_is_relayed_and_one_byte_more_is_counted() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let naked = NakedClient::connect(&gw, &pki, true).await;
    let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = Address::Ip(target.local_addr().unwrap());
    naked.send(&to, b"hi").await;
    let mut buf = vec![0u8; 65_536];
    let (_, outbound) = tokio::time::timeout(WAIT, target.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let max = 65_507 - 10;
    let big: Vec<u8> = (0..max).map(|i| (i % 251) as u8).collect();
    target.send_to(&big, outbound).await.unwrap();
    let (from, got) = naked.recv().await;
    assert_eq!(from, to);
    assert!(
        got == big,
        "the largest reply arrives whole ({} bytes)",
        got.len()
    );
    let mut over = big.clone();
    over.push(0);
    target.send_to(&over, outbound).await.unwrap();
    eventually(|| gw.metrics.drops(DropReason::TooLarge) == 1).await;
    target.send_to(b"after", outbound).await.unwrap();
    assert_eq!(naked.recv().await.1, b"after");
    gw.stop().await;
}
