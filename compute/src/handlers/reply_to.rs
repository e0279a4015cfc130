//! Direct reply-to (RabbitMQ's `amq.rabbitmq.reply-to` pseudo-queue): a requester consumes
//! from it in no-ack mode, publishes requests whose `reply_to` Warren rewrites to a name
//! unique to that consumer, and replies published to that name on the default exchange go
//! straight to the consumer, without a queue.
//!
//! A reply name carries its home node, `amq.rabbitmq.reply-to.<node id, 32 hex>.<random>`
//! (opaque to clients, as RabbitMQ's are), so a reply published on another compute node is
//! sent to the home node over the peer transport (`Node::send_direct_reply`).

use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, BasicProperties, basic, queue};

use warren_common::NodeId;

use super::random_name;
use crate::connection::Conn;
use crate::error::AmqpError;
use crate::node::ReplyConsumer;

/// The pseudo-queue requesters consume from.
pub(crate) const REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// Prefix of the per-consumer names Warren hands out.
pub(crate) const REPLY_TO_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// A fresh reply name homed on `home`.
pub(crate) fn reply_name(home: NodeId) -> String {
    random_name(&format!("{REPLY_TO_PREFIX}{}.", home.0.simple()))
}

/// The home node a reply name names, or `None` for any other string (never panics on
/// what a client sent).
pub(crate) fn reply_home(name: &str) -> Option<NodeId> {
    let rest = name.strip_prefix(REPLY_TO_PREFIX)?;
    let (node, random) = rest.split_once('.')?;
    if node.len() != 32 || random.is_empty() || !node.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    uuid::Uuid::try_parse(node).ok().map(NodeId)
}

/// The direct reply-to consumer of a channel.
#[derive(Clone, Debug)]
pub struct ReplyTo {
    /// The name replies are published to.
    pub name: String,
    /// The consumer tag.
    pub tag: String,
}

impl Conn {
    /// basic.consume on `amq.rabbitmq.reply-to`.
    pub(crate) fn consume_reply_to(&mut self, id: u16, c: basic::Consume) -> Result<(), AmqpError> {
        if !c.no_ack {
            return Err(AmqpError::precondition("reply consumer cannot acknowledge"));
        }
        let sink = self.sink.clone();
        let name = reply_name(self.node.node_id);
        let ch = self.ch(id)?;
        if ch.reply_to.is_some() {
            return Err(AmqpError::precondition("reply consumer already set"));
        }
        let tag = if c.consumer_tag.as_str().is_empty() {
            random_name("amq.ctag-")
        } else {
            c.consumer_tag.to_string()
        };
        let key = ch.key;
        ch.reply_to = Some(ReplyTo {
            name: name.clone(),
            tag: tag.clone(),
        });
        self.node.register_reply_to(
            name,
            ReplyConsumer {
                sink,
                channel: key,
                tag: Arc::from(tag.as_str()),
            },
        );
        if !c.nowait {
            self.reply(
                id,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: tag.into(),
                })),
            );
        }
        Ok(())
    }

    /// Drop the channel's direct reply-to consumer if `tag` names it (or always if `None`).
    pub(crate) fn cancel_reply_to(&mut self, id: u16, tag: Option<&str>) -> bool {
        let Some(ch) = self.channels.get_mut(&id) else {
            return false;
        };
        let matches = ch
            .reply_to
            .as_ref()
            .is_some_and(|r| tag.is_none_or(|t| t == r.tag));
        if !matches {
            return false;
        }
        if let Some(r) = ch.reply_to.take() {
            self.node.unregister_reply_to(&r.name);
        }
        true
    }

    /// queue.declare of the pseudo-queue or of a reply name.
    pub(crate) fn declare_reply_to(
        &mut self,
        id: u16,
        d: &queue::Declare,
    ) -> Result<bool, AmqpError> {
        let name = d.queue.as_str();
        if name != REPLY_TO && !name.starts_with(REPLY_TO_PREFIX) {
            return Ok(false);
        }
        if name != REPLY_TO && !self.node.has_reply_to(name) && !self.node.reply_home_is_peer(name)
        {
            return Err(AmqpError::not_found(format!(
                "no queue '{name}' in vhost '{}'",
                self.vhost
            )));
        }
        if !d.nowait {
            self.reply(
                id,
                AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                    queue: d.queue.clone(),
                    message_count: 0,
                    consumer_count: 0,
                })),
            );
        }
        Ok(true)
    }

    /// A request's `reply_to = amq.rabbitmq.reply-to` becomes the channel's reply name.
    pub(crate) fn rewrite_reply_to(
        &mut self,
        id: u16,
        props: &BasicProperties,
    ) -> Result<Option<BasicProperties>, AmqpError> {
        match props.reply_to() {
            Some(r) if r.as_str() == REPLY_TO => {}
            _ => return Ok(None),
        }
        let name = self
            .ch(id)?
            .reply_to
            .as_ref()
            .map(|r| r.name.clone())
            .ok_or_else(|| AmqpError::precondition("fast reply consumer does not exist"))?;
        Ok(Some(props.clone().with_reply_to(name.into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_names_carry_their_home() {
        let home = NodeId(uuid::Uuid::new_v4());
        let name = reply_name(home);
        assert!(name.starts_with(REPLY_TO_PREFIX));
        assert_eq!(reply_home(&name), Some(home));
    }

    #[test]
    fn other_names_have_no_home() {
        for name in [
            "",
            "amq.rabbitmq.reply-to",
            "amq.rabbitmq.reply-to.",
            "amq.rabbitmq.reply-to.abc",
            "amq.rabbitmq.reply-to.0123456789abcdef0123456789abcdef",
            "amq.rabbitmq.reply-to.0123456789abcdef0123456789abcdef.",
            "amq.rabbitmq.reply-to.0123456789abcdef0123456789abcdeg.x",
            "amq.rabbitmq.reply-to.01234567-89ab-cdef-0123-456789abcdef.x",
            "amq.rabbitmq.reply-to.é123456789abcdef0123456789abcde.x",
            "orders.0123456789abcdef0123456789abcdef.x",
        ] {
            assert_eq!(reply_home(name), None, "{name}");
        }
    }
}
