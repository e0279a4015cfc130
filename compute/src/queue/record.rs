//! The queue log's record format: enqueue batches, settlement batches, and the hand-off
//! mark an owner writes when it gives an idle queue to another node.
//!
//! Layout (all integers big-endian): a tag byte, a u32 count, then the items.
//! Enqueue item: seq u64, exchange (u8 len + bytes), routing key (u8 len + bytes),
//! persistent u8, properties (u32 len + bytes), body (u32 len + bytes).
//! Settle item: seq u64. Hand-off item: seq u64 (a ready message already flagged
//! redelivered). Everything read back is bounds-checked: a corrupt record is an
//! error, never a panic.

use bytes::{BufMut, Bytes, BytesMut};

use super::engine::Seq;
use crate::message::Message;

const TAG_ENQUEUE: u8 = 1;
const TAG_SETTLE: u8 = 2;
const TAG_HANDOFF: u8 = 3;

/// One log record.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// Messages added to the queue.
    Enqueue(Vec<(Seq, Message)>),
    /// Messages removed from the queue (acked, rejected, purged, auto-acked).
    Settle(Vec<Seq>),
    /// The owner stopped gracefully with nothing unacked: of the messages live at this
    /// point, only these had been delivered before. Honoured only as the log's last record
    /// (a later owner may have delivered more since).
    HandOff(Vec<Seq>),
}

/// A record that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("corrupt queue log record: {0}")]
pub struct CorruptRecord(pub &'static str);

/// Encode an enqueue batch.
pub fn encode_enqueue<'a>(items: impl ExactSizeIterator<Item = (Seq, &'a Message)>) -> Bytes {
    let mut size = 5;
    let items: Vec<(Seq, &Message)> = items.collect();
    for (_, m) in &items {
        size += 8 + 2 + m.exchange.len() + m.routing_key.len() + 1 + 8;
        size += m.properties_raw.len() + m.body.len();
    }
    let mut b = BytesMut::with_capacity(size);
    b.put_u8(TAG_ENQUEUE);
    b.put_u32(u32::try_from(items.len()).unwrap_or(u32::MAX));
    for (seq, m) in items {
        b.put_u64(seq);
        put_short(&mut b, &m.exchange);
        put_short(&mut b, &m.routing_key);
        b.put_u8(u8::from(m.persistent));
        b.put_u32(u32::try_from(m.properties_raw.len()).unwrap_or(u32::MAX));
        b.put_slice(&m.properties_raw);
        b.put_u32(u32::try_from(m.body.len()).unwrap_or(u32::MAX));
        b.put_slice(&m.body);
    }
    b.freeze()
}

fn put_short(b: &mut BytesMut, s: &str) {
    // Exchange names and routing keys are AMQP shortstrs: at most 255 bytes.
    let bytes = &s.as_bytes()[..s.len().min(255)];
    b.put_u8(bytes.len() as u8);
    b.put_slice(bytes);
}

/// Encode a settlement batch.
pub fn encode_settle(seqs: &[Seq]) -> Bytes {
    encode_seqs(TAG_SETTLE, seqs)
}

/// Encode a hand-off mark listing the live messages already flagged redelivered.
pub fn encode_handoff(redelivered: &[Seq]) -> Bytes {
    encode_seqs(TAG_HANDOFF, redelivered)
}

fn encode_seqs(tag: u8, seqs: &[Seq]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + seqs.len() * 8);
    b.put_u8(tag);
    b.put_u32(u32::try_from(seqs.len()).unwrap_or(u32::MAX));
    for s in seqs {
        b.put_u64(*s);
    }
    b.freeze()
}

struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, CorruptRecord> {
        if self.buf.len() - self.pos < n {
            return Err(CorruptRecord("truncated"));
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, CorruptRecord> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, CorruptRecord> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, CorruptRecord> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_be_bytes(a))
    }
    fn short(&mut self) -> Result<String, CorruptRecord> {
        let n = usize::from(self.u8()?);
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| CorruptRecord("name is not utf-8"))
    }
    fn long(&mut self) -> Result<Bytes, CorruptRecord> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// Decode one record (bodies are slices of `buf`, not copies).
pub fn decode(buf: Bytes) -> Result<Record, CorruptRecord> {
    let mut r = Reader { buf, pos: 0 };
    let tag = r.u8()?;
    let count = r.u32()? as usize;
    // Each item takes at least 8 bytes: refuse counts the buffer cannot hold.
    if count > r.buf.len() / 8 + 1 {
        return Err(CorruptRecord("count larger than record"));
    }
    let rec = match tag {
        TAG_ENQUEUE => {
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                let seq = r.u64()?;
                let exchange = r.short()?;
                let routing_key = r.short()?;
                let persistent = r.u8()? != 0;
                let properties_raw = r.long()?;
                let body = r.long()?;
                let props = crate::message::parse_properties(&properties_raw)
                    .ok_or(CorruptRecord("unreadable message properties"))?;
                let mut m = Message::new(exchange, routing_key, properties_raw, &props, body);
                m.persistent = persistent;
                items.push((seq, m));
            }
            Record::Enqueue(items)
        }
        TAG_SETTLE | TAG_HANDOFF => {
            let mut seqs = Vec::with_capacity(count);
            for _ in 0..count {
                seqs.push(r.u64()?);
            }
            if tag == TAG_SETTLE {
                Record::Settle(seqs)
            } else {
                Record::HandOff(seqs)
            }
        }
        _ => return Err(CorruptRecord("unknown record tag")),
    };
    if r.pos != r.buf.len() {
        return Err(CorruptRecord("trailing bytes"));
    }
    Ok(rec)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn m(body: &'static [u8]) -> Message {
        let props = amq_protocol::protocol::BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(3);
        Message::new(
            "ex".into(),
            "rk".into(),
            crate::message::encode_properties(&props),
            &props,
            Bytes::from_static(body),
        )
    }

    #[test]
    fn enqueue_and_settle_round_trip() {
        let msgs = [(7u64, m(b"hello")), (8, m(b""))];
        let enc = encode_enqueue(msgs.iter().map(|(s, m)| (*s, m)));
        assert_eq!(decode(enc).unwrap(), Record::Enqueue(msgs.to_vec()));
        let enc = encode_settle(&[1, 5, 9]);
        assert_eq!(decode(enc).unwrap(), Record::Settle(vec![1, 5, 9]));
        let enc = encode_handoff(&[4]);
        assert_eq!(decode(enc).unwrap(), Record::HandOff(vec![4]));
        assert_eq!(
            decode(encode_handoff(&[])).unwrap(),
            Record::HandOff(vec![])
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let msgs = [(7u64, m(b"hello"))];
        let enc = encode_enqueue(msgs.iter().map(|(s, m)| (*s, m)));
        for n in 0..enc.len() {
            assert!(decode(enc.slice(..n)).is_err(), "prefix {n}");
        }
        let enc = encode_handoff(&[1, 2]);
        for n in 0..enc.len() {
            assert!(decode(enc.slice(..n)).is_err(), "prefix {n}");
        }
        let enc = encode_settle(&[1, 2]);
        for n in 0..enc.len() {
            assert!(decode(enc.slice(..n)).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode(Bytes::from_static(&[9, 0, 0, 0, 0])).is_err());
        assert!(decode(Bytes::from_static(&[1, 255, 255, 255, 255])).is_err());
    }
}
