//! Frames in and out of one connection: a bounded, incremental reader over the
//! connection's own buffer (incomplete input is not an error; sizes are checked against
//! frame_max before anything is allocated) and writers that append whole frames to the
//! connection's write buffer. Content-header properties travel as raw bytes so that a
//! delivery re-sends exactly what the publisher sent.

use amq_protocol::frame::{AMQPFrame, gen_frame};
use amq_protocol::protocol::{AMQPClass, BasicProperties, parse_class};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{AmqpError, ReplyCode};

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Type, channel and size before the payload, plus the end octet after it.
pub const FRAME_OVERHEAD: usize = 8;
/// Bodies smaller than this are copied out of the read buffer so a small message kept in
/// a queue does not pin a whole read buffer; larger ones are sliced without copying.
const COPY_BELOW: usize = 16 * 1024;

/// A decoded incoming frame.
#[derive(Debug)]
pub enum InFrame {
    /// A method.
    Method(u16, Box<AMQPClass>),
    /// A content header.
    Header {
        /// Channel.
        channel: u16,
        /// Class id (60 for basic).
        class_id: u16,
        /// Total body size announced.
        body_size: u64,
        /// Property flags and list, raw.
        properties_raw: Bytes,
        /// The same, decoded.
        properties: Box<BasicProperties>,
    },
    /// A content body chunk.
    Body(u16, Bytes),
    /// A heartbeat (on channel 0).
    Heartbeat,
}

/// Decode one frame from the front of `buf` if a whole one is there. `frame_max` 0 means
/// no limit beyond `hard_max`.
pub fn decode(buf: &mut BytesMut, frame_max: u32) -> Result<Option<InFrame>, AmqpError> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    let limit = if frame_max == 0 { u32::MAX as usize } else { frame_max as usize };
    if size.saturating_add(FRAME_OVERHEAD) > limit {
        return Err(AmqpError::new(
            ReplyCode::FrameError,
            format!(
                "type {kind}, {size} bytes payload exceeds frame_max {frame_max} (including {FRAME_OVERHEAD} bytes of framing)"
            ),
        ));
    }
    if buf.len() < size + FRAME_OVERHEAD {
        buf.reserve(size + FRAME_OVERHEAD - buf.len());
        return Ok(None);
    }
    if buf[size + 7] != FRAME_END {
        return Err(AmqpError::new(
            ReplyCode::FrameError,
            format!("type {kind}, frame end octet {:#04x} is not 0xCE", buf[size + 7]),
        ));
    }
    let frame = match kind {
        FRAME_METHOD => {
            let payload = &buf[7..7 + size];
            if payload.len() < 4 {
                return Err(AmqpError::new(ReplyCode::SyntaxError, "method frame too short"));
            }
            let class_id = u16::from_be_bytes([payload[0], payload[1]]);
            let method_id = u16::from_be_bytes([payload[2], payload[3]]);
            match parse_class(payload) {
                Ok((_, m)) => InFrame::Method(channel, Box::new(m)),
                Err(_) if !known_method(class_id, method_id) => {
                    return Err(AmqpError::new(
                        ReplyCode::CommandInvalid,
                        format!("unknown method {class_id}/{method_id}"),
                    )
                    .on(class_id, method_id));
                }
                Err(_) => {
                    return Err(AmqpError::new(
                        ReplyCode::SyntaxError,
                        format!("malformed arguments of method {class_id}/{method_id}"),
                    )
                    .on(class_id, method_id));
                }
            }
        }
        FRAME_HEADER => {
            let payload = &buf[7..7 + size];
            if payload.len() < 14 {
                return Err(AmqpError::new(ReplyCode::FrameError, "content header frame too short"));
            }
            let class_id = u16::from_be_bytes([payload[0], payload[1]]);
            let mut sz = [0u8; 8];
            sz.copy_from_slice(&payload[4..12]);
            let body_size = u64::from_be_bytes(sz);
            let raw = &payload[12..];
            let properties = match amq_protocol::protocol::basic::parse_properties(raw) {
                Ok((_, p)) => p,
                Err(_) => {
                    return Err(AmqpError::new(
                        ReplyCode::FrameError,
                        "malformed content header properties",
                    ));
                }
            };
            InFrame::Header {
                channel,
                class_id,
                body_size,
                properties_raw: Bytes::copy_from_slice(raw),
                properties: Box::new(properties),
            }
        }
        FRAME_BODY => {
            if size < COPY_BELOW {
                let body = Bytes::copy_from_slice(&buf[7..7 + size]);
                buf.advance(size + FRAME_OVERHEAD);
                return Ok(Some(InFrame::Body(channel, body)));
            }
            let mut frame = buf.split_to(size + FRAME_OVERHEAD).freeze();
            frame.advance(7);
            frame.truncate(size);
            return Ok(Some(InFrame::Body(channel, frame)));
        }
        FRAME_HEARTBEAT => {
            if channel != 0 {
                return Err(AmqpError::new(
                    ReplyCode::CommandInvalid,
                    format!("heartbeat frame on channel {channel}"),
                ));
            }
            InFrame::Heartbeat
        }
        other => {
            return Err(AmqpError::new(
                ReplyCode::FrameError,
                format!("unknown frame type {other}"),
            ));
        }
    };
    buf.advance(size + FRAME_OVERHEAD);
    Ok(Some(frame))
}

fn known_method(class_id: u16, method_id: u16) -> bool {
    let methods: &[u16] = match class_id {
        10 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 70, 71],
        20 => &[10, 11, 20, 21, 40, 41],
        30 => &[10, 11],
        40 => &[10, 11, 20, 21, 30, 31, 40, 51],
        50 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51],
        60 => &[10, 11, 20, 21, 30, 31, 40, 50, 60, 70, 71, 72, 80, 90, 100, 110, 111, 120],
        85 => &[10, 11],
        90 => &[10, 11, 20, 21, 30, 31],
        _ => &[],
    };
    methods.contains(&method_id)
}

/// Append a method frame.
pub fn put_method(out: &mut BytesMut, channel: u16, method: AMQPClass) {
    let frame = AMQPFrame::Method(channel, method);
    // cookie-factory writes into a Vec; methods other than deliveries are rare enough
    // that the extra copy does not matter.
    if let Ok(ctx) = gen_frame(&frame)(Vec::with_capacity(128).into()) {
        out.extend_from_slice(&ctx.into_inner().0);
    }
}

/// Append a heartbeat frame.
pub fn put_heartbeat(out: &mut BytesMut) {
    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

fn put_shortstr(out: &mut BytesMut, s: &str) {
    let b = &s.as_bytes()[..s.len().min(255)];
    out.put_u8(b.len() as u8);
    out.put_slice(b);
}

/// Append basic.deliver, encoded by hand: it is the hottest outgoing method.
pub fn put_deliver(
    out: &mut BytesMut,
    channel: u16,
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
) {
    let ct = consumer_tag.len().min(255);
    let ex = exchange.len().min(255);
    let rk = routing_key.len().min(255);
    let size = 4 + 1 + ct + 8 + 1 + 1 + ex + 1 + rk;
    out.reserve(size + FRAME_OVERHEAD);
    out.put_u8(FRAME_METHOD);
    out.put_u16(channel);
    out.put_u32(size as u32);
    out.put_u16(60);
    out.put_u16(60);
    put_shortstr(out, consumer_tag);
    out.put_u64(delivery_tag);
    out.put_u8(u8::from(redelivered));
    put_shortstr(out, exchange);
    put_shortstr(out, routing_key);
    out.put_u8(FRAME_END);
}

/// Append a content header and the body split into frames of at most `frame_max`.
pub fn put_content(out: &mut BytesMut, channel: u16, properties_raw: &[u8], body: &Bytes, frame_max: u32) {
    let hsize = 12 + properties_raw.len();
    out.reserve(hsize + FRAME_OVERHEAD);
    out.put_u8(FRAME_HEADER);
    out.put_u16(channel);
    out.put_u32(hsize as u32);
    out.put_u16(60);
    out.put_u16(0);
    out.put_u64(body.len() as u64);
    out.put_slice(properties_raw);
    out.put_u8(FRAME_END);
    let max_chunk = if frame_max == 0 {
        usize::MAX
    } else {
        (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1)
    };
    for chunk in body.chunks(max_chunk) {
        out.reserve(chunk.len() + FRAME_OVERHEAD);
        out.put_u8(FRAME_BODY);
        out.put_u16(channel);
        out.put_u32(chunk.len() as u32);
        out.put_slice(chunk);
        out.put_u8(FRAME_END);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use amq_protocol::frame::parse_frame;
    use amq_protocol::protocol::basic;

    #[test]
    fn deliver_matches_the_reference_encoder() {
        let mut ours = BytesMut::new();
        put_deliver(&mut ours, 3, "ctag", 42, true, "ex", "rk");
        let mut theirs = BytesMut::new();
        put_method(
            &mut theirs,
            3,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: "ctag".into(),
                delivery_tag: 42,
                redelivered: true,
                exchange: "ex".into(),
                routing_key: "rk".into(),
            })),
        );
        assert_eq!(ours, theirs);
    }

    #[test]
    fn content_is_split_by_frame_max_and_parses() {
        let props = crate::message::encode_properties(
            &BasicProperties::default().with_delivery_mode(2),
        );
        let body = Bytes::from(vec![7u8; 10_000]);
        let mut out = BytesMut::new();
        put_content(&mut out, 1, &props, &body, 4096);
        let mut frames = Vec::new();
        let mut rest = &out[..];
        while !rest.is_empty() {
            let (r, f) = parse_frame(rest).unwrap();
            frames.push(f);
            rest = r;
        }
        assert_eq!(frames.len(), 1 + 3);
        let mut buf = out.clone();
        let mut total = 0;
        while let Some(f) = decode(&mut buf, 4096).unwrap() {
            if let InFrame::Body(_, b) = f {
                assert!(b.len() <= 4096 - FRAME_OVERHEAD);
                total += b.len();
            }
        }
        assert_eq!(total, 10_000);
    }

    #[test]
    fn truncated_frames_are_incomplete_not_errors() {
        let mut out = BytesMut::new();
        put_deliver(&mut out, 1, "c", 1, false, "", "q");
        for n in 0..out.len() {
            let mut b = BytesMut::from(&out[..n]);
            assert!(decode(&mut b, 131072).unwrap().is_none(), "prefix {n}");
        }
    }

    #[test]
    fn bad_frames_get_the_right_codes() {
        let table: Vec<(Vec<u8>, u32, ReplyCode)> = vec![
            // Payload larger than frame_max.
            (vec![3, 0, 1, 0, 0, 0x20, 0, 0], 4096, ReplyCode::FrameError),
            // Wrong end octet.
            (vec![8, 0, 0, 0, 0, 0, 0, 0], 4096, ReplyCode::FrameError),
            // Unknown frame type.
            (vec![9, 0, 0, 0, 0, 0, 0, 0xCE], 4096, ReplyCode::FrameError),
            // Unknown method.
            (vec![1, 0, 1, 0, 0, 0, 4, 0, 99, 0, 1, 0xCE], 4096, ReplyCode::CommandInvalid),
            // Known method, truncated arguments (queue.declare with nothing).
            (vec![1, 0, 1, 0, 0, 0, 4, 0, 50, 0, 10, 0xCE], 4096, ReplyCode::SyntaxError),
            // Heartbeat on a channel.
            (vec![8, 0, 1, 0, 0, 0, 0, 0xCE], 4096, ReplyCode::CommandInvalid),
        ];
        for (bytes, frame_max, code) in table {
            let mut b = BytesMut::from(&bytes[..]);
            assert_eq!(decode(&mut b, frame_max).unwrap_err().code, code, "{bytes:?}");
        }
    }
}
