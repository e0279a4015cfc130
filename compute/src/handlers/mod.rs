//! One handler per AMQP method family, as `impl Conn` blocks: each validates a method
//! against the topology and the channel, performs it, and writes the reply.

mod basic;
mod confirm;
mod exchange;
mod queue;
pub(crate) mod reply_to;

use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};
use rand::Rng;

use crate::connection::Conn;
use crate::error::AmqpError;
use crate::queue::QueueHandle;
use crate::topology::QueueDef;

/// How long a connection treats a queue as unavailable after failing to start its owner.
const UNAVAILABLE_BACKOFF: std::time::Duration = std::time::Duration::from_secs(2);

/// `'name' in vhost '/'`, as RabbitMQ names resources in errors.
pub(crate) fn rs(kind: &str, name: &str, vhost: &str) -> String {
    format!("{kind} '{name}' in vhost '{vhost}'")
}

/// A random suffix like RabbitMQ's `amq.gen-…` and `amq.ctag-…` names (22 url-safe chars).
pub(crate) fn random_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    let mut s = String::with_capacity(prefix.len() + 22);
    s.push_str(prefix);
    for _ in 0..22 {
        s.push(char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]));
    }
    s
}

/// RabbitMQ's names for field types in inequivalent-argument errors.
pub(crate) fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => "byte",
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => "short",
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) => "signedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

pub(crate) fn value_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// An integer argument value of any width (any AMQP integer type).
pub fn int_arg(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok()?,
        _ => return None,
    })
}

/// Compare the `keys` of two argument tables (absent on both sides is equal).
pub(crate) fn args_equivalent(
    received: &FieldTable,
    current: &FieldTable,
    keys: Option<&[&str]>,
    what: &str,
) -> Result<(), AmqpError> {
    let mut all: Vec<&str> = received
        .inner()
        .keys()
        .chain(current.inner().keys())
        .map(|k| k.as_str())
        .filter(|k| keys.is_none_or(|ks| ks.contains(k)))
        .collect();
    all.sort_unstable();
    all.dedup();
    for k in all {
        let a = received.inner().get(k);
        let b = current.inner().get(k);
        let same = match (a, b) {
            (Some(x), Some(y)) => match (int_arg(x), int_arg(y)) {
                (Some(i), Some(j)) => i == j,
                _ => value_text(x) == value_text(y) && type_name(x) == type_name(y),
            },
            (None, None) => true,
            _ => false,
        };
        if !same {
            let describe = |v: Option<&AMQPValue>| match v {
                Some(v) => format!("the value '{}' of type '{}'", value_text(v), type_name(v)),
                None => "none".to_string(),
            };
            return Err(AmqpError::precondition(format!(
                "inequivalent arg '{k}' for {what}: received {} but current is {}",
                describe(a),
                describe(b)
            )));
        }
    }
    Ok(())
}

impl Conn {
    /// The queue a method names: an empty name means the channel's last declared queue.
    pub(crate) fn resolve_queue_name(
        &mut self,
        channel: u16,
        name: &str,
    ) -> Result<String, AmqpError> {
        if !name.is_empty() {
            return Ok(name.to_string());
        }
        self.ch(channel)?
            .last_queue
            .clone()
            .ok_or_else(|| AmqpError::not_found("no previously declared queue"))
    }

    /// Whether other compute nodes may change this vhost's topology (then a name missing
    /// from this node's snapshot is looked up again before it is refused).
    pub(crate) fn in_cluster(&self) -> bool {
        self.node
            .membership
            .as_ref()
            .is_some_and(|m| m.view().members.len() > 1)
    }

    /// A declared queue (404 if missing, 405 if exclusive to another connection).
    pub(crate) async fn queue_def(&mut self, name: &str) -> Result<Arc<QueueDef>, AmqpError> {
        let vhost = self.vhost.clone();
        let mut def = self.refresh_topology().queues.get(name).cloned();
        if def.is_none() && self.in_cluster() {
            // Declared on another compute node a moment ago: look again.
            self.node.topology.refresh_after_miss(&vhost).await?;
            def = self.refresh_topology().queues.get(name).cloned();
        }
        let def =
            def.ok_or_else(|| AmqpError::not_found(format!("no {}", rs("queue", name, &vhost))))?;
        self.check_exclusive(&def)?;
        Ok(def)
    }

    /// Wait until the home process of the transient queue `name`, if it has one, is known
    /// to run or to be gone ([`crate::node::Node::settle`]), so that a client redeclaring a
    /// queue of a node that just failed gets a fresh queue, not a 405 or a wait on the dead.
    pub(crate) async fn settle_home_of(&self, name: &str) {
        if let Some(home) = self.queue_home(name) {
            self.node.settle(&home).await;
        }
    }

    /// The home process of the transient queue `name` in this connection's vhost, if any.
    pub(crate) fn queue_home(&self, name: &str) -> Option<crate::topology::Home> {
        self.node
            .topology
            .snapshot(&self.vhost)
            .and_then(|t| t.queues.get(name).and_then(|q| q.home))
    }

    /// RabbitMQ's 405 for an exclusive queue of another connection.
    pub(crate) fn check_exclusive(&self, def: &QueueDef) -> Result<(), AmqpError> {
        if def.locked_for(self.node.home(), self.id) {
            return Err(AmqpError::locked(format!(
                "cannot obtain exclusive access to locked {}. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                rs("queue", &def.name, &self.vhost)
            )));
        }
        Ok(())
    }

    /// The running owner of a queue, from this connection's cache when possible.
    pub(crate) async fn queue_handle(
        &mut self,
        def: &Arc<QueueDef>,
    ) -> Result<QueueHandle, AmqpError> {
        if let Some(h) = self.queue_cache.get(&def.name)
            && !h.is_closed()
        {
            return Ok(h.clone());
        }
        // Keyed by the queue's incarnation too: a queue declared afresh is tried at once.
        if let Some((log, until, e)) = self.unavailable.get(&def.name)
            && *log == def.log_id
            && tokio::time::Instant::now() < *until
        {
            return Err(e.clone());
        }
        match self.node.queue(&self.vhost, def).await {
            Ok(h) => {
                self.unavailable.remove(&def.name);
                self.queue_cache.insert(def.name.clone(), h.clone());
                Ok(h)
            }
            Err(e) => {
                // Storage could not give us the queue: fail fast for a moment instead of
                // retrying a takeover for every message that follows.
                let until = tokio::time::Instant::now() + UNAVAILABLE_BACKOFF;
                self.unavailable
                    .insert(def.name.clone(), (def.log_id, until, e.clone()));
                Err(e)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_look_like_rabbitmqs() {
        let n = random_name("amq.gen-");
        assert!(n.starts_with("amq.gen-"));
        assert_eq!(n.len(), "amq.gen-".len() + 22);
        assert_ne!(n, random_name("amq.gen-"));
    }

    #[test]
    fn argument_equivalence_table() {
        let t = |pairs: &[(&str, AMQPValue)]| {
            let mut t = FieldTable::default();
            for (k, v) in pairs {
                t.insert((*k).into(), v.clone());
            }
            t
        };
        let cases = [
            (t(&[]), t(&[]), true),
            (
                t(&[("x-max-length", AMQPValue::LongInt(10))]),
                t(&[]),
                false,
            ),
            (
                t(&[("x-max-length", AMQPValue::LongInt(10))]),
                t(&[("x-max-length", AMQPValue::LongLongInt(10))]),
                true,
            ),
            (
                t(&[("x-queue-type", AMQPValue::LongString("quorum".into()))]),
                t(&[("x-queue-type", AMQPValue::LongString("classic".into()))]),
                false,
            ),
        ];
        for (i, (a, b, ok)) in cases.into_iter().enumerate() {
            assert_eq!(
                args_equivalent(&a, &b, None, "queue 'q' in vhost '/'").is_ok(),
                ok,
                "case {i}"
            );
        }
        let err = args_equivalent(
            &t(&[("x-max-length", AMQPValue::LongInt(10))]),
            &t(&[]),
            None,
            "queue 'q' in vhost '/'",
        )
        .unwrap_err();
        assert_eq!(
            err.reply_text(),
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost '/': received the value '10' of type 'signedint' but current is none"
        );
    }
}
