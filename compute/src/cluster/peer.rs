//! The internal QUIC transport between compute nodes: operations on a queue owned by
//! another node are forwarded to it, and its deliveries, confirms and answers come back.
//!
//! To a connection, a remote queue looks exactly like a local one: [`Peers::open_proxy`]
//! returns a [`QueueHandle`] whose commands go to a *proxy* task on this node. The proxy
//! speaks one QUIC bi-stream (a *session*, see `warren_proto::internal::peer`) to the
//! owner node, where [`serve`] feeds the real queue owner and stands in for the remote
//! connections (it is the [`ConnSink`] the owner pushes events to).
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

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use warren_common::config::TlsPaths;
use warren_common::{NodeId, tls};
use warren_proto::internal::peer::{
    self as wire, ALPN, PeerEvent, PeerRequest, WireChannel, WireDelivery, WireGot, WireMessage,
    WireRefusal,
};

use super::membership::ClusterView;
use crate::error::AmqpError;
use crate::message::Message;
use crate::node::Node;
use crate::queue::engine::{ChannelLimiter, ConsumeError, Entry};
use crate::queue::owner::{
    ConfirmTo, DeleteRefused, QUEUE_CHANNEL_CAPACITY, QueueShared, QueueStats,
};
use crate::queue::{ChannelKey, ConnEvent, ConnSink, ConsumerId, Delivery, QueueCmd, QueueHandle};

/// How long a proxy waits for a peer to connect and for the owner to accept the queue
/// (which may include taking its log over and replaying it).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long dialing a peer may take before the queue counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A proxy with nothing depending on it (no consumer, no publish awaiting a confirm, no
/// basic.get that may still be acked) closes its session after this long unused.
const PROXY_IDLE: Duration = Duration::from_secs(60);
/// Events decoded from a stream but not yet handled by its proxy.
const EVENT_QUEUE: usize = 256;
/// Commands a proxy encodes into one stream write.
const MAX_BATCH: usize = 512;
/// Bytes read from a stream at a time.
const READ_CHUNK: usize = 64 * 1024;

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
    conns: tokio::sync::Mutex<HashMap<SocketAddr, quinn::Connection>>,
}

impl Peers {
    /// Peers over `endpoint` (which also accepts: see [`serve`]).
    pub fn new(endpoint: quinn::Endpoint) -> Peers {
        Peers {
            endpoint,
            conns: tokio::sync::Mutex::new(HashMap::new()),
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
        let mut conns = self.conns.lock().await;
        if !fresh
            && let Some(c) = conns.get(&addr)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        conns.remove(&addr);
        let connecting = self
            .endpoint
            .connect(addr, tls::CLUSTER_SERVER_NAME)
            .map_err(|e| format!("peer {addr}: {e}"))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("peer {addr}: connect timed out"))?
            .map_err(|e| format!("peer {addr}: {e}"))?;
        conns.insert(addr, conn.clone());
        Ok(conn)
    }

    async fn open_stream(
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
        let (mut send, recv) = tokio::time::timeout(OPEN_TIMEOUT, self.open_stream(addr))
            .await
            .map_err(|_| unavailable(format!("peer {addr}: open timed out")))?
            .map_err(unavailable)?;
        let mut buf = BytesMut::new();
        wire::encode_request(
            &PeerRequest::Open {
                vhost: vhost.to_string(),
                queue: name.to_string(),
            },
            &mut buf,
        );
        send.write_all(&buf)
            .await
            .map_err(|e| unavailable(format!("peer {addr}: {e}")))?;
        let (ev_tx, mut ev_rx) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(read_events(recv, ev_tx, addr));
        match tokio::time::timeout(OPEN_TIMEOUT, ev_rx.recv()).await {
            Ok(Some(PeerEvent::Opened)) => {}
            Ok(Some(PeerEvent::Refused { reason })) => {
                return Err(unavailable(format!("peer {addr} refused: {reason}")));
            }
            Ok(_) => return Err(unavailable(format!("peer {addr} closed the session"))),
            Err(_) => return Err(unavailable(format!("peer {addr}: open timed out"))),
        }
        let (tx, rx) = mpsc::channel(QUEUE_CHANNEL_CAPACITY);
        let handle = QueueHandle(Arc::new(QueueShared {
            id,
            vhost: vhost.to_string(),
            name: name.to_string(),
            durable,
            log_id: None,
            tx,
        }));
        let proxy = Proxy {
            name: name.to_string(),
            handle: handle.clone(),
            send,
            buf: BytesMut::with_capacity(64 * 1024),
            next_req: 1,
            pending: HashMap::new(),
            consumers: HashMap::new(),
            inflight: HashMap::new(),
            counted: HashSet::new(),
            holding: HashSet::new(),
            last_used: tokio::time::Instant::now(),
        };
        debug!(queue = name, %addr, "forwarding queue to its owner");
        tokio::spawn(proxy.run(rx, ev_rx, owner, view));
        Ok(handle)
    }
}

/// Decode a stream's events for its proxy; ends (dropping `tx`) at end of stream or on
/// garbage.
async fn read_events(mut recv: quinn::RecvStream, tx: mpsc::Sender<PeerEvent>, addr: SocketAddr) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        loop {
            match wire::decode_event(&mut buf) {
                Ok(Some(ev)) => {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(peer = %addr, error = %e, "malformed frame from a peer; closing the session");
                    let _ = recv.stop(quinn::VarInt::from_u32(1));
                    return;
                }
            }
        }
        buf.reserve(READ_CHUNK);
        match recv.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn to_wire(m: &Message) -> WireMessage {
    WireMessage {
        exchange: m.exchange.clone(),
        routing_key: m.routing_key.clone(),
        persistent: m.persistent,
        priority: m.priority,
        expiration_ms: m.expiration_ms,
        properties: m.properties_raw.clone(),
        body: m.body.clone(),
    }
}

fn from_wire(m: WireMessage) -> Message {
    Message {
        exchange: m.exchange,
        routing_key: m.routing_key,
        properties_raw: m.properties,
        body: m.body,
        persistent: m.persistent,
        priority: m.priority,
        expiration_ms: m.expiration_ms,
    }
}

fn wire_channel(c: ChannelKey) -> WireChannel {
    WireChannel {
        conn: c.conn,
        channel: c.channel,
        serial: c.serial,
    }
}

enum Pending {
    Consume {
        consumer: u64,
        reply: oneshot::Sender<Result<QueueStats, ConsumeError>>,
    },
    Get(oneshot::Sender<Option<(Entry, u32)>>),
    Purge(oneshot::Sender<u32>),
    Stats(oneshot::Sender<QueueStats>),
    Delete(oneshot::Sender<Result<u32, DeleteRefused>>),
    Cancel(oneshot::Sender<()>),
}

struct ProxyConsumer {
    channel: ChannelKey,
    tag: Arc<str>,
    sink: ConnSink,
    /// Counted against a channel-wide prefetch limit (acks give credit back).
    counted: bool,
}

/// The local stand-in of a remote queue.
struct Proxy {
    name: String,
    handle: QueueHandle,
    send: quinn::SendStream,
    buf: BytesMut,
    next_req: u64,
    pending: HashMap<u64, Pending>,
    consumers: HashMap<u64, ProxyConsumer>,
    /// Publishes waiting for their confirm, by (channel serial, publish seq): handed back
    /// to their connection if the owner goes away first.
    inflight: HashMap<(u64, u64), (Arc<Message>, ConfirmTo)>,
    /// Deliveries counted against a channel-wide limit, by (channel serial, seq).
    counted: HashSet<(u64, u64)>,
    /// Channels holding a basic.get they may still ack (closing the session would requeue
    /// it under them).
    holding: HashSet<u64>,
    /// When the proxy last had something to do.
    last_used: tokio::time::Instant,
}

impl Proxy {
    /// Nothing depends on the session: it can end without anyone noticing.
    fn idle(&self) -> bool {
        self.consumers.is_empty()
            && self.inflight.is_empty()
            && self.pending.is_empty()
            && self.holding.is_empty()
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<QueueCmd>,
        mut events: mpsc::Receiver<PeerEvent>,
        owner: NodeId,
        mut view: Option<watch::Receiver<Arc<ClusterView>>>,
    ) {
        let mut idle = false;
        let deleted = loop {
            let idle_at = self.last_used + PROXY_IDLE;
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(idle_at), if self.idle() => {
                    if !rx.is_empty() {
                        self.last_used = tokio::time::Instant::now();
                        continue;
                    }
                    // A queue no longer used through this node gives its stream back; the
                    // next use opens a new session.
                    debug!(queue = %self.name, "closing an idle session with the queue's owner");
                    idle = true;
                    break false;
                }
                changed = async {
                    match view.as_mut() {
                        Some(v) => v.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let gone = match (&changed, view.as_ref()) {
                        (Ok(()), Some(v)) => !v.borrow().members.contains_key(&owner),
                        _ => false,
                    };
                    if changed.is_err() {
                        view = None;
                    }
                    if gone {
                        // The owner's lease lapsed (or it left): fail over now rather than
                        // at the transport's idle timeout.
                        break false;
                    }
                }
                ev = events.recv() => match ev {
                    Some(ev) => {
                        if let Some(deleted) = self.on_event(ev) {
                            break deleted;
                        }
                    }
                    None => break false,
                },
                cmd = rx.recv() => {
                    // The proxy holds a sender itself, so the channel never closes under it.
                    let Some(cmd) = cmd else { break false };
                    self.last_used = tokio::time::Instant::now();
                    self.on_cmd(cmd);
                    let mut n = 1;
                    while n < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(cmd) => self.on_cmd(cmd),
                            Err(_) => break,
                        }
                        n += 1;
                    }
                    if !self.buf.is_empty() {
                        let out = self.buf.split();
                        if self.send.write_all(&out).await.is_err() {
                            break false;
                        }
                    }
                }
            }
        };
        rx.close();
        let mut dropped = Vec::new();
        while let Ok(cmd) = rx.try_recv() {
            dropped.push(cmd);
        }
        self.stop(deleted, idle, dropped);
    }

    fn req(&mut self, p: Pending) -> u64 {
        let id = self.next_req;
        self.next_req += 1;
        self.pending.insert(id, p);
        id
    }

    fn on_cmd(&mut self, cmd: QueueCmd) {
        let req = match cmd {
            QueueCmd::Publish { msg, confirm } => {
                let (channel, seq) = match &confirm {
                    Some(c) => (wire_channel(c.channel), Some(c.seq)),
                    None => (
                        WireChannel {
                            conn: 0,
                            channel: 0,
                            serial: 0,
                        },
                        None,
                    ),
                };
                let w = PeerRequest::Publish {
                    channel,
                    confirm: seq,
                    msg: to_wire(&msg),
                };
                if let Some(c) = confirm {
                    self.inflight.insert((c.channel.serial, c.seq), (msg, c));
                }
                w
            }
            QueueCmd::Consume { spec, sink, reply } => {
                let global_limit = spec.limiter.as_ref().map_or(0, |l| l.limit());
                self.consumers.insert(
                    spec.id.0,
                    ProxyConsumer {
                        channel: spec.channel,
                        tag: spec.tag.clone(),
                        sink,
                        counted: global_limit > 0 && !spec.no_ack,
                    },
                );
                let req = self.req(Pending::Consume {
                    consumer: spec.id.0,
                    reply,
                });
                PeerRequest::Consume {
                    req,
                    consumer: spec.id.0,
                    channel: wire_channel(spec.channel),
                    tag: spec.tag.to_string(),
                    no_ack: spec.no_ack,
                    exclusive: spec.exclusive,
                    prefetch: spec.prefetch,
                    priority: spec.priority,
                    global_limit,
                }
            }
            QueueCmd::Cancel { id, reply } => {
                self.consumers.remove(&id.0);
                let req = reply.map(|r| self.req(Pending::Cancel(r)));
                PeerRequest::Cancel {
                    req,
                    consumer: id.0,
                }
            }
            QueueCmd::Ack { channel, seqs } => {
                let release = self.release(channel, &seqs);
                PeerRequest::Ack {
                    channel: wire_channel(channel),
                    seqs,
                    release,
                }
            }
            QueueCmd::Reject {
                channel,
                seqs,
                requeue,
            } => {
                let release = self.release(channel, &seqs);
                PeerRequest::Reject {
                    channel: wire_channel(channel),
                    seqs,
                    requeue,
                    release,
                }
            }
            QueueCmd::ChannelClosed { channel } => {
                self.holding.remove(&channel.serial);
                self.counted.retain(|(s, _)| *s != channel.serial);
                self.consumers.retain(|_, c| c.channel != channel);
                PeerRequest::ChannelClosed {
                    channel: wire_channel(channel),
                }
            }
            QueueCmd::Get {
                channel,
                no_ack,
                reply,
            } => {
                if !no_ack {
                    self.holding.insert(channel.serial);
                }
                let req = self.req(Pending::Get(reply));
                PeerRequest::Get {
                    req,
                    channel: wire_channel(channel),
                    no_ack,
                }
            }
            QueueCmd::Purge { reply } => PeerRequest::Purge {
                req: self.req(Pending::Purge(reply)),
            },
            QueueCmd::Stats { reply } => PeerRequest::Stats {
                req: self.req(Pending::Stats(reply)),
            },
            QueueCmd::Delete {
                if_unused,
                if_empty,
                reply,
            } => PeerRequest::Delete {
                req: self.req(Pending::Delete(reply)),
                if_unused,
                if_empty,
            },
            QueueCmd::Wake => PeerRequest::Wake,
            // Only an owner can be superseded or handed off; its own node does that.
            QueueCmd::Superseded => return,
            QueueCmd::HandOff { reply } => {
                let _ = reply.send(false);
                return;
            }
            QueueCmd::Batch(cmds) => {
                for c in cmds {
                    self.on_cmd(c);
                }
                return;
            }
        };
        wire::encode_request(&req, &mut self.buf);
    }

    /// Channel-wide credit given back by settling `seqs`.
    fn release(&mut self, channel: ChannelKey, seqs: &[u64]) -> u32 {
        if self.counted.is_empty() {
            return 0;
        }
        let n = seqs
            .iter()
            .filter(|s| self.counted.remove(&(channel.serial, **s)))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Handle an event; `Some(deleted)` when the session is over.
    fn on_event(&mut self, ev: PeerEvent) -> Option<bool> {
        match ev {
            PeerEvent::Opened | PeerEvent::Refused { .. } => return Some(false),
            PeerEvent::Closed { deleted } => return Some(deleted),
            PeerEvent::Deliver { deliveries } => self.deliver(deliveries),
            PeerEvent::Confirm { channel, seqs, ok } => {
                let mut out: Vec<(ChannelKey, ConnSink, Vec<u64>)> = Vec::new();
                for seq in seqs {
                    let Some((_, c)) = self.inflight.remove(&(channel.serial, seq)) else {
                        continue;
                    };
                    match out.iter_mut().find(|(k, _, _)| *k == c.channel) {
                        Some((_, _, v)) => v.push(c.seq),
                        None => out.push((c.channel, c.sink, vec![c.seq])),
                    }
                }
                for (channel, sink, seqs) in out {
                    let _ = sink.send(ConnEvent::Confirm { channel, seqs, ok });
                }
            }
            PeerEvent::Reroute { channel, seq } => {
                if let Some((msg, confirm)) = self.inflight.remove(&(channel.serial, seq)) {
                    let sink = confirm.sink.clone();
                    let _ = sink.send(ConnEvent::Reroute {
                        queue: self.name.clone(),
                        msg,
                        confirm,
                    });
                }
            }
            PeerEvent::Cancelled { channel, tag } => {
                let id = self
                    .consumers
                    .iter()
                    .find(|(_, c)| c.channel.serial == channel.serial && *c.tag == *tag)
                    .map(|(id, _)| *id);
                if let Some(c) = id.and_then(|id| self.consumers.remove(&id)) {
                    let _ = c.sink.send(ConnEvent::Cancelled {
                        channel: c.channel,
                        tag: c.tag,
                    });
                }
            }
            PeerEvent::ConsumeOk { req, stats } => {
                if let Some(Pending::Consume { consumer, reply }) = self.pending.remove(&req) {
                    let r = match stats {
                        Some((messages, consumers)) => Ok(QueueStats {
                            messages,
                            consumers,
                        }),
                        None => {
                            self.consumers.remove(&consumer);
                            Err(ConsumeError::ExclusiveInUse)
                        }
                    };
                    let _ = reply.send(r);
                }
            }
            PeerEvent::GetOk { req, got } => {
                if let Some(Pending::Get(reply)) = self.pending.remove(&req) {
                    let _ = reply.send(got.map(|g| {
                        (
                            Entry {
                                seq: g.seq,
                                msg: Arc::new(from_wire(g.msg)),
                                redelivered: g.redelivered,
                                durable: false,
                                expires_at: None,
                                rank: 0,
                            },
                            g.remaining,
                        )
                    }));
                }
            }
            PeerEvent::Purged { req, count } => {
                if let Some(Pending::Purge(reply)) = self.pending.remove(&req) {
                    let _ = reply.send(count);
                }
            }
            PeerEvent::StatsOk {
                req,
                messages,
                consumers,
            } => {
                if let Some(Pending::Stats(reply)) = self.pending.remove(&req) {
                    let _ = reply.send(QueueStats {
                        messages,
                        consumers,
                    });
                }
            }
            PeerEvent::Deleted { req, result } => {
                if let Some(Pending::Delete(reply)) = self.pending.remove(&req) {
                    let _ = reply.send(result.map_err(|r| match r {
                        WireRefusal::InUse => DeleteRefused::InUse,
                        WireRefusal::NotEmpty => DeleteRefused::NotEmpty,
                    }));
                }
            }
            PeerEvent::CancelOk { req } => {
                if let Some(Pending::Cancel(reply)) = self.pending.remove(&req) {
                    let _ = reply.send(());
                }
            }
        }
        None
    }

    fn deliver(&mut self, deliveries: Vec<WireDelivery>) {
        let mut by_conn: Vec<(u64, ConnSink, Vec<Delivery>)> = Vec::new();
        let mut orphans: Vec<(WireChannel, u64)> = Vec::new();
        for d in deliveries {
            let Some(c) = self.consumers.get(&d.consumer) else {
                // Cancelled here while the delivery was in flight: give it back.
                if !d.no_ack {
                    orphans.push((d.channel, d.seq));
                }
                continue;
            };
            if c.counted && !d.no_ack {
                self.counted.insert((c.channel.serial, d.seq));
            }
            let delivery = Delivery {
                consumer: ConsumerId(d.consumer),
                channel: c.channel,
                tag: c.tag.clone(),
                seq: d.seq,
                msg: Arc::new(from_wire(d.msg)),
                redelivered: d.redelivered,
                no_ack: d.no_ack,
            };
            match by_conn.iter_mut().find(|(k, _, _)| *k == c.channel.conn) {
                Some((_, _, v)) => v.push(delivery),
                None => by_conn.push((c.channel.conn, c.sink.clone(), vec![delivery])),
            }
        }
        for (_, sink, deliveries) in by_conn {
            let ev = ConnEvent::Deliver {
                queue: self.handle.clone(),
                deliveries,
            };
            if let Err(mpsc::error::SendError(ConnEvent::Deliver { deliveries, .. })) =
                sink.send(ev)
            {
                // The connection is gone: the owner takes the messages back.
                for d in deliveries.into_iter().filter(|d| !d.no_ack) {
                    orphans.push((wire_channel(d.channel), d.seq));
                }
            }
        }
        for (channel, seq) in orphans {
            wire::encode_request(
                &PeerRequest::Reject {
                    channel,
                    seqs: vec![seq],
                    requeue: true,
                    release: 0,
                },
                &mut self.buf,
            );
        }
    }

    /// The session is over: publishes waiting for a confirm go back to their connections
    /// (confirmed if the queue was deleted, as RabbitMQ does), consumers are cancelled.
    fn stop(mut self, deleted: bool, idle: bool, dropped: Vec<QueueCmd>) {
        let name = self.name.clone();
        for cmd in dropped {
            hand_back(cmd, deleted, &name);
        }
        for (_, (msg, confirm)) in self.inflight.drain() {
            if deleted {
                let _ = confirm.sink.send(ConnEvent::Confirm {
                    channel: confirm.channel,
                    seqs: vec![confirm.seq],
                    ok: true,
                });
            } else {
                let sink = confirm.sink.clone();
                let _ = sink.send(ConnEvent::Reroute {
                    queue: name.clone(),
                    msg,
                    confirm,
                });
            }
        }
        for (_, c) in self.consumers.drain() {
            let _ = c.sink.send(ConnEvent::Cancelled {
                channel: c.channel,
                tag: c.tag,
            });
        }
        let _ = self.send.finish();
        if !deleted && !idle {
            info!(queue = %name, "session with the queue's owner ended; its clients fail over");
        }
    }
}

/// A command a stopped proxy will never forward: its publish goes back to the connection.
fn hand_back(cmd: QueueCmd, deleted: bool, queue: &str) {
    match cmd {
        QueueCmd::Publish {
            msg,
            confirm: Some(c),
        } => {
            if deleted {
                let _ = c.sink.send(ConnEvent::Confirm {
                    channel: c.channel,
                    seqs: vec![c.seq],
                    ok: true,
                });
            } else {
                let sink = c.sink.clone();
                let _ = sink.send(ConnEvent::Reroute {
                    queue: queue.to_string(),
                    msg,
                    confirm: c,
                });
            }
        }
        QueueCmd::Batch(cmds) => {
            for c in cmds {
                hand_back(c, deleted, queue);
            }
        }
        _ => {}
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
                tokio::spawn(serve_session(node.clone(), send, recv, addr));
            }
        });
    }
}

/// What a session's reader tells its writer.
#[derive(Default)]
struct SessionFlags {
    /// The queue was deleted through this session.
    deleted: AtomicBool,
    /// Requests whose answer has not been queued for the writer yet.
    outstanding: AtomicUsize,
}

/// Per-session translation between the proxy's ids and the owner's.
#[derive(Default)]
struct SessionMaps {
    /// Owner-side consumer id -> the proxy's.
    consumers: HashMap<u64, u64>,
    /// The proxy's consumer id -> owner-side.
    by_remote: HashMap<u64, u64>,
    /// Channels that consumed or got messages (closed when the session ends).
    channels: HashMap<u64, ChannelKey>,
    /// Channel-wide prefetch limits, by channel serial.
    limiters: HashMap<u64, Arc<ChannelLimiter>>,
}

fn lock(m: &Mutex<SessionMaps>) -> std::sync::MutexGuard<'_, SessionMaps> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read the Open frame of a session.
async fn read_open(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
) -> Result<(String, String), String> {
    loop {
        match wire::decode_request(buf) {
            Ok(Some(PeerRequest::Open { vhost, queue })) => return Ok((vhost, queue)),
            Ok(Some(other)) => return Err(format!("expected Open, got {other:?}")),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        buf.reserve(READ_CHUNK);
        match recv.read_buf(buf).await {
            Ok(0) => return Err("stream ended before Open".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

async fn write_event(send: &mut quinn::SendStream, ev: &PeerEvent) -> bool {
    let mut buf = BytesMut::new();
    wire::encode_event(ev, &mut buf);
    send.write_all(&buf).await.is_ok()
}

/// Serve one queue session: feed the queue's owner on this node with the peer's requests,
/// and send its events back.
async fn serve_session(
    node: Weak<Node>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: SocketAddr,
) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let opened = tokio::time::timeout(OPEN_TIMEOUT, read_open(&mut recv, &mut buf)).await;
    let (vhost, queue) = match opened {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "bad session opening from a peer; closing the stream");
            let _ = recv.stop(quinn::VarInt::from_u32(1));
            return;
        }
        Err(_) => return,
    };
    let Some(n) = node.upgrade() else {
        return;
    };
    let handle = match n.open_for_peer(&vhost, &queue).await {
        Ok(h) => h,
        Err(reason) => {
            debug!(%peer, queue, reason, "refusing a queue session");
            let _ = write_event(&mut send, &PeerEvent::Refused { reason }).await;
            let _ = send.finish();
            return;
        }
    };
    if !write_event(&mut send, &PeerEvent::Opened).await {
        return;
    }
    let conn_id = n.next_id();
    drop(n);
    let maps = Arc::new(Mutex::new(SessionMaps::default()));
    let (sink, sink_rx) = mpsc::unbounded_channel::<ConnEvent>();
    let (reply_tx, reply_rx) = mpsc::unbounded_channel::<PeerEvent>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let flags = Arc::new(SessionFlags::default());
    tokio::spawn(write_session(
        send,
        sink_rx,
        reply_rx,
        done_rx,
        maps.clone(),
        handle.clone(),
        flags.clone(),
    ));
    let mut session = Session {
        node,
        conn_id,
        sink,
        replies: reply_tx,
        maps: maps.clone(),
        flags,
    };
    'read: loop {
        let mut cmds = Vec::new();
        loop {
            match wire::decode_request(&mut buf) {
                Ok(Some(req)) => session.on_request(req, &mut cmds),
                Ok(None) => break,
                Err(e) => {
                    warn!(%peer, queue, error = %e, "malformed frame from a peer; closing its session");
                    let _ = recv.stop(quinn::VarInt::from_u32(1));
                    break 'read;
                }
            }
        }
        if !cmds.is_empty() {
            let cmd = if cmds.len() == 1 {
                cmds.pop().unwrap_or(QueueCmd::Wake)
            } else {
                QueueCmd::Batch(cmds)
            };
            if !handle.send(cmd).await {
                break;
            }
        }
        buf.reserve(READ_CHUNK);
        match recv.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    // The proxy is gone: its channels' deliveries go back to the queue.
    let channels: Vec<ChannelKey> = lock(&maps).channels.drain().map(|(_, k)| k).collect();
    if !channels.is_empty() {
        let cmds = channels
            .into_iter()
            .map(|channel| QueueCmd::ChannelClosed { channel })
            .collect();
        handle.send(QueueCmd::Batch(cmds)).await;
    }
    let _ = done_tx.send(());
}

/// The owner side of one session.
struct Session {
    node: Weak<Node>,
    conn_id: u64,
    sink: ConnSink,
    replies: mpsc::UnboundedSender<PeerEvent>,
    maps: Arc<Mutex<SessionMaps>>,
    flags: Arc<SessionFlags>,
}

impl Session {
    fn key(&self, c: WireChannel) -> ChannelKey {
        // One connection id per session on this node; (channel, serial) is unique on the
        // proxy's node, so channels of different remote connections stay apart.
        ChannelKey {
            conn: self.conn_id,
            channel: c.channel,
            serial: c.serial,
        }
    }

    /// Answer a request once the owner replies, without holding up the stream.
    fn answer<T: Send + 'static>(
        &self,
        rx: oneshot::Receiver<T>,
        f: impl FnOnce(T) -> PeerEvent + Send + 'static,
    ) {
        let replies = self.replies.clone();
        let flags = self.flags.clone();
        flags.outstanding.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            if let Ok(v) = rx.await {
                let _ = replies.send(f(v));
            }
            flags.outstanding.fetch_sub(1, Ordering::AcqRel);
        });
    }

    fn credit_back(&self, channel: WireChannel, release: u32, cmds: &mut Vec<QueueCmd>) {
        if release == 0 {
            return;
        }
        let limiter = lock(&self.maps).limiters.get(&channel.serial).cloned();
        if let Some(l) = limiter
            && l.release(release)
        {
            cmds.push(QueueCmd::Wake);
        }
    }

    fn on_request(&mut self, req: PeerRequest, cmds: &mut Vec<QueueCmd>) {
        match req {
            // A second Open on a stream: ignore (sessions are per queue).
            PeerRequest::Open { .. } => {}
            PeerRequest::Publish {
                channel,
                confirm,
                msg,
            } => cmds.push(QueueCmd::Publish {
                msg: Arc::new(from_wire(msg)),
                confirm: confirm.map(|seq| ConfirmTo {
                    sink: self.sink.clone(),
                    channel: self.key(channel),
                    seq,
                }),
            }),
            PeerRequest::Consume {
                req,
                consumer,
                channel,
                tag,
                no_ack,
                exclusive,
                prefetch,
                priority,
                global_limit,
            } => {
                let Some(node) = self.node.upgrade() else {
                    return;
                };
                let local = node.next_id();
                let key = self.key(channel);
                let limiter = {
                    let mut m = lock(&self.maps);
                    m.consumers.insert(local, consumer);
                    m.by_remote.insert(consumer, local);
                    m.channels.insert(channel.serial, key);
                    (global_limit > 0 && !no_ack).then(|| {
                        let l = m.limiters.entry(channel.serial).or_default().clone();
                        l.set_limit(global_limit);
                        l
                    })
                };
                let (tx, rx) = oneshot::channel();
                cmds.push(QueueCmd::Consume {
                    spec: crate::queue::ConsumerSpec {
                        id: ConsumerId(local),
                        channel: key,
                        tag: Arc::from(tag.as_str()),
                        no_ack,
                        exclusive,
                        prefetch,
                        priority,
                        limiter,
                    },
                    sink: self.sink.clone(),
                    reply: tx,
                });
                let maps = self.maps.clone();
                self.answer(rx, move |r| {
                    let stats = match r {
                        Ok(s) => Some((s.messages, s.consumers)),
                        Err(_) => {
                            let mut m = lock(&maps);
                            m.consumers.remove(&local);
                            m.by_remote.remove(&consumer);
                            None
                        }
                    };
                    PeerEvent::ConsumeOk { req, stats }
                });
            }
            PeerRequest::Cancel { req, consumer } => {
                let local = {
                    let mut m = lock(&self.maps);
                    let local = m.by_remote.remove(&consumer);
                    if let Some(l) = local {
                        m.consumers.remove(&l);
                    }
                    local
                };
                let Some(local) = local else {
                    if let Some(req) = req {
                        let _ = self.replies.send(PeerEvent::CancelOk { req });
                    }
                    return;
                };
                let reply = req.map(|req| {
                    let (tx, rx) = oneshot::channel();
                    self.answer(rx, move |()| PeerEvent::CancelOk { req });
                    tx
                });
                cmds.push(QueueCmd::Cancel {
                    id: ConsumerId(local),
                    reply,
                });
            }
            PeerRequest::Ack {
                channel,
                seqs,
                release,
            } => {
                cmds.push(QueueCmd::Ack {
                    channel: self.key(channel),
                    seqs,
                });
                self.credit_back(channel, release, cmds);
            }
            PeerRequest::Reject {
                channel,
                seqs,
                requeue,
                release,
            } => {
                cmds.push(QueueCmd::Reject {
                    channel: self.key(channel),
                    seqs,
                    requeue,
                });
                self.credit_back(channel, release, cmds);
            }
            PeerRequest::ChannelClosed { channel } => {
                {
                    let mut m = lock(&self.maps);
                    m.channels.remove(&channel.serial);
                    m.limiters.remove(&channel.serial);
                }
                cmds.push(QueueCmd::ChannelClosed {
                    channel: self.key(channel),
                });
            }
            PeerRequest::Get {
                req,
                channel,
                no_ack,
            } => {
                let key = self.key(channel);
                lock(&self.maps).channels.insert(channel.serial, key);
                let (tx, rx) = oneshot::channel();
                cmds.push(QueueCmd::Get {
                    channel: key,
                    no_ack,
                    reply: tx,
                });
                self.answer(rx, move |got| PeerEvent::GetOk {
                    req,
                    got: got.map(|(e, remaining)| WireGot {
                        seq: e.seq,
                        redelivered: e.redelivered,
                        remaining,
                        msg: to_wire(&e.msg),
                    }),
                });
            }
            PeerRequest::Purge { req } => {
                let (tx, rx) = oneshot::channel();
                cmds.push(QueueCmd::Purge { reply: tx });
                self.answer(rx, move |count| PeerEvent::Purged { req, count });
            }
            PeerRequest::Stats { req } => {
                let (tx, rx) = oneshot::channel();
                cmds.push(QueueCmd::Stats { reply: tx });
                self.answer(rx, move |s: QueueStats| PeerEvent::StatsOk {
                    req,
                    messages: s.messages,
                    consumers: s.consumers,
                });
            }
            PeerRequest::Delete {
                req,
                if_unused,
                if_empty,
            } => {
                let (tx, rx) = oneshot::channel();
                cmds.push(QueueCmd::Delete {
                    if_unused,
                    if_empty,
                    reply: tx,
                });
                let flags = self.flags.clone();
                self.answer(rx, move |r| {
                    if r.is_ok() {
                        flags.deleted.store(true, Ordering::Release);
                    }
                    PeerEvent::Deleted {
                        req,
                        result: r.map_err(|e| match e {
                            DeleteRefused::InUse => WireRefusal::InUse,
                            DeleteRefused::NotEmpty => WireRefusal::NotEmpty,
                        }),
                    }
                });
            }
            PeerRequest::Wake => cmds.push(QueueCmd::Wake),
        }
    }
}

/// Send a session's events to its proxy: the owner's events (translated back to the
/// proxy's ids) and answers to requests.
async fn write_session(
    mut send: quinn::SendStream,
    mut events: mpsc::UnboundedReceiver<ConnEvent>,
    mut replies: mpsc::UnboundedReceiver<PeerEvent>,
    mut done: oneshot::Receiver<()>,
    maps: Arc<Mutex<SessionMaps>>,
    handle: QueueHandle,
    flags: Arc<SessionFlags>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        tokio::select! {
            biased;
            r = replies.recv() => {
                if let Some(r) = r {
                    wire::encode_event(&r, &mut buf);
                }
            }
            ev = events.recv() => {
                // The session holds a sender, so this never ends while it runs.
                let Some(ev) = ev else { break };
                encode_conn_event(ev, &maps, &mut buf);
                let mut n = 1;
                while n < MAX_BATCH {
                    match events.try_recv() {
                        Ok(ev) => encode_conn_event(ev, &maps, &mut buf),
                        Err(_) => break,
                    }
                    n += 1;
                }
            }
            () = handle.0.tx.closed() => {
                // Let the owner's last events and answers (cancellations, delete-ok)
                // through before saying the session is over. A stopped owner has answered
                // or dropped every request, so this wait is short; it is bounded anyway.
                let until = tokio::time::Instant::now() + Duration::from_secs(1);
                while flags.outstanding.load(Ordering::Acquire) > 0
                    && tokio::time::Instant::now() < until
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                while let Ok(r) = replies.try_recv() {
                    wire::encode_event(&r, &mut buf);
                }
                while let Ok(ev) = events.try_recv() {
                    encode_conn_event(ev, &maps, &mut buf);
                }
                wire::encode_event(
                    &PeerEvent::Closed {
                        deleted: flags.deleted.load(Ordering::Acquire),
                    },
                    &mut buf,
                );
                let _ = send.write_all(&buf).await;
                break;
            }
            _ = &mut done => break,
        }
        if !buf.is_empty() {
            let out = buf.split();
            if send.write_all(&out).await.is_err() {
                break;
            }
        }
    }
    let _ = send.finish();
}

fn encode_conn_event(ev: ConnEvent, maps: &Mutex<SessionMaps>, buf: &mut BytesMut) {
    let w = |c: ChannelKey| WireChannel {
        conn: 0,
        channel: c.channel,
        serial: c.serial,
    };
    let ev = match ev {
        ConnEvent::Deliver { deliveries, .. } => {
            let m = lock(maps);
            PeerEvent::Deliver {
                deliveries: deliveries
                    .into_iter()
                    .map(|d| WireDelivery {
                        channel: w(d.channel),
                        consumer: m.consumers.get(&d.consumer.0).copied().unwrap_or(u64::MAX),
                        tag: d.tag.to_string(),
                        seq: d.seq,
                        redelivered: d.redelivered,
                        no_ack: d.no_ack,
                        msg: to_wire(&d.msg),
                    })
                    .collect(),
            }
        }
        ConnEvent::Confirm { channel, seqs, ok } => PeerEvent::Confirm {
            channel: w(channel),
            seqs,
            ok,
        },
        ConnEvent::Reroute { confirm, .. } => PeerEvent::Reroute {
            channel: w(confirm.channel),
            seq: confirm.seq,
        },
        ConnEvent::Cancelled { channel, tag } => PeerEvent::Cancelled {
            channel: w(channel),
            tag: tag.to_string(),
        },
        // Direct reply-to never crosses nodes (its consumer lives where it was declared).
        ConnEvent::DirectReply { .. } => return,
    };
    wire::encode_event(&ev, buf);
}
