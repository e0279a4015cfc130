//! Outgoing frames, appended to the connection's write buffer. Decoding is
//! `warren_proto::amqp`'s; the hot outgoing path (basic.deliver and its content) is
//! encoded here directly from the raw property bytes the publisher sent, so a delivery
//! re-sends exactly those bytes and allocates nothing.

use amq_protocol::protocol::AMQPClass;
use bytes::{BufMut, Bytes, BytesMut};

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;
/// Type, channel and size before the payload, plus the end octet after it.
pub const FRAME_OVERHEAD: usize = 8;

/// Append a method frame.
pub fn put_method(out: &mut BytesMut, channel: u16, method: AMQPClass) {
    // Encoding into a growable buffer only fails for impossible sizes.
    let _ = warren_proto::amqp::encode_method(channel, &method, out);
}

/// Append a heartbeat frame.
pub fn put_heartbeat(out: &mut BytesMut) {
    warren_proto::amqp::encode_heartbeat(out);
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
pub fn put_content(
    out: &mut BytesMut,
    channel: u16,
    properties_raw: &[u8],
    body: &Bytes,
    frame_max: u32,
) {
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
    use amq_protocol::frame::{AMQPFrame, parse_frame};
    use amq_protocol::protocol::{BasicProperties, basic};

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
        let props =
            crate::message::encode_properties(&BasicProperties::default().with_delivery_mode(2));
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
        match &frames[0] {
            AMQPFrame::Header(1, h) => {
                assert_eq!(h.body_size, 10_000);
                assert_eq!(h.properties.delivery_mode(), &Some(2));
            }
            other => panic!("{other:?}"),
        }
        let mut total = 0;
        for f in &frames[1..] {
            match f {
                AMQPFrame::Body(1, b) => {
                    assert!(b.len() <= 4096 - FRAME_OVERHEAD);
                    total += b.len();
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(total, 10_000);
    }
}
