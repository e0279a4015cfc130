//! The proxy: the local stand-in of a queue owned by another compute node. Connections
//! send it the same commands as a local owner; it forwards them over one QUIC bi-stream
//! (a session) and turns the owner's events back into connection events and answers.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use warren_common::NodeId;
use warren_proto::internal::peer::{
    self as wire, PeerEvent, PeerRequest, WireChannel, WireDelivery, WireRefusal,
};

use super::membership::ClusterView;
use super::peer::{MAX_BATCH, OPEN_TIMEOUT, READ_CHUNK, from_wire, to_wire, wire_channel};
use crate::message::Message;
use crate::queue::engine::{ChannelLimiter, ConsumeError, Entry};
use crate::queue::owner::{
    ConfirmTo, DeleteRefused, QUEUE_CHANNEL_CAPACITY, QueueShared, QueueStats,
};
use crate::queue::{ChannelKey, ConnEvent, ConnSink, ConsumerId, Delivery, QueueCmd, QueueHandle};

/// A proxy with nothing depending on it (no consumer, no publish awaiting a confirm, no
/// basic.get that may still be acked) closes its session after this long unused.
const PROXY_IDLE: Duration = Duration::from_secs(60);
/// Events decoded from a stream but not yet handled by its proxy.
const EVENT_QUEUE: usize = 256;

/// Open a session for queue `name` on a fresh stream to the owner at `addr` and start its
/// proxy. The proxy stops as soon as `view` drops `owner`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn open(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    addr: SocketAddr,
    vhost: &str,
    name: &str,
    durable: bool,
    id: u64,
    owner: NodeId,
    view: Option<watch::Receiver<Arc<ClusterView>>>,
) -> Result<QueueHandle, String> {
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
        .map_err(|e| format!("peer {addr}: {e}"))?;
    let (ev_tx, mut ev_rx) = mpsc::channel(EVENT_QUEUE);
    tokio::spawn(read_events(recv, ev_tx, addr));
    match tokio::time::timeout(OPEN_TIMEOUT, ev_rx.recv()).await {
        Ok(Some(PeerEvent::Opened)) => {}
        Ok(Some(PeerEvent::Refused { reason })) => {
            return Err(format!("peer {addr} refused: {reason}"));
        }
        Ok(_) => return Err(format!("peer {addr} closed the session")),
        Err(_) => return Err(format!("peer {addr}: open timed out")),
    }
    let (tx, rx) = mpsc::channel(QUEUE_CHANNEL_CAPACITY);
    let handle = QueueHandle(Arc::new(QueueShared {
        id,
        vhost: vhost.to_string(),
        name: name.to_string(),
        durable,
        log_id: None,
        remote: true,
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
        limits: HashMap::new(),
        last_used: tokio::time::Instant::now(),
    };
    tokio::spawn(proxy.run(rx, ev_rx, owner, view));
    Ok(handle)
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
    /// The channel's limiter, when its deliveries count against the channel-wide prefetch
    /// (acks give credit back).
    counted: Option<Arc<ChannelLimiter>>,
}

/// The channel-wide limit of a channel consuming through a proxy, as the owner last heard it.
struct ForwardedLimit {
    channel: ChannelKey,
    /// The channel's own limiter (basic.qos global changes it).
    limiter: Arc<ChannelLimiter>,
    /// The limit the owner was last sent.
    sent: u32,
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
    /// Channel-wide limits of channels with acking consumers here, by channel serial: the
    /// owner enforces a copy, which changes must reach.
    limits: HashMap<u64, ForwardedLimit>,
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
                let counted = match &spec.limiter {
                    Some(l) if !spec.no_ack => {
                        // Counted even with no limit yet: the owner's copy of the limiter
                        // must hold the channel's deliveries when a limit is set later.
                        self.limits.insert(
                            spec.channel.serial,
                            ForwardedLimit {
                                channel: spec.channel,
                                limiter: l.clone(),
                                sent: global_limit,
                            },
                        );
                        Some(l.clone())
                    }
                    _ => None,
                };
                self.consumers.insert(
                    spec.id.0,
                    ProxyConsumer {
                        channel: spec.channel,
                        tag: spec.tag.clone(),
                        sink,
                        counted,
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
                self.limits.remove(&channel.serial);
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
            QueueCmd::Wake => {
                self.forward_limits();
                PeerRequest::Wake
            }
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

    /// Tell the owner of every channel-wide limit changed since it last heard. A channel
    /// wakes every queue it consumes from when its basic.qos changes the limit, so the
    /// change goes out ahead of that wake, in order with the channel's other commands.
    fn forward_limits(&mut self) {
        for l in self.limits.values_mut() {
            let limit = l.limiter.limit();
            if limit != l.sent {
                l.sent = limit;
                wire::encode_request(
                    &PeerRequest::Qos {
                        channel: wire_channel(l.channel),
                        global_limit: limit,
                    },
                    &mut self.buf,
                );
            }
        }
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
            PeerEvent::Opened | PeerEvent::Refused { .. } | PeerEvent::TopologyCurrent => {
                return Some(false);
            }
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
        // Deliveries given back, with the channel-wide credit each took on the owner.
        let mut orphans: Vec<(WireChannel, u64, u32)> = Vec::new();
        for d in deliveries {
            let Some(c) = self.consumers.get(&d.consumer) else {
                // Cancelled here while the delivery was in flight: give it back. It took
                // credit if its channel's acking consumers are counted.
                if !d.no_ack {
                    let credit = u32::from(self.limits.contains_key(&d.channel.serial));
                    orphans.push((d.channel, d.seq, credit));
                }
                continue;
            };
            if let Some(l) = &c.counted
                && !d.no_ack
            {
                self.counted.insert((c.channel.serial, d.seq));
                // The connection gives this credit back when it is settled, as for a
                // local queue's delivery; until then the channel's local queues count it.
                l.count();
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
                    let credit = self.release(d.channel, &[d.seq]);
                    orphans.push((wire_channel(d.channel), d.seq, credit));
                }
            }
        }
        for (channel, seq, release) in orphans {
            wire::encode_request(
                &PeerRequest::Reject {
                    channel,
                    seqs: vec![seq],
                    requeue: true,
                    release,
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
