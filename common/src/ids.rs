//! Newtypes for every id and validated name, so that a queue name can never be passed
//! where a vhost is expected and an epoch never where a generation is.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Identity of one process incarnation's *node*: kept in the node's data directory.
/// A storage node whose disk was wiped gets a new `NodeId`, never the old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub Uuid);

impl NodeId {
    /// A fresh random node id.
    pub fn random() -> Self {
        NodeId(Uuid::new_v4())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first 8 hex digits are enough to tell nodes apart in logs.
        write!(f, "{}", &self.0.simple().to_string()[..8])
    }
}

/// Bumped by compare-and-swap on the node registry at every process start and at eviction.
/// Storage rejects requests that carry a generation older than the registry's.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Generation(pub u64);

/// A queue log's ownership epoch. Raised by every new owner before it fences the old one.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch after this one.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// A segment of a queue log: unique cluster-wide (random 64 bits), one writer epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SegmentId(pub u64);

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Availability zone of a node. Ensembles place replicas in distinct zones.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Zone(pub String);

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// AMQP channel number on one connection (1..=channel_max; 0 is the connection itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub u16);

/// AMQP delivery tag: per channel, starts at 1, increases by one per delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryTag(pub u64);

/// Error for a name that is not a valid AMQP short string name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {0:?}: {1}")]
pub struct InvalidName(pub String, pub &'static str);

macro_rules! name_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(String);

        impl $name {
            /// Validate a name received from a client: at most 255 bytes (an AMQP shortstr).
            pub fn new(s: impl Into<String>) -> Result<Self, InvalidName> {
                let s = s.into();
                if s.len() > 255 {
                    return Err(InvalidName(s, "longer than 255 bytes"));
                }
                Ok(Self(s))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_newtype!(
    /// A virtual host name, such as `/`.
    VHost
);
name_newtype!(
    /// A queue name within a vhost.
    QueueName
);
name_newtype!(
    /// An exchange name within a vhost; the empty name is the default exchange.
    ExchangeName
);

impl VHost {
    /// The default vhost `/`.
    pub fn default_vhost() -> Self {
        VHost("/".to_string())
    }
}

/// A queue's cluster-wide identity: vhost plus name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QueueRef {
    /// The vhost the queue lives in.
    pub vhost: VHost,
    /// The queue's name within the vhost.
    pub name: QueueName,
}

impl fmt::Display for QueueRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}' in vhost '{}'", self.name, self.vhost)
    }
}

/// Identity of a queue *log* in storage. A queue that is deleted and declared again gets a
/// new log id, so a stale owner of the old queue can never write into the new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LogId(pub Uuid);

impl LogId {
    /// A fresh random log id.
    pub fn random() -> Self {
        LogId(Uuid::new_v4())
    }
}

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.simple())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_longer_than_a_shortstr_are_rejected() {
        assert!(QueueName::new("a".repeat(255)).is_ok());
        assert!(QueueName::new("a".repeat(256)).is_err());
    }

    #[test]
    fn epochs_order_and_advance() {
        assert!(Epoch(1).next() > Epoch(1));
        assert_eq!(Epoch(7).next(), Epoch(8));
    }
}
