//! A UDP echo through the gateway with the library API, all in one process:
//!
//! 1. an ephemeral PKI (CA, gateway and client certificates, in memory);
//! 2. a gateway on 127.0.0.1 (ephemeral ports) that may relay to loopback;
//! 3. a UDP echo server on 127.0.0.1;
//! 4. a [`SecureUdp`] association: TLS to the gateway, the sudp method, keys from the TLS
//!    exporter; then a few datagrams to the echo server and back as secure records, with
//!    their round-trip times.
//!
//! ```text
//! cargo run --example udp_echo
//! ```
//!
//! Against a real gateway, only step 4 is needed: build the `ClientOptions` from its
//! address, its certificate name and a TLS configuration that trusts it
//! (`sudp::tls::client_config`), then `SecureUdp::connect`, `send_to`, `recv_from`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sudp::client::{ClientOptions, SecureUdp};
use sudp::gateway::{AuthSettings, Gateway, Settings};
use sudp::policy::{Action, Policy, Rule};
use sudp::proto::socks::Address;
use sudp::tls::{ClientTlsOptions, ServerTlsOptions, ServerTrust};
use tokio::net::UdpSocket;
use tokio::time::timeout;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // 1. Certificates, generated for this run only.
    let pki = sudp::cert::ephemeral();

    // 2. The gateway. Its default policy refuses loopback destinations (so a client cannot
    //    reach services on the gateway host); allow 127.0.0.1 for this demo.
    let tls = sudp::tls::server_config(ServerTlsOptions {
        cert_chain: pki.gateway_chain(),
        key: pki.gateway_key(),
        client_ca: None,
        require_client_cert: false,
        client_crls: Vec::new(),
        allow_tls12: false,
    })?;
    let settings = Settings {
        auth: AuthSettings {
            no_auth: true,
            users: None,
            ..Default::default()
        },
        policy: Arc::new(Policy::new(
            vec![Rule::parse(Action::Allow, "127.0.0.1")?],
            HashMap::new(),
        )),
        max_associations: 16,
        max_connections: 16,
        workers: 1,
        ..Settings::new("127.0.0.1:0".parse()?, tls)
    };
    let gateway = Gateway::bind(settings).await?;
    let control = gateway.control_addr();
    println!(
        "gateway: control (TLS) {control}, relay (UDP) {}",
        gateway.relay_addr()
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gateway_task = tokio::spawn(gateway.run(async move {
        let _ = stop_rx.await;
    }));

    // 3. The echo server.
    let echo = UdpSocket::bind("127.0.0.1:0").await?;
    let echo_addr = echo.local_addr()?;
    println!("echo server: {echo_addr}");
    let echo_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });

    // 4. The client: trust the CA, name the gateway as its certificate does.
    let tls = sudp::tls::client_config(ClientTlsOptions {
        trust: ServerTrust::Ca(vec![pki.ca_der()]),
        client_auth: None,
        allow_tls12: false,
    })?;
    let opts = ClientOptions::new(control, "localhost", tls);
    let started = Instant::now();
    let udp = SecureUdp::connect(&opts).await?;
    println!(
        "secure association {} ({}) via relay {} in {:?}",
        udp.assoc(),
        udp.suite().name(),
        udp.relay(),
        started.elapsed()
    );

    let target = Address::Ip(echo_addr);
    let mut buf = vec![0u8; sudp::client::RECORD_BUF];
    for (i, size) in [16usize, 160, 1200, 8000, 32_000, 60_000].into_iter().enumerate() {
        let payload: Vec<u8> = (0..size).map(|j| (i + j) as u8).collect();
        let sent = Instant::now();
        udp.send_to(&payload, &target).await?;
        let (n, from) = timeout(Duration::from_secs(5), udp.recv_from(&mut buf)).await??;
        let rtt = sent.elapsed();
        anyhow::ensure!(buf[..n] == payload[..], "echo of {size} bytes differs");
        println!("{size:>6} bytes from {from}: round trip {rtt:?}");
    }

    // Close the association, then the gateway (graceful: it drains and returns).
    drop(udp);
    let _ = stop_tx.send(());
    timeout(Duration::from_secs(10), gateway_task).await???;
    echo_task.abort();
    println!("done");
    Ok(())
}
