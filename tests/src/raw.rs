//! A deliberately minimal AMQP 0-9-1 client over a plain TCP socket, for tests that must send
//! what no well-behaved client library would: bad headers, broken frames, methods out of order.
//!
//! Only the handful of methods the tests need are encoded; everything else is raw bytes.

use anyhow::{Context, bail};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The protocol header of AMQP 0-9-1.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// Frame types.
pub const FRAME_METHOD: u8 = 1;
/// Content header frame type.
pub const FRAME_HEADER: u8 = 2;
/// Content body frame type.
pub const FRAME_BODY: u8 = 3;
/// Heartbeat frame type.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;

/// How long any single read waits before the test fails instead of hanging.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A method frame, with its arguments still encoded.
    Method {
        /// Channel number.
        channel: u16,
        /// Class id.
        class: u16,
        /// Method id.
        method: u16,
        /// Encoded arguments.
        args: Vec<u8>,
    },
    /// Any other frame type (content header, body, heartbeat).
    Other {
        /// Frame type octet.
        kind: u8,
        /// Channel number.
        channel: u16,
        /// Payload.
        payload: Vec<u8>,
    },
}

/// The arguments of `connection.close` or `channel.close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// Reply code, e.g. 501 FRAME_ERROR.
    pub code: u16,
    /// Reply text.
    pub text: String,
    /// Class id of the failing method (0 if none).
    pub class_id: u16,
    /// Method id of the failing method (0 if none).
    pub method_id: u16,
}

/// The parameters the server proposed in `connection.tune`.
#[derive(Debug, Clone, Copy)]
pub struct Tune {
    /// channel-max.
    pub channel_max: u16,
    /// frame-max.
    pub frame_max: u32,
    /// heartbeat (seconds).
    pub heartbeat: u16,
}

/// A raw AMQP connection.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    /// Open a TCP connection to `addr` (`host:port`). Nothing is sent yet.
    pub fn connect(addr: &str) -> anyhow::Result<RawConn> {
        let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        stream.set_nodelay(true)?;
        Ok(RawConn {
            stream,
            buf: Vec::new(),
        })
    }

    /// Write bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream
            .write_all(bytes)
            .context("writing to the broker")?;
        Ok(())
    }

    /// Shut down the writing half: the broker sees end of stream.
    pub fn shutdown_write(&mut self) -> anyhow::Result<()> {
        self.stream.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    }

    /// Write one frame.
    pub fn send_frame(&mut self, kind: u8, channel: u16, payload: &[u8]) -> anyhow::Result<()> {
        self.send_raw(&frame(kind, channel, payload))
    }

    /// Write one method frame.
    pub fn send_method(
        &mut self,
        channel: u16,
        class: u16,
        method: u16,
        args: &[u8],
    ) -> anyhow::Result<()> {
        self.send_frame(FRAME_METHOD, channel, &method_payload(class, method, args))
    }

    /// Read bytes until at least `n` are buffered. Ok(false) on end of stream.
    fn fill(&mut self, n: usize, deadline: Instant) -> anyhow::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        while self.buf.len() < n {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if Instant::now() > deadline {
                        bail!("timed out waiting for data from the broker");
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // A reset after the broker closed is an end of stream for our purposes.
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(false),
                Err(e) => return Err(e).context("reading from the broker"),
            }
        }
        Ok(true)
    }

    /// Read exactly `n` raw bytes (e.g. a protocol header the server answers with).
    /// Returns fewer if the stream ends first.
    pub fn read_bytes(&mut self, n: usize) -> anyhow::Result<Vec<u8>> {
        let deadline = Instant::now() + READ_TIMEOUT;
        self.fill(n, deadline)?;
        let take = n.min(self.buf.len());
        Ok(self.buf.drain(..take).collect())
    }

    /// Read the next frame; `None` at end of stream.
    pub fn read_frame(&mut self) -> anyhow::Result<Option<Frame>> {
        let deadline = Instant::now() + READ_TIMEOUT;
        if !self.fill(7, deadline)? {
            if self.buf.is_empty() {
                return Ok(None);
            }
            bail!("stream ended inside a frame header: {:?}", self.buf);
        }
        let kind = self.buf[0];
        let channel = u16::from_be_bytes([self.buf[1], self.buf[2]]);
        let size =
            u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]]) as usize;
        if size > 16 * 1024 * 1024 {
            bail!("implausible frame size {size} from the broker");
        }
        if !self.fill(7 + size + 1, deadline)? {
            bail!("stream ended inside a frame of {size} bytes");
        }
        let payload: Vec<u8> = self.buf[7..7 + size].to_vec();
        let end = self.buf[7 + size];
        self.buf.drain(..7 + size + 1);
        if end != FRAME_END {
            bail!("frame from the broker ends with {end:#x}, not 0xCE");
        }
        if kind == FRAME_METHOD {
            if payload.len() < 4 {
                bail!("short method frame from the broker");
            }
            return Ok(Some(Frame::Method {
                channel,
                class: u16::from_be_bytes([payload[0], payload[1]]),
                method: u16::from_be_bytes([payload[2], payload[3]]),
                args: payload[4..].to_vec(),
            }));
        }
        Ok(Some(Frame::Other {
            kind,
            channel,
            payload,
        }))
    }

    /// Read the next method frame, skipping heartbeats; fails at end of stream.
    pub fn read_method(&mut self) -> anyhow::Result<(u16, u16, u16, Vec<u8>)> {
        loop {
            match self.read_frame()? {
                None => bail!("the broker closed the connection"),
                Some(Frame::Method {
                    channel,
                    class,
                    method,
                    args,
                }) => return Ok((channel, class, method, args)),
                Some(Frame::Other {
                    kind: FRAME_HEARTBEAT,
                    ..
                }) => {}
                Some(other) => bail!("expected a method frame, got {other:?}"),
            }
        }
    }

    /// Read until the server closes the socket, returning every frame it sent on the way.
    pub fn read_until_eof(&mut self) -> anyhow::Result<Vec<Frame>> {
        let mut frames = Vec::new();
        let deadline = Instant::now() + READ_TIMEOUT;
        loop {
            if Instant::now() > deadline {
                bail!("the broker kept the connection open, sending {frames:?}");
            }
            match self.read_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => return Ok(frames),
                Err(e) => return Err(e.context(format!("after frames {frames:?}"))),
            }
        }
    }

    /// Send the protocol header and complete the handshake as `user`/`pass` on vhost `/`,
    /// accepting the server's tuning (no heartbeats).
    pub fn handshake(&mut self, user: &str, pass: &str) -> anyhow::Result<Tune> {
        let tune = self.start_and_tune(user, pass)?;
        self.send_method(0, 10, 31, &tune_args(tune.channel_max, tune.frame_max, 0))?;
        let mut open = shortstr("/");
        open.extend(shortstr(""));
        open.push(0);
        self.send_method(0, 10, 40, &open)?;
        let (ch, class, method, args) = self.read_method()?;
        if (ch, class, method) != (0, 10, 41) {
            bail!("expected connection.open-ok, got {class}.{method} {args:?}");
        }
        Ok(tune)
    }

    /// Send the header and start-ok; return the server's `connection.tune`. The client
    /// advertises `authentication_failure_close`, so a refused login yields connection.close.
    pub fn start_and_tune(&mut self, user: &str, pass: &str) -> anyhow::Result<Tune> {
        self.send_raw(PROTOCOL_HEADER)?;
        let (ch, class, method, _) = self.read_method()?;
        if (ch, class, method) != (0, 10, 10) {
            bail!("expected connection.start, got {class}.{method} on channel {ch}");
        }
        let mut capabilities = Vec::new();
        capabilities.extend(shortstr("authentication_failure_close"));
        capabilities.extend([b't', 1]);
        capabilities.extend(shortstr("publisher_confirms"));
        capabilities.extend([b't', 1]);
        let mut props = Vec::new();
        props.extend(shortstr("product"));
        props.push(b'S');
        props.extend(longstr(b"warren-tests raw client"));
        props.extend(shortstr("capabilities"));
        props.push(b'F');
        props.extend(table(&capabilities));
        let mut args = table(&props);
        args.extend(shortstr("PLAIN"));
        args.extend(longstr(format!("\0{user}\0{pass}").as_bytes()));
        args.extend(shortstr("en_US"));
        self.send_method(0, 10, 11, &args)?;
        let (ch, class, method, args) = self.read_method()?;
        if (ch, class, method) == (0, 10, 50) {
            let close = parse_close(&args)?;
            bail!(CloseError(close));
        }
        if (ch, class, method) != (0, 10, 30) || args.len() < 8 {
            bail!("expected connection.tune, got {class}.{method} {args:?}");
        }
        Ok(Tune {
            channel_max: u16::from_be_bytes([args[0], args[1]]),
            frame_max: u32::from_be_bytes([args[2], args[3], args[4], args[5]]),
            heartbeat: u16::from_be_bytes([args[6], args[7]]),
        })
    }

    /// Open channel `channel` and wait for open-ok.
    pub fn open_channel(&mut self, channel: u16) -> anyhow::Result<()> {
        self.send_method(channel, 20, 10, &shortstr(""))?;
        let (ch, class, method, args) = self.read_method()?;
        if (ch, class, method) != (channel, 20, 11) {
            bail!("expected channel.open-ok on {channel}, got {class}.{method} on {ch} {args:?}");
        }
        Ok(())
    }

    /// Read methods until `connection.close`; reply close-ok and return its arguments.
    pub fn expect_connection_close(&mut self) -> anyhow::Result<Close> {
        loop {
            let (ch, class, method, args) = self.read_method()?;
            if (ch, class, method) == (0, 10, 50) {
                let close = parse_close(&args)?;
                let _ = self.send_method(0, 10, 51, &[]);
                return Ok(close);
            }
        }
    }

    /// Read methods until `channel.close` on `channel`; reply close-ok and return it.
    pub fn expect_channel_close(&mut self, channel: u16) -> anyhow::Result<Close> {
        loop {
            let (ch, class, method, args) = self.read_method()?;
            if (ch, class, method) == (channel, 20, 40) {
                let close = parse_close(&args)?;
                self.send_method(channel, 20, 41, &[])?;
                return Ok(close);
            }
            if (ch, class, method) == (0, 10, 50) {
                bail!(
                    "expected channel.close on {channel}, got connection.close {:?}",
                    parse_close(&args)?
                );
            }
        }
    }
}

/// A `connection.close` received where the test expected something else.
#[derive(Debug)]
pub struct CloseError(pub Close);

impl std::fmt::Display for CloseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connection.close {} {}", self.0.code, self.0.text)
    }
}

impl std::error::Error for CloseError {}

/// Encode a frame.
pub fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.push(kind);
    out.extend(channel.to_be_bytes());
    out.extend((payload.len() as u32).to_be_bytes());
    out.extend(payload);
    out.push(FRAME_END);
    out
}

/// Encode a method frame payload.
pub fn method_payload(class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(args.len() + 4);
    out.extend(class.to_be_bytes());
    out.extend(method.to_be_bytes());
    out.extend(args);
    out
}

/// Encode a short string.
pub fn shortstr(s: &str) -> Vec<u8> {
    let mut out = vec![s.len() as u8];
    out.extend(s.as_bytes());
    out
}

/// Encode a long string.
pub fn longstr(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u32).to_be_bytes().to_vec();
    out.extend(s);
    out
}

/// Encode a field table from its already encoded entries.
pub fn table(entries: &[u8]) -> Vec<u8> {
    longstr(entries)
}

/// `connection.tune-ok` arguments.
pub fn tune_args(channel_max: u16, frame_max: u32, heartbeat: u16) -> Vec<u8> {
    let mut out = channel_max.to_be_bytes().to_vec();
    out.extend(frame_max.to_be_bytes());
    out.extend(heartbeat.to_be_bytes());
    out
}

/// `basic.publish` arguments.
pub fn publish_args(exchange: &str, routing_key: &str) -> Vec<u8> {
    let mut out = 0u16.to_be_bytes().to_vec();
    out.extend(shortstr(exchange));
    out.extend(shortstr(routing_key));
    out.push(0);
    out
}

/// A `basic` content header payload with no properties.
pub fn content_header(body_size: u64) -> Vec<u8> {
    let mut out = 60u16.to_be_bytes().to_vec();
    out.extend(0u16.to_be_bytes());
    out.extend(body_size.to_be_bytes());
    out.extend(0u16.to_be_bytes());
    out
}

/// `queue.declare` arguments (not passive, not durable, exclusive, auto-delete).
pub fn queue_declare_args(queue: &str) -> Vec<u8> {
    let mut out = 0u16.to_be_bytes().to_vec();
    out.extend(shortstr(queue));
    out.push(0b0000_1100);
    out.extend(table(&[]));
    out
}

/// Decode `connection.close` / `channel.close` arguments.
pub fn parse_close(args: &[u8]) -> anyhow::Result<Close> {
    let short = || anyhow::anyhow!("truncated close method: {args:?}");
    let code = u16::from_be_bytes([
        *args.first().ok_or_else(short)?,
        *args.get(1).ok_or_else(short)?,
    ]);
    let len = *args.get(2).ok_or_else(short)? as usize;
    let text = args.get(3..3 + len).ok_or_else(short)?;
    let rest = args.get(3 + len..3 + len + 4).ok_or_else(short)?;
    Ok(Close {
        code,
        text: String::from_utf8_lossy(text).into_owned(),
        class_id: u16::from_be_bytes([rest[0], rest[1]]),
        method_id: u16::from_be_bytes([rest[2], rest[3]]),
    })
}
