//! Counters shared while a run is under way, and the report made from them at the end.

use super::payload::RunClock;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latencies are recorded in microseconds; anything above an hour is clamped.
const MAX_LATENCY_MICROS: u64 = 3_600_000_000;

/// A latency histogram in microseconds with three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 3)
        .expect("constant histogram bounds are valid")
}

/// Record `latency` into `hist`, clamped into its range.
pub fn record(hist: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros())
        .unwrap_or(MAX_LATENCY_MICROS)
        .clamp(1, MAX_LATENCY_MICROS);
    hist.saturating_record(micros);
}

/// Totals updated by every producer and consumer task.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages handed to the socket.
    pub published: AtomicU64,
    /// Publishes the broker confirmed with basic.ack.
    pub confirmed: AtomicU64,
    /// Publishes the broker refused with basic.nack.
    pub nacked: AtomicU64,
    /// Deliveries received by consumers.
    pub consumed: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    /// Messages handed to the socket.
    pub published: u64,
    /// Publishes confirmed.
    pub confirmed: u64,
    /// Publishes nacked.
    pub nacked: u64,
    /// Deliveries received.
    pub consumed: u64,
}

impl Counters {
    /// Read every counter.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            published: self.published.load(Ordering::Relaxed),
            confirmed: self.confirmed.load(Ordering::Relaxed),
            nacked: self.nacked.load(Ordering::Relaxed),
            consumed: self.consumed.load(Ordering::Relaxed),
        }
    }
}

impl Snapshot {
    /// Counts that happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            published: self.published.saturating_sub(earlier.published),
            confirmed: self.confirmed.saturating_sub(earlier.confirmed),
            nacked: self.nacked.saturating_sub(earlier.nacked),
            consumed: self.consumed.saturating_sub(earlier.consumed),
        }
    }
}

/// Rates in messages per second.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Rates {
    /// Published messages per second.
    pub published: f64,
    /// Confirmed messages per second.
    pub confirmed: f64,
    /// Consumed messages per second.
    pub consumed: f64,
}

impl Rates {
    /// Rates of the counts in `delta` over `elapsed`.
    pub fn of(delta: &Snapshot, elapsed: Duration) -> Rates {
        let secs = elapsed.as_secs_f64().max(1e-9);
        Rates {
            published: delta.published as f64 / secs,
            confirmed: delta.confirmed as f64 / secs,
            consumed: delta.consumed as f64 / secs,
        }
    }
}

/// One line of the per-second progress.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    /// Seconds since the producers started.
    pub t: f64,
    /// Rates during this interval.
    pub rates: Rates,
}

/// A stall: confirms slower than the run's threshold, published while the previous one of the
/// same producer was still waiting (so one broker hiccup is one entry, not a hundred).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SlowConfirm {
    /// When the first slow message was published, in milliseconds since the Unix epoch (to
    /// line up with broker logs).
    pub sent_unix_ms: u64,
    /// When the last slow confirm of the stall arrived, same clock.
    pub until_unix_ms: u64,
    /// The slowest publish-to-confirm latency in the stall, in milliseconds.
    pub worst_ms: f64,
    /// How many slow confirms the stall held.
    pub confirms: u64,
    /// Which producer saw it.
    pub producer: u32,
}

impl SlowConfirm {
    /// Fold a confirm that just arrived `latency` after its publish into `stalls`: it extends
    /// the last stall if it was published before that stall's last confirm arrived.
    pub fn record(
        stalls: &mut Vec<SlowConfirm>,
        max: usize,
        clock: &RunClock,
        producer: u32,
        latency: Duration,
    ) {
        let now_ms = clock.now_nanos() / 1_000_000;
        let sent_ms = now_ms.saturating_sub(latency.as_millis() as u64);
        let latency_ms = latency.as_secs_f64() * 1e3;
        if let Some(last) = stalls.last_mut()
            && sent_ms <= last.until_unix_ms
        {
            last.until_unix_ms = now_ms;
            last.worst_ms = last.worst_ms.max(latency_ms);
            last.confirms += 1;
            return;
        }
        if stalls.len() < max {
            stalls.push(SlowConfirm {
                sent_unix_ms: sent_ms,
                until_unix_ms: now_ms,
                worst_ms: latency_ms,
                confirms: 1,
                producer,
            });
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    /// How many latencies were recorded.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 95th percentile.
    pub p95: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest recorded.
    pub max: u64,
}

impl Latency {
    /// Percentiles of `hist`; all zero when it is empty.
    pub fn of(hist: &Histogram<u64>) -> Latency {
        if hist.is_empty() {
            return Latency::default();
        }
        Latency {
            count: hist.len(),
            p50: hist.value_at_quantile(0.50),
            p95: hist.value_at_quantile(0.95),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
        }
    }
}

/// What the run was asked to do, as recorded in the JSON report.
#[derive(Clone, Debug, Serialize)]
pub struct Setup {
    /// Broker URI with any password masked.
    pub uri: String,
    /// Optional label given with --id.
    pub id: Option<String>,
    /// Producer count.
    pub producers: usize,
    /// Consumer count.
    pub consumers: usize,
    /// Queue names.
    pub queues: Vec<String>,
    /// Queue arguments as given.
    pub queue_args: Option<String>,
    /// Queue durability.
    pub queue_durable: bool,
    /// Body size in bytes.
    pub size: usize,
    /// Confirm window per producer (0: no confirms).
    pub confirm: usize,
    /// delivery-mode 2.
    pub persistent: bool,
    /// Automatic acknowledgement.
    pub auto_ack: bool,
    /// Ack with multiple=true every N deliveries (0 or 1: every delivery).
    pub multi_ack_every: u32,
    /// Consumer prefetch (0: unlimited).
    pub prefetch: u16,
    /// Per-producer rate limit (0: unlimited).
    pub rate: f64,
    /// Publishing time in seconds.
    pub duration_s: f64,
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// What was asked.
    pub setup: Setup,
    /// Counts while producers were publishing.
    pub window: Snapshot,
    /// Rates while producers were publishing.
    pub rates: Rates,
    /// Counts at the very end, after draining.
    pub totals: Snapshot,
    /// Whether consumers received everything that was published before the drain timeout.
    pub drained: bool,
    /// Seconds spent draining after producers stopped.
    pub drain_s: f64,
    /// Publish-to-confirm latency in microseconds.
    pub confirm_latency_us: Latency,
    /// Publish-to-delivery latency in microseconds.
    pub e2e_latency_us: Latency,
    /// Stalls: runs of confirms slower than --slow-confirm-ms, in time order.
    pub slow_confirms: Vec<SlowConfirm>,
    /// Per-second progress.
    pub samples: Vec<Sample>,
    /// CPU seconds (user + system) used by this bench process, to show it was not the bottleneck.
    pub bench_cpu_s: Option<f64>,
}

impl Report {
    /// The human-readable summary.
    pub fn to_text(&self) -> String {
        let s = &self.setup;
        let c = &self.confirm_latency_us;
        let e = &self.e2e_latency_us;
        let mut out = String::new();
        out.push_str(&format!(
            "warren bench: {} producers, {} consumers, queues {:?}, {} B, confirm {}, {}, {}, {:.0} s\n",
            s.producers,
            s.consumers,
            s.queues,
            s.size,
            s.confirm,
            if s.persistent { "persistent" } else { "transient" },
            if s.auto_ack {
                "auto-ack".to_string()
            } else {
                format!(
                    "manual ack (prefetch {}, multi-ack-every {})",
                    s.prefetch, s.multi_ack_every
                )
            },
            s.duration_s
        ));
        out.push_str(&format!(
            "published {:.0} msg/s, confirmed {:.0} msg/s, consumed {:.0} msg/s\n",
            self.rates.published, self.rates.confirmed, self.rates.consumed
        ));
        if c.count > 0 {
            out.push_str(&format!(
                "confirm latency (us): p50 {} p95 {} p99 {} p99.9 {} max {} (n={})\n",
                c.p50, c.p95, c.p99, c.p999, c.max, c.count
            ));
        }
        if e.count > 0 {
            out.push_str(&format!(
                "end-to-end latency (us): p50 {} p95 {} p99 {} p99.9 {} max {} (n={})\n",
                e.p50, e.p95, e.p99, e.p999, e.max, e.count
            ));
        }
        let t = &self.totals;
        out.push_str(&format!(
            "totals: published {} confirmed {} nacked {} consumed {}; {} after {:.1} s\n",
            t.published,
            t.confirmed,
            t.nacked,
            t.consumed,
            if self.drained {
                "drained"
            } else {
                "NOT drained"
            },
            self.drain_s
        ));
        if !self.slow_confirms.is_empty() {
            let worst = self
                .slow_confirms
                .iter()
                .map(|c| c.worst_ms)
                .fold(0.0, f64::max);
            out.push_str(&format!(
                "confirm stalls (listed in the JSON report): {}, worst {worst:.0} ms\n",
                self.slow_confirms.len()
            ));
        }
        if let Some(cpu) = self.bench_cpu_s {
            out.push_str(&format!("bench process CPU: {cpu:.2} s\n"));
        }
        out
    }
}

/// Mask the password of an AMQP URI so reports can be shared.
pub fn mask_uri(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://") else {
        return uri.to_string();
    };
    let rest = &uri[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return uri.to_string();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &uri[..scheme_end + 3],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => uri.to_string(),
    }
}

/// CPU seconds (user + system) this process has used, from /proc (Linux only).
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces; fields are counted after its closing parenthesis.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), i.e. 11 and 12 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // /proc reports clock ticks in USER_HZ, which Linux fixes at 100 for user space.
    Some((utime + stime) as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_password_is_masked() {
        assert_eq!(
            mask_uri("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(mask_uri("amqp://127.0.0.1"), "amqp://127.0.0.1");
        assert_eq!(mask_uri("amqp://user@host"), "amqp://user@host");
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut hist = new_histogram();
        for micros in 1..=1000u64 {
            record(&mut hist, Duration::from_micros(micros));
        }
        let l = Latency::of(&hist);
        assert_eq!(l.count, 1000);
        assert!((495..=505).contains(&l.p50), "p50 {}", l.p50);
        assert!((985..=995).contains(&l.p99), "p99 {}", l.p99);
        assert!((999..=1001).contains(&l.max), "max {}", l.max);
        assert_eq!(Latency::of(&new_histogram()).count, 0);
    }

    #[test]
    fn rates_divide_by_elapsed_time() {
        let delta = Snapshot {
            published: 200,
            confirmed: 100,
            nacked: 0,
            consumed: 50,
        };
        let r = Rates::of(&delta, Duration::from_secs(2));
        assert_eq!((r.published, r.confirmed, r.consumed), (100.0, 50.0, 25.0));
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(process_cpu_seconds().is_some_and(|s| s >= 0.0));
    }
}
