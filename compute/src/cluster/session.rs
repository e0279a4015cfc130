//! The owner side of a session: a peer's proxy feeds the queue owner on this node through
//! it, and it stands in for the peer's connections as the sink of the owner's events.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};
use warren_proto::internal::peer::{
    self as wire, PeerEvent, PeerRequest, WireChannel, WireDelivery, WireGot, WireRefusal,
};

use super::peer::{MAX_BATCH, OPEN_TIMEOUT, READ_CHUNK, from_wire, to_wire};
use crate::node::Node;
use crate::queue::engine::ChannelLimiter;
use crate::queue::owner::{ConfirmTo, DeleteRefused, QueueStats};
use crate::queue::{ChannelKey, ConnEvent, ConnSink, ConsumerId, QueueCmd, QueueHandle};

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

/// What a stream is for, from its first frame.
enum First {
    /// A queue session: vhost and queue.
    Open(String, String),
    /// A reply stream, by its first reply to a direct reply-to consumer on this node: its
    /// name and the message.
    DirectReply(String, wire::WireMessage),
    /// Another node wrote this version of a vhost's topology.
    TopologyChanged(String, u64),
}

/// Read the first frame of a stream.
async fn read_open(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> Result<First, String> {
    loop {
        match wire::decode_request(buf) {
            Ok(Some(PeerRequest::Open { vhost, queue })) => return Ok(First::Open(vhost, queue)),
            Ok(Some(PeerRequest::DirectReply { name, msg })) => {
                return Ok(First::DirectReply(name, msg));
            }
            Ok(Some(PeerRequest::TopologyChanged { vhost, version })) => {
                return Ok(First::TopologyChanged(vhost, version));
            }
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

/// Hand each reply of a reply stream, in stream order, to its consumer if it is still
/// here, else drop it (as RabbitMQ drops a reply to a consumer that is gone).
async fn serve_replies(
    node: Weak<Node>,
    mut recv: quinn::RecvStream,
    mut buf: BytesMut,
    peer: SocketAddr,
    name: String,
    msg: wire::WireMessage,
) {
    if !deliver_reply(&node, peer, &name, msg) {
        return;
    }
    loop {
        loop {
            match wire::decode_request(&mut buf) {
                Ok(Some(PeerRequest::DirectReply { name, msg })) => {
                    if !deliver_reply(&node, peer, &name, msg) {
                        return;
                    }
                }
                Ok(None) => break,
                Ok(Some(other)) => {
                    warn!(%peer, request = ?other, "a reply stream from a peer carried something else; closing it");
                    let _ = recv.stop(quinn::VarInt::from_u32(1));
                    return;
                }
                Err(e) => {
                    warn!(%peer, error = %e, "malformed frame from a peer; closing its reply stream");
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

/// Hand one reply to its consumer; false once the node is gone.
fn deliver_reply(node: &Weak<Node>, peer: SocketAddr, name: &str, msg: wire::WireMessage) -> bool {
    let Some(n) = node.upgrade() else {
        return false;
    };
    if !n.deliver_direct_reply(name, Arc::new(from_wire(msg))) {
        debug!(%peer, name, "direct reply from a peer for no consumer; dropped");
    }
    true
}

async fn write_event(send: &mut quinn::SendStream, ev: &PeerEvent) -> bool {
    let mut buf = BytesMut::new();
    wire::encode_event(ev, &mut buf);
    send.write_all(&buf).await.is_ok()
}

/// Serve one queue session: feed the queue's owner on this node with the peer's requests,
/// and send its events back.
pub(super) async fn serve_session(
    node: Weak<Node>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: SocketAddr,
) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let opened = tokio::time::timeout(OPEN_TIMEOUT, read_open(&mut recv, &mut buf)).await;
    let (vhost, queue) = match opened {
        Ok(Ok(First::Open(vhost, queue))) => (vhost, queue),
        Ok(Ok(First::DirectReply(name, msg))) => {
            // Nothing goes back on a reply stream.
            let _ = send.finish();
            serve_replies(node, recv, buf, peer, name, msg).await;
            return;
        }
        Ok(Ok(First::TopologyChanged(vhost, version))) => {
            // Answered once this node routes by that version (or a newer one), so the
            // sender's client, told declare-ok or bind-ok, finds it here too.
            if let Some(n) = node.upgrade() {
                match n.topology.catch_up(&vhost, version).await {
                    Ok(()) => {
                        let _ = write_event(&mut send, &PeerEvent::TopologyCurrent).await;
                    }
                    Err(e) => {
                        debug!(%peer, vhost, error = %e, "could not catch up with a topology change")
                    }
                }
            }
            let _ = send.finish();
            return;
        }
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
                    // Every acking consumer counts against its channel's limiter, even
                    // with no limit yet, so that a limit a later `Qos` sets counts what
                    // the channel already holds (as the channel's own limiter does).
                    (!no_ack).then(|| {
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
            PeerRequest::Qos {
                channel,
                global_limit,
            } => {
                // A channel with no acking consumer here has no limiter yet; its next
                // consume brings the limit along.
                let limiter = lock(&self.maps).limiters.get(&channel.serial).cloned();
                if let Some(l) = limiter {
                    let old = l.limit();
                    l.set_limit(global_limit);
                    // Raised or lifted: consumers the old limit held back may take more.
                    if old != 0 && (global_limit == 0 || global_limit > old) {
                        cmds.push(QueueCmd::Wake);
                    }
                }
            }
            // Only valid as the first frame of a stream of its own: ignore, like a second Open.
            PeerRequest::DirectReply { .. } | PeerRequest::TopologyChanged { .. } => {}
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
