//! The AEAD suites end to end (PROTOCOL.md §3.2, §4.7): an association negotiated with
//! AES-128-GCM or ChaCha20-Poly1305 through the in-process gateway echoes datagrams of every
//! size, single and in trains (the gateway cuts reply trains by the suite's record length);
//! a tampered record is dropped as `bad_mac` and moves nothing; CBC stays what a default
//! client negotiates.

mod common;

use std::time::Duration;

use common::*;
use sudp::client::{connect_tls, negotiate_sudp, request, SecureUdp};
use sudp::proto::record;
use sudp::proto::socks::{AddrRef, Address, Command};
use sudp::proto::{CipherSuite, DropReason, Role};
use tokio::net::UdpSocket;

const AEADS: [CipherSuite; 2] = [CipherSuite::Aes128Gcm, CipherSuite::ChaCha20Poly1305];

#[tokio::test]
async fn each_aead_suite_echoes_single_datagrams_and_trains() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    for suite in AEADS {
        let mut opts = gw.options(&pki);
        opts.suites = vec![suite];
        let udp = SecureUdp::connect(&opts).await.unwrap();
        assert_eq!(udp.suite(), suite);
        let mut buf = vec![0u8; 65_536];
        // Every size, including ones no CBC record has (AEAD records are not block-padded).
        for size in [
            0usize,
            1,
            9,
            15,
            16,
            17,
            160,
            1200,
            8191,
            60_000,
            record::MAX_PLAINTEXT - 7,
        ] {
            let payload: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
            udp.send_to(&payload, &Address::Ip(echo)).await.unwrap();
            let (n, from) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], &payload[..], "{suite} {size}");
            assert_eq!(from, Address::Ip(echo));
        }
        // A burst of equal datagrams: the echo answers them back to back, so the gateway's
        // reply loop seals them as trains (GSO segments of the record length).
        let burst = 64u32;
        for i in 0..burst {
            let mut p = vec![0u8; 200];
            p[..4].copy_from_slice(&i.to_be_bytes());
            udp.send_to(&p, &Address::Ip(echo)).await.unwrap();
        }
        let mut got = 0;
        while got < burst {
            match tokio::time::timeout(Duration::from_secs(2), udp.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) => {
                    assert_eq!(n, 200);
                    got += 1;
                }
                _ => break,
            }
        }
        // Loopback may drop a few of a burst under load; a wrong train cut drops them all.
        assert!(got >= burst / 2, "{suite}: {got} of {burst} echoed");
        assert_eq!(gw.metrics.drops(DropReason::LengthMismatch), 0);
        assert_eq!(gw.metrics.drops(DropReason::BadCiphertextLength), 0);
        assert_eq!(gw.metrics.drops(DropReason::BadMac), 0);
        drop(udp);
    }
    gw.stop().await;
}

/// An association opened from the library's parts with `suite`, so the test writes its own
/// records.
async fn raw(gw: &TestGateway, pki: &sudp::cert::DevPki, suite: CipherSuite) -> RawSecure {
    let mut opts = gw.options(pki);
    opts.suites = vec![suite];
    let mut control = connect_tls(&opts).await.unwrap();
    let (got, assoc) = negotiate_sudp(&mut control, &opts).await.unwrap();
    assert_eq!(got, suite);
    let keys = sudp::tls::export_keys(control.get_ref().1, assoc, suite).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
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
    RawSecure {
        control,
        assoc,
        keys,
        socket,
        relay,
    }
}

#[tokio::test]
async fn a_tampered_aead_record_is_dropped_as_bad_mac() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    for suite in AEADS {
        let r = raw(&gw, &pki, suite).await;
        let (mut send, mut recv) = r.keys.into_sessions(r.assoc, Role::Client, 1024);
        let mut rec = vec![0u8; 256];
        let mut buf = vec![0u8; 2048];
        let before = gw.metrics.drops(DropReason::BadMac);
        let dst = AddrRef::Ip(echo);
        // 1: genuine, 37 + 7 + 5 = 49 bytes (shorter than any CBC record): echoed.
        let n = send.seal(&dst, b"hello", &mut rec).unwrap();
        assert_eq!(n, 49);
        r.socket.send_to(&rec[..n], r.relay).await.unwrap();
        let (m, _) = tokio::time::timeout(WAIT, r.socket.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(recv.open(&mut buf[..m]).unwrap().data().unwrap().1, b"hello");
        // 2: a fresh record with one ciphertext bit, then one tag bit, flipped: dropped as
        // `bad_mac`, nothing echoed, the nonce left free (the genuine record opens after).
        let n = send.seal(&dst, b"tamper", &mut rec).unwrap();
        let genuine = rec[..n].to_vec();
        for at in [record::PREFIX_LEN + 3, n - 1] {
            let mut bad = genuine.clone();
            bad[at] ^= 0x40;
            r.socket.send_to(&bad, r.relay).await.unwrap();
        }
        // A truncated copy (length field fixed up) is a bad tag too.
        let mut short = genuine[..n - 2].to_vec();
        let f = (short.len() - record::HEADER_LEN) as u16;
        short[3..5].copy_from_slice(&f.to_be_bytes());
        r.socket.send_to(&short, r.relay).await.unwrap();
        eventually(|| gw.metrics.drops(DropReason::BadMac) == before + 3).await;
        let quiet = tokio::time::timeout(Duration::from_millis(200), r.socket.recv_from(&mut buf)).await;
        assert!(quiet.is_err(), "{suite}: a tampered record was forwarded");
        r.socket.send_to(&genuine, r.relay).await.unwrap();
        let (m, _) = tokio::time::timeout(WAIT, r.socket.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(recv.open(&mut buf[..m]).unwrap().data().unwrap().1, b"tamper");
        // A replay of it is a duplicate; another association's id is unknown.
        let dup = gw.metrics.drops(DropReason::Duplicate);
        r.socket.send_to(&genuine, r.relay).await.unwrap();
        eventually(|| gw.metrics.drops(DropReason::Duplicate) == dup + 1).await;
        // Another association's id: a 50-byte record that no AEAD association claims gets
        // CBC's verdict (`truncated`, PROTOCOL.md §4.7); one of a CBC length is unknown.
        let (unknown, truncated) = (
            gw.metrics.drops(DropReason::UnknownAssociation),
            gw.metrics.drops(DropReason::Truncated),
        );
        let mut other = genuine.clone();
        other[record::ASSOC_OFFSET] ^= 0xff;
        r.socket.send_to(&other, r.relay).await.unwrap();
        eventually(|| gw.metrics.drops(DropReason::Truncated) == truncated + 1).await;
        let n = send.seal(&dst, &[0; 25], &mut rec).unwrap();
        assert_eq!(n, 21 + 32 + 16);
        rec[record::ASSOC_OFFSET] ^= 0xff;
        r.socket.send_to(&rec[..n], r.relay).await.unwrap();
        eventually(|| gw.metrics.drops(DropReason::UnknownAssociation) == unknown + 1).await;
        drop(r.control);
    }
    gw.stop().await;
}

#[tokio::test]
async fn cbc_stays_the_default_and_the_gateway_list_decides() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    // A default client offers every suite, CBC first: it gets suite 1.
    let udp = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    assert_eq!(udp.suite(), CipherSuite::Aes128CbcHmacSha256);
    drop(udp);
    // A client preferring GCM gets it from a default gateway.
    let mut opts = gw.options(&pki);
    opts.suites = vec![CipherSuite::Aes128Gcm, CipherSuite::Aes128CbcHmacSha256];
    assert_eq!(
        SecureUdp::connect(&opts).await.unwrap().suite(),
        CipherSuite::Aes128Gcm
    );
    gw.stop().await;
    // A gateway allowing CBC only gives that client CBC, and the association works.
    let mut s = settings(&pki);
    s.suites = vec![CipherSuite::Aes128CbcHmacSha256];
    let gw = TestGateway::start(s).await;
    let mut opts = gw.options(&pki);
    opts.suites = vec![CipherSuite::ChaCha20Poly1305, CipherSuite::Aes128CbcHmacSha256];
    let udp = SecureUdp::connect(&opts).await.unwrap();
    assert_eq!(udp.suite(), CipherSuite::Aes128CbcHmacSha256);
    udp.send_to(b"x", &Address::Ip(echo)).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"x");
    // AEAD only against CBC only: no suite in common, refused.
    opts.suites = vec![CipherSuite::ChaCha20Poly1305];
    assert!(SecureUdp::connect(&opts).await.is_err());
    gw.stop().await;
}

/// The shim's UDP forward seals trains of records cut by the suite's record length: with an
/// AEAD suite a burst through it arrives whole (a CBC-length cut would be `length_mismatch`).
#[tokio::test]
async fn a_shim_forward_carries_bursts_with_each_aead_suite() {
    use sudp::config::parse_forward;
    use sudp::shim::{GatewayEndpoint, Shim, ShimSettings};
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    for suite in AEADS {
        let mut s = ShimSettings::new(
            vec![GatewayEndpoint::new(Address::Ip(gw.control))],
            client_tls(&pki, false),
        );
        s.socks = None;
        s.suites = vec![suite];
        s.forwards = vec![parse_forward(&format!("udp:127.0.0.1:0={echo}")).unwrap()];
        let shim = Shim::bind(s).await.unwrap();
        let fwd = shim.forward_addrs()[0].1;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(shim.run(async move {
            let _ = rx.await;
        }));
        let local = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 2048];
        // The first datagram opens the association; then a burst of equal datagrams.
        local.send_to(b"open", fwd).await.unwrap();
        let (n, _) = tokio::time::timeout(WAIT, local.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"open");
        let before = gw.metrics.drops(DropReason::LengthMismatch);
        let burst = 40u8;
        for i in 0..burst {
            local.send_to(&[i; 333], fwd).await.unwrap();
        }
        let mut got = 0;
        while got < burst {
            match tokio::time::timeout(Duration::from_secs(2), local.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) => {
                    assert_eq!(n, 333);
                    got += 1;
                }
                _ => break,
            }
        }
        assert!(got >= burst / 2, "{suite}: {got} of {burst} echoed");
        assert_eq!(gw.metrics.drops(DropReason::LengthMismatch), before);
        let _ = tx.send(());
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap().unwrap();
    }
    gw.stop().await;
}
