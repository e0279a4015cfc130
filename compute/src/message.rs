//! A published message as Warren keeps it: routing info, the content header's property
//! bytes exactly as the publisher sent them (re-sent verbatim on delivery), and the body.

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::FieldTable;
use bytes::Bytes;

/// One message, shared (behind an `Arc`) by every queue it was routed to.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// The exchange it was published to.
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Property flags and property list, as on the wire (after class, weight and size).
    pub properties_raw: Bytes,
    /// The body.
    pub body: Bytes,
    /// delivery_mode == 2.
    pub persistent: bool,
    /// The priority property.
    pub priority: Option<u8>,
    /// The expiration property, in milliseconds, if it is a valid number.
    pub expiration_ms: Option<u64>,
    /// A resend of a publish whose earlier attempt may have been stored (its queue's owner
    /// was lost before it could confirm): delivered flagged redelivered, since the stored
    /// copy may come back from the log too.
    pub resent: bool,
}

impl Message {
    /// A message whose derived fields come from its decoded properties.
    pub fn new(
        exchange: String,
        routing_key: String,
        properties_raw: Bytes,
        props: &BasicProperties,
        body: Bytes,
    ) -> Self {
        Message {
            exchange,
            routing_key,
            properties_raw,
            body,
            persistent: *props.delivery_mode() == Some(2),
            priority: *props.priority(),
            expiration_ms: props
                .expiration()
                .as_ref()
                .and_then(|e| e.as_str().parse().ok()),
            resent: false,
        }
    }

    /// This message as resent to a queue's next owner (see [`Message::resent`]).
    pub fn as_resent(self: &std::sync::Arc<Self>) -> std::sync::Arc<Self> {
        if self.resent {
            return self.clone();
        }
        std::sync::Arc::new(Message {
            resent: true,
            ..(**self).clone()
        })
    }

    /// Decode the properties (for headers-exchange routing and tests).
    pub fn properties(&self) -> Option<BasicProperties> {
        parse_properties(&self.properties_raw)
    }

    /// The `headers` property, if any.
    pub fn headers(&self) -> Option<FieldTable> {
        self.properties().and_then(|p| p.headers().clone())
    }
}

/// Decode a property list; `None` if malformed.
pub fn parse_properties(raw: &[u8]) -> Option<BasicProperties> {
    amq_protocol::protocol::basic::parse_properties(raw)
        .ok()
        .map(|(_, p)| p)
}

/// Encode properties into the wire form kept in [`Message::properties_raw`].
pub fn encode_properties(props: &BasicProperties) -> Bytes {
    let ctx = amq_protocol::protocol::basic::gen_properties(props)(Vec::new().into());
    match ctx {
        Ok(ctx) => Bytes::from(ctx.into_inner().0),
        // Serialising into a growable Vec cannot run out of space.
        Err(_) => Bytes::from_static(&[0, 0]),
    }
}
