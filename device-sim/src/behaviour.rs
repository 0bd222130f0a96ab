//! How a simulated machine answers dispense commands (normal, refusing,
//! failing, silent, slow, …), selectable per machine and changeable at runtime.
//!
//! Dispensing is two-phase (PROTOCOL.md machine rule 2): a machine that
//! accepts a `cmd/dispense` acks it and *holds* the order; it dispenses only
//! when `cmd/go` for it arrives, drops it on `cmd/cancel`, and drops it with
//! a `no_go` result when neither comes within its go timeout. How a held
//! order will be dispensed (full, half, nothing, result withheld, …) is
//! fixed by the behaviour in force when the machine acks it. Only
//! `ignore-go` breaks the rule, on purpose.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The default refusal reason for `refuse` on the command line.
pub const DEFAULT_REFUSE_REASON: &str = "door_open";
/// The default failure for `fail` and `partial` on the command line.
pub const DEFAULT_ERROR: &str = "motor_jam";
/// The default delay for `slow-ack` on the command line.
pub const DEFAULT_SLOW_ACK_MS: u64 = 2_000;
/// The default stall for `half-open` on the command line: long enough for
/// any keep alive the protocol allows (60 s × 1.5) to expire first.
pub const DEFAULT_HALF_OPEN_MS: u64 = 120_000;

/// How the machine answers `cmd/dispense` (and, for `ignore-go`, `cmd/go`).
/// Pings are always answered.
///
/// In scenario files (serde) the variant is the `kind` field in kebab-case:
/// `{ kind = "refuse", reason = "door_open" }`, `{ kind = "normal" }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Behaviour {
    /// Accept and hold; on `go` dispense what is in stock, report any
    /// shortfall as `out_of_stock`.
    #[default]
    Normal,
    /// Refuse every new order with this reason.
    Refuse { reason: String },
    /// Accept and hold; on `go` dispense nothing, report `dispensed: 0`
    /// with this error.
    Fail { error: String },
    /// Accept and hold; on `go` dispense half of each line (rounded down,
    /// so always short), report this error.
    Partial { error: String },
    /// Record dispense commands and never answer them.
    NeverAck,
    /// Accept and hold; on `go` dispense, then publish neither result nor
    /// inventory (the result is still stored, and re-published after a
    /// reconnect once the behaviour has changed). A go-timeout `no_go`
    /// result is withheld the same way.
    AckThenSilent,
    /// Decide `ms` milliseconds after receipt: refuse as `expired` if the
    /// order was cancelled meanwhile or `ms` ≥ `ttl_ms`, else accept and
    /// hold as `normal` does.
    SlowAck { ms: u64 },
    /// Drop the connection (no DISCONNECT, so the will fires) on the next
    /// dispense command without answering it, then behave normally.
    DropConnection,
    /// Accept and hold; on `go` dispense, then drop the connection (no
    /// DISCONNECT) as soon as the gateway has acknowledged everything sent
    /// before, without publishing the result; the stored result goes out
    /// after the reconnect (machine rule 4). Every order, every time.
    ResultAfterReconnect,
    /// Behave normally but publish every ack and result twice (a lost
    /// PUBACK, a firmware retry); the results also go out again after each
    /// reconnect, as with every behaviour.
    Duplicate,
    /// Before acking each dispense command, publish a burst of hostile
    /// payloads on the machine's own uplink topics: broken JSON, wrong
    /// types, numbers beyond 64 bits, deep nesting, invalid UTF-8, acks and
    /// results for orders that do not exist, and a topic the protocol does
    /// not define; on `go`, before the real result, two results that do not
    /// fit the order. Otherwise normal.
    Malformed,
    /// On the next dispense command stop reading and answering for `ms`
    /// milliseconds (no ack, no PINGREQ, no PUBACK) while keeping the TCP
    /// socket open, then read again and behave normally. The gateway must
    /// notice by keep alive alone.
    HalfOpen { ms: u64 },
    /// Non-compliant (breaks machine rule 2): the old one-phase machine.
    /// Acks and dispenses at once, publishing ack, result and inventory,
    /// without waiting for `go`; every `go` is ignored (not answered). A
    /// `cancel` that arrives before the dispense command still refuses it
    /// as `expired`; one after it changes nothing (the goods are out).
    IgnoreGo,
    /// After acking each order the machine reboots: it forgets every held
    /// order (held orders live in RAM; stock and finished orders' answers
    /// are kept, as in flash), cuts the connection without DISCONNECT once
    /// the gateway has acknowledged the ack, and reconnects. A `go` for the
    /// order, whenever it arrives, finds it not held and is answered
    /// `{"order_id":…,"items":[],"error":"no_go"}`; nothing is dispensed.
    /// Every order, every time.
    RebootBeforeGo,
}

/// A behaviour name the command line does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown behaviour {0:?}: expected normal, refuse[:REASON], fail[:ERROR], partial[:ERROR], \
     never-ack, ack-then-silent, slow-ack[:MS], drop-connection, result-after-reconnect, \
     duplicate, malformed, half-open[:MS], ignore-go or reboot-before-go"
)]
pub struct InvalidBehaviour(String);

impl FromStr for Behaviour {
    type Err = InvalidBehaviour;

    /// Parses the command-line form `name[:argument]`, e.g. `refuse:door_open`
    /// or `slow-ack:5000`; the argument has a default where one is needed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, arg) = match s.split_once(':') {
            Some((name, arg)) => (name, Some(arg)),
            None => (s, None),
        };
        let text = |default: &str| arg.unwrap_or(default).to_owned();
        let behaviour = match (name, arg) {
            ("normal", None) => Self::Normal,
            ("refuse", _) => Self::Refuse {
                reason: text(DEFAULT_REFUSE_REASON),
            },
            ("fail", _) => Self::Fail {
                error: text(DEFAULT_ERROR),
            },
            ("partial", _) => Self::Partial {
                error: text(DEFAULT_ERROR),
            },
            ("never-ack", None) => Self::NeverAck,
            ("ack-then-silent", None) => Self::AckThenSilent,
            ("slow-ack", None) => Self::SlowAck {
                ms: DEFAULT_SLOW_ACK_MS,
            },
            ("slow-ack", Some(ms)) => Self::SlowAck {
                ms: ms.parse().map_err(|_| InvalidBehaviour(s.to_owned()))?,
            },
            ("drop-connection", None) => Self::DropConnection,
            ("result-after-reconnect", None) => Self::ResultAfterReconnect,
            ("duplicate", None) => Self::Duplicate,
            ("malformed", None) => Self::Malformed,
            ("half-open", None) => Self::HalfOpen {
                ms: DEFAULT_HALF_OPEN_MS,
            },
            ("half-open", Some(ms)) => Self::HalfOpen {
                ms: ms.parse().map_err(|_| InvalidBehaviour(s.to_owned()))?,
            },
            ("ignore-go", None) => Self::IgnoreGo,
            ("reboot-before-go", None) => Self::RebootBeforeGo,
            _ => return Err(InvalidBehaviour(s.to_owned())),
        };
        Ok(behaviour)
    }
}

impl fmt::Display for Behaviour {
    /// The command-line form, which [`FromStr`] parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Normal => f.write_str("normal"),
            Self::Refuse { reason } => write!(f, "refuse:{reason}"),
            Self::Fail { error } => write!(f, "fail:{error}"),
            Self::Partial { error } => write!(f, "partial:{error}"),
            Self::NeverAck => f.write_str("never-ack"),
            Self::AckThenSilent => f.write_str("ack-then-silent"),
            Self::SlowAck { ms } => write!(f, "slow-ack:{ms}"),
            Self::DropConnection => f.write_str("drop-connection"),
            Self::ResultAfterReconnect => f.write_str("result-after-reconnect"),
            Self::Duplicate => f.write_str("duplicate"),
            Self::Malformed => f.write_str("malformed"),
            Self::HalfOpen { ms } => write!(f, "half-open:{ms}"),
            Self::IgnoreGo => f.write_str("ignore-go"),
            Self::RebootBeforeGo => f.write_str("reboot-before-go"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_command_line_forms() {
        assert_eq!("normal".parse(), Ok(Behaviour::Normal));
        assert_eq!(
            "refuse".parse(),
            Ok(Behaviour::Refuse {
                reason: "door_open".into()
            })
        );
        assert_eq!(
            "partial:coin_jam".parse(),
            Ok(Behaviour::Partial {
                error: "coin_jam".into()
            })
        );
        assert_eq!("slow-ack:50".parse(), Ok(Behaviour::SlowAck { ms: 50 }));
        assert!("slow-ack:soon".parse::<Behaviour>().is_err());
        assert!("normal:x".parse::<Behaviour>().is_err());
        assert!("sleepy".parse::<Behaviour>().is_err());
        assert_eq!(
            "half-open".parse(),
            Ok(Behaviour::HalfOpen {
                ms: DEFAULT_HALF_OPEN_MS
            })
        );
        assert!("half-open:later".parse::<Behaviour>().is_err());
        assert!("duplicate:2".parse::<Behaviour>().is_err());
        assert_eq!("ignore-go".parse(), Ok(Behaviour::IgnoreGo));
        assert_eq!("reboot-before-go".parse(), Ok(Behaviour::RebootBeforeGo));
        assert!("ignore-go:1".parse::<Behaviour>().is_err());
        assert!("reboot-before-go:1".parse::<Behaviour>().is_err());
    }

    #[test]
    fn display_round_trips() {
        for b in [
            Behaviour::Normal,
            Behaviour::Refuse {
                reason: "door_open".into(),
            },
            Behaviour::Fail {
                error: "motor_jam".into(),
            },
            Behaviour::Partial {
                error: "motor_jam".into(),
            },
            Behaviour::NeverAck,
            Behaviour::AckThenSilent,
            Behaviour::SlowAck { ms: 7 },
            Behaviour::DropConnection,
            Behaviour::ResultAfterReconnect,
            Behaviour::Duplicate,
            Behaviour::Malformed,
            Behaviour::HalfOpen { ms: 1_500 },
            Behaviour::IgnoreGo,
            Behaviour::RebootBeforeGo,
        ] {
            assert_eq!(b.to_string().parse(), Ok(b));
        }
    }

    #[test]
    fn deserializes_scenario_form() {
        let b: Behaviour =
            serde_json::from_str(r#"{"kind":"refuse","reason":"door_open"}"#).unwrap();
        assert_eq!(
            b,
            Behaviour::Refuse {
                reason: "door_open".into()
            }
        );
        let b: Behaviour = serde_json::from_str(r#"{"kind":"ack-then-silent"}"#).unwrap();
        assert_eq!(b, Behaviour::AckThenSilent);
        let b: Behaviour = serde_json::from_str(r#"{"kind":"slow-ack","ms":100}"#).unwrap();
        assert_eq!(b, Behaviour::SlowAck { ms: 100 });
        let b: Behaviour = serde_json::from_str(r#"{"kind":"ignore-go"}"#).unwrap();
        assert_eq!(b, Behaviour::IgnoreGo);
        let b: Behaviour = serde_json::from_str(r#"{"kind":"reboot-before-go"}"#).unwrap();
        assert_eq!(b, Behaviour::RebootBeforeGo);
    }
}
