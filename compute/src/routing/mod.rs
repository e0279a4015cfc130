//! Exchanges and bindings: which queues a message goes to.

pub mod headers;
pub mod topic;

use amq_protocol::types::FieldTable;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::error::{AmqpError, ReplyCode};

/// The exchange types Warren implements (RabbitMQ's built-in four).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Exact routing-key match.
    Direct,
    /// Every bound destination.
    Fanout,
    /// Pattern match on dot-separated words.
    Topic,
    /// Match on message headers.
    Headers,
}

impl ExchangeKind {
    /// Parse the type name of exchange.declare (503 COMMAND_INVALID if unknown, as RabbitMQ).
    pub fn parse(name: &str) -> Result<Self, AmqpError> {
        match name {
            "direct" => Ok(ExchangeKind::Direct),
            "fanout" => Ok(ExchangeKind::Fanout),
            "topic" => Ok(ExchangeKind::Topic),
            "headers" => Ok(ExchangeKind::Headers),
            other => Err(AmqpError::new(
                ReplyCode::CommandInvalid,
                format!("unknown exchange type '{other}'"),
            )),
        }
    }

    /// The type name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// An exchange's declaration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExchangeDef {
    /// Its name.
    pub name: String,
    /// Its type.
    pub kind: ExchangeKind,
    /// Survives restarts.
    pub durable: bool,
    /// Deleted when its last binding (as a source) goes.
    pub auto_delete: bool,
    /// Clients cannot publish to it directly.
    pub internal: bool,
    /// Declaration arguments.
    pub arguments: FieldTable,
    /// Where a non-durable exchange lives; `None` for durable ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<crate::topology::Home>,
}

/// What a binding routes to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Destination {
    /// A queue by name.
    Queue(String),
    /// An exchange by name (exchange-to-exchange binding).
    Exchange(String),
}

/// A binding's declaration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BindingDef {
    /// Source exchange.
    pub source: String,
    /// Destination.
    pub destination: Destination,
    /// Binding key.
    pub routing_key: String,
    /// Binding arguments (headers exchanges match on them).
    pub arguments: FieldTable,
}

impl BindingDef {
    /// Bindings are identified by source, destination, key and arguments.
    pub fn same(&self, other: &BindingDef) -> bool {
        self.source == other.source
            && self.destination == other.destination
            && self.routing_key == other.routing_key
            && self.arguments == other.arguments
    }
}

/// An exchange with its bindings indexed for routing.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The declaration.
    pub def: ExchangeDef,
    /// Every binding with this exchange as source.
    pub bindings: Vec<BindingDef>,
    index: Index,
}

#[derive(Clone, Debug, Default)]
struct Index {
    direct: HashMap<String, Vec<Destination>>,
    all: Vec<Destination>,
    topic: Vec<(topic::TopicPattern, Destination)>,
    headers: Vec<(FieldTable, headers::XMatch, Destination)>,
}

impl Exchange {
    /// An exchange without bindings.
    pub fn new(def: ExchangeDef) -> Self {
        Exchange {
            def,
            bindings: Vec::new(),
            index: Index::default(),
        }
    }

    /// Add a binding (idempotent).
    pub fn bind(&mut self, b: BindingDef) {
        if !self.bindings.iter().any(|x| x.same(&b)) {
            self.bindings.push(b);
            self.reindex();
        }
    }

    /// Remove a binding; true if it existed.
    pub fn unbind(&mut self, b: &BindingDef) -> bool {
        let before = self.bindings.len();
        self.bindings.retain(|x| !x.same(b));
        let removed = self.bindings.len() != before;
        if removed {
            self.reindex();
        }
        removed
    }

    /// Remove every binding to `dest`; true if any existed.
    pub fn unbind_destination(&mut self, dest: &Destination) -> bool {
        let before = self.bindings.len();
        self.bindings.retain(|x| &x.destination != dest);
        let removed = self.bindings.len() != before;
        if removed {
            self.reindex();
        }
        removed
    }

    fn reindex(&mut self) {
        let mut idx = Index::default();
        let mut seen = HashSet::new();
        for b in &self.bindings {
            match self.def.kind {
                ExchangeKind::Direct => {
                    let v = idx.direct.entry(b.routing_key.clone()).or_default();
                    if !v.contains(&b.destination) {
                        v.push(b.destination.clone());
                    }
                }
                ExchangeKind::Fanout => {
                    if seen.insert(b.destination.clone()) {
                        idx.all.push(b.destination.clone());
                    }
                }
                ExchangeKind::Topic => idx.topic.push((
                    topic::TopicPattern::new(&b.routing_key),
                    b.destination.clone(),
                )),
                ExchangeKind::Headers => {
                    // Invalid x-match values are refused at bind time, so this never skips.
                    if let Ok(mode) = headers::x_match(&b.arguments) {
                        idx.headers
                            .push((b.arguments.clone(), mode, b.destination.clone()));
                    }
                }
            }
        }
        self.index = idx;
    }

    /// Destinations for a message on this exchange alone (no exchange-to-exchange hops).
    pub fn destinations<'a>(
        &'a self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Vec<&'a Destination>,
    ) {
        match self.def.kind {
            ExchangeKind::Direct => {
                if let Some(v) = self.index.direct.get(routing_key) {
                    out.extend(v.iter());
                }
            }
            ExchangeKind::Fanout => out.extend(self.index.all.iter()),
            ExchangeKind::Topic => {
                for (p, d) in &self.index.topic {
                    if p.matches(routing_key) && !out.contains(&d) {
                        out.push(d);
                    }
                }
            }
            ExchangeKind::Headers => {
                for (args, mode, d) in &self.index.headers {
                    if headers::matches(args, *mode, headers) && !out.contains(&d) {
                        out.push(d);
                    }
                }
            }
        }
    }
}

/// Route through `start` and every exchange it is bound to, collecting queue names once each.
/// `needs_headers` tells the caller whether headers are needed before it decodes them.
pub fn route(
    exchanges: &HashMap<String, Arc<Exchange>>,
    start: &Exchange,
    routing_key: &str,
    headers: Option<&FieldTable>,
    queues: &mut Vec<String>,
) {
    let mut stack: Vec<&Exchange> = vec![start];
    let mut visited: Vec<&str> = vec![start.def.name.as_str()];
    let mut dests = Vec::new();
    while let Some(x) = stack.pop() {
        dests.clear();
        x.destinations(routing_key, headers, &mut dests);
        for d in dests.drain(..) {
            match d {
                Destination::Queue(q) => {
                    if !queues.iter().any(|x| x == q) {
                        queues.push(q.clone());
                    }
                }
                Destination::Exchange(e) => {
                    if !visited.contains(&e.as_str())
                        && let Some(next) = exchanges.get(e)
                    {
                        visited.push(next.def.name.as_str());
                        stack.push(next);
                    }
                }
            }
        }
    }
}

/// Whether routing from `start` may need message headers (some headers exchange reachable).
pub fn needs_headers(exchanges: &HashMap<String, Arc<Exchange>>, start: &Exchange) -> bool {
    let mut stack = vec![start];
    let mut visited: Vec<&str> = vec![start.def.name.as_str()];
    while let Some(x) = stack.pop() {
        if x.def.kind == ExchangeKind::Headers {
            return true;
        }
        for b in &x.bindings {
            if let Destination::Exchange(e) = &b.destination
                && !visited.contains(&e.as_str())
                && let Some(next) = exchanges.get(e)
            {
                visited.push(next.def.name.as_str());
                stack.push(next);
            }
        }
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use amq_protocol::types::AMQPValue;

    fn ex(name: &str, kind: ExchangeKind) -> Exchange {
        Exchange::new(ExchangeDef {
            name: name.into(),
            kind,
            durable: false,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::default(),
            home: None,
        })
    }

    fn bq(src: &str, q: &str, key: &str) -> BindingDef {
        BindingDef {
            source: src.into(),
            destination: Destination::Queue(q.into()),
            routing_key: key.into(),
            arguments: FieldTable::default(),
        }
    }

    fn routed(xs: &HashMap<String, Arc<Exchange>>, start: &str, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        route(xs, &xs[start], key, None, &mut out);
        out.sort();
        out
    }

    #[test]
    fn routing_table_per_exchange_type() {
        let mut d = ex("d", ExchangeKind::Direct);
        d.bind(bq("d", "q1", "a"));
        d.bind(bq("d", "q2", "a"));
        d.bind(bq("d", "q3", "b"));
        let mut f = ex("f", ExchangeKind::Fanout);
        f.bind(bq("f", "q1", "x"));
        f.bind(bq("f", "q1", "y"));
        f.bind(bq("f", "q2", ""));
        let mut t = ex("t", ExchangeKind::Topic);
        t.bind(bq("t", "q1", "a.*"));
        t.bind(bq("t", "q2", "a.#"));
        t.bind(bq("t", "q1", "#"));
        let mut xs = HashMap::new();
        for x in [d, f, t] {
            xs.insert(x.def.name.clone(), Arc::new(x));
        }
        let cases: &[(&str, &str, &[&str])] = &[
            ("d", "a", &["q1", "q2"]),
            ("d", "b", &["q3"]),
            ("d", "c", &[]),
            ("f", "anything", &["q1", "q2"]),
            ("t", "a.b", &["q1", "q2"]),
            ("t", "a", &["q1", "q2"]),
            ("t", "z", &["q1"]),
        ];
        for (x, key, expect) in cases {
            assert_eq!(routed(&xs, x, key), *expect, "{x} {key}");
        }
    }

    #[test]
    fn exchange_to_exchange_bindings_follow_and_stop_on_cycles() {
        let mut a = ex("a", ExchangeKind::Fanout);
        let mut b = ex("b", ExchangeKind::Direct);
        a.bind(BindingDef {
            source: "a".into(),
            destination: Destination::Exchange("b".into()),
            routing_key: String::new(),
            arguments: FieldTable::default(),
        });
        b.bind(BindingDef {
            source: "b".into(),
            destination: Destination::Exchange("a".into()),
            routing_key: "k".into(),
            arguments: FieldTable::default(),
        });
        b.bind(bq("b", "q", "k"));
        a.bind(bq("a", "q", ""));
        let mut xs = HashMap::new();
        xs.insert("a".to_string(), Arc::new(a));
        xs.insert("b".to_string(), Arc::new(b));
        assert_eq!(routed(&xs, "a", "k"), vec!["q"]);
        assert_eq!(routed(&xs, "b", "k"), vec!["q"]);
        assert_eq!(routed(&xs, "b", "other"), Vec::<String>::new());
    }

    #[test]
    fn headers_exchange_routes_on_headers() {
        let mut h = ex("h", ExchangeKind::Headers);
        let mut args = FieldTable::default();
        args.insert("x-match".into(), AMQPValue::LongString("any".into()));
        args.insert("k".into(), AMQPValue::LongString("v".into()));
        h.bind(BindingDef {
            source: "h".into(),
            destination: Destination::Queue("q".into()),
            routing_key: String::new(),
            arguments: args,
        });
        let mut xs = HashMap::new();
        xs.insert("h".to_string(), Arc::new(h));
        assert!(needs_headers(&xs, &xs["h"]));
        let mut headers = FieldTable::default();
        headers.insert("k".into(), AMQPValue::LongString("v".into()));
        let mut out = Vec::new();
        route(&xs, &xs["h"], "", Some(&headers), &mut out);
        assert_eq!(out, vec!["q"]);
        out.clear();
        route(&xs, &xs["h"], "", None, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn unknown_exchange_type_is_command_invalid() {
        let e = ExchangeKind::parse("x-unknown").unwrap_err();
        assert_eq!(e.code, ReplyCode::CommandInvalid);
    }
}
