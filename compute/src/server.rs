//! The accept loop: one task per connection, bounded by a semaphore.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use warren_storage::client::{StorageClient, StorageClientConfig};

use crate::cluster::membership::{self, Membership, MembershipEvent};
use crate::config::ComputeConfig;
use crate::connection;
use crate::error::ComputeError;
use crate::node::Node;
use warren_common::{Generation, NodeId, Zone};
use warren_storage::meta::{ComputeRecord, MemberState};

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
        // Bound before joining, so that the record advertises the port really bound.
        let peer_endpoint = match &storage {
            Some(_) => Some(
                crate::cluster::peer::endpoint(&config.tls, config.peer_listen)
                    .map_err(|e| ComputeError::Startup(e.to_string()))?,
            ),
            None => None,
        };
        let peer_addr = peer_endpoint
            .as_ref()
            .and_then(|e| e.local_addr().ok())
            .unwrap_or(config.peer_listen);
        let membership = match &storage {
            Some(storage) => Some(join(&config, storage, node_id, local_addr, peer_addr).await?),
            None => None,
        };
        let node = Node::new(config, storage, node_id, membership.clone())
            .await
            .map_err(|e| ComputeError::Startup(e.to_string()))?;
        if let Some(endpoint) = peer_endpoint {
            node.start_peers(endpoint);
        }
        if let Some(m) = &membership {
            follow_membership(m, &node);
        }
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

    /// Stop accepting, leave the cluster, close every connection with 320
    /// CONNECTION_FORCED, and return.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Some(m) = &self.node.membership
            && let Err(e) = m.leave().await
        {
            warn!(error = %e, "could not mark this node as leaving; it will be evicted instead");
        }
        let _ = self.node.shutdown.send(true);
        // Queues this node owns move to other nodes; their proxies there fail over.
        self.node.stop_owners();
        self.node.close_peers();
        let _ = self.task.await;
        // Give connections a moment to write their connection.close.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The address others reach `addr` at: a wildcard bind is advertised as `advertise_host`.
fn advertised(config: &ComputeConfig, addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        let host = config
            .advertise_host
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        SocketAddr::new(host, addr.port())
    } else {
        addr
    }
}

/// Join the compute cluster and make the storage client speak for this generation.
async fn join(
    config: &ComputeConfig,
    storage: &StorageClient,
    node_id: NodeId,
    amqp_addr: SocketAddr,
    peer_addr: SocketAddr,
) -> Result<Membership, ComputeError> {
    let record = ComputeRecord {
        name: config.node_name.clone(),
        zone: Zone(config.zone.clone()),
        amqp_addr: advertised(config, amqp_addr),
        peer_addr: advertised(config, peer_addr),
        generation: Generation(0),
        state: MemberState::Active,
        heartbeat: 0,
    };
    let meta = crate::meta::Meta::Registers(storage.registers());
    let m = Membership::join(meta, node_id, record, &config.cluster)
        .await
        .map_err(|e| ComputeError::Startup(format!("joining the cluster: {e}")))?;
    storage.set_identity(node_id, m.generation());
    Ok(m)
}

/// Act on this node's own membership changes: an evicted node drops every client (320
/// CONNECTION_FORCED) and every queue owner, since other nodes now serve its queues; once
/// it joined again, its storage client speaks for the new generation.
fn follow_membership(m: &Membership, node: &Arc<Node>) {
    let weak = Arc::downgrade(node);
    let me = node.node_id;
    m.on_event(move |event| {
        let Some(node) = weak.upgrade() else {
            return;
        };
        match event {
            MembershipEvent::Evicted(_) | MembershipEvent::Superseded(_) => {
                // Wakes every connection's shutdown watch without marking the node as
                // stopped: connections close with 320, the node itself goes on.
                node.shutdown.send_modify(|_| {});
                node.stop_owners();
            }
            MembershipEvent::Joined(generation) => {
                if let Some(storage) = &node.storage {
                    storage.set_identity(me, generation);
                }
            }
        }
    });
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

/// The node id this node's name ran under before (so a restart gets the next generation of
/// the same identity), or a fresh one.
async fn reuse_identity(config: &ComputeConfig) -> NodeId {
    let known = match warren_storage::client::Registers::connect(&config.storage_seeds, &config.tls)
    {
        Ok(regs) => {
            membership::known_id(&crate::meta::Meta::Registers(regs), &config.node_name).await
        }
        Err(e) => Err(e),
    };
    match known {
        Ok(Some(id)) => id,
        Ok(None) => NodeId::random(),
        Err(e) => {
            warn!(error = %e, "compute registry unreadable; starting under a new identity");
            NodeId::random()
        }
    }
}

/// Run a compute node until `shutdown` resolves: connect to storage, listen, serve.
pub async fn run(
    config: ComputeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ComputeError> {
    config.validate()?;
    let node_id = reuse_identity(&config).await;
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
