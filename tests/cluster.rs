//! Two gateway processes sharing a real Redis (issue 9, item 5): a shim's stream survives the
//! loss of the gateway serving it, killed or frozen, **on the same association**: the shim
//! resumes TLS on the other gateway and re-attaches its association there (PROTOCOL.md
//! §2.7 REATTACH); the id is kept, the epoch advances, records of the old epoch are dropped,
//! the frozen gateway lets its copy go once it runs again, and Redis holds nothing readable.
//!
//! Needs Debian's redis-server (`.ci/run` installs it); without it each test prints SKIPPED.

mod common;

use std::time::{Duration, Instant};

use common::stream::{shim_through, Stream};
use common::*;
use sudp::proto::socks::Address;
use tokio::net::UdpSocket;

/// Datagrams per second of the test stream (the issue's ~1000/s).
const RATE: u64 = 1000;

/// Two gateways on one Redis, each with a users file holding alice and bob.
struct Cluster {
    redis: RedisServer,
    a: GatewayProcess,
    b: GatewayProcess,
    _dir: TempDir,
}

fn cluster(pki: &sudp::cert::DevPki) -> Option<Cluster> {
    let redis = RedisServer::start()?;
    let dir = TempDir::new("cluster");
    let key = dir.path().join("cluster.key");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sudp"))
        .args(["cluster-key", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!(
            "alice:{}\nbob:{}\n",
            sudp::auth::hash_password(b"alice pw").unwrap(),
            sudp::auth::hash_password(b"bob pw").unwrap()
        ),
    )
    .unwrap();
    let url = redis.url();
    let args = [
        "--users",
        users.to_str().unwrap(),
        "--allow",
        "127.0.0.0/8",
        "--store",
        &url,
        "--cluster",
        "test",
        "--cluster-key",
        key.to_str().unwrap(),
        "--metrics",
        "127.0.0.1:0",
    ];
    let a = GatewayProcess::start(pki, "cluster-a", &args);
    let b = GatewayProcess::start(pki, "cluster-b", &args);
    Some(Cluster {
        redis,
        a,
        b,
        _dir: dir,
    })
}

/// GET /metrics from a gateway process, as text.
fn scrape(gw: &GatewayProcess) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&gw.metrics.unwrap(), WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The value of one sample line (`name{labels} value`), 0 when absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Waits (bounded) for a line of `gw`'s log containing every one of `parts`.
fn wait_log(gw: &GatewayProcess, parts: &[&str], within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(l) = gw.stderr().lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return l.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no line with {parts:?} in:\n{}",
            gw.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The association id the log line names (`assoc=0123456789abcdef`).
fn assoc_of(line: &str) -> String {
    let at = line.find("assoc=").expect("assoc= in line") + 6;
    line[at..at + 16].to_owned()
}

/// The moment a gateway is lost, the stream's association moves to the other one: same id,
/// epoch 1, a resumed TLS handshake there, a gap under `max_gap`.
async fn the_stream_moves(signal: &str, max_gap: Duration, min_gap: Duration) {
    let pki = pki();
    let Some(c) = cluster(&pki) else { return };
    let echo = udp_echo().await;
    let (forward, shim) = shim_through(
        &pki,
        &[c.a.control, c.b.control],
        echo,
        Some(("alice", "alice pw")),
    )
    .await;
    let stream = Stream::start(forward, RATE, 200).await;
    stream.wait_for_echo_after(200, WAIT).await;
    let opened = wait_log(&c.a, &["UDP association open", "user=\"alice\""], WAIT);
    let id = assoc_of(&opened);
    // The shim's TLS session, stored by A in Redis, is what B resumes.
    let resumed_before = sample(
        &scrape(&c.b),
        "sudp_gateway_tls_handshakes_total{kind=\"resumed\"}",
    );

    let lost_at = Instant::now();
    c.a.signal(signal);
    let at_loss = stream.sent();
    stream.wait_for_echo_after(at_loss, Duration::from_secs(6)).await;
    let resumed = stream.highest();
    stream.wait_for_echo_after(resumed + RATE / 2, WAIT).await;
    let gap = stream.longest_gap_after(lost_at);
    let lost = stream.lost_in(at_loss.saturating_sub(RATE / 5), resumed);
    eprintln!("SIG{signal}: the stream stopped for {gap:?}; {lost} datagrams lost");

    let moved = wait_log(&c.b, &["association re-attached", &format!("assoc={id}")], WAIT);
    assert!(moved.contains("epoch=1"), "{moved}");
    assert!(moved.contains("user=\"alice\""), "{moved}");
    let m = scrape(&c.b);
    assert!(
        sample(&m, "sudp_gateway_tls_handshakes_total{kind=\"resumed\"}") > resumed_before,
        "B resumed the shim's TLS session:\n{m}"
    );
    assert_eq!(
        sample(&m, "sudp_gateway_associations_reattached_total"),
        1.0,
        "{m}"
    );
    assert!(gap < max_gap, "interruption {gap:?}");
    assert!(gap >= min_gap, "too short a gap ({gap:?}): was A really lost?");
    // Bounded loss: what was in flight during the gap, at most the gap's worth at RATE (plus
    // a margin for the busy machine), never the rest of the stream.
    let bound = (gap.as_secs_f64() * RATE as f64 * 1.5) as u64 + 50;
    assert!(lost <= bound, "{lost} lost in a {gap:?} gap");

    if signal == "STOP" {
        // A runs again: it lets its copy go, through the store (the record names B now) or
        // because the shim had closed that connection, whichever it sees first; and it
        // leaves B's record alone.
        c.a.signal("CONT");
        let line = wait_log(&c.a, &["UDP association closed", &format!("assoc={id}")], WAIT);
        assert!(line.contains("epoch=0"), "{line}");
        // The stream still flows through B.
        let now = stream.sent();
        stream.wait_for_echo_after(now, WAIT).await;
    }
    // Redis holds the association's record, sealed: not even the owner's name shows.
    let client = redis::Client::open(c.redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("sudp:test:association:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "no association record in Redis");
    for k in keys {
        let v: Vec<u8> = redis::cmd("GET").arg(&k).query_async(&mut conn).await.unwrap();
        assert!(
            !v.windows(5).any(|w| w == b"alice"),
            "{k} holds the owner's name in the clear"
        );
    }
    shim.abort();
    drop(stream);
}

/// (a) Gateway A killed (its kernel resets the connections): the shim notices at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_s_association_continues_on_the_other() {
    the_stream_moves("KILL", Duration::from_millis(1000), Duration::ZERO).await;
}

/// (b) Gateway A frozen (no RST): the heartbeat notices within its 1.5 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_gateway_s_association_continues_on_the_other() {
    the_stream_moves("STOP", Duration::from_millis(2500), Duration::from_millis(800)).await;
}

/// (a, the replay half) Records of the epoch A served, replayed to B after the move, fail
/// authentication there and reach no target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_the_dead_node_s_epoch_are_dropped_by_the_other() {
    use sudp::client::{connect_tls, negotiate_sudp, request, ClientOptions, SecureUdp};
    use sudp::proto::socks::Command;
    use sudp::proto::Role;

    let pki = pki();
    let Some(c) = cluster(&pki) else { return };
    let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = target.local_addr().unwrap();
    let opts = |gw: &GatewayProcess| {
        let mut o = ClientOptions::new(gw.control, "localhost", client_tls(&pki, false));
        o.credentials = Some(("alice".into(), "alice pw".into()));
        o
    };
    // Epoch 0 on A, by hand, so the test holds the sealed records.
    let a_opts = opts(&c.a);
    let mut control = connect_tls(&a_opts).await.unwrap();
    let (suite, assoc) = negotiate_sudp(&mut control, &a_opts).await.unwrap();
    let keys = sudp::tls::export_keys(control.get_ref().1, assoc, suite).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bnd = request(
        &mut control,
        Command::UdpAssociate,
        &Address::Ip(socket.local_addr().unwrap()),
    )
    .await
    .unwrap();
    let Address::Ip(relay_a) = bnd else {
        panic!("BND is a domain")
    };
    let (mut send, _) = keys.into_sessions(assoc, Role::Client, 1024);
    let mut captured = Vec::new();
    let mut got = [0u8; 64];
    for i in 0..5u8 {
        let mut buf = vec![0u8; 2048];
        let n = send
            .seal(&Address::Ip(to).as_ref(), &[b'A', i], &mut buf)
            .unwrap();
        buf.truncate(n);
        socket.send_to(&buf, relay_a).await.unwrap();
        let (m, _) = tokio::time::timeout(WAIT, target.recv_from(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got[..m], &[b'A', i]);
        captured.push(buf);
    }
    c.a.signal("KILL");
    drop(control);

    let moved = SecureUdp::connect_reattach(&opts(&c.b), Some((assoc, suite)))
        .await
        .unwrap();
    assert_eq!((moved.assoc(), moved.epoch()), (assoc, 1), "re-attached on B");
    let rejected = |m: &str| {
        sample(m, "sudp_gateway_dropped_datagrams_total{reason=\"bad_mac\"}")
            + sample(m, "sudp_gateway_dropped_datagrams_total{reason=\"duplicate\"}")
    };
    let before = rejected(&scrape(&c.b));
    let relay_b = moved.relay();
    for r in &captured {
        socket.send_to(r, relay_b).await.unwrap();
    }
    let deadline = Instant::now() + WAIT;
    while rejected(&scrape(&c.b)) < before + captured.len() as f64 {
        assert!(Instant::now() < deadline, "B did not drop the replayed records");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    moved.send_to(b"epoch 1", &Address::Ip(to)).await.unwrap();
    let (m, _) = tokio::time::timeout(WAIT, target.recv_from(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        &got[..m],
        b"epoch 1",
        "only the new epoch's datagram reaches the target"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), target.recv_from(&mut got))
            .await
            .is_err(),
        "a replayed record reached the target"
    );

    // (d) Another user's re-attach of it is refused on B, and counted.
    let mut bob = opts(&c.b);
    bob.credentials = Some(("bob".into(), "bob pw".into()));
    let stranger = SecureUdp::connect_reattach(&bob, Some((assoc, suite)))
        .await
        .unwrap();
    assert_eq!(
        stranger.reattach_refused(),
        Some(sudp::proto::frame::RefuseReason::NotOwner)
    );
    assert_ne!(stranger.assoc(), assoc);
    assert_eq!(
        sample(
            &scrape(&c.b),
            "sudp_gateway_reattach_refused_total{reason=\"not_owner\"}"
        ),
        1.0
    );
}

/// (c) Redis stops: each gateway says so once, keeps serving from its local tier (a new
/// client connects, with a full handshake, and its association works), and when Redis is back
/// on the same address the gateways use it again without a restart: a session made on A after
/// the return resumes on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_ride_out_a_redis_outage_and_use_it_again() {
    use sudp::client::{connect_tls, negotiate_sudp, ClientOptions, SecureUdp};

    let pki = pki();
    let Some(mut c) = cluster(&pki) else { return };
    let echo = udp_echo().await;
    let tls = client_tls(&pki, false);
    let opts = |gw: &GatewayProcess| {
        let mut o = ClientOptions::new(gw.control, "localhost", tls.clone());
        o.credentials = Some(("alice".into(), "alice pw".into()));
        o
    };
    let roundtrip = |u: SecureUdp| async move {
        u.send_to(b"ping", &Address::Ip(echo)).await.unwrap();
        let mut buf = vec![0u8; sudp::client::RECORD_BUF];
        let (n, _) = tokio::time::timeout(WAIT, u.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"ping");
    };
    // Both gateways talk to Redis first (an association each).
    roundtrip(SecureUdp::connect(&opts(&c.a)).await.unwrap()).await;
    roundtrip(SecureUdp::connect(&opts(&c.b)).await.unwrap()).await;

    c.redis.stop();
    // New clients still get served, several times over; the outage is logged once.
    for _ in 0..3 {
        roundtrip(SecureUdp::connect(&opts(&c.a)).await.unwrap()).await;
    }
    let said = |gw: &GatewayProcess, what: &str| gw.stderr().matches(what).count();
    let down = "Redis unreachable; serving from the local tier";
    let deadline = Instant::now() + WAIT;
    while said(&c.a, down) == 0 {
        assert!(
            Instant::now() < deadline,
            "A never said Redis is down:\n{}",
            c.a.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(said(&c.a, down), 1, "logged once:\n{}", c.a.stderr());

    c.redis.restart();
    // A fresh client (its own TLS config: no session yet) handshakes in full with A; once
    // A is back on Redis its session lands there, and B resumes it.
    let fresh = client_tls(&pki, false);
    let mut resumed = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !resumed {
        assert!(
            Instant::now() < deadline,
            "B never resumed a session A made after Redis returned"
        );
        let mut oa = opts(&c.a);
        oa.tls = fresh.clone();
        let mut ca = connect_tls(&oa).await.unwrap();
        negotiate_sudp(&mut ca, &oa).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut ob = opts(&c.b);
        ob.tls = fresh.clone();
        let mut cb = connect_tls(&ob).await.unwrap();
        negotiate_sudp(&mut cb, &ob).await.unwrap();
        resumed = cb.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    }
    let deadline = Instant::now() + WAIT;
    while said(&c.a, "Redis reachable again") == 0 {
        assert!(
            Instant::now() < deadline,
            "A never said Redis is back:\n{}",
            c.a.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
