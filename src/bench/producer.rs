//! One producer: its own connection and channel, publishing stamped bodies to one queue through
//! the default exchange, with an optional confirm window and rate limit.

use super::payload::RunClock;
use super::report::{Counters, SlowConfirm, new_histogram, record};
use anyhow::Context as _;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use hdrhistogram::Histogram;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Connection};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// Publishes handed to the client library but not yet written to the socket. Without this
/// pipelining every publish would wait for a round trip through the client's I/O thread.
const SEND_WINDOW: usize = 64;

/// What one producer does.
#[derive(Clone, Debug)]
pub struct ProducerPlan {
    /// Index among producers, written into each body.
    pub index: u32,
    /// Routing key on the default exchange, i.e. the queue name.
    pub queue: String,
    /// Body size in bytes.
    pub size: usize,
    /// Max outstanding unconfirmed publishes; 0 disables publisher confirms.
    pub confirm: usize,
    /// delivery-mode 2.
    pub persistent: bool,
    /// Messages per second; 0 for as fast as possible.
    pub rate: f64,
    /// When publishing stops.
    pub end: Instant,
    /// When waiting for outstanding confirms gives up.
    pub give_up: Instant,
    /// Confirms slower than this are listed individually.
    pub slow_confirm: Duration,
}

/// Confirm stalls a producer keeps for the report, at most.
const MAX_STALLS: usize = 50;

/// What a producer measured.
#[derive(Debug)]
pub struct ProducerOutcome {
    /// Publish-to-confirm latencies.
    pub confirm_latency: Histogram<u64>,
    /// Runs of confirms slower than the plan's threshold, to line up with broker logs.
    pub slow_confirms: Vec<SlowConfirm>,
    /// Confirms still outstanding when the producer gave up waiting.
    pub unconfirmed: usize,
}

/// Publish according to `plan` on the already open `conn` until `plan.end`, then wait
/// (until `plan.give_up` at the latest) for outstanding confirms.
pub async fn run(
    conn: Connection,
    plan: ProducerPlan,
    clock: RunClock,
    counters: Arc<Counters>,
) -> anyhow::Result<ProducerOutcome> {
    let channel = conn.create_channel().await.context("channel.open")?;
    if plan.confirm > 0 {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("confirm.select")?;
    }
    let properties = if plan.persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default().with_delivery_mode(1)
    };
    let routing_key = ShortString::from(plan.queue.as_str());
    let mut body = clock.new_body(plan.size, plan.index);
    let mut confirm_latency = new_histogram();
    let mut slow_confirms = Vec::new();

    let interval = (plan.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / plan.rate));
    let mut next_at = Instant::now();
    let pace = tokio::time::sleep_until(next_at);
    tokio::pin!(pace);
    let stop = tokio::time::sleep_until(plan.end);
    tokio::pin!(stop);
    let give_up = tokio::time::sleep_until(plan.give_up);
    tokio::pin!(give_up);

    let channel_ref = &channel;
    let mut sends = FuturesUnordered::new();
    let mut confirms = FuturesUnordered::new();
    let mut publishing = true;

    loop {
        if !publishing && sends.is_empty() && confirms.is_empty() {
            break;
        }
        let window_open = sends.len() < SEND_WINDOW
            && (plan.confirm == 0 || sends.len() + confirms.len() < plan.confirm);
        let can_publish = publishing && window_open;
        tokio::select! {
            biased;
            Some(done) = confirms.next(), if !confirms.is_empty() => {
                let (result, sent_at): (lapin::Result<lapin::Confirmation>, Instant) = done;
                let confirmation = result.context("waiting for a publisher confirm")?;
                if confirmation.is_ack() {
                    let latency = sent_at.elapsed();
                    record(&mut confirm_latency, latency);
                    if latency >= plan.slow_confirm {
                        SlowConfirm::record(&mut slow_confirms, MAX_STALLS, &clock, plan.index, latency);
                    }
                    counters.confirmed.fetch_add(1, Ordering::Relaxed);
                } else {
                    counters.nacked.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(done) = sends.next(), if !sends.is_empty() => {
                let (result, sent_at): (lapin::Result<lapin::PublisherConfirm>, Instant) = done;
                let confirm = result.context("basic.publish")?;
                counters.published.fetch_add(1, Ordering::Relaxed);
                if plan.confirm > 0 {
                    confirms.push(async move { (confirm.await, sent_at) });
                }
            }
            () = &mut stop, if publishing => {
                publishing = false;
            }
            () = &mut give_up, if !publishing => {
                break;
            }
            () = &mut pace, if can_publish => {
                if let Some(interval) = interval {
                    next_at += interval;
                    // After a stall, resume the rate instead of bursting to catch up.
                    let now = Instant::now();
                    if next_at + Duration::from_secs(1) < now {
                        next_at = now;
                    }
                    pace.as_mut().reset(next_at);
                }
                clock.stamp(&mut body);
                let payload = body.clone();
                let routing_key = routing_key.clone();
                let properties = properties.clone();
                let sent_at = Instant::now();
                sends.push(async move {
                    let result = channel_ref
                        .basic_publish(
                            ShortString::from(""),
                            routing_key,
                            BasicPublishOptions::default(),
                            &payload,
                            properties,
                        )
                        .await;
                    (result, sent_at)
                });
            }
        }
    }

    let unconfirmed = sends.len() + confirms.len();
    drop(sends);
    drop(confirms);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "OK".into())).await;
    Ok(ProducerOutcome {
        confirm_latency,
        slow_confirms,
        unconfirmed,
    })
}
