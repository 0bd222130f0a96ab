//! MQTT topics of the device protocol (`vend/v1/{machine_no}/…`): builders,
//! an exact parser, and the MQTT 3.1.1 topic/filter rules the gateway's edge
//! enforces because the embedded broker does not.

use std::fmt;

use crate::machine::MachineNo;

/// Every protocol topic starts with this.
pub const PREFIX: &str = "vend/v1/";

/// Longest topic or filter MQTT can carry (a 16-bit length prefix).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Messages a machine publishes (machine → gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Uplink {
    /// `state`, retained: `{"online":…,"firmware":…}`, also the last will.
    State,
    /// `inventory`: a full stock snapshot.
    Inventory,
    /// `pong`: the answer to `cmd/ping`.
    Pong,
    /// `ack`: acceptance or refusal of a dispense command.
    Ack,
    /// `result`: the outcome of an accepted order.
    Result,
}

impl Uplink {
    /// Every uplink kind, for subscriptions and exhaustive tests.
    pub const ALL: [Self; 5] = [
        Self::State,
        Self::Inventory,
        Self::Pong,
        Self::Ack,
        Self::Result,
    ];

    /// The topic level(s) after `vend/v1/{machine_no}/`.
    pub fn suffix(&self) -> &'static str {
        match self {
            Self::State => "state",
            Self::Inventory => "inventory",
            Self::Pong => "pong",
            Self::Ack => "ack",
            Self::Result => "result",
        }
    }

    /// The metrics label: the topic with the machine level replaced by `+`.
    pub fn pattern(&self) -> &'static str {
        // Literal strings (not format!) so labels are `&'static str`; a test
        // checks they agree with `suffix`.
        match self {
            Self::State => "vend/v1/+/state",
            Self::Inventory => "vend/v1/+/inventory",
            Self::Pong => "vend/v1/+/pong",
            Self::Ack => "vend/v1/+/ack",
            Self::Result => "vend/v1/+/result",
        }
    }

    /// The kind whose suffix is exactly `s`.
    pub fn from_suffix(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|u| u.suffix() == s)
    }
}

/// Commands the gateway sends (gateway → machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `cmd/dispense`: reserve the slot for an order (phase one: the
    /// machine acks and holds it, dispensing nothing yet).
    Dispense,
    /// `cmd/go`: dispense the held order now (phase two, sent only after
    /// the gateway recorded the acceptance).
    Go,
    /// `cmd/cancel`: never dispense this order.
    Cancel,
    /// `cmd/ping`: answer with `pong`.
    Ping,
}

impl Command {
    /// Every command kind.
    pub const ALL: [Self; 4] = [Self::Dispense, Self::Go, Self::Cancel, Self::Ping];

    /// The topic levels after `vend/v1/{machine_no}/`.
    pub fn suffix(&self) -> &'static str {
        match self {
            Self::Dispense => "cmd/dispense",
            Self::Go => "cmd/go",
            Self::Cancel => "cmd/cancel",
            Self::Ping => "cmd/ping",
        }
    }

    /// The metrics label: the topic with the machine level replaced by `+`.
    pub fn pattern(&self) -> &'static str {
        match self {
            Self::Dispense => "vend/v1/+/cmd/dispense",
            Self::Go => "vend/v1/+/cmd/go",
            Self::Cancel => "vend/v1/+/cmd/cancel",
            Self::Ping => "vend/v1/+/cmd/ping",
        }
    }

    /// The kind whose suffix is exactly `s`.
    pub fn from_suffix(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.suffix() == s)
    }
}

/// A parsed protocol topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `vend/v1/{m}/{state|inventory|pong|ack|result}`.
    Uplink(MachineNo, Uplink),
    /// `vend/v1/{m}/cmd/{dispense|go|cancel|ping}`.
    Command(MachineNo, Command),
}

impl Topic {
    /// The machine the topic belongs to.
    pub fn machine(&self) -> MachineNo {
        match self {
            Self::Uplink(m, _) | Self::Command(m, _) => *m,
        }
    }

    /// The metrics label, e.g. `vend/v1/+/ack`; bounded cardinality.
    pub fn pattern(&self) -> &'static str {
        match self {
            Self::Uplink(_, u) => u.pattern(),
            Self::Command(_, c) => c.pattern(),
        }
    }

    fn suffix(&self) -> &'static str {
        match self {
            Self::Uplink(_, u) => u.suffix(),
            Self::Command(_, c) => c.suffix(),
        }
    }
}

impl fmt::Display for Topic {
    /// The full topic string, as [`uplink`] and [`command`] build it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}/{}", self.machine(), self.suffix())
    }
}

/// `vend/v1/{m}/{uplink}`.
pub fn uplink(m: &MachineNo, u: Uplink) -> String {
    Topic::Uplink(*m, u).to_string()
}

/// `vend/v1/{m}/cmd/{command}`.
pub fn command(m: &MachineNo, c: Command) -> String {
    Topic::Command(*m, c).to_string()
}

/// `vend/v1/{m}/`: everything a machine may publish or subscribe to lies
/// under this.
pub fn machine_prefix(m: &MachineNo) -> String {
    format!("{PREFIX}{m}/")
}

/// `vend/v1/{m}/cmd/#`: the machine's command subscription.
pub fn command_filter(m: &MachineNo) -> String {
    format!("{PREFIX}{m}/cmd/#")
}

/// Parses a protocol topic; only the exact topics of PROTOCOL.md match
/// (no extra levels, no trailing slash, no other case).
pub fn parse(topic: &str) -> Option<Topic> {
    let (m, suffix) = split_machine(topic)?;
    if let Some(u) = Uplink::from_suffix(suffix) {
        Some(Topic::Uplink(m, u))
    } else {
        Command::from_suffix(suffix).map(|c| Topic::Command(m, c))
    }
}

/// The machine whose prefix `vend/v1/{8 digits}/` the topic lies under,
/// whatever follows it (used to attribute unknown or malformed traffic).
pub fn machine_of(topic: &str) -> Option<MachineNo> {
    split_machine(topic).map(|(m, _)| m)
}

/// Splits `vend/v1/{m}/{rest}` into the machine and `rest`.
fn split_machine(topic: &str) -> Option<(MachineNo, &str)> {
    // `split_once` cuts at a '/' char boundary, so multi-byte UTF-8 is safe.
    let (m, rest) = topic.strip_prefix(PREFIX)?.split_once('/')?;
    MachineNo::parse(m).ok().map(|m| (m, rest))
}

/// Whether `t` is a valid MQTT 3.1.1 PUBLISH topic name: non-empty, at most
/// 65 535 bytes, no wildcard characters and no U+0000.
pub fn valid_publish_topic(t: &str) -> bool {
    !t.is_empty() && t.len() <= MAX_TOPIC_LEN && !t.contains(['+', '#', '\0'])
}

/// Whether `f` is a valid MQTT 3.1.1 topic filter (§4.7): non-empty, at most
/// 65 535 bytes, no U+0000, `#` only as the whole last level, `+` only as a
/// whole level.
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() || f.len() > MAX_TOPIC_LEN || f.contains('\0') {
        return false;
    }
    let mut levels = f.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        if level.contains('#') && !(level == "#" && is_last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// Whether the filter `filter` matches the topic name `topic` under MQTT
/// 3.1.1 rules. Invalid filters or topics match nothing. Topics starting
/// with `$` are not matched by a filter whose first level is a wildcard
/// (§4.7.2). Works on whole levels, so multi-byte UTF-8 is handled.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if !valid_filter(filter) || !valid_publish_topic(topic) {
        return false;
    }
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f_levels = filter.split('/');
    let mut t_levels = topic.split('/');
    loop {
        match (f_levels.next(), t_levels.next()) {
            // `#` matches the parent level and any number of child levels:
            // "a/#" matches "a", "a/b" and "a/b/c".
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic `filter` can match starts with `prefix` — used to keep
/// a machine's subscriptions inside `vend/v1/{its own number}/`.
///
/// `prefix` normally ends with `/`. One deliberate exception: a filter ending
/// in `#` right after the prefix (`vend/v1/12345678/#`) is accepted although
/// MQTT lets it match the parent topic `vend/v1/12345678` as well, because
/// that parent belongs to the same machine and nobody may publish to it.
/// Invalid filters are never within any prefix.
pub fn filter_within_prefix(filter: &str, prefix: &str) -> bool {
    if !valid_filter(filter) {
        return false;
    }
    // The prefix is some complete levels followed by a (possibly empty)
    // partial level: "vend/v1/12345678/" → ["vend","v1","12345678"] + "".
    let (complete, partial) = match prefix.rsplit_once('/') {
        Some((complete, partial)) => (Some(complete), partial),
        None => (None, prefix),
    };
    let mut f_levels = filter.split('/');
    if let Some(complete) = complete {
        for p in complete.split('/') {
            // Any wildcard here could match a different or shorter topic.
            match f_levels.next() {
                Some(f) if f == p => {}
                _ => return false,
            }
        }
    }
    match f_levels.next() {
        // The filter stops at the prefix's parent level: "vend/v1/12345678".
        None => false,
        Some("#") => partial.is_empty(),
        Some("+") => partial.is_empty(),
        Some(level) => level.starts_with(partial),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> MachineNo {
        MachineNo::parse("12345678").unwrap()
    }

    #[test]
    fn builders() {
        assert_eq!(uplink(&m(), Uplink::State), "vend/v1/12345678/state");
        assert_eq!(
            command(&m(), Command::Dispense),
            "vend/v1/12345678/cmd/dispense"
        );
        assert_eq!(machine_prefix(&m()), "vend/v1/12345678/");
        assert_eq!(command_filter(&m()), "vend/v1/12345678/cmd/#");
    }

    #[test]
    fn patterns_agree_with_suffixes() {
        for u in Uplink::ALL {
            assert_eq!(u.pattern(), format!("{PREFIX}+/{}", u.suffix()));
            assert_eq!(Topic::Uplink(m(), u).pattern(), u.pattern());
        }
        for c in Command::ALL {
            assert_eq!(c.pattern(), format!("{PREFIX}+/{}", c.suffix()));
            assert_eq!(Topic::Command(m(), c).pattern(), c.pattern());
        }
    }

    #[test]
    fn parse_and_machine_of() {
        assert_eq!(
            parse("vend/v1/12345678/ack"),
            Some(Topic::Uplink(m(), Uplink::Ack))
        );
        assert_eq!(
            parse("vend/v1/12345678/cmd/ping"),
            Some(Topic::Command(m(), Command::Ping))
        );
        assert_eq!(machine_of("vend/v1/12345678/whatever/else"), Some(m()));
        assert_eq!(machine_of("vend/v1/12345678/"), Some(m()));
        assert_eq!(machine_of("vend/v1/12345678"), None);
        assert_eq!(machine_of("vend/v1/1234567/ack"), None);
    }

    #[test]
    fn filter_validity() {
        for f in ["#", "+", "a/#", "+/+", "a/+/b", "/", "a//b", "+/#", "é/+/ü"] {
            assert!(valid_filter(f), "{f}");
        }
        for f in ["", "a#", "a/#/b", "#/a", "a+", "a/b+/c", "a\0b", "##"] {
            assert!(!valid_filter(f), "{f}");
        }
    }

    #[test]
    fn publish_topic_validity() {
        assert!(valid_publish_topic("a/b"));
        assert!(valid_publish_topic("é/x"));
        assert!(valid_publish_topic("/"));
        assert!(!valid_publish_topic(""));
        assert!(!valid_publish_topic("a/+"));
        assert!(!valid_publish_topic("a/#"));
        assert!(!valid_publish_topic("a\0"));
        assert!(valid_publish_topic(&"a".repeat(MAX_TOPIC_LEN)));
        assert!(!valid_publish_topic(&"a".repeat(MAX_TOPIC_LEN + 1)));
    }
}
