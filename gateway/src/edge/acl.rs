//! Who a client is and what it may touch: the topic ACL that every PUBLISH,
//! SUBSCRIBE and will passes, and which retained messages a client may leave
//! in the hub. Pure rules over topic names; the connection applies them and
//! counts what they refuse.

use vendgate_proto::machine::MachineNo;
use vendgate_proto::topic::{self, Topic};

/// Who a connection is, decided once at CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientClass {
    /// A vending machine: may publish and subscribe under its own prefix only.
    Machine(MachineNo),
    /// A trusted integration: anything, but read-only under `vend/v1/`.
    Service,
}

/// The publish ACL: machines under their own prefix, services anywhere but
/// under `vend/v1/` (read-only there: only machines and the gateway write it).
pub(super) fn may_publish(class: ClientClass, topic_name: &str) -> bool {
    match class {
        ClientClass::Machine(m) => topic::machine_of(topic_name) == Some(m),
        ClientClass::Service => !topic_name.starts_with(topic::PREFIX),
    }
}

/// The subscribe ACL: machines only within their own prefix; services any
/// valid filter.
pub(super) fn may_subscribe(class: ClientClass, filter: &str) -> bool {
    match class {
        ClientClass::Machine(m) => topic::filter_within_prefix(filter, &topic::machine_prefix(&m)),
        ClientClass::Service => true,
    }
}

/// Whether `topic_name` is one of machine `m`'s uplink topics (PROTOCOL.md).
/// Within its prefix a machine's publishes are routed only on these.
pub(super) fn is_own_uplink(m: MachineNo, topic_name: &str) -> bool {
    matches!(topic::parse(topic_name), Some(Topic::Uplink(tm, _)) if tm == m)
}

/// Whether a retained publish of `class` may be kept: a machine's uplinks
/// are JSON objects (PROTOCOL.md), so anything else it asks to retain is
/// delivered but not kept, and cannot fill the store with junk. An empty
/// payload clears the topic, as MQTT says.
pub(super) fn may_retain(class: ClientClass, payload: &[u8]) -> bool {
    match class {
        ClientClass::Service => true,
        ClientClass::Machine(_) => payload.is_empty() || is_json_object(payload),
    }
}

fn is_json_object(payload: &[u8]) -> bool {
    payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
}
