//! The internal QUIC transport between compute nodes: operations on a queue owned by
//! another node are forwarded to it, and its deliveries, confirms and answers come back.
//!
//! To a connection, a remote queue looks exactly like a local one: [`Peers::open_proxy`]
//! returns a [`QueueHandle`] whose commands go to a *proxy* task on this node (`proxy.rs`).
//! The proxy speaks one QUIC bi-stream (a *session*, see `warren_proto::internal::peer`) to
//! the owner node, where [`serve`] hands each session to a task (`session.rs`) that feeds
//! the real queue owner and stands in for the remote connections (it is the
//! [`crate::queue::ConnSink`] the owner pushes events to).
//!
//! Bounds: connections reach a proxy through the same bounded channel as a local owner; a
//! proxy writes to its stream and waits on QUIC flow control, so a slow owner slows its
//! publishers. The owner side pushes events into an unbounded sink exactly as for a local
//! connection (never waiting on a peer), bounded in practice by prefetch and in-flight
//! confirms; the session drains it onto the stream.
//!
//! Failure: when a session ends without the owner saying the queue was deleted (owner node
//! gone, stream reset, queue moved), the proxy stops: publishes waiting for a confirm are
//! handed back to their connections (`ConnEvent::Reroute`), which send them to the queue's
//! next owner, and consumers are cancelled (basic.cancel, as RabbitMQ does when a queue's
//! node goes down). Their unacked messages come back, redelivered, from the queue's log.
//! On the owner side, a session that ends closes its remote channels (their unacked
//! deliveries are requeued). A peer that sends a malformed frame loses its stream, with a
//! log line.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tracing::debug;
use warren_common::config::TlsPaths;
use warren_common::slots::KeyedSlots;
use warren_common::{NodeId, tls};
use warren_proto::internal::peer::{
    self as wire, ALPN, PeerEvent, PeerRequest, WireChannel, WireMessage,
};

use super::membership::ClusterView;
use super::replies::ReplySenders;
use super::{proxy, session};
use crate::error::AmqpError;
use crate::message::Message;
use crate::node::Node;
use crate::queue::{ChannelKey, QueueHandle};

/// How long a proxy waits for a peer to connect and for the owner to accept the queue
/// (which may include taking its log over and replaying it).
pub(super) const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long dialing a peer may take before the queue counts as unreachable.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Commands or events encoded into one stream write.
pub(super) const MAX_BATCH: usize = 512;
/// Bytes read from a stream at a time.
pub(super) const READ_CHUNK: usize = 64 * 1024;

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    // A peer silent this long is gone: its sessions end and their queues fail over.
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(5)).expect("5s is a valid idle timeout"),
    ));
    t.stream_receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    t.send_window(64 * 1024 * 1024);
    // One stream per queue in use across the pair of nodes.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(16 * 1024));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    Arc::new(t)
}

fn tls_err(e: impl std::fmt::Display) -> AmqpError {
    AmqpError::internal(format!("cluster tls: {e}"))
}

/// A QUIC endpoint serving peers on `addr` and dialing them, with the cluster's mutual TLS.
pub fn endpoint(paths: &TlsPaths, addr: SocketAddr) -> Result<quinn::Endpoint, AmqpError> {
    let mut server = tls::server_config(paths).map_err(tls_err)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let server = quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(tls_err)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport());
    let mut client = tls::client_config(paths).map_err(tls_err)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    let client = quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(tls_err)?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(transport());
    let mut endpoint = quinn::Endpoint::server(server, addr)
        .map_err(|e| AmqpError::internal(format!("cannot listen for peers on {addr}: {e}")))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// This node's QUIC endpoint and its connections to other compute nodes (one per peer).
pub struct Peers {
    endpoint: quinn::Endpoint,
    /// The connection to each peer address, if one is open; dialing one peer (up to
    /// [`CONNECT_TIMEOUT`] for a dead one) holds only that peer's slot.
    conns: KeyedSlots<SocketAddr, Option<quinn::Connection>>,
    /// One ordered sender of direct replies per home node.
    pub(super) replies: ReplySenders,
}

impl Peers {
    /// Peers over `endpoint` (which also accepts: see [`serve`]).
    pub fn new(endpoint: quinn::Endpoint) -> Peers {
        Peers {
            endpoint,
            conns: KeyedSlots::default(),
            replies: ReplySenders::default(),
        }
    }

    /// The local address peers reach this node on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// The endpoint (for [`serve`]).
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Stop accepting and close every peer connection.
    pub fn close(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"node stopping");
    }

    async fn connection(&self, addr: SocketAddr, fresh: bool) -> Result<quinn::Connection, String> {
        let slot = self.conns.slot(addr);
        let mut conn = slot.lock().await;
        if !fresh
            && let Some(c) = conn.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        *conn = None;
        let connecting = self
            .endpoint
            .connect(addr, tls::CLUSTER_SERVER_NAME)
            .map_err(|e| format!("peer {addr}: {e}"))?;
        let dialed = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("peer {addr}: connect timed out"))?
            .map_err(|e| format!("peer {addr}: {e}"))?;
        Ok(conn.insert(dialed).clone())
    }

    pub(super) async fn open_stream(
        &self,
        addr: SocketAddr,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
        let conn = self.connection(addr, false).await?;
        match conn.open_bi().await {
            Ok(s) => Ok(s),
            // A cached connection may have died since; one fresh attempt.
            Err(_) => self
                .connection(addr, true)
                .await?
                .open_bi()
                .await
                .map_err(|e| format!("peer {addr}: {e}")),
        }
    }

    /// Queue a reply to direct reply-to name `name`, homed on the node at `addr`, for that
    /// node's ordered sender (`replies.rs`): replies from this node to one home arrive in
    /// the order they were queued. Never waits; an error says why the reply was dropped
    /// (too much already queued for that node).
    pub fn send_direct_reply(
        self: &Arc<Self>,
        addr: SocketAddr,
        name: String,
        msg: WireMessage,
    ) -> Result<(), String> {
        self.replies.send(self, addr, (name, msg))
    }

    /// Tell the node at `addr` that this node wrote `version` of `vhost`'s topology, and
    /// wait until it routes by that version or a newer one.
    pub async fn announce_topology(
        &self,
        addr: SocketAddr,
        vhost: &str,
        version: u64,
    ) -> Result<(), String> {
        let mut buf = BytesMut::new();
        wire::encode_request(
            &PeerRequest::TopologyChanged {
                vhost: vhost.to_string(),
                version,
            },
            &mut buf,
        );
        let (mut send, mut recv) = self.open_stream(addr).await?;
        send.write_all(&buf)
            .await
            .map_err(|e| format!("peer {addr}: {e}"))?;
        send.finish().map_err(|e| format!("peer {addr}: {e}"))?;
        let mut answer = BytesMut::new();
        loop {
            match wire::decode_event(&mut answer) {
                Ok(Some(PeerEvent::TopologyCurrent)) => return Ok(()),
                Ok(Some(other)) => return Err(format!("peer {addr}: unexpected {other:?}")),
                Ok(None) => {}
                Err(e) => return Err(format!("peer {addr}: {e}")),
            }
            answer.reserve(64);
            match recv.read_buf(&mut answer).await {
                Ok(0) => return Err(format!("peer {addr}: no answer")),
                Ok(_) => {}
                Err(e) => return Err(format!("peer {addr}: {e}")),
            }
        }
    }

    /// A handle to queue `name` owned by the node at `addr`: a proxy task forwarding
    /// commands to it. `id` is the node-unique id of the handle.
    /// The proxy also stops as soon as `view` (this node's membership) drops `owner`.
    #[allow(clippy::too_many_arguments)]
    pub async fn open_proxy(
        &self,
        owner: NodeId,
        addr: SocketAddr,
        view: Option<watch::Receiver<Arc<ClusterView>>>,
        vhost: &str,
        name: &str,
        durable: bool,
        id: u64,
    ) -> Result<QueueHandle, AmqpError> {
        let unavailable = |e: String| AmqpError::internal(format!("queue owner unreachable: {e}"));
        let (send, recv) = tokio::time::timeout(OPEN_TIMEOUT, self.open_stream(addr))
            .await
            .map_err(|_| unavailable(format!("peer {addr}: open timed out")))?
            .map_err(unavailable)?;
        let handle = proxy::open(send, recv, addr, vhost, name, durable, id, owner, view)
            .await
            .map_err(unavailable)?;
        debug!(queue = name, %addr, "forwarding queue to its owner");
        Ok(handle)
    }
}

/// Accept peer connections on `endpoint` and serve their queue sessions until the
/// endpoint closes.
pub async fn serve(node: Weak<Node>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let node = node.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "peer connection failed during handshake");
                    return;
                }
            };
            let addr = conn.remote_address();
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(session::serve_session(node.clone(), send, recv, addr));
            }
        });
    }
}

pub(crate) fn to_wire(m: &Message) -> WireMessage {
    WireMessage {
        exchange: m.exchange.clone(),
        routing_key: m.routing_key.clone(),
        persistent: m.persistent,
        priority: m.priority,
        expiration_ms: m.expiration_ms,
        resent: m.resent,
        properties: m.properties_raw.clone(),
        body: m.body.clone(),
    }
}

pub(super) fn from_wire(m: WireMessage) -> Message {
    Message {
        exchange: m.exchange,
        routing_key: m.routing_key,
        properties_raw: m.properties,
        body: m.body,
        persistent: m.persistent,
        priority: m.priority,
        expiration_ms: m.expiration_ms,
        resent: m.resent,
    }
}

pub(super) fn wire_channel(c: ChannelKey) -> WireChannel {
    WireChannel {
        conn: c.conn,
        channel: c.channel,
        serial: c.serial,
    }
}
