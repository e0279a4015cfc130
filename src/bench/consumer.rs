//! One consumer: its own connection and channel, consuming one queue with automatic or manual
//! (optionally batched) acknowledgements, timing each stamped body end to end.

use super::payload::RunClock;
use super::report::{Counters, new_histogram, record};
use anyhow::Context as _;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use hdrhistogram::Histogram;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Connection, Consumer};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;

/// How long a partial batch of acknowledgements may wait for more deliveries before it is sent,
/// so a slow or finished producer never leaves messages unacknowledged.
const ACK_FLUSH_AFTER: Duration = Duration::from_millis(50);

/// What one consumer does.
#[derive(Clone, Debug)]
pub struct ConsumerPlan {
    /// Index among consumers (used in the consumer tag).
    pub index: u32,
    /// Queue to consume.
    pub queue: String,
    /// no-ack consumption.
    pub auto_ack: bool,
    /// Ack with multiple=true once this many deliveries are pending (0 or 1: ack each).
    pub multi_ack_every: u32,
    /// basic.qos prefetch-count (0: unlimited); only applied with manual acks.
    pub prefetch: u16,
}

/// What a consumer measured.
#[derive(Debug)]
pub struct ConsumerOutcome {
    /// Publish-to-delivery latencies.
    pub e2e_latency: Histogram<u64>,
}

/// A consumer whose basic.consume-ok has arrived, ready to be driven by [`ReadyConsumer::run`].
pub struct ReadyConsumer {
    conn: Connection,
    channel: lapin::Channel,
    consumer: Consumer,
    plan: ConsumerPlan,
}

/// Open a channel on `conn`, set prefetch and start consuming.
pub async fn start(conn: Connection, plan: ConsumerPlan) -> anyhow::Result<ReadyConsumer> {
    let channel = conn.create_channel().await.context("channel.open")?;
    if !plan.auto_ack && plan.prefetch > 0 {
        channel
            .basic_qos(plan.prefetch, BasicQosOptions::default())
            .await
            .context("basic.qos")?;
    }
    let consumer = channel
        .basic_consume(
            ShortString::from(plan.queue.as_str()),
            ShortString::from(format!("warren-bench-{}", plan.index)),
            BasicConsumeOptions {
                no_ack: plan.auto_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("basic.consume on {}", plan.queue))?;
    Ok(ReadyConsumer {
        conn,
        channel,
        consumer,
        plan,
    })
}

impl ReadyConsumer {
    /// Consume until `stop` turns true, then close the connection.
    pub async fn run(
        self,
        clock: RunClock,
        counters: Arc<Counters>,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<ConsumerOutcome> {
        let ReadyConsumer {
            conn,
            channel,
            mut consumer,
            plan,
        } = self;
        let mut e2e_latency = new_histogram();
        let batch = plan.multi_ack_every.max(1);
        let channel_ref = &channel;
        let mut acks = FuturesUnordered::new();
        let mut pending: u32 = 0;
        let mut last_tag: u64 = 0;
        let flush = tokio::time::sleep(ACK_FLUSH_AFTER);
        tokio::pin!(flush);

        let ack = |tag: u64, multiple: bool| async move {
            channel_ref
                .basic_ack(tag, BasicAckOptions { multiple })
                .await
                .context("basic.ack")
        };

        while !*stop.borrow() {
            tokio::select! {
                biased;
                Some(done) = acks.next(), if !acks.is_empty() => {
                    done?;
                }
                changed = stop.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                delivery = consumer.next() => {
                    let Some(delivery) = delivery else {
                        anyhow::bail!("the broker cancelled the consumer on {}", plan.queue);
                    };
                    let delivery = delivery.context("receiving a delivery")?;
                    if let Some(latency) = clock.latency(&delivery.data) {
                        record(&mut e2e_latency, latency);
                    }
                    counters.consumed.fetch_add(1, Ordering::Relaxed);
                    if !plan.auto_ack {
                        last_tag = delivery.delivery_tag;
                        pending += 1;
                        if pending >= batch {
                            // FuturesUnordered polls new futures in push order, so acks leave
                            // in tag order and a multiple ack never precedes a single one.
                            acks.push(ack(last_tag, batch > 1));
                            pending = 0;
                        } else if pending == 1 {
                            flush.as_mut().reset(tokio::time::Instant::now() + ACK_FLUSH_AFTER);
                        }
                    }
                }
                () = &mut flush, if pending > 0 => {
                    acks.push(ack(last_tag, true));
                    pending = 0;
                }
            }
        }
        if pending > 0 {
            acks.push(ack(last_tag, true));
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(done) = acks.next().await {
                done?;
            }
            anyhow::Ok(())
        })
        .await;
        drop(acks);
        drop(consumer);
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "OK".into())).await;
        Ok(ConsumerOutcome { e2e_latency })
    }
}
