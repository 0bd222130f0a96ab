//! Why a connection closes: from inside (the client's packets, its socket,
//! its keep alive, its limits: [`CloseReason`]) or from outside while it
//! waits (shutdown, or the router kicking it: [`StopSignals`]), and what
//! each reason means for presence, the will and the metrics.

use tokio_util::sync::CancellationToken;

use crate::edge::stats::DisconnectReason;
use crate::fleet::presence::OfflineReason;

/// Why a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CloseReason {
    Clean,
    SocketClosed,
    KeepAlive,
    Protocol(&'static str),
    Acl,
    TakeOver,
    SlowConsumer,
    Shutdown,
    /// A packet larger than `max_packet_size`.
    TooLarge,
    /// More unreleased inbound QoS 2 publishes than `max_inflight`.
    InflightExceeded,
    /// A machine over `machine_publish_rate`.
    RateLimited,
    /// The connection's memory budget was exhausted.
    MemoryBudget,
    /// Its account was disabled or removed while connected.
    Revoked,
}

impl CloseReason {
    pub(super) fn presence_reason(self) -> OfflineReason {
        match self {
            Self::Clean => OfflineReason::Clean,
            Self::SocketClosed | Self::TakeOver | Self::SlowConsumer | Self::Revoked => {
                OfflineReason::SocketClosed
            }
            Self::KeepAlive => OfflineReason::KeepAliveTimeout,
            Self::Protocol(_)
            | Self::Acl
            | Self::TooLarge
            | Self::InflightExceeded
            | Self::RateLimited
            | Self::MemoryBudget => OfflineReason::ProtocolViolation,
            Self::Shutdown => OfflineReason::Shutdown,
        }
    }

    /// MQTT 3.1.1 §3.1.2.5: the will goes out when the connection ends
    /// without DISCONNECT. A take-over hands the session to the new
    /// connection, and a shutting-down gateway is not the machine failing, so
    /// neither publishes it.
    pub(super) fn publishes_will(self) -> bool {
        !matches!(self, Self::Clean | Self::TakeOver | Self::Shutdown)
    }

    /// The `reason` label of the disconnect metric.
    pub(super) fn metric_reason(self) -> DisconnectReason {
        match self {
            Self::Clean => DisconnectReason::Clean,
            Self::SocketClosed => DisconnectReason::SocketClosed,
            Self::KeepAlive => DisconnectReason::KeepAliveTimeout,
            Self::Protocol(_) => DisconnectReason::ProtocolViolation,
            Self::Acl => DisconnectReason::AclViolation,
            Self::TakeOver => DisconnectReason::TakeOver,
            Self::SlowConsumer => DisconnectReason::SlowConsumer,
            Self::Shutdown => DisconnectReason::Shutdown,
            Self::TooLarge => DisconnectReason::PacketTooLarge,
            Self::InflightExceeded => DisconnectReason::InflightExceeded,
            Self::RateLimited => DisconnectReason::RateLimited,
            Self::MemoryBudget => DisconnectReason::MemoryBudget,
            Self::Revoked => DisconnectReason::Revoked,
        }
    }
}

/// What ends a connection from outside while it waits: shutdown or a kick
/// (take-over, slow consumer, memory budget, revoked account).
pub(super) struct StopSignals<'a> {
    pub(super) shutdown: &'a CancellationToken,
    pub(super) kicked: &'a CancellationToken,
}

impl StopSignals<'_> {
    /// Waits for the first signal. A kick answers `TakeOver`; the session
    /// loop replaces it with the kick's own reason.
    pub(super) async fn fired(&self) -> CloseReason {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => CloseReason::Shutdown,
            _ = self.kicked.cancelled() => CloseReason::TakeOver,
        }
    }
}
