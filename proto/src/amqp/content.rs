//! Content assembly (method, header, body frames into one message) and content encoding.
//!
//! I/O free: the connection pushes each channel's frames into that channel's
//! [`ContentAssembler`] and gets back complete commands, or the error RabbitMQ's
//! `rabbit_command_assembler` and channel would raise for the same sequence.

use amq_protocol::protocol::{AMQPClass, basic};
use bytes::{Bytes, BytesMut};

use super::error::{EncodeError, FrameError};
use super::frame::{
    ContentHeader, Frame, encode_body, encode_content_header, encode_method, max_body_chunk,
};

/// RabbitMQ's default `max_message_size`: 128 MiB (134217728 octets).
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 134_217_728;
/// RabbitMQ's absolute body size limit (`?MAX_MSG_SIZE`, 512 MiB); a larger announced body is
/// a connection-level frame error whatever the configuration.
pub const MAX_MESSAGE_SIZE_LIMIT: u64 = 536_870_912;

/// A message body as received: the body frames' payloads, sharing the read buffer's memory
/// (see [`MessageBody::to_compact_bytes`] for bodies kept long).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageBody {
    chunks: Vec<Bytes>,
    len: u64,
}

impl MessageBody {
    /// An empty body.
    pub fn new() -> Self {
        MessageBody::default()
    }

    /// Appends a fragment (empty fragments are dropped, so a peer cannot grow the list
    /// without growing the size).
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len() as u64;
            self.chunks.push(chunk);
        }
    }

    /// The body size in octets.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty body.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The fragments, in order.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// The body as one buffer; free when it arrived in a single frame, one copy otherwise.
    pub fn to_bytes(&self) -> Bytes {
        match self.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut out = BytesMut::with_capacity(self.len as usize);
                for chunk in many {
                    out.extend_from_slice(chunk);
                }
                out.freeze()
            }
        }
    }
}

impl MessageBody {
    /// The body in one right-sized allocation of its own. Received fragments share the
    /// connection's read buffer, so a small body kept for long would pin a whole buffer; copy
    /// bodies that outlive the current batch (queued in memory) with this.
    pub fn to_compact_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.len as usize);
        for chunk in &self.chunks {
            out.extend_from_slice(chunk);
        }
        out.freeze()
    }
}

impl From<Bytes> for MessageBody {
    fn from(bytes: Bytes) -> Self {
        let mut body = MessageBody::new();
        body.push(bytes);
        body
    }
}

impl From<Vec<u8>> for MessageBody {
    fn from(bytes: Vec<u8>) -> Self {
        MessageBody::from(Bytes::from(bytes))
    }
}

impl From<&'static [u8]> for MessageBody {
    fn from(bytes: &'static [u8]) -> Self {
        MessageBody::from(Bytes::from_static(bytes))
    }
}

/// A content-carrying method with its header and body.
#[derive(Clone, Debug, PartialEq)]
pub struct Content {
    /// The method (`basic.publish` from clients).
    pub method: AMQPClass,
    /// The content header.
    pub header: ContentHeader,
    /// The body.
    pub body: MessageBody,
}

/// A complete command on a channel.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// A method without content.
    Method(AMQPClass),
    /// A method with its content.
    Content(Box<Content>),
}

/// Whether `method` is followed by a content header and body: `basic.publish`,
/// `basic.return`, `basic.deliver` and `basic.get-ok`.
pub fn method_has_content(method: &AMQPClass) -> bool {
    matches!(
        method,
        AMQPClass::Basic(
            basic::AMQPMethod::Publish(_)
                | basic::AMQPMethod::Return(_)
                | basic::AMQPMethod::Deliver(_)
                | basic::AMQPMethod::GetOk(_)
        )
    )
}

#[derive(Clone, Debug, Default)]
enum State {
    #[default]
    Method,
    Header(AMQPClass),
    Body {
        method: AMQPClass,
        header: Box<ContentHeader>,
        body: MessageBody,
    },
}

/// Per-channel content assembly state.
///
/// Memory is bounded by `max_message_size`: a header announcing more is refused before any
/// body frame is accepted. RabbitMQ checks `max_message_size` only once the whole body has
/// arrived; Warren checks the announced size instead, with the same reply (406
/// PRECONDITION_FAILED, same text), so it never buffers a message it will refuse.
#[derive(Clone, Debug)]
pub struct ContentAssembler {
    max_message_size: u64,
    state: State,
}

impl Default for ContentAssembler {
    fn default() -> Self {
        ContentAssembler::new(DEFAULT_MAX_MESSAGE_SIZE)
    }
}

impl ContentAssembler {
    /// An assembler refusing messages larger than `max_message_size` octets (capped at
    /// [`MAX_MESSAGE_SIZE_LIMIT`]).
    pub fn new(max_message_size: u64) -> Self {
        ContentAssembler {
            max_message_size: max_message_size.min(MAX_MESSAGE_SIZE_LIMIT),
            state: State::Method,
        }
    }

    /// The configured limit.
    pub fn max_message_size(&self) -> u64 {
        self.max_message_size
    }

    /// True between a content-carrying method and the end of its body.
    pub fn is_in_progress(&self) -> bool {
        !matches!(self.state, State::Method)
    }

    /// Octets of body buffered so far.
    pub fn buffered(&self) -> u64 {
        match &self.state {
            State::Body { body, .. } => body.len(),
            _ => 0,
        }
    }

    /// Forgets a partly received message (e.g. when the channel closes).
    pub fn reset(&mut self) {
        self.state = State::Method;
    }

    /// Feeds one frame of this channel. Returns a command when one is complete, `Ok(None)`
    /// while content is still arriving. After an error the assembler is reset.
    pub fn push(&mut self, frame: Frame) -> Result<Option<Command>, FrameError> {
        let result = self.step(frame);
        if result.is_err() {
            self.state = State::Method;
        }
        result
    }

    fn step(&mut self, frame: Frame) -> Result<Option<Command>, FrameError> {
        let channel = frame.channel();
        match std::mem::take(&mut self.state) {
            State::Method => match frame {
                Frame::Method { method, .. } => {
                    if method_has_content(&method) {
                        self.state = State::Header(method);
                        Ok(None)
                    } else {
                        Ok(Some(Command::Method(method)))
                    }
                }
                _ => Err(FrameError::ExpectedMethod { channel }),
            },
            State::Header(method) => {
                let class_id = method.get_amqp_class_id();
                let method_id = method.get_amqp_method_id();
                let header = match frame {
                    Frame::Header { header, .. } if header.weight == 0 => header,
                    _ => {
                        return Err(FrameError::ExpectedHeader {
                            channel,
                            class_id,
                            method_id,
                        });
                    }
                };
                if header.class_id != class_id {
                    return Err(FrameError::HeaderClassMismatch {
                        channel,
                        class_id,
                        method_id,
                        found: header.class_id,
                    });
                }
                if header.body_size > MAX_MESSAGE_SIZE_LIMIT {
                    return Err(FrameError::BodyTooLarge {
                        channel,
                        class_id,
                        method_id,
                        body_size: header.body_size,
                        max: MAX_MESSAGE_SIZE_LIMIT,
                    });
                }
                if header.body_size > self.max_message_size {
                    return Err(FrameError::MessageTooLarge {
                        channel,
                        class_id,
                        method_id,
                        size: header.body_size,
                        max: self.max_message_size,
                    });
                }
                if header.body_size == 0 {
                    return Ok(Some(Command::Content(Box::new(Content {
                        method,
                        header: *header,
                        body: MessageBody::new(),
                    }))));
                }
                self.state = State::Body {
                    method,
                    header,
                    body: MessageBody::new(),
                };
                Ok(None)
            }
            State::Body {
                method,
                header,
                mut body,
            } => {
                let class_id = method.get_amqp_class_id();
                let method_id = method.get_amqp_method_id();
                let payload = match frame {
                    Frame::Body { payload, .. } => payload,
                    _ => {
                        return Err(FrameError::ExpectedBody {
                            channel,
                            class_id,
                            method_id,
                        });
                    }
                };
                let remaining = header.body_size - body.len();
                if payload.len() as u64 > remaining {
                    return Err(FrameError::BodyOverrun {
                        channel,
                        class_id,
                        method_id,
                    });
                }
                body.push(payload);
                if body.len() == header.body_size {
                    Ok(Some(Command::Content(Box::new(Content {
                        method,
                        header: *header,
                        body,
                    }))))
                } else {
                    self.state = State::Body {
                        method,
                        header,
                        body,
                    };
                    Ok(None)
                }
            }
        }
    }
}

/// Appends a content-carrying method, its header and its body, split into body frames of at
/// most `frame_max - 8` octets (one frame for the whole body when `frame_max` is 0, as
/// RabbitMQ does). An empty body sends no body frame. The header's `body_size` must match.
pub fn encode_content(
    channel: u16,
    method: &AMQPClass,
    header: &ContentHeader,
    body: &MessageBody,
    frame_max: u32,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    if header.body_size != body.len() {
        return Err(EncodeError::BodySizeMismatch {
            announced: header.body_size,
            actual: body.len(),
        });
    }
    encode_method(channel, method, buf)?;
    encode_content_header(channel, header, buf)?;
    let chunk_max = max_body_chunk(frame_max);
    let mut pending = BytesMut::new();
    for chunk in body.chunks() {
        let mut rest: &[u8] = chunk;
        while !rest.is_empty() {
            if pending.is_empty() && rest.len() >= chunk_max {
                let (frame, tail) = rest.split_at(chunk_max);
                encode_body(channel, frame, buf)?;
                rest = tail;
                continue;
            }
            let take = (chunk_max - pending.len()).min(rest.len());
            pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if pending.len() == chunk_max {
                encode_body(channel, &pending, buf)?;
                pending.clear();
            }
        }
    }
    if !pending.is_empty() {
        encode_body(channel, &pending, buf)?;
    }
    Ok(())
}
