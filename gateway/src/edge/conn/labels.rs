//! How a connection appears in log lines and metric labels: client-chosen
//! strings (client ids, usernames, topics, filters) escaped and cut, so a
//! client cannot forge or flood log lines with them; the machine number;
//! the client kind.

use crate::edge::stats::ClientKind;

use super::super::acl::ClientClass;

/// Client-chosen strings in log lines are cut to this many characters.
const LOG_CHARS: usize = 64;

/// A client-chosen string as a log field: Debug-escaped (CR, LF and other
/// control characters cannot forge log lines) and cut to [`LOG_CHARS`]
/// characters, with the full length in bytes when cut.
pub(super) fn shown(s: &str) -> Shown<'_> {
    Shown(s)
}

pub(super) struct Shown<'a>(&'a str);

impl std::fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.char_indices().nth(LOG_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => {
                let head = self.0.get(..cut).unwrap_or("");
                write!(f, "{head:?}…({} bytes)", self.0.len())
            }
        }
    }
}

/// The `machine_no` log field: empty for a service client.
pub(super) fn machine_label(class: ClientClass) -> String {
    match class {
        ClientClass::Machine(m) => m.to_string(),
        ClientClass::Service => String::new(),
    }
}

/// The client kind the connection metrics are counted under.
pub(super) fn client_kind(class: ClientClass) -> ClientKind {
    match class {
        ClientClass::Machine(_) => ClientKind::Machine,
        ClientClass::Service => ClientKind::Service,
    }
}
