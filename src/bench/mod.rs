//! `warren bench`: a load generator in the spirit of RabbitMQ's PerfTest.

/// Command-line options of `warren bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// AMQP URI of the broker under test.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub uri: String,
}

/// Run the benchmark described by `args`.
pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("warren bench is not built yet")
}
