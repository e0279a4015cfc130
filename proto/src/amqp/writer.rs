//! Lets `amq-protocol`'s serializers write straight into the connection's `BytesMut`.
//!
//! `cookie-factory` needs `BackToTheBuffer` to write length prefixes (tables, frames) after
//! their contents; its `Vec` implementation allocates a scratch vector per prefix. This one
//! writes the prefix at the end of the buffer and moves it into the reserved gap: no
//! allocation beyond the buffer's own growth.

use std::io;

use amq_protocol::frame::{BackToTheBuffer, GenError, GenResult, WriteContext};
use bytes::{BufMut, BytesMut};

/// A `Write` appending to a `BytesMut`.
pub(crate) struct BufWriter<'a>(pub(crate) &'a mut BytesMut);

impl io::Write for BufWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BackToTheBuffer for BufWriter<'_> {
    fn reserve_write_use<
        Tmp,
        Gen: Fn(WriteContext<Self>) -> Result<(WriteContext<Self>, Tmp), GenError>,
        Before: Fn(WriteContext<Self>, Tmp) -> GenResult<Self>,
    >(
        s: WriteContext<Self>,
        reserved: usize,
        r#gen: &Gen,
        before: &Before,
    ) -> Result<WriteContext<Self>, GenError> {
        let WriteContext { write, position } = s;
        let gap = write.0.len();
        write.0.put_bytes(0, reserved);
        let (after_gen, tmp) = r#gen(WriteContext {
            write,
            position: position + reserved as u64,
        })?;
        let end = after_gen.write.0.len();
        let end_position = after_gen.position;
        let WriteContext { write, .. } = before(after_gen, tmp)?;
        let written = write.0.len() - end;
        if written != reserved {
            return Err(GenError::BufferTooBig(written.abs_diff(reserved)));
        }
        let (head, tail) = write.0.split_at_mut(end);
        head[gap..gap + reserved].copy_from_slice(&tail[..reserved]);
        write.0.truncate(end);
        Ok(WriteContext {
            write,
            position: end_position,
        })
    }
}
