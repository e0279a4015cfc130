//! The frames handled once per message: encoders for `basic.deliver`, `basic.ack`/`nack`
//! (publisher confirms) and content from stored raw properties; decoders for
//! `basic.publish`, `basic.ack`, `basic.nack` and `basic.reject`.
//!
//! The generated code builds a list of flag names (allocating) for every bit argument; these
//! read and write the octets directly. Tests check them against the generated code.

use amq_protocol::protocol::{AMQPClass, basic};
use amq_protocol::types::ShortString;
use bytes::{BufMut, BytesMut};

use super::error::EncodeError;
use super::frame::{
    BASIC_CLASS_ID, FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_METHOD, FRAME_OVERHEAD,
    max_body_chunk,
};

const BASIC_PUBLISH: u16 = 40;
const BASIC_DELIVER: u16 = 60;
const BASIC_ACK: u16 = 80;
const BASIC_REJECT: u16 = 90;
const BASIC_NACK: u16 = 120;

fn short_str_len(s: &str) -> Result<u8, EncodeError> {
    u8::try_from(s.len()).map_err(|_| EncodeError::Serialize {
        what: "short string",
        reason: format!("{} octets exceed 255", s.len()),
    })
}

fn put_header(buf: &mut BytesMut, frame_type: u8, channel: u16, size: usize) {
    buf.reserve(size + FRAME_OVERHEAD as usize);
    buf.put_u8(frame_type);
    buf.put_u16(channel);
    // Callers bound `size` far below u32::MAX (short strings, fixed fields).
    buf.put_u32(size as u32);
}

/// Appends `basic.deliver`.
pub fn encode_deliver(
    channel: u16,
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let tag_len = short_str_len(consumer_tag)?;
    let exchange_len = short_str_len(exchange)?;
    let key_len = short_str_len(routing_key)?;
    let size = 4 + 1 + consumer_tag.len() + 8 + 1 + 1 + exchange.len() + 1 + routing_key.len();
    put_header(buf, FRAME_METHOD, channel, size);
    buf.put_u16(BASIC_CLASS_ID);
    buf.put_u16(BASIC_DELIVER);
    buf.put_u8(tag_len);
    buf.put_slice(consumer_tag.as_bytes());
    buf.put_u64(delivery_tag);
    buf.put_u8(u8::from(redelivered));
    buf.put_u8(exchange_len);
    buf.put_slice(exchange.as_bytes());
    buf.put_u8(key_len);
    buf.put_slice(routing_key.as_bytes());
    buf.put_u8(FRAME_END);
    Ok(())
}

/// Appends `basic.ack` (a publisher confirm from the server).
pub fn encode_ack(channel: u16, delivery_tag: u64, multiple: bool, buf: &mut BytesMut) {
    put_header(buf, FRAME_METHOD, channel, 13);
    buf.put_u16(BASIC_CLASS_ID);
    buf.put_u16(BASIC_ACK);
    buf.put_u64(delivery_tag);
    buf.put_u8(u8::from(multiple));
    buf.put_u8(FRAME_END);
}

/// Appends `basic.nack` (a negative publisher confirm from the server).
pub fn encode_nack(
    channel: u16,
    delivery_tag: u64,
    multiple: bool,
    requeue: bool,
    buf: &mut BytesMut,
) {
    put_header(buf, FRAME_METHOD, channel, 13);
    buf.put_u16(BASIC_CLASS_ID);
    buf.put_u16(BASIC_NACK);
    buf.put_u64(delivery_tag);
    buf.put_u8(u8::from(multiple) | (u8::from(requeue) << 1));
    buf.put_u8(FRAME_END);
}

/// Appends a `basic` content header from property octets as received (flags and list,
/// e.g. [`crate::amqp::ContentHeader::raw_properties`] kept in storage).
pub fn encode_content_header_raw(
    channel: u16,
    body_size: u64,
    raw_properties: &[u8],
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let size = 12 + raw_properties.len();
    if u32::try_from(size).is_err() {
        return Err(EncodeError::FrameTooLarge {
            size,
            max: u64::from(u32::MAX),
        });
    }
    put_header(buf, FRAME_HEADER, channel, size);
    buf.put_u16(BASIC_CLASS_ID);
    buf.put_u16(0);
    buf.put_u64(body_size);
    buf.put_slice(raw_properties);
    buf.put_u8(FRAME_END);
    Ok(())
}

/// Appends a body as body frames of at most `frame_max - 8` octets (one frame when
/// `frame_max` is 0); nothing for an empty body.
pub fn encode_body_frames(channel: u16, body: &[u8], frame_max: u32, buf: &mut BytesMut) {
    for chunk in body.chunks(max_body_chunk(frame_max)) {
        put_header(buf, FRAME_BODY, channel, chunk.len());
        buf.put_slice(chunk);
        buf.put_u8(FRAME_END);
    }
}

/// Decodes the per-message client methods (`basic.publish`, `basic.ack`, `basic.nack`,
/// `basic.reject`) without the generated parser's per-call allocations of flag names.
/// `None`: not one of them (use the generated parser); `Some(None)`: malformed arguments;
/// `Some(Some(method))`: decoded, exactly as the generated parser would.
pub(crate) fn decode_hot_method(
    class_id: u16,
    method_id: u16,
    args: &[u8],
) -> Option<Option<AMQPClass>> {
    if class_id != BASIC_CLASS_ID {
        return None;
    }
    match method_id {
        BASIC_PUBLISH => Some(decode_publish(args)),
        BASIC_ACK => Some(decode_tag_and_bits(args).map(|(delivery_tag, bits)| {
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag,
                multiple: bits & 1 != 0,
            }))
        })),
        BASIC_REJECT => Some(decode_tag_and_bits(args).map(|(delivery_tag, bits)| {
            AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
                delivery_tag,
                requeue: bits & 1 != 0,
            }))
        })),
        BASIC_NACK => Some(decode_tag_and_bits(args).map(|(delivery_tag, bits)| {
            AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag,
                multiple: bits & 1 != 0,
                requeue: bits & 2 != 0,
            }))
        })),
        _ => None,
    }
}

fn decode_tag_and_bits(args: &[u8]) -> Option<(u64, u8)> {
    let [a, b, c, d, e, f, g, h, bits] = *args else {
        return None;
    };
    Some((u64::from_be_bytes([a, b, c, d, e, f, g, h]), bits))
}

fn take_short_string(args: &mut &[u8]) -> Option<ShortString> {
    let (&len, rest) = args.split_first()?;
    let len = usize::from(len);
    if rest.len() < len {
        return None;
    }
    let (text, rest) = rest.split_at(len);
    *args = rest;
    let text = std::str::from_utf8(text).ok()?;
    ShortString::try_new(text).ok()
}

fn decode_publish(args: &[u8]) -> Option<AMQPClass> {
    // reserved-1 (ticket), exchange, routing-key, bits.
    let mut rest = args.get(2..)?;
    let exchange = take_short_string(&mut rest)?;
    let routing_key = take_short_string(&mut rest)?;
    let [bits] = *rest else {
        return None;
    };
    Some(AMQPClass::Basic(basic::AMQPMethod::Publish(
        basic::Publish {
            exchange,
            routing_key,
            mandatory: bits & 1 != 0,
            immediate: bits & 2 != 0,
        },
    )))
}
