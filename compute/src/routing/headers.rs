//! Headers-exchange matching, as RabbitMQ does it: `x-match` = `all` (default), `any`,
//! `all-with-x` or `any-with-x`; binding keys starting with `x-` are ignored unless the
//! `-with-x` forms are used; a `void` binding value only requires the header to exist.

use amq_protocol::types::{AMQPValue, FieldTable};

/// How a headers binding combines its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XMatch {
    /// Every key must match.
    All,
    /// At least one key must match.
    Any,
    /// Like `All`, including `x-` keys.
    AllWithX,
    /// Like `Any`, including `x-` keys.
    AnyWithX,
}

/// Read `x-match` from binding arguments; `Err` names an invalid value (406 in RabbitMQ).
pub fn x_match(args: &FieldTable) -> Result<XMatch, String> {
    match args.inner().get("x-match") {
        None => Ok(XMatch::All),
        Some(v) => match value_str(v) {
            Some("all") => Ok(XMatch::All),
            Some("any") => Ok(XMatch::Any),
            Some("all-with-x") => Ok(XMatch::AllWithX),
            Some("any-with-x") => Ok(XMatch::AnyWithX),
            _ => Err(format!(
                "Invalid x-match field value {v:?}; expected all, any, all-with-x, or any-with-x"
            )),
        },
    }
}

fn value_str(v: &AMQPValue) -> Option<&str> {
    match v {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

fn as_int(v: &AMQPValue) -> Option<i128> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => i128::from(*n),
        AMQPValue::ShortShortUInt(n) => i128::from(*n),
        AMQPValue::ShortInt(n) => i128::from(*n),
        AMQPValue::ShortUInt(n) => i128::from(*n),
        AMQPValue::LongInt(n) => i128::from(*n),
        AMQPValue::LongUInt(n) => i128::from(*n),
        AMQPValue::LongLongInt(n) => i128::from(*n),
        AMQPValue::Timestamp(n) => i128::from(*n),
        _ => return None,
    })
}

/// Value equality across the wire types a client may pick for the same value.
fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    if let (Some(x), Some(y)) = (as_int(a), as_int(b)) {
        return x == y;
    }
    let bytes = |v: &AMQPValue| -> Option<Vec<u8>> {
        match v {
            AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
            AMQPValue::ShortString(s) => Some(s.as_str().as_bytes().to_vec()),
            _ => None,
        }
    };
    if let (Some(x), Some(y)) = (bytes(a), bytes(b)) {
        return x == y;
    }
    a == b
}

/// Whether a message with `headers` matches a binding with `args`.
pub fn matches(args: &FieldTable, mode: XMatch, headers: Option<&FieldTable>) -> bool {
    let with_x = matches!(mode, XMatch::AllWithX | XMatch::AnyWithX);
    let all = matches!(mode, XMatch::All | XMatch::AllWithX);
    let mut any_matched = false;
    for (k, want) in args.inner() {
        let key = k.as_str();
        if key == "x-match" || (!with_x && key.starts_with("x-")) {
            continue;
        }
        let got = headers.and_then(|h| h.inner().get(key));
        let ok = match (want, got) {
            (_, None) => false,
            (AMQPValue::Void, Some(_)) => true,
            (w, Some(g)) => values_equal(w, g),
        };
        if all && !ok {
            return false;
        }
        if ok {
            any_matched = true;
            if !all {
                return true;
            }
        }
    }
    all || any_matched
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(v.into())
    }

    #[test]
    fn headers_matching_table() {
        let msg = table(&[
            ("format", s("pdf")),
            ("type", s("report")),
            ("n", AMQPValue::LongInt(5)),
            ("x-tag", s("t")),
        ]);
        let cases: Vec<(FieldTable, Option<&FieldTable>, bool)> = vec![
            (table(&[("format", s("pdf"))]), Some(&msg), true),
            (
                table(&[("format", s("pdf")), ("type", s("log"))]),
                Some(&msg),
                false,
            ),
            (
                table(&[
                    ("x-match", s("any")),
                    ("format", s("pdf")),
                    ("type", s("log")),
                ]),
                Some(&msg),
                true,
            ),
            (
                table(&[("x-match", s("any")), ("a", s("b"))]),
                Some(&msg),
                false,
            ),
            (table(&[]), Some(&msg), true),
            (table(&[("x-match", s("any"))]), Some(&msg), false),
            (table(&[("format", s("pdf"))]), None, false),
            (table(&[]), None, true),
            (table(&[("n", AMQPValue::LongLongInt(5))]), Some(&msg), true),
            (table(&[("n", AMQPValue::Void)]), Some(&msg), true),
            (table(&[("missing", AMQPValue::Void)]), Some(&msg), false),
            // x- keys are ignored by all/any...
            (table(&[("x-tag", s("other"))]), Some(&msg), true),
            // ...and compared by the -with-x forms.
            (
                table(&[("x-match", s("all-with-x")), ("x-tag", s("other"))]),
                Some(&msg),
                false,
            ),
            (
                table(&[("x-match", s("any-with-x")), ("x-tag", s("t"))]),
                Some(&msg),
                true,
            ),
        ];
        for (i, (args, headers, expect)) in cases.iter().enumerate() {
            let mode = x_match(args).unwrap();
            assert_eq!(matches(args, mode, *headers), *expect, "case {i}: {args:?}");
        }
    }

    #[test]
    fn invalid_x_match_is_an_error() {
        assert!(x_match(&table(&[("x-match", s("some"))])).is_err());
    }
}
