//! The journal's on-disk record format and its replay.
//!
//! Record: `u32 body length | u32 crc32 of body | body`, body = `u8 kind | fields`, integers
//! big-endian, "none" encoded as `u64::MAX`. A record that is incomplete or fails its CRC
//! ends the journal: it is a torn tail from a crash, and replay truncates it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::io::Read;

const NONE: u64 = u64::MAX;
/// Bytes before a record's body.
pub const HEADER: usize = 8;
/// Bytes of an entry record's body before the payload.
pub const ENTRY_FIXED: usize = 1 + 32;
// Anything longer is corruption, not a record (frames are bounded by the data plane).
const MAX_BODY: usize = warren_proto::internal::data::MAX_FRAME + 64;

/// One journaled change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// An entry of a segment.
    Entry {
        /// Segment id.
        segment: u64,
        /// Writer epoch.
        epoch: u64,
        /// Entry id.
        entry: u64,
        /// Writer's last-add-confirmed.
        lac: Option<u64>,
        /// The entry's bytes.
        payload: Bytes,
    },
    /// A fence at an epoch.
    Fence {
        /// Segment id.
        segment: u64,
        /// Fence epoch.
        epoch: u64,
    },
    /// A seal with the segment's entry count.
    Seal {
        /// Segment id.
        segment: u64,
        /// Entries `0..end`.
        end: u64,
    },
    /// A deleted segment.
    Delete {
        /// Segment id.
        segment: u64,
    },
}

/// CRC-32 (IEEE), table-driven; small enough not to need a dependency.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for b in data {
        c = TABLE[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Append `record` to `buf`; returns the offset of the payload within `buf` for entries.
pub fn encode(record: &Record, buf: &mut BytesMut) -> usize {
    let start = buf.len();
    buf.put_u64(0); // length and crc, filled below
    let mut payload_at = 0;
    match record {
        Record::Entry {
            segment,
            epoch,
            entry,
            lac,
            payload,
        } => {
            buf.put_u8(1);
            buf.put_u64(*segment);
            buf.put_u64(*epoch);
            buf.put_u64(*entry);
            buf.put_u64(lac.unwrap_or(NONE));
            payload_at = buf.len();
            buf.put_slice(payload);
        }
        Record::Fence { segment, epoch } => {
            buf.put_u8(2);
            buf.put_u64(*segment);
            buf.put_u64(*epoch);
        }
        Record::Seal { segment, end } => {
            buf.put_u8(3);
            buf.put_u64(*segment);
            buf.put_u64(*end);
        }
        Record::Delete { segment } => {
            buf.put_u8(4);
            buf.put_u64(*segment);
        }
    }
    let body = start + HEADER;
    let len = (buf.len() - body) as u32;
    let crc = crc32(&buf[body..]);
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    payload_at
}

fn decode_body(mut b: Bytes) -> Option<Record> {
    if !b.has_remaining() {
        return None;
    }
    let kind = b.get_u8();
    let rec = match kind {
        1 if b.remaining() >= 32 => {
            let segment = b.get_u64();
            let epoch = b.get_u64();
            let entry = b.get_u64();
            let lac = b.get_u64();
            Record::Entry {
                segment,
                epoch,
                entry,
                lac: (lac != NONE).then_some(lac),
                payload: b,
            }
        }
        2 if b.remaining() == 16 => Record::Fence {
            segment: b.get_u64(),
            epoch: b.get_u64(),
        },
        3 if b.remaining() == 16 => Record::Seal {
            segment: b.get_u64(),
            end: b.get_u64(),
        },
        4 if b.remaining() == 8 => Record::Delete {
            segment: b.get_u64(),
        },
        _ => return None,
    };
    Some(rec)
}

/// Read records from `reader` in order, calling `apply(offset_of_record, record)`, until the
/// end or the first torn or corrupt record. Returns the length of the valid prefix.
pub fn replay(reader: &mut impl Read, mut apply: impl FnMut(u64, Record)) -> std::io::Result<u64> {
    let mut offset = 0u64;
    let mut header = [0u8; HEADER];
    loop {
        match read_full(reader, &mut header)? {
            0 => return Ok(offset),
            n if n < HEADER => return Ok(offset),
            _ => {}
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_BODY {
            return Ok(offset);
        }
        let mut body = vec![0u8; len];
        if read_full(reader, &mut body)? < len || crc32(&body) != crc {
            return Ok(offset);
        }
        let Some(rec) = decode_body(Bytes::from(body)) else {
            return Ok(offset);
        };
        apply(offset, rec);
        offset += (HEADER + len) as u64;
    }
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn records() -> Vec<Record> {
        vec![
            Record::Entry {
                segment: 1,
                epoch: 2,
                entry: 0,
                lac: None,
                payload: Bytes::from_static(b"hello"),
            },
            Record::Fence {
                segment: 1,
                epoch: 3,
            },
            Record::Seal { segment: 1, end: 1 },
            Record::Delete { segment: 1 },
        ]
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn records_replay_and_a_torn_or_corrupt_tail_is_cut() {
        let mut buf = BytesMut::new();
        for r in records() {
            encode(&r, &mut buf);
        }
        let whole = buf.to_vec();
        let mut got = Vec::new();
        let len = replay(&mut whole.as_slice(), |_, r| got.push(r)).unwrap();
        assert_eq!(got, records());
        assert_eq!(len as usize, whole.len());
        for cut in 0..whole.len() {
            let mut n = 0;
            let valid = replay(&mut &whole[..cut], |_, _| n += 1).unwrap();
            assert!(valid as usize <= cut);
            assert!(n < 4);
        }
        let mut bad = whole.clone();
        bad[HEADER + 3] ^= 0xff;
        let mut n = 0;
        assert_eq!(replay(&mut bad.as_slice(), |_, _| n += 1).unwrap(), 0);
        assert_eq!(n, 0);
    }
}
