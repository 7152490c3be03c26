//! The `sudp` binary: parse the command line, build a typed config, run.

use clap::{Parser, Subcommand};

/// Secure-UDP streaming gateway: SOCKS5 over TLS, UDP as independently decryptable records.
#[derive(Parser)]
#[command(name = "sudp", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "sudp=debug".
    #[arg(long, global = true, default_value = "info", env = "SUDP_LOG")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the wire limits of this build (record overhead, largest payload, window sizes).
    Limits,
    /// Write a development CA, gateway and client certificates
    Cert(sudp::cert::CertArgs),
    /// Hash a password read on stdin into a users-file line
    Passwd(sudp::auth::PasswdArgs),
    /// Write a new cluster key (seals what the gateways of a cluster share in the store)
    ClusterKey(sudp::store::cli::ClusterKeyArgs),
    /// Operate on a cluster's shared store (Redis): `sudp store purge`
    Store(sudp::store::cli::StoreArgs),
    /// Run the gateway: SOCKS5 over TLS; naked and secure UDP on one relay socket
    Gateway(Box<sudp::config::GatewayArgs>),
    /// Run the client shim: a local SOCKS5 server and port forwards that reach targets
    /// through a gateway, UDP as secure records
    Shim(Box<sudp::config::ShimArgs>),
    /// Measure datagram throughput, loss, latency and CPU per datagram (secure, naked,
    /// direct); `sudp bench reflect` is the far end for runs across machines
    Bench(Box<sudp::bench::BenchArgs>),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.cmd {
        Cmd::Cert(args) => sudp::cert::run_cert(args),
        Cmd::Passwd(args) => sudp::auth::run_passwd(args),
        Cmd::ClusterKey(args) => sudp::store::cli::run_cluster_key(args),
        Cmd::Store(args) => sudp::store::cli::run_store(args),
        Cmd::Gateway(args) => run_gateway(*args),
        Cmd::Shim(args) => run_shim(*args),
        Cmd::Bench(args) => runtime()?.block_on(sudp::bench::run_cli(*args, shutdown_signal())),
        Cmd::Limits => {
            use sudp::proto::record;
            println!(
                "record overhead: {} bytes + 1..16 padding",
                record::PREFIX_LEN + record::TAG_LEN
            );
            println!("largest record: {} bytes", record::MAX_DATAGRAM);
            println!(
                "largest plaintext (address header + payload): {} bytes",
                record::MAX_PLAINTEXT
            );
            println!("records per key: {}", record::MAX_RECORDS_PER_KEY);
            println!(
                "replay window: default {}, {}..={}",
                sudp::proto::replay::DEFAULT_WINDOW,
                sudp::proto::replay::MIN_WINDOW,
                sudp::proto::replay::MAX_WINDOW
            );
            Ok(())
        }
    }
}

fn run_gateway(args: sudp::config::GatewayArgs) -> anyhow::Result<()> {
    let config = sudp::config::GatewayConfig::from_args(args)?;
    let settings = sudp::gateway::Settings::from_config(&config)?;
    runtime()?.block_on(async {
        let gateway = sudp::gateway::Gateway::bind(settings).await?;
        let shutdown = armed_shutdown_signal().await;
        println!("control (TLS) {}", gateway.control_addr());
        println!("relay (UDP) {}", gateway.relay_addr());
        use std::io::Write as _;
        std::io::stdout().flush()?;
        gateway.run(shutdown).await?;
        Ok(())
    })
}

fn run_shim(args: sudp::config::ShimArgs) -> anyhow::Result<()> {
    let config = sudp::config::ShimConfig::from_args(args)?;
    let settings = sudp::shim::ShimSettings::from_config(&config)?;
    runtime()?.block_on(async {
        let shim = sudp::shim::Shim::bind(settings).await?;
        let shutdown = armed_shutdown_signal().await;
        if let Some(a) = shim.socks_addr() {
            println!("socks {a}");
        }
        for (f, local) in shim.forward_addrs() {
            println!("forward {} {local} -> {}", f.proto, f.target);
        }
        use std::io::Write as _;
        std::io::stdout().flush()?;
        shim.run(shutdown).await?;
        Ok(())
    })
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

/// [`shutdown_signal`], polled once so that its signal handlers are installed before the
/// caller prints what it bound: a SIGTERM sent as soon as those lines appear then stops the
/// process gracefully instead of killing it (the default action of an unhandled SIGTERM).
async fn armed_shutdown_signal() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    let mut signal = Box::pin(shutdown_signal());
    tokio::select! {
        biased;
        _ = &mut signal => Box::pin(std::future::ready(())),
        _ = std::future::ready(()) => signal,
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("signal received: shutting down");
}
