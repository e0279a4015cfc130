//! confirm.select, and tx.select / commit / rollback.

use amq_protocol::protocol::{AMQPClass, confirm, tx};

use crate::channel::{ConfirmTracker, TxBuffer, TxSettle};
use crate::connection::{Conn, Settle};
use crate::error::AmqpError;

impl Conn {
    pub(crate) fn on_confirm(&mut self, id: u16, m: confirm::AMQPMethod) -> Result<(), AmqpError> {
        match m {
            confirm::AMQPMethod::Select(s) => {
                let ch = self.ch(id)?;
                if ch.tx.is_some() {
                    return Err(AmqpError::precondition(
                        "cannot switch from tx to confirm mode",
                    ));
                }
                if ch.confirms.is_none() {
                    ch.confirms = Some(ConfirmTracker::default());
                }
                if !s.nowait {
                    self.reply(
                        id,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            confirm::AMQPMethod::SelectOk(_) => {
                Err(AmqpError::command_invalid("unimplemented method"))
            }
        }
    }

    pub(crate) async fn on_tx(&mut self, id: u16, m: tx::AMQPMethod) -> Result<(), AmqpError> {
        match m {
            tx::AMQPMethod::Select(_) => {
                let ch = self.ch(id)?;
                if ch.confirms.is_some() {
                    return Err(AmqpError::precondition(
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if ch.tx.is_none() {
                    ch.tx = Some(TxBuffer::default());
                }
                self.reply(id, AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
                Ok(())
            }
            tx::AMQPMethod::Commit(_) => {
                let buf = self
                    .ch(id)?
                    .tx
                    .replace(TxBuffer::default())
                    .ok_or_else(|| AmqpError::precondition("channel is not transactional"))?;
                for content in buf.publishes {
                    self.publish_now(id, content).await?;
                }
                for (_, u, how) in buf.settles {
                    let how = match how {
                        TxSettle::Ack => Settle::Ack,
                        TxSettle::Requeue => Settle::Requeue,
                        TxSettle::Drop => Settle::Drop,
                    };
                    self.settle(id, vec![u], how).await;
                }
                self.reply(id, AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
                Ok(())
            }
            tx::AMQPMethod::Rollback(_) => {
                let ch = self.ch(id)?;
                let buf = ch
                    .tx
                    .replace(TxBuffer::default())
                    .ok_or_else(|| AmqpError::precondition("channel is not transactional"))?;
                // Settlements are discarded: those deliveries are unacked again.
                for (tag, u, _) in buf.settles {
                    ch.unacked.insert(tag, u);
                }
                self.reply(
                    id,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
                Ok(())
            }
            _ => Err(AmqpError::command_invalid("unimplemented method")),
        }
    }
}
