//! Gateways that die or go silent mid-stream, as real processes: the shim notices through
//! the control channel's heartbeat (PROTOCOL.md §2.4) and moves to the next gateway of its
//! list, so a UDP stream through a forward continues.

mod common;

use std::time::{Duration, Instant};

use common::stream::{shim_through, Stream};
use common::*;
use sudp::proto::socks::Address;

/// Datagrams per second of the test stream.
const RATE: u64 = 500;

/// A gateway frozen with SIGSTOP (no RST, no FIN: its TCP stack still ACKs) is noticed by the
/// heartbeat within its timeout (1.5 s by default) and the stream moves to the second gateway.
/// Before the control channel had a heartbeat, the stream stopped for good here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_gateway_is_noticed_by_the_heartbeat_and_the_stream_moves_on() {
    let pki = pki();
    let allow = ["--no-auth", "--allow", "127.0.0.0/8"];
    let a = GatewayProcess::start(&pki, "gw-a", &allow);
    let b = GatewayProcess::start(&pki, "gw-b", &allow);
    let echo = udp_echo().await;
    let (forward, shim) = shim_through(&pki, &[a.control, b.control], echo, None).await;
    let stream = Stream::start(forward, RATE, 160).await;
    stream.wait_for_echo_after(100, WAIT).await;
    assert!(
        a.stderr().contains("UDP association open"),
        "the stream started on A"
    );

    let frozen_at = Instant::now();
    a.signal("STOP");
    let at_stop = stream.sent();
    stream.wait_for_echo_after(at_stop, Duration::from_secs(6)).await;
    // Let the stream run on B for a while, then measure the whole interruption.
    let resumed = stream.highest();
    stream.wait_for_echo_after(resumed + RATE / 2, WAIT).await;
    let gap = stream.longest_gap_after(frozen_at);
    eprintln!("frozen gateway: the stream stopped for {gap:?}");
    assert!(gap < Duration::from_millis(2500), "interruption {gap:?}");
    assert!(
        gap >= Duration::from_millis(800),
        "too short a gap ({gap:?}): was A really frozen?"
    );
    assert!(
        b.stderr().contains("UDP association open"),
        "the stream moved to B"
    );
    shim.abort();
    drop(stream);
}

/// A gateway that is killed (its kernel resets the TCP connection) is noticed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_is_noticed_at_once() {
    let pki = pki();
    let allow = ["--no-auth", "--allow", "127.0.0.0/8"];
    let a = GatewayProcess::start(&pki, "gw-a", &allow);
    let b = GatewayProcess::start(&pki, "gw-b", &allow);
    let echo = udp_echo().await;
    let (forward, shim) = shim_through(&pki, &[a.control, b.control], echo, None).await;
    let stream = Stream::start(forward, RATE, 160).await;
    stream.wait_for_echo_after(100, WAIT).await;

    let killed_at = Instant::now();
    a.signal("KILL");
    let at_kill = stream.sent();
    stream.wait_for_echo_after(at_kill, Duration::from_secs(5)).await;
    let resumed = stream.highest();
    stream.wait_for_echo_after(resumed + RATE / 2, WAIT).await;
    let gap = stream.longest_gap_after(killed_at);
    eprintln!("killed gateway: the stream stopped for {gap:?}");
    assert!(gap < Duration::from_millis(1000), "interruption {gap:?}");
    shim.abort();
    drop(stream);
}

/// The gateway drops a client that said HELLO with PINGs promised and then fell silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_drops_a_client_that_stops_answering() {
    use sudp::client::{connect_tls, negotiate_sudp, request};
    use sudp::proto::frame::{Frame, Hello};
    use sudp::proto::socks::Command;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = pki();
    let gw = GatewayProcess::start(
        &pki,
        "gw",
        &[
            "--no-auth",
            "--heartbeat-interval",
            "200ms",
            "--heartbeat-timeout",
            "800ms",
        ],
    );
    let opts = sudp::client::ClientOptions::new(gw.control, "localhost", client_tls(&pki, false));
    let mut control = connect_tls(&opts).await.unwrap();
    negotiate_sudp(&mut control, &opts).await.unwrap();
    request(
        &mut control,
        Command::UdpAssociate,
        &Address::Ip("127.0.0.1:9".parse().unwrap()),
    )
    .await
    .unwrap();
    let mut hello = Vec::new();
    Frame::Hello(Hello {
        version: 1,
        ping_interval_ms: 100,
        features: vec![],
    })
    .encode(&mut hello)
    .unwrap();
    control.write_all(&hello).await.unwrap();
    control.flush().await.unwrap();
    // Read (so the gateway's writes never block) but never answer: a hung client.
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match control.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the gateway kept a silent client");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The gateway logs the end after closing the connection: wait for the line (bounded).
    let deadline = Instant::now() + WAIT;
    while !gw.stderr().contains("no heartbeat from the peer") {
        assert!(Instant::now() < deadline, "no log line:\n{}", gw.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
