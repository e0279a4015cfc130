//! A guard against deeply nested field tables and arrays.
//!
//! `amq-protocol` parses nested tables and arrays recursively, and each level costs
//! kilobytes of stack: a few hundred levels, which fit in a couple of kilobytes of frame,
//! overflow a 2 MiB thread stack and abort the whole process. Before parsing, Warren bounds
//! the nesting depth from the raw octets, without knowing the method layout: every nested
//! table or array starts with a type tag `F` or `A` and a 32-bit length, so every octet
//! pattern that *could* be such a value is a candidate interval, and the true nesting depth
//! at any point is at most the number of candidates covering it. Real field tables are a few
//! levels deep; the bound only refuses input nested (or looking nested) beyond the limit.

/// The deepest nesting of tables and arrays accepted (RabbitMQ's own headers, such as
/// `x-death`, nest three levels).
pub const MAX_FIELD_NESTING: usize = 32;

/// True when `bytes` may hold tables or arrays nested more than `limit` levels deep.
pub(crate) fn may_exceed_nesting(bytes: &[u8], limit: usize) -> bool {
    let tags = bytes.iter().filter(|&&b| b == b'F' || b == b'A').count();
    if tags <= limit {
        return false;
    }
    // Coverage sweep over candidate intervals [tag, end of value).
    let mut delta = vec![0i32; bytes.len() + 1];
    let mut candidates = 0usize;
    for (start, &b) in bytes.iter().enumerate() {
        if (b != b'F' && b != b'A') || start + 5 > bytes.len() {
            continue;
        }
        let len = u32::from_be_bytes([
            bytes[start + 1],
            bytes[start + 2],
            bytes[start + 3],
            bytes[start + 4],
        ]) as usize;
        let Some(end) = (start + 5).checked_add(len) else {
            continue;
        };
        if end > bytes.len() {
            continue;
        }
        delta[start] += 1;
        delta[end] -= 1;
        candidates += 1;
    }
    if candidates <= limit {
        return false;
    }
    let mut depth = 0i32;
    delta.iter().any(|d| {
        depth += d;
        depth as usize > limit
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested_arrays(depth: usize) -> Vec<u8> {
        let mut value: Vec<u8> = Vec::new();
        for _ in 0..depth {
            let mut outer = vec![b'A'];
            outer.extend_from_slice(&(value.len() as u32).to_be_bytes());
            outer.extend_from_slice(&value);
            value = outer;
        }
        value
    }

    #[test]
    fn depth_at_the_limit_passes_and_beyond_fails() {
        assert!(!may_exceed_nesting(
            &nested_arrays(MAX_FIELD_NESTING),
            MAX_FIELD_NESTING
        ));
        assert!(may_exceed_nesting(
            &nested_arrays(MAX_FIELD_NESTING + 1),
            MAX_FIELD_NESTING
        ));
    }

    #[test]
    fn many_siblings_are_not_depth() {
        let mut flat = Vec::new();
        for _ in 0..1000 {
            flat.extend_from_slice(&[b'A', 0, 0, 0, 0]);
        }
        assert!(!may_exceed_nesting(&flat, MAX_FIELD_NESTING));
    }

    #[test]
    fn text_full_of_tag_letters_is_not_depth() {
        let text = "FAFAFAFA".repeat(1000);
        assert!(!may_exceed_nesting(text.as_bytes(), MAX_FIELD_NESTING));
    }
}
