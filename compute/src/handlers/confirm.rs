//! confirm.select, and tx.* (not implemented: RabbitMQ's 540 NOT_IMPLEMENTED).

use amq_protocol::protocol::{AMQPClass, confirm, tx};

use crate::channel::ConfirmTracker;
use crate::connection::Conn;
use crate::error::AmqpError;

impl Conn {
    pub(crate) fn on_confirm(&mut self, id: u16, m: confirm::AMQPMethod) -> Result<(), AmqpError> {
        match m {
            confirm::AMQPMethod::Select(s) => {
                let ch = self.ch(id)?;
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

    pub(crate) fn on_tx(&mut self, _id: u16, m: tx::AMQPMethod) -> Result<(), AmqpError> {
        match m {
            tx::AMQPMethod::Select(_) | tx::AMQPMethod::Commit(_) | tx::AMQPMethod::Rollback(_) => {
                Err(AmqpError::not_implemented("transactions are not supported"))
            }
            _ => Err(AmqpError::command_invalid("unimplemented method")),
        }
    }
}
