//! Why an order request was not answered 0, and the one table from those
//! reasons to the API's error codes.

use tracing::error;
use vendgate_proto::codes::ErrorCode;

use crate::storage::StorageError;

/// Why an order was not accepted; each maps to one API code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("machine not found")]
    MachineNotFound,
    #[error("machine offline")]
    Offline,
    #[error("machine did not accept in time")]
    NotAccepted,
    #[error("machine busy: the order could not be sent in time")]
    Busy,
    #[error("insufficient stock")]
    InsufficientStock,
    #[error("machine refused: {0}")]
    Refused(String),
    #[error("order not found")]
    OrderNotFound,
    #[error("order state conflict")]
    StateConflict,
    #[error("out_trade_no reused with a different body")]
    DuplicateOutTradeNo,
    /// Internal: the out_trade_no is taken by this order (a concurrent repeat).
    #[error("repeat of order {0}")]
    RepeatOf(u64),
    /// Nothing was dispatched (API.md: 50000 means exactly that).
    #[error("internal error")]
    Internal,
}

impl OrderError {
    /// The one place order errors meet API codes.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::MachineNotFound => ErrorCode::MachineNotFound,
            // API.md: "offline, or its acceptance was not received and
            // recorded in time".
            Self::Offline | Self::NotAccepted => ErrorCode::MachineOffline,
            Self::Busy => ErrorCode::MachineBusy,
            Self::InsufficientStock => ErrorCode::InsufficientStock,
            Self::Refused(_) => ErrorCode::MachineRefused,
            Self::OrderNotFound => ErrorCode::OrderNotFound,
            Self::StateConflict => ErrorCode::OrderStateConflict,
            Self::DuplicateOutTradeNo => ErrorCode::DuplicateOutTradeNo,
            // Never leaves the service: placing resolves it.
            Self::RepeatOf(_) | Self::Internal => ErrorCode::Internal,
        }
    }

    /// The error an API code stands for (what [`Self::code`] gives, read
    /// back; 30002 reads as [`Self::NotAccepted`], unknown codes as
    /// [`Self::Internal`]). `reason`: a machine's refusal reason for 30005.
    pub fn from_code(code: i32, reason: Option<String>) -> Self {
        match ErrorCode::from_code(code) {
            Some(ErrorCode::MachineNotFound) => Self::MachineNotFound,
            Some(ErrorCode::MachineOffline) => Self::NotAccepted,
            Some(ErrorCode::MachineBusy) => Self::Busy,
            Some(ErrorCode::InsufficientStock) => Self::InsufficientStock,
            Some(ErrorCode::MachineRefused) => {
                Self::Refused(reason.unwrap_or_else(|| "refused".into()))
            }
            Some(ErrorCode::OrderNotFound) => Self::OrderNotFound,
            Some(ErrorCode::OrderStateConflict) => Self::StateConflict,
            Some(ErrorCode::DuplicateOutTradeNo) => Self::DuplicateOutTradeNo,
            _ => Self::Internal,
        }
    }
}

impl From<StorageError> for OrderError {
    fn from(e: StorageError) -> Self {
        error!(error = %e, "storage failed in the order path");
        Self::Internal
    }
}
