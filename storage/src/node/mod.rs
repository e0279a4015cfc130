//! The storage node: journal-backed segment store served over QUIC, and the CASPaxos
//! acceptor served over gRPC. Storage nodes never talk to each other; at start a node only
//! publishes itself in the node registry (a register like any other).

pub mod data_server;
pub mod journal;
pub mod membership;
pub mod registers;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::server::TcpIncoming;
use tracing::Instrument;
use warren_common::{Generation, NodeId};

use crate::StorageError;
use crate::client::Registers;
use crate::config::StorageNodeConfig;
use crate::meta::{self, NODES_KEY, NodeRecord, NodeRegistry};

/// A storage node's identity, and whether this process created it.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    /// The node id, kept in the data directory.
    pub id: NodeId,
    /// Created by this process (the directory held no state): no earlier process ever ran
    /// under this id, so every registry record carrying it was written by this one.
    pub created: bool,
}

/// Read this node's identity from `dir`, or create one if the directory holds no state.
/// A directory with a journal but no identity is refused: its promises belong to an
/// identity that can no longer be proven.
pub fn load_or_create_identity(dir: &Path) -> Result<Identity, StorageError> {
    let path = dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(s) => uuid::Uuid::parse_str(s.trim())
            .map(|u| Identity {
                id: NodeId(u),
                created: false,
            })
            .map_err(|e| StorageError::Corrupt(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let journal = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("journal"));
            if journal || dir.join("registers").exists() {
                return Err(StorageError::Corrupt(format!(
                    "{} holds storage state but no node_id; refusing to reuse it under a new identity",
                    dir.display()
                )));
            }
            let id = NodeId::random();
            let tmp = dir.join("node_id.tmp");
            std::fs::write(&tmp, id.0.to_string())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()?;
            tracing::info!(node = %id, "new storage node identity");
            Ok(Identity { id, created: true })
        }
        Err(e) => Err(e.into()),
    }
}

/// Run a storage node until `shutdown` resolves.
pub async fn run(
    config: StorageNodeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StorageError> {
    let listener = tokio::net::TcpListener::bind(config.control_addr).await?;
    run_with_control_listener(config, listener, shutdown).await
}

/// Run a storage node on an already bound control-plane listener (lets tests and
/// supervisors pick free ports without a race).
pub async fn run_with_control_listener(
    config: StorageNodeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StorageError> {
    config
        .validate()
        .map_err(|e| StorageError::Invalid(e.to_string()))?;
    // tonic builds its server TLS config with the process default provider; make it ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::fs::create_dir_all(&config.data_dir)?;
    let identity = load_or_create_identity(&config.data_dir)?;
    let store = store::Store::open(&config.data_dir, config.max_batch_bytes)?;
    let acceptor = Arc::new(registers::AcceptorStore::open(&config.data_dir)?);

    let endpoint = crate::quic::server_endpoint(&config.tls, config.data_addr)?;
    let data_addr = config.advertise_data_addr.unwrap_or(endpoint.local_addr()?);
    let control_addr = config
        .advertise_control_addr
        .unwrap_or(listener.local_addr()?);
    let span = tracing::info_span!("storage", node = %identity.id, name = %config.name);
    serve(
        config,
        listener,
        identity,
        store,
        acceptor,
        endpoint,
        data_addr,
        control_addr,
        shutdown,
    )
    .instrument(span)
    .await
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    config: StorageNodeConfig,
    listener: tokio::net::TcpListener,
    identity: Identity,
    store: Arc<store::Store>,
    acceptor: Arc<registers::AcceptorStore>,
    endpoint: quinn::Endpoint,
    data_addr: SocketAddr,
    control_addr: SocketAddr,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StorageError> {
    tracing::info!(%data_addr, %control_addr, zone = %config.zone, "storage node listening");
    let node_id = identity.id;

    let gate = Arc::new(membership::ComputeGate::default());
    let data_task = tokio::spawn(data_server::serve(
        endpoint.clone(),
        store.clone(),
        node_id,
        gate.clone(),
    ));
    let gate_task = tokio::spawn(
        membership::watch_compute_registry(gate, Registers::connect(&config.seeds, &config.tls)?)
            .in_current_span(),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let catch_up_task = tokio::spawn(
        catch_up(
            acceptor.clone(),
            config.seeds.clone(),
            control_addr,
            identity,
            config.tls.clone(),
        )
        .in_current_span(),
    );
    let grpc = tonic::transport::Server::builder()
        .tls_config(crate::rpc::server_tls(&config.tls)?)
        .map_err(|e| StorageError::Invalid(format!("control-plane tls: {e}")))?
        .add_service(crate::rpc::RegistersService::new(acceptor))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = stop_rx.await;
            },
        );
    let grpc_task = tokio::spawn(grpc);

    let record = NodeRecord {
        name: config.name.clone(),
        zone: config.zone.clone(),
        data_addr,
        control_addr,
        generation: Generation(0),
        state: meta::MemberState::Active,
        heartbeat: 0,
    };
    let register_task = tokio::spawn(
        membership::keep_lease(config.seeds.clone(), config.tls.clone(), node_id, record)
            .in_current_span(),
    );

    shutdown.await;
    tracing::info!("storage node shutting down");
    register_task.abort();
    gate_task.abort();
    catch_up_task.abort();
    endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
    let _ = stop_tx.send(());
    data_task.abort();
    // Graceful gRPC shutdown waits for clients to hang up; do not let one keep us alive.
    let grpc_abort = grpc_task.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), grpc_task)
        .await
        .is_err()
    {
        tracing::debug!("control plane did not drain in time");
        grpc_abort.abort();
    }
    let closing = store.clone();
    let _ = tokio::task::spawn_blocking(move || closing.close()).await;
    endpoint.wait_idle().await;
    Ok(())
}

/// Bring a new acceptor's state up to date before it serves (see
/// [`registers::AcceptorStore`]): read the state of enough other acceptors to meet every
/// majority this node could have belonged to, and start from the most advanced state of
/// each key. If a node registered with this control address before (the acceptor lost its
/// state, as opposed to joining a new cluster), first wait out the accepts that proposers
/// may still have in flight from before the loss (a proposer counts an answer only within
/// [`crate::rpc::RPC_TIMEOUT`]), then read again. This node's own registration, which
/// other acceptors take while this one catches up, does not count as such an earlier
/// node when this process created the identity it registered under.
async fn catch_up(
    acceptor: Arc<registers::AcceptorStore>,
    seeds: Vec<SocketAddr>,
    me: SocketAddr,
    identity: Identity,
    tls: warren_common::config::TlsPaths,
) {
    if acceptor.is_ready() {
        return;
    }
    let others: Vec<SocketAddr> = seeds.iter().copied().filter(|s| *s != me).collect();
    let needed = if seeds.contains(&me) {
        registers::others_needed(seeds.len())
    } else {
        0
    };
    let clients: Vec<_> = others
        .iter()
        .filter_map(|a| crate::rpc::AcceptorClient::new(*a, &tls).ok())
        .collect();
    let mut delay = Duration::from_millis(50);
    let mut waited = false;
    loop {
        let mut calls = tokio::task::JoinSet::new();
        for c in &clients {
            let c = c.clone();
            calls.spawn(async move { c.dump().await });
        }
        let mut dumps = Vec::new();
        while let Some(r) = calls.join_next().await {
            if let Ok(Ok((_, dump))) = r {
                dumps.push(dump);
            }
        }
        if dumps.len() >= needed {
            let merged = registers::merge_dumps(dumps);
            let used_before = merged
                .get(NODES_KEY)
                .and_then(|s| s.value.as_ref())
                .and_then(|v| meta::decode::<NodeRegistry>(v).ok())
                .is_some_and(|r| used_before(&r, me, identity));
            if !used_before || waited {
                let a = acceptor.clone();
                match tokio::task::spawn_blocking(move || a.install(merged)).await {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "register acceptor could not catch up")
                    }
                    Err(e) => tracing::error!(error = %e, "register acceptor catch-up failed"),
                }
            } else {
                tracing::info!(
                    "register acceptor state is new: waiting for in-flight accepts before catching up"
                );
                tokio::time::sleep(2 * crate::rpc::RPC_TIMEOUT).await;
                waited = true;
                continue;
            }
        } else {
            tracing::debug!(
                answered = dumps.len(),
                needed,
                "register acceptor waiting for other acceptors to catch up from"
            );
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Whether an earlier node served register acceptors at control address `me`, as far as
/// `registry` tells. Proposers address acceptors by their seed address; if no earlier node
/// ever registered with ours, no acceptor here ever answered for it (registering is a
/// node's first write), so nothing can be in flight. A record under an identity this
/// process created is this process's own registration, which went through the other
/// acceptors (this one does not serve yet): it says nothing of an earlier node. Counting it
/// would make a fresh node wait out in-flight accepts for nothing, leaving the cluster one
/// acceptor short meanwhile, so that one more failure then would stop every register.
fn used_before(registry: &NodeRegistry, me: SocketAddr, identity: Identity) -> bool {
    registry
        .nodes
        .iter()
        .any(|(id, n)| n.control_addr == me && !(identity.created && *id == identity.id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_common::{Generation, Zone};

    fn record(control: &str) -> NodeRecord {
        NodeRecord {
            name: "storage-0".into(),
            zone: Zone("zone-a".into()),
            data_addr: "127.0.0.1:1".parse().unwrap(),
            control_addr: control.parse().unwrap(),
            generation: Generation(1),
            state: meta::MemberState::Active,
            heartbeat: 0,
        }
    }

    #[test]
    fn a_fresh_nodes_own_registration_is_not_an_earlier_node() {
        let me: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let id = NodeId::random();
        let mut registry = NodeRegistry::default();
        registry.nodes.insert(id, record("127.0.0.1:7000"));
        registry
            .nodes
            .insert(NodeId::random(), record("127.0.0.1:7001"));
        let fresh = Identity { id, created: true };
        assert!(!used_before(&registry, me, fresh));
        assert!(!used_before(&NodeRegistry::default(), me, fresh));

        // The same record under an identity read from disk: an earlier process of this
        // node registered it, and its acceptor may have answered.
        let kept = Identity { id, created: false };
        assert!(used_before(&registry, me, kept));

        // Another identity at this address: a node whose disk was wiped.
        registry
            .nodes
            .insert(NodeId::random(), record("127.0.0.1:7000"));
        assert!(used_before(&registry, me, fresh));
    }
}
