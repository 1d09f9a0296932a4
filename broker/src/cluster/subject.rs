//! MQTT topics and filters as NATS subjects (`docs/spec/nats-subjects.md`).
//!
//! A topic `l1/l2/.../ln` becomes `fleet.t.e(l1).e(l2)....e(ln)`. `e` keeps the bytes
//! `A-Z a-z 0-9 - _` as they are and writes every other byte as `%XX` (upper-case hex), so a token
//! never holds `.`, `*`, `>` or whitespace; an empty level becomes the token `%`, which no other
//! level produces (a `%` is otherwise always followed by two hex digits). The mapping is
//! therefore injective and reversible ([`topic_of`]). In a filter, a `+` level becomes `*` and a
//! trailing `#` becomes `>`; since MQTT's `a/#` also matches `a` itself and NATS's `a.>` does not,
//! a filter maps to one or two subjects ([`filter_subjects`]).

use std::fmt::Write as _;

/// Every fleetgate device-message subject starts with this.
pub(crate) const PREFIX: &str = "fleet.t";

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn push_level(out: &mut String, level: &str) {
    out.push('.');
    if level.is_empty() {
        out.push('%');
        return;
    }
    for &b in level.as_bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// The subject of a concrete topic.
pub fn subject_of(topic: &str) -> String {
    subject_under(PREFIX, topic)
}

/// Prefix of the subjects of stored device messages (the JetStream stream's subjects): the same
/// encoding as [`subject_of`] under another prefix, so that routing publishes (`fleet.t`) are not
/// stored and stored ones are not routed twice.
pub(crate) const STORED: &str = "fleet.m";

/// The subject a device message is stored under.
pub(crate) fn stored_subject_of(topic: &str) -> String {
    subject_under(STORED, topic)
}

/// The topic a stored message's subject was made from.
pub(crate) fn topic_of_stored(subject: &str) -> Option<String> {
    topic_under(STORED, subject)
}

fn subject_under(prefix: &str, topic: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + topic.len() + 8);
    out.push_str(prefix);
    for level in topic.split('/') {
        push_level(&mut out, level);
    }
    out
}

/// Prefix of the subjects on which a shared subscription's message is handed to another node
/// (`fleet.g.<queue>.<topic levels>`, [`handoff_subject`]).
pub(crate) const GROUPS: &str = "fleet.g";

/// The NATS queue group of the shared subscription `$share/<group>/<filter>`: one token, the
/// level encoding applied to `<group>/<filter>` as a whole (so `/`, `+` and `#` are escaped too),
/// injective like [`subject_of`].
pub(crate) fn queue_of(group: &str, filter: &str) -> String {
    let mut out = String::with_capacity(group.len() + filter.len() + 8);
    push_level(&mut out, &format!("{group}/{filter}"));
    out.split_off(1)
}

/// The subject on which a message of the shared subscription with queue `queue` is handed on.
pub(crate) fn handoff_subject(queue: &str, topic: &str) -> String {
    subject_under(&format!("{GROUPS}.{queue}"), topic)
}

/// The longest control line nats-server takes by default (`max_control_line`): a `SUB` or
/// `HPUB` line over it makes the server close the connection.
const MAX_CONTROL_LINE: usize = 4096;

/// Do `subject` and `queue` (`""`: none) fit one control line, with room for the verb, the sid
/// and the sizes? A shared subscription's subjects hold its group and filter, which clients
/// choose: one that does not fit is neither subscribed to nor published on, so that no client
/// can make the server drop a node's connection.
pub(crate) fn fits_control_line(subject: &str, queue: &str) -> bool {
    subject.len() + queue.len() + 64 <= MAX_CONTROL_LINE
}

/// What the nodes with members of queue `queue` subscribe to for hand-offs.
pub(crate) fn handoff_filter(queue: &str) -> String {
    format!("{GROUPS}.{queue}.>")
}

/// The topic of a hand-off subject of `queue`.
pub(crate) fn topic_of_handoff(queue: &str, subject: &str) -> Option<String> {
    topic_under(&format!("{GROUPS}.{queue}"), subject)
}

/// Subject on which nodes tell each other of revocations they saw.
pub(crate) const REVOCATIONS: &str = "fleet.r";

/// Prefix of the per-device session subjects (claims of the one live session).
pub(crate) const SESSIONS: &str = "fleet.s";

/// The subject on which nodes claim the session of `device`.
pub(crate) fn session_subject(device: &str) -> String {
    let mut out = String::from(SESSIONS);
    push_level(&mut out, device);
    out
}

/// The subjects a NATS subscription needs so that it receives exactly the topics `filter`
/// matches (for the topics fleetgate accepts: none start with `$`).
pub fn filter_subjects(filter: &str) -> Vec<String> {
    let mut out = String::from(PREFIX);
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "#" if i + 1 == levels.len() => {
                // `a/#` matches `a` too; a lone `#` matches every topic (one or more levels).
                let parent = (i > 0).then(|| out.clone());
                out.push_str(".>");
                return std::iter::once(out).chain(parent).collect();
            }
            "+" => out.push_str(".*"),
            l => push_level(&mut out, l),
        }
    }
    vec![out]
}

/// The stored subjects of the topics `filter` matches (a consumer's filter subjects).
pub(crate) fn stored_filter_subjects(filter: &str) -> Vec<String> {
    filter_subjects(filter).into_iter().map(|s| format!("{STORED}{}", &s[PREFIX.len()..])).collect()
}

/// The topic a subject was made from, if it is one of ours.
pub fn topic_of(subject: &str) -> Option<String> {
    topic_under(PREFIX, subject)
}

fn topic_under(prefix: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let mut topic = Vec::with_capacity(rest.len());
    for (i, token) in rest.split('.').enumerate() {
        if i > 0 {
            topic.push(b'/');
        }
        if token == "%" {
            continue;
        }
        let bytes = token.as_bytes();
        let mut j = 0;
        while j < bytes.len() {
            match bytes[j] {
                b'%' => {
                    let hex = bytes.get(j + 1..j + 3)?;
                    // Exactly two upper-case hex digits (`from_str_radix` alone would also take
                    // "+2": found by the fuzzer).
                    if !hex.iter().all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c)) {
                        return None;
                    }
                    let b = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                    // Not what `subject_of` writes (a plain byte escaped, a level separator
                    // inside a level): refused, which keeps the mapping 1:1.
                    if plain(b) || b == b'/' {
                        return None;
                    }
                    topic.push(b);
                    j += 3;
                }
                b if plain(b) => {
                    topic.push(b);
                    j += 1;
                }
                _ => return None,
            }
        }
        if token.is_empty() {
            return None;
        }
    }
    String::from_utf8(topic).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// NATS subject matching (`*` one token, `>` one or more trailing tokens).
    fn nats_matches(pattern: &str, subject: &str) -> bool {
        let mut p = pattern.split('.');
        let mut s = subject.split('.');
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// A valid NATS subject: non-empty tokens without whitespace or wildcards.
    fn valid_subject(s: &str) -> bool {
        s.split('.').all(|t| !t.is_empty() && !t.contains(['*', '>']) && !t.chars().any(char::is_whitespace))
    }

    /// A valid NATS subscription subject: as a subject, but a token may be `*`, and the last `>`.
    fn valid_pattern(s: &str) -> bool {
        let tokens: Vec<&str> = s.split('.').collect();
        tokens
            .iter()
            .enumerate()
            .all(|(i, t)| *t == "*" || (*t == ">" && i + 1 == tokens.len()) || valid_subject(t))
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z0-9]{1,6}",
            "[ -~]{0,6}".prop_filter("no MQTT wildcards", |s| !s.contains(['+', '#', '/'])),
            "\\PC{0,4}".prop_filter("no MQTT wildcards", |s| !s.contains(['+', '#', '/', '\0'])),
        ]
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..6).prop_map(|l| l.join("/"))
    }

    fn filter() -> impl Strategy<Value = String> {
        (prop::collection::vec(prop_oneof![3 => level(), 1 => Just("+".to_owned())], 0..5), any::<bool>())
            .prop_filter_map("a filter has at least one level", |(mut l, hash)| {
                if hash {
                    l.push("#".into());
                }
                (!l.is_empty()).then(|| l.join("/"))
            })
    }

    proptest! {
        #[test]
        fn every_topic_round_trips_through_a_valid_subject(t in topic()) {
            let s = subject_of(&t);
            prop_assert!(valid_subject(&s), "{s}");
            prop_assert_eq!(topic_of(&s), Some(t));
        }

        #[test]
        fn no_two_topics_share_a_subject(a in topic(), b in topic()) {
            prop_assert_eq!(a == b, subject_of(&a) == subject_of(&b));
        }

        #[test]
        fn a_filter_receives_exactly_the_topics_it_matches(f in filter(), t in topic()) {
            let mqtt = fleet_topic::matches(&f, &t);
            let subjects = filter_subjects(&f);
            for s in &subjects {
                prop_assert!(valid_pattern(s), "{s}");
            }
            let nats = subjects.iter().any(|s| nats_matches(s, &subject_of(&t)));
            prop_assert_eq!(mqtt, nats, "filter {:?} topic {:?} subjects {:?}", f, t, subjects);
        }

        #[test]
        fn stored_subjects_round_trip_match_their_filters_and_are_never_routed(f in filter(), t in topic()) {
            let stored = stored_subject_of(&t);
            prop_assert!(valid_subject(&stored), "{stored}");
            prop_assert_eq!(topic_of_stored(&stored), Some(t.clone()));
            prop_assert_eq!(topic_of(&stored), None);
            let mqtt = fleet_topic::matches(&f, &t);
            prop_assert_eq!(mqtt, stored_filter_subjects(&f).iter().any(|s| nats_matches(s, &stored)));
            // A routing subscription never receives a stored message, nor the stream a routed one.
            prop_assert!(!filter_subjects(&f).iter().any(|s| nats_matches(s, &stored)));
            let stream = format!("{STORED}.>");
            prop_assert!(!nats_matches(&stream, &subject_of(&t)));
        }

        #[test]
        fn a_subject_decodes_only_to_the_topic_that_encodes_to_it(s in "(fleet\\.t\\.)?([A-Za-z0-9%./ _*>+-]|%2F|%2f|%25|%\\+2|%){0,24}") {
            if let Some(t) = topic_of(&s) {
                prop_assert_eq!(subject_of(&t), s);
            }
        }
    }

    #[test]
    fn shared_queues_are_one_token_and_hand_offs_round_trip() {
        let q = queue_of("ingest", "devices/+/telemetry");
        assert_eq!(q, "ingest%2Fdevices%2F%2B%2Ftelemetry");
        assert!(valid_subject(&q) && !q.contains('.'), "{q}");
        // A group holds no `/` (`router::split_shared`), so the first separator ends it.
        assert_ne!(queue_of("ab", "c"), queue_of("a", "bc"));
        let s = handoff_subject(&q, "devices/dev.1/telemetry");
        assert_eq!(s, "fleet.g.ingest%2Fdevices%2F%2B%2Ftelemetry.devices.dev%2E1.telemetry");
        assert!(nats_matches(&handoff_filter(&q), &s));
        assert_eq!(topic_of_handoff(&q, &s).as_deref(), Some("devices/dev.1/telemetry"));
        assert_eq!(topic_of_handoff(&queue_of("other", "#"), &s), None);
        assert_eq!(topic_of(&s), None, "a hand-off is never routed");
    }

    #[test]
    fn under_the_default_topic_limit_every_share_fits_nats_s_control_line() {
        // `max_topic_length` 256: `<group>/<filter>` and a topic of 256 bytes, every byte escaped.
        let (group, filter) = (".".repeat(100), format!("{}/#", ".".repeat(153)));
        assert_eq!(group.len() + 1 + filter.len(), 256);
        let queue = queue_of(&group, &filter);
        for s in filter_subjects(&filter).into_iter().chain([handoff_filter(&queue)]) {
            assert!(fits_control_line(&s, &queue), "{} + {}", s.len(), queue.len());
        }
        let topic = ".".repeat(256);
        assert!(fits_control_line(&handoff_subject(&queue, &topic), ""));
        // A group of 1,500 bytes (a raised limit) does not.
        assert!(!fits_control_line(&handoff_filter(&queue_of(&".".repeat(1500), "a")), &queue));
    }

    #[test]
    fn the_spec_examples() {
        assert_eq!(subject_of("devices/dev-1/telemetry"), "fleet.t.devices.dev-1.telemetry");
        assert_eq!(subject_of("devices/sensor.7/a b"), "fleet.t.devices.sensor%2E7.a%20b");
        assert_eq!(subject_of("devices//x"), "fleet.t.devices.%.x");
        assert_eq!(filter_subjects("devices/+/telemetry"), ["fleet.t.devices.*.telemetry"]);
        assert_eq!(filter_subjects("devices/dev-1/#"), ["fleet.t.devices.dev-1.>", "fleet.t.devices.dev-1"]);
        assert_eq!(filter_subjects("#"), ["fleet.t.>"]);
        assert_eq!(topic_of("fleet.t.devices.%2e7"), None, "lower-case hex is not ours");
        assert_eq!(topic_of("other.devices"), None);
        assert_eq!(session_subject("sensor.7"), "fleet.s.sensor%2E7");
        assert_eq!(topic_of("fleet.t.a%2Fb"), None, "a level never holds a separator");
        assert_eq!(topic_of("fleet.t.devices3.a%+20b"), None, "found by the fuzzer: `%+2` is no escape");
    }
}
