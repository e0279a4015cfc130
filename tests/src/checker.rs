//! A queue checker in the style of RabbitMQ's Jepsen test: a confirmed-publish, manual-ack
//! workload whose clients fail over across a list of AMQP URLs, a history of everything the
//! clients saw, and a classification of every message once the queues are drained.
//!
//! The workload ([`Workload`]) records into a [`History`]; [`classify`] turns a history into a
//! [`Report`] without any I/O, so the rules themselves are unit-tested on hand-made histories.
//!
//! The rules (invariants 1 and 3 of the architecture):
//! - a message whose publish was confirmed must be delivered (`confirmed_lost` must be 0);
//! - a message whose confirm never came (`unconfirmed`) or was a nack may be delivered or not;
//! - a message may be delivered more than once only if every extra delivery carries
//!   `redelivered=true` or follows a delivery that was abandoned (its ack was never sent, or
//!   its connection failed), as at-least-once delivery allows;
//! - a delivery of a message nobody published is an error;
//! - after the producers stop, every queue drains to empty.

use anyhow::{Context, bail};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// A published message's identity: which producer sent it and its sequence number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsgId {
    /// Index of the producer.
    pub producer: u32,
    /// Sequence number within that producer (0, 1, 2, ...).
    pub seq: u64,
}

impl MsgId {
    /// The message body that carries this id.
    pub fn body(&self) -> String {
        format!("checker {}:{}", self.producer, self.seq)
    }

    /// The id in a body written by [`MsgId::body`], if it is one.
    pub fn parse(body: &[u8]) -> Option<MsgId> {
        let text = std::str::from_utf8(body).ok()?.strip_prefix("checker ")?;
        let (producer, seq) = text.split_once(':')?;
        Some(MsgId {
            producer: producer.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.producer, self.seq)
    }
}

/// What a producer learnt about one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Published, no answer yet (counts as unconfirmed once the run is over).
    Pending,
    /// `basic.ack` from the broker at this time.
    Confirmed(Duration),
    /// `basic.nack` from the broker at this time.
    Nacked(Duration),
    /// The connection failed or the confirm timed out: the broker may or may not have it.
    Unconfirmed,
}

/// One publish attempt.
#[derive(Debug, Clone)]
pub struct PublishRecord {
    /// Queue the message was sent to.
    pub queue: String,
    /// Session it was published on.
    pub session: usize,
    /// When `basic.publish` was sent.
    pub at: Duration,
    /// What the broker answered.
    pub outcome: Outcome,
}

/// One delivery to a consumer.
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    /// The message id, or `None` when the body is not one the workload wrote.
    pub id: Option<MsgId>,
    /// The raw body when it could not be parsed (for the report).
    pub raw: Option<String>,
    /// Queue it came from.
    pub queue: String,
    /// Session (connection) it arrived on.
    pub session: usize,
    /// The `redelivered` flag.
    pub redelivered: bool,
    /// When it arrived.
    pub at: Duration,
    /// Whether the ack was written to the connection without error.
    pub acked: bool,
}

/// How a client connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// Still open (a run that ends this way abandoned it).
    Open,
    /// Closed by the workload when it stopped.
    Clean,
    /// Lost: the error the client saw.
    Failed(String),
}

/// Which kind of client a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Publishes with confirms.
    Producer,
    /// Consumes with manual acks.
    Consumer,
    /// Counts and drains queues at the end.
    Observer,
}

/// One connection attempt of one client.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    /// Producer, consumer or observer.
    pub role: Role,
    /// Index of the client within its role.
    pub client: usize,
    /// The URL it connected (or tried to connect) to.
    pub url: String,
    /// When it started.
    pub started: Duration,
    /// How it ended.
    pub end: SessionEnd,
}

impl SessionRecord {
    fn failed(&self) -> bool {
        !matches!(self.end, SessionEnd::Clean)
    }
}

/// A fault injected (or healed) at a point of the run.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    /// What happened, e.g. `kill -9 storage-1`.
    pub label: String,
    /// When.
    pub at: Duration,
    /// True for the injection of a fault, false for its healing (only injections are timed).
    pub injection: bool,
}

/// Everything the workload's clients observed.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Every publish attempt, by id.
    pub publishes: BTreeMap<MsgId, PublishRecord>,
    /// Every delivery, in arrival order.
    pub deliveries: Vec<DeliveryRecord>,
    /// Every connection of every client (index = session id).
    pub sessions: Vec<SessionRecord>,
    /// Faults, in order.
    pub faults: Vec<FaultRecord>,
    /// Messages left in each queue after the final drain (queue.declare passive), or `None`
    /// if they could not be counted.
    pub remaining: Option<BTreeMap<String, u32>>,
}

/// The timing of publishing around one injected fault.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FaultTiming {
    /// The fault.
    pub fault: String,
    /// When it was injected, in ms since the workload started.
    pub at_ms: u64,
    /// From the fault to the first confirm (any producer) after it; `None` if none came.
    pub first_confirm_ms: Option<u64>,
    /// The longest pause of any one producer (gap between its consecutive confirms)
    /// overlapping the time from this fault to the next one. `None` if some producer never
    /// had a confirm after the fault.
    pub max_gap_ms: Option<u64>,
    /// From the fault until the end of each producer's longest pause, for the producer that
    /// resumed last: publishing had fully resumed by then. `None` as above.
    pub resumed_ms: Option<u64>,
}

/// The classification of a run; one line of JSON with [`Report::to_json`].
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Publish attempts.
    pub published: u64,
    /// Publishes the broker confirmed.
    pub confirmed: u64,
    /// Publishes the broker nacked.
    pub nacked: u64,
    /// Publishes with no answer (connection lost or confirm timed out).
    pub unconfirmed: u64,
    /// Confirmed and delivered at least once.
    pub confirmed_delivered: u64,
    /// Confirmed and never delivered: must be 0.
    pub confirmed_lost: u64,
    /// Unconfirmed (or nacked) and delivered anyway (fine: the broker took it).
    pub unconfirmed_delivered: u64,
    /// Unconfirmed (or nacked) and never delivered (fine: never confirmed).
    pub unconfirmed_lost: u64,
    /// Messages delivered more than once.
    pub duplicated: u64,
    /// Deliveries beyond the first, over all messages.
    pub extra_deliveries: u64,
    /// Extra deliveries with `redelivered=false` after no abandoned delivery: must be 0.
    pub unexplained_duplicates: u64,
    /// Deliveries of bodies no producer published: must be 0.
    pub unexpected: u64,
    /// Every queue was empty at the end.
    pub drained: bool,
    /// Messages left over all queues after draining (`None` if they could not be counted).
    pub remaining: Option<u64>,
    /// Producer and consumer connections that failed, by URL.
    pub failed_sessions: BTreeMap<String, u64>,
    /// Publishing around each injected fault.
    pub faults: Vec<FaultTiming>,
    /// A few confirmed-and-lost ids.
    pub lost_sample: Vec<String>,
    /// For the same ids: where and when each was published and confirmed, to set against
    /// the faults' times.
    pub lost_detail: Vec<String>,
    /// A few unexplained duplicates and unexpected bodies.
    pub anomaly_sample: Vec<String>,
}

impl Report {
    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Why the run fails the checker; empty when it passes.
    pub fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.confirmed_lost > 0 {
            out.push(format!(
                "{} confirmed messages lost (e.g. {:?})",
                self.confirmed_lost, self.lost_sample
            ));
        }
        if !self.drained {
            out.push(format!(
                "queues not drained to empty ({:?} messages left)",
                self.remaining
            ));
        }
        if self.unexplained_duplicates > 0 {
            out.push(format!(
                "{} duplicate deliveries neither redelivered nor after an abandoned delivery \
                 (e.g. {:?})",
                self.unexplained_duplicates, self.anomaly_sample
            ));
        }
        if self.unexpected > 0 {
            out.push(format!(
                "{} deliveries of messages never published (e.g. {:?})",
                self.unexpected, self.anomaly_sample
            ));
        }
        out
    }

    /// True when the run passes: nothing confirmed was lost, every queue drained, duplicates
    /// only from abandoned deliveries, nothing unexpected.
    pub fn passed(&self) -> bool {
        self.violations().is_empty()
    }

    /// Panic with the violations and the report unless the run passed.
    pub fn assert_passed(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "checker failed for {}: {}\nreport: {}",
            self.scenario,
            violations.join("; "),
            self.to_json()
        );
    }

    /// Client connections to `url` that failed.
    pub fn failures_at(&self, url: &str) -> u64 {
        self.failed_sessions.get(url).copied().unwrap_or(0)
    }
}

const SAMPLE: usize = 10;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Classify every message of a finished run.
pub fn classify(scenario: &str, history: &History) -> Report {
    let mut report = Report {
        scenario: scenario.to_string(),
        ..Report::default()
    };

    let mut deliveries: BTreeMap<MsgId, Vec<&DeliveryRecord>> = BTreeMap::new();
    for d in &history.deliveries {
        match d.id {
            Some(id) if history.publishes.contains_key(&id) => {
                deliveries.entry(id).or_default().push(d)
            }
            _ => {
                report.unexpected += 1;
                if report.anomaly_sample.len() < SAMPLE {
                    report.anomaly_sample.push(format!(
                        "unexpected body {:?} from {}",
                        d.raw.clone().or(d.id.map(|i| i.to_string())),
                        d.queue
                    ));
                }
            }
        }
    }

    let abandoned = |d: &DeliveryRecord| {
        !d.acked
            || history
                .sessions
                .get(d.session)
                .is_none_or(SessionRecord::failed)
    };

    for (id, publish) in &history.publishes {
        report.published += 1;
        let confirmed = match publish.outcome {
            Outcome::Confirmed(_) => {
                report.confirmed += 1;
                true
            }
            Outcome::Nacked(_) => {
                report.nacked += 1;
                false
            }
            Outcome::Pending | Outcome::Unconfirmed => {
                report.unconfirmed += 1;
                false
            }
        };
        let got = deliveries.get_mut(id);
        match (confirmed, got.as_ref().is_some_and(|g| !g.is_empty())) {
            (true, true) => report.confirmed_delivered += 1,
            (true, false) => {
                report.confirmed_lost += 1;
                if report.lost_sample.len() < SAMPLE {
                    report
                        .lost_sample
                        .push(format!("{id} in {}", publish.queue));
                    let url = history
                        .sessions
                        .get(publish.session)
                        .map_or("?", |s| s.url.as_str());
                    let confirmed_ms = match publish.outcome {
                        Outcome::Confirmed(at) => ms(at),
                        _ => 0,
                    };
                    report.lost_detail.push(format!(
                        "{id}: published at {} ms on {url} (session {}), confirmed at {confirmed_ms} ms",
                        ms(publish.at),
                        publish.session
                    ));
                }
            }
            (false, true) => report.unconfirmed_delivered += 1,
            (false, false) => report.unconfirmed_lost += 1,
        }
        let Some(got) = got else { continue };
        if got.len() < 2 {
            continue;
        }
        got.sort_by_key(|d| d.at);
        report.duplicated += 1;
        for (i, d) in got.iter().enumerate().skip(1) {
            report.extra_deliveries += 1;
            let explained = d.redelivered || got[..i].iter().any(|e| abandoned(e));
            if !explained {
                report.unexplained_duplicates += 1;
                if report.anomaly_sample.len() < SAMPLE {
                    let all: Vec<String> =
                        got.iter().map(|e| describe_delivery(history, e)).collect();
                    report.anomaly_sample.push(format!(
                        "{id} delivered again at {} ms with redelivered=false; deliveries: {}",
                        ms(d.at),
                        all.join("; ")
                    ));
                }
            }
        }
    }

    report.remaining = history
        .remaining
        .as_ref()
        .map(|r| r.values().map(|&n| u64::from(n)).sum());
    report.drained = report.remaining == Some(0);

    for s in &history.sessions {
        // The observer's own connection attempts say nothing about what clients went through.
        if let SessionEnd::Failed(_) = s.end
            && s.role != Role::Observer
        {
            *report.failed_sessions.entry(s.url.clone()).or_default() += 1;
        }
    }

    report.faults = fault_timings(history);
    report
}

/// One delivery with the session it came on, for a report's anomaly sample.
fn describe_delivery(history: &History, d: &DeliveryRecord) -> String {
    let session = history.sessions.get(d.session).map_or_else(
        || "unknown session".to_string(),
        |s| format!("{:?} {} via {} ended {:?}", s.role, s.client, s.url, s.end),
    );
    format!(
        "at {} ms redelivered={} acked={} on session {} ({session})",
        ms(d.at),
        d.redelivered,
        d.acked,
        d.session
    )
}

/// Publishing before and after every injected fault, from the confirm timestamps.
fn fault_timings(history: &History) -> Vec<FaultTiming> {
    let mut per_producer: BTreeMap<u32, Vec<Duration>> = BTreeMap::new();
    for (id, p) in &history.publishes {
        per_producer.entry(id.producer).or_default();
        if let Outcome::Confirmed(at) = p.outcome {
            per_producer.entry(id.producer).or_default().push(at);
        }
    }
    for confirms in per_producer.values_mut() {
        confirms.sort();
    }
    let injections: Vec<&FaultRecord> = history.faults.iter().filter(|f| f.injection).collect();
    injections
        .iter()
        .enumerate()
        .map(|(k, fault)| {
            let t = fault.at;
            // The window this fault is judged over: until the next fault is injected.
            let window_end = injections.get(k + 1).map(|f| f.at);
            let mut first: Option<Duration> = None;
            let mut gap = Some(Duration::ZERO);
            let mut resumed = Some(Duration::ZERO);
            for confirms in per_producer.values() {
                let after = confirms.partition_point(|&c| c < t);
                let Some(&next) = confirms.get(after) else {
                    // This producer never had a confirm after the fault.
                    gap = None;
                    resumed = None;
                    continue;
                };
                first = Some(first.map_or(next - t, |f| f.min(next - t)));
                // The producer's longest pause overlapping the window, and when it ended.
                let mut longest = if after == 0 {
                    (next - t, next)
                } else {
                    (Duration::ZERO, next)
                };
                for pair in confirms[after.saturating_sub(1)..].windows(2) {
                    let (from, to) = (pair[0], pair[1]);
                    if window_end.is_some_and(|end| from >= end) {
                        break;
                    }
                    if to - from > longest.0 {
                        longest = (to - from, to);
                    }
                }
                gap = gap.map(|g| g.max(longest.0));
                resumed = resumed.map(|r| r.max(longest.1.saturating_sub(t)));
            }
            FaultTiming {
                fault: fault.label.clone(),
                at_ms: ms(t),
                first_confirm_ms: first.map(ms),
                max_gap_ms: gap.map(ms),
                resumed_ms: resumed.map(ms),
            }
        })
        .collect()
}

/// Shape of the workload.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// AMQP URLs every client fails over across; client `i` starts at URL `i mod len`.
    pub urls: Vec<String>,
    /// Durable quorum queues the producers spread their messages over.
    pub queues: Vec<String>,
    /// Number of producers.
    pub producers: usize,
    /// Number of consumers (each consumes from every queue).
    pub consumers: usize,
    /// Publishes per second per producer.
    pub rate: u32,
    /// Unconfirmed publishes in flight per producer.
    pub window: usize,
    /// Consumer prefetch per queue.
    pub prefetch: u16,
    /// A confirm that takes longer makes the producer give its connection up.
    pub confirm_timeout: Duration,
    /// Bound on connecting and on every other single broker operation.
    pub op_timeout: Duration,
    /// First and longest pause between reconnection attempts.
    pub backoff: (Duration, Duration),
    /// Silence (no delivery) after which a queue that also counts 0 is considered drained.
    pub drain_silence: Duration,
    /// Bound on the whole drain.
    pub drain_limit: Duration,
}

impl WorkloadConfig {
    /// Two producers and two consumers on one queue, failing over across `urls`.
    pub fn new(urls: Vec<String>, queue: &str) -> WorkloadConfig {
        WorkloadConfig {
            urls,
            queues: vec![queue.to_string()],
            producers: 2,
            consumers: 2,
            rate: 100,
            window: 32,
            prefetch: 50,
            confirm_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(10),
            backoff: (Duration::from_millis(100), Duration::from_secs(1)),
            drain_silence: Duration::from_secs(3),
            drain_limit: Duration::from_secs(90),
        }
    }
}

/// State shared by every client task of a run.
struct Shared {
    config: WorkloadConfig,
    start: Instant,
    history: Mutex<History>,
    stop_producers: watch::Sender<bool>,
    stop_consumers: watch::Sender<bool>,
    last_delivery: Mutex<Instant>,
    confirmed: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        // A panic in one client task must not hide the history from the report.
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn open_session(&self, role: Role, client: usize, url: &str) -> usize {
        let started = self.now();
        let mut h = self.history();
        h.sessions.push(SessionRecord {
            role,
            client,
            url: url.to_string(),
            started,
            end: SessionEnd::Open,
        });
        h.sessions.len() - 1
    }

    fn end_session(&self, session: usize, end: SessionEnd) {
        let mut h = self.history();
        if let Some(s) = h.sessions.get_mut(session) {
            // The first ending wins: a connection that failed stays failed.
            if s.end == SessionEnd::Open {
                s.end = end;
            }
        }
    }

    fn settle(&self, id: MsgId, outcome: Outcome) {
        let mut h = self.history();
        if let Some(p) = h.publishes.get_mut(&id)
            && p.outcome == Outcome::Pending
        {
            p.outcome = outcome;
            if let Outcome::Confirmed(_) = outcome {
                self.confirmed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    fn touch(&self) {
        *self
            .last_delivery
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }

    fn silent_for(&self) -> Duration {
        self.last_delivery
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed()
    }
}

/// A running workload: producers and consumers with failover, recording a [`History`].
pub struct Workload {
    shared: Arc<Shared>,
    producers: Vec<JoinHandle<()>>,
    consumers: Vec<JoinHandle<()>>,
}

impl Workload {
    /// Declare the queues and start every producer and consumer.
    pub async fn start(config: WorkloadConfig) -> anyhow::Result<Workload> {
        if config.urls.is_empty() || config.queues.is_empty() {
            bail!("a workload needs at least one URL and one queue");
        }
        let (stop_producers, _) = watch::channel(false);
        let (stop_consumers, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            start: Instant::now(),
            history: Mutex::new(History::default()),
            stop_producers,
            stop_consumers,
            last_delivery: Mutex::new(Instant::now()),
            confirmed: std::sync::atomic::AtomicU64::new(0),
        });
        // Declared once up front so that the first publishes are routed to existing queues.
        with_observer(&shared, |channel| {
            let queues = shared.config.queues.clone();
            async move {
                for q in &queues {
                    declare(&channel, q, false).await?;
                }
                Ok(())
            }
        })
        .await
        .context("declaring the workload's queues")?;
        let producers = (0..shared.config.producers)
            .map(|i| tokio::spawn(run_producer(shared.clone(), i)))
            .collect();
        let consumers = (0..shared.config.consumers)
            .map(|i| tokio::spawn(run_consumer(shared.clone(), i)))
            .collect();
        Ok(Workload {
            shared,
            producers,
            consumers,
        })
    }

    /// Time since the workload started.
    pub fn elapsed(&self) -> Duration {
        self.shared.now()
    }

    /// Publishes confirmed so far.
    pub fn confirmed(&self) -> u64 {
        self.shared
            .confirmed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wait until `more` publishes beyond those confirmed now are confirmed, or `limit`
    /// passes; true if they were. Used to let load build up before and after faults.
    pub async fn wait_for_confirms(&self, more: u64, limit: Duration) -> bool {
        let target = self.confirmed() + more;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.confirmed() >= target {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.confirmed() >= target
    }

    /// Record that a fault is being injected now (call just before injecting it).
    pub fn fault(&self, label: &str) {
        eprintln!("checker: fault at {:?}: {label}", self.elapsed());
        let at = self.shared.now();
        self.shared.history().faults.push(FaultRecord {
            label: label.to_string(),
            at,
            injection: true,
        });
    }

    /// Record that a fault was healed now.
    pub fn heal(&self, label: &str) {
        eprintln!("checker: healed at {:?}: {label}", self.elapsed());
        let at = self.shared.now();
        self.shared.history().faults.push(FaultRecord {
            label: label.to_string(),
            at,
            injection: false,
        });
    }

    /// Stop the producers, drain every queue, stop the consumers, and return the history.
    pub async fn finish(self) -> History {
        let config = self.shared.config.clone();
        let _ = self.shared.stop_producers.send(true);
        // A producer waits at most one confirm timeout for its last confirms.
        let bound = config.confirm_timeout + config.op_timeout * 2;
        for p in self.producers {
            let _ = timeout(bound, p).await;
        }
        eprintln!(
            "checker: producers stopped at {:?}; draining",
            self.shared.now()
        );
        self.shared.touch();
        let deadline = Instant::now() + config.drain_limit;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if self.shared.silent_for() < config.drain_silence {
                continue;
            }
            match count_queues(&self.shared).await {
                Ok(counts) if counts.values().all(|&n| n == 0) => break,
                Ok(counts) => eprintln!("checker: still in queues: {counts:?}"),
                Err(e) => eprintln!("checker: counting queues failed: {e:#}"),
            }
        }
        let _ = self.shared.stop_consumers.send(true);
        for c in self.consumers {
            let _ = timeout(bound, c).await;
        }
        // Whatever a consumer left unacked came back when it closed: fetch it with basic.get
        // (recorded as deliveries), then count.
        if let Err(e) = drain_with_get(&self.shared).await {
            eprintln!("checker: final basic.get drain failed: {e:#}");
        }
        let remaining = count_queues(&self.shared).await.ok();
        eprintln!(
            "checker: finished at {:?}; remaining {remaining:?}",
            self.shared.now()
        );
        let mut h = self.shared.history().clone();
        h.remaining = remaining;
        for p in h.publishes.values_mut() {
            if p.outcome == Outcome::Pending {
                p.outcome = Outcome::Unconfirmed;
            }
        }
        h
    }
}

/// Arguments of the workload's queues: durable quorum queues.
fn queue_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

async fn declare(channel: &Channel, queue: &str, passive: bool) -> lapin::Result<u32> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                passive,
                ..Default::default()
            },
            if passive {
                FieldTable::default()
            } else {
                queue_arguments()
            },
        )
        .await?;
    Ok(q.message_count())
}

fn properties() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn connect(shared: &Shared, url: &str) -> anyhow::Result<Connection> {
    timeout(
        shared.config.op_timeout,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .context("connect timed out")?
    .context("connect")
}

/// Bound one broker operation by the workload's operation timeout.
async fn op<T>(
    shared: &Shared,
    what: &str,
    f: impl std::future::Future<Output = lapin::Result<T>>,
) -> anyhow::Result<T> {
    timeout(shared.config.op_timeout, f)
        .await
        .with_context(|| format!("{what} timed out"))?
        .with_context(|| what.to_string())
}

/// Run `work` on a fresh channel, trying every URL in turn until one succeeds.
async fn with_observer<F, Fut, T>(shared: &Shared, work: F) -> anyhow::Result<T>
where
    F: Fn(Channel) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut last = None;
    for url in &shared.config.urls {
        let session = shared.open_session(Role::Observer, 0, url);
        let attempt = async {
            let conn = connect(shared, url).await?;
            let channel = op(shared, "channel.open", conn.create_channel()).await?;
            let out = timeout(shared.config.op_timeout * 3, work(channel))
                .await
                .context("observer timed out")??;
            let _ = timeout(shared.config.op_timeout, conn.close(200, "done".into())).await;
            anyhow::Ok(out)
        };
        match attempt.await {
            Ok(out) => {
                shared.end_session(session, SessionEnd::Clean);
                return Ok(out);
            }
            Err(e) => {
                shared.end_session(session, SessionEnd::Failed(format!("{e:#}")));
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no URL")))
}

/// Ready messages in each queue (queue.declare passive).
async fn count_queues(shared: &Shared) -> anyhow::Result<BTreeMap<String, u32>> {
    with_observer(shared, |channel| {
        let queues = shared.config.queues.clone();
        async move {
            let mut counts = BTreeMap::new();
            for q in queues {
                let n = declare(&channel, &q, true).await?;
                counts.insert(q, n);
            }
            Ok(counts)
        }
    })
    .await
}

/// Fetch and ack whatever is left in the queues with basic.get, recording each delivery.
async fn drain_with_get(shared: &Arc<Shared>) -> anyhow::Result<()> {
    for url in &shared.config.urls {
        let session = shared.open_session(Role::Observer, 1, url);
        let attempt = async {
            let conn = connect(shared, url).await?;
            let channel = op(shared, "channel.open", conn.create_channel()).await?;
            for q in &shared.config.queues {
                while let Some(msg) = op(
                    shared,
                    "basic.get",
                    channel.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false }),
                )
                .await?
                {
                    let delivery = msg.delivery;
                    let index =
                        record_delivery(shared, session, q, &delivery.data, delivery.redelivered);
                    let acked = op(
                        shared,
                        "basic.ack",
                        delivery.ack(BasicAckOptions::default()),
                    )
                    .await
                    .is_ok();
                    shared.history().deliveries[index].acked = acked;
                }
            }
            let _ = timeout(shared.config.op_timeout, conn.close(200, "done".into())).await;
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) => {
                shared.end_session(session, SessionEnd::Clean);
                return Ok(());
            }
            Err(e) => shared.end_session(session, SessionEnd::Failed(format!("{e:#}"))),
        }
    }
    bail!("no URL could be drained")
}

/// Note a delivery, not acked yet; returns its index in the history.
fn record_delivery(
    shared: &Shared,
    session: usize,
    queue: &str,
    body: &[u8],
    redelivered: bool,
) -> usize {
    let id = MsgId::parse(body);
    let at = shared.now();
    shared.touch();
    let mut history = shared.history();
    history.deliveries.push(DeliveryRecord {
        id,
        raw: id
            .is_none()
            .then(|| String::from_utf8_lossy(body).into_owned()),
        queue: queue.to_string(),
        session,
        redelivered,
        at,
        acked: false,
    });
    history.deliveries.len() - 1
}

/// Reconnect with exponential backoff, starting at URL `client mod len`.
struct Failover {
    next: usize,
    pause: Duration,
}

impl Failover {
    fn new(client: usize) -> Failover {
        Failover {
            next: client,
            pause: Duration::ZERO,
        }
    }

    /// The URL to use next, after the backoff pause the previous failure earned.
    async fn next_url<'a>(&mut self, config: &'a WorkloadConfig) -> &'a str {
        if !self.pause.is_zero() {
            tokio::time::sleep(self.pause).await;
        }
        let url = &config.urls[self.next % config.urls.len()];
        self.next += 1;
        url
    }

    fn failed(&mut self, config: &WorkloadConfig) {
        self.pause = if self.pause.is_zero() {
            config.backoff.0
        } else {
            (self.pause * 2).min(config.backoff.1)
        };
    }

    fn succeeded(&mut self) {
        self.pause = Duration::ZERO;
    }
}

async fn run_producer(shared: Arc<Shared>, client: usize) {
    let mut failover = Failover::new(client);
    let mut seq = 0u64;
    let stop = shared.stop_producers.subscribe();
    while !*stop.borrow() {
        let url = failover.next_url(&shared.config).await;
        let session = shared.open_session(Role::Producer, client, url);
        match producer_session(&shared, client, session, url, &mut seq, &mut failover).await {
            Ok(()) => {
                shared.end_session(session, SessionEnd::Clean);
                break;
            }
            Err(e) => {
                eprintln!("checker: producer {client} on {url} failed: {e:#}");
                shared.end_session(session, SessionEnd::Failed(format!("{e:#}")));
                failover.failed(&shared.config);
            }
        }
    }
}

/// One connection of a producer: publish at the configured rate until told to stop (Ok) or
/// until the connection fails or a confirm times out (Err).
async fn producer_session(
    shared: &Arc<Shared>,
    client: usize,
    session: usize,
    url: &str,
    seq: &mut u64,
    failover: &mut Failover,
) -> anyhow::Result<()> {
    let config = &shared.config;
    let conn = connect(shared, url).await?;
    let channel = op(shared, "channel.open", conn.create_channel()).await?;
    op(
        shared,
        "confirm.select",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    for q in &config.queues {
        op(shared, "queue.declare", declare(&channel, q, false)).await?;
    }
    let window = Arc::new(Semaphore::new(config.window));
    // Set by a confirm waiter when the connection is to be given up.
    let (broken_tx, mut broken) = watch::channel(None::<String>);
    let broken_tx = Arc::new(broken_tx);
    let mut stop = shared.stop_producers.subscribe();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / config.rate.max(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let producer = u32::try_from(client).unwrap_or(u32::MAX);
    let failure = loop {
        if let Some(e) = broken.borrow().clone() {
            break Some(e);
        }
        if *stop.borrow() {
            break None;
        }
        let permit = tokio::select! {
            permit = window.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break Some("confirm window closed".into()),
            },
            _ = broken.changed() => continue,
            _ = stop.changed() => continue,
        };
        ticker.tick().await;
        let id = MsgId {
            producer,
            seq: *seq,
        };
        *seq += 1;
        let queue = &config.queues[usize::try_from(id.seq).unwrap_or(0) % config.queues.len()];
        let at = shared.now();
        shared.history().publishes.insert(
            id,
            PublishRecord {
                queue: queue.clone(),
                session,
                at,
                outcome: Outcome::Pending,
            },
        );
        let publish = op(
            shared,
            "basic.publish",
            channel.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                id.body().as_bytes(),
                properties(),
            ),
        )
        .await;
        let confirm = match publish {
            Ok(confirm) => confirm,
            Err(e) => break Some(format!("{e:#}")),
        };
        let waiter_shared = shared.clone();
        let waiter_broken = broken_tx.clone();
        let confirm_timeout = config.confirm_timeout;
        tokio::spawn(async move {
            let result = timeout(confirm_timeout, confirm).await;
            let at = waiter_shared.now();
            match result {
                Ok(Ok(c)) if c.is_ack() => {
                    waiter_shared.settle(id, Outcome::Confirmed(at));
                }
                Ok(Ok(c)) if c.is_nack() => waiter_shared.settle(id, Outcome::Nacked(at)),
                Ok(Ok(_)) => waiter_shared.settle(id, Outcome::Unconfirmed),
                Ok(Err(e)) => {
                    waiter_shared.settle(id, Outcome::Unconfirmed);
                    let _ = waiter_broken.send(Some(format!("confirm of {id}: {e}")));
                }
                Err(_) => {
                    waiter_shared.settle(id, Outcome::Unconfirmed);
                    let _ = waiter_broken.send(Some(format!(
                        "no confirm of {id} within {confirm_timeout:?}"
                    )));
                }
            }
            drop(permit);
        });
        if id.seq.is_multiple_of(64) {
            failover.succeeded();
        }
    };
    match failure {
        Some(e) => {
            // Dropping the connection abandons it; its pending confirms resolve as errors.
            drop(channel);
            drop(conn);
            Err(anyhow::anyhow!(e))
        }
        None => {
            // Stopping: wait for the confirms in flight, then close cleanly.
            let permits = u32::try_from(config.window).unwrap_or(u32::MAX);
            let settled = timeout(
                config.confirm_timeout + Duration::from_secs(1),
                window.acquire_many(permits),
            )
            .await;
            if let Some(e) = broken.borrow().clone() {
                bail!(e);
            }
            if settled.is_err() {
                bail!("confirms still in flight at stop");
            }
            op(shared, "connection.close", conn.close(200, "done".into())).await?;
            Ok(())
        }
    }
}

async fn run_consumer(shared: Arc<Shared>, client: usize) {
    let mut failover = Failover::new(client);
    let stop = shared.stop_consumers.subscribe();
    while !*stop.borrow() {
        let url = failover.next_url(&shared.config).await;
        let session = shared.open_session(Role::Consumer, client, url);
        match consumer_session(&shared, session, url, &mut failover).await {
            Ok(()) => {
                shared.end_session(session, SessionEnd::Clean);
                break;
            }
            Err(e) => {
                eprintln!("checker: consumer {client} on {url} failed: {e:#}");
                shared.end_session(session, SessionEnd::Failed(format!("{e:#}")));
                failover.failed(&shared.config);
            }
        }
    }
}

/// One connection of a consumer: one channel and consumer per queue, acking each delivery,
/// until told to stop (Ok) or until anything fails (Err).
async fn consumer_session(
    shared: &Arc<Shared>,
    session: usize,
    url: &str,
    failover: &mut Failover,
) -> anyhow::Result<()> {
    let config = &shared.config;
    let conn = connect(shared, url).await?;
    let mut streams = Vec::new();
    for q in &config.queues {
        let channel = op(shared, "channel.open", conn.create_channel()).await?;
        op(
            shared,
            "basic.qos",
            channel.basic_qos(config.prefetch, BasicQosOptions::default()),
        )
        .await?;
        op(shared, "queue.declare", declare(&channel, q, false)).await?;
        let consumer = op(
            shared,
            "basic.consume",
            channel.basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        streams.push((q.clone(), channel, consumer));
    }
    failover.succeeded();
    let (events_tx, mut events) = tokio::sync::mpsc::channel::<anyhow::Result<()>>(4);
    let mut tasks = Vec::new();
    for (queue, channel, mut consumer) in streams {
        let shared = shared.clone();
        let events_tx = events_tx.clone();
        tasks.push(tokio::spawn(async move {
            let _channel = channel;
            let failure = loop {
                match consumer.next().await {
                    None => break anyhow::anyhow!("consumer on {queue} ended"),
                    Some(Err(e)) => break anyhow::Error::from(e).context("delivery"),
                    Some(Ok(delivery)) => {
                        // Recorded before the ack is sent: when another consumer of this
                        // session fails, this task is aborted, possibly with its ack already
                        // written (the broker then settled the message), and the delivery
                        // must still count as received.
                        let index = record_delivery(
                            &shared,
                            session,
                            &queue,
                            &delivery.data,
                            delivery.redelivered,
                        );
                        let acked = timeout(
                            shared.config.op_timeout,
                            delivery.ack(BasicAckOptions::default()),
                        )
                        .await;
                        let ok = matches!(acked, Ok(Ok(_)));
                        if ok {
                            shared.history().deliveries[index].acked = true;
                        }
                        if !ok {
                            break anyhow::anyhow!("basic.ack failed: {acked:?}");
                        }
                    }
                }
            };
            let _ = events_tx.send(Err(failure)).await;
        }));
    }
    drop(events_tx);
    let mut stop = shared.stop_consumers.subscribe();
    let outcome = tokio::select! {
        failure = events.recv() => match failure {
            Some(Err(e)) => Err(e),
            _ => Err(anyhow::anyhow!("consumer tasks ended")),
        },
        _ = stop.wait_for(|&s| s) => Ok(()),
    };
    for t in &tasks {
        t.abort();
    }
    match outcome {
        Ok(()) => {
            op(shared, "connection.close", conn.close(200, "done".into())).await?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn id(producer: u32, seq: u64) -> MsgId {
        MsgId { producer, seq }
    }

    /// A builder for hand-made histories.
    struct H(History);

    impl H {
        fn new() -> H {
            let mut h = History::default();
            for (end, url) in [
                (SessionEnd::Clean, "ok"),
                (SessionEnd::Failed("lost".into()), "dead"),
            ] {
                h.sessions.push(SessionRecord {
                    role: Role::Consumer,
                    client: 0,
                    url: url.into(),
                    started: Duration::ZERO,
                    end,
                });
            }
            h.remaining = Some(BTreeMap::from([("q".to_string(), 0)]));
            H(h)
        }
        const CLEAN: usize = 0;
        const FAILED: usize = 1;

        fn publish(mut self, id: MsgId, outcome: Outcome) -> H {
            self.0.publishes.insert(
                id,
                PublishRecord {
                    queue: "q".into(),
                    session: 0,
                    at: Duration::ZERO,
                    outcome,
                },
            );
            self
        }

        fn deliver(mut self, id: MsgId, at: u64, session: usize, redelivered: bool) -> H {
            self.0.deliveries.push(DeliveryRecord {
                id: Some(id),
                raw: None,
                queue: "q".into(),
                session,
                redelivered,
                at: d(at),
                acked: true,
            });
            self
        }

        fn fault(mut self, at: u64) -> H {
            self.0.faults.push(FaultRecord {
                label: "f".into(),
                at: d(at),
                injection: true,
            });
            self
        }

        fn report(&self) -> Report {
            classify("hand-made", &self.0)
        }
    }

    #[test]
    fn bodies_round_trip_and_foreign_bodies_do_not_parse() {
        let i = id(3, 12345);
        assert_eq!(MsgId::parse(i.body().as_bytes()), Some(i));
        assert_eq!(MsgId::parse(b"hello"), None);
        assert_eq!(MsgId::parse(b"checker 1"), None);
        assert_eq!(MsgId::parse(b"checker x:1"), None);
        assert_eq!(MsgId::parse(&[0xff, 0xfe]), None);
    }

    #[test]
    fn a_clean_history_passes_and_every_class_is_counted() {
        let r = H::new()
            .publish(id(0, 0), Outcome::Confirmed(d(10)))
            .publish(id(0, 1), Outcome::Confirmed(d(11)))
            .publish(id(0, 2), Outcome::Unconfirmed)
            .publish(id(0, 3), Outcome::Unconfirmed)
            .publish(id(1, 0), Outcome::Nacked(d(12)))
            .deliver(id(0, 0), 20, H::CLEAN, false)
            .deliver(id(0, 1), 21, H::CLEAN, false)
            .deliver(id(0, 2), 22, H::CLEAN, false)
            .report();
        assert!(r.passed(), "{:?}", r.violations());
        assert_eq!(
            (r.published, r.confirmed, r.nacked, r.unconfirmed),
            (5, 2, 1, 2)
        );
        assert_eq!(r.confirmed_delivered, 2);
        assert_eq!(r.confirmed_lost, 0);
        assert_eq!(r.unconfirmed_delivered, 1);
        assert_eq!(r.unconfirmed_lost, 2);
        assert_eq!(r.duplicated, 0);
        assert!(r.drained);
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["confirmed_lost"], 0);
        assert!(!r.to_json().contains('\n'));
    }

    #[test]
    fn a_confirmed_message_never_delivered_fails_the_run() {
        let r = H::new()
            .publish(id(0, 0), Outcome::Confirmed(d(10)))
            .publish(id(0, 1), Outcome::Confirmed(d(11)))
            .deliver(id(0, 0), 20, H::CLEAN, false)
            .report();
        assert!(!r.passed());
        assert_eq!(r.confirmed_lost, 1);
        assert_eq!(r.lost_sample, vec!["0:1 in q".to_string()]);
        assert!(r.violations()[0].contains("confirmed messages lost"));
    }

    #[test]
    fn a_pending_publish_counts_as_unconfirmed_and_may_be_lost() {
        let r = H::new().publish(id(0, 0), Outcome::Pending).report();
        assert!(r.passed());
        assert_eq!((r.unconfirmed, r.unconfirmed_lost), (1, 1));
    }

    #[test]
    fn duplicates_are_allowed_when_redelivered_or_after_an_abandoned_delivery() {
        let r = H::new()
            .publish(id(0, 0), Outcome::Confirmed(d(1)))
            .publish(id(0, 1), Outcome::Confirmed(d(1)))
            // Redelivered flag set: the broker knew.
            .deliver(id(0, 0), 10, H::CLEAN, false)
            .deliver(id(0, 0), 20, H::CLEAN, true)
            // First delivery on a connection that failed: abandoned.
            .deliver(id(0, 1), 10, H::FAILED, false)
            .deliver(id(0, 1), 20, H::CLEAN, false)
            .report();
        assert!(r.passed(), "{:?}", r.violations());
        assert_eq!((r.duplicated, r.extra_deliveries), (2, 2));
        assert_eq!(r.unexplained_duplicates, 0);
    }

    #[test]
    fn a_delivery_whose_ack_failed_is_abandoned() {
        let mut h = H::new()
            .publish(id(0, 0), Outcome::Confirmed(d(1)))
            .deliver(id(0, 0), 10, H::CLEAN, false)
            .deliver(id(0, 0), 20, H::CLEAN, false);
        h.0.deliveries[0].acked = false;
        assert!(h.report().passed());
    }

    #[test]
    fn an_unexplained_duplicate_fails_the_run() {
        let r = H::new()
            .publish(id(0, 0), Outcome::Confirmed(d(1)))
            // Delivered twice on healthy connections, both acked, second not redelivered:
            // the broker enqueued it twice or forgot an ack it had.
            .deliver(id(0, 0), 20, H::CLEAN, false)
            .deliver(id(0, 0), 10, H::CLEAN, false)
            .report();
        assert!(!r.passed());
        assert_eq!(r.unexplained_duplicates, 1);
        // Order is by delivery time, not by record order.
        assert!(
            r.anomaly_sample[0].contains("at 20 ms"),
            "{:?}",
            r.anomaly_sample
        );
    }

    #[test]
    fn a_delivery_never_published_fails_the_run() {
        let mut h = H::new().deliver(id(9, 9), 10, H::CLEAN, false);
        h.0.deliveries.push(DeliveryRecord {
            id: None,
            raw: Some("garbage".into()),
            queue: "q".into(),
            session: 0,
            redelivered: false,
            at: d(11),
            acked: true,
        });
        let r = h.report();
        assert!(!r.passed());
        assert_eq!(r.unexpected, 2);
    }

    #[test]
    fn queues_that_are_not_empty_or_not_counted_fail_the_run() {
        let mut h = H::new();
        h.0.remaining = Some(BTreeMap::from([("q".to_string(), 3)]));
        let r = h.report();
        assert!(!r.passed());
        assert_eq!(r.remaining, Some(3));
        h.0.remaining = None;
        assert!(!h.report().drained);
    }

    #[test]
    fn resume_times_come_from_the_confirms_around_the_fault() {
        // Producer 0 confirms every 10 ms and pauses from 100 to 1100 ms; producer 1 stops
        // at 90 ms and resumes at 2500 ms. The fault is at 105 ms.
        let mut h = H::new().fault(105);
        for t in (0..=100).step_by(10).chain((1100..=1200).step_by(10)) {
            h = h.publish(id(0, t), Outcome::Confirmed(d(t)));
        }
        h = h
            .publish(id(1, 0), Outcome::Confirmed(d(90)))
            .publish(id(1, 1), Outcome::Confirmed(d(2500)));
        for t in (0..=100).step_by(10).chain((1100..=1200).step_by(10)) {
            h = h.deliver(id(0, t), t + 1, H::CLEAN, false);
        }
        h = h
            .deliver(id(1, 0), 91, H::CLEAN, false)
            .deliver(id(1, 1), 2501, H::CLEAN, false);
        let r = h.report();
        assert!(r.passed(), "{:?}", r.violations());
        assert_eq!(
            r.faults,
            vec![FaultTiming {
                fault: "f".into(),
                at_ms: 105,
                first_confirm_ms: Some(995),
                max_gap_ms: Some(2410),
                resumed_ms: Some(2395),
            }]
        );
    }

    #[test]
    fn a_pause_that_starts_after_the_fault_counts_until_the_next_fault() {
        // One producer confirms every 10 ms, except for a pause from 300 to 2300 ms that
        // starts well after the first fault (105 ms); a second fault comes at 2000 ms.
        let mut h = H::new().fault(105).fault(2000);
        let times: Vec<u64> = (0..=300)
            .step_by(10)
            .chain((2300..=2400).step_by(10))
            .collect();
        for &t in &times {
            h = h.publish(id(0, t), Outcome::Confirmed(d(t))).deliver(
                id(0, t),
                t + 1,
                H::CLEAN,
                false,
            );
        }
        let r = h.report();
        assert!(r.passed(), "{:?}", r.violations());
        let timing = |f: &FaultTiming| (f.first_confirm_ms, f.max_gap_ms, f.resumed_ms);
        assert_eq!(timing(&r.faults[0]), (Some(5), Some(2000), Some(2195)));
        assert_eq!(timing(&r.faults[1]), (Some(300), Some(2000), Some(300)));
    }

    #[test]
    fn a_producer_that_never_resumes_has_no_resume_time() {
        let r = H::new()
            .fault(50)
            .publish(id(0, 0), Outcome::Confirmed(d(10)))
            .publish(id(1, 0), Outcome::Confirmed(d(10)))
            .publish(id(1, 1), Outcome::Confirmed(d(60)))
            .deliver(id(0, 0), 11, H::CLEAN, false)
            .deliver(id(1, 0), 11, H::CLEAN, false)
            .deliver(id(1, 1), 61, H::CLEAN, false)
            .report();
        let f = &r.faults[0];
        assert_eq!(f.first_confirm_ms, Some(10));
        assert_eq!(f.resumed_ms, None);
        assert_eq!(f.max_gap_ms, None);
    }

    #[test]
    fn failed_sessions_are_counted_by_url() {
        let mut h = H::new();
        h.0.sessions.push(SessionRecord {
            role: Role::Observer,
            client: 0,
            url: "ok".into(),
            started: Duration::ZERO,
            end: SessionEnd::Failed("refused".into()),
        });
        let r = h.report();
        assert_eq!(r.failures_at("dead"), 1);
        // The observer's failures are not the clients'.
        assert_eq!(r.failures_at("ok"), 0);
    }
}
