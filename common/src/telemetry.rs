//! Logging and tracing setup shared by every binary role.

use tracing_subscriber::EnvFilter;

/// Install the global tracing subscriber: human-readable lines on stderr, filtered by
/// `WARREN_LOG` (or `RUST_LOG`), `info` by default. Safe to call more than once.
pub fn init_logging() {
    let filter = std::env::var("WARREN_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(true)
        .try_init();
}
