//! One client connection: the handshake, then a single task that reads frames, runs them
//! through per-channel content assembly and the method handlers, takes deliveries and
//! confirms from queue owners, writes everything pending in one go, and keeps heartbeats.

pub mod frame;
pub mod handshake;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, channel as chan, connection};
use amq_protocol::types::LongString;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use warren_proto::amqp::{Command, Frame, FrameDecoder, FrameError, PROTOCOL_HEADER};

use crate::channel::{Channel, ChannelState, Unacked, group_by_queue};
use crate::error::{AmqpError, ReplyCode};
use crate::node::Node;
use crate::queue::{ChannelKey, ConnEvent, ConnSink, QueueCmd, QueueHandle};
use crate::topology::VhostTopology;
use handshake::{ClientCaps, LoginError};

/// Write buffer size above which deliveries wait until the socket drains.
const WRITE_HIGH_WATER: usize = 4 * 1024 * 1024;
/// How long to wait for connection.close-ok after sending connection.close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for the client to close the socket after connection.close-ok.
const CLIENT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// What the client sent next during the handshake.
enum HandshakeStep {
    /// A connection-class method on channel 0.
    Method(connection::AMQPMethod),
    /// Any other frame: the handshake is refused.
    Unexpected,
    /// The client went away.
    Closed,
}

/// RabbitMQ's handshake_timeout.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Events handled per wakeup before the socket gets another turn.
const EVENT_BATCH: usize = 256;

/// Why the connection loop ended.
enum End {
    /// Orderly close, peer gone, or a protocol error already reported.
    Done,
}

/// State of one client connection.
pub struct Conn {
    pub(crate) node: Arc<Node>,
    pub(crate) id: u64,
    peer: SocketAddr,
    pub(crate) vhost: String,
    user: String,
    pub(crate) caps: ClientCaps,
    decoder: FrameDecoder,
    rbuf: BytesMut,
    pub(crate) wbuf: BytesMut,
    pub(crate) frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    pub(crate) channels: HashMap<u16, Channel>,
    pub(crate) sink: ConnSink,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    topo: Arc<VhostTopology>,
    topo_version: u64,
    pub(crate) queue_cache: HashMap<String, QueueHandle>,
    pub(crate) exclusive_queues: Vec<String>,
    /// Set once Warren sent connection.close: only close-ok matters now.
    closing: Option<Instant>,
    /// Stop after the write buffer drains.
    finished: bool,
    /// The client sent connection.close: it closes the socket after close-ok.
    client_closed: bool,
    wrote_since_tick: bool,
    last_read: Instant,
    pub(crate) route_buf: Vec<String>,
    /// Commands for queue owners gathered while handling one read, sent as one batch per
    /// queue before anything else talks to those queues.
    outbox: Vec<(QueueHandle, Vec<QueueCmd>)>,
    /// Queues whose owner could not be started: which incarnation (log), until when, and why.
    pub(crate) unavailable: HashMap<String, (warren_common::LogId, Instant, AmqpError)>,
}

/// Serve one accepted socket until it closes.
pub async fn serve<S>(node: Arc<Node>, stream: S, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sink, events) = mpsc::unbounded_channel();
    let topo = node
        .topology
        .snapshot("/")
        .unwrap_or_else(|| Arc::new(VhostTopology::default()));
    let mut conn = Conn {
        id: node.next_id(),
        peer,
        vhost: "/".into(),
        user: String::new(),
        caps: ClientCaps::default(),
        decoder: FrameDecoder::new(),
        rbuf: BytesMut::with_capacity(64 * 1024),
        wbuf: BytesMut::with_capacity(64 * 1024),
        frame_max: node.config.limits.frame_max,
        channel_max: node.config.limits.channel_max,
        heartbeat: node.config.limits.heartbeat_secs,
        channels: HashMap::new(),
        sink,
        events,
        topo_version: node.topology.version(),
        topo,
        queue_cache: HashMap::new(),
        exclusive_queues: Vec::new(),
        closing: None,
        finished: false,
        client_closed: false,
        wrote_since_tick: false,
        last_read: Instant::now(),
        route_buf: Vec::new(),
        outbox: Vec::new(),
        unavailable: HashMap::new(),
        node,
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let opened =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.handshake(&mut rd, &mut wr)).await {
            Ok(Ok(open)) => open,
            Ok(Err(e)) => {
                debug!(peer = %conn.peer, error = %e, "connection ended during handshake");
                false
            }
            Err(_) => {
                info!(peer = %conn.peer, "closing AMQP connection: handshake timeout");
                false
            }
        };
    if opened {
        info!(peer = %conn.peer, user = %conn.user, vhost = %conn.vhost, conn = conn.id, "accepted AMQP connection");
        let End::Done = conn.run(&mut rd, &mut wr).await;
        conn.cleanup().await;
        if conn.client_closed {
            // As RabbitMQ: after close-ok the client closes the socket; wait (bounded) for it.
            let mut sink = [0u8; 512];
            let _ = tokio::time::timeout(CLIENT_CLOSE_TIMEOUT, async {
                while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
        info!(peer = %conn.peer, conn = conn.id, "closed AMQP connection");
    }
    let _ = wr.shutdown().await;
}

/// Write the whole buffer and flush.
async fn flush_all<W: AsyncWrite + Unpin>(wr: &mut W, buf: &mut BytesMut) -> std::io::Result<()> {
    while !buf.is_empty() {
        wr.write_buf(buf).await?;
    }
    wr.flush().await
}

impl Conn {
    /// Read until one frame is decoded; `None` at end of stream.
    async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
    ) -> Result<Option<Frame>, FrameOrIo> {
        loop {
            if let Some(f) = self.decoder.decode(&mut self.rbuf)? {
                return Ok(Some(f));
            }
            self.rbuf.reserve(4096);
            if rd.read_buf(&mut self.rbuf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Protocol header, start/start-ok, tune/tune-ok, open/open-ok. True if the
    /// connection is open.
    async fn handshake<R, W>(&mut self, rd: &mut R, wr: &mut W) -> Result<bool, FrameOrIo>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        match self.read_frame(rd).await {
            Ok(Some(Frame::ProtocolHeader(_))) => {}
            Ok(_) => return Ok(false),
            Err(FrameOrIo::Frame(FrameError::BadProtocolHeader { .. })) => {
                // RabbitMQ answers with the header it speaks, then closes.
                wr.write_all(&PROTOCOL_HEADER).await?;
                wr.flush().await?;
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        let start = connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: handshake::server_properties(
                &self.node.config.node_name,
                &handshake::cluster_nodes(self.node.membership.as_ref()),
            ),
            mechanisms: LongString::from(handshake::MECHANISMS),
            locales: LongString::from("en_US"),
        };
        frame::put_method(
            &mut self.wbuf,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(start)),
        );
        flush_all(wr, &mut self.wbuf).await?;

        let start_ok = match self.next_handshake_method(rd).await? {
            HandshakeStep::Method(connection::AMQPMethod::StartOk(s)) => s,
            HandshakeStep::Closed => return Ok(false),
            _ => {
                let e = AmqpError::command_invalid("expected connection.start-ok").on(10, 11);
                return self.refuse(wr, e).await;
            }
        };
        self.caps = handshake::client_caps(&start_ok.client_properties);
        match handshake::authenticate(
            &self.node.config.auth,
            start_ok.mechanism.as_str(),
            &start_ok.response,
            self.peer.ip(),
        ) {
            Ok(user) => self.user = user,
            Err(LoginError::UnknownMechanism(m)) => {
                let e =
                    AmqpError::command_invalid(format!("unknown authentication mechanism '{m}'"))
                        .on(10, 11);
                return self.refuse(wr, e).await;
            }
            Err(err) => {
                let text = match &err {
                    LoginError::LoopbackOnly(u) => {
                        format!("User '{u}' can only connect via localhost")
                    }
                    LoginError::Refused { mechanism } => format!(
                        "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
                    ),
                    LoginError::UnknownMechanism(_) => String::new(),
                };
                warn!(peer = %self.peer, reason = %text, "AMQP login refused");
                if self.caps.authentication_failure_close {
                    return self
                        .refuse(wr, AmqpError::access_refused(text).on(10, 11))
                        .await;
                }
                return Ok(false);
            }
        }

        let limits = self.node.config.limits.clone();
        let tune = connection::Tune {
            channel_max: limits.channel_max,
            frame_max: limits.frame_max,
            heartbeat: limits.heartbeat_secs,
        };
        frame::put_method(
            &mut self.wbuf,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(tune)),
        );
        flush_all(wr, &mut self.wbuf).await?;

        let tune_ok = match self.next_handshake_method(rd).await? {
            HandshakeStep::Method(connection::AMQPMethod::TuneOk(t)) => t,
            HandshakeStep::Closed => return Ok(false),
            _ => {
                let e = AmqpError::command_invalid("expected connection.tune-ok").on(10, 31);
                return self.refuse(wr, e).await;
            }
        };
        let server_frame_max = limits.frame_max;
        let server_channel_max = limits.channel_max;
        let not_allowed = |t: String| AmqpError::new(ReplyCode::NotAllowed, t).on(10, 31);
        if tune_ok.frame_max != 0 && tune_ok.frame_max < crate::config::FRAME_MIN_SIZE {
            let e = not_allowed(format!(
                "frame_max={} < {} min size",
                tune_ok.frame_max,
                crate::config::FRAME_MIN_SIZE
            ));
            return self.refuse(wr, e).await;
        }
        if server_frame_max != 0 && tune_ok.frame_max > server_frame_max {
            let e = not_allowed(format!(
                "frame_max={} > {} max size",
                tune_ok.frame_max, server_frame_max
            ));
            return self.refuse(wr, e).await;
        }
        if server_channel_max != 0 && tune_ok.channel_max > server_channel_max {
            let e = not_allowed(format!(
                "channel_max={} > {} max size",
                tune_ok.channel_max, server_channel_max
            ));
            return self.refuse(wr, e).await;
        }
        self.frame_max = if tune_ok.frame_max == 0 {
            server_frame_max
        } else {
            tune_ok.frame_max
        };
        self.channel_max = if tune_ok.channel_max == 0 {
            server_channel_max
        } else {
            tune_ok.channel_max
        };
        self.heartbeat = tune_ok.heartbeat;
        self.decoder.set_frame_max(self.frame_max);

        let open = match self.next_handshake_method(rd).await? {
            HandshakeStep::Method(connection::AMQPMethod::Open(o)) => o,
            HandshakeStep::Closed => return Ok(false),
            _ => {
                let e = AmqpError::command_invalid("expected connection.open").on(10, 40);
                return self.refuse(wr, e).await;
            }
        };
        let vhost = open.virtual_host.as_str().to_string();
        if !self.node.topology.has_vhost(&vhost) {
            let e = AmqpError::new(ReplyCode::NotAllowed, format!("vhost {vhost} not found"))
                .on(10, 40);
            return self.refuse(wr, e).await;
        }
        self.vhost = vhost;
        self.refresh_topology();
        frame::put_method(
            &mut self.wbuf,
            0,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        );
        flush_all(wr, &mut self.wbuf).await?;
        self.last_read = Instant::now();
        Ok(true)
    }

    /// The next frame of the handshake, heartbeats skipped.
    async fn next_handshake_method<R>(&mut self, rd: &mut R) -> Result<HandshakeStep, FrameOrIo>
    where
        R: AsyncRead + Unpin,
    {
        loop {
            return Ok(match self.read_frame(rd).await? {
                Some(Frame::Heartbeat) => continue,
                Some(Frame::Method {
                    channel: 0,
                    method: AMQPClass::Connection(m),
                }) => HandshakeStep::Method(m),
                Some(_) => HandshakeStep::Unexpected,
                None => HandshakeStep::Closed,
            });
        }
    }

    /// Send connection.close during the handshake and wait briefly for close-ok.
    async fn refuse<W>(&mut self, wr: &mut W, e: AmqpError) -> Result<bool, FrameOrIo>
    where
        W: AsyncWrite + Unpin,
    {
        warn!(peer = %self.peer, code = e.code.code(), text = %e.reply_text(), "closing AMQP connection during handshake");
        self.put_connection_close(&e);
        flush_all(wr, &mut self.wbuf).await?;
        Ok(false)
    }

    fn put_connection_close(&mut self, e: &AmqpError) {
        let close = connection::Close {
            reply_code: e.code.code(),
            reply_text: e.reply_text().into(),
            class_id: e.class_id,
            method_id: e.method_id,
        };
        frame::put_method(
            &mut self.wbuf,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(close)),
        );
    }

    /// Refresh the cached topology snapshot if it changed.
    pub(crate) fn refresh_topology(&mut self) -> &Arc<VhostTopology> {
        let v = self.node.topology.version();
        if v != self.topo_version {
            if let Some(t) = self.node.topology.snapshot(&self.vhost) {
                self.topo = t;
            }
            self.topo_version = v;
        }
        &self.topo
    }

    /// The main loop after the handshake.
    async fn run<R, W>(&mut self, rd: &mut R, wr: &mut W) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        enum Io {
            Shutdown,
            Read(std::io::Result<usize>),
            Wrote(std::io::Result<usize>),
            Event(Option<ConnEvent>),
            Tick,
        }
        let hb = self.heartbeat;
        let tick_every = Duration::from_millis(u64::from(hb.max(1)) * 500);
        let mut ticker = tokio::time::interval_at(Instant::now() + tick_every, tick_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.node.shutdown.subscribe();
        loop {
            if self.finished && self.wbuf.is_empty() {
                let _ = wr.flush().await;
                return End::Done;
            }
            if let Some(deadline) = self.closing
                && Instant::now() >= deadline
            {
                return End::Done;
            }
            if self.rbuf.capacity() - self.rbuf.len() < 8192 {
                self.rbuf.reserve(64 * 1024);
            }
            let reading = !self.finished && !self.decoder_failed() && !self.confirm_backlog();
            let close_deadline = self
                .closing
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let io = tokio::select! {
                r = wr.write_buf(&mut self.wbuf), if !self.wbuf.is_empty() => Io::Wrote(r),
                r = rd.read_buf(&mut self.rbuf), if reading => Io::Read(r),
                e = self.events.recv(), if self.wbuf.len() < WRITE_HIGH_WATER => Io::Event(e),
                _ = ticker.tick(), if hb > 0 => Io::Tick,
                _ = tokio::time::sleep_until(close_deadline), if self.closing.is_some() => Io::Tick,
                _ = shutdown.changed(), if self.closing.is_none() => Io::Shutdown,
            };
            match io {
                Io::Shutdown => {
                    let e = AmqpError::new(
                        ReplyCode::ConnectionForced,
                        "broker forced connection closure with reason 'shutdown'",
                    );
                    self.connection_error(e).await;
                }
                Io::Wrote(Ok(_)) => {
                    self.wrote_since_tick = true;
                    if self.wbuf.is_empty() {
                        let _ = wr.flush().await;
                    }
                }
                Io::Wrote(Err(e)) => {
                    debug!(conn = self.id, error = %e, "write failed");
                    return End::Done;
                }
                Io::Read(Ok(0)) => {
                    if self.closing.is_none() {
                        info!(peer = %self.peer, conn = self.id, "client closed the TCP connection without connection.close");
                    }
                    return End::Done;
                }
                Io::Read(Ok(_)) => {
                    self.last_read = Instant::now();
                    self.process_input().await;
                }
                Io::Read(Err(e)) => {
                    debug!(conn = self.id, error = %e, "read failed");
                    return End::Done;
                }
                Io::Event(Some(ev)) => {
                    self.on_event(ev).await;
                    let mut n = 1;
                    while n < EVENT_BATCH {
                        match self.events.try_recv() {
                            Ok(ev) => self.on_event(ev).await,
                            Err(_) => break,
                        }
                        n += 1;
                    }
                    // What the events posted (a wake-up for queues waiting on the credit an
                    // orphaned delivery gave back) goes now: the client may send nothing
                    // until it gets a delivery.
                    self.flush_outbox().await;
                }
                // The connection holds a sender itself, so the channel never closes.
                Io::Event(None) => {}
                Io::Tick => {
                    if hb > 0 {
                        if !self.wrote_since_tick && self.wbuf.is_empty() {
                            frame::put_heartbeat(&mut self.wbuf);
                        }
                        self.wrote_since_tick = false;
                        // RabbitMQ's rule: two heartbeat intervals without any traffic.
                        if self.last_read.elapsed() > Duration::from_secs(u64::from(hb) * 2) {
                            warn!(peer = %self.peer, conn = self.id, "closing AMQP connection: missed heartbeats from client, timeout: {hb}s");
                            return End::Done;
                        }
                    }
                }
            }
        }
    }

    /// A channel has as many unconfirmed publishes as allowed: stop reading until confirms
    /// come back (TCP back-pressure reaches the publisher, as RabbitMQ's flow control does).
    fn confirm_backlog(&self) -> bool {
        let limit = self.node.config.limits.max_inflight_confirms;
        self.channels
            .values()
            .any(|c| c.confirms.as_ref().is_some_and(|t| t.in_flight() >= limit))
    }

    fn decoder_failed(&self) -> bool {
        self.closing.is_some() && self.finished
    }

    /// Decode and handle every complete frame in the read buffer.
    async fn process_input(&mut self) {
        self.process_frames().await;
        self.flush_outbox().await;
    }

    /// Queue a command for an owner; sent by [`Conn::flush_outbox`].
    pub(crate) fn post(&mut self, q: &QueueHandle, cmd: QueueCmd) {
        let id = q.shared().id;
        match self.outbox.iter_mut().find(|(h, _)| h.shared().id == id) {
            Some((_, cmds)) => cmds.push(cmd),
            None => self.outbox.push((q.clone(), vec![cmd])),
        }
    }

    /// Send what [`Conn::post`] gathered: one command per queue.
    pub(crate) async fn flush_outbox(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        for (q, mut cmds) in std::mem::take(&mut self.outbox) {
            let cmd = if cmds.len() == 1 {
                cmds.pop().unwrap_or(QueueCmd::Wake)
            } else {
                QueueCmd::Batch(cmds)
            };
            if let Err(mpsc::error::SendError(cmd)) = q.0.tx.send(cmd).await {
                self.owner_gone(&q, cmd).await;
            }
        }
    }

    /// An owner stopped before taking these commands. Settlements die with it (its
    /// deliveries come back from the log). Publishes go to a new owner if the queue is still
    /// declared (the old one lost its log, or was superseded), are confirmed if it was
    /// deleted (as RabbitMQ does), and are nacked if no owner can take them.
    async fn owner_gone(&mut self, q: &QueueHandle, cmd: QueueCmd) {
        let name = q.shared().name.clone();
        self.queue_cache.remove(&name);
        let mut publishes = Vec::new();
        collect_publishes(cmd, &mut publishes);
        self.republish(name, publishes).await;
    }

    /// Hand publishes to the current owner of queue `name` (starting one if needed).
    async fn republish(&mut self, name: String, mut publishes: Vec<QueueCmd>) {
        if publishes.is_empty() {
            return;
        }
        if self.queue_cache.get(&name).is_some_and(|h| h.is_closed()) {
            self.queue_cache.remove(&name);
        }
        let def = self
            .node
            .topology
            .snapshot(&self.vhost)
            .and_then(|t| t.queues.get(&name).cloned());
        let ok = match def {
            None => true,
            Some(def) => match self.queue_handle(&def).await {
                Ok(fresh) => match fresh.0.tx.send(QueueCmd::Batch(publishes)).await {
                    Ok(()) => return,
                    Err(mpsc::error::SendError(cmd)) => {
                        publishes = Vec::new();
                        collect_publishes(cmd, &mut publishes);
                        false
                    }
                },
                Err(e) => {
                    warn!(queue = %name, error = %e, "no owner can take publishes; nacking them");
                    false
                }
            },
        };
        let mut confirms = Vec::new();
        collect_confirms(QueueCmd::Batch(publishes), &mut confirms);
        for (channel, seq) in confirms {
            if let Some(ch) = self.channels.get_mut(&channel.channel)
                && ch.key == channel
                && let Some(t) = ch.confirms.as_mut()
            {
                t.settle(&[seq], ok);
            }
            self.write_confirms(channel.channel);
        }
    }

    async fn process_frames(&mut self) {
        loop {
            if self.finished {
                return;
            }
            let frame = match self.decoder.decode(&mut self.rbuf) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    let fatal = e.is_fatal();
                    let channel = e.channel();
                    let err = AmqpError::from(e);
                    if !err.code.is_hard() && !fatal && self.closing.is_none() {
                        self.channel_error(channel, err).await;
                        continue;
                    }
                    self.connection_error(err).await;
                    if fatal {
                        // The stream is out of sync: nothing more can be read from it.
                        self.rbuf.clear();
                        self.finished = true;
                    }
                    return;
                }
            };
            if let Err(e) = self.on_frame(frame).await {
                self.connection_error(e).await;
            }
        }
    }

    /// Report a hard error: connection.close, then wait for close-ok.
    pub(crate) async fn connection_error(&mut self, e: AmqpError) {
        if self.closing.is_some() {
            return;
        }
        warn!(peer = %self.peer, conn = self.id, code = e.code.code(), text = %e.reply_text(), "closing AMQP connection on error");
        self.put_connection_close(&e);
        self.closing = Some(Instant::now() + CLOSE_TIMEOUT);
        // Channels stop now: their queues requeue what they delivered.
        self.close_all_channels().await;
    }

    /// Report a soft error: channel.close on that channel.
    pub(crate) async fn channel_error(&mut self, channel: u16, e: AmqpError) {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        if ch.state == ChannelState::Closing {
            return;
        }
        warn!(peer = %self.peer, conn = self.id, channel, code = e.code.code(), text = %e.reply_text(), "closing AMQP channel on error");
        ch.state = ChannelState::Closing;
        ch.assembler.reset();
        let close = chan::Close {
            reply_code: e.code.code(),
            reply_text: e.reply_text().into(),
            class_id: e.class_id,
            method_id: e.method_id,
        };
        frame::put_method(
            &mut self.wbuf,
            channel,
            AMQPClass::Channel(chan::AMQPMethod::Close(close)),
        );
        self.release_channel(channel).await;
    }

    /// Tell every queue the channel touched that it is gone (requeue, drop consumers).
    pub(crate) async fn release_channel(&mut self, channel: u16) {
        // Acks and publishes already made on it go first.
        self.flush_outbox().await;
        self.cancel_reply_to(channel, None);
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        let key = ch.key;
        let touched: Vec<QueueHandle> = ch.touched.drain().map(|(_, q)| q).collect();
        ch.unacked.clear();
        ch.consumers.clear();
        ch.confirms = None;
        for q in touched {
            q.send(QueueCmd::ChannelClosed { channel: key }).await;
        }
    }

    async fn close_all_channels(&mut self) {
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            self.release_channel(id).await;
        }
        self.channels.clear();
    }

    /// Everything a closed connection leaves behind: channel state and exclusive queues.
    async fn cleanup(&mut self) {
        self.close_all_channels().await;
        let names = std::mem::take(&mut self.exclusive_queues);
        for name in names {
            self.delete_queue_now(&name).await;
        }
    }

    /// Delete a queue unconditionally (exclusive queue of a closing connection).
    pub(crate) async fn delete_queue_now(&mut self, name: &str) {
        let Some(def) = self
            .node
            .topology
            .snapshot(&self.vhost)
            .and_then(|t| t.queues.get(name).cloned())
        else {
            return;
        };
        if let Ok(q) = self.node.queue(&self.vhost, &def).await {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if q.send(QueueCmd::Delete {
                if_unused: false,
                if_empty: false,
                reply: tx,
            })
            .await
            {
                let _ = rx.await;
            }
        }
        if let Err(e) = self
            .node
            .forget_queue(&self.vhost, name, Some(def.log_id))
            .await
        {
            warn!(queue = name, error = %e, "could not delete exclusive queue");
        }
        self.queue_cache.remove(name);
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), AmqpError> {
        let channel_id = frame.channel();
        if self.closing.is_some() {
            // After connection.close only close/close-ok matter.
            if let Frame::Method {
                channel: 0,
                method: AMQPClass::Connection(m),
            } = &frame
            {
                match m {
                    connection::AMQPMethod::CloseOk(_) => self.finished = true,
                    connection::AMQPMethod::Close(_) => {
                        frame::put_method(
                            &mut self.wbuf,
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                connection::CloseOk {},
                            )),
                        );
                        self.finished = true;
                    }
                    _ => {}
                }
            }
            return Ok(());
        }
        match frame {
            Frame::Heartbeat => Ok(()),
            Frame::ProtocolHeader(_) => Err(AmqpError::new(
                ReplyCode::UnexpectedFrame,
                "protocol header after the handshake",
            )),
            Frame::Method { channel: 0, method } => self.on_connection_method(method).await,
            Frame::Header { .. } | Frame::Body { .. } if channel_id == 0 => Err(AmqpError::new(
                ReplyCode::UnexpectedFrame,
                "content frame on channel 0",
            )),
            frame => {
                let Some(ch) = self.channels.get_mut(&channel_id) else {
                    return self.on_unopened_channel(channel_id, frame).await;
                };
                if ch.state == ChannelState::Closing {
                    if let Frame::Method { method, .. } = frame {
                        match method {
                            AMQPClass::Channel(chan::AMQPMethod::CloseOk(_)) => {
                                self.channels.remove(&channel_id);
                            }
                            AMQPClass::Channel(chan::AMQPMethod::Close(_)) => {
                                // Both sides closed at once: answer, and we are done.
                                frame::put_method(
                                    &mut self.wbuf,
                                    channel_id,
                                    AMQPClass::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})),
                                );
                                self.channels.remove(&channel_id);
                            }
                            _ => {}
                        }
                    }
                    return Ok(());
                }
                match ch.assembler.push(frame) {
                    Ok(None) => Ok(()),
                    Ok(Some(Command::Method(m))) => {
                        let (class_id, method_id) = (m.get_amqp_class_id(), m.get_amqp_method_id());
                        match self.on_channel_method(channel_id, m).await {
                            Ok(()) => Ok(()),
                            Err(e) => {
                                let e = e.on(class_id, method_id);
                                if e.code.is_hard() {
                                    Err(e)
                                } else {
                                    self.channel_error(channel_id, e).await;
                                    Ok(())
                                }
                            }
                        }
                    }
                    Ok(Some(Command::Content(c))) => match self.on_publish(channel_id, c).await {
                        Ok(()) => Ok(()),
                        Err(e) => {
                            let e = e.on(60, 40);
                            if e.code.is_hard() {
                                Err(e)
                            } else {
                                self.channel_error(channel_id, e).await;
                                Ok(())
                            }
                        }
                    },
                    Err(fe) => {
                        let e = AmqpError::from(fe);
                        if e.code.is_hard() {
                            Err(e)
                        } else {
                            self.channel_error(channel_id, e).await;
                            Ok(())
                        }
                    }
                }
            }
        }
    }

    async fn on_unopened_channel(&mut self, id: u16, frame: Frame) -> Result<(), AmqpError> {
        match frame {
            Frame::Method {
                method: AMQPClass::Channel(chan::AMQPMethod::Open(_)),
                ..
            } => {
                if self.channel_max != 0 && self.channels.len() >= usize::from(self.channel_max) {
                    return Err(AmqpError::new(
                        ReplyCode::NotAllowed,
                        format!(
                            "number of channels opened ({}) has reached the negotiated channel_max ({})",
                            self.channels.len(),
                            self.channel_max
                        ),
                    )
                    .on(20, 10));
                }
                let key = ChannelKey {
                    conn: self.id,
                    channel: id,
                    serial: self.node.next_id(),
                };
                self.channels.insert(
                    id,
                    Channel::new(id, key, self.node.config.limits.max_message_size),
                );
                frame::put_method(
                    &mut self.wbuf,
                    id,
                    AMQPClass::Channel(chan::AMQPMethod::OpenOk(chan::OpenOk {})),
                );
                Ok(())
            }
            // A late close-ok or close for a channel already gone is harmless.
            Frame::Method {
                method: AMQPClass::Channel(chan::AMQPMethod::CloseOk(_)),
                ..
            } => Ok(()),
            Frame::Method { method, .. } => Err(AmqpError::new(
                ReplyCode::ChannelError,
                "expected 'channel.open'",
            )
            .on(method.get_amqp_class_id(), method.get_amqp_method_id())),
            _ => Err(AmqpError::new(
                ReplyCode::ChannelError,
                "expected 'channel.open'",
            )),
        }
    }

    async fn on_connection_method(&mut self, m: AMQPClass) -> Result<(), AmqpError> {
        let ids = (m.get_amqp_class_id(), m.get_amqp_method_id());
        match m {
            AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                debug!(conn = self.id, code = c.reply_code, text = %c.reply_text, "client closed the connection");
                self.close_all_channels().await;
                frame::put_method(
                    &mut self.wbuf,
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                self.finished = true;
                self.client_closed = true;
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                self.finished = true;
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::Blocked(_))
            | AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => Ok(()),
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_)) => {
                frame::put_method(
                    &mut self.wbuf,
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(
                        connection::UpdateSecretOk {},
                    )),
                );
                Ok(())
            }
            _ => Err(
                AmqpError::new(ReplyCode::CommandInvalid, "unexpected method on channel 0")
                    .on(ids.0, ids.1),
            ),
        }
    }

    async fn on_channel_method(&mut self, id: u16, m: AMQPClass) -> Result<(), AmqpError> {
        // Settlements ride in the outbox with publishes; anything else may talk to the same
        // queues directly, so what was gathered goes first.
        if !matches!(
            m,
            AMQPClass::Basic(
                basic::AMQPMethod::Ack(_)
                    | basic::AMQPMethod::Nack(_)
                    | basic::AMQPMethod::Reject(_)
            )
        ) {
            self.flush_outbox().await;
        }
        match m {
            AMQPClass::Channel(c) => self.on_channel_class(id, c).await,
            AMQPClass::Exchange(x) => self.on_exchange(id, x).await,
            AMQPClass::Queue(q) => self.on_queue(id, q).await,
            AMQPClass::Basic(b) => self.on_basic(id, b).await,
            AMQPClass::Confirm(c) => self.on_confirm(id, c),
            AMQPClass::Tx(t) => self.on_tx(id, t).await,
            AMQPClass::Access(_) => {
                frame::put_method(
                    &mut self.wbuf,
                    id,
                    AMQPClass::Access(amq_protocol::protocol::access::AMQPMethod::RequestOk(
                        amq_protocol::protocol::access::RequestOk {},
                    )),
                );
                Ok(())
            }
            AMQPClass::Connection(_) => Err(AmqpError::new(
                ReplyCode::CommandInvalid,
                "connection method on a non-zero channel",
            )),
        }
    }

    async fn on_channel_class(&mut self, id: u16, m: chan::AMQPMethod) -> Result<(), AmqpError> {
        match m {
            chan::AMQPMethod::Open(_) => Err(AmqpError::new(
                ReplyCode::ChannelError,
                "second 'channel.open' seen",
            )),
            chan::AMQPMethod::Close(_) => {
                self.release_channel(id).await;
                self.channels.remove(&id);
                frame::put_method(
                    &mut self.wbuf,
                    id,
                    AMQPClass::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})),
                );
                Ok(())
            }
            chan::AMQPMethod::CloseOk(_) => Ok(()),
            chan::AMQPMethod::Flow(f) => {
                if !f.active {
                    return Err(AmqpError::not_implemented("active=false"));
                }
                frame::put_method(
                    &mut self.wbuf,
                    id,
                    AMQPClass::Channel(chan::AMQPMethod::FlowOk(chan::FlowOk { active: true })),
                );
                Ok(())
            }
            chan::AMQPMethod::FlowOk(_) => Ok(()),
            chan::AMQPMethod::OpenOk(_) => Err(AmqpError::new(
                ReplyCode::CommandInvalid,
                "unimplemented method",
            )),
        }
    }

    /// Handle what a queue owner sent.
    async fn on_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Deliver { queue, deliveries } => {
                let mut orphans: Vec<(ChannelKey, u64)> = Vec::new();
                for d in deliveries {
                    let Some(ch) = self.channels.get_mut(&d.channel.channel) else {
                        continue;
                    };
                    if ch.key != d.channel || ch.state != ChannelState::Open {
                        continue;
                    }
                    if !ch.consumers.contains_key(&*d.tag) {
                        // Cancelled while this was in flight: give it back.
                        if !d.no_ack {
                            orphans.push((d.channel, d.seq));
                        }
                        continue;
                    }
                    ch.last_tag += 1;
                    let tag = ch.last_tag;
                    if !d.no_ack {
                        ch.unacked.insert(
                            tag,
                            Unacked {
                                queue: queue.clone(),
                                seq: d.seq,
                                counted: true,
                            },
                        );
                    }
                    frame::put_deliver(
                        &mut self.wbuf,
                        d.channel.channel,
                        &d.tag,
                        tag,
                        d.redelivered,
                        &d.msg.exchange,
                        &d.msg.routing_key,
                    );
                    frame::put_content(
                        &mut self.wbuf,
                        d.channel.channel,
                        &d.msg.properties_raw,
                        &d.msg.body,
                        self.frame_max,
                    );
                }
                // Give orphans back per channel, with the prefetch credit they took.
                while let Some(&(channel, _)) = orphans.first() {
                    let (mine, rest): (Vec<_>, Vec<_>) =
                        orphans.into_iter().partition(|(c, _)| *c == channel);
                    orphans = rest;
                    let n = u32::try_from(mine.len()).unwrap_or(u32::MAX);
                    let seqs = mine.into_iter().map(|(_, s)| s).collect();
                    // Credit first: the queue hands the message on as soon as it has it
                    // back, and must find the credit there (a consumer it refused may be
                    // waiting for exactly this unit).
                    let woken = self
                        .channels
                        .get(&channel.channel)
                        .is_some_and(|ch| ch.limiter.release(n));
                    queue
                        .send(QueueCmd::Reject {
                            channel,
                            seqs,
                            requeue: true,
                        })
                        .await;
                    if woken {
                        self.wake_consumers(channel.channel).await;
                    }
                }
            }
            ConnEvent::Confirm { channel, seqs, ok } => {
                let Some(ch) = self.channels.get_mut(&channel.channel) else {
                    return;
                };
                if ch.key != channel {
                    return;
                }
                if let Some(t) = ch.confirms.as_mut() {
                    t.settle(&seqs, ok);
                }
                self.write_confirms(channel.channel);
            }
            ConnEvent::Reroute {
                queue,
                msg,
                confirm,
            } => {
                let cmd = QueueCmd::Publish {
                    msg: msg.as_resent(),
                    confirm: Some(confirm),
                };
                self.republish(queue, vec![cmd]).await;
            }
            ConnEvent::DirectReply { channel, tag, msg } => {
                let Some(ch) = self.channels.get_mut(&channel.channel) else {
                    return;
                };
                if ch.key != channel
                    || ch.state != ChannelState::Open
                    || ch.reply_to.as_ref().is_none_or(|r| *r.tag != *tag)
                {
                    return;
                }
                ch.last_tag += 1;
                let delivery_tag = ch.last_tag;
                frame::put_deliver(
                    &mut self.wbuf,
                    channel.channel,
                    &tag,
                    delivery_tag,
                    false,
                    &msg.exchange,
                    &msg.routing_key,
                );
                frame::put_content(
                    &mut self.wbuf,
                    channel.channel,
                    &msg.properties_raw,
                    &msg.body,
                    self.frame_max,
                );
            }
            ConnEvent::Cancelled { channel, tag } => {
                let Some(ch) = self.channels.get_mut(&channel.channel) else {
                    return;
                };
                if ch.key != channel || ch.consumers.remove(&*tag).is_none() {
                    return;
                }
                if self.caps.consumer_cancel_notify {
                    frame::put_method(
                        &mut self.wbuf,
                        channel.channel,
                        AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                            consumer_tag: tag.as_ref().into(),
                            nowait: true,
                        })),
                    );
                }
            }
        }
    }

    /// Write the confirm replies a channel has ready.
    pub(crate) fn write_confirms(&mut self, id: u16) {
        let Some(ch) = self.channels.get_mut(&id) else {
            return;
        };
        let Some(t) = ch.confirms.as_mut() else {
            return;
        };
        for r in t.take_replies() {
            let m = if r.ack {
                basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: r.tag,
                    multiple: r.multiple,
                })
            } else {
                basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: r.tag,
                    multiple: r.multiple,
                    requeue: false,
                })
            };
            frame::put_method(&mut self.wbuf, id, AMQPClass::Basic(m));
        }
    }

    /// Settle deliveries on their queues and return prefetch credit.
    pub(crate) async fn settle(&mut self, id: u16, items: Vec<Unacked>, how: Settle) {
        let Some(ch) = self.channels.get(&id) else {
            return;
        };
        let key = ch.key;
        let limiter = ch.limiter.clone();
        let mut released = 0;
        for (q, seqs, counted) in group_by_queue(items) {
            released += counted;
            let cmd = match how {
                Settle::Ack => QueueCmd::Ack { channel: key, seqs },
                Settle::Requeue => QueueCmd::Reject {
                    channel: key,
                    seqs,
                    requeue: true,
                },
                Settle::Drop => QueueCmd::Reject {
                    channel: key,
                    seqs,
                    requeue: false,
                },
            };
            self.post(&q, cmd);
        }
        if limiter.release(released) {
            self.wake_consumers(id).await;
        }
    }

    /// Nudge every queue this channel consumes from (prefetch credit came back).
    pub(crate) async fn wake_consumers(&mut self, id: u16) {
        let Some(ch) = self.channels.get(&id) else {
            return;
        };
        let mut seen = Vec::new();
        let queues: Vec<QueueHandle> = ch
            .consumers
            .values()
            .filter(|c| {
                let qid = c.queue.shared().id;
                if seen.contains(&qid) {
                    false
                } else {
                    seen.push(qid);
                    true
                }
            })
            .map(|c| c.queue.clone())
            .collect();
        for q in queues {
            self.post(&q, QueueCmd::Wake);
        }
    }

    /// The open channel `id` (handlers run only on open channels).
    pub(crate) fn ch(&mut self, id: u16) -> Result<&mut Channel, AmqpError> {
        self.channels
            .get_mut(&id)
            .ok_or_else(|| AmqpError::new(ReplyCode::ChannelError, "expected 'channel.open'"))
    }

    /// The authenticated user.
    pub(crate) fn user_name(&self) -> &str {
        &self.user
    }

    /// Write a method reply on a channel.
    pub(crate) fn reply(&mut self, id: u16, m: AMQPClass) {
        frame::put_method(&mut self.wbuf, id, m);
    }
}

/// How deliveries are settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// basic.ack.
    Ack,
    /// nack/reject with requeue, or recover.
    Requeue,
    /// nack/reject without requeue.
    Drop,
}

/// A handshake step failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameOrIo {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn collect_confirms(cmd: QueueCmd, out: &mut Vec<(ChannelKey, u64)>) {
    match cmd {
        QueueCmd::Publish {
            confirm: Some(c), ..
        } => out.push((c.channel, c.seq)),
        QueueCmd::Batch(cmds) => {
            for c in cmds {
                collect_confirms(c, out);
            }
        }
        _ => {}
    }
}

fn collect_publishes(cmd: QueueCmd, out: &mut Vec<QueueCmd>) {
    match cmd {
        p @ QueueCmd::Publish { .. } => out.push(p),
        QueueCmd::Batch(cmds) => {
            for c in cmds {
                collect_publishes(c, out);
            }
        }
        _ => {}
    }
}
