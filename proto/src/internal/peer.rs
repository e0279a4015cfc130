//! Compute-to-compute frames: operations on a queue forwarded from the node a client is
//! connected to (the *proxy*) to the node that owns the queue (the *owner*), and the
//! owner's events coming back.
//!
//! One QUIC bi-stream carries one queue *session*: the proxy opens it with
//! [`PeerRequest::Open`], then sends requests; the owner answers with [`PeerEvent`]s.
//! Replies to requests that expect one (consume, get, purge, stats, delete, cancel) echo
//! the request id chosen by the proxy. Both sides process a stream's frames in order.
//! Replies to direct reply-to names homed on another node travel on a *reply stream*: a
//! stream whose every frame is a [`PeerRequest::DirectReply`] (its first one instead of
//! [`PeerRequest::Open`]); the home node hands them on in stream order, and nothing comes
//! back. A node that changed a vhost's topology tells every other node on a short-lived
//! stream of its own ([`PeerRequest::TopologyChanged`], answered by [`PeerEvent::TopologyCurrent`]
//! once the receiver's snapshot is at least that new).
//!
//! Frame: `u32 length` (of everything after it) `| u8 kind | body`, integers big-endian,
//! strings as `u16 length | UTF-8`, byte strings as `u32 length | bytes`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest frame either side accepts (the largest AMQP message plus room for its
/// envelope); bigger lengths are a protocol error, checked before anything is allocated.
pub const MAX_FRAME: usize = 512 * 1024 * 1024 + 64 * 1024;

/// ALPN protocol id of the compute-to-compute transport.
pub const ALPN: &[u8] = b"warren-peer/1";

/// One channel of a client connection on the proxy node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WireChannel {
    /// Connection id on the proxy node.
    pub conn: u64,
    /// AMQP channel number.
    pub channel: u16,
    /// Serial of this channel.open on the proxy node.
    pub serial: u64,
}

/// A message as it travels between compute nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireMessage {
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// delivery_mode == 2.
    pub persistent: bool,
    /// The priority property.
    pub priority: Option<u8>,
    /// The expiration property, in milliseconds.
    pub expiration_ms: Option<u64>,
    /// A resend after the queue's owner was lost: delivered flagged redelivered.
    pub resent: bool,
    /// The content header's property bytes, verbatim.
    pub properties: Bytes,
    /// The body.
    pub body: Bytes,
}

/// A delivery to a consumer on the proxy node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireDelivery {
    /// The consumer's channel.
    pub channel: WireChannel,
    /// The consumer id the proxy gave in [`PeerRequest::Consume`].
    pub consumer: u64,
    /// The consumer tag.
    pub tag: String,
    /// The message's position in its queue.
    pub seq: u64,
    /// The redelivered flag.
    pub redelivered: bool,
    /// Settled on send.
    pub no_ack: bool,
    /// The message.
    pub msg: WireMessage,
}

/// A message returned by basic.get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireGot {
    /// Its position.
    pub seq: u64,
    /// The redelivered flag.
    pub redelivered: bool,
    /// Ready messages left after it.
    pub remaining: u32,
    /// The message.
    pub msg: WireMessage,
}

/// A request from a proxy to a queue's owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerRequest {
    /// First frame of a stream: the queue this session is about.
    Open {
        /// The vhost.
        vhost: String,
        /// The queue.
        queue: String,
    },
    /// Enqueue a message; confirm `confirm` to the channel once stored.
    Publish {
        /// The publishing channel.
        channel: WireChannel,
        /// The publish sequence number to confirm, if the channel is in confirm mode.
        confirm: Option<u64>,
        /// The message.
        msg: WireMessage,
    },
    /// Attach a consumer.
    Consume {
        /// Request id.
        req: u64,
        /// The consumer id (proxy-chosen; deliveries name it).
        consumer: u64,
        /// Its channel.
        channel: WireChannel,
        /// The consumer tag.
        tag: String,
        /// Deliveries are settled on send.
        no_ack: bool,
        /// Only consumer of the queue.
        exclusive: bool,
        /// Per-consumer prefetch (0 = unlimited).
        prefetch: u16,
        /// `x-priority`.
        priority: i32,
        /// The channel-wide prefetch limit (0 = none).
        global_limit: u32,
    },
    /// Detach a consumer.
    Cancel {
        /// Request id, if the proxy waits for the answer.
        req: Option<u64>,
        /// The consumer id.
        consumer: u64,
    },
    /// Settle deliveries.
    Ack {
        /// The channel that received them.
        channel: WireChannel,
        /// Their positions.
        seqs: Vec<u64>,
        /// Channel-wide prefetch credit they give back.
        release: u32,
    },
    /// Reject deliveries.
    Reject {
        /// The channel that received them.
        channel: WireChannel,
        /// Their positions.
        seqs: Vec<u64>,
        /// Put them back instead of dropping them.
        requeue: bool,
        /// Channel-wide prefetch credit they give back.
        release: u32,
    },
    /// A channel closed: requeue its deliveries and drop its consumers.
    ChannelClosed {
        /// The channel.
        channel: WireChannel,
    },
    /// basic.get.
    Get {
        /// Request id.
        req: u64,
        /// The channel asking.
        channel: WireChannel,
        /// Settle on send.
        no_ack: bool,
    },
    /// queue.purge.
    Purge {
        /// Request id.
        req: u64,
    },
    /// Counts for queue.declare-ok.
    Stats {
        /// Request id.
        req: u64,
    },
    /// queue.delete.
    Delete {
        /// Request id.
        req: u64,
        /// Refuse if it has consumers.
        if_unused: bool,
        /// Refuse if it has ready messages.
        if_empty: bool,
    },
    /// Try to deliver (credit came back).
    Wake,
    /// The channel-wide prefetch limit (`basic.qos` global) of a channel with consumers in
    /// this session changed after they consumed. Sent before the [`PeerRequest::Wake`]
    /// that lets a raised limit deliver.
    Qos {
        /// The channel.
        channel: WireChannel,
        /// The new limit (0 = none).
        global_limit: u32,
    },
    /// A reply to a direct reply-to name whose consumer is on the receiving node. Only on a
    /// reply stream, whose first frame it is (instead of [`PeerRequest::Open`]); nothing is
    /// answered, and a reply nobody consumes is dropped.
    DirectReply {
        /// The reply name (`amq.rabbitmq.reply-to.<node>.<random>`).
        name: String,
        /// The message.
        msg: WireMessage,
    },
    /// The sender wrote version `version` of a vhost's topology register. Sent as the only
    /// frame of a stream of its own; answered with [`PeerEvent::TopologyCurrent`].
    TopologyChanged {
        /// The vhost.
        vhost: String,
        /// The register version written.
        version: u64,
    },
}

/// Why queue.delete was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireRefusal {
    /// The queue has consumers.
    InUse = 1,
    /// The queue has ready messages.
    NotEmpty = 2,
}

/// An event from a queue's owner to a proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// The owner serves this session.
    Opened,
    /// The owner will not serve this queue (not its owner, or unknown): the stream ends.
    Refused {
        /// Why.
        reason: String,
    },
    /// Messages for consumers on the proxy node.
    Deliver {
        /// The deliveries, in order.
        deliveries: Vec<WireDelivery>,
    },
    /// Publishes settled: `ok` false means nack.
    Confirm {
        /// The publishing channel.
        channel: WireChannel,
        /// Publish sequence numbers.
        seqs: Vec<u64>,
        /// Stored.
        ok: bool,
    },
    /// A publish the owner accepted but could not store: the proxy hands it on.
    Reroute {
        /// The publishing channel.
        channel: WireChannel,
        /// Its publish sequence number.
        seq: u64,
    },
    /// A consumer was cancelled by the queue.
    Cancelled {
        /// The consumer's channel.
        channel: WireChannel,
        /// Its tag.
        tag: String,
    },
    /// Answer to [`PeerRequest::Consume`]: counts, or `None` if exclusive use refused it.
    ConsumeOk {
        /// Request id.
        req: u64,
        /// Ready messages and consumers, or `None` when refused.
        stats: Option<(u32, u32)>,
    },
    /// Answer to [`PeerRequest::Get`].
    GetOk {
        /// Request id.
        req: u64,
        /// The message, if the queue had one.
        got: Option<WireGot>,
    },
    /// Answer to [`PeerRequest::Purge`]: messages dropped.
    Purged {
        /// Request id.
        req: u64,
        /// How many.
        count: u32,
    },
    /// Answer to [`PeerRequest::Stats`].
    StatsOk {
        /// Request id.
        req: u64,
        /// Ready messages.
        messages: u32,
        /// Consumers.
        consumers: u32,
    },
    /// Answer to [`PeerRequest::Delete`].
    Deleted {
        /// Request id.
        req: u64,
        /// Ready count at deletion, or why it was refused.
        result: Result<u32, WireRefusal>,
    },
    /// Answer to [`PeerRequest::Cancel`].
    CancelOk {
        /// Request id.
        req: u64,
    },
    /// Answer to [`PeerRequest::TopologyChanged`]: this node now routes by that version or
    /// a newer one.
    TopologyCurrent,
    /// The owner stopped serving the queue; the stream ends.
    Closed {
        /// The queue was deleted (rather than moving to another owner).
        deleted: bool,
    },
}

/// A frame that cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the maximum")]
    TooLarge(usize),
    /// The frame kind is unknown.
    #[error("unknown frame kind {0:#x}")]
    UnknownKind(u8),
    /// The frame ends before its fields do, or has bytes left over.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

const NONE: u64 = u64::MAX;

fn begin(buf: &mut BytesMut, kind: u8) -> usize {
    let at = buf.len();
    buf.put_u32(0);
    buf.put_u8(kind);
    at
}

fn finish(buf: &mut BytesMut, at: usize) {
    // Frames are bounded by MAX_FRAME, which fits in u32.
    let len = u32::try_from(buf.len() - at - 4).unwrap_or(u32::MAX);
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_str(buf: &mut BytesMut, s: &str) {
    // Every string carried here is an AMQP short string (at most 255 bytes) or a vhost
    // or queue name; longer ones are cut rather than corrupting the frame.
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    buf.put_u16(bytes.len() as u16);
    buf.put_slice(bytes);
}

fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    buf.put_u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
    buf.put_slice(b);
}

fn put_bool(buf: &mut BytesMut, b: bool) {
    buf.put_u8(u8::from(b));
}

fn put_channel(buf: &mut BytesMut, c: &WireChannel) {
    buf.put_u64(c.conn);
    buf.put_u16(c.channel);
    buf.put_u64(c.serial);
}

fn put_seqs(buf: &mut BytesMut, seqs: &[u64]) {
    buf.put_u32(u32::try_from(seqs.len()).unwrap_or(u32::MAX));
    for s in seqs {
        buf.put_u64(*s);
    }
}

fn put_msg(buf: &mut BytesMut, m: &WireMessage) {
    buf.reserve(32 + m.exchange.len() + m.routing_key.len() + m.properties.len() + m.body.len());
    put_str(buf, &m.exchange);
    put_str(buf, &m.routing_key);
    put_bool(buf, m.persistent);
    buf.put_u16(m.priority.map_or(u16::MAX, u16::from));
    buf.put_u64(m.expiration_ms.unwrap_or(NONE));
    put_bool(buf, m.resent);
    put_bytes(buf, &m.properties);
    put_bytes(buf, &m.body);
}

/// Append the frame for a request to `buf`.
pub fn encode_request(req: &PeerRequest, buf: &mut BytesMut) {
    match req {
        PeerRequest::Open { vhost, queue } => {
            let at = begin(buf, 1);
            put_str(buf, vhost);
            put_str(buf, queue);
            finish(buf, at);
        }
        PeerRequest::Publish {
            channel,
            confirm,
            msg,
        } => {
            let at = begin(buf, 2);
            put_channel(buf, channel);
            buf.put_u64(confirm.unwrap_or(NONE));
            put_msg(buf, msg);
            finish(buf, at);
        }
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
            let at = begin(buf, 3);
            buf.put_u64(*req);
            buf.put_u64(*consumer);
            put_channel(buf, channel);
            put_str(buf, tag);
            put_bool(buf, *no_ack);
            put_bool(buf, *exclusive);
            buf.put_u16(*prefetch);
            buf.put_i32(*priority);
            buf.put_u32(*global_limit);
            finish(buf, at);
        }
        PeerRequest::Cancel { req, consumer } => {
            let at = begin(buf, 4);
            buf.put_u64(req.unwrap_or(NONE));
            buf.put_u64(*consumer);
            finish(buf, at);
        }
        PeerRequest::Ack {
            channel,
            seqs,
            release,
        } => {
            let at = begin(buf, 5);
            put_channel(buf, channel);
            buf.put_u32(*release);
            put_seqs(buf, seqs);
            finish(buf, at);
        }
        PeerRequest::Reject {
            channel,
            seqs,
            requeue,
            release,
        } => {
            let at = begin(buf, 6);
            put_channel(buf, channel);
            buf.put_u32(*release);
            put_bool(buf, *requeue);
            put_seqs(buf, seqs);
            finish(buf, at);
        }
        PeerRequest::ChannelClosed { channel } => {
            let at = begin(buf, 7);
            put_channel(buf, channel);
            finish(buf, at);
        }
        PeerRequest::Get {
            req,
            channel,
            no_ack,
        } => {
            let at = begin(buf, 8);
            buf.put_u64(*req);
            put_channel(buf, channel);
            put_bool(buf, *no_ack);
            finish(buf, at);
        }
        PeerRequest::Purge { req } => {
            let at = begin(buf, 9);
            buf.put_u64(*req);
            finish(buf, at);
        }
        PeerRequest::Stats { req } => {
            let at = begin(buf, 10);
            buf.put_u64(*req);
            finish(buf, at);
        }
        PeerRequest::Delete {
            req,
            if_unused,
            if_empty,
        } => {
            let at = begin(buf, 11);
            buf.put_u64(*req);
            put_bool(buf, *if_unused);
            put_bool(buf, *if_empty);
            finish(buf, at);
        }
        PeerRequest::Wake => {
            let at = begin(buf, 12);
            finish(buf, at);
        }
        PeerRequest::DirectReply { name, msg } => {
            let at = begin(buf, 13);
            put_str(buf, name);
            put_msg(buf, msg);
            finish(buf, at);
        }
        PeerRequest::Qos {
            channel,
            global_limit,
        } => {
            let at = begin(buf, 14);
            put_channel(buf, channel);
            buf.put_u32(*global_limit);
            finish(buf, at);
        }
        PeerRequest::TopologyChanged { vhost, version } => {
            let at = begin(buf, 20);
            put_str(buf, vhost);
            buf.put_u64(*version);
            finish(buf, at);
        }
    }
}

/// Append the frame for an event to `buf`.
pub fn encode_event(ev: &PeerEvent, buf: &mut BytesMut) {
    match ev {
        PeerEvent::Opened => {
            let at = begin(buf, 0x81);
            finish(buf, at);
        }
        PeerEvent::Refused { reason } => {
            let at = begin(buf, 0x82);
            put_str(buf, reason);
            finish(buf, at);
        }
        PeerEvent::Deliver { deliveries } => {
            let at = begin(buf, 0x83);
            buf.put_u32(u32::try_from(deliveries.len()).unwrap_or(u32::MAX));
            for d in deliveries {
                put_channel(buf, &d.channel);
                buf.put_u64(d.consumer);
                put_str(buf, &d.tag);
                buf.put_u64(d.seq);
                put_bool(buf, d.redelivered);
                put_bool(buf, d.no_ack);
                put_msg(buf, &d.msg);
            }
            finish(buf, at);
        }
        PeerEvent::Confirm { channel, seqs, ok } => {
            let at = begin(buf, 0x84);
            put_channel(buf, channel);
            put_bool(buf, *ok);
            put_seqs(buf, seqs);
            finish(buf, at);
        }
        PeerEvent::Reroute { channel, seq } => {
            let at = begin(buf, 0x85);
            put_channel(buf, channel);
            buf.put_u64(*seq);
            finish(buf, at);
        }
        PeerEvent::Cancelled { channel, tag } => {
            let at = begin(buf, 0x86);
            put_channel(buf, channel);
            put_str(buf, tag);
            finish(buf, at);
        }
        PeerEvent::ConsumeOk { req, stats } => {
            let at = begin(buf, 0x87);
            buf.put_u64(*req);
            match stats {
                Some((m, c)) => {
                    buf.put_u8(1);
                    buf.put_u32(*m);
                    buf.put_u32(*c);
                }
                None => buf.put_u8(0),
            }
            finish(buf, at);
        }
        PeerEvent::GetOk { req, got } => {
            let at = begin(buf, 0x88);
            buf.put_u64(*req);
            match got {
                Some(g) => {
                    buf.put_u8(1);
                    buf.put_u64(g.seq);
                    put_bool(buf, g.redelivered);
                    buf.put_u32(g.remaining);
                    put_msg(buf, &g.msg);
                }
                None => buf.put_u8(0),
            }
            finish(buf, at);
        }
        PeerEvent::Purged { req, count } => {
            let at = begin(buf, 0x89);
            buf.put_u64(*req);
            buf.put_u32(*count);
            finish(buf, at);
        }
        PeerEvent::StatsOk {
            req,
            messages,
            consumers,
        } => {
            let at = begin(buf, 0x8a);
            buf.put_u64(*req);
            buf.put_u32(*messages);
            buf.put_u32(*consumers);
            finish(buf, at);
        }
        PeerEvent::Deleted { req, result } => {
            let at = begin(buf, 0x8b);
            buf.put_u64(*req);
            match result {
                Ok(n) => {
                    buf.put_u8(0);
                    buf.put_u32(*n);
                }
                Err(r) => {
                    buf.put_u8(*r as u8);
                    buf.put_u32(0);
                }
            }
            finish(buf, at);
        }
        PeerEvent::CancelOk { req } => {
            let at = begin(buf, 0x8c);
            buf.put_u64(*req);
            finish(buf, at);
        }
        PeerEvent::Closed { deleted } => {
            let at = begin(buf, 0x8d);
            put_bool(buf, *deleted);
            finish(buf, at);
        }
        PeerEvent::TopologyCurrent => {
            let at = begin(buf, 0x90);
            finish(buf, at);
        }
    }
}

/// Split one whole frame off the front of `buf`: `Ok(None)` if more bytes are needed.
fn split_frame(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if len < 1 {
        return Err(FrameError::Malformed("frame shorter than its header"));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(4 + len).freeze();
    frame.advance(4);
    let kind = frame.get_u8();
    Ok(Some((kind, frame)))
}

/// Reads fields off a frame body, failing instead of panicking when it runs short.
struct Body(Bytes);

impl Body {
    fn need(&self, n: usize) -> Result<(), FrameError> {
        if self.0.remaining() < n {
            Err(FrameError::Malformed("truncated body"))
        } else {
            Ok(())
        }
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }

    fn bool(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(FrameError::Malformed("invalid boolean")),
        }
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }

    fn i32(&mut self) -> Result<i32, FrameError> {
        self.need(4)?;
        Ok(self.0.get_i32())
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }

    fn opt_u64(&mut self) -> Result<Option<u64>, FrameError> {
        let v = self.u64()?;
        Ok((v != NONE).then_some(v))
    }

    fn str(&mut self) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        self.need(n)?;
        let b = self.0.split_to(n);
        String::from_utf8(b.to_vec()).map_err(|_| FrameError::Malformed("invalid UTF-8"))
    }

    fn bytes(&mut self) -> Result<Bytes, FrameError> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.0.split_to(n))
    }

    fn channel(&mut self) -> Result<WireChannel, FrameError> {
        Ok(WireChannel {
            conn: self.u64()?,
            channel: self.u16()?,
            serial: self.u64()?,
        })
    }

    fn seqs(&mut self) -> Result<Vec<u64>, FrameError> {
        let n = self.u32()? as usize;
        // Checked before allocating: a lying count cannot reserve more than the body.
        self.need(n.saturating_mul(8))?;
        Ok((0..n).map(|_| self.0.get_u64()).collect())
    }

    fn msg(&mut self) -> Result<WireMessage, FrameError> {
        let exchange = self.str()?;
        let routing_key = self.str()?;
        let persistent = self.bool()?;
        let priority = match self.u16()? {
            u16::MAX => None,
            p => Some(u8::try_from(p).map_err(|_| FrameError::Malformed("invalid priority"))?),
        };
        let expiration_ms = self.opt_u64()?;
        let resent = self.bool()?;
        Ok(WireMessage {
            exchange,
            routing_key,
            persistent,
            priority,
            expiration_ms,
            resent,
            properties: self.bytes()?,
            body: self.bytes()?,
        })
    }

    fn done(&self) -> Result<(), FrameError> {
        if self.0.has_remaining() {
            Err(FrameError::Malformed("trailing bytes"))
        } else {
            Ok(())
        }
    }
}

/// Decode one request from the front of `buf`; `Ok(None)` if it is not all there yet.
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<PeerRequest>, FrameError> {
    let Some((kind, body)) = split_frame(buf)? else {
        return Ok(None);
    };
    let mut b = Body(body);
    let req = match kind {
        1 => PeerRequest::Open {
            vhost: b.str()?,
            queue: b.str()?,
        },
        2 => PeerRequest::Publish {
            channel: b.channel()?,
            confirm: b.opt_u64()?,
            msg: b.msg()?,
        },
        3 => PeerRequest::Consume {
            req: b.u64()?,
            consumer: b.u64()?,
            channel: b.channel()?,
            tag: b.str()?,
            no_ack: b.bool()?,
            exclusive: b.bool()?,
            prefetch: b.u16()?,
            priority: b.i32()?,
            global_limit: b.u32()?,
        },
        4 => PeerRequest::Cancel {
            req: b.opt_u64()?,
            consumer: b.u64()?,
        },
        5 => {
            let channel = b.channel()?;
            let release = b.u32()?;
            PeerRequest::Ack {
                channel,
                release,
                seqs: b.seqs()?,
            }
        }
        6 => {
            let channel = b.channel()?;
            let release = b.u32()?;
            let requeue = b.bool()?;
            PeerRequest::Reject {
                channel,
                release,
                requeue,
                seqs: b.seqs()?,
            }
        }
        7 => PeerRequest::ChannelClosed {
            channel: b.channel()?,
        },
        8 => PeerRequest::Get {
            req: b.u64()?,
            channel: b.channel()?,
            no_ack: b.bool()?,
        },
        9 => PeerRequest::Purge { req: b.u64()? },
        10 => PeerRequest::Stats { req: b.u64()? },
        11 => PeerRequest::Delete {
            req: b.u64()?,
            if_unused: b.bool()?,
            if_empty: b.bool()?,
        },
        12 => PeerRequest::Wake,
        13 => PeerRequest::DirectReply {
            name: b.str()?,
            msg: b.msg()?,
        },
        14 => PeerRequest::Qos {
            channel: b.channel()?,
            global_limit: b.u32()?,
        },
        20 => PeerRequest::TopologyChanged {
            vhost: b.str()?,
            version: b.u64()?,
        },
        k => return Err(FrameError::UnknownKind(k)),
    };
    b.done()?;
    Ok(Some(req))
}

/// Decode one event from the front of `buf`; `Ok(None)` if it is not all there yet.
pub fn decode_event(buf: &mut BytesMut) -> Result<Option<PeerEvent>, FrameError> {
    let Some((kind, body)) = split_frame(buf)? else {
        return Ok(None);
    };
    let mut b = Body(body);
    let ev = match kind {
        0x81 => PeerEvent::Opened,
        0x82 => PeerEvent::Refused { reason: b.str()? },
        0x83 => {
            let n = b.u32()? as usize;
            // Each delivery takes at least 50 bytes: a lying count cannot allocate much.
            b.need(n.saturating_mul(50))?;
            let mut deliveries = Vec::with_capacity(n);
            for _ in 0..n {
                deliveries.push(WireDelivery {
                    channel: b.channel()?,
                    consumer: b.u64()?,
                    tag: b.str()?,
                    seq: b.u64()?,
                    redelivered: b.bool()?,
                    no_ack: b.bool()?,
                    msg: b.msg()?,
                });
            }
            PeerEvent::Deliver { deliveries }
        }
        0x84 => {
            let channel = b.channel()?;
            let ok = b.bool()?;
            PeerEvent::Confirm {
                channel,
                ok,
                seqs: b.seqs()?,
            }
        }
        0x85 => PeerEvent::Reroute {
            channel: b.channel()?,
            seq: b.u64()?,
        },
        0x86 => PeerEvent::Cancelled {
            channel: b.channel()?,
            tag: b.str()?,
        },
        0x87 => {
            let req = b.u64()?;
            let stats = match b.u8()? {
                0 => None,
                1 => Some((b.u32()?, b.u32()?)),
                _ => return Err(FrameError::Malformed("invalid consume answer")),
            };
            PeerEvent::ConsumeOk { req, stats }
        }
        0x88 => {
            let req = b.u64()?;
            let got = match b.u8()? {
                0 => None,
                1 => Some(WireGot {
                    seq: b.u64()?,
                    redelivered: b.bool()?,
                    remaining: b.u32()?,
                    msg: b.msg()?,
                }),
                _ => return Err(FrameError::Malformed("invalid get answer")),
            };
            PeerEvent::GetOk { req, got }
        }
        0x89 => PeerEvent::Purged {
            req: b.u64()?,
            count: b.u32()?,
        },
        0x8a => PeerEvent::StatsOk {
            req: b.u64()?,
            messages: b.u32()?,
            consumers: b.u32()?,
        },
        0x8b => {
            let req = b.u64()?;
            let code = b.u8()?;
            let n = b.u32()?;
            let result = match code {
                0 => Ok(n),
                1 => Err(WireRefusal::InUse),
                2 => Err(WireRefusal::NotEmpty),
                _ => return Err(FrameError::Malformed("invalid delete answer")),
            };
            PeerEvent::Deleted { req, result }
        }
        0x8c => PeerEvent::CancelOk { req: b.u64()? },
        0x8d => PeerEvent::Closed { deleted: b.bool()? },
        0x90 => PeerEvent::TopologyCurrent,
        k => return Err(FrameError::UnknownKind(k)),
    };
    b.done()?;
    Ok(Some(ev))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const CH: WireChannel = WireChannel {
        conn: 7,
        channel: 3,
        serial: 99,
    };

    fn msg() -> WireMessage {
        WireMessage {
            exchange: "amq.topic".into(),
            routing_key: "a.b".into(),
            persistent: true,
            priority: Some(4),
            expiration_ms: Some(60_000),
            resent: true,
            properties: Bytes::from_static(&[0x10, 0x00, 2]),
            body: Bytes::from_static(b"hello"),
        }
    }

    fn bare() -> WireMessage {
        WireMessage {
            exchange: String::new(),
            routing_key: "q".into(),
            persistent: false,
            priority: None,
            expiration_ms: None,
            resent: false,
            properties: Bytes::from_static(&[0, 0]),
            body: Bytes::new(),
        }
    }

    fn requests() -> Vec<PeerRequest> {
        vec![
            PeerRequest::Open {
                vhost: "/".into(),
                queue: "orders".into(),
            },
            PeerRequest::Publish {
                channel: CH,
                confirm: Some(5),
                msg: msg(),
            },
            PeerRequest::Publish {
                channel: CH,
                confirm: None,
                msg: bare(),
            },
            PeerRequest::Consume {
                req: 1,
                consumer: 2,
                channel: CH,
                tag: "amq.ctag-x".into(),
                no_ack: false,
                exclusive: true,
                prefetch: 10,
                priority: -3,
                global_limit: 100,
            },
            PeerRequest::Cancel {
                req: Some(3),
                consumer: 2,
            },
            PeerRequest::Cancel {
                req: None,
                consumer: 2,
            },
            PeerRequest::Ack {
                channel: CH,
                seqs: vec![1, 2, 3],
                release: 3,
            },
            PeerRequest::Reject {
                channel: CH,
                seqs: vec![],
                requeue: true,
                release: 0,
            },
            PeerRequest::ChannelClosed { channel: CH },
            PeerRequest::Get {
                req: 4,
                channel: CH,
                no_ack: true,
            },
            PeerRequest::Purge { req: 5 },
            PeerRequest::Stats { req: 6 },
            PeerRequest::Delete {
                req: 7,
                if_unused: true,
                if_empty: false,
            },
            PeerRequest::Wake,
            PeerRequest::DirectReply {
                name: "amq.rabbitmq.reply-to.0123456789abcdef0123456789abcdef.xyz".into(),
                msg: msg(),
            },
            PeerRequest::DirectReply {
                name: String::new(),
                msg: bare(),
            },
            PeerRequest::Qos {
                channel: CH,
                global_limit: 3,
            },
            PeerRequest::Qos {
                channel: CH,
                global_limit: 0,
            },
            PeerRequest::TopologyChanged {
                vhost: "/".into(),
                version: u64::MAX,
            },
        ]
    }

    fn events() -> Vec<PeerEvent> {
        vec![
            PeerEvent::Opened,
            PeerEvent::TopologyCurrent,
            PeerEvent::Refused {
                reason: "not the owner".into(),
            },
            PeerEvent::Deliver {
                deliveries: vec![
                    WireDelivery {
                        channel: CH,
                        consumer: 2,
                        tag: "t".into(),
                        seq: 10,
                        redelivered: true,
                        no_ack: false,
                        msg: msg(),
                    },
                    WireDelivery {
                        channel: CH,
                        consumer: 2,
                        tag: String::new(),
                        seq: 11,
                        redelivered: false,
                        no_ack: true,
                        msg: bare(),
                    },
                ],
            },
            PeerEvent::Deliver { deliveries: vec![] },
            PeerEvent::Confirm {
                channel: CH,
                seqs: vec![1, 9],
                ok: false,
            },
            PeerEvent::Reroute {
                channel: CH,
                seq: 4,
            },
            PeerEvent::Cancelled {
                channel: CH,
                tag: "t".into(),
            },
            PeerEvent::ConsumeOk {
                req: 1,
                stats: Some((3, 1)),
            },
            PeerEvent::ConsumeOk {
                req: 1,
                stats: None,
            },
            PeerEvent::GetOk {
                req: 2,
                got: Some(WireGot {
                    seq: 8,
                    redelivered: false,
                    remaining: 4,
                    msg: msg(),
                }),
            },
            PeerEvent::GetOk { req: 2, got: None },
            PeerEvent::Purged { req: 3, count: 12 },
            PeerEvent::StatsOk {
                req: 4,
                messages: 5,
                consumers: 6,
            },
            PeerEvent::Deleted {
                req: 5,
                result: Ok(2),
            },
            PeerEvent::Deleted {
                req: 5,
                result: Err(WireRefusal::NotEmpty),
            },
            PeerEvent::CancelOk { req: 6 },
            PeerEvent::Closed { deleted: true },
        ]
    }

    #[test]
    fn requests_round_trip_and_every_truncation_is_incomplete() {
        for req in requests() {
            let mut buf = BytesMut::new();
            encode_request(&req, &mut buf);
            let whole = buf.clone();
            for cut in 0..whole.len() {
                let mut part = BytesMut::from(&whole[..cut]);
                assert_eq!(
                    decode_request(&mut part).unwrap(),
                    None,
                    "{req:?} cut {cut}"
                );
            }
            assert_eq!(decode_request(&mut buf).unwrap(), Some(req));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn events_round_trip_and_every_truncation_is_incomplete() {
        for ev in events() {
            let mut buf = BytesMut::new();
            encode_event(&ev, &mut buf);
            let whole = buf.clone();
            for cut in 0..whole.len() {
                let mut part = BytesMut::from(&whole[..cut]);
                assert_eq!(decode_event(&mut part).unwrap(), None, "{ev:?} cut {cut}");
            }
            assert_eq!(decode_event(&mut buf).unwrap(), Some(ev));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn frames_decode_back_to_back() {
        let mut buf = BytesMut::new();
        for req in requests() {
            encode_request(&req, &mut buf);
        }
        for req in requests() {
            assert_eq!(decode_request(&mut buf).unwrap(), Some(req));
        }
        assert_eq!(decode_request(&mut buf).unwrap(), None);
    }

    #[test]
    fn golden_ack_bytes() {
        let mut buf = BytesMut::new();
        encode_request(
            &PeerRequest::Ack {
                channel: WireChannel {
                    conn: 1,
                    channel: 2,
                    serial: 3,
                },
                seqs: vec![4],
                release: 1,
            },
            &mut buf,
        );
        let mut want = vec![0, 0, 0, 35, 5];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3]);
        want.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 4]);
        assert_eq!(&buf[..], &want[..]);
    }

    #[test]
    fn golden_qos_bytes() {
        let mut buf = BytesMut::new();
        encode_request(
            &PeerRequest::Qos {
                channel: WireChannel {
                    conn: 1,
                    channel: 2,
                    serial: 3,
                },
                global_limit: 0x0102,
            },
            &mut buf,
        );
        let mut want = vec![0, 0, 0, 23, 14];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3]);
        want.extend_from_slice(&[0, 0, 1, 2]);
        assert_eq!(&buf[..], &want[..]);
    }

    #[test]
    fn oversized_unknown_and_malformed_frames_are_errors() {
        let mut buf = BytesMut::from(&((MAX_FRAME as u32) + 1).to_be_bytes()[..]);
        assert!(matches!(
            decode_request(&mut buf),
            Err(FrameError::TooLarge(_))
        ));
        let mut buf = BytesMut::new();
        encode_request(&PeerRequest::Wake, &mut buf);
        buf[4] = 0x7f;
        assert_eq!(decode_request(&mut buf), Err(FrameError::UnknownKind(0x7f)));
        // An ack whose count promises more sequence numbers than the body holds.
        let mut buf = BytesMut::new();
        encode_request(
            &PeerRequest::Ack {
                channel: CH,
                seqs: vec![],
                release: 0,
            },
            &mut buf,
        );
        let n = buf.len();
        buf[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_request(&mut buf).is_err());
        // Trailing garbage after a complete body.
        let mut buf = BytesMut::new();
        encode_event(&PeerEvent::CancelOk { req: 1 }, &mut buf);
        buf[3] += 1;
        buf.put_u8(0);
        assert!(decode_event(&mut buf).is_err());
        // A boolean that is neither 0 nor 1.
        let mut buf = BytesMut::new();
        encode_event(&PeerEvent::Closed { deleted: true }, &mut buf);
        buf[5] = 7;
        assert!(decode_event(&mut buf).is_err());
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(decode_event(&mut buf).is_err());
    }
}
