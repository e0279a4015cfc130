//! queue.declare, bind, unbind, purge, delete.

use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, queue};
use tokio::sync::oneshot;
use warren_common::LogId;

use super::exchange::inequivalent;
use super::{args_equivalent, random_name, rs};
use crate::cluster::membership::Incarnation;
use crate::connection::Conn;
use crate::error::{AmqpError, ReplyCode};
use crate::queue::owner::{DeleteRefused, QueueStats};
use crate::queue::{QueueCmd, QueueHandle};
use crate::routing::{BindingDef, Destination};
use crate::topology::QueueDef;

/// Queue arguments RabbitMQ compares on redeclaration (others are accepted and ignored).
const EQUIVALENCE_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
    "x-queue-master-locator",
    "x-quorum-initial-group-size",
    "x-delivery-limit",
];

/// The owner is gone (deleted concurrently): the queue is as good as missing.
fn gone(name: &str, vhost: &str) -> AmqpError {
    AmqpError::not_found(format!("no {}", rs("queue", name, vhost)))
}

impl Conn {
    pub(crate) async fn on_queue(
        &mut self,
        id: u16,
        m: queue::AMQPMethod,
    ) -> Result<(), AmqpError> {
        match m {
            queue::AMQPMethod::Declare(d) => self.queue_declare(id, d).await,
            queue::AMQPMethod::Bind(b) => {
                let name = self.resolve_queue_name(id, b.queue.as_str())?;
                let binding = BindingDef {
                    source: b.exchange.to_string(),
                    destination: Destination::Queue(name),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments,
                };
                self.exchange_binding(binding, true).await?;
                if !b.nowait {
                    self.reply(
                        id,
                        AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                    );
                }
                Ok(())
            }
            queue::AMQPMethod::Unbind(b) => {
                let name = self.resolve_queue_name(id, b.queue.as_str())?;
                let binding = BindingDef {
                    source: b.exchange.to_string(),
                    destination: Destination::Queue(name),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments,
                };
                self.exchange_binding(binding, false).await?;
                self.reply(
                    id,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                );
                Ok(())
            }
            queue::AMQPMethod::Purge(p) => {
                let name = self.resolve_queue_name(id, p.queue.as_str())?;
                let def = self.queue_def(&name).await?;
                let q = self.queue_handle(&def).await?;
                let (tx, rx) = oneshot::channel();
                let vhost = self.vhost.clone();
                if !q.send(QueueCmd::Purge { reply: tx }).await {
                    return Err(gone(&name, &vhost));
                }
                let n = rx.await.map_err(|_| gone(&name, &vhost))?;
                if !p.nowait {
                    self.reply(
                        id,
                        AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                            message_count: n,
                        })),
                    );
                }
                Ok(())
            }
            queue::AMQPMethod::Delete(d) => self.queue_delete(id, d).await,
            _ => Err(AmqpError::command_invalid("unimplemented method")),
        }
    }

    async fn stats(&self, q: &QueueHandle, name: &str) -> Result<QueueStats, AmqpError> {
        let (tx, rx) = oneshot::channel();
        if !q.send(QueueCmd::Stats { reply: tx }).await {
            return Err(gone(name, &self.vhost));
        }
        rx.await.map_err(|_| gone(name, &self.vhost))
    }

    async fn queue_declare(&mut self, id: u16, d: queue::Declare) -> Result<(), AmqpError> {
        let retry = d.clone();
        let Err(e) = self.declare_queue_once(id, d).await else {
            return Ok(());
        };
        // The queue's home node may have just died without the cluster knowing yet (its
        // lease has not lapsed): a client redeclaring it, as one does after failing over,
        // waits until that node is known to be gone and then gets a fresh queue, rather
        // than an error from the dead owner.
        let foreign_home = self
            .queue_home(retry.queue.as_str())
            .filter(|h| *h != self.node.home());
        let failed_owner = matches!(e.code, ReplyCode::NotFound | ReplyCode::InternalError);
        match foreign_home {
            Some(home) if failed_owner && !retry.passive => {
                let now = self
                    .node
                    .await_incarnation(&home, |i| i == Incarnation::Ended)
                    .await;
                if now != Incarnation::Ended {
                    return Err(e);
                }
                self.queue_cache.remove(retry.queue.as_str());
                self.declare_queue_once(id, retry).await
            }
            _ => Err(e),
        }
    }

    async fn declare_queue_once(&mut self, id: u16, d: queue::Declare) -> Result<(), AmqpError> {
        if self.declare_reply_to(id, &d)? {
            return Ok(());
        }
        let vhost = self.vhost.clone();
        let generated = d.queue.as_str().is_empty();
        let name = if generated {
            random_name("amq.gen-")
        } else {
            d.queue.to_string()
        };
        let def: Arc<QueueDef> = if d.passive {
            self.queue_def(&name).await?
        } else {
            let what = rs("queue", &name, &vhost);
            let me = self.id;
            let home = self.node.home();
            let new = QueueDef {
                name: name.clone(),
                durable: d.durable,
                exclusive: d.exclusive,
                auto_delete: d.auto_delete,
                arguments: d.arguments,
                log_id: LogId::random(),
                owner_conn: d.exclusive.then_some(me),
                home: (!d.durable || d.exclusive).then_some(home),
            };
            self.settle_home_of(&name).await;
            let node = self.node.clone();
            let (def, created) = self
                .node
                .topology
                .edit(&vhost, |e| {
                    if let Some(cur) = e.topo.queues.get(&name)
                        && cur.home.is_some_and(|h| node.has_ended(&h))
                    {
                        // Its node is gone, and so is it (RabbitMQ deletes the transient
                        // queues of a node that goes down): declare it afresh.
                        e.delete_queue(&name);
                    }
                    if let Some(cur) = e.topo.queues.get(&name) {
                        if cur.locked_for(home, me) {
                            return Err(AmqpError::locked(format!(
                                "cannot obtain exclusive access to locked {what}. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration."
                            )));
                        }
                        if cur.durable != new.durable {
                            return Err(inequivalent("durable", &what, new.durable, cur.durable));
                        }
                        if cur.auto_delete != new.auto_delete {
                            return Err(inequivalent("auto_delete", &what, new.auto_delete, cur.auto_delete));
                        }
                        if cur.exclusive != new.exclusive {
                            return Err(inequivalent("exclusive", &what, new.exclusive, cur.exclusive));
                        }
                        args_equivalent(&new.arguments, &cur.arguments, Some(EQUIVALENCE_ARGS), &what)?;
                        return Ok((cur.clone(), false));
                    }
                    if !generated && name.starts_with("amq.") {
                        return Err(AmqpError::access_refused(format!(
                            "queue name '{name}' contains reserved prefix 'amq.*'"
                        )));
                    }
                    e.put_queue(new.clone());
                    let def = e
                        .topo
                        .queues
                        .get(&name)
                        .cloned()
                        .ok_or_else(|| AmqpError::internal("declared queue vanished"))?;
                    Ok((def, true))
                })
                .await?;
            if created && def.exclusive {
                self.exclusive_queues.push(name.clone());
            }
            def
        };
        let q = self.queue_handle(&def).await?;
        let stats = self.stats(&q, &name).await?;
        self.ch(id)?.last_queue = Some(name.clone());
        if !d.nowait {
            self.reply(
                id,
                AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                    queue: name.into(),
                    message_count: stats.messages,
                    consumer_count: stats.consumers,
                })),
            );
        }
        Ok(())
    }

    async fn queue_delete(&mut self, id: u16, d: queue::Delete) -> Result<(), AmqpError> {
        let name = self.resolve_queue_name(id, d.queue.as_str())?;
        let vhost = self.vhost.clone();
        let def = match self.queue_def(&name).await {
            Ok(def) => Some(def),
            // Deleting a queue that does not exist succeeds, as in RabbitMQ.
            Err(e) if e.code == crate::error::ReplyCode::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut count = 0;
        if let Some(def) = def {
            let q = self.queue_handle(&def).await?;
            let (tx, rx) = oneshot::channel();
            if q.send(QueueCmd::Delete {
                if_unused: d.if_unused,
                if_empty: d.if_empty,
                reply: tx,
            })
            .await
            {
                match rx.await {
                    Ok(Ok(n)) => count = n,
                    Ok(Err(DeleteRefused::InUse)) => {
                        return Err(AmqpError::precondition(format!(
                            "{} in use",
                            rs("queue", &name, &vhost)
                        )));
                    }
                    Ok(Err(DeleteRefused::NotEmpty)) => {
                        return Err(AmqpError::precondition(format!(
                            "{} is not empty",
                            rs("queue", &name, &vhost)
                        )));
                    }
                    Err(_) => {}
                }
            }
            self.node
                .forget_queue(&vhost, &name, Some(def.log_id))
                .await?;
            self.queue_cache.remove(&name);
            self.exclusive_queues.retain(|n| n != &name);
        }
        if !d.nowait {
            self.reply(
                id,
                AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                    message_count: count,
                })),
            );
        }
        Ok(())
    }
}
