//! `warren dev` (a supervised local cluster) and the single-role entry points.

use std::path::{Path, PathBuf};

/// Options of `warren dev`.
#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Where all cluster data lives; reused on restart.
    #[arg(long, default_value = "./warren-data")]
    pub data_dir: PathBuf,
    /// AMQP port of the compute node.
    #[arg(long, default_value_t = 5672)]
    pub amqp_port: u16,
    /// Management HTTP port of the compute node.
    #[arg(long, default_value_t = 15672)]
    pub http_port: u16,
}

/// Run the local cluster until SIGINT or SIGTERM.
pub async fn run(_args: DevArgs) -> anyhow::Result<()> {
    anyhow::bail!("warren dev is not built yet")
}

/// Run one storage node.
pub async fn run_storage(_config: &Path, _exit_on_stdin_close: bool) -> anyhow::Result<()> {
    anyhow::bail!("warren storage is not built yet")
}

/// Run one compute node.
pub async fn run_compute(_config: &Path, _exit_on_stdin_close: bool) -> anyhow::Result<()> {
    anyhow::bail!("warren compute is not built yet")
}
