//! basic.*: qos, consume, cancel, get, ack, nack, reject, recover, and publish.

use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, basic};
use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::warn;
use warren_proto::amqp::Content;

use super::{int_arg, random_name, rs};
use crate::channel::{ConsumerEntry, TxSettle, Unacked};
use crate::connection::{Conn, Settle, frame};
use crate::error::{AmqpError, ReplyCode};
use crate::message::{Message, encode_properties};
use crate::queue::engine::ConsumeError;
use crate::queue::owner::ConfirmTo;
use crate::queue::{ConsumerId, ConsumerSpec, QueueCmd};
use crate::routing;

/// Bodies at most this large are copied out of the read buffer, so that a small message
/// kept in a queue does not pin a whole read buffer; larger ones are kept as slices.
const COPY_BODY_BELOW: usize = 16 * 1024;

impl Conn {
    pub(crate) async fn on_basic(
        &mut self,
        id: u16,
        m: basic::AMQPMethod,
    ) -> Result<(), AmqpError> {
        match m {
            basic::AMQPMethod::Qos(q) => {
                let ch = self.ch(id)?;
                if q.global {
                    ch.limiter.set_limit(u32::from(q.prefetch_count));
                    self.wake_consumers(id).await;
                } else {
                    ch.prefetch = q.prefetch_count;
                }
                self.reply(
                    id,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::Consume(c) => self.consume(id, c).await,
            basic::AMQPMethod::Cancel(c) => {
                self.cancel_reply_to(id, Some(c.consumer_tag.as_str()));
                let entry = self.ch(id)?.consumers.remove(c.consumer_tag.as_str());
                if let Some(entry) = entry {
                    let (tx, rx) = oneshot::channel();
                    if entry
                        .queue
                        .send(QueueCmd::Cancel {
                            id: entry.id,
                            reply: Some(tx),
                        })
                        .await
                    {
                        let _ = rx.await;
                    }
                }
                if !c.nowait {
                    self.reply(
                        id,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: c.consumer_tag,
                        })),
                    );
                }
                Ok(())
            }
            basic::AMQPMethod::Get(g) => self.get(id, g).await,
            basic::AMQPMethod::Ack(a) => {
                self.settle_tags(id, a.delivery_tag, a.multiple, Settle::Ack)
                    .await
            }
            basic::AMQPMethod::Reject(r) => {
                let how = if r.requeue {
                    Settle::Requeue
                } else {
                    Settle::Drop
                };
                self.settle_tags(id, r.delivery_tag, false, how).await
            }
            basic::AMQPMethod::Nack(n) => {
                let how = if n.requeue {
                    Settle::Requeue
                } else {
                    Settle::Drop
                };
                self.settle_tags(id, n.delivery_tag, n.multiple, how).await
            }
            basic::AMQPMethod::Recover(r) => {
                self.recover(id, r.requeue).await?;
                self.reply(
                    id,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::RecoverAsync(r) => self.recover(id, r.requeue).await,
            _ => Err(AmqpError::command_invalid("unimplemented method")),
        }
    }

    /// ack/nack/reject: settle now, or buffer until tx.commit on a transactional channel.
    async fn settle_tags(
        &mut self,
        id: u16,
        tag: u64,
        multiple: bool,
        how: Settle,
    ) -> Result<(), AmqpError> {
        let ch = self.ch(id)?;
        if ch.tx.is_some() {
            let taken: Vec<(u64, Unacked)> = if multiple {
                if tag != 0 && !ch.unacked.contains_key(&tag) {
                    return Err(AmqpError::precondition(format!(
                        "unknown delivery tag {tag}"
                    )));
                }
                let keys: Vec<u64> = ch
                    .unacked
                    .keys()
                    .copied()
                    .filter(|k| tag == 0 || *k <= tag)
                    .collect();
                keys.into_iter()
                    .filter_map(|k| ch.unacked.remove(&k).map(|u| (k, u)))
                    .collect()
            } else {
                let u = ch.unacked.remove(&tag).ok_or_else(|| {
                    AmqpError::precondition(format!("unknown delivery tag {tag}"))
                })?;
                vec![(tag, u)]
            };
            let how = match how {
                Settle::Ack => TxSettle::Ack,
                Settle::Requeue => TxSettle::Requeue,
                Settle::Drop => TxSettle::Drop,
            };
            if let Some(buf) = ch.tx.as_mut() {
                buf.settles
                    .extend(taken.into_iter().map(|(k, u)| (k, u, how)));
            }
            return Ok(());
        }
        let items = ch
            .take_acked(tag, multiple)
            .ok_or_else(|| AmqpError::precondition(format!("unknown delivery tag {tag}")))?;
        self.settle(id, items, how).await;
        Ok(())
    }

    async fn recover(&mut self, id: u16, requeue: bool) -> Result<(), AmqpError> {
        if !requeue {
            return Err(AmqpError::not_implemented("requeue=false"));
        }
        let items = std::mem::take(&mut self.ch(id)?.unacked)
            .into_values()
            .collect();
        self.settle(id, items, Settle::Requeue).await;
        Ok(())
    }

    async fn consume(&mut self, id: u16, c: basic::Consume) -> Result<(), AmqpError> {
        if c.queue.as_str() == super::reply_to::REPLY_TO {
            return self.consume_reply_to(id, c);
        }
        let name = self.resolve_queue_name(id, c.queue.as_str())?;
        let def = self.queue_def(&name).await?;
        let tag = if c.consumer_tag.as_str().is_empty() {
            random_name("amq.ctag-")
        } else {
            c.consumer_tag.to_string()
        };
        if self.ch(id)?.consumers.contains_key(&tag) {
            return Err(AmqpError::new(
                ReplyCode::NotAllowed,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        let priority = match c.arguments.inner().get("x-priority") {
            None => 0,
            Some(v) => int_arg(v)
                .and_then(|p| i32::try_from(p).ok())
                .ok_or_else(|| AmqpError::precondition("invalid arg 'x-priority'"))?,
        };
        let q = self.queue_handle(&def).await?;
        let consumer = ConsumerId(self.node.next_id());
        let ch = self.ch(id)?;
        let spec = ConsumerSpec {
            id: consumer,
            channel: ch.key,
            tag: Arc::from(tag.as_str()),
            no_ack: c.no_ack,
            exclusive: c.exclusive,
            prefetch: ch.prefetch,
            priority,
            limiter: (!c.no_ack).then(|| ch.limiter.clone()),
        };
        // Registered before the owner hears of it, so no delivery can beat it.
        ch.consumers.insert(
            tag.clone(),
            ConsumerEntry {
                id: consumer,
                queue: q.clone(),
                no_ack: c.no_ack,
            },
        );
        ch.touch(&q);
        let (tx, rx) = oneshot::channel();
        let vhost = self.vhost.clone();
        let sent = q
            .send(QueueCmd::Consume {
                spec,
                sink: self.sink.clone(),
                reply: tx,
            })
            .await;
        let result = if sent { rx.await.ok() } else { None };
        match result {
            Some(Ok(_)) => {}
            Some(Err(ConsumeError::ExclusiveInUse)) => {
                self.ch(id)?.consumers.remove(&tag);
                return Err(AmqpError::access_refused(format!(
                    "{} in exclusive use",
                    rs("queue", &name, &vhost)
                )));
            }
            None => {
                self.ch(id)?.consumers.remove(&tag);
                return Err(AmqpError::not_found(format!(
                    "no {}",
                    rs("queue", &name, &vhost)
                )));
            }
        }
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

    async fn get(&mut self, id: u16, g: basic::Get) -> Result<(), AmqpError> {
        let name = self.resolve_queue_name(id, g.queue.as_str())?;
        let def = self.queue_def(&name).await?;
        let q = self.queue_handle(&def).await?;
        let key = self.ch(id)?.key;
        let (tx, rx) = oneshot::channel();
        let vhost = self.vhost.clone();
        if !q
            .send(QueueCmd::Get {
                channel: key,
                no_ack: g.no_ack,
                reply: tx,
            })
            .await
        {
            return Err(AmqpError::not_found(format!(
                "no {}",
                rs("queue", &name, &vhost)
            )));
        }
        let got = rx
            .await
            .map_err(|_| AmqpError::not_found(format!("no {}", rs("queue", &name, &vhost))))?;
        let Some((entry, remaining)) = got else {
            self.reply(
                id,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            );
            return Ok(());
        };
        let ch = self.ch(id)?;
        ch.last_tag += 1;
        let tag = ch.last_tag;
        if !g.no_ack {
            ch.unacked.insert(
                tag,
                Unacked {
                    queue: q.clone(),
                    seq: entry.seq,
                    counted: false,
                },
            );
            ch.touch(&q);
        }
        let msg = entry.msg;
        self.reply(
            id,
            AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                delivery_tag: tag,
                redelivered: entry.redelivered,
                exchange: msg.exchange.as_str().into(),
                routing_key: msg.routing_key.as_str().into(),
                message_count: remaining,
            })),
        );
        frame::put_content(
            &mut self.wbuf,
            id,
            &msg.properties_raw,
            &msg.body,
            self.frame_max,
        );
        Ok(())
    }

    /// A complete basic.publish: buffered on a transactional channel, else published.
    pub(crate) async fn on_publish(
        &mut self,
        id: u16,
        content: Box<Content>,
    ) -> Result<(), AmqpError> {
        if let Some(buf) = self.ch(id)?.tx.as_mut() {
            buf.publishes.push(content);
            return Ok(());
        }
        self.publish_now(id, content).await
    }

    /// Route a publish and hand it to every target queue's owner.
    pub(crate) async fn publish_now(
        &mut self,
        id: u16,
        content: Box<Content>,
    ) -> Result<(), AmqpError> {
        let Content {
            method,
            header,
            body,
        } = *content;
        let AMQPClass::Basic(basic::AMQPMethod::Publish(p)) = method else {
            return Err(AmqpError::command_invalid("unimplemented method"));
        };
        if p.immediate {
            return Err(AmqpError::not_implemented("immediate=true"));
        }
        let vhost = self.vhost.clone();
        let exchange = p.exchange.as_str();
        let routing_key = p.routing_key.as_str();
        let props = header.properties();
        if let Some(uid) = props.user_id()
            && uid.as_str() != self.user_name()
        {
            return Err(AmqpError::precondition(format!(
                "user_id property set to '{}' but authenticated user was '{}'",
                uid,
                self.user_name()
            )));
        }
        let rewritten = self.rewrite_reply_to(id, props)?;
        let props = rewritten.as_ref().unwrap_or(props);
        if exchange.is_empty() && routing_key.starts_with(super::reply_to::REPLY_TO_PREFIX) {
            return self.publish_direct_reply(id, &p, props, &header, body);
        }
        let mut targets = std::mem::take(&mut self.route_buf);
        let mut topo = self.refresh_topology().clone();
        let mut missed = false;
        loop {
            targets.clear();
            let found = route_publish(&topo, exchange, routing_key, props, &mut targets);
            let miss = matches!(found, Err(RouteMiss::NoExchange)) || targets.is_empty();
            if miss && !missed && self.in_cluster() {
                // Declared on another compute node a moment ago? Look again before
                // refusing or dropping the message.
                missed = true;
                if self.node.topology.refresh_after_miss(&vhost).await.is_ok() {
                    topo = self.refresh_topology().clone();
                    continue;
                }
            }
            match found {
                Ok(()) => break,
                Err(RouteMiss::NoExchange) => {
                    self.route_buf = targets;
                    return Err(AmqpError::not_found(format!(
                        "no {}",
                        rs("exchange", exchange, &vhost)
                    )));
                }
                Err(RouteMiss::Internal) => {
                    self.route_buf = targets;
                    return Err(AmqpError::access_refused(format!(
                        "cannot publish to internal {}",
                        rs("exchange", exchange, &vhost)
                    )));
                }
            }
        }
        let properties_raw = match (header.raw_properties(), &rewritten) {
            (Some(raw), None) => raw.clone(),
            _ => encode_properties(props),
        };
        let body: Bytes = match body.chunks() {
            [one] if one.len() > COPY_BODY_BELOW => one.clone(),
            [one] => Bytes::copy_from_slice(one),
            _ => body.to_bytes(),
        };
        let msg = Arc::new(Message::new(
            exchange.to_string(),
            routing_key.to_string(),
            properties_raw,
            props,
            body,
        ));
        if targets.is_empty() && p.mandatory {
            self.reply(
                id,
                AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: ReplyCode::NoRoute.code(),
                    reply_text: "NO_ROUTE".into(),
                    exchange: p.exchange.clone(),
                    routing_key: p.routing_key.clone(),
                })),
            );
            frame::put_content(
                &mut self.wbuf,
                id,
                &msg.properties_raw,
                &msg.body,
                self.frame_max,
            );
        }
        let mut handles = Vec::with_capacity(targets.len());
        let mut unavailable = 0u32;
        for name in &targets {
            let Some(def) = topo.queues.get(name).cloned() else {
                continue;
            };
            match self.queue_handle(&def).await {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // Storage cannot serve the queue now: the publish is nacked, and the
                    // connection lives on (as with a RabbitMQ quorum queue without quorum).
                    warn!(queue = %name, error = %e, "queue unavailable for a publish");
                    unavailable += 1;
                }
            }
        }
        self.route_buf = targets;
        let ch = self.ch(id)?;
        let key = ch.key;
        let targets_n = u32::try_from(handles.len()).unwrap_or(u32::MAX) + unavailable;
        let seq = ch.confirms.as_mut().map(|t| {
            let seq = t.publish(targets_n);
            for _ in 0..unavailable {
                t.settle(&[seq], false);
            }
            seq
        });
        for q in handles {
            let confirm = seq.map(|seq| ConfirmTo {
                sink: self.sink.clone(),
                channel: key,
                seq,
            });
            self.post(
                &q,
                QueueCmd::Publish {
                    msg: msg.clone(),
                    confirm,
                },
            );
        }
        if seq.is_some() {
            self.write_confirms(id);
        }
        Ok(())
    }

    /// A reply to a direct reply-to name: straight to its consumer (through its home node if
    /// that is another), or returned/dropped.
    fn publish_direct_reply(
        &mut self,
        id: u16,
        p: &basic::Publish,
        props: &amq_protocol::protocol::BasicProperties,
        header: &warren_proto::amqp::ContentHeader,
        body: warren_proto::amqp::MessageBody,
    ) -> Result<(), AmqpError> {
        let properties_raw = match header.raw_properties() {
            Some(raw) => raw.clone(),
            None => encode_properties(props),
        };
        let msg = Arc::new(Message::new(
            String::new(),
            p.routing_key.to_string(),
            properties_raw,
            props,
            body.to_bytes(),
        ));
        let name = p.routing_key.as_str();
        // Homed here, or on another live compute node (sent there; if its consumer is gone
        // by then, dropped there). Otherwise it cannot be delivered.
        let delivered = self.node.deliver_direct_reply(name, msg.clone())
            || self.node.send_direct_reply(name, &msg);
        if !delivered && p.mandatory {
            self.reply(
                id,
                AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: ReplyCode::NoRoute.code(),
                    reply_text: "NO_ROUTE".into(),
                    exchange: p.exchange.clone(),
                    routing_key: p.routing_key.clone(),
                })),
            );
            frame::put_content(
                &mut self.wbuf,
                id,
                &msg.properties_raw,
                &msg.body,
                self.frame_max,
            );
        }
        if let Some(t) = self.ch(id)?.confirms.as_mut() {
            t.publish(0);
            self.write_confirms(id);
        }
        Ok(())
    }
}

/// Why a publish could not be routed at all.
enum RouteMiss {
    /// The exchange does not exist.
    NoExchange,
    /// The exchange is internal.
    Internal,
}

/// Fill `targets` with the queues a publish goes to.
fn route_publish(
    topo: &crate::topology::VhostTopology,
    exchange: &str,
    routing_key: &str,
    props: &amq_protocol::protocol::BasicProperties,
    targets: &mut Vec<String>,
) -> Result<(), RouteMiss> {
    if exchange.is_empty() {
        if topo.queues.contains_key(routing_key) {
            targets.push(routing_key.to_string());
        }
        return Ok(());
    }
    let Some(x) = topo.exchanges.get(exchange) else {
        return Err(RouteMiss::NoExchange);
    };
    if x.def.internal {
        return Err(RouteMiss::Internal);
    }
    let headers = if routing::needs_headers(&topo.exchanges, x) {
        props.headers().clone()
    } else {
        None
    };
    routing::route(&topo.exchanges, x, routing_key, headers.as_ref(), targets);
    Ok(())
}
