//! Message bodies that carry their own send time, so a consumer can measure end-to-end latency.
//!
//! Layout (big-endian): bytes 0..8 the send time in nanoseconds on the run's clock, 8..12 the
//! run id (so messages left over from another run are counted but never timed), 12..16 the
//! producer index; the rest is filler.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The smallest body that can carry the stamp.
pub const MIN_SIZE: usize = 16;

/// The clock shared by every producer and consumer of one run.
///
/// Time is the wall clock read once at start plus a monotonic offset, so a step of the system
/// clock during a run cannot produce negative or huge latencies.
#[derive(Clone, Copy, Debug)]
pub struct RunClock {
    origin: Instant,
    origin_wall_nanos: u64,
    run_id: u32,
}

impl RunClock {
    /// Start the clock for a new run.
    pub fn start() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let origin_wall_nanos = u64::try_from(wall.as_nanos()).unwrap_or(u64::MAX / 2);
        // Distinct enough between runs; it only has to tell this run's messages from leftovers.
        let run_id = (origin_wall_nanos as u32) ^ std::process::id().rotate_left(16);
        Self {
            origin: Instant::now(),
            origin_wall_nanos,
            run_id,
        }
    }

    /// Nanoseconds since the Unix epoch, advancing monotonically.
    pub fn now_nanos(&self) -> u64 {
        let elapsed = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX / 2);
        self.origin_wall_nanos.saturating_add(elapsed)
    }

    /// Build a body of `size` bytes (at least [`MIN_SIZE`]) for `producer`.
    pub fn new_body(&self, size: usize, producer: u32) -> Vec<u8> {
        let mut body = vec![0u8; size.max(MIN_SIZE)];
        body[8..12].copy_from_slice(&self.run_id.to_be_bytes());
        body[12..16].copy_from_slice(&producer.to_be_bytes());
        for (i, b) in body.iter_mut().enumerate().skip(MIN_SIZE) {
            // Printable filler: some brokers' tracing or management tools show bodies.
            *b = b'a' + (i % 26) as u8;
        }
        body
    }

    /// Write the current time into `body` just before it is published.
    pub fn stamp(&self, body: &mut [u8]) {
        body[0..8].copy_from_slice(&self.now_nanos().to_be_bytes());
    }

    /// End-to-end latency of a received body, or `None` if it was not sent by this run.
    pub fn latency(&self, body: &[u8]) -> Option<Duration> {
        let sent = u64::from_be_bytes(body.get(0..8)?.try_into().ok()?);
        let run_id = u32::from_be_bytes(body.get(8..12)?.try_into().ok()?);
        if run_id != self.run_id {
            return None;
        }
        Some(Duration::from_nanos(self.now_nanos().saturating_sub(sent)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_body_round_trips_latency() {
        let clock = RunClock::start();
        let mut body = clock.new_body(1024, 3);
        assert_eq!(body.len(), 1024);
        clock.stamp(&mut body);
        let latency = clock.latency(&body);
        assert!(latency.is_some_and(|l| l < Duration::from_secs(60)));
    }

    #[test]
    fn short_sizes_are_raised_to_the_stamp() {
        let clock = RunClock::start();
        assert_eq!(clock.new_body(1, 0).len(), MIN_SIZE);
    }

    #[test]
    fn foreign_and_truncated_bodies_are_not_timed() {
        let clock = RunClock::start();
        let mut body = clock.new_body(64, 0);
        clock.stamp(&mut body);
        body[8] ^= 0xff;
        assert_eq!(clock.latency(&body), None);
        assert_eq!(clock.latency(&body[..10]), None);
        assert_eq!(clock.latency(b""), None);
    }
}
