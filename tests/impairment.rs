//! Loss, reordering and duplication between a secure client and the gateway do no harm:
//! every record that arrives decrypts on its own, duplicates are refused by the replay
//! windows (counted), and the association carries on. The impairment is emulated in user
//! space by a UDP relay in the test (the kernel here has no netem).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sudp::proto::socks::Address;
use sudp::proto::{DropReason, Role};
use tokio::net::UdpSocket;

/// Deterministic xorshift so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Forwards datagrams between `client` and `relay` through `sock`, dropping 10 %,
/// duplicating 10 % and holding 10 % back to send after the next one (reordering), in both
/// directions. Runs until aborted.
async fn impair(sock: Arc<UdpSocket>, client: SocketAddr, relay: SocketAddr, seed: u64) {
    let mut rng = Rng(seed);
    let mut held: Option<(Vec<u8>, SocketAddr)> = None;
    let mut buf = vec![0u8; 70_000];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let to = if from == relay { client } else { relay };
        if rng.chance(10) {
            continue;
        }
        let d = buf[..n].to_vec();
        if held.is_none() && rng.chance(10) {
            held = Some((d, to));
            continue;
        }
        let _ = sock.send_to(&d, to).await;
        if rng.chance(10) {
            let _ = sock.send_to(&d, to).await;
        }
        if let Some((h, hto)) = held.take() {
            let _ = sock.send_to(&h, hto).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_reorder_and_duplication_do_no_harm() {
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;

    // A secure association built from the library's parts, so its UDP can go through the
    // impairment relay.
    let RawSecure {
        control,
        assoc,
        keys,
        socket: client,
        relay,
    } = raw_secure(&gw, &pki).await;
    let middle = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let middle_addr = middle.local_addr().unwrap();
    let impairer = tokio::spawn(impair(middle, client.local_addr().unwrap(), relay, 0x5eed_1234));

    let (mut send, mut recv) = keys.into_sessions(assoc, Role::Client, 1024);
    const COUNT: u32 = 600;
    let target = Address::Ip(echo);
    let mut out = vec![0u8; 512];
    let mut got = HashSet::new();
    let mut client_duplicates = 0u32;
    let mut rec = vec![0u8; 2048];
    for i in 0..COUNT {
        let payload = [i.to_be_bytes().as_slice(), &[0x5a; 156]].concat();
        let n = send.seal(&target.as_ref(), &payload, &mut out).unwrap();
        client.send_to(&out[..n], middle_addr).await.unwrap();
        // Drain whatever came back so far without waiting.
        while let Ok((m, _)) = client.try_recv_from(&mut rec) {
            match recv.open(&mut rec[..m]) {
                Ok(o) => {
                    let (addr, payload) = o.data().expect("no control record: nothing to validate");
                    assert_eq!(addr.to_owned(), target);
                    let seq = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    assert!(got.insert(seq), "sequence {seq} delivered twice");
                }
                Err(sudp::proto::OpenError::Duplicate { .. }) => client_duplicates += 1,
                Err(e) => panic!("unexpected failure to open: {e}"),
            }
        }
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // The tail.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut rec)).await {
            Ok(Ok((m, _))) => match recv.open(&mut rec[..m]) {
                Ok(o) => {
                    let seq = u32::from_be_bytes(o.data().unwrap().1[..4].try_into().unwrap());
                    assert!(got.insert(seq), "sequence {seq} delivered twice");
                }
                Err(sudp::proto::OpenError::Duplicate { .. }) => client_duplicates += 1,
                Err(e) => panic!("unexpected failure to open: {e}"),
            },
            _ => break,
        }
    }
    impairer.abort();

    // About 0.9 * 0.9 of the datagrams survive both directions' loss.
    let delivered = got.len() as u32;
    assert!(
        delivered > COUNT * 70 / 100,
        "only {delivered} of {COUNT} came back"
    );
    assert!(delivered < COUNT, "the impairment dropped nothing?");
    // Duplicates were refused on both sides, never delivered; nothing failed authentication.
    let gw_duplicates = gw.metrics.drops(DropReason::Duplicate);
    assert!(gw_duplicates > 0, "the gateway saw no duplicate");
    assert!(client_duplicates > 0, "the client saw no duplicate");
    assert_eq!(gw.metrics.drops(DropReason::BadMac), 0);
    assert_eq!(gw.metrics.drops(DropReason::TooOld), 0);
    eprintln!(
        "sent {COUNT}, delivered {delivered}, duplicates refused: gateway {gw_duplicates}, client {client_duplicates}"
    );
    drop(control);
    gw.stop().await;
}
