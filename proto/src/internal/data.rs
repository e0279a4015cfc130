//! Data-plane frames between a storage client and a storage node, carried on one long-lived
//! QUIC bi-stream per connection. Every request carries a request id that its response
//! echoes, so many requests are in flight on one stream and answers may come back in any
//! order (an append waits for its group-commit fsync; a read does not).
//!
//! Frame: `u32 length` (of everything after it) `| u8 kind | u64 request id | body`, all
//! integers big-endian. "No entry id" is encoded as `u64::MAX`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest frame either side accepts; bigger lengths are a protocol error, checked before
/// anything is allocated.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// ALPN protocol id of the storage data plane.
pub const ALPN: &[u8] = b"warren-data/1";

const NONE: u64 = u64::MAX;

/// A request from a storage client to a storage node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Store one entry of a segment, durably, then acknowledge.
    Append {
        /// Segment id.
        segment: u64,
        /// The writer's epoch.
        epoch: u64,
        /// Entry id within the segment.
        entry: u64,
        /// The writer's last entry known to be at the ack quorum.
        lac: Option<u64>,
        /// The entry's bytes.
        payload: Bytes,
    },
    /// Read stored entries with ids at or above `from`, in order.
    Read {
        /// Segment id.
        segment: u64,
        /// First entry id wanted.
        from: u64,
        /// At most this many entries.
        max_entries: u32,
        /// Stop after this many payload bytes (at least one entry is returned).
        max_bytes: u32,
    },
    /// Refuse every later append below `epoch`; answer with the tail state.
    Fence {
        /// Segment id.
        segment: u64,
        /// The fencing writer's epoch.
        epoch: u64,
    },
    /// The segment is closed with entries `0..end`.
    Seal {
        /// Segment id.
        segment: u64,
        /// Number of entries in the sealed segment.
        end: u64,
    },
    /// Drop a segment.
    Delete {
        /// Segment id.
        segment: u64,
    },
    /// Report journal counters.
    Stats,
    /// Say which node identity answers on this connection.
    Identify,
    /// The compute node (16-byte node id) and generation this connection's later requests
    /// come from; a node refuses writes from a generation the compute registry evicted.
    /// Sent again whenever the sender's generation changes.
    Hello {
        /// The compute node id.
        node: [u8; 16],
        /// Its generation.
        generation: u64,
    },
}

/// One entry returned by a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadEntry {
    /// Entry id within the segment.
    pub entry: u64,
    /// The entry's bytes.
    pub payload: Bytes,
}

/// Error codes a storage node can answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The node cannot serve now (shutting down, disk failure); another node may.
    Unavailable = 1,
    /// The request is malformed or refers to a deleted segment.
    Invalid = 2,
    /// The node's disk failed.
    Io = 3,
    /// The connection's compute generation was evicted from the cluster: the sender must
    /// stop writing, exactly as if fenced.
    Evicted = 4,
}

/// A storage node's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The append, seal or delete is durable.
    Ok,
    /// The segment was fenced at `epoch` (or sealed) and refuses this append.
    Fenced {
        /// The epoch the segment is fenced at.
        epoch: u64,
    },
    /// Entries for a read, in increasing entry id order (possibly with gaps).
    Entries {
        /// The entries.
        entries: Vec<ReadEntry>,
        /// The segment's sealed end, if sealed.
        end: Option<u64>,
    },
    /// The fence is durable; the node's tail state for the segment.
    FenceOk {
        /// Highest entry id stored.
        last_entry: Option<u64>,
        /// Highest last-add-confirmed seen.
        lac: Option<u64>,
        /// Sealed end, if sealed.
        end: Option<u64>,
    },
    /// Journal counters.
    Stats {
        /// fsyncs done since start.
        fsyncs: u64,
        /// Records (entries, fences, seals) made durable since start.
        records: u64,
        /// Bytes written to the journal since start.
        bytes: u64,
    },
    /// The identity of the answering node (its 16-byte node id), so that a client never
    /// takes a node that lost its disk, restarted on the same address under a new identity,
    /// for the node it replaced.
    Identity {
        /// The node id.
        node: [u8; 16],
    },
    /// The request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

/// A frame that cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the maximum")]
    TooLarge(usize),
    /// The frame kind is unknown.
    #[error("unknown frame kind {0:#x}")]
    UnknownKind(u8),
    /// The frame ends before its fields do, or has bytes left over.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

fn opt(v: Option<u64>) -> u64 {
    v.unwrap_or(NONE)
}

fn unopt(v: u64) -> Option<u64> {
    (v != NONE).then_some(v)
}

fn begin(buf: &mut BytesMut, kind: u8, id: u64) -> usize {
    let at = buf.len();
    buf.put_u32(0);
    buf.put_u8(kind);
    buf.put_u64(id);
    at
}

fn finish(buf: &mut BytesMut, at: usize) {
    let len = (buf.len() - at - 4) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Append the frame for request `id` to `buf`.
pub fn encode_request(id: u64, req: &Request, buf: &mut BytesMut) {
    match req {
        Request::Append {
            segment,
            epoch,
            entry,
            lac,
            payload,
        } => {
            buf.reserve(4 + 1 + 8 + 32 + payload.len());
            let at = begin(buf, 1, id);
            buf.put_u64(*segment);
            buf.put_u64(*epoch);
            buf.put_u64(*entry);
            buf.put_u64(opt(*lac));
            buf.put_slice(payload);
            finish(buf, at);
        }
        Request::Read {
            segment,
            from,
            max_entries,
            max_bytes,
        } => {
            let at = begin(buf, 2, id);
            buf.put_u64(*segment);
            buf.put_u64(*from);
            buf.put_u32(*max_entries);
            buf.put_u32(*max_bytes);
            finish(buf, at);
        }
        Request::Fence { segment, epoch } => {
            let at = begin(buf, 3, id);
            buf.put_u64(*segment);
            buf.put_u64(*epoch);
            finish(buf, at);
        }
        Request::Seal { segment, end } => {
            let at = begin(buf, 4, id);
            buf.put_u64(*segment);
            buf.put_u64(*end);
            finish(buf, at);
        }
        Request::Delete { segment } => {
            let at = begin(buf, 5, id);
            buf.put_u64(*segment);
            finish(buf, at);
        }
        Request::Stats => {
            let at = begin(buf, 6, id);
            finish(buf, at);
        }
        Request::Identify => {
            let at = begin(buf, 7, id);
            finish(buf, at);
        }
        Request::Hello { node, generation } => {
            let at = begin(buf, 8, id);
            buf.put_slice(node);
            buf.put_u64(*generation);
            finish(buf, at);
        }
    }
}

/// Append the frame for the response to request `id` to `buf`.
pub fn encode_response(id: u64, resp: &Response, buf: &mut BytesMut) {
    match resp {
        Response::Ok => {
            let at = begin(buf, 0x81, id);
            finish(buf, at);
        }
        Response::Fenced { epoch } => {
            let at = begin(buf, 0x82, id);
            buf.put_u64(*epoch);
            finish(buf, at);
        }
        Response::Entries { entries, end } => {
            let at = begin(buf, 0x83, id);
            buf.put_u64(opt(*end));
            buf.put_u32(entries.len() as u32);
            for e in entries {
                buf.put_u64(e.entry);
                buf.put_u32(e.payload.len() as u32);
                buf.put_slice(&e.payload);
            }
            finish(buf, at);
        }
        Response::FenceOk {
            last_entry,
            lac,
            end,
        } => {
            let at = begin(buf, 0x84, id);
            buf.put_u64(opt(*last_entry));
            buf.put_u64(opt(*lac));
            buf.put_u64(opt(*end));
            finish(buf, at);
        }
        Response::Stats {
            fsyncs,
            records,
            bytes,
        } => {
            let at = begin(buf, 0x85, id);
            buf.put_u64(*fsyncs);
            buf.put_u64(*records);
            buf.put_u64(*bytes);
            finish(buf, at);
        }
        Response::Identity { node } => {
            let at = begin(buf, 0x87, id);
            buf.put_slice(node);
            finish(buf, at);
        }
        Response::Error { code, message } => {
            let at = begin(buf, 0x86, id);
            buf.put_u8(*code as u8);
            buf.put_slice(message.as_bytes());
            finish(buf, at);
        }
    }
}

/// Split one whole frame off the front of `buf`: `Ok(None)` if more bytes are needed.
/// Returns the kind, request id and body.
fn split_frame(buf: &mut BytesMut) -> Result<Option<(u8, u64, Bytes)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if len < 9 {
        return Err(FrameError::Malformed("frame shorter than its header"));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(4 + len).freeze();
    frame.advance(4);
    let kind = frame.get_u8();
    let id = frame.get_u64();
    Ok(Some((kind, id, frame)))
}

fn need(body: &Bytes, n: usize) -> Result<(), FrameError> {
    if body.remaining() < n {
        Err(FrameError::Malformed("truncated body"))
    } else {
        Ok(())
    }
}

fn done(body: &Bytes) -> Result<(), FrameError> {
    if body.has_remaining() {
        Err(FrameError::Malformed("trailing bytes"))
    } else {
        Ok(())
    }
}

/// Decode one request from the front of `buf`; `Ok(None)` if it is not all there yet.
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<(u64, Request)>, FrameError> {
    let Some((kind, id, mut b)) = split_frame(buf)? else {
        return Ok(None);
    };
    let req = match kind {
        1 => {
            need(&b, 32)?;
            let segment = b.get_u64();
            let epoch = b.get_u64();
            let entry = b.get_u64();
            let lac = unopt(b.get_u64());
            Request::Append {
                segment,
                epoch,
                entry,
                lac,
                payload: b,
            }
        }
        2 => {
            need(&b, 24)?;
            let r = Request::Read {
                segment: b.get_u64(),
                from: b.get_u64(),
                max_entries: b.get_u32(),
                max_bytes: b.get_u32(),
            };
            done(&b)?;
            r
        }
        3 => {
            need(&b, 16)?;
            let r = Request::Fence {
                segment: b.get_u64(),
                epoch: b.get_u64(),
            };
            done(&b)?;
            r
        }
        4 => {
            need(&b, 16)?;
            let r = Request::Seal {
                segment: b.get_u64(),
                end: b.get_u64(),
            };
            done(&b)?;
            r
        }
        5 => {
            need(&b, 8)?;
            let r = Request::Delete {
                segment: b.get_u64(),
            };
            done(&b)?;
            r
        }
        6 => {
            done(&b)?;
            Request::Stats
        }
        7 => {
            done(&b)?;
            Request::Identify
        }
        8 => {
            need(&b, 24)?;
            let mut node = [0u8; 16];
            b.copy_to_slice(&mut node);
            let generation = b.get_u64();
            done(&b)?;
            Request::Hello { node, generation }
        }
        k => return Err(FrameError::UnknownKind(k)),
    };
    Ok(Some((id, req)))
}

/// Decode one response from the front of `buf`; `Ok(None)` if it is not all there yet.
pub fn decode_response(buf: &mut BytesMut) -> Result<Option<(u64, Response)>, FrameError> {
    let Some((kind, id, mut b)) = split_frame(buf)? else {
        return Ok(None);
    };
    let resp = match kind {
        0x81 => {
            done(&b)?;
            Response::Ok
        }
        0x82 => {
            need(&b, 8)?;
            let r = Response::Fenced { epoch: b.get_u64() };
            done(&b)?;
            r
        }
        0x83 => {
            need(&b, 12)?;
            let end = unopt(b.get_u64());
            let count = b.get_u32() as usize;
            // Each entry needs at least 12 bytes, so a lying count cannot allocate much.
            need(&b, count.saturating_mul(12))?;
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                need(&b, 12)?;
                let entry = b.get_u64();
                let len = b.get_u32() as usize;
                need(&b, len)?;
                entries.push(ReadEntry {
                    entry,
                    payload: b.split_to(len),
                });
            }
            done(&b)?;
            Response::Entries { entries, end }
        }
        0x84 => {
            need(&b, 24)?;
            let r = Response::FenceOk {
                last_entry: unopt(b.get_u64()),
                lac: unopt(b.get_u64()),
                end: unopt(b.get_u64()),
            };
            done(&b)?;
            r
        }
        0x85 => {
            need(&b, 24)?;
            let r = Response::Stats {
                fsyncs: b.get_u64(),
                records: b.get_u64(),
                bytes: b.get_u64(),
            };
            done(&b)?;
            r
        }
        0x87 => {
            need(&b, 16)?;
            let mut node = [0u8; 16];
            b.copy_to_slice(&mut node);
            done(&b)?;
            Response::Identity { node }
        }
        0x86 => {
            need(&b, 1)?;
            let code = match b.get_u8() {
                1 => ErrorCode::Unavailable,
                2 => ErrorCode::Invalid,
                3 => ErrorCode::Io,
                4 => ErrorCode::Evicted,
                _ => return Err(FrameError::Malformed("unknown error code")),
            };
            let message = String::from_utf8_lossy(&b).into_owned();
            Response::Error { code, message }
        }
        k => return Err(FrameError::UnknownKind(k)),
    };
    Ok(Some((id, resp)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn requests() -> Vec<Request> {
        vec![
            Request::Append {
                segment: 1,
                epoch: 2,
                entry: 3,
                lac: None,
                payload: Bytes::from_static(b"hello"),
            },
            Request::Append {
                segment: 1,
                epoch: 2,
                entry: 4,
                lac: Some(3),
                payload: Bytes::new(),
            },
            Request::Read {
                segment: 9,
                from: 0,
                max_entries: 10,
                max_bytes: 1 << 20,
            },
            Request::Fence {
                segment: 9,
                epoch: 4,
            },
            Request::Seal { segment: 9, end: 7 },
            Request::Delete { segment: 9 },
            Request::Stats,
            Request::Identify,
            Request::Hello {
                node: [7; 16],
                generation: 3,
            },
        ]
    }

    fn responses() -> Vec<Response> {
        vec![
            Response::Ok,
            Response::Fenced { epoch: 5 },
            Response::Entries {
                entries: vec![
                    ReadEntry {
                        entry: 0,
                        payload: Bytes::from_static(b"a"),
                    },
                    ReadEntry {
                        entry: 2,
                        payload: Bytes::new(),
                    },
                ],
                end: Some(3),
            },
            Response::FenceOk {
                last_entry: Some(4),
                lac: None,
                end: None,
            },
            Response::Stats {
                fsyncs: 1,
                records: 2,
                bytes: 3,
            },
            Response::Identity { node: [9; 16] },
            Response::Error {
                code: ErrorCode::Invalid,
                message: "bad".into(),
            },
            Response::Error {
                code: ErrorCode::Evicted,
                message: String::new(),
            },
        ]
    }

    #[test]
    fn requests_round_trip_and_every_truncation_is_incomplete() {
        for (i, req) in requests().into_iter().enumerate() {
            let mut buf = BytesMut::new();
            encode_request(i as u64, &req, &mut buf);
            let whole = buf.clone();
            for cut in 0..whole.len() {
                let mut part = BytesMut::from(&whole[..cut]);
                assert_eq!(decode_request(&mut part).unwrap(), None, "cut {cut}");
            }
            assert_eq!(decode_request(&mut buf).unwrap(), Some((i as u64, req)));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn responses_round_trip_and_every_truncation_is_incomplete() {
        for (i, resp) in responses().into_iter().enumerate() {
            let mut buf = BytesMut::new();
            encode_response(i as u64, &resp, &mut buf);
            let whole = buf.clone();
            for cut in 0..whole.len() {
                let mut part = BytesMut::from(&whole[..cut]);
                assert_eq!(decode_response(&mut part).unwrap(), None, "cut {cut}");
            }
            assert_eq!(decode_response(&mut buf).unwrap(), Some((i as u64, resp)));
        }
    }

    #[test]
    fn golden_fence_bytes() {
        let mut buf = BytesMut::new();
        encode_request(
            1,
            &Request::Fence {
                segment: 2,
                epoch: 3,
            },
            &mut buf,
        );
        let mut want = vec![0, 0, 0, 25, 3, 0, 0, 0, 0, 0, 0, 0, 1];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3]);
        assert_eq!(&buf[..], &want[..]);
    }

    #[test]
    fn golden_hello_bytes() {
        let mut buf = BytesMut::new();
        encode_request(
            2,
            &Request::Hello {
                node: [0xab; 16],
                generation: 5,
            },
            &mut buf,
        );
        let mut want = vec![0, 0, 0, 33, 8, 0, 0, 0, 0, 0, 0, 0, 2];
        want.extend_from_slice(&[0xab; 16]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(&buf[..], &want[..]);
    }

    #[test]
    fn hello_with_trailing_bytes_and_unknown_error_codes_are_malformed() {
        let mut buf = BytesMut::new();
        encode_request(
            1,
            &Request::Hello {
                node: [1; 16],
                generation: 1,
            },
            &mut buf,
        );
        buf.put_u8(0);
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            decode_request(&mut buf),
            Err(FrameError::Malformed("trailing bytes"))
        );
        let mut buf = BytesMut::new();
        encode_response(
            1,
            &Response::Error {
                code: ErrorCode::Evicted,
                message: String::new(),
            },
            &mut buf,
        );
        buf[13] = 0x55;
        assert_eq!(
            decode_response(&mut buf),
            Err(FrameError::Malformed("unknown error code"))
        );
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut buf = BytesMut::from(&((MAX_FRAME as u32) + 1).to_be_bytes()[..]);
        assert!(matches!(
            decode_request(&mut buf),
            Err(FrameError::TooLarge(_))
        ));
        let mut buf = BytesMut::new();
        encode_request(1, &Request::Stats, &mut buf);
        buf[4] = 0x7f;
        assert_eq!(decode_request(&mut buf), Err(FrameError::UnknownKind(0x7f)));
        // An entries response whose count promises more entries than the body holds.
        let mut buf = BytesMut::new();
        encode_response(
            1,
            &Response::Entries {
                entries: vec![],
                end: None,
            },
            &mut buf,
        );
        let n = buf.len();
        buf[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_response(&mut buf).is_err());
    }
}
