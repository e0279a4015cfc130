//! AMQP 0-9-1 framing: a bounded, incremental decoder and the frame encoders.
//!
//! The decoder is check-then-parse: it looks at the 7-octet frame header, rejects a payload
//! larger than `frame_max` before waiting for it, returns `Ok(None)` until the whole frame
//! (payload and frame-end octet) is buffered, and only then parses. Method arguments and
//! content properties are parsed by `amq-protocol`'s generated code; everything around them
//! (limits, sync, error mapping) is Warren's.

use amq_protocol::frame::{GenError, WriteContext};
use amq_protocol::protocol::{
    AMQPClass, BasicProperties, basic, constants, gen_class, parse_class,
};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use nom_shim::all_consuming;

use super::ProtocolVersion;
use super::error::{EncodeError, FrameError, erlang_binary, payload_snippet};
use super::hot::decode_hot_method;
use super::nesting::{MAX_FIELD_NESTING, may_exceed_nesting};
use super::writer::BufWriter;

/// The octets a server sends when it refuses a protocol header: `AMQP 0 0 9 1`.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";
/// Octets of framing around a payload: type, channel, size (7) and the frame-end octet (1).
pub const FRAME_OVERHEAD: u32 = 8;
/// The frame-end octet.
pub const FRAME_END: u8 = constants::FRAME_END;
/// Frame type of method frames.
pub const FRAME_METHOD: u8 = constants::FRAME_METHOD;
/// Frame type of content header frames.
pub const FRAME_HEADER: u8 = constants::FRAME_HEADER;
/// Frame type of content body frames.
pub const FRAME_BODY: u8 = constants::FRAME_BODY;
/// Frame type of heartbeat frames.
pub const FRAME_HEARTBEAT: u8 = constants::FRAME_HEARTBEAT;
/// The smallest `frame_max` a peer may negotiate, and the limit before `connection.tune-ok`
/// (RabbitMQ's `initial_frame_max` default, `FRAME_MIN_SIZE` = 8192).
pub const FRAME_MIN_SIZE: u32 = constants::FRAME_MIN_SIZE;
/// RabbitMQ's default `frame_max` offered in `connection.tune` (128 KiB).
pub const DEFAULT_FRAME_MAX: u32 = 131_072;
/// Class id of the `basic` class, the only class with content.
pub const BASIC_CLASS_ID: u16 = 60;

const FRAME_HEADER_LEN: usize = 7;
const CONTENT_HEADER_FIXED_LEN: usize = 12;

/// One decoded AMQP frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// The protocol header a client opens the connection with.
    ProtocolHeader(ProtocolVersion),
    /// A method frame.
    Method {
        /// The channel.
        channel: u16,
        /// The method and its arguments.
        method: AMQPClass,
    },
    /// A content header frame.
    Header {
        /// The channel.
        channel: u16,
        /// The content header (boxed: the 14 properties are large).
        header: Box<ContentHeader>,
    },
    /// A content body frame; the payload shares the read buffer's memory.
    Body {
        /// The channel.
        channel: u16,
        /// The body fragment.
        payload: Bytes,
    },
    /// A heartbeat (always on channel 0).
    Heartbeat,
}

impl Frame {
    /// The channel the frame belongs to (0 for the protocol header and heartbeats).
    pub fn channel(&self) -> u16 {
        match self {
            Frame::ProtocolHeader(_) | Frame::Heartbeat => 0,
            Frame::Method { channel, .. }
            | Frame::Header { channel, .. }
            | Frame::Body { channel, .. } => *channel,
        }
    }
}

/// A content header: the class, the body size and the properties.
///
/// A decoded header keeps the property octets exactly as the publisher sent them, and the
/// encoder re-sends those octets verbatim (as RabbitMQ does with `properties_bin`): header
/// order, duplicate keys and integer type tags in `headers` survive the trip. Replacing the
/// properties with [`ContentHeader::set_properties`] drops the raw octets. Equality compares
/// the decoded fields only, not how the properties were encoded.
#[derive(Clone, Debug)]
pub struct ContentHeader {
    /// The content class id (60 for `basic`).
    pub class_id: u16,
    /// The unused weight field; RabbitMQ rejects a non-zero weight.
    pub weight: u16,
    /// The total body size in octets.
    pub body_size: u64,
    properties: BasicProperties,
    raw_properties: Option<Bytes>,
}

impl PartialEq for ContentHeader {
    fn eq(&self, other: &Self) -> bool {
        self.class_id == other.class_id
            && self.weight == other.weight
            && self.body_size == other.body_size
            && self.properties == other.properties
    }
}

impl ContentHeader {
    /// A `basic` content header to be encoded from `properties`.
    pub fn new(body_size: u64, properties: BasicProperties) -> Self {
        ContentHeader {
            class_id: BASIC_CLASS_ID,
            weight: 0,
            body_size,
            properties,
            raw_properties: None,
        }
    }

    /// The decoded properties.
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// The property octets as received (flags and property list), if this header was
    /// decoded and its properties not replaced since.
    pub fn raw_properties(&self) -> Option<&Bytes> {
        self.raw_properties.as_ref()
    }

    /// Gives the raw property octets an allocation of their own. Decoded octets share the
    /// connection's read buffer; compact headers kept beyond the current batch.
    pub fn compact(&mut self) {
        if let Some(raw) = &self.raw_properties {
            self.raw_properties = Some(Bytes::copy_from_slice(raw));
        }
    }

    /// Replaces the properties; the encoder then serializes them instead of the raw octets.
    pub fn set_properties(&mut self, properties: BasicProperties) {
        self.properties = properties;
        self.raw_properties = None;
    }

    /// Takes the properties out, leaving the header with none.
    pub fn into_properties(self) -> BasicProperties {
        self.properties
    }
}

/// Accepts or refuses the 8-octet protocol header at the front of `buf`.
///
/// `Ok(None)`: fewer than 8 octets buffered (nothing consumed). `Ok(Some(version))`: the
/// header was consumed; `AMQP 0 0 9 1` gives 0.9.1 and the AMQP 0-9 header `AMQP 1 1 0 9`
/// gives 0.9.0, which RabbitMQ serves as 0-9-1. Anything else is
/// [`FrameError::BadProtocolHeader`]: write [`PROTOCOL_HEADER`] and close, as RabbitMQ does
/// (RabbitMQ decides on the first 8 octets too, including for HTTP and TLS hellos).
pub fn decode_protocol_header(buf: &mut BytesMut) -> Result<Option<ProtocolVersion>, FrameError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let mut received = [0u8; 8];
    received.copy_from_slice(&buf[..8]);
    let version = match received {
        [b'A', b'M', b'Q', b'P', 0, 0, 9, 1] => ProtocolVersion {
            major: 0,
            minor: 9,
            revision: 1,
        },
        [b'A', b'M', b'Q', b'P', 1, 1, 0, 9] => ProtocolVersion {
            major: 0,
            minor: 9,
            revision: 0,
        },
        _ => return Err(FrameError::BadProtocolHeader { received }),
    };
    buf.advance(8);
    Ok(Some(version))
}

/// The incremental frame decoder of one connection. It holds only limits and its phase, never
/// data: the caller owns the read buffer.
#[derive(Clone, Debug)]
pub struct FrameDecoder {
    frame_max: u32,
    expect_protocol_header: bool,
    failed: Option<FrameError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new()
    }
}

impl FrameDecoder {
    /// A server-side decoder: expects the protocol header first, and allows payloads of up to
    /// [`FRAME_MIN_SIZE`] octets until [`FrameDecoder::set_frame_max`] is called after
    /// `connection.tune-ok`.
    pub fn new() -> Self {
        FrameDecoder {
            frame_max: FRAME_MIN_SIZE,
            expect_protocol_header: true,
            failed: None,
        }
    }

    /// A decoder for a stream that starts directly with frames (a client reading a server),
    /// with the given `frame_max`.
    pub fn without_protocol_header(frame_max: u32) -> Self {
        FrameDecoder {
            frame_max,
            expect_protocol_header: false,
            failed: None,
        }
    }

    /// Sets the negotiated `frame_max`. Like RabbitMQ, a payload may be as large as
    /// `frame_max` itself (clients often forget the 8 octets of framing). 0 means no limit,
    /// as in the spec; the server should never negotiate 0.
    pub fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max;
    }

    /// The `frame_max` in force.
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// Decodes the next frame from the front of `buf`.
    ///
    /// `Ok(None)` means more input is needed (nothing was consumed); it is never an error.
    /// On success exactly the frame's octets are consumed. After a fatal error (see
    /// [`FrameError::is_fatal`]) nothing is consumed and every later call returns the same
    /// error; after any other error the offending frame was consumed and decoding may go on
    /// (to find `connection.close-ok`).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let result = self.decode_inner(buf);
        if let Err(error) = &result
            && error.is_fatal()
        {
            self.failed = Some(error.clone());
        }
        result
    }

    fn decode_inner(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if self.expect_protocol_header {
            return match decode_protocol_header(buf)? {
                Some(version) => {
                    self.expect_protocol_header = false;
                    Ok(Some(Frame::ProtocolHeader(version)))
                }
                None => Ok(None),
            };
        }
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let frame_type = buf[0];
        let channel = u16::from_be_bytes([buf[1], buf[2]]);
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
        if self.frame_max != 0 && size > self.frame_max {
            return Err(FrameError::FrameTooLarge {
                frame_type,
                channel,
                size,
                frame_max: self.frame_max,
            });
        }
        // Bounded by frame_max (or by u32::MAX when unlimited), so this cannot overflow.
        let payload_len = size as usize;
        let total = FRAME_HEADER_LEN + payload_len + 1;
        if buf.len() < total {
            // Room for the rest of this frame, so the next read can complete it; bounded by
            // frame_max, which was checked above (an unlimited frame_max reserves nothing).
            if self.frame_max != 0 {
                buf.reserve(total - buf.len());
            }
            return Ok(None);
        }
        let end = buf[total - 1];
        if end != FRAME_END {
            return Err(FrameError::BadFrameEnd {
                frame_type,
                channel,
                found: end,
                snippet: payload_snippet(&buf[FRAME_HEADER_LEN..total - 1]),
            });
        }
        buf.advance(FRAME_HEADER_LEN);
        let payload = buf.split_to(payload_len);
        buf.advance(1);
        decode_payload(frame_type, channel, payload).map(Some)
    }
}

fn decode_payload(frame_type: u8, channel: u16, payload: BytesMut) -> Result<Frame, FrameError> {
    match frame_type {
        FRAME_METHOD => decode_method(channel, &payload),
        FRAME_HEADER => {
            if payload.len() < CONTENT_HEADER_FIXED_LEN {
                return Err(unknown_frame(frame_type, channel, &payload));
            }
            if channel == 0 {
                return Err(unexpected_frame(frame_type, channel, &payload));
            }
            decode_content_header(channel, payload.freeze()).map(|header| Frame::Header {
                channel,
                header: Box::new(header),
            })
        }
        FRAME_BODY => {
            if channel == 0 {
                return Err(unexpected_frame(frame_type, channel, &payload));
            }
            Ok(Frame::Body {
                channel,
                payload: payload.freeze(),
            })
        }
        FRAME_HEARTBEAT => {
            if !payload.is_empty() {
                return Err(unknown_frame(frame_type, channel, &payload));
            }
            if channel != 0 {
                return Err(unexpected_frame(frame_type, channel, &payload));
            }
            Ok(Frame::Heartbeat)
        }
        _ => Err(unknown_frame(frame_type, channel, &payload)),
    }
}

fn unknown_frame(frame_type: u8, channel: u16, payload: &[u8]) -> FrameError {
    FrameError::UnknownFrame {
        frame_type,
        channel,
        snippet: payload_snippet(payload),
    }
}

fn unexpected_frame(frame_type: u8, channel: u16, payload: &[u8]) -> FrameError {
    FrameError::UnexpectedFrame {
        frame_type,
        channel,
        snippet: payload_snippet(payload),
    }
}

/// Methods in RabbitMQ's method table that `amq-protocol` leaves out: `basic.credit`,
/// `basic.credit-ok` and `basic.credit-drained`, once used by RabbitMQ's AMQP 1.0 plugin.
/// RabbitMQ's channel answers them with 503 "unimplemented method".
const RABBITMQ_ONLY_METHODS: [(u16, u16); 3] = [(60, 200), (60, 201), (60, 202)];

/// Enough zero octets to satisfy every method's arguments (the longest fixed part is 8
/// octets; strings and tables of length zero take 1 or 4 octets each).
const ZERO_ARGUMENTS: [u8; 64] = [0; 64];

fn decode_method(channel: u16, payload: &[u8]) -> Result<Frame, FrameError> {
    if payload.len() < 4 {
        return Err(unknown_frame(FRAME_METHOD, channel, payload));
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let method_id = u16::from_be_bytes([payload[2], payload[3]]);
    if may_exceed_nesting(&payload[4..], MAX_FIELD_NESTING) {
        return Err(FrameError::NestingTooDeep {
            channel,
            class_id,
            method_id,
        });
    }
    let decoded = match decode_hot_method(class_id, method_id, &payload[4..]) {
        Some(hot) => hot,
        None => all_consuming(parse_class, payload),
    };
    match decoded {
        Some(method) => {
            if let AMQPClass::Basic(basic::AMQPMethod::Qos(_)) = method {
                // amq-protocol drops prefetch-size (the first argument); RabbitMQ refuses a
                // non-zero one, so read it from the octets before they are gone.
                let prefetch_size =
                    u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                if prefetch_size != 0 {
                    return Err(FrameError::PrefetchSizeNotImplemented {
                        channel,
                        prefetch_size,
                    });
                }
            }
            Ok(Frame::Method { channel, method })
        }
        None => {
            if RABBITMQ_ONLY_METHODS.contains(&(class_id, method_id)) {
                Err(FrameError::UnimplementedMethod {
                    channel,
                    class_id,
                    method_id,
                })
            } else if !is_known_method(class_id, method_id) {
                Err(FrameError::UnknownMethod {
                    channel,
                    class_id,
                    method_id,
                })
            } else {
                Err(FrameError::MalformedMethod {
                    channel,
                    class_id,
                    method_id,
                    snippet: erlang_binary(&payload[4..], 64),
                })
            }
        }
    }
}

/// Whether the generated method table knows `(class_id, method_id)`: all-zero arguments decode
/// for every known method, so a failure here can only mean an unknown id. This keeps the
/// method table in one place, the generated code.
fn is_known_method(class_id: u16, method_id: u16) -> bool {
    let mut probe = Vec::with_capacity(4 + ZERO_ARGUMENTS.len());
    probe.extend_from_slice(&class_id.to_be_bytes());
    probe.extend_from_slice(&method_id.to_be_bytes());
    probe.extend_from_slice(&ZERO_ARGUMENTS);
    parse_class(probe.as_slice()).is_ok()
}

fn decode_content_header(channel: u16, payload: Bytes) -> Result<ContentHeader, FrameError> {
    let mut fixed = &payload[..CONTENT_HEADER_FIXED_LEN];
    let class_id = fixed.get_u16();
    let weight = fixed.get_u16();
    let body_size = fixed.get_u64();
    let raw = payload.slice(CONTENT_HEADER_FIXED_LEN..);
    // Only basic has properties; other classes are rejected by the content assembler with
    // the error RabbitMQ gives, so their property octets are kept but not parsed.
    let properties = if class_id == BASIC_CLASS_ID {
        if may_exceed_nesting(&raw, MAX_FIELD_NESTING) {
            return Err(FrameError::NestingTooDeep {
                channel,
                class_id: 0,
                method_id: 0,
            });
        }
        all_consuming(basic::parse_properties, &raw).ok_or_else(|| {
            FrameError::MalformedProperties {
                channel,
                class_id,
                snippet: erlang_binary(&raw, 64),
            }
        })?
    } else {
        BasicProperties::default()
    };
    Ok(ContentHeader {
        class_id,
        weight,
        body_size,
        properties,
        raw_properties: Some(raw),
    })
}

mod nom_shim {
    use amq_protocol::frame::ParserResult;

    /// Runs an `amq-protocol` parser over a complete payload: any error, "incomplete" or
    /// trailing octet means the payload is malformed.
    pub(super) fn all_consuming<'a, T>(
        parser: impl FnOnce(&'a [u8]) -> ParserResult<&'a [u8], T>,
        input: &'a [u8],
    ) -> Option<T> {
        match parser(input) {
            Ok((&[], value)) => Some(value),
            _ => None,
        }
    }
}

fn serialize_error(what: &'static str, error: GenError) -> EncodeError {
    EncodeError::Serialize {
        what,
        reason: format!("{error:?}"),
    }
}

fn check_payload(size: usize, frame_max: u32) -> Result<u32, EncodeError> {
    let max = if frame_max == 0 {
        u64::from(u32::MAX)
    } else {
        u64::from(frame_max - FRAME_OVERHEAD.min(frame_max))
    };
    match u32::try_from(size) {
        Ok(size32) if u64::from(size32) <= max => Ok(size32),
        _ => Err(EncodeError::FrameTooLarge { size, max }),
    }
}

fn put_frame_header(buf: &mut BytesMut, frame_type: u8, channel: u16, size: u32) {
    buf.put_u8(frame_type);
    buf.put_u16(channel);
    buf.put_u32(size);
}

/// Appends a method frame. Method frames are never split, so `frame_max` is not checked
/// here: the largest server method (`connection.start`) stays far below [`FRAME_MIN_SIZE`].
pub fn encode_method(
    channel: u16,
    method: &AMQPClass,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let start = buf.len();
    put_frame_header(buf, FRAME_METHOD, channel, 0);
    let generated = gen_class(method)(WriteContext::from(BufWriter(&mut *buf)))
        .map(|_| ())
        .map_err(|e| serialize_error("method", e));
    finish_frame(buf, start, generated)
}

/// Appends a content header frame; the raw property octets are re-sent when the header has
/// them (see [`ContentHeader`]).
pub fn encode_content_header(
    channel: u16,
    header: &ContentHeader,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let start = buf.len();
    put_frame_header(buf, FRAME_HEADER, channel, 0);
    buf.put_u16(header.class_id);
    buf.put_u16(header.weight);
    buf.put_u64(header.body_size);
    let generated = match &header.raw_properties {
        Some(raw) => {
            buf.put_slice(raw);
            Ok(())
        }
        None => basic::gen_properties(&header.properties)(WriteContext::from(BufWriter(&mut *buf)))
            .map(|_| ())
            .map_err(|e| serialize_error("content properties", e)),
    };
    finish_frame(buf, start, generated)
}

/// Writes the payload size into the frame header at `start` and the frame-end octet, or
/// removes the partial frame when serializing failed.
fn finish_frame(
    buf: &mut BytesMut,
    start: usize,
    generated: Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let size = generated.and_then(|()| check_payload(buf.len() - start - FRAME_HEADER_LEN, 0));
    match size {
        Ok(size) => {
            buf[start + 3..start + FRAME_HEADER_LEN].copy_from_slice(&size.to_be_bytes());
            buf.put_u8(FRAME_END);
            Ok(())
        }
        Err(error) => {
            buf.truncate(start);
            Err(error)
        }
    }
}

/// Appends one body frame. The caller splits bodies by `frame_max` (see
/// [`crate::amqp::encode_content`]).
pub fn encode_body(channel: u16, payload: &[u8], buf: &mut BytesMut) -> Result<(), EncodeError> {
    let size = check_payload(payload.len(), 0)?;
    buf.reserve(payload.len() + FRAME_OVERHEAD as usize);
    put_frame_header(buf, FRAME_BODY, channel, size);
    buf.put_slice(payload);
    buf.put_u8(FRAME_END);
    Ok(())
}

/// Appends a heartbeat frame: `08 0000 00000000 CE`.
pub fn encode_heartbeat(buf: &mut BytesMut) {
    put_frame_header(buf, FRAME_HEARTBEAT, 0, 0);
    buf.put_u8(FRAME_END);
}

/// Appends any frame. A protocol header is written as `AMQP 0 0 9 1` whatever the version.
pub fn encode_frame(frame: &Frame, buf: &mut BytesMut) -> Result<(), EncodeError> {
    match frame {
        Frame::ProtocolHeader(_) => {
            buf.put_slice(&PROTOCOL_HEADER);
            Ok(())
        }
        Frame::Method { channel, method } => encode_method(*channel, method, buf),
        Frame::Header { channel, header } => encode_content_header(*channel, header, buf),
        Frame::Body { channel, payload } => encode_body(*channel, payload, buf),
        Frame::Heartbeat => {
            encode_heartbeat(buf);
            Ok(())
        }
    }
}

/// The largest body payload per frame for `frame_max` (0: unlimited, one frame per body).
pub(crate) fn max_body_chunk(frame_max: u32) -> usize {
    if frame_max == 0 {
        u32::MAX as usize
    } else {
        frame_max.saturating_sub(FRAME_OVERHEAD).max(1) as usize
    }
}
