//! `warren bench`: a load generator in the spirit of RabbitMQ's PerfTest.
//!
//! It speaks plain AMQP 0-9-1 through `lapin`, so it measures Warren and RabbitMQ (or any other
//! broker) the same way: it declares its queues, connects every producer and consumer on its own
//! connection, publishes stamped bodies through the default exchange for `--duration` seconds,
//! waits (bounded) for confirms and for consumers to drain, deletes its queues, and reports
//! throughput and latency percentiles as text and, with `--json`, as a JSON file.

mod consumer;
mod payload;
mod producer;
mod report;

use anyhow::{Context as _, bail};
use clap::ArgAction;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Connection, ConnectionProperties};
use payload::RunClock;
use report::{Counters, Latency, Rates, Report, Sample, Setup, new_histogram};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How long connecting and declaring may take before the run is abandoned.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Command-line options of `warren bench` (names follow RabbitMQ PerfTest where one exists).
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// AMQP URI of the broker under test. Give it several times to spread connections over
    /// the nodes of a cluster: producer i connects to URI i mod N, consumer j to URI
    /// (j + --consumer-uri-offset) mod N; queues are declared and deleted through the first.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", action = ArgAction::Append)]
    pub uri: Vec<String>,
    /// Shift consumers' URIs relative to producers' (with 2 URIs and offset 1, every consumer
    /// is on a different node from the producer of its queue).
    #[arg(long, default_value_t = 0)]
    pub consumer_uri_offset: usize,
    /// Number of producers, each on its own connection.
    #[arg(long, short = 'x', default_value_t = 1)]
    pub producers: usize,
    /// Number of consumers, each on its own connection.
    #[arg(long, short = 'y', default_value_t = 1)]
    pub consumers: usize,
    /// Queue name, or a pattern where `%d` is replaced by each number from --queue-pattern-from
    /// to --queue-pattern-to. Producer i publishes to queue i mod N; consumer j consumes queue
    /// j mod N.
    #[arg(
        long = "queues",
        short = 'u',
        visible_aliases = ["queue", "queue-pattern"],
        default_value = "warren-bench"
    )]
    pub queues: String,
    /// First number substituted for `%d` in --queues.
    #[arg(long, default_value_t = 1)]
    pub queue_pattern_from: u32,
    /// Last number substituted for `%d` in --queues.
    #[arg(long, default_value_t = 1)]
    pub queue_pattern_to: u32,
    /// Queue arguments as comma-separated key=value pairs, e.g. `x-queue-type=quorum`. Integer
    /// values are sent as long integers, true/false as booleans, anything else as strings.
    #[arg(long)]
    pub queue_args: Option<String>,
    /// Declare the queues durable.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub queue_durable: bool,
    /// Declare the queues auto-delete (quorum queues refuse this).
    #[arg(long, default_value_t = false, action = ArgAction::Set)]
    pub auto_delete: bool,
    /// Leave the queues (and any messages in them) in place at the end instead of deleting them.
    #[arg(long)]
    pub keep_queues: bool,
    /// Use queues that already exist: neither declare, purge nor delete them (e.g. to drain a
    /// backlog left by an earlier run with --keep-queues).
    #[arg(long)]
    pub predeclared: bool,
    /// Message body size in bytes (at least 16: the body carries its send time).
    #[arg(long, short = 's', default_value_t = 1024)]
    pub size: usize,
    /// Max outstanding unconfirmed publishes per producer; 0 disables publisher confirms.
    #[arg(long, short = 'c', default_value_t = 0)]
    pub confirm: usize,
    /// Publish with delivery-mode 2 (persistent).
    #[arg(long)]
    pub persistent: bool,
    /// Consume with no-ack (automatic acknowledgement).
    #[arg(long, short = 'a')]
    pub auto_ack: bool,
    /// With manual acks, ack with multiple=true once every N deliveries (0 or 1: ack each one).
    #[arg(long, short = 'A', default_value_t = 0)]
    pub multi_ack_every: u32,
    /// Consumer prefetch count (basic.qos) for manual acks; 0 means unlimited.
    #[arg(long, short = 'q', visible_alias = "qos", default_value_t = 0)]
    pub prefetch: u16,
    /// Publishing rate per producer in messages per second; 0 means as fast as possible.
    #[arg(long, short = 'r', default_value_t = 0.0)]
    pub rate: f64,
    /// How long producers publish, in seconds.
    #[arg(long, short = 'z', visible_alias = "time", default_value_t = 10)]
    pub duration: u64,
    /// After publishing stops, how many seconds to wait at most for outstanding confirms and
    /// for consumers to receive everything that was published.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
    /// List confirm stalls (runs of confirms slower than this many milliseconds) in the JSON
    /// report with their wall-clock times, to line up with broker logs.
    #[arg(long, default_value_t = 100)]
    pub slow_confirm_ms: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A label recorded in the JSON report.
    #[arg(long)]
    pub id: Option<String>,
    /// Threads that run the producer and consumer tasks (the client library adds one I/O
    /// thread per connection).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Do not print per-second progress lines.
    #[arg(long)]
    pub quiet: bool,
}

impl BenchArgs {
    /// Refuse options that cannot produce a meaningful run.
    fn validate(&self) -> anyhow::Result<()> {
        if self.producers == 0 && self.consumers == 0 {
            bail!("--producers and --consumers are both 0: nothing to do");
        }
        if self.duration == 0 {
            bail!("--duration must be at least 1 second");
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            bail!("--rate must be a non-negative number");
        }
        if self.queue_pattern_from > self.queue_pattern_to {
            bail!("--queue-pattern-from must not exceed --queue-pattern-to");
        }
        if self.queues.contains("%d") && self.queue_pattern_to - self.queue_pattern_from >= 10_000 {
            bail!("--queues pattern would declare more than 10000 queues");
        }
        if !self.auto_ack && self.prefetch > 0 && self.multi_ack_every > u32::from(self.prefetch) {
            bail!(
                "--multi-ack-every ({}) is larger than --prefetch ({}): consumers would stall",
                self.multi_ack_every,
                self.prefetch
            );
        }
        if self.size < payload::MIN_SIZE {
            bail!("--size must be at least {} bytes", payload::MIN_SIZE);
        }
        Ok(())
    }

    /// The queue names the run declares and uses.
    fn queue_names(&self) -> Vec<String> {
        if self.queues.contains("%d") {
            (self.queue_pattern_from..=self.queue_pattern_to)
                .map(|i| self.queues.replace("%d", &i.to_string()))
                .collect()
        } else {
            vec![self.queues.clone()]
        }
    }
}

/// Parse `k=v,k2=v2` into an AMQP field table, typing values like PerfTest does.
fn parse_queue_args(spec: Option<&str>) -> anyhow::Result<FieldTable> {
    let mut table = FieldTable::default();
    let Some(spec) = spec else {
        return Ok(table);
    };
    for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--queue-args entry {pair:?} is not key=value"))?;
        let value = if let Ok(n) = value.parse::<i64>() {
            AMQPValue::LongLongInt(n)
        } else if let Ok(b) = value.parse::<bool>() {
            AMQPValue::Boolean(b)
        } else {
            AMQPValue::LongString(LongString::from(value))
        };
        table.insert(ShortString::from(key.trim()), value);
    }
    Ok(table)
}

impl BenchArgs {
    /// The URI queues are declared and deleted through.
    fn setup_uri(&self) -> &str {
        self.uri.first().map_or("", String::as_str)
    }

    /// The URI producer `index` connects to.
    fn producer_uri(&self, index: usize) -> &str {
        self.uri
            .get(index % self.uri.len().max(1))
            .map_or("", String::as_str)
    }

    /// The URI consumer `index` connects to.
    fn consumer_uri(&self, index: usize) -> &str {
        self.uri
            .get((index + self.consumer_uri_offset) % self.uri.len().max(1))
            .map_or("", String::as_str)
    }
}

async fn connect(uri: &str, name: String) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.clone().into());
    tokio::time::timeout(SETUP_TIMEOUT, Connection::connect(uri, properties))
        .await
        .with_context(|| format!("{name}: connecting timed out"))?
        .with_context(|| format!("{name}: connecting to the broker"))
}

/// Declare (and empty) the queues on a connection of their own.
async fn declare_queues(args: &BenchArgs, queues: &[String]) -> anyhow::Result<()> {
    let arguments = parse_queue_args(args.queue_args.as_deref())?;
    let conn = connect(args.setup_uri(), "warren-bench-setup".into()).await?;
    for queue in queues {
        let channel = conn.create_channel().await.context("channel.open")?;
        channel
            .queue_declare(
                ShortString::from(queue.as_str()),
                QueueDeclareOptions {
                    durable: args.queue_durable,
                    auto_delete: args.auto_delete,
                    ..QueueDeclareOptions::default()
                },
                arguments.clone(),
            )
            .await
            .with_context(|| format!("queue.declare {queue}"))?;
        // Messages left by an earlier run would distort rates and latencies.
        channel
            .queue_purge(
                ShortString::from(queue.as_str()),
                QueuePurgeOptions::default(),
            )
            .await
            .with_context(|| format!("queue.purge {queue}"))?;
        let _ = channel.close(200, "OK".into()).await;
    }
    let _ = conn.close(200, "OK".into()).await;
    Ok(())
}

/// Delete the run's queues; failures are reported but do not fail the run.
#[allow(clippy::print_stdout)]
async fn delete_queues(uri: &str, queues: &[String]) {
    let result = tokio::time::timeout(SETUP_TIMEOUT, async {
        let conn = connect(uri, "warren-bench-teardown".into()).await?;
        for queue in queues {
            let channel = conn.create_channel().await.context("channel.open")?;
            channel
                .queue_delete(
                    ShortString::from(queue.as_str()),
                    QueueDeleteOptions::default(),
                )
                .await
                .with_context(|| format!("queue.delete {queue}"))?;
            let _ = channel.close(200, "OK".into()).await;
        }
        let _ = conn.close(200, "OK".into()).await;
        anyhow::Ok(())
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("warning: could not delete the bench queues: {e:#}"),
        Err(_) => eprintln!("warning: deleting the bench queues timed out"),
    }
}

/// Run the benchmark described by `args`.
#[allow(clippy::print_stdout)]
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let report = execute(&args).await?;
    print!("{}", report.to_text());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if report.totals.nacked > 0 {
        eprintln!(
            "warning: the broker nacked {} publishes",
            report.totals.nacked
        );
    }
    Ok(())
}

/// Declare, run and tear down one benchmark, returning its report.
async fn execute(args: &BenchArgs) -> anyhow::Result<Report> {
    args.validate()?;
    let queues = args.queue_names();
    let cpu_at_start = report::process_cpu_seconds();
    if !args.predeclared {
        declare_queues(args, &queues).await?;
    }

    // The run gets a runtime of its own. With the default of one thread, every producer and
    // consumer task shares it: on a small machine shared with the broker, cross-thread wake-ups
    // cost more CPU than the work itself (about 10% more throughput against RabbitMQ measured).
    let (a, q) = (args.clone(), queues.clone());
    let result = tokio::task::spawn_blocking(move || {
        let mut builder = if a.threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(a.threads);
            b
        };
        builder.enable_all().build()?.block_on(drive(&a, &q))
    })
    .await
    .context("bench runtime thread")?;
    if !args.keep_queues && !args.predeclared {
        delete_queues(args.setup_uri(), &queues).await;
    }
    let mut report = result?;
    report.bench_cpu_s = match (cpu_at_start, report::process_cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok(report)
}

/// Connect everyone, publish for the duration, drain, and build the report.
#[allow(clippy::print_stdout)]
async fn drive(args: &BenchArgs, queues: &[String]) -> anyhow::Result<Report> {
    let clock = RunClock::start();
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);

    // Consumers first, so that nothing published is missed and backlogs do not build up.
    let mut ready = JoinSet::new();
    for index in 0..args.consumers {
        let plan = consumer::ConsumerPlan {
            index: index as u32,
            queue: queues[index % queues.len()].clone(),
            auto_ack: args.auto_ack,
            multi_ack_every: args.multi_ack_every,
            prefetch: args.prefetch,
        };
        let uri = args.consumer_uri(index).to_string();
        ready.spawn(async move {
            let conn = connect(&uri, format!("warren-bench-consumer-{index}")).await?;
            consumer::start(conn, plan).await
        });
    }
    let mut consumers = JoinSet::new();
    while let Some(started) = ready.join_next().await {
        let started = started.context("consumer setup task")??;
        consumers.spawn(started.run(clock, Arc::clone(&counters), stop_rx.clone()));
    }

    let mut producer_conns = Vec::with_capacity(args.producers);
    for index in 0..args.producers {
        producer_conns.push(
            connect(
                args.producer_uri(index),
                format!("warren-bench-producer-{index}"),
            )
            .await?,
        );
    }
    let start = Instant::now();
    let end = start + Duration::from_secs(args.duration);
    let drain_timeout = Duration::from_secs(args.drain_timeout);
    let mut producers = JoinSet::new();
    for (index, conn) in producer_conns.into_iter().enumerate() {
        let plan = producer::ProducerPlan {
            index: index as u32,
            queue: queues[index % queues.len()].clone(),
            size: args.size,
            confirm: args.confirm,
            persistent: args.persistent,
            rate: args.rate,
            end,
            give_up: end + drain_timeout,
            slow_confirm: Duration::from_millis(args.slow_confirm_ms),
        };
        producers.spawn(producer::run(conn, plan, clock, Arc::clone(&counters)));
    }

    // Per-second progress, and the counts at the end of the publishing window.
    let mut samples = Vec::new();
    let mut last = counters.snapshot();
    let mut tick = start;
    // Tasks only end early on error; one that ends right at `end` is kept for the report.
    let mut producers_done = Vec::new();
    let mut consumers_done = Vec::new();
    while tick < end {
        let next = (tick + Duration::from_secs(1)).min(end);
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(next) => {}
            Some(done) = producers.join_next() => {
                match done.context("producer task").and_then(|r| r) {
                    Ok(outcome) => producers_done.push(outcome),
                    Err(e) => {
                        let _ = stop_tx.send(true);
                        return Err(e);
                    }
                }
                continue;
            }
            Some(done) = consumers.join_next() => {
                match done.context("consumer task").and_then(|r| r) {
                    Ok(outcome) => consumers_done.push(outcome),
                    Err(e) => {
                        let _ = stop_tx.send(true);
                        return Err(e);
                    }
                }
                continue;
            }
        }
        let now = counters.snapshot();
        let sample = Sample {
            t: (next - start).as_secs_f64(),
            rates: Rates::of(&now.since(&last), next - tick),
        };
        if !args.quiet {
            println!(
                "time {:5.1} s, sent {:8.0} msg/s, confirmed {:8.0} msg/s, received {:8.0} msg/s",
                sample.t, sample.rates.published, sample.rates.confirmed, sample.rates.consumed
            );
        }
        samples.push(sample);
        last = now;
        tick = next;
    }
    let window = last;
    let rates = Rates::of(&window, end - start);

    // Producers stop by themselves at `end` and wait for their confirms until `give_up`.
    let mut confirm_latency = new_histogram();
    let mut slow_confirms = Vec::new();
    let mut unconfirmed = 0;
    while let Some(done) = producers.join_next().await {
        producers_done.push(done.context("producer task")??);
    }
    for outcome in producers_done {
        confirm_latency.add(&outcome.confirm_latency)?;
        slow_confirms.extend(outcome.slow_confirms);
        unconfirmed += outcome.unconfirmed;
    }
    if unconfirmed > 0 {
        eprintln!("warning: {unconfirmed} publishes were still unconfirmed at the drain timeout");
    }

    // Consumers drain whatever was published, bounded by the drain timeout.
    let drain_deadline = end + drain_timeout;
    let mut drained = args.consumers == 0;
    if args.consumers > 0 {
        loop {
            let now = counters.snapshot();
            if now.consumed >= now.published {
                drained = true;
                break;
            }
            if Instant::now() >= drain_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let drain_s = (Instant::now().max(end) - end).as_secs_f64();
    let _ = stop_tx.send(true);
    let mut e2e_latency = new_histogram();
    while let Some(done) = consumers.join_next().await {
        consumers_done.push(done.context("consumer task")??);
    }
    for outcome in consumers_done {
        e2e_latency.add(&outcome.e2e_latency)?;
    }

    Ok(Report {
        setup: Setup {
            uri: args
                .uri
                .iter()
                .map(|u| report::mask_uri(u))
                .collect::<Vec<_>>()
                .join(","),
            id: args.id.clone(),
            producers: args.producers,
            consumers: args.consumers,
            queues: queues.to_vec(),
            queue_args: args.queue_args.clone(),
            queue_durable: args.queue_durable,
            size: args.size,
            confirm: args.confirm,
            persistent: args.persistent,
            auto_ack: args.auto_ack,
            multi_ack_every: args.multi_ack_every,
            prefetch: args.prefetch,
            rate: args.rate,
            duration_s: args.duration as f64,
        },
        window,
        rates,
        totals: counters.snapshot(),
        drained,
        drain_s,
        confirm_latency_us: Latency::of(&confirm_latency),
        e2e_latency_us: Latency::of(&e2e_latency),
        slow_confirms: {
            slow_confirms.sort_by_key(|c| c.sent_unix_ms);
            slow_confirms
        },
        samples,
        bench_cpu_s: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        let mut argv = vec!["bench"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli.bench,
            Err(e) => panic!("{e}"),
        }
    }

    /// A Warren compute node with in-memory queues on a free loopback port.
    async fn in_memory_broker() -> (warren_compute::server::ComputeNode, String) {
        let mut config =
            warren_compute::config::ComputeConfig::new(warren_common::config::TlsPaths {
                ca_cert: "unused".into(),
                cert: "unused".into(),
                key: "unused".into(),
            });
        config.amqp_listen = "127.0.0.1:0".parse().expect("loopback address");
        let node = warren_compute::server::ComputeNode::start_in_memory(config)
            .await
            .expect("in-memory compute node starts");
        let uri = format!("amqp://guest:guest@{}/%2f", node.local_addr());
        (node, uri)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn confirmed_manual_ack_run_accounts_for_every_message() {
        let (node, uri) = in_memory_broker().await;
        let args = parse(&[
            "--uri",
            &uri,
            "-x",
            "2",
            "-y",
            "2",
            "--queues",
            "bench-test-%d",
            "--queue-pattern-to",
            "2",
            "--confirm",
            "10",
            "--persistent",
            "--prefetch",
            "20",
            "--multi-ack-every",
            "5",
            "--rate",
            "300",
            "--duration",
            "1",
            "--quiet",
        ]);
        let report = execute(&args).await.expect("bench run");
        node.stop().await;
        let t = report.totals;
        assert!(t.published > 0, "{t:?}");
        assert_eq!(t.confirmed + t.nacked, t.published, "{t:?}");
        assert_eq!(t.consumed, t.published, "{t:?}");
        assert!(report.drained);
        assert_eq!(report.confirm_latency_us.count, t.confirmed);
        assert_eq!(report.e2e_latency_us.count, t.consumed);
        assert!(report.confirm_latency_us.p50 <= report.confirm_latency_us.max);
        assert_eq!(report.setup.queues, vec!["bench-test-1", "bench-test-2"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auto_ack_run_without_confirms_drains() {
        let (node, uri) = in_memory_broker().await;
        let args = parse(&[
            "--uri",
            &uri,
            "--auto-ack",
            "--queue-durable",
            "false",
            "--rate",
            "500",
            "--duration",
            "1",
            "--quiet",
            "--size",
            "16",
        ]);
        let report = execute(&args).await.expect("bench run");
        node.stop().await;
        let t = report.totals;
        assert!(t.published > 0, "{t:?}");
        assert_eq!((t.confirmed, t.consumed), (0, t.published), "{t:?}");
        assert!(report.drained);
        assert_eq!(report.confirm_latency_us.count, 0);
        assert_eq!(report.e2e_latency_us.count, t.published);
    }

    #[test]
    fn queue_pattern_expands() {
        let args = parse(&[
            "--queues",
            "q-%d",
            "--queue-pattern-from",
            "1",
            "--queue-pattern-to",
            "3",
        ]);
        assert_eq!(args.queue_names(), vec!["q-1", "q-2", "q-3"]);
        assert_eq!(parse(&["--queues", "plain"]).queue_names(), vec!["plain"]);
    }

    #[test]
    fn perftest_style_short_options_parse() {
        let args = parse(&[
            "-x", "4", "-y", "2", "-c", "100", "-q", "50", "-A", "10", "-z", "5",
        ]);
        assert_eq!((args.producers, args.consumers), (4, 2));
        assert_eq!(
            (
                args.confirm,
                args.prefetch,
                args.multi_ack_every,
                args.duration
            ),
            (100, 50, 10, 5)
        );
        assert!(args.validate().is_ok());
    }

    #[test]
    fn stalling_ack_batches_are_refused() {
        let args = parse(&["--prefetch", "10", "--multi-ack-every", "20"]);
        assert!(args.validate().is_err());
        assert!(parse(&["--size", "8"]).validate().is_err());
        assert!(
            parse(&["--producers", "0", "--consumers", "0"])
                .validate()
                .is_err()
        );
    }

    #[test]
    fn queue_args_are_typed() {
        let table = parse_queue_args(Some(
            "x-queue-type=quorum, x-max-length=1000,x-single-active-consumer=true",
        ))
        .expect("valid spec");
        let inner = table.inner();
        assert_eq!(
            inner.get(&ShortString::from("x-queue-type")),
            Some(&AMQPValue::LongString(LongString::from("quorum")))
        );
        assert_eq!(
            inner.get(&ShortString::from("x-max-length")),
            Some(&AMQPValue::LongLongInt(1000))
        );
        assert_eq!(
            inner.get(&ShortString::from("x-single-active-consumer")),
            Some(&AMQPValue::Boolean(true))
        );
        assert!(parse_queue_args(Some("novalue")).is_err());
    }
}
