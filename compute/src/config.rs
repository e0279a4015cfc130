//! The compute node's configuration: a serde struct with RabbitMQ's defaults.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use warren_common::config::{ConfigError, Replication, TlsPaths};

/// Everything a compute node needs to run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ComputeConfig {
    /// This node's name, shown in logs and as `cluster_name` to clients.
    #[serde(default = "default_node_name")]
    pub node_name: String,
    /// The availability zone this node runs in.
    #[serde(default = "default_zone")]
    pub zone: String,
    /// Where AMQP clients connect.
    #[serde(default = "default_amqp_listen")]
    pub amqp_listen: SocketAddr,
    /// Where other compute nodes reach this one (QUIC, cluster mTLS): operations on the
    /// queues this node owns are forwarded here.
    #[serde(default = "default_peer_listen")]
    pub peer_listen: SocketAddr,
    /// Address other nodes and clients are told to use for `peer_listen` and
    /// `amqp_listen` when those bind a wildcard address (default: loopback).
    #[serde(default)]
    pub advertise_host: Option<std::net::IpAddr>,
    /// Control-plane (gRPC) addresses of storage nodes.
    #[serde(default)]
    pub storage_seeds: Vec<SocketAddr>,
    /// Membership: lease timing.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Cluster TLS material for talking to storage.
    pub tls: TlsPaths,
    /// Replication of the queue logs this node writes.
    #[serde(default)]
    pub replication: Replication,
    /// Client-facing bounds.
    #[serde(default)]
    pub limits: Limits,
    /// The users allowed to connect.
    #[serde(default)]
    pub auth: AuthConfig,
}

/// Bounds on what clients may use; defaults are RabbitMQ's.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open client connections at once; further ones wait in the accept backlog.
    pub max_connections: usize,
    /// Highest channel number a client may open (RabbitMQ: 2047).
    pub channel_max: u16,
    /// Largest frame in bytes, offered in connection.tune (RabbitMQ: 131072).
    pub frame_max: u32,
    /// Heartbeat interval in seconds offered in connection.tune (RabbitMQ: 60).
    pub heartbeat_secs: u16,
    /// Largest message body in bytes (RabbitMQ: 128 MiB).
    pub max_message_size: u64,
    /// Unconfirmed publishes one channel may have in flight before reads pause.
    pub max_inflight_confirms: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 65_536,
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat_secs: 60,
            max_message_size: 128 * 1024 * 1024,
            max_inflight_confirms: 100_000,
        }
    }
}

/// How compute nodes keep their membership.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How often a node renews its lease, in milliseconds.
    pub renew_ms: u64,
    /// A compute node whose lease was not renewed for this long is evicted and its
    /// queues move to other nodes.
    pub lease_ms: u64,
    /// A storage node whose lease was not renewed for this long is evicted and its
    /// replicas are rebuilt elsewhere (long: a restart must not trigger re-replication).
    pub storage_lease_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            renew_ms: 1_000,
            lease_ms: 3_000,
            storage_lease_ms: 30_000,
        }
    }
}

/// Authentication settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Users and their passwords.
    pub users: Vec<User>,
    /// Users that may only connect from a loopback address (RabbitMQ: `guest`).
    pub loopback_users: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            users: vec![User {
                name: "guest".into(),
                password: "guest".into(),
            }],
            loopback_users: vec!["guest".into()],
        }
    }
}

/// One user.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The login name.
    pub name: String,
    /// The password, compared in constant time.
    pub password: String,
}

fn default_node_name() -> String {
    "warren@localhost".into()
}

fn default_peer_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5680))
}

fn default_zone() -> String {
    "zone-a".into()
}

fn default_amqp_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5672))
}

/// The smallest frame_max AMQP 0-9-1 allows a peer to insist on.
pub const FRAME_MIN_SIZE: u32 = 4096;

impl ComputeConfig {
    /// A configuration with every default, for the given TLS material.
    pub fn new(tls: TlsPaths) -> Self {
        ComputeConfig {
            node_name: default_node_name(),
            zone: default_zone(),
            amqp_listen: default_amqp_listen(),
            peer_listen: default_peer_listen(),
            advertise_host: None,
            storage_seeds: Vec::new(),
            cluster: ClusterConfig::default(),
            tls,
            replication: Replication::default(),
            limits: Limits::default(),
            auth: AuthConfig::default(),
        }
    }

    /// Refuse settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        };
        self.replication.validate("replication")?;
        if self.limits.frame_max != 0 && self.limits.frame_max < FRAME_MIN_SIZE {
            return Err(invalid(
                "limits.frame_max",
                "must be 0 (no limit) or at least 4096",
            ));
        }
        if self.limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if self.limits.max_message_size == 0 || self.limits.max_message_size > 512 * 1024 * 1024 {
            return Err(invalid(
                "limits.max_message_size",
                "must be between 1 and 536870912 (512 MiB)",
            ));
        }
        if self.limits.max_inflight_confirms == 0 {
            return Err(invalid(
                "limits.max_inflight_confirms",
                "must be at least 1",
            ));
        }
        if self.cluster.renew_ms == 0 {
            return Err(invalid("cluster.renew_ms", "must be at least 1"));
        }
        if self.cluster.lease_ms < 2 * self.cluster.renew_ms {
            return Err(invalid(
                "cluster.lease_ms",
                "must be at least twice cluster.renew_ms",
            ));
        }
        if self.cluster.storage_lease_ms < self.cluster.lease_ms {
            return Err(invalid(
                "cluster.storage_lease_ms",
                "must be at least cluster.lease_ms",
            ));
        }
        if self.node_name.is_empty() {
            return Err(invalid("node_name", "must not be empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_and_validates() {
        let text = include_str!("../../compute.example.toml");
        let config: ComputeConfig = toml::from_str(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.limits, Limits::default());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = "bogus = 1\n[tls]\nca_cert='a'\ncert='b'\nkey='c'\n";
        assert!(toml::from_str::<ComputeConfig>(text).is_err());
    }

    #[test]
    fn small_frame_max_is_refused_by_name() {
        let mut c = ComputeConfig::new(TlsPaths {
            ca_cert: "a".into(),
            cert: "b".into(),
            key: "c".into(),
        });
        c.limits.frame_max = 100;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("limits.frame_max"), "{err}");
    }
}
