//! `warren`: the one binary for every role (dev cluster, storage node, compute node, bench).

mod bench;
mod ctl;
mod dev;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Warren: an AMQP 0-9-1 message broker built as a cloud service.
#[derive(Parser)]
#[command(name = "warren", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a complete local cluster in the foreground: by default three storage nodes in three
    /// zones and one compute node on loopback (see --compute, --zones, --storage-per-zone),
    /// data under --data-dir.
    Dev(dev::DevArgs),
    /// Run one storage node from a config file.
    Storage(RoleArgs),
    /// Run one compute node (the AMQP server) from a config file.
    Compute(RoleArgs),
    /// Load-generate against any AMQP 0-9-1 broker and report throughput and latency.
    Bench(bench::BenchArgs),
    /// Administer a cluster: list its nodes, evict one.
    Ctl(ctl::CtlArgs),
}

/// Arguments shared by the single-role subcommands.
#[derive(clap::Args)]
struct RoleArgs {
    /// The role's TOML config file.
    #[arg(long)]
    config: PathBuf,
    /// Exit when standard input reaches end of file (used by `warren dev` so that children
    /// never outlive their supervisor, even after it is killed with SIGKILL).
    #[arg(long)]
    exit_on_stdin_close: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    warren_common::telemetry::init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Dev(args) => dev::run(args).await,
            Command::Storage(args) => {
                dev::run_storage(&args.config, args.exit_on_stdin_close).await
            }
            Command::Compute(args) => {
                dev::run_compute(&args.config, args.exit_on_stdin_close).await
            }
            Command::Bench(args) => bench::run(args).await,
            Command::Ctl(args) => ctl::run(args).await,
        }
    });
    // Do not wait for blocking-pool work that never ends by itself (the standard-input
    // watcher of --exit-on-stdin-close blocks in read(2)): the role has stopped cleanly.
    runtime.shutdown_timeout(std::time::Duration::from_millis(250));
    result
}
