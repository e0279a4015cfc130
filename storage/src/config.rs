//! Storage node configuration (`warren storage --config storage.toml`).

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use warren_common::Zone;
use warren_common::config::{ConfigError, TlsPaths};

/// Configuration of one storage node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StorageNodeConfig {
    /// Operator-facing node name (logs, registry); also a SAN of its certificate.
    pub name: String,
    /// Availability zone; ensembles put replicas in distinct zones.
    #[serde(default = "default_zone")]
    pub zone: Zone,
    /// Journal, register state and node identity live here.
    pub data_dir: PathBuf,
    /// QUIC data-plane listen address (port 0 picks a free port; the registry publishes it).
    #[serde(default = "default_data_addr")]
    pub data_addr: SocketAddr,
    /// gRPC control-plane listen address; must be one of every node's `seeds`.
    #[serde(default = "default_control_addr")]
    pub control_addr: SocketAddr,
    /// Address other nodes dial for the data plane, if `data_addr` is a wildcard.
    #[serde(default)]
    pub advertise_data_addr: Option<SocketAddr>,
    /// Address other nodes dial for the control plane, if `control_addr` is a wildcard.
    #[serde(default)]
    pub advertise_control_addr: Option<SocketAddr>,
    /// Cluster TLS material.
    pub tls: TlsPaths,
    /// Control-plane addresses of every storage node holding metadata registers (this one
    /// included).
    pub seeds: Vec<SocketAddr>,
    /// Journal group commit: most bytes written per fsync.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
}

fn default_zone() -> Zone {
    Zone("zone-a".into())
}

fn default_data_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7401))
}

fn default_control_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7402))
}

fn default_max_batch_bytes() -> usize {
    8 * 1024 * 1024
}

impl StorageNodeConfig {
    /// Refuse settings the node cannot run with, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            key: key.to_string(),
            reason: reason.to_string(),
        };
        if self.name.is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.seeds.is_empty() {
            return Err(invalid(
                "seeds",
                "must list the control addresses of the storage nodes",
            ));
        }
        if self.max_batch_bytes < 64 * 1024 {
            return Err(invalid("max_batch_bytes", "must be at least 65536"));
        }
        if self.control_addr.ip().is_unspecified() && self.advertise_control_addr.is_none() {
            return Err(invalid(
                "advertise_control_addr",
                "required when control_addr is a wildcard address",
            ));
        }
        if self.data_addr.ip().is_unspecified() && self.advertise_data_addr.is_none() {
            return Err(invalid(
                "advertise_data_addr",
                "required when data_addr is a wildcard address",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn minimal_config_parses_with_defaults_and_unknown_keys_are_refused() {
        let text = r#"
            name = "storage-1"
            data_dir = "/tmp/s1"
            seeds = ["127.0.0.1:7402"]
            [tls]
            ca_cert = "ca.pem"
            cert = "s1.pem"
            key = "s1.key.pem"
        "#;
        let c: StorageNodeConfig = toml::from_str(text).unwrap();
        assert_eq!(c.zone, Zone("zone-a".into()));
        c.validate().unwrap();
        let bad = format!("bogus = 1\n{text}");
        assert!(toml::from_str::<StorageNodeConfig>(&bad).is_err());
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../storage.example.toml");
        let c: StorageNodeConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        // The example documents the defaults.
        assert_eq!(c.max_batch_bytes, default_max_batch_bytes());
        assert_eq!(c.zone, default_zone());
    }
}
