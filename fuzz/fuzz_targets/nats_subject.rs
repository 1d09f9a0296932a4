//! The cluster's MQTT topic ↔ NATS subject mapping (docs/spec/nats-subjects.md): any bytes
//! decode to a topic that encodes back to the same subject, or to nothing; any topic encodes
//! to a subject that decodes back to it. Never a panic.
#![no_main]
use fleet_broker::fuzzing::{filter_subjects, subject_of, topic_of};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(topic) = topic_of(text) {
        assert_eq!(subject_of(&topic), text, "decoded {text:?} to {topic:?}");
    }
    if !text.contains(['+', '#']) {
        let subject = subject_of(text);
        assert_eq!(topic_of(&subject).as_deref(), Some(text), "{subject}");
    }
    for s in filter_subjects(text) {
        assert!(!s.split('.').any(str::is_empty), "empty token in {s:?}");
    }
});
