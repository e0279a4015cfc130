//! Shared types for every Warren role: ids, epochs and generations, configuration,
//! error kinds, telemetry setup and the cluster's TLS material.

pub mod config;
pub mod error;
pub mod ids;
pub mod slots;
pub mod telemetry;
pub mod tls;

pub use error::ErrorKind;
pub use ids::*;
