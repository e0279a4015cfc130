//! Seeded random field tables (every type, nested) round-trip through method arguments and
//! message headers.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::BytesMut;
use common::decode_all;
use warren_proto::amqp::{
    AMQPClass, AMQPValue, BasicProperties, ByteArray, ContentHeader, DecimalValue, FieldArray,
    FieldTable, Frame, FrameDecoder, LongString, encode_frame, queue,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, max: u64) -> Vec<u8> {
        (0..self.below(max + 1))
            .map(|_| self.next() as u8)
            .collect()
    }

    fn key(&mut self) -> String {
        // Any UTF-8 up to 255 octets, including multi-octet characters.
        let mut key = String::new();
        for _ in 0..self.below(20) {
            let c = match self.below(3) {
                0 => char::from(b'a' + self.below(26) as u8),
                1 => 'é',
                _ => '🐇',
            };
            key.push(c);
        }
        key
    }

    fn value(&mut self, depth: u32) -> AMQPValue {
        let kinds = if depth == 0 { 15 } else { 17 };
        match self.below(kinds) {
            0 => AMQPValue::Boolean(self.below(2) == 1),
            1 => AMQPValue::ShortShortInt(self.next() as i8),
            2 => AMQPValue::ShortShortUInt(self.next() as u8),
            3 => AMQPValue::ShortInt(self.next() as i16),
            4 => AMQPValue::ShortUInt(self.next() as u16),
            5 => AMQPValue::LongInt(self.next() as i32),
            6 => AMQPValue::LongUInt(self.next() as u32),
            7 => AMQPValue::LongLongInt(self.next() as i64),
            // Finite floats only: NaN is never equal to itself.
            8 => AMQPValue::Float((self.next() as i32) as f32 / 7.0),
            9 => AMQPValue::Double((self.next() as i64) as f64 / 3.0),
            10 => AMQPValue::DecimalValue(DecimalValue {
                scale: self.next() as u8,
                value: self.next() as u32,
            }),
            11 => AMQPValue::LongString(LongString::from(self.bytes(40))),
            12 => AMQPValue::Timestamp(self.next()),
            13 => AMQPValue::ByteArray(ByteArray::from(self.bytes(40))),
            14 => AMQPValue::Void,
            15 => AMQPValue::FieldTable(self.table(depth - 1)),
            _ => {
                let items = (0..self.below(5))
                    .map(|_| self.value(depth - 1))
                    .collect::<Vec<_>>();
                AMQPValue::FieldArray(FieldArray::from(items))
            }
        }
    }

    fn table(&mut self, depth: u32) -> FieldTable {
        let mut table = FieldTable::default();
        for _ in 0..self.below(8) {
            let key = self.key();
            let value = self.value(depth);
            table.insert(key.into(), value);
        }
        table
    }
}

fn round_trip(frame: &Frame) -> Frame {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf).unwrap();
    let mut frames = decode_all(&mut FrameDecoder::without_protocol_header(0), &buf);
    assert_eq!(frames.len(), 1);
    frames.pop().unwrap()
}

#[test]
fn random_tables_round_trip() {
    let mut rng = Rng(0x0002_7AB1E5);
    for _ in 0..500 {
        let arguments = rng.table(4);
        let declare = Frame::Method {
            channel: 1,
            method: AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "q".into(),
                arguments: arguments.clone(),
                ..Default::default()
            })),
        };
        assert_eq!(round_trip(&declare), declare);
        let header = Frame::Header {
            channel: 1,
            header: Box::new(ContentHeader::new(
                0,
                BasicProperties::default().with_headers(arguments),
            )),
        };
        assert_eq!(round_trip(&header), header);
    }
}
