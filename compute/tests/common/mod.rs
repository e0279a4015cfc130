//! Start a compute node on a free loopback port for one test.

use warren_common::config::TlsPaths;
use warren_compute::{ComputeConfig, ComputeNode};

/// A compute node serving one test; stopped when dropped with the runtime.
pub struct Broker {
    node: ComputeNode,
}

impl Broker {
    /// A node with every queue in memory (no storage tier).
    pub async fn start() -> Broker {
        let mut config = ComputeConfig::new(TlsPaths {
            ca_cert: "unused".into(),
            cert: "unused".into(),
            key: "unused".into(),
        });
        config.amqp_listen = "127.0.0.1:0".parse().expect("loopback address");
        let node = ComputeNode::start_in_memory(config)
            .await
            .expect("compute node starts");
        Broker { node }
    }

    /// The node's socket address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.node.local_addr()
    }

    /// The AMQP URL of the node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.node.local_addr())
    }
}
