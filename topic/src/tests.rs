extern crate std;

use std::string::{String, ToString};

use super::*;

#[test]
fn topics_parse_once_and_refuse_what_is_not_a_topic() {
    assert_eq!(Topic::parse("devices/dev-1/telemetry").map(Topic::as_str), Ok("devices/dev-1/telemetry"));
    assert_eq!(Topic::parse(""), Err(TopicError::Empty));
    assert_eq!(Topic::parse("devices/+/t"), Err(TopicError::Wildcard));
    assert_eq!(Topic::parse("devices/#"), Err(TopicError::Wildcard));
    assert_eq!(Topic::parse("a\0b"), Err(TopicError::Nul));
    let long = "a".repeat(MAX_LEN + 1);
    assert_eq!(Topic::parse(&long), Err(TopicError::TooLong));
    assert!(Topic::parse(&long[1..]).is_ok());
    assert!(Topic::parse("a//b").is_ok_and(|t| t.has_empty_level()));
    assert!(!Topic::parse("a/b").is_ok_and(|t| t.has_empty_level()));
}

#[test]
fn filters_take_wildcards_only_as_whole_levels() {
    for ok in ["#", "+", "devices/+/telemetry", "devices/dev-1/#", "+/+/#", "a//b"] {
        assert!(TopicFilter::parse(ok).is_ok(), "{ok}");
    }
    for bad in ["devices/dev+/t", "devices/#/t", "a#", "+a", "#/", ""] {
        assert!(TopicFilter::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn matching_follows_mqtt() {
    let m = |f: &str, t: &str| TopicFilter::parse(f).unwrap().matches(Topic::parse(t).unwrap());
    assert!(m("devices/+/telemetry", "devices/dev-1/telemetry"));
    assert!(!m("devices/+/telemetry", "devices/dev-1/telemetry/x"));
    assert!(m("devices/#", "devices"));
    assert!(m("devices/#", "devices/a/b/c"));
    assert!(m("#", "anything/at/all"));
    assert!(!m("devices/+", "devices"));
    assert!(!m("devices/a", "devices/b"));
    assert!(!m("devices/a", "devices/a/b"));
    assert!(m("devices/a/#", "devices/a/x"));
    assert!(m("a//b", "a//b") && m("a/+/b", "a//b"));
}

#[test]
fn the_scheme_reads_each_kind_of_topic() {
    fn a(t: &str) -> Addressed<'_> {
        Topic::parse(t).unwrap().addressed()
    }
    assert_eq!(a("devices/dev-1/telemetry"), Addressed::DeviceData { device: "dev-1", rest: "telemetry" });
    assert_eq!(a("devices/dev-1/a/b"), Addressed::DeviceData { device: "dev-1", rest: "a/b" });
    assert_eq!(
        a("devices/dev-1/commands/fw/update"),
        Addressed::Command { device: "dev-1", name: "fw/update" }
    );
    assert_eq!(a("devices/dev-1/certs/csr"), Addressed::DeviceCerts { device: "dev-1", kind: "csr" });
    assert_eq!(
        a("claims/batch/00ff/certs/issued"),
        Addressed::ClaimCerts { claim: "batch", nonce: "00ff", kind: "issued" }
    );
    assert_eq!(
        a("status/devices/dev-1/commands/reboot"),
        Addressed::Status { device: "dev-1", name: "reboot" }
    );
    for other in
        ["devices", "devices/dev-1", "claims/b/n", "claims/b/n/x/csr", "status/x/d/commands/n", "x/y"]
    {
        assert_eq!(a(other), Addressed::Other, "{other}");
    }
    // A level named like the scheme's is still data when it is not where the scheme puts it.
    assert_eq!(
        a("devices/dev-1/commandsx/a"),
        Addressed::DeviceData { device: "dev-1", rest: "commandsx/a" }
    );
    assert_eq!(a("devices/dev-1/commands"), Addressed::DeviceData { device: "dev-1", rest: "commands" });
}

#[test]
fn topics_are_written_from_their_levels() {
    assert_eq!(device("dev-1", "telemetry").to_string(), "devices/dev-1/telemetry");
    assert_eq!(command("dev-1", "reboot").to_string(), "devices/dev-1/commands/reboot");
    assert_eq!(status("dev-1", "reboot").to_string(), "status/devices/dev-1/commands/reboot");
    assert_eq!(device_certs("dev-1", level::ROTATE).to_string(), "devices/dev-1/certs/rotate");
    assert_eq!(claim_session("batch", "00ff").to_string(), "claims/batch/00ff");
    assert_eq!(command("dev-1", "reboot").len(), "devices/dev-1/commands/reboot".len());
    // Into a fixed buffer, as a device does.
    let mut buf = String::new();
    Root::Device("dev-1").with(&[level::CERTS, level::CSR]).write_to(&mut buf).unwrap();
    assert_eq!(buf, "devices/dev-1/certs/csr");
    assert_eq!(
        Root::Claim("claims/b/n").with(&[level::CERTS, level::ISSUED]).to_string(),
        "claims/b/n/certs/issued"
    );
    assert_eq!(Root::Device("d").with(&[level::COMMANDS, "#"]).to_string(), "devices/d/commands/#");
    assert_eq!(Root::Device("d").to_string(), "devices/d");
    assert_eq!(Root::Claim("claims/b/n").to_string(), "claims/b/n");
}

#[test]
fn the_named_filters_are_their_levels() {
    assert_eq!(filter::ALL_TELEMETRY, device("+", level::TELEMETRY).to_string());
    assert_eq!(filter::DEVICE_CSRS, device_certs("+", level::CSR).to_string());
    assert_eq!(filter::DEVICE_ACTIVE, device_certs("+", level::ACTIVE).to_string());
    assert_eq!(filter::CLAIM_CSRS, Root::Claim("claims/+/+").with(&[level::CERTS, level::CSR]).to_string());
    assert_eq!(suffix::CERTS_CSR, Levels([level::CERTS, level::CSR]).to_string());
    assert_eq!(suffix::CERTS_ACTIVE, Levels([level::CERTS, level::ACTIVE]).to_string());
    assert_eq!(suffix::TELEMETRY, level::TELEMETRY);
    assert_eq!(suffix::ack("blink").to_string(), "acks/blink");
    for f in filter::ISSUER {
        assert!(TopicFilter::parse(f).is_ok());
    }
}

#[test]
fn a_root_reads_only_its_own_topics() {
    let d = Root::Device("dev-1");
    assert_eq!(d.strip("devices/dev-1/telemetry"), Some("telemetry"));
    assert_eq!(d.strip("devices/dev-10/telemetry"), None);
    assert_eq!(d.strip("devices/dev-1"), None);
    assert_eq!(d.command_name("devices/dev-1/commands/a/b"), Some("a/b"));
    assert_eq!(d.command_name("devices/dev-1/commands/"), Some(""));
    assert_eq!(d.command_name("devices/dev-1/commandsx"), None);
    assert_eq!(d.command_name("devices/dev-2/commands/a"), None);
    assert_eq!(d.certs_kind("devices/dev-1/certs/issued"), Some("issued"));
    assert_eq!(d.certs_kind("devices/dev-1/certs/issued/x"), None);
    let c = Root::Claim("claims/b/n");
    assert_eq!(c.certs_kind("claims/b/n/certs/rejected"), Some("rejected"));
    assert_eq!(c.certs_kind("claims/b/nn/certs/rejected"), None);
    assert_eq!(c.command_name("claims/b/n/commands/x"), Some("x"));
    assert_eq!(parse_claim_session("claims/b/n"), Some(("b", "n")));
    for bad in ["claims/b", "claims/b/n/x", "claims//n", "claim/b/n", "claims/b/"] {
        assert_eq!(parse_claim_session(bad), None, "{bad}");
    }
}

#[test]
fn device_level_reads_the_id_or_wildcard() {
    assert_eq!(DEVICES_, Levels([level::DEVICES, ""]).to_string());
    assert_eq!(_COMMANDS_, Levels(["", level::COMMANDS, ""]).to_string());
    assert_eq!(_CERTS_, Levels(["", level::CERTS, ""]).to_string());
    assert_eq!(device_level("devices/dev-1/t"), Some("dev-1"));
    assert_eq!(device_level("devices/+/t"), Some("+"));
    assert_eq!(device_level("status/devices/x"), None);
    assert_eq!(device_level("devices"), None);
}
