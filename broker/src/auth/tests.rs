use super::*;

// The ACL as a session applies it: the text is parsed at the edge first; what does not parse
// is denied.
fn may_publish(who: &Identity, topic: &str) -> bool {
    Topic::parse(topic).is_ok_and(|t| super::may_publish(who, t))
}

fn may_subscribe(who: &Identity, filter: &str) -> bool {
    TopicFilter::parse(filter).is_ok_and(|f| super::may_subscribe(who, f))
}

fn is_csr(who: &Identity, topic: &str) -> bool {
    Topic::parse(topic).is_ok_and(|t| super::is_csr(who, t))
}

/// Device `dev-1` on certificate `4a0b`.
fn device_1() -> Identity {
    Identity {
        id: DeviceId::parse("dev-1").unwrap(),
        role: Role::Device,
        serial: SerialNumber::parse("4a0b").unwrap(),
        not_after: 0,
        nonce: None,
    }
}

fn is_active_announcement(who: &Identity, topic: &str) -> bool {
    Topic::parse(topic).is_ok_and(|t| super::is_active_announcement(who, t))
}

#[test]
fn only_the_askers_own_csr_is_stamped_with_its_serial() {
    let dev = device_1();
    assert!(is_csr(&dev, "devices/dev-1/certs/csr"));
    assert!(!is_csr(&dev, "devices/dev-2/certs/csr"));
    assert!(!is_csr(&dev, "devices/dev-1/telemetry"));
    assert!(!is_csr(&dev, "devices/dev-1/x/certs/csr"));
    let claim = Identity { role: Role::Claim, nonce: Some("0123456789abcdef".into()), ..dev.clone() };
    assert!(is_csr(&claim, "claims/dev-1/0123456789abcdef/certs/csr"));
    assert!(!is_csr(&claim, "claims/dev-1/fedcba9876543210/certs/csr"));
    let stamped = stamp_csr(&dev, b"\x30\x82");
    assert!(stamped.starts_with(format!("fleetgate-origin {}\n", dev.serial.to_hex()).as_bytes()));
    assert!(stamped.ends_with(b"\x30\x82"));
}

fn who(id: &str, role: Role) -> Identity {
    Identity {
        id: DeviceId::parse(id).unwrap(),
        role,
        serial: SerialNumber::random(),
        not_after: 0,
        nonce: None,
    }
}

#[test]
fn device_acl() {
    let d = who("dev-1", Role::Device);
    assert!(may_publish(&d, "devices/dev-1/telemetry"));
    assert!(may_publish(&d, "devices/dev-1/a/b"));
    for bad in [
        "devices/dev-2/telemetry",
        "devices/dev-1",
        "devices/dev-1/",
        "devices/+/x",
        "other/dev-1/x",
        "devices/dev-1/#",
        "devices/dev-10/x",
        "devices/dev-1/commands/reboot",
        "devices/dev-1/commands",
    ] {
        assert!(!may_publish(&d, bad), "{bad}");
    }
    assert!(may_subscribe(&d, "devices/dev-1/commands/#"));
    assert!(may_subscribe(&d, "devices/dev-1/#"));
    for bad in [
        "devices/+/commands",
        "devices/#",
        "#",
        "devices/dev-2/commands/#",
        "devices/dev-1",
        "devices/dev-1/a#",
    ] {
        assert!(!may_subscribe(&d, bad), "{bad}");
    }
}

#[test]
fn service_acl() {
    let s = who("backend", Role::Service);
    assert!(may_subscribe(&s, "devices/+/telemetry"));
    assert!(may_subscribe(&s, "devices/#"));
    assert!(!may_subscribe(&s, "#"));
    assert!(!may_subscribe(&s, "$SYS/#"));
    assert!(may_subscribe(&s, "status/devices/+/commands/#"));
    assert!(!may_subscribe(&who("dev-1", Role::Device), "status/devices/dev-1/commands/#"));
    assert!(may_publish(&s, "devices/dev-1/commands/reboot"));
    assert!(!may_publish(&s, "devices/dev-1/telemetry"));
    assert!(!may_publish(&s, "devices/dev-1/commands"));
    assert!(!may_publish(&s, "devices/BAD/commands/x"));
}

#[test]
fn issuer_acl() {
    let i = who("issuer-1", Role::Issuer);
    assert!(may_subscribe(&i, "devices/+/certs/csr"));
    assert!(may_subscribe(&i, "devices/dev-1/certs/csr"));
    assert!(may_subscribe(&i, "devices/+/certs/active"));
    assert!(may_subscribe(&i, "claims/+/+/certs/csr"));
    assert!(may_publish(&i, "claims/batch-1/0123456789abcdef/certs/issued"));
    for bad in
        ["devices/+/telemetry", "devices/#", "devices/+/certs/#", "devices/+/certs/issued", "#", "claims/#"]
    {
        assert!(!may_subscribe(&i, bad), "{bad}");
    }
    assert!(may_publish(&i, "devices/dev-1/certs/issued"));
    assert!(may_publish(&i, "devices/dev-1/certs/rejected"));
    for bad in [
        "devices/dev-1/certs/csr",
        "devices/dev-1/certs",
        "devices/dev-1/commands/reboot",
        "devices/dev-1/telemetry",
        "devices/BAD/certs/issued",
        "devices/dev-1/certs/active",
        "claims/batch-1/0123456789abcdef/certs/csr",
    ] {
        assert!(!may_publish(&i, bad), "{bad}");
    }
    // A device asks on its own `certs/csr` and reads its own answers.
    let d = who("dev-1", Role::Device);
    assert!(may_publish(&d, "devices/dev-1/certs/csr"));
    assert!(may_subscribe(&d, "devices/dev-1/certs/#"));
    assert!(may_publish(&d, "devices/dev-1/certs/active"));
    assert!(!may_publish(&d, "devices/dev-2/certs/csr"));
    // ... but never answers itself.
    assert!(!may_publish(&d, "devices/dev-1/certs/issued"));
    assert!(!may_publish(&d, "devices/dev-1/certs/csr/x"));
    assert!(is_active_announcement(&d, "devices/dev-1/certs/active"));
    assert!(!is_active_announcement(&d, "devices/dev-1/certs/activex"));
    assert!(!is_active_announcement(&d, "devices/dev-10/certs/active"));
}

#[test]
fn claim_acl() {
    let mut c = who("batch-1", Role::Claim);
    assert_eq!(c.claim_nonce("claims/batch-1/0123456789abcdef"), Some("0123456789abcdef"));
    for bad in [
        "claims/batch-1/short",
        "claims/batch-2/0123456789abcdef",
        "batch-1",
        "claims/batch-1/0123456789ABCDEF",
        "claims/batch-1/0123456789abcdef/x",
    ] {
        assert_eq!(c.claim_nonce(bad), None, "{bad}");
    }
    c.nonce = Some("0123456789abcdef".into());
    assert_eq!(c.session_key(), "claims/batch-1/0123456789abcdef");
    assert!(may_publish(&c, "claims/batch-1/0123456789abcdef/certs/csr"));
    assert!(may_subscribe(&c, "claims/batch-1/0123456789abcdef/certs/+"));
    assert!(may_subscribe(&c, "claims/batch-1/0123456789abcdef/certs/issued"));
    for bad in [
        "claims/batch-1/fedcba9876543210/certs/csr",
        "claims/batch-1/0123456789abcdef/certs/issued",
        "devices/batch-1/telemetry",
        "claims/batch-2/0123456789abcdef/certs/csr",
    ] {
        assert!(!may_publish(&c, bad), "{bad}");
    }
    for bad in
        ["claims/batch-1/+/certs/+", "claims/#", "devices/#", "claims/batch-1/0123456789abcdef/certs/#"]
    {
        assert!(!may_subscribe(&c, bad), "{bad}");
    }
}

#[test]
fn a_response_topic_is_one_the_asker_reads() {
    let dev = device_1();
    let answered_on = |who: &Identity, t: &str| Topic::parse(t).is_ok_and(|t| may_be_answered_on(who, t));
    assert!(answered_on(&dev, "devices/dev-1/responses/7"));
    assert!(answered_on(&dev, "devices/dev-1/commands/reply"), "its own commands: it reads them");
    for other in [
        "devices/dev-2/commands/unlock",
        "devices/dev-2/responses/7",
        "status/devices/dev-2/commands/unlock",
        "devices/dev-1/responses/#",
        "devices/dev-1//x",
        "claims/dev-1/0123456789abcdef/certs/issued",
    ] {
        assert!(!answered_on(&dev, other), "{other}");
    }
    let service = Identity { id: DeviceId::parse("backend").unwrap(), role: Role::Service, ..dev.clone() };
    assert!(answered_on(&service, "status/devices/dev-2/commands/unlock"));
    // The broker answers a command itself: only on data and status topics, though a service
    // reads commands and certificate answers too.
    let broker_answers = |t: &str| Topic::parse(t).is_ok_and(|t| broker_may_answer_on(None, t));
    assert!(broker_answers("devices/dev-2/responses/7") && broker_answers("status/devices/dev-2/commands/x"));
    for never in ["devices/dev-2/commands/unlock", "devices/dev-2/certs/issued", "devices/dev-2/certs/rotate"]
    {
        assert!(answered_on(&service, never) && !broker_answers(never), "{never}");
    }
    // A command to dev-2: its answers only in dev-2's subtree, never in another device's.
    let for_dev2 = |t: &str| Topic::parse(t).is_ok_and(|t| broker_may_answer_on(Some("dev-2"), t));
    assert!(for_dev2("devices/dev-2/responses/7") && for_dev2("status/devices/dev-2/commands/x"));
    assert!(!for_dev2("devices/dev-3/responses/7") && !for_dev2("status/devices/dev-3/commands/x"));
    let claim = Identity { role: Role::Claim, nonce: Some("0123456789abcdef".into()), ..dev };
    assert!(answered_on(&claim, "claims/dev-1/0123456789abcdef/certs/issued"));
    assert!(!answered_on(&claim, "claims/dev-1/fedcba9876543210/certs/issued"));
}

#[test]
fn only_the_broker_answers_chunks_and_only_the_runner_offers() {
    let d = device_1();
    assert!(may_publish(&d, "devices/dev-1/ota/get"));
    assert!(may_publish(&d, "devices/dev-1/ota/status"));
    assert!(!may_publish(&d, "devices/dev-1/ota/chunk"));
    assert!(!may_publish(&d, "devices/dev-1/ota/chunk/x"));
    assert!(!may_publish(&d, "devices/dev-1/ota/other"));
    assert!(!may_publish(&d, "devices/dev-2/ota/get"));
    assert!(!may_publish(&d, "devices/dev-1/commands/ota/offer"));
    let s = who("backend", Role::Service);
    assert!(!may_publish(&s, "devices/dev-1/commands/ota/offer"));
    assert!(!may_publish(&s, "devices/dev-1/commands/ota/offer/ttl=60"));
    assert!(!may_publish(&s, "devices/dev-1/ota/chunk"));
    assert!(may_publish(&s, "devices/dev-1/commands/otax"));
    assert!(may_publish(&s, "devices/dev-1/commands/blink/ota"));
    // A service's v5 command naming the offer's status topic as its Response Topic: the broker
    // would publish that command's statuses there, read by services as the offer's.
    let answers = |d: Option<&str>, t: &str| Topic::parse(t).is_ok_and(|t| broker_may_answer_on(d, t));
    for t in ["status/devices/dev-1/commands/ota/offer", "status/devices/dev-1/commands/ota/offer/ttl=60"] {
        assert!(may_be_answered_on(&s, Topic::parse(t).unwrap()), "{t}");
        assert!(!answers(Some("dev-1"), t) && !answers(None, t), "{t}");
    }
    assert!(answers(Some("dev-1"), "status/devices/dev-1/commands/otax"));
}
