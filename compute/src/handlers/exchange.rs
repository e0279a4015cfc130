//! exchange.declare, delete, bind, unbind.

use amq_protocol::protocol::{AMQPClass, exchange};

use super::{args_equivalent, rs};
use crate::connection::Conn;
use crate::error::AmqpError;
use crate::routing::{BindingDef, Destination, ExchangeDef, ExchangeKind, headers};

fn default_exchange_refused() -> AmqpError {
    AmqpError::access_refused("operation not permitted on the default exchange")
}

/// Bool argument mismatches, worded as RabbitMQ words them.
pub(crate) fn inequivalent(
    field: &str,
    what: &str,
    received: impl std::fmt::Display,
    current: impl std::fmt::Display,
) -> AmqpError {
    AmqpError::precondition(format!(
        "inequivalent arg '{field}' for {what}: received '{received}' but current is '{current}'"
    ))
}

/// Refuse headers-exchange bindings whose x-match RabbitMQ would refuse.
pub(crate) fn validate_binding(kind: ExchangeKind, b: &BindingDef) -> Result<(), AmqpError> {
    if kind == ExchangeKind::Headers {
        headers::x_match(&b.arguments).map_err(AmqpError::precondition)?;
    }
    Ok(())
}

impl Conn {
    pub(crate) async fn on_exchange(
        &mut self,
        id: u16,
        m: exchange::AMQPMethod,
    ) -> Result<(), AmqpError> {
        match m {
            exchange::AMQPMethod::Declare(d) => self.exchange_declare(id, d).await,
            exchange::AMQPMethod::Delete(d) => self.exchange_delete(id, d).await,
            exchange::AMQPMethod::Bind(b) => {
                let nowait = b.nowait;
                let binding = BindingDef {
                    source: b.source.to_string(),
                    destination: Destination::Exchange(b.destination.to_string()),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments,
                };
                self.exchange_binding(binding, true).await?;
                if !nowait {
                    self.reply(
                        id,
                        AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                    );
                }
                Ok(())
            }
            exchange::AMQPMethod::Unbind(b) => {
                let nowait = b.nowait;
                let binding = BindingDef {
                    source: b.source.to_string(),
                    destination: Destination::Exchange(b.destination.to_string()),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments,
                };
                self.exchange_binding(binding, false).await?;
                if !nowait {
                    self.reply(
                        id,
                        AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                    );
                }
                Ok(())
            }
            _ => Err(AmqpError::command_invalid("unimplemented method")),
        }
    }

    async fn exchange_declare(&mut self, id: u16, d: exchange::Declare) -> Result<(), AmqpError> {
        let name = d.exchange.to_string();
        let vhost = self.vhost.clone();
        let what = rs("exchange", &name, &vhost);
        if d.passive {
            if name.is_empty() {
                return Err(default_exchange_refused());
            }
            if !self.refresh_topology().exchanges.contains_key(&name) {
                if self.in_cluster() {
                    // Declared on another compute node a moment ago: look again.
                    self.node.topology.refresh_after_miss(&vhost).await?;
                }
                if !self.refresh_topology().exchanges.contains_key(&name) {
                    return Err(AmqpError::not_found(format!("no {what}")));
                }
            }
        } else {
            let kind = ExchangeKind::parse(d.kind.as_str())?;
            if name.is_empty() {
                return Err(default_exchange_refused());
            }
            let def = ExchangeDef {
                name: name.clone(),
                kind,
                durable: d.durable,
                auto_delete: d.auto_delete,
                internal: d.internal,
                arguments: d.arguments,
                home: (!d.durable).then(|| self.node.home()),
            };
            // A transient exchange of a node that just failed is declared afresh once that
            // node is known to be gone, rather than kept until it is swept with its bindings.
            let home = self
                .node
                .topology
                .snapshot(&vhost)
                .and_then(|t| t.exchanges.get(&name).and_then(|x| x.def.home));
            if let Some(home) = home {
                self.node.settle(&home).await;
            }
            let node = self.node.clone();
            self.node
                .topology
                .edit(&vhost, |e| {
                    if let Some(cur) = e.topo.exchanges.get(&name)
                        && cur.def.home.is_some_and(|h| node.has_ended(&h))
                    {
                        // It went with the node that declared it: declare it afresh.
                        e.delete_exchange(&name);
                    }
                    if let Some(cur) = e.topo.exchanges.get(&name) {
                        let c = &cur.def;
                        if c.kind != def.kind {
                            return Err(inequivalent(
                                "type",
                                &what,
                                def.kind.as_str(),
                                c.kind.as_str(),
                            ));
                        }
                        if c.durable != def.durable {
                            return Err(inequivalent("durable", &what, def.durable, c.durable));
                        }
                        if c.auto_delete != def.auto_delete {
                            return Err(inequivalent(
                                "auto_delete",
                                &what,
                                def.auto_delete,
                                c.auto_delete,
                            ));
                        }
                        if c.internal != def.internal {
                            return Err(inequivalent("internal", &what, def.internal, c.internal));
                        }
                        args_equivalent(
                            &def.arguments,
                            &c.arguments,
                            Some(&["alternate-exchange"]),
                            &what,
                        )?;
                        return Ok(());
                    }
                    if name.starts_with("amq.") {
                        return Err(AmqpError::access_refused(format!(
                            "exchange name '{name}' contains reserved prefix 'amq.*'"
                        )));
                    }
                    e.put_exchange(def.clone());
                    Ok(())
                })
                .await?;
        }
        if !d.nowait {
            self.reply(
                id,
                AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
            );
        }
        Ok(())
    }

    async fn exchange_delete(&mut self, id: u16, d: exchange::Delete) -> Result<(), AmqpError> {
        let name = d.exchange.to_string();
        let vhost = self.vhost.clone();
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        let what = rs("exchange", &name, &vhost);
        if name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "deletion of system {what} not allowed"
            )));
        }
        self.node
            .topology
            .edit(&vhost, |e| {
                let Some(x) = e.topo.exchanges.get(&name) else {
                    // Deleting an exchange that does not exist succeeds, as in RabbitMQ.
                    return Ok(());
                };
                if d.if_unused && !x.bindings.is_empty() {
                    return Err(AmqpError::precondition(format!("{what} in use")));
                }
                e.delete_exchange(&name);
                Ok(())
            })
            .await?;
        if !d.nowait {
            self.reply(
                id,
                AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
            );
        }
        Ok(())
    }

    /// Add or remove a binding whose source is an exchange (shared by queue.bind/unbind).
    pub(crate) async fn exchange_binding(
        &mut self,
        b: BindingDef,
        add: bool,
    ) -> Result<(), AmqpError> {
        let vhost = self.vhost.clone();
        if b.source.is_empty() || b.destination == Destination::Exchange(String::new()) {
            return Err(default_exchange_refused());
        }
        if let Destination::Queue(q) = &b.destination {
            // 404 and 405 checks for the queue side.
            self.queue_def(q).await?;
        }
        self.node
            .topology
            .edit(&vhost, |e| {
                let Some(src) = e.topo.exchanges.get(&b.source) else {
                    return Err(AmqpError::not_found(format!(
                        "no {}",
                        rs("exchange", &b.source, &vhost)
                    )));
                };
                let kind = src.def.kind;
                match &b.destination {
                    Destination::Exchange(x) if !e.topo.exchanges.contains_key(x) => {
                        return Err(AmqpError::not_found(format!(
                            "no {}",
                            rs("exchange", x, &vhost)
                        )));
                    }
                    Destination::Queue(q) if !e.topo.queues.contains_key(q) => {
                        return Err(AmqpError::not_found(format!(
                            "no {}",
                            rs("queue", q, &vhost)
                        )));
                    }
                    _ => {}
                }
                if add {
                    validate_binding(kind, &b)?;
                    e.bind(b.clone());
                } else {
                    e.unbind(&b);
                }
                Ok(())
            })
            .await
    }
}
