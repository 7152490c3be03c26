//! The session store against a real Redis (`redis-server`, started per test on a free
//! loopback port, persistence off): two store instances are two nodes of one cluster.
//! Skipped with a note where redis-server is not installed (required in `.ci/run`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{RedisServer, WAIT};
use redis::AsyncCommands as _;
use sudp::store::tls::{StoreSessions, StoreTicketer};
use sudp::store::{ClusterKey, RedisOptions, RedisStore, SessionStore, Table, Update};

const TTL: Duration = Duration::from_secs(60);
const T: Table = Table::TLS_SESSION;

fn node(redis: &RedisServer, cluster: &str, key: &ClusterKey) -> RedisStore {
    RedisStore::new(&redis.url(), cluster, key, RedisOptions::default()).unwrap()
}

async fn two_nodes(redis: &RedisServer) -> (RedisStore, RedisStore) {
    let key = ClusterKey::from_bytes([0x5a; 32]);
    let (a, b) = (node(redis, "test", &key), node(redis, "test", &key));
    assert!(a.wait_subscribed(WAIT).await && b.wait_subscribed(WAIT).await);
    (a, b)
}

async fn raw(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(redis.url()).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// Waits (bounded) until `f` holds; panics with `what` otherwise.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "not in time: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn nodes_share_records_and_evict_each_other_through_pubsub() {
    let Some(redis) = RedisServer::start() else { return };
    let (a, b) = two_nodes(&redis).await;

    assert!(a.add(&T, b"k", b"v1", TTL).await.unwrap());
    assert!(
        !b.add(&T, b"k", b"other", TTL).await.unwrap(),
        "ADD of a key another node added"
    );
    let r = b.get(&T, b"k").await.unwrap().unwrap();
    assert_eq!((&r.value[..], r.version), (&b"v1"[..], 1));
    assert!(b.local().get(&T, b"k").is_some(), "GET fills the local tier");

    // UPDATE on A evicts B's local copy (pub/sub), and B then reads the new version.
    assert_eq!(
        a.update(&T, b"k", 1, b"v2", TTL).await.unwrap(),
        Update::Updated { version: 2 }
    );
    until("B's local copy evicted after A's UPDATE", || {
        b.local().get(&T, b"k").is_none()
    })
    .await;
    let r = b.get(&T, b"k").await.unwrap().unwrap();
    assert_eq!((&r.value[..], r.version), (&b"v2"[..], 2));
    // A ignores its own notice: its local tier keeps what it wrote.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.local().get(&T, b"k").unwrap().version, 2);

    // Compare-and-set: a stale version loses, and of two racing writers exactly one wins.
    assert_eq!(
        b.update(&T, b"k", 1, b"stale", TTL).await.unwrap(),
        Update::Conflict
    );
    let (ra, rb) = tokio::join!(
        a.update(&T, b"k", 2, b"from a", TTL),
        b.update(&T, b"k", 2, b"from b", TTL)
    );
    let wins = [ra.unwrap(), rb.unwrap()]
        .iter()
        .filter(|u| matches!(u, Update::Updated { version: 3 }))
        .count();
    assert_eq!(wins, 1);
    assert_eq!(
        a.update(&T, b"absent", 1, b"x", TTL).await.unwrap(),
        Update::Missing
    );

    // DELETE on B evicts A's local copy.
    assert!(a.get(&T, b"k").await.unwrap().is_some());
    assert!(b.delete(&T, b"k").await.unwrap());
    until("A's local copy evicted after B's DELETE", || {
        a.local().get(&T, b"k").is_none()
    })
    .await;
    assert!(a.get(&T, b"k").await.unwrap().is_none());

    // TAKE: one node gets it, the other does not.
    assert!(a.add(&T, b"t", b"once", TTL).await.unwrap());
    let (ta, tb) = tokio::join!(a.take(&T, b"t"), b.take(&T, b"t"));
    let got = [ta.unwrap(), tb.unwrap()].iter().filter(|r| r.is_some()).count();
    assert_eq!(got, 1);
}

#[tokio::test]
async fn records_expire_in_redis_and_in_the_local_tier() {
    let Some(redis) = RedisServer::start() else { return };
    let (a, b) = two_nodes(&redis).await;
    assert!(a
        .add(&T, b"short", b"v", Duration::from_millis(400))
        .await
        .unwrap());
    assert!(b.get(&T, b"short").await.unwrap().is_some());
    let mut conn = raw(&redis).await;
    let pttl: i64 = conn.pttl(a.redis_key(&T, b"short")).await.unwrap();
    assert!(pttl > 0 && pttl <= 400, "PX set: {pttl}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(a.get(&T, b"short").await.unwrap().is_none());
    assert!(b.get(&T, b"short").await.unwrap().is_none());
    let exists: bool = conn.exists(a.redis_key(&T, b"short")).await.unwrap();
    assert!(!exists);
    // Every record has a TTL in Redis.
    assert!(a.add(&T, b"long", b"v", TTL).await.unwrap());
    let pttl: i64 = conn.pttl(a.redis_key(&T, b"long")).await.unwrap();
    assert!(pttl > 50_000, "{pttl}");
}

#[tokio::test]
async fn purge_empties_one_table_everywhere() {
    let Some(redis) = RedisServer::start() else { return };
    let (a, b) = two_nodes(&redis).await;
    let other = Table::new("association").unwrap();
    for i in 0..700u32 {
        assert!(a.add(&T, &i.to_be_bytes(), b"v", TTL).await.unwrap());
    }
    assert!(a.add(&other, b"keep", b"v", TTL).await.unwrap());
    assert!(b.get(&T, &5u32.to_be_bytes()).await.unwrap().is_some());
    assert!(b.get(&other, b"keep").await.unwrap().is_some());

    // The operator's purge (what `sudp store purge` runs).
    let n = sudp::store::redis::purge_table(&redis.url(), "test", &T, WAIT)
        .await
        .unwrap();
    assert_eq!(n, 700);
    until("B's local tier purged", || {
        b.local().get(&T, &5u32.to_be_bytes()).is_none()
    })
    .await;
    until("A's local tier purged", || {
        a.local().get(&T, &0u32.to_be_bytes()).is_none()
    })
    .await;
    assert!(b.get(&T, &5u32.to_be_bytes()).await.unwrap().is_none());
    assert!(
        b.local().get(&other, b"keep").is_some(),
        "another table is left alone"
    );
    assert!(a.get(&other, b"keep").await.unwrap().is_some());

    // A node's purge through the trait.
    assert_eq!(b.purge(&other).await.unwrap(), 1);
    until("A's copy of the other table purged", || {
        a.local().get(&other, b"keep").is_none()
    })
    .await;
    assert!(a.get(&other, b"keep").await.unwrap().is_none());
}

#[tokio::test]
async fn redis_holds_only_sealed_values_that_do_not_move() {
    let Some(redis) = RedisServer::start() else { return };
    let (a, b) = two_nodes(&redis).await;
    let secret = b"TOP-SECRET-resumption-master-secret-4242";
    assert!(a.add(&T, b"key-1", secret, TTL).await.unwrap());
    assert!(a
        .add(&Table::ASSOCIATION, b"key-1", b"another", TTL)
        .await
        .unwrap());

    // Scan all of Redis: the key names are as documented, no value shows the secret.
    let mut conn = raw(&redis).await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
    assert!(
        keys.contains(&format!("sudp:test:tls-session:{}", hex::encode(b"key-1"))),
        "{keys:?}"
    );
    assert!(!keys.is_empty());
    for k in &keys {
        let v: Vec<u8> = conn.get(k).await.unwrap();
        assert!(
            !v.windows(10).any(|w| secret.windows(10).any(|s| s == w)),
            "{k} leaks"
        );
        assert!(!v.windows(7).any(|w| w == b"another"));
    }

    // A value copied under another key, or into another table, does not open.
    let stored: Vec<u8> = conn.get(a.redis_key(&T, b"key-1")).await.unwrap();
    let () = conn.set_ex(a.redis_key(&T, b"key-2"), &stored, 60).await.unwrap();
    let () = conn
        .set_ex(a.redis_key(&Table::TICKET_KEYS, b"key-1"), &stored, 60)
        .await
        .unwrap();
    assert!(b.get(&T, b"key-2").await.unwrap().is_none());
    assert!(b.get(&Table::TICKET_KEYS, b"key-1").await.unwrap().is_none());
    assert_eq!(&b.get(&T, b"key-1").await.unwrap().unwrap().value[..], secret);

    // A node with another cluster key reads nothing of it.
    let stranger = node(&redis, "test", &ClusterKey::from_bytes([1; 32]));
    assert!(stranger.get(&T, b"key-1").await.unwrap().is_none());
}

#[tokio::test]
async fn a_node_keeps_serving_while_redis_is_down_and_uses_it_again_when_it_returns() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = two_nodes(&redis).await;
    assert!(a.add(&T, b"before", b"v", TTL).await.unwrap());
    assert!(a.get(&T, b"before").await.unwrap().is_some());
    assert_eq!(a.outages(), 0);

    redis.stop();
    until("A notices the outage", || !a.is_subscribed()).await;
    let started = Instant::now();
    // The local tier keeps serving; writes stay local; misses miss, quickly.
    assert_eq!(&a.get(&T, b"before").await.unwrap().unwrap().value[..], b"v");
    assert!(a.add(&T, b"during", b"v", TTL).await.unwrap());
    assert!(a.get(&T, b"during").await.unwrap().is_some());
    assert!(b.get(&T, b"during").await.unwrap().is_none());
    assert!(b.purge(&T).await.is_err(), "a purge reports the outage");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for _ in 0..20 {
        let _ = a.get(&T, b"missing").await.unwrap();
        let _ = a.delete(&T, b"missing").await.unwrap();
    }
    assert_eq!(a.outages(), 1, "one outage, logged once");

    // Redis returns on the same port (empty): both nodes use it again, no restart.
    redis.restart();
    until("both nodes subscribed again", || {
        a.is_subscribed() && b.is_subscribed()
    })
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let _ = a.add(&T, b"after", b"v2", TTL).await.unwrap();
        if b.get(&T, b"after").await.unwrap().is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never saw A's write after Redis returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And invalidation works again.
    let v = b.get(&T, b"after").await.unwrap().unwrap().version;
    assert_eq!(
        a.update(&T, b"after", v, b"v3", TTL).await.unwrap(),
        Update::Updated { version: v + 1 }
    );
    until("B evicted after Redis returned", || {
        b.local().get(&T, b"after").is_none()
    })
    .await;
    assert_eq!((a.outages(), b.outages()), (1, 1));
}

mod tls {
    use std::sync::Arc;

    use rustls::HandshakeKind;
    use sudp::tls::{Resumption, ServerTlsOptions};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Stateful,
        Tickets,
    }

    fn server(
        pki: &sudp::cert::DevPki,
        store: Arc<dyn SessionStore>,
        mode: Mode,
    ) -> Arc<rustls::ServerConfig> {
        let sessions = Arc::new(StoreSessions::new(store.clone()));
        let resumption = match mode {
            Mode::Stateful => Resumption::Stateful(sessions),
            Mode::Tickets => Resumption::Tickets {
                ticketer: Arc::new(StoreTicketer::new(store, Duration::from_secs(3600))),
                storage: sessions,
            },
        };
        let opts = ServerTlsOptions {
            cert_chain: pki.gateway_chain(),
            key: pki.gateway_key(),
            client_ca: None,
            require_client_cert: false,
            client_crls: Vec::new(),
            allow_tls12: false,
        };
        let config = sudp::tls::server_config_resuming(opts, resumption).unwrap();
        assert_eq!(config.ticketer.enabled(), mode == Mode::Tickets);
        config
    }

    /// One handshake; the server writes a byte so that the client reads its tickets.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (HandshakeKind, HandshakeKind) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(server).accept(tcp).await.unwrap();
            tls.write_all(b"!").await.unwrap();
            tls.flush().await.unwrap();
            let kind = tls.get_ref().1.handshake_kind().unwrap();
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
            kind
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(client).connect(name, tcp).await.unwrap();
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.unwrap();
        let kind = tls.get_ref().1.handshake_kind().unwrap();
        tls.shutdown().await.unwrap();
        drop(tls);
        (kind, tokio::time::timeout(WAIT, srv).await.unwrap().unwrap())
    }

    async fn resumes_on_the_other_node(mode: Mode) {
        let Some(redis) = RedisServer::start() else { return };
        let pki = sudp::cert::ephemeral();
        let (a, b) = two_nodes(&redis).await;
        let (a, b): (Arc<dyn SessionStore>, Arc<dyn SessionStore>) = (Arc::new(a), Arc::new(b));
        let (gw1, gw2) = (server(&pki, a, mode), server(&pki, b, mode));
        let client = common::client_tls(&pki, false);

        assert_eq!(
            handshake(gw1.clone(), client.clone()).await,
            (HandshakeKind::Full, HandshakeKind::Full)
        );
        // Stateful: wait until gateway 1's spawned write reached Redis.
        let table = if mode == Mode::Stateful {
            "tls-session"
        } else {
            "ticket-keys"
        };
        let mut conn = raw(&redis).await;
        let deadline = Instant::now() + WAIT;
        loop {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("sudp:test:{table}:*"))
                .query_async(&mut conn)
                .await
                .unwrap();
            // rustls sends two TLS 1.3 tickets (two sessions), one ticket key is enough.
            if keys.len() >= if mode == Mode::Stateful { 2 } else { 1 } {
                break;
            }
            assert!(Instant::now() < deadline, "nothing in {table}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            handshake(gw2.clone(), client.clone()).await,
            (HandshakeKind::Resumed, HandshakeKind::Resumed),
            "the second gateway resumes the first one's session"
        );
        // And back.
        assert_eq!(handshake(gw1, client).await.1, HandshakeKind::Resumed);

        // Control: a gateway on a store of another cluster cannot resume it.
        let key = ClusterKey::from_bytes([0x5a; 32]);
        let other: Arc<dyn SessionStore> = Arc::new(node(&redis, "elsewhere", &key));
        let fresh = common::client_tls(&pki, false);
        assert_eq!(handshake(gw2, fresh.clone()).await.0, HandshakeKind::Full);
        assert_eq!(
            handshake(server(&pki, other, mode), fresh).await.0,
            HandshakeKind::Full
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stateful_sessions_resume_on_another_gateway() {
        resumes_on_the_other_node(Mode::Stateful).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shared_tickets_resume_on_another_gateway() {
        resumes_on_the_other_node(Mode::Tickets).await;
    }
}

#[test]
fn stores_are_object_safe_and_shareable() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Arc<dyn SessionStore>>();
    shareable::<RedisStore>();
}

/// The gateway as configured by a user: `sudp cluster-key`, a config file with `store`,
/// `cluster`, `cluster_key`, `resumption`; two gateways on one Redis; a client that
/// handshook with the first resumes with the second, and the counters say so.
mod gateway {
    use std::process::Command;

    use sudp::config::{GatewayArgs, GatewayConfig};
    use sudp::gateway::Settings;

    use super::*;

    const BIN: &str = env!("CARGO_BIN_EXE_sudp");

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sudp-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    async fn wait_for_keys(redis: &RedisServer, pattern: &str, count: usize) {
        let mut conn = raw(redis).await;
        let deadline = Instant::now() + WAIT;
        loop {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut conn)
                .await
                .unwrap();
            if keys.len() >= count {
                return;
            }
            assert!(Instant::now() < deadline, "no key matches {pattern}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn two_gateways_resume(mode: &str) {
        let Some(redis) = RedisServer::start() else { return };
        let dir = tempdir(mode);
        let pki = sudp::cert::ephemeral();
        sudp::cert::write(&pki, &dir).unwrap();
        let key = dir.join("cluster.key");
        let out = Command::new(BIN)
            .args(["cluster-key", "--out"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let toml = format!(
            "listen = \"127.0.0.1:0\"\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\nno_auth = true\n\
             store = \"{}\"\ncluster = \"gw\"\ncluster_key = \"cluster.key\"\nresumption = \"{mode}\"\n",
            redis.url()
        );
        std::fs::write(dir.join("gateway.toml"), toml).unwrap();
        let args = GatewayArgs {
            config: Some(dir.join("gateway.toml")),
            ..GatewayArgs::default()
        };
        let config = GatewayConfig::from_args(args).unwrap();
        let (gw1, gw2) = (
            common::TestGateway::start(Settings::from_config(&config).unwrap()).await,
            common::TestGateway::start(Settings::from_config(&config).unwrap()).await,
        );
        let tls = common::client_tls(&pki, false);
        let connect = |gw: &common::TestGateway| {
            let opts = sudp::client::ClientOptions::new(gw.control, "localhost", tls.clone());
            async move {
                let mut control = sudp::client::connect_tls(&opts).await.unwrap();
                // SOCKS5 negotiation: the client reads, so it also takes in its tickets.
                sudp::client::negotiate_sudp(&mut control, &opts).await.unwrap();
                control.get_ref().1.handshake_kind().unwrap()
            }
        };
        assert_eq!(connect(&gw1).await, rustls::HandshakeKind::Full);
        let table = if mode == "stateful" {
            "tls-session"
        } else {
            "ticket-keys"
        };
        let count = if mode == "stateful" { 2 } else { 1 };
        wait_for_keys(&redis, &format!("sudp:gw:{table}:*"), count).await;
        assert_eq!(connect(&gw2).await, rustls::HandshakeKind::Resumed);
        // Store round trips of one full handshake on gateway 1 and one resumption on 2
        // (docs/CLUSTER.md quotes them; `--nocapture` shows them).
        let mut conn = raw(&redis).await;
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        let calls: Vec<&str> = stats
            .lines()
            .filter(|l| {
                l.starts_with("cmdstat_") && !l.contains("cmdstat_info") && !l.contains("cmdstat_keys")
            })
            .collect();
        eprintln!("redis commands, {mode}: {calls:#?}");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("sudp:gw:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        for k in keys {
            let len: usize = conn.strlen(&k).await.unwrap();
            eprintln!("{k}: {len} bytes");
        }
        use std::sync::atomic::Ordering::Relaxed;
        until("counters", || gw2.metrics.handshakes_resumed.load(Relaxed) == 1).await;
        assert_eq!(gw1.metrics.handshakes_full.load(Relaxed), 1);
        assert_eq!(gw1.metrics.handshakes_resumed.load(Relaxed), 0);
        assert_eq!(gw2.metrics.handshakes_full.load(Relaxed), 0);
        let text =
            sudp::metrics::export::Exporter::new("sudp_gateway", gw2.metrics.clone(), Vec::new()).render();
        assert!(
            text.contains("sudp_gateway_tls_handshakes_total{kind=\"resumed\"} 1"),
            "{text}"
        );

        if mode == "stateful" {
            // The operator's purge empties the sessions: the next client cannot resume.
            let out = Command::new(BIN)
                .args([
                    "store",
                    "purge",
                    "--store",
                    &redis.url(),
                    "--cluster",
                    "gw",
                    "--table",
                    "tls-session",
                ])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                said.starts_with("purged ") && said.contains("tls-session"),
                "{said}"
            );
            let mut conn = raw(&redis).await;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("sudp:gw:tls-session:*")
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(keys.is_empty(), "{keys:?}");
        }
        gw1.stop().await;
        gw2.stop().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_gateways_resume_statefully() {
        two_gateways_resume("stateful").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_gateways_resume_with_shared_tickets() {
        two_gateways_resume("tickets").await;
    }

    #[test]
    fn cluster_key_is_private_and_never_overwritten() {
        let dir = tempdir("ck");
        let key = dir.join("k");
        let run = || {
            Command::new(BIN)
                .args(["cluster-key", "--out"])
                .arg(&key)
                .output()
                .unwrap()
        };
        assert!(run().status.success());
        let first = std::fs::read_to_string(&key).unwrap();
        assert_eq!(first.trim().len(), 64);
        assert!(first.trim().bytes().all(|b| b.is_ascii_hexdigit()));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = run();
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
        assert_eq!(std::fs::read_to_string(&key).unwrap(), first);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `rediss://`: TLS to Redis through rustls, the server certificate checked against the
    /// system trust store (here a test CA through `SSL_CERT_FILE`, which
    /// rustls-native-certs reads), in a child process so the variable stays there.
    #[test]
    fn rediss_reaches_a_tls_redis_and_checks_its_certificate() {
        if !common::have_redis_server() {
            return;
        }
        let dir = tempdir("tls");
        sudp::cert::write(&sudp::cert::ephemeral(), &dir).unwrap();
        let redis = RedisServer::start_as(common::RedisRole::Tls(dir.clone())).unwrap();
        let url = format!("rediss://127.0.0.1:{}/0", redis.port);
        let purge = |ca: Option<&std::path::Path>| {
            let mut cmd = Command::new(BIN);
            cmd.args(["store", "purge", "--store", &url, "--table", "tls-session"]);
            cmd.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
            if let Some(ca) = ca {
                cmd.env("SSL_CERT_FILE", ca);
            }
            cmd.output().unwrap()
        };
        let out = purge(Some(&dir.join("ca.pem")));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("purged 0 records"));
        // A server the trust store does not vouch for is refused.
        let out = purge(None);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("UnknownIssuer") || err.contains("certificate"),
            "{err}"
        );
        drop(redis);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_without_a_cluster_key_is_refused_by_name() {
        let out = Command::new(BIN)
            .args([
                "gateway",
                "--cert",
                "c",
                "--key",
                "k",
                "--no-auth",
                "--store",
                "redis://127.0.0.1:1/0",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("`store` (--store) needs `cluster_key` (--cluster-key)"),
            "{err}"
        );
    }
}

/// Redundancy (seed 004, FIG. 8A: two repository servers with a full copy each): a primary,
/// a replica and a sentinel; the store is given the sentinel URL; the primary is killed, the
/// sentinel promotes the replica, and both nodes carry on with it without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_moves_the_store_to_the_promoted_replica() {
    use common::RedisRole;
    let Some(mut primary) = RedisServer::start() else {
        return;
    };
    let replica = RedisServer::start_as(RedisRole::ReplicaOf(primary.port)).unwrap();
    let sentinel = RedisServer::start_as(RedisRole::Sentinel {
        primary: primary.port,
        service: "sudp".into(),
    })
    .unwrap();
    let long = Duration::from_secs(30);
    let mut rconn = raw(&replica).await;
    let mut sconn = raw(&sentinel).await;
    let deadline = Instant::now() + long;
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut rconn)
            .await
            .unwrap();
        let known: Vec<redis::Value> = redis::cmd("SENTINEL")
            .arg("replicas")
            .arg("sudp")
            .query_async(&mut sconn)
            .await
            .unwrap();
        if info.contains("master_link_status:up") && !known.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica not in sync or not known to the sentinel"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let url = format!("redis+sentinel://127.0.0.1:{}/sudp/0", sentinel.port);
    let key = ClusterKey::from_bytes([3; 32]);
    let (a, b) = (
        RedisStore::new(&url, "test", &key, RedisOptions::default()).unwrap(),
        RedisStore::new(&url, "test", &key, RedisOptions::default()).unwrap(),
    );
    assert!(a.wait_subscribed(WAIT).await && b.wait_subscribed(WAIT).await);
    assert!(a.add(&T, b"before", b"v", TTL).await.unwrap());
    assert!(b.get(&T, b"before").await.unwrap().is_some());
    // Replicated before the primary dies.
    let mut pconn = raw(&primary).await;
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(2000)
        .query_async(&mut pconn)
        .await
        .unwrap();
    assert_eq!(acked, 1);

    primary.stop();
    let killed = Instant::now();
    let promoted = replica.port.to_string();
    let deadline = Instant::now() + long;
    loop {
        let addr: Vec<String> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg("sudp")
            .query_async(&mut sconn)
            .await
            .unwrap();
        if addr.get(1) == Some(&promoted) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sentinel did not promote the replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failover = Instant::now();
    // Both nodes move to the new primary: a write lands there and the other node reads it.
    loop {
        let _ = a.add(&T, b"after", b"v2", TTL).await.unwrap();
        // The sentinel kills client connections on a promotion: a fresh one each time.
        let there: bool = raw(&replica)
            .await
            .exists(a.redis_key(&T, b"after"))
            .await
            .unwrap_or(false);
        if there && b.get(&T, b"after").await.unwrap().is_some() {
            break;
        }
        assert!(failover.elapsed() < long, "the store did not follow the failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "store usable {:?} after the primary was killed, {:?} after the sentinel named the new one",
        killed.elapsed(),
        failover.elapsed()
    );
    assert_eq!(&b.get(&T, b"before").await.unwrap().unwrap().value[..], b"v");
    until("both subscribed to the new primary", || {
        a.is_subscribed() && b.is_subscribed()
    })
    .await;
    // Invalidation runs through the new primary's pub/sub too.
    let v = b.get(&T, b"after").await.unwrap().unwrap().version;
    assert!(b.local().get(&T, b"after").is_some());
    assert_eq!(
        a.update(&T, b"after", v, b"v3", TTL).await.unwrap(),
        Update::Updated { version: v + 1 }
    );
    until("B evicted through the new primary's pub/sub", || {
        b.local().get(&T, b"after").is_none()
    })
    .await;
}
