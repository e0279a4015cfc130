//! The accept loop: one task per connection, bounded by a semaphore.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use warren_storage::client::{StorageClient, StorageClientConfig};

use crate::config::ComputeConfig;
use crate::connection;
use crate::error::ComputeError;
use crate::node::Node;
use warren_common::NodeId;

/// A running compute node.
pub struct ComputeNode {
    node: Arc<Node>,
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ComputeNode {
    /// Start serving AMQP on `config.amqp_listen` with the given storage tier.
    pub async fn start(
        config: ComputeConfig,
        storage: StorageClient,
    ) -> Result<Self, ComputeError> {
        Self::start_inner(config, Some(storage), NodeId::random()).await
    }

    /// Like [`ComputeNode::start`], with the node identity the storage client was given.
    pub async fn start_as(
        config: ComputeConfig,
        storage: StorageClient,
        node_id: NodeId,
    ) -> Result<Self, ComputeError> {
        Self::start_inner(config, Some(storage), node_id).await
    }

    /// Start without a storage tier: every queue lives in memory and metadata is local.
    /// For tests of the protocol layer and for throwaway brokers.
    pub async fn start_in_memory(config: ComputeConfig) -> Result<Self, ComputeError> {
        Self::start_inner(config, None, NodeId::random()).await
    }

    async fn start_inner(
        config: ComputeConfig,
        storage: Option<StorageClient>,
        node_id: NodeId,
    ) -> Result<Self, ComputeError> {
        config.validate()?;
        let addr = config.amqp_listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ComputeError::Bind { addr, source })?;
        let local_addr = listener.local_addr()?;
        let node = Node::new(config, storage, node_id)
            .await
            .map_err(|e| ComputeError::Startup(e.to_string()))?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(node.clone(), listener, stopped));
        info!(addr = %local_addr, node = %node.node_id, "listening for AMQP 0-9-1 connections");
        Ok(ComputeNode {
            node,
            local_addr,
            stop,
            task,
        })
    }

    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The node's shared state.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Stop accepting, close every connection with 320 CONNECTION_FORCED, and return.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.node.shutdown.send(true);
        let _ = self.task.await;
        // Give connections a moment to write their connection.close.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn accept_loop(node: Arc<Node>, listener: TcpListener, mut stopped: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(node.config.limits.max_connections));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stopped.changed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                debug!(%peer, "accepting AMQP connection");
                let node = node.clone();
                tokio::spawn(async move {
                    connection::serve(node, stream, peer).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Run a compute node until `shutdown` resolves: connect to storage, listen, serve.
pub async fn run(
    config: ComputeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ComputeError> {
    config.validate()?;
    let node_id = NodeId::random();
    let storage = StorageClient::connect(StorageClientConfig {
        node_id,
        zone: warren_common::Zone(config.zone.clone()),
        seeds: config.storage_seeds.clone(),
        replication: config.replication,
        tls: config.tls.clone(),
    })
    .await?;
    let node = ComputeNode::start_as(config, storage, node_id).await?;
    shutdown.await;
    info!("compute node shutting down");
    node.stop().await;
    Ok(())
}
