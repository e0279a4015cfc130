//! What the server says in connection.start, and how it checks start-ok credentials.

use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use std::net::IpAddr;

use crate::cluster::membership::Membership;
use crate::config::AuthConfig;

/// The RabbitMQ version Warren presents: clients (Java, pika, kombu, .NET) switch features
/// on by product and version, so Warren reports the release whose behaviour it implements.
pub const RABBITMQ_VERSION: &str = "3.13.7";

/// Mechanisms offered, in RabbitMQ's default order.
pub const MECHANISMS: &str = "PLAIN AMQPLAIN";

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

/// The server-property listing the AMQP addresses of the live compute nodes.
pub const CLUSTER_NODES_PROPERTY: &str = "warren_cluster_nodes";

/// The server-properties table of connection.start, as RabbitMQ sends it plus Warren's own.
///
/// `cluster_nodes` (`host:port` of every live compute node's AMQP listener) is advertised
/// as `warren_cluster_nodes` for operators and tools; RabbitMQ clients do not read it, so
/// they fail over through the address list or load-balanced name they are configured with.
pub fn server_properties(cluster_name: &str, cluster_nodes: &[String]) -> FieldTable {
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(cap.into(), AMQPValue::Boolean(true));
    }
    let mut t = FieldTable::default();
    t.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    t.insert("cluster_name".into(), s(cluster_name));
    if !cluster_nodes.is_empty() {
        t.insert(CLUSTER_NODES_PROPERTY.into(), s(&cluster_nodes.join(",")));
    }
    t.insert(
        "copyright".into(),
        s("Copyright (c) 2007-2024 Broadcom Inc and/or its subsidiaries"),
    );
    t.insert(
        "information".into(),
        s("Licensed under the MPL 2.0. Website: https://rabbitmq.com"),
    );
    t.insert("platform".into(), s("Erlang/OTP 26.2.5"));
    t.insert("product".into(), s("RabbitMQ"));
    t.insert("version".into(), s(RABBITMQ_VERSION));
    t.insert(
        "warren_version".into(),
        s(concat!("Warren ", env!("CARGO_PKG_VERSION"))),
    );
    t
}

/// `host:port` of the AMQP listener of every compute node the membership view holds live.
pub fn cluster_nodes(membership: Option<&Membership>) -> Vec<String> {
    membership
        .map(|m| {
            m.view()
                .members
                .values()
                .map(|record| record.amqp_addr.to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The capabilities a client announced that change how Warren talks to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientCaps {
    /// Tell it about a refused login with connection.close instead of just closing.
    pub authentication_failure_close: bool,
    /// Send basic.cancel when a queue disappears under a consumer.
    pub consumer_cancel_notify: bool,
    /// Send connection.blocked/unblocked.
    pub connection_blocked: bool,
}

/// Read the client's capabilities table.
pub fn client_caps(client_properties: &FieldTable) -> ClientCaps {
    let mut c = ClientCaps::default();
    if let Some(AMQPValue::FieldTable(caps)) = client_properties.inner().get("capabilities") {
        let on = |k: &str| matches!(caps.inner().get(k), Some(AMQPValue::Boolean(true)));
        c.authentication_failure_close = on("authentication_failure_close");
        c.consumer_cancel_notify = on("consumer_cancel_notify");
        c.connection_blocked = on("connection.blocked");
    }
    c
}

/// Why a login was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoginError {
    /// The mechanism is not offered (RabbitMQ: 503 COMMAND_INVALID).
    UnknownMechanism(String),
    /// The response could not be parsed, or the credentials are wrong (403).
    Refused {
        /// The mechanism used.
        mechanism: String,
    },
    /// A loopback-only user connected from elsewhere (403).
    LoopbackOnly(String),
}

/// Parse a PLAIN response: `authzid NUL authcid NUL password`.
fn parse_plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = parts.next()?;
    let pass = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some((
        String::from_utf8(user.to_vec()).ok()?,
        String::from_utf8(pass.to_vec()).ok()?,
    ))
}

/// Parse an AMQPLAIN response: a field table without its length prefix, with LOGIN and
/// PASSWORD.
fn parse_amqplain(response: &[u8]) -> Option<(String, String)> {
    let mut framed = Vec::with_capacity(response.len() + 4);
    framed.extend_from_slice(&u32::try_from(response.len()).ok()?.to_be_bytes());
    framed.extend_from_slice(response);
    let (_, table) = amq_protocol::types::parsing::parse_field_table(framed.as_slice()).ok()?;
    let get = |k: &str| -> Option<String> {
        match table.inner().get(k)? {
            AMQPValue::LongString(v) => String::from_utf8(v.as_bytes().to_vec()).ok(),
            AMQPValue::ShortString(v) => Some(v.as_str().to_string()),
            _ => None,
        }
    };
    Some((get("LOGIN")?, get("PASSWORD")?))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Check connection.start-ok's mechanism and response; returns the user name.
pub fn authenticate(
    auth: &AuthConfig,
    mechanism: &str,
    response: &LongString,
    peer: IpAddr,
) -> Result<String, LoginError> {
    let creds = match mechanism {
        "PLAIN" => parse_plain(response.as_bytes()),
        "AMQPLAIN" => parse_amqplain(response.as_bytes()),
        other => return Err(LoginError::UnknownMechanism(other.to_string())),
    };
    let refused = || LoginError::Refused {
        mechanism: mechanism.to_string(),
    };
    let (user, pass) = creds.ok_or_else(refused)?;
    let ok = auth
        .users
        .iter()
        .any(|u| u.name == user && constant_time_eq(u.password.as_bytes(), pass.as_bytes()));
    if !ok {
        return Err(refused());
    }
    if auth.loopback_users.iter().any(|u| u == &user) && !peer.is_loopback() {
        return Err(LoginError::LoopbackOnly(user));
    }
    Ok(user)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use amq_protocol::auth::{Credentials, SASLMechanism};

    #[test]
    fn login_table() {
        let auth = AuthConfig::default();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        let good = Credentials::new("guest".into(), "guest".into());
        let bad = Credentials::new("guest".into(), "nope".into());
        let cases = [
            ("PLAIN", &good, lo, true),
            ("AMQPLAIN", &good, lo, true),
            ("PLAIN", &bad, lo, false),
            ("AMQPLAIN", &bad, lo, false),
            ("PLAIN", &good, remote, false),
        ];
        for (mech, creds, peer, ok) in cases {
            let m = if mech == "PLAIN" {
                SASLMechanism::Plain
            } else {
                SASLMechanism::AMQPlain
            };
            let resp = creds.sasl_auth_string(m);
            assert_eq!(
                authenticate(&auth, mech, &resp, peer).is_ok(),
                ok,
                "{mech} {peer}"
            );
        }
        assert_eq!(
            authenticate(&auth, "EXTERNAL", &"x".into(), lo),
            Err(LoginError::UnknownMechanism("EXTERNAL".into()))
        );
    }

    #[test]
    fn server_properties_announce_rabbitmq_and_its_capabilities() {
        let p = server_properties("warren@test", &[]);
        assert_eq!(p.inner().get("product"), Some(&s("RabbitMQ")));
        let Some(AMQPValue::FieldTable(caps)) = p.inner().get("capabilities") else {
            panic!("no capabilities");
        };
        assert_eq!(caps.inner().len(), 9);
        assert!(p.inner().contains_key("warren_version"));
        assert!(!p.inner().contains_key(CLUSTER_NODES_PROPERTY));
    }

    #[test]
    fn server_properties_list_the_cluster_nodes() {
        let nodes = ["127.0.0.1:5672".to_string(), "10.0.0.2:5672".to_string()];
        let p = server_properties("warren@test", &nodes);
        assert_eq!(
            p.inner().get(CLUSTER_NODES_PROPERTY),
            Some(&s("127.0.0.1:5672,10.0.0.2:5672"))
        );
    }
}
