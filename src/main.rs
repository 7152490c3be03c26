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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log)?)
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Limits => {
            use sudp::proto::record;
            println!("record overhead: {} bytes + 1..16 padding", record::PREFIX_LEN + record::TAG_LEN);
            println!("largest record: {} bytes", record::MAX_DATAGRAM);
            println!("largest plaintext (address header + payload): {} bytes", record::MAX_PLAINTEXT);
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
