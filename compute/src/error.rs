//! Errors: [`ComputeError`] for the node itself, [`AmqpError`] for what a client is told.

use warren_storage::StorageError;

/// Why a compute node could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] warren_common::config::ConfigError),
    /// The storage tier could not be reached.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The node could not load its metadata.
    #[error("startup failed: {0}")]
    Startup(String),
    /// Accepting connections failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub use warren_proto::amqp::ReplyCode;

/// A protocol error to report to the client: code, text, and the method that caused it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} - {text}", code.name())]
pub struct AmqpError {
    /// The reply code.
    pub code: ReplyCode,
    /// The human text after the code name.
    pub text: String,
    /// Class id of the offending method (0 if none).
    pub class_id: u16,
    /// Method id of the offending method (0 if none).
    pub method_id: u16,
}

impl AmqpError {
    /// An error with no offending method recorded yet.
    pub fn new(code: ReplyCode, text: impl Into<String>) -> Self {
        AmqpError {
            code,
            text: text.into(),
            class_id: 0,
            method_id: 0,
        }
    }

    /// Record which method caused it, unless already recorded.
    pub fn on(mut self, class_id: u16, method_id: u16) -> Self {
        if self.class_id == 0 && self.method_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }

    /// The reply text as RabbitMQ formats it: `CODE_NAME - detail`.
    pub fn reply_text(&self) -> String {
        let mut t = format!("{} - {}", self.code.name(), self.text);
        // The reply text is a shortstr.
        if t.len() > 255 {
            let mut cut = 255;
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
        }
        t
    }

    /// 404 NOT_FOUND.
    pub fn not_found(text: impl Into<String>) -> Self {
        Self::new(ReplyCode::NotFound, text)
    }
    /// 406 PRECONDITION_FAILED.
    pub fn precondition(text: impl Into<String>) -> Self {
        Self::new(ReplyCode::PreconditionFailed, text)
    }
    /// 405 RESOURCE_LOCKED.
    pub fn locked(text: impl Into<String>) -> Self {
        Self::new(ReplyCode::ResourceLocked, text)
    }
    /// 403 ACCESS_REFUSED.
    pub fn access_refused(text: impl Into<String>) -> Self {
        Self::new(ReplyCode::AccessRefused, text)
    }
    /// 503 COMMAND_INVALID.
    pub fn command_invalid(text: impl Into<String>) -> Self {
        Self::new(ReplyCode::CommandInvalid, text)
    }
    /// 540 NOT_IMPLEMENTED.
    pub fn not_implemented(text: impl Into<String>) -> Self {
        Self::new(ReplyCode::NotImplemented, text)
    }
    /// 541 INTERNAL_ERROR.
    pub fn internal(text: impl Into<String>) -> Self {
        Self::new(ReplyCode::InternalError, text)
    }
}

impl From<warren_proto::amqp::FrameError> for AmqpError {
    fn from(e: warren_proto::amqp::FrameError) -> Self {
        let (class_id, method_id) = e.method_ids();
        AmqpError {
            code: e.reply_code(),
            text: e.to_string(),
            class_id,
            method_id,
        }
    }
}

impl From<StorageError> for AmqpError {
    fn from(e: StorageError) -> Self {
        // Clients see a storage outage as a server-side failure of the operation.
        AmqpError::internal(format!("storage unavailable: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_scopes_match_the_spec() {
        let table = [
            (ReplyCode::NotFound, 404, false),
            (ReplyCode::ResourceLocked, 405, false),
            (ReplyCode::PreconditionFailed, 406, false),
            (ReplyCode::AccessRefused, 403, false),
            (ReplyCode::FrameError, 501, true),
            (ReplyCode::ChannelError, 504, true),
            (ReplyCode::UnexpectedFrame, 505, true),
            (ReplyCode::NotAllowed, 530, true),
            (ReplyCode::NotImplemented, 540, true),
        ];
        for (c, n, hard) in table {
            assert_eq!(c.code(), n);
            assert_eq!(c.is_hard(), hard, "{c:?}");
        }
    }

    #[test]
    fn reply_text_is_rabbitmq_formatted_and_bounded() {
        let e = AmqpError::not_found("no queue 'q' in vhost '/'");
        assert_eq!(e.reply_text(), "NOT_FOUND - no queue 'q' in vhost '/'");
        let long = AmqpError::not_found("x".repeat(400));
        assert_eq!(long.reply_text().len(), 255);
    }
}
