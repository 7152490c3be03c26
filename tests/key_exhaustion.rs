//! PROTOCOL.md §8: when the gateway's g2c key is exhausted it closes the association and its
//! control connection (CLOSE reason 0x02), so the client learns of it as of an idle expiry;
//! it never wraps or reuses a nonce. A binary of its own: the test door that starts the
//! gateway's nonces near 2^48 is process-wide.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use sudp::client::SecureUdp;
use sudp::proto::record::MAX_RECORDS_PER_KEY;
use sudp::proto::socks::Address;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_g2c_key_closes_the_association_and_its_control_connection() {
    // Three nonces left: 2^48 - 3, - 2, - 1.
    sudp::gateway::relay::TEST_G2C_FIRST_NONCE.store(MAX_RECORDS_PER_KEY - 3, Ordering::Relaxed);
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let udp = SecureUdp::connect(&gw.options(&pki)).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let mut got = Vec::new();
    for i in 0..6u8 {
        udp.send_to(&[i; 8], &Address::Ip(echo)).await.unwrap();
        match tokio::time::timeout(std::time::Duration::from_millis(500), udp.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => got.push(buf[..n].to_vec()),
            _ => break,
        }
    }
    // The client's own path probe may take one of the three; every reply that came is one
    // the client sent, and at most three came.
    assert!(!got.is_empty() && got.len() <= 3, "{} replies", got.len());
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g, &vec![i as u8; 8]);
    }
    // The gateway ended the association, said why, and closed the control connection.
    tokio::time::timeout(WAIT, udp.closed())
        .await
        .expect("the association ends");
    let why = udp.close_reason().unwrap_or_default();
    assert!(why.contains("key exhausted"), "{why}");
    eventually(|| gw.metrics.associations_active.load(Ordering::Relaxed) == 0).await;
    gw.stop().await;
}
