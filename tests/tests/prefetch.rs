//! Channel-wide prefetch (basic.qos global) at the protocol level, with a raw client that can
//! pipeline methods no client library would: the broker's bookkeeping of prefetch credit
//! must hold when a consumer is cancelled while its deliveries are on the way.
#![allow(clippy::unwrap_used)]

use warren_tests::Broker;
use warren_tests::raw::{self, FRAME_BODY, FRAME_HEADER, FRAME_METHOD, Frame, RawConn};

fn consume_args(queue: &str, tag: &str) -> Vec<u8> {
    let mut out = 0u16.to_be_bytes().to_vec();
    out.extend(raw::shortstr(queue));
    out.extend(raw::shortstr(tag));
    out.push(0); // no_local, no_ack, exclusive, no_wait: all off
    out.extend(raw::table(&[]));
    out
}

/// The consumer tag and delivery tag of a basic.deliver.
fn deliver_tags(args: &[u8]) -> (String, u64) {
    let len = usize::from(args[0]);
    let tag = String::from_utf8(args[1..1 + len].to_vec()).unwrap();
    let at = 1 + len;
    let delivery = u64::from_be_bytes(args[at..at + 8].try_into().unwrap());
    (tag, delivery)
}

fn ack(conn: &mut RawConn, delivery: u64) {
    let mut args = delivery.to_be_bytes().to_vec();
    args.push(0);
    conn.send_method(1, 60, 80, &args).unwrap();
}

#[test]
fn a_consumer_cancelled_with_deliveries_in_flight_gives_its_channel_credit_back() {
    let broker = Broker::from_env_or_start().unwrap();
    let mut conn = RawConn::connect(&broker.addr()).unwrap();
    conn.handshake("guest", "guest").unwrap();
    conn.open_channel(1).unwrap();
    let queue = format!("prefetch-{}", std::process::id());
    // Exclusive, not auto-delete: it must outlive the cancelled consumer.
    let mut declare = 0u16.to_be_bytes().to_vec();
    declare.extend(raw::shortstr(&queue));
    declare.push(0b0000_0100);
    declare.extend(raw::table(&[]));
    conn.send_method(1, 50, 10, &declare).unwrap();
    assert_eq!(conn.read_method().unwrap().1, 50);
    // basic.qos: prefetch_size 0, prefetch_count 1, global.
    let mut qos = 0u32.to_be_bytes().to_vec();
    qos.extend(1u16.to_be_bytes());
    qos.push(1);
    conn.send_method(1, 60, 10, &qos).unwrap();
    assert_eq!(conn.read_method().unwrap(), (1, 60, 11, vec![]));
    for body in [b"one", b"two"] {
        conn.send_method(1, 60, 40, &raw::publish_args("", &queue))
            .unwrap();
        conn.send_frame(FRAME_HEADER, 1, &raw::content_header(3))
            .unwrap();
        conn.send_frame(FRAME_BODY, 1, body).unwrap();
    }

    // Consume, cancel and consume again in one write: the first message is handed to
    // `first` while the broker already handles the cancel and the second consume, so it
    // arrives for a consumer that is gone (or, if the broker was quicker, is delivered
    // before cancel-ok and acked here). The credit it gives back must reach `second`,
    // which the queue refused for want of it.
    let mut pipelined = raw::frame(
        FRAME_METHOD,
        1,
        &raw::method_payload(60, 20, &consume_args(&queue, "first")),
    );
    let mut cancel = raw::shortstr("first");
    cancel.push(0);
    pipelined.extend(raw::frame(
        FRAME_METHOD,
        1,
        &raw::method_payload(60, 30, &cancel),
    ));
    pipelined.extend(raw::frame(
        FRAME_METHOD,
        1,
        &raw::method_payload(60, 20, &consume_args(&queue, "second")),
    ));
    conn.send_raw(&pipelined).unwrap();
    loop {
        match conn.read_frame().unwrap().expect("connection open") {
            Frame::Method {
                class: 60,
                method: 60,
                args,
                ..
            } => {
                let (tag, delivery) = deliver_tags(&args);
                if tag == "second" {
                    break;
                }
                assert_eq!(tag, "first");
                ack(&mut conn, delivery);
            }
            Frame::Method {
                class: 20 | 10,
                method,
                args,
                ..
            } => panic!("channel or connection closed ({method}): {args:?}"),
            _ => {}
        }
    }
}
