//! Third-party SOCKS5 clients (curl, Debian's python3-socks) drive the gateway. They speak
//! plain SOCKS5 over TCP, so a TLS wrapper (plain TCP in, TLS to the gateway out; no
//! sudp-specific byte) sits in front, as stunnel would. UDP goes straight to the relay.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::net::TcpListener;

/// Plain TCP on 127.0.0.1:0 forwarded into TLS to the gateway.
async fn tls_wrapper(gw: &TestGateway, pki: &sudp::cert::DevPki) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let opts = gw.options(pki);
    tokio::spawn(async move {
        while let Ok((mut plain, _)) = l.accept().await {
            let opts = opts.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = sudp::client::connect_tls(&opts).await {
                    let _ = tokio::io::copy_bidirectional(&mut plain, &mut tls).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_connect_through_tls_wrapper_is_byte_exact() {
    if !have_curl() {
        return;
    }
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let body: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2246822519) >> 11) as u8)
        .collect();
    let http = http_server(body.clone()).await;
    let socks = tls_wrapper(&gw, &pki).await;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "20", "--socks5-hostname"])
            .arg(socks.to_string())
            .arg(format!("http://localhost:{}/file", http.port()))
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("curl finished in time")
    .expect("curl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), body.len());
    assert!(out.stdout == body, "body byte-exact");
    gw.stop().await;
}

const PY_UDP: &str = r#"
import socket, sys, socks
proxy_port, target_host, target_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port)
s.settimeout(5)
count = 0
for size in (1, 2, 100, 1200, 1472, 8000, 30000, 60000):
    payload = bytes((i * 7 + size) % 256 for i in range(size))
    s.sendto(payload, (target_host, target_port))
    data, addr = s.recvfrom(65535)
    assert data == payload, (size, len(data))
    count += 1
print("ok", count)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_socks_naked_udp_through_tls_wrapper() {
    if !have_python_socks() {
        return;
    }
    let pki = pki();
    let gw = TestGateway::start(settings(&pki)).await;
    let echo = udp_echo().await;
    let socks = tls_wrapper(&gw, &pki).await;
    for target in ["127.0.0.1", "localhost"] {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new("/usr/bin/python3")
                .args([
                    "-c",
                    PY_UDP,
                    &socks.port().to_string(),
                    target,
                    &echo.port().to_string(),
                ])
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .expect("python finished in time")
        .expect("/usr/bin/python3 runs");
        assert!(
            out.status.success(),
            "python3-socks UDP to {target} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok 8");
    }
    assert_eq!(gw.metrics.total_drops(), 0, "{}", gw.metrics.drop_summary());
    gw.stop().await;
}
