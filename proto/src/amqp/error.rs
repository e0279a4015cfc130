//! Reply codes and the typed errors of the AMQP 0-9-1 codec.
//!
//! Every decoding failure names the AMQP reply code RabbitMQ answers with and an explanation in
//! RabbitMQ's words, so the connection can send `connection.close` (or `channel.close` for the
//! one channel-level case) exactly as RabbitMQ would.

use std::fmt::Write as _;

use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::ShortString;

/// An AMQP 0-9-1 reply code, as used in `connection.close` and `channel.close`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplyCode {
    /// 200: normal close.
    Success,
    /// 311: the content was too large for the server to accept.
    ContentTooLarge,
    /// 312: a mandatory message could not be routed (basic.return).
    NoRoute,
    /// 313: an immediate message had no consumer (basic.return).
    NoConsumers,
    /// 320: an operator closed the connection.
    ConnectionForced,
    /// 402: the virtual host path is invalid.
    InvalidPath,
    /// 403: the client lacks the permission for the operation.
    AccessRefused,
    /// 404: the named entity does not exist.
    NotFound,
    /// 405: the entity is used exclusively by another connection.
    ResourceLocked,
    /// 406: a precondition of the operation failed.
    PreconditionFailed,
    /// 501: a malformed frame.
    FrameError,
    /// 502: a frame with illegal field values.
    SyntaxError,
    /// 503: an invalid sequence of methods.
    CommandInvalid,
    /// 504: a channel that is not open, or opened twice.
    ChannelError,
    /// 505: a frame the server did not expect.
    UnexpectedFrame,
    /// 506: the server ran out of a resource.
    ResourceError,
    /// 530: the operation is not allowed.
    NotAllowed,
    /// 540: functionality the server does not implement.
    NotImplemented,
    /// 541: an internal server error.
    InternalError,
}

impl ReplyCode {
    /// Every reply code, in numeric order.
    pub const ALL: [ReplyCode; 19] = [
        ReplyCode::Success,
        ReplyCode::ContentTooLarge,
        ReplyCode::NoRoute,
        ReplyCode::NoConsumers,
        ReplyCode::ConnectionForced,
        ReplyCode::InvalidPath,
        ReplyCode::AccessRefused,
        ReplyCode::NotFound,
        ReplyCode::ResourceLocked,
        ReplyCode::PreconditionFailed,
        ReplyCode::FrameError,
        ReplyCode::SyntaxError,
        ReplyCode::CommandInvalid,
        ReplyCode::ChannelError,
        ReplyCode::UnexpectedFrame,
        ReplyCode::ResourceError,
        ReplyCode::NotAllowed,
        ReplyCode::NotImplemented,
        ReplyCode::InternalError,
    ];

    /// The numeric code sent on the wire.
    pub const fn code(self) -> u16 {
        match self {
            ReplyCode::Success => 200,
            ReplyCode::ContentTooLarge => 311,
            ReplyCode::NoRoute => 312,
            ReplyCode::NoConsumers => 313,
            ReplyCode::ConnectionForced => 320,
            ReplyCode::InvalidPath => 402,
            ReplyCode::AccessRefused => 403,
            ReplyCode::NotFound => 404,
            ReplyCode::ResourceLocked => 405,
            ReplyCode::PreconditionFailed => 406,
            ReplyCode::FrameError => 501,
            ReplyCode::SyntaxError => 502,
            ReplyCode::CommandInvalid => 503,
            ReplyCode::ChannelError => 504,
            ReplyCode::UnexpectedFrame => 505,
            ReplyCode::ResourceError => 506,
            ReplyCode::NotAllowed => 530,
            ReplyCode::NotImplemented => 540,
            ReplyCode::InternalError => 541,
        }
    }

    /// The reply code with this numeric value, if AMQP 0-9-1 defines one.
    pub fn from_code(code: u16) -> Option<ReplyCode> {
        ReplyCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The name RabbitMQ puts at the start of the reply text, e.g. `NOT_FOUND`.
    pub const fn name(self) -> &'static str {
        match self {
            ReplyCode::Success => "OK",
            ReplyCode::ContentTooLarge => "CONTENT_TOO_LARGE",
            ReplyCode::NoRoute => "NO_ROUTE",
            ReplyCode::NoConsumers => "NO_CONSUMERS",
            ReplyCode::ConnectionForced => "CONNECTION_FORCED",
            ReplyCode::InvalidPath => "INVALID_PATH",
            ReplyCode::AccessRefused => "ACCESS_REFUSED",
            ReplyCode::NotFound => "NOT_FOUND",
            ReplyCode::ResourceLocked => "RESOURCE_LOCKED",
            ReplyCode::PreconditionFailed => "PRECONDITION_FAILED",
            ReplyCode::FrameError => "FRAME_ERROR",
            ReplyCode::SyntaxError => "SYNTAX_ERROR",
            ReplyCode::CommandInvalid => "COMMAND_INVALID",
            ReplyCode::ChannelError => "CHANNEL_ERROR",
            ReplyCode::UnexpectedFrame => "UNEXPECTED_FRAME",
            ReplyCode::ResourceError => "RESOURCE_ERROR",
            ReplyCode::NotAllowed => "NOT_ALLOWED",
            ReplyCode::NotImplemented => "NOT_IMPLEMENTED",
            ReplyCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// True for connection-level (hard) errors: they close the whole connection even when
    /// raised on a channel; soft errors close only the channel.
    pub const fn is_hard(self) -> bool {
        !matches!(
            self,
            ReplyCode::Success
                | ReplyCode::ContentTooLarge
                | ReplyCode::NoRoute
                | ReplyCode::NoConsumers
                | ReplyCode::AccessRefused
                | ReplyCode::NotFound
                | ReplyCode::ResourceLocked
                | ReplyCode::PreconditionFailed
        )
    }

    /// The reply text RabbitMQ sends: `NAME - explanation`, cut to the 255 bytes a short
    /// string can hold (on a character boundary).
    pub fn reply_text(self, explanation: &str) -> ShortString {
        let mut text = format!("{} - {}", self.name(), explanation);
        truncate_to_short_string(&mut text);
        ShortString::try_new(text).expect("text was cut to the short string limit")
    }
}

impl std::fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code(), self.name())
    }
}

impl TryFrom<u16> for ReplyCode {
    type Error = u16;

    fn try_from(code: u16) -> Result<Self, Self::Error> {
        ReplyCode::from_code(code).ok_or(code)
    }
}

fn truncate_to_short_string(text: &mut String) {
    const MAX: usize = 255;
    if text.len() > MAX {
        let mut cut = MAX;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// The close method RabbitMQ sends for an error raised on `channel`: `channel.close` on that
/// channel for a soft error, else `connection.close` on channel 0 (hard errors, and any error
/// on channel 0), as `rabbit_binary_generator:map_exception/2` does. Returns the channel to
/// send it on and the method.
pub fn close_method(
    channel: u16,
    code: ReplyCode,
    explanation: &str,
    (class_id, method_id): (u16, u16),
) -> (u16, AMQPClass) {
    let reply_code = code.code();
    let reply_text = code.reply_text(explanation);
    if code.is_hard() || channel == 0 {
        let close = connection::Close {
            reply_code,
            reply_text,
            class_id,
            method_id,
        };
        (
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(close)),
        )
    } else {
        let close = channel::Close {
            reply_code,
            reply_text,
            class_id,
            method_id,
        };
        (
            channel,
            AMQPClass::Channel(channel::AMQPMethod::Close(close)),
        )
    }
}

/// Why a frame, or a sequence of frames, was rejected.
///
/// The `Display` text is the explanation RabbitMQ gives for the same fault; use
/// [`FrameError::reply_text`] for the complete `reply-text` field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The connection did not open with `AMQP 0 0 9 1` (or the 0-9 header `AMQP 1 1 0 9`).
    /// The server answers with [`crate::amqp::PROTOCOL_HEADER`] and closes the socket; no
    /// close method is sent.
    #[error(
        "client did not start with AMQP protocol header: {}",
        erlang_binary(received, usize::MAX)
    )]
    BadProtocolHeader {
        /// The first eight octets the peer sent.
        received: [u8; 8],
    },
    /// The frame header announced a payload larger than the negotiated `frame_max`; checked
    /// before any payload is read. Input is out of sync: stop reading.
    #[error("type {frame_type}, all octets = <<>>: {{frame_too_large,{size},{}}}", frame_max.saturating_sub(8))]
    FrameTooLarge {
        /// The frame type octet.
        frame_type: u8,
        /// The channel the frame was sent on.
        channel: u16,
        /// The announced payload size.
        size: u32,
        /// The `frame_max` in force.
        frame_max: u32,
    },
    /// The octet after the payload was not the frame-end octet `0xCE`. Input is out of sync:
    /// stop reading.
    #[error("type {frame_type}, {snippet}: {{invalid_frame_end_marker,{found}}}")]
    BadFrameEnd {
        /// The frame type octet.
        frame_type: u8,
        /// The channel the frame was sent on.
        channel: u16,
        /// The octet found instead of `0xCE`.
        found: u8,
        /// The payload, as RabbitMQ quotes it.
        snippet: String,
    },
    /// An unknown frame type, a heartbeat with a payload, or a method or content header
    /// payload too short to hold its fixed fields.
    #[error("type {frame_type}, {snippet}: unknown_frame")]
    UnknownFrame {
        /// The frame type octet.
        frame_type: u8,
        /// The channel the frame was sent on.
        channel: u16,
        /// The payload, as RabbitMQ quotes it.
        snippet: String,
    },
    /// A well-formed frame on a channel where it can never appear: a heartbeat on a channel
    /// other than 0, or a content header or body on channel 0.
    #[error("type {frame_type}, {snippet}")]
    UnexpectedFrame {
        /// The frame type octet.
        frame_type: u8,
        /// The channel the frame was sent on.
        channel: u16,
        /// The payload, as RabbitMQ quotes it.
        snippet: String,
    },
    /// A method frame with a class id and method id that AMQP 0-9-1 (with RabbitMQ's
    /// extensions) does not define.
    #[error("unknown method: class {class_id}, method {method_id}")]
    UnknownMethod {
        /// The channel the frame was sent on.
        channel: u16,
        /// The class id.
        class_id: u16,
        /// The method id.
        method_id: u16,
    },
    /// A method RabbitMQ's method table knows but the server does not implement.
    #[error("unimplemented method")]
    UnimplementedMethod {
        /// The channel the frame was sent on.
        channel: u16,
        /// The class id.
        class_id: u16,
        /// The method id.
        method_id: u16,
    },
    /// `basic.qos` with a non-zero `prefetch_size`, which RabbitMQ does not implement.
    #[error("prefetch_size!=0 ({prefetch_size})")]
    PrefetchSizeNotImplemented {
        /// The channel the frame was sent on.
        channel: u16,
        /// The requested prefetch size.
        prefetch_size: u32,
    },
    /// A known method whose arguments do not decode (truncated, trailing octets, malformed
    /// UTF-8 in a short string, a bad field table).
    #[error("cannot decode {snippet}")]
    MalformedMethod {
        /// The channel the frame was sent on.
        channel: u16,
        /// The class id.
        class_id: u16,
        /// The method id.
        method_id: u16,
        /// The argument octets, as RabbitMQ quotes them.
        snippet: String,
    },
    /// Field tables or arrays nested deeper than [`crate::amqp::MAX_FIELD_NESTING`] levels
    /// in method arguments or content properties (`(0, 0)` method ids for properties).
    /// RabbitMQ has no such limit; Warren needs one to bound the parser's stack.
    #[error(
        "field tables nested more than {} levels deep",
        crate::amqp::MAX_FIELD_NESTING
    )]
    NestingTooDeep {
        /// The channel the frame was sent on.
        channel: u16,
        /// The class id (0 for content properties).
        class_id: u16,
        /// The method id (0 for content properties).
        method_id: u16,
    },
    /// A content header whose property list does not decode.
    #[error("cannot decode content properties {snippet}")]
    MalformedProperties {
        /// The channel the frame was sent on.
        channel: u16,
        /// The content class id.
        class_id: u16,
        /// The property octets, as RabbitMQ quotes them.
        snippet: String,
    },
    /// A content header or body arrived when a method was expected.
    #[error("expected method frame, got non method frame instead")]
    ExpectedMethod {
        /// The channel the frame was sent on.
        channel: u16,
    },
    /// A content-carrying method was followed by something other than a valid content header
    /// (another frame type, or a header with a non-zero weight).
    #[error("expected content header for class {class_id}, got non content header frame instead")]
    ExpectedHeader {
        /// The channel the frame was sent on.
        channel: u16,
        /// The class id of the pending method.
        class_id: u16,
        /// The method id of the pending method.
        method_id: u16,
    },
    /// A content header for another class than the pending method's.
    #[error("expected content header for class {class_id}, got one for class {found} instead")]
    HeaderClassMismatch {
        /// The channel the frame was sent on.
        channel: u16,
        /// The class id of the pending method.
        class_id: u16,
        /// The method id of the pending method.
        method_id: u16,
        /// The class id in the content header.
        found: u16,
    },
    /// A content header announcing more than the absolute limit of 512 MiB.
    #[error("content body size {body_size} exceeds maximum allowed size {max}")]
    BodyTooLarge {
        /// The channel the frame was sent on.
        channel: u16,
        /// The class id of the pending method.
        class_id: u16,
        /// The method id of the pending method.
        method_id: u16,
        /// The announced body size.
        body_size: u64,
        /// The absolute limit.
        max: u64,
    },
    /// A body frame larger than what remains of the announced body size.
    #[error("content body frame exceeds remaining content size")]
    BodyOverrun {
        /// The channel the frame was sent on.
        channel: u16,
        /// The class id of the pending method.
        class_id: u16,
        /// The method id of the pending method.
        method_id: u16,
    },
    /// Something other than a body frame arrived before the body was complete.
    #[error("expected content body, got non content body frame instead")]
    ExpectedBody {
        /// The channel the frame was sent on.
        channel: u16,
        /// The class id of the pending method.
        class_id: u16,
        /// The method id of the pending method.
        method_id: u16,
    },
    /// A message larger than the configured `max_message_size`: a channel error (406), the
    /// connection stays open.
    #[error("{}", message_too_large_text(*size, *max))]
    MessageTooLarge {
        /// The channel the message was published on.
        channel: u16,
        /// The class id of the publishing method.
        class_id: u16,
        /// The method id of the publishing method.
        method_id: u16,
        /// The announced body size.
        size: u64,
        /// The configured limit.
        max: u64,
    },
}

fn message_too_large_text(size: u64, max: u64) -> String {
    if max == crate::amqp::content::MAX_MESSAGE_SIZE_LIMIT {
        format!("message size {size} is larger than max size {max}")
    } else {
        format!("message size {size} is larger than configured max size {max}")
    }
}

impl FrameError {
    /// The reply code to close with. [`FrameError::BadProtocolHeader`] is never answered
    /// with a close method; it reports `FrameError` for logging only.
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            FrameError::BadProtocolHeader { .. }
            | FrameError::FrameTooLarge { .. }
            | FrameError::BadFrameEnd { .. }
            | FrameError::UnknownFrame { .. }
            | FrameError::MalformedMethod { .. }
            | FrameError::NestingTooDeep { .. }
            | FrameError::MalformedProperties { .. }
            | FrameError::BodyTooLarge { .. }
            | FrameError::BodyOverrun { .. } => ReplyCode::FrameError,
            FrameError::UnexpectedFrame { .. }
            | FrameError::ExpectedMethod { .. }
            | FrameError::ExpectedHeader { .. }
            | FrameError::HeaderClassMismatch { .. }
            | FrameError::ExpectedBody { .. } => ReplyCode::UnexpectedFrame,
            FrameError::UnknownMethod { .. } | FrameError::PrefetchSizeNotImplemented { .. } => {
                ReplyCode::NotImplemented
            }
            FrameError::UnimplementedMethod { .. } => ReplyCode::CommandInvalid,
            FrameError::MessageTooLarge { .. } => ReplyCode::PreconditionFailed,
        }
    }

    /// The complete `reply-text`: `NAME - explanation`, at most 255 bytes.
    pub fn reply_text(&self) -> ShortString {
        self.reply_code().reply_text(&self.to_string())
    }

    /// The channel the offending frame arrived on (0 for the protocol header).
    pub fn channel(&self) -> u16 {
        match self {
            FrameError::BadProtocolHeader { .. } => 0,
            FrameError::FrameTooLarge { channel, .. }
            | FrameError::BadFrameEnd { channel, .. }
            | FrameError::UnknownFrame { channel, .. }
            | FrameError::UnexpectedFrame { channel, .. }
            | FrameError::UnknownMethod { channel, .. }
            | FrameError::UnimplementedMethod { channel, .. }
            | FrameError::PrefetchSizeNotImplemented { channel, .. }
            | FrameError::MalformedMethod { channel, .. }
            | FrameError::NestingTooDeep { channel, .. }
            | FrameError::MalformedProperties { channel, .. }
            | FrameError::ExpectedMethod { channel }
            | FrameError::ExpectedHeader { channel, .. }
            | FrameError::HeaderClassMismatch { channel, .. }
            | FrameError::BodyTooLarge { channel, .. }
            | FrameError::BodyOverrun { channel, .. }
            | FrameError::ExpectedBody { channel, .. }
            | FrameError::MessageTooLarge { channel, .. } => *channel,
        }
    }

    /// The `(class-id, method-id)` of the method that caused the error, for the close
    /// method's fields; `(0, 0)` when no method is involved, as in RabbitMQ.
    pub fn method_ids(&self) -> (u16, u16) {
        match self {
            FrameError::UnknownMethod {
                class_id,
                method_id,
                ..
            }
            | FrameError::UnimplementedMethod {
                class_id,
                method_id,
                ..
            }
            | FrameError::MalformedMethod {
                class_id,
                method_id,
                ..
            }
            | FrameError::NestingTooDeep {
                class_id,
                method_id,
                ..
            }
            | FrameError::ExpectedHeader {
                class_id,
                method_id,
                ..
            }
            | FrameError::HeaderClassMismatch {
                class_id,
                method_id,
                ..
            }
            | FrameError::BodyTooLarge {
                class_id,
                method_id,
                ..
            }
            | FrameError::BodyOverrun {
                class_id,
                method_id,
                ..
            }
            | FrameError::ExpectedBody {
                class_id,
                method_id,
                ..
            }
            | FrameError::MessageTooLarge {
                class_id,
                method_id,
                ..
            } => (*class_id, *method_id),
            FrameError::PrefetchSizeNotImplemented { .. } => (60, 10),
            _ => (0, 0),
        }
    }

    /// True when the decoder lost sync with the byte stream: nothing more can be read, the
    /// server sends its close and shuts the socket without waiting for `close-ok`.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            FrameError::BadProtocolHeader { .. }
                | FrameError::FrameTooLarge { .. }
                | FrameError::BadFrameEnd { .. }
        )
    }

    /// The close to send for this error (see [`close_method`]): the channel to send it on and
    /// the method. `None` for [`FrameError::BadProtocolHeader`], which is answered with
    /// [`crate::amqp::PROTOCOL_HEADER`] instead.
    pub fn close_method(&self) -> Option<(u16, AMQPClass)> {
        if let FrameError::BadProtocolHeader { .. } = self {
            return None;
        }
        Some(close_method(
            self.channel(),
            self.reply_code(),
            &self.to_string(),
            self.method_ids(),
        ))
    }

    /// True when only the channel is closed (`channel.close`); every other error closes the
    /// connection (`connection.close`).
    pub fn is_channel_error(&self) -> bool {
        !self.reply_code().is_hard()
    }
}

/// Quotes a payload the way RabbitMQ's frame errors do: `all octets = <<...>>` for up to 16
/// octets, else `first 16 octets = <<...>>`.
pub(crate) fn payload_snippet(payload: &[u8]) -> String {
    if payload.len() <= 16 {
        format!("all octets = {}", erlang_binary(payload, 16))
    } else {
        format!("first 16 octets = {}", erlang_binary(&payload[..16], 16))
    }
}

/// Formats octets as an Erlang binary: `<<"text">>` when printable ASCII, else
/// `<<1,2,3>>`; at most `limit` octets are shown (the reply text is cut at 255 bytes anyway).
pub(crate) fn erlang_binary(bytes: &[u8], limit: usize) -> String {
    let shown = &bytes[..bytes.len().min(limit)];
    let mut out = String::from("<<");
    if !shown.is_empty() && shown.iter().all(|b| (0x20..=0x7e).contains(b)) {
        out.push('"');
        for &b in shown {
            if b == b'"' || b == b'\\' {
                out.push('\\');
            }
            out.push(char::from(b));
        }
        out.push('"');
    } else {
        for (i, b) in shown.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{b}");
        }
    }
    if shown.len() < bytes.len() {
        out.push_str(",...");
    }
    out.push_str(">>");
    out
}

/// Why a frame could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The method arguments could not be serialized.
    #[error("cannot serialize {what}: {reason}")]
    Serialize {
        /// What was being serialized.
        what: &'static str,
        /// The serializer's message.
        reason: String,
    },
    /// A single frame's payload would not fit in the 32-bit size field or in `frame_max`.
    #[error("frame payload of {size} octets exceeds the limit of {max}")]
    FrameTooLarge {
        /// The payload size.
        size: usize,
        /// The limit.
        max: u64,
    },
    /// The content header's body size differs from the body given.
    #[error("content header announces {announced} octets but the body has {actual}")]
    BodySizeMismatch {
        /// The size in the content header.
        announced: u64,
        /// The size of the body.
        actual: u64,
    },
}
