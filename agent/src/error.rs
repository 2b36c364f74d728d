//! The agent's error type and its mapping onto ttrpc status codes.

use ttrpc::{Code, Error as TtrpcError};

/// An error answered to the host. Each variant maps to one ttrpc status code, and the
/// message names the object and the action that failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

pub type Result<T> = std::result::Result<T, AgentError>;

impl AgentError {
    pub fn code(&self) -> Code {
        match self {
            AgentError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            AgentError::NotFound(_) => Code::NOT_FOUND,
            AgentError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            AgentError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            AgentError::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            AgentError::Unimplemented(_) => Code::UNIMPLEMENTED,
            AgentError::Internal(_) => Code::INTERNAL,
        }
    }
}

impl From<AgentError> for TtrpcError {
    fn from(e: AgentError) -> Self {
        TtrpcError::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// Shorthand constructors that keep call sites short.
pub fn invalid(msg: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument(msg.into())
}

pub fn not_found(msg: impl Into<String>) -> AgentError {
    AgentError::NotFound(msg.into())
}
