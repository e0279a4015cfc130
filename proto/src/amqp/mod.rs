//! The AMQP 0-9-1 codec: bytes in, typed frames and commands out, and back.
//!
//! The method table (every class and method, RabbitMQ's extensions, the 14 basic properties,
//! field tables) comes from the `amq-protocol` crate, generated from RabbitMQ's AMQP 0-9-1
//! JSON spec; see `docs/rfcs/0002-amqp-codec.md`. Framing, limits and the mapping of every
//! fault to RabbitMQ's reply are Warren's.
//!
//! # API
//!
//! Reading (per connection, the connection owns its read buffer):
//! - [`FrameDecoder::new`] (server: protocol header first, `frame_max` = [`FRAME_MIN_SIZE`]
//!   until tuned), [`FrameDecoder::without_protocol_header`] (client side),
//!   [`FrameDecoder::set_frame_max`] after `connection.tune-ok`.
//! - [`FrameDecoder::decode`]`(&mut BytesMut) -> Result<Option<Frame>, FrameError>`:
//!   `Ok(None)` = need more bytes (never an error); body payloads share the buffer's memory.
//! - [`decode_protocol_header`] on its own, if the caller handles the handshake itself.
//! - [`ContentAssembler`] (one per channel): [`ContentAssembler::push`]`(Frame) ->
//!   Result<Option<Command>, FrameError>` turns method/header/body frames into
//!   [`Command::Method`] or [`Command::Content`] ([`Content`]: method, [`ContentHeader`],
//!   [`MessageBody`]), enforcing `max_message_size` ([`DEFAULT_MAX_MESSAGE_SIZE`]).
//! - [`FrameError`]: [`FrameError::reply_code`] ([`ReplyCode`]), [`FrameError::reply_text`]
//!   (`"FRAME_ERROR - ..."`), [`FrameError::method_ids`] (class-id, method-id for the close),
//!   [`FrameError::channel`], [`FrameError::is_channel_error`] (send `channel.close`, else
//!   `connection.close`), [`FrameError::is_fatal`] (stream out of sync: stop reading).
//!   [`FrameError::BadProtocolHeader`]: write [`PROTOCOL_HEADER`] and close the socket.
//!   [`FrameError::close_method`] builds the `connection.close`/`channel.close` to send;
//!   [`close_method`] does the same for any [`ReplyCode`] (RabbitMQ's `map_exception`).
//!
//! Writing (append to the connection's write buffer):
//! - [`encode_method`], [`encode_content`] (method + header + body frames split by
//!   `frame_max`), [`encode_heartbeat`], [`encode_frame`], [`encode_content_header`],
//!   [`encode_body`].
//! - Per-message fast paths, byte-identical to the generated encoders: [`encode_deliver`],
//!   [`encode_ack`], [`encode_nack`], [`encode_content_header_raw`] (stored raw
//!   properties), [`encode_body_frames`].
//!
//! A server read loop:
//!
//! ```
//! use bytes::BytesMut;
//! use warren_proto::amqp::{Command, ContentAssembler, Frame, FrameDecoder, FrameError};
//!
//! fn on_readable(
//!     decoder: &mut FrameDecoder,
//!     read_buf: &mut BytesMut,
//!     channels: &mut std::collections::HashMap<u16, ContentAssembler>,
//! ) -> Result<(), FrameError> {
//!     // `read_buf` was filled by `socket.read_buf(read_buf)`.
//!     while let Some(frame) = decoder.decode(read_buf)? {
//!         match frame {
//!             Frame::ProtocolHeader(_version) => { /* send connection.start */ }
//!             Frame::Heartbeat => { /* note liveness */ }
//!             Frame::Method { channel: 0, method } => { /* connection class */ let _ = method; }
//!             frame => {
//!                 let assembler = channels.entry(frame.channel()).or_default();
//!                 match assembler.push(frame)? {
//!                     Some(Command::Method(_method)) => {}
//!                     Some(Command::Content(_content)) => { /* basic.publish */ }
//!                     None => {}
//!                 }
//!             }
//!         }
//!     }
//!     Ok(())
//! }
//! # let mut decoder = FrameDecoder::new();
//! # let mut buf = BytesMut::from(&b"AMQP\x00\x00\x09\x01\x08\x00\x00\x00\x00\x00\x00\xce"[..]);
//! # on_readable(&mut decoder, &mut buf, &mut Default::default()).unwrap();
//! # assert!(buf.is_empty());
//! ```
//!
//! Notes for users of the generated types:
//! - In field tables use `AMQPValue::LongString` for strings: `AMQPValue::ShortString` has no
//!   type tag RabbitMQ accepts and is never produced by decoding.
//! - `basic.qos`'s `prefetch_size` is not kept by `amq-protocol` (RabbitMQ refuses a
//!   non-zero value with 540 NOT_IMPLEMENTED); decoding a `basic.qos` frame therefore reports
//!   a non-zero `prefetch_size` as [`FrameError::PrefetchSizeNotImplemented`].
//! - Tables nested deeper than [`MAX_FIELD_NESTING`] are refused before parsing
//!   ([`FrameError::NestingTooDeep`]): the generated parser recurses.
//! - Once a connection has sent `connection.close`, RabbitMQ only looks at methods on channel
//!   0 until `close-ok`: ignore non-fatal decode errors and other frames then.
//! - Body fragments and raw properties share the read buffer; copy what is kept in memory
//!   with [`MessageBody::to_compact_bytes`] and [`ContentHeader::compact`]. Use `ShortString::try_new` (not `From`, which panics
//!   beyond 255 octets) for names derived from input.

mod content;
mod error;
mod frame;
mod hot;
mod nesting;
mod writer;

pub use content::{
    Command, Content, ContentAssembler, DEFAULT_MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE_LIMIT,
    MessageBody, encode_content, method_has_content,
};
pub use error::{EncodeError, FrameError, ReplyCode, close_method};
pub use frame::{
    BASIC_CLASS_ID, ContentHeader, DEFAULT_FRAME_MAX, FRAME_BODY, FRAME_END, FRAME_HEADER,
    FRAME_HEARTBEAT, FRAME_METHOD, FRAME_MIN_SIZE, FRAME_OVERHEAD, Frame, FrameDecoder,
    PROTOCOL_HEADER, decode_protocol_header, encode_body, encode_content_header, encode_frame,
    encode_heartbeat, encode_method,
};
pub use hot::{
    encode_ack, encode_body_frames, encode_content_header_raw, encode_deliver, encode_nack,
};
pub use nesting::MAX_FIELD_NESTING;

/// The AMQP protocol version of a protocol header.
pub use amq_protocol::frame::ProtocolVersion;
/// The 14 basic content properties (`basic::AMQPProperties`).
pub use amq_protocol::protocol::BasicProperties;
/// Every AMQP class with its methods; per-class method enums and argument structs live in
/// the class modules.
pub use amq_protocol::protocol::{
    AMQPClass, access, basic, channel, confirm, connection, constants, exchange, metadata, queue,
    tx,
};
/// AMQP field values and containers as RabbitMQ encodes them.
pub use amq_protocol::types::{
    AMQPType, AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
    ShortStringError,
};
