//! Configuration loading shared by every role: a TOML file, then `WARREN_*` environment
//! overrides, then validation that names the offending key. Each role defines its own
//! serde struct (`warren_storage::config`, `warren_compute::config`); the pieces every role
//! shares live here.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::path::{Path, PathBuf};

/// A configuration error that names the key an operator must fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this role.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, including the key.
        message: String,
    },
    /// A value is present but unsafe or out of range.
    #[error("invalid setting `{key}`: {reason}")]
    Invalid {
        /// The dotted key, e.g. `replication.ack_quorum`.
        key: String,
        /// Why it is refused.
        reason: String,
    },
}

/// Read a role's config from a TOML file.
pub fn load_file<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Where a node finds the cluster CA and its own certificate (PEM files).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The cluster CA certificate every node trusts.
    pub ca_cert: PathBuf,
    /// This node's certificate, signed by the cluster CA.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// How many copies a segment gets and how many must be on disk before an entry counts.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Replication {
    /// Write quorum `Qw`: the ensemble size of every segment.
    pub write_quorum: usize,
    /// Ack quorum `Qa`: copies fsync'd before an entry is durable.
    pub ack_quorum: usize,
    /// Replicas per zone (1 by default; the strict profile uses 2 with Qw 6, Qa 4).
    pub per_zone: usize,
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            write_quorum: 3,
            ack_quorum: 2,
            per_zone: 1,
        }
    }
}

impl Replication {
    /// The strict profile: six copies, two per zone, four must ack.
    pub fn strict() -> Self {
        Replication {
            write_quorum: 6,
            ack_quorum: 4,
            per_zone: 2,
        }
    }

    /// Refuse settings that could lose acknowledged data or never make progress.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            key: format!("{prefix}.{key}"),
            reason,
        };
        if self.write_quorum == 0 {
            return Err(invalid("write_quorum", "must be at least 1".into()));
        }
        if self.ack_quorum == 0 || self.ack_quorum > self.write_quorum {
            return Err(invalid(
                "ack_quorum",
                format!("must be between 1 and write_quorum ({})", self.write_quorum),
            ));
        }
        // One acknowledged copy would be lost with the one node that holds it.
        if self.write_quorum > 1 && self.ack_quorum < 2 {
            return Err(invalid(
                "ack_quorum",
                "must be at least 2 when write_quorum > 1, or one node loss loses data".into(),
            ));
        }
        if self.per_zone == 0 {
            return Err(invalid("per_zone", "must be at least 1".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_strict_replication_are_valid() {
        assert!(Replication::default().validate("replication").is_ok());
        assert!(Replication::strict().validate("replication").is_ok());
    }

    #[test]
    fn unsafe_ack_quorum_is_refused_by_name() {
        let r = Replication {
            write_quorum: 3,
            ack_quorum: 1,
            per_zone: 1,
        };
        let err = r.validate("replication").unwrap_err().to_string();
        assert!(err.contains("replication.ack_quorum"), "{err}");
    }
}
