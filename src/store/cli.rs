//! The store's subcommands: `sudp cluster-key` writes a cluster key, `sudp store purge`
//! empties a table on every node.

use std::path::PathBuf;
use std::time::Duration;

use super::{ClusterKey, Table};

/// Write a new cluster key: 32 random bytes as 64 hex digits, mode 0600.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterKeyArgs {
    /// File to create; an existing file is never overwritten.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Operate on a cluster's shared store.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// What to do.
    #[command(subcommand)]
    pub cmd: StoreCmd,
}

/// `sudp store` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum StoreCmd {
    /// Delete every record of one table in Redis and in every running node's local tier
    Purge(PurgeArgs),
}

/// `sudp store purge`.
#[derive(Debug, Clone, clap::Args)]
pub struct PurgeArgs {
    /// The store: redis://HOST:PORT/DB, rediss://HOST:PORT/DB or
    /// redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB].
    #[arg(long, value_name = "URL")]
    pub store: String,
    /// The cluster's name.
    #[arg(long, value_name = "NAME", default_value = "default")]
    pub cluster: String,
    /// The table: tls-session, ticket-keys, association, ...
    #[arg(long, value_name = "TABLE")]
    pub table: String,
}

/// `sudp cluster-key --out FILE`.
pub fn run_cluster_key(args: ClusterKeyArgs) -> anyhow::Result<()> {
    ClusterKey::write_new(&args.out)?;
    eprintln!("wrote a new cluster key to {}", args.out.display());
    Ok(())
}

/// `sudp store ...` on a runtime of its own.
pub fn run_store(args: StoreArgs) -> anyhow::Result<()> {
    match args.cmd {
        StoreCmd::Purge(p) => {
            let table = Table::new(&p.table)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let n = runtime.block_on(super::redis::purge_table(
                &p.store,
                &p.cluster,
                &table,
                Duration::from_secs(5),
            ))?;
            println!("purged {n} records of table {table} in cluster {}", p.cluster);
            Ok(())
        }
    }
}
