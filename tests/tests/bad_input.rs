//! Bad input from one client yields a protocol error for that connection only (invariant 5):
//! each test sends something broken over a raw socket, checks the broker's answer against what
//! RabbitMQ does, and then checks that a second, well-behaved connection is still served.
//!
//! Runs against `warren dev`, or against `WARREN_TEST_AMQP_URL` when set.
#![allow(clippy::unwrap_used)]

use warren_tests::raw::{self, Frame, RawConn};
use warren_tests::{Broker, assert_broker_serves};

/// Reply codes from the AMQP 0-9-1 spec, as RabbitMQ uses them.
const FRAME_ERROR: u16 = 501;
const COMMAND_INVALID: u16 = 503;
const CHANNEL_ERROR: u16 = 504;
const UNEXPECTED_FRAME: u16 = 505;
const NOT_IMPLEMENTED: u16 = 540;
const ACCESS_REFUSED: u16 = 403;

fn broker() -> Broker {
    Broker::from_env_or_start().unwrap()
}

/// After a connection-level error the broker must close the socket.
fn assert_closed(conn: &mut RawConn) {
    let rest = conn.read_until_eof().unwrap();
    assert!(
        rest.iter().all(|f| matches!(
            f,
            Frame::Other {
                kind: raw::FRAME_HEARTBEAT,
                ..
            }
        )),
        "unexpected frames after connection.close: {rest:?}"
    );
}

fn open(broker: &Broker) -> RawConn {
    let mut conn = RawConn::connect(&broker.addr()).unwrap();
    conn.handshake("guest", "guest").unwrap();
    conn.open_channel(1).unwrap();
    conn
}

#[tokio::test]
async fn wrong_protocol_header_is_answered_with_0_9_1_header_then_closed() {
    let broker = broker();
    for header in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"AMQP\x00\x00\x0a\x00"[..],
        &b"XMQP\x00\x00\x09\x01"[..],
    ] {
        let mut conn = RawConn::connect(&broker.addr()).unwrap();
        conn.send_raw(header).unwrap();
        let answer = conn.read_bytes(8).unwrap();
        assert_eq!(
            answer,
            raw::PROTOCOL_HEADER,
            "answer to header {:?}",
            String::from_utf8_lossy(header)
        );
        let rest = conn.read_until_eof().unwrap();
        assert!(rest.is_empty(), "frames after the header: {rest:?}");
    }
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn frame_with_bad_end_octet_is_a_frame_error() {
    let broker = broker();
    let mut conn = open(&broker);
    let mut bytes = raw::frame(raw::FRAME_METHOD, 1, &raw::method_payload(20, 10, &[0]));
    *bytes.last_mut().unwrap() = 0x00;
    conn.send_raw(&bytes).unwrap();
    let close = conn.expect_connection_close().unwrap();
    assert_eq!(close.code, FRAME_ERROR, "{close:?}");
    assert_closed(&mut conn);
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn truncated_frame_then_end_of_stream_closes_only_that_connection() {
    let broker = broker();
    let mut conn = open(&broker);
    let whole = raw::frame(
        raw::FRAME_METHOD,
        1,
        &raw::method_payload(50, 10, &raw::queue_declare_args("truncated")),
    );
    conn.send_raw(&whole[..whole.len() / 2]).unwrap();
    conn.shutdown_write().unwrap();
    // The broker may or may not say goodbye; it must close the socket either way.
    conn.read_until_eof().unwrap();
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn truncated_method_arguments_are_a_frame_error() {
    let broker = broker();
    let mut conn = open(&broker);
    // queue.declare cut off in the middle of its queue name.
    let mut args = raw::queue_declare_args("a-queue-name");
    args.truncate(6);
    conn.send_method(1, 50, 10, &args).unwrap();
    let close = conn.expect_connection_close().unwrap();
    // RabbitMQ reports an undecodable method as FRAME_ERROR, naming the method.
    assert_eq!(close.code, FRAME_ERROR, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (50, 10), "{close:?}");
    assert_closed(&mut conn);
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn frame_above_frame_max_is_a_frame_error() {
    let broker = broker();
    let mut conn = RawConn::connect(&broker.addr()).unwrap();
    let tune = conn.start_and_tune("guest", "guest").unwrap();
    let frame_max = 4096;
    assert!(tune.frame_max == 0 || tune.frame_max >= frame_max);
    conn.send_method(0, 10, 31, &raw::tune_args(tune.channel_max, frame_max, 0))
        .unwrap();
    let mut open_args = raw::shortstr("/");
    open_args.extend(raw::shortstr(""));
    open_args.push(0);
    conn.send_method(0, 10, 40, &open_args).unwrap();
    let (_, class, method, _) = conn.read_method().unwrap();
    assert_eq!((class, method), (10, 41));
    conn.open_channel(1).unwrap();

    let queue = warren_tests::unique_name("frame-max");
    let body = vec![b'x'; 2 * frame_max as usize];
    conn.send_method(1, 60, 40, &raw::publish_args("", &queue))
        .unwrap();
    conn.send_frame(
        raw::FRAME_HEADER,
        1,
        &raw::content_header(body.len() as u64),
    )
    .unwrap();
    conn.send_frame(raw::FRAME_BODY, 1, &body).unwrap();
    let close = conn.expect_connection_close().unwrap();
    assert_eq!(close.code, FRAME_ERROR, "{close:?}");
    assert_closed(&mut conn);
    assert_broker_serves(broker.url()).await.unwrap();
}

/// RabbitMQ (3.10) drops the TCP connection without a `connection.close` when it cannot
/// decode a method id; the spec asks for 503 COMMAND_INVALID or 540 NOT_IMPLEMENTED. Either
/// is accepted; the connection must end and nothing else may be affected.
#[tokio::test]
async fn unknown_class_and_method_end_the_connection() {
    let broker = broker();
    for (class, method) in [(999u16, 1u16), (60, 999)] {
        let mut conn = open(&broker);
        conn.send_method(1, class, method, &[]).unwrap();
        match conn.read_frame().unwrap() {
            None => {}
            Some(Frame::Method {
                channel: 0,
                class: 10,
                method: 50,
                args,
            }) => {
                let close = raw::parse_close(&args).unwrap();
                assert!(
                    [COMMAND_INVALID, NOT_IMPLEMENTED].contains(&close.code),
                    "{class}.{method}: {close:?}"
                );
                let _ = conn.send_method(0, 10, 51, &[]);
                assert_closed(&mut conn);
            }
            Some(other) => panic!("{class}.{method}: unexpected answer {other:?}"),
        }
    }
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn unknown_frame_type_is_a_frame_error() {
    let broker = broker();
    let mut conn = open(&broker);
    conn.send_frame(9, 1, b"abc").unwrap();
    let close = conn.expect_connection_close().unwrap();
    assert_eq!(close.code, FRAME_ERROR, "{close:?}");
    assert_closed(&mut conn);
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn second_channel_open_is_a_channel_error() {
    let broker = broker();
    let mut conn = open(&broker);
    conn.send_method(1, 20, 10, &raw::shortstr("")).unwrap();
    let close = conn.expect_connection_close().unwrap();
    assert_eq!(close.code, CHANNEL_ERROR, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (20, 10), "{close:?}");
    assert_closed(&mut conn);
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn content_body_without_header_is_an_unexpected_frame() {
    let broker = broker();
    let mut conn = open(&broker);
    conn.send_frame(raw::FRAME_BODY, 1, b"orphan body").unwrap();
    let close = conn.expect_connection_close().unwrap();
    assert_eq!(close.code, UNEXPECTED_FRAME, "{close:?}");
    assert_closed(&mut conn);
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn content_header_without_publish_is_an_unexpected_frame() {
    let broker = broker();
    let mut conn = open(&broker);
    conn.send_frame(raw::FRAME_HEADER, 1, &raw::content_header(3))
        .unwrap();
    let close = conn.expect_connection_close().unwrap();
    assert_eq!(close.code, UNEXPECTED_FRAME, "{close:?}");
    assert_closed(&mut conn);
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn method_on_a_channel_never_opened_is_a_channel_error() {
    let broker = broker();
    let mut conn = open(&broker);
    conn.send_method(7, 50, 10, &raw::queue_declare_args("never-opened"))
        .unwrap();
    let close = conn.expect_connection_close().unwrap();
    assert_eq!(close.code, CHANNEL_ERROR, "{close:?}");
    assert_closed(&mut conn);
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn method_on_a_closed_channel_is_a_channel_error() {
    let broker = broker();
    let mut conn = open(&broker);
    let mut close_args = 200u16.to_be_bytes().to_vec();
    close_args.extend(raw::shortstr("bye"));
    close_args.extend([0, 0, 0, 0]);
    conn.send_method(1, 20, 40, &close_args).unwrap();
    let (ch, class, method, _) = conn.read_method().unwrap();
    assert_eq!((ch, class, method), (1, 20, 41), "channel.close-ok");
    conn.send_method(1, 50, 10, &raw::queue_declare_args("closed-channel"))
        .unwrap();
    let close = conn.expect_connection_close().unwrap();
    assert_eq!(close.code, CHANNEL_ERROR, "{close:?}");
    assert_closed(&mut conn);
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn wrong_credentials_are_refused_with_403() {
    let broker = broker();
    let mut conn = RawConn::connect(&broker.addr()).unwrap();
    let err = conn
        .start_and_tune("guest", "not-the-password")
        .expect_err("login with a wrong password must fail");
    let close = err
        .downcast_ref::<raw::CloseError>()
        .unwrap_or_else(|| panic!("expected connection.close, got: {err:#}"));
    assert_eq!(close.0.code, ACCESS_REFUSED, "{:?}", close.0);
    assert!(close.0.text.starts_with("ACCESS_REFUSED"), "{:?}", close.0);
    assert_closed(&mut conn);

    // The same through a real client library.
    let url = broker.url().replacen("guest:guest@", "guest:wrong@", 1);
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
    )
    .await
    .expect("a refused login must not hang");
    assert!(result.is_err(), "lapin connected with a wrong password");
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn frame_claiming_two_gigabytes_is_refused_before_its_payload() {
    let broker = broker();
    let mut conn = open(&broker);
    // Only the 7-byte header: the broker must judge the size without waiting for (or
    // allocating) two gigabytes.
    let mut header = vec![raw::FRAME_METHOD];
    header.extend(1u16.to_be_bytes());
    header.extend(0x7fff_ffffu32.to_be_bytes());
    header.extend([0u8; 16]);
    conn.send_raw(&header).unwrap();
    let close = conn.expect_connection_close().unwrap();
    assert_eq!(close.code, FRAME_ERROR, "{close:?}");
    assert_closed(&mut conn);
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn huge_declared_body_size_does_not_take_the_broker_down() {
    let broker = broker();
    let mut conn = open(&broker);
    let queue = warren_tests::unique_name("huge-body");
    conn.send_method(1, 60, 40, &raw::publish_args("", &queue))
        .unwrap();
    conn.send_frame(raw::FRAME_HEADER, 1, &raw::content_header(1 << 40))
        .unwrap();
    conn.send_frame(raw::FRAME_BODY, 1, b"a little of a terabyte")
        .unwrap();
    // RabbitMQ keeps waiting for the rest; refusing it is fine too. Either way the broker
    // must not try to hold a terabyte, and others must still be served.
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn method_where_content_header_is_expected_is_an_unexpected_frame() {
    let broker = broker();
    let mut conn = open(&broker);
    conn.send_method(1, 60, 40, &raw::publish_args("", "anywhere"))
        .unwrap();
    conn.send_method(1, 20, 10, &raw::shortstr("")).unwrap();
    let close = conn.expect_connection_close().unwrap();
    assert_eq!(close.code, UNEXPECTED_FRAME, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (60, 40), "{close:?}");
    assert_closed(&mut conn);
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn content_header_of_another_class_is_an_unexpected_frame() {
    let broker = broker();
    let mut conn = open(&broker);
    conn.send_method(1, 60, 40, &raw::publish_args("", "anywhere"))
        .unwrap();
    let mut header = raw::content_header(3);
    header[..2].copy_from_slice(&50u16.to_be_bytes());
    conn.send_frame(raw::FRAME_HEADER, 1, &header).unwrap();
    let close = conn.expect_connection_close().unwrap();
    assert_eq!(close.code, UNEXPECTED_FRAME, "{close:?}");
    assert_closed(&mut conn);
    assert_broker_serves(broker.url()).await.unwrap();
}

#[tokio::test]
async fn heartbeat_on_a_channel_other_than_zero_is_an_unexpected_frame() {
    let broker = broker();
    let mut conn = open(&broker);
    conn.send_frame(raw::FRAME_HEARTBEAT, 1, &[]).unwrap();
    let close = conn.expect_connection_close().unwrap();
    assert_eq!(close.code, UNEXPECTED_FRAME, "{close:?}");
    assert_closed(&mut conn);
    assert_broker_serves(broker.url()).await.unwrap();
}

/// RabbitMQ (3.10) drops the connection on a field table with an unknown type tag; a
/// `connection.close` with 501 FRAME_ERROR or 502 SYNTAX_ERROR is accepted as well.
#[tokio::test]
async fn malformed_field_table_ends_the_connection() {
    let broker = broker();
    let mut conn = open(&broker);
    let mut entries = raw::shortstr("x-bad");
    entries.extend([b'Z', 0]);
    let mut args = 0u16.to_be_bytes().to_vec();
    args.extend(raw::shortstr("bad-table"));
    args.push(0b0000_1100);
    args.extend(raw::table(&entries));
    conn.send_method(1, 50, 10, &args).unwrap();
    match conn.read_frame().unwrap() {
        None => {}
        Some(Frame::Method {
            channel: 0,
            class: 10,
            method: 50,
            args,
        }) => {
            let close = raw::parse_close(&args).unwrap();
            assert!([FRAME_ERROR, 502].contains(&close.code), "{close:?}");
            let _ = conn.send_method(0, 10, 51, &[]);
            assert_closed(&mut conn);
        }
        Some(other) => panic!("unexpected answer {other:?}"),
    }
    assert_broker_serves(broker.url()).await.unwrap();
}
