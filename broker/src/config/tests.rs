use super::*;

#[test]
fn a_nats_url_needs_tls_and_an_identity_unless_declared_insecure() {
    let pg = |nats: &str| {
        let mut c = Config::default();
        c.set("database_url", "postgres://u@h/db").unwrap();
        c.set("nats", nats).unwrap();
        c
    };
    let err = |c: &Config| c.validate().unwrap_err().to_string();
    assert!(err(&pg("nats://127.0.0.1:4222")).contains("neither TLS nor a client identity"));
    // Credentials in the URL are used, but not over plain TCP.
    assert!(err(&pg("nats://node:secret@127.0.0.1:4222")).contains("no TLS"));
    assert!(!err(&pg("nats://node:secret@127.0.0.1:4222")).contains("secret"));
    pg("tls://node:secret@127.0.0.1:4222").validate().unwrap();
    let mut c = pg("nats://127.0.0.1:4222");
    c.set("nats_ca", "/ca.pem").unwrap();
    assert!(err(&c).contains("no client identity"));
    c.set("nats_cert", "/cert.pem").unwrap();
    assert!(err(&c).contains("go together"));
    c.set("nats_key", "/key.pem").unwrap();
    assert_eq!(c.nats_security("nats://127.0.0.1:4222").unwrap(), NatsSecurity { tls: true, identity: true });
    let mut open = pg("nats://127.0.0.1:4222");
    open.set("insecure_nats_no_auth", "true").unwrap();
    open.validate().unwrap();
    assert!(err(&pg("http://127.0.0.1:4222")).contains("nats:// or tls://"));
}

#[test]
fn passwords_never_reach_the_printed_configuration() {
    assert_eq!(redact_url("tls://node:s3cret@nats.internal:4222"), "tls://node:***@nats.internal:4222");
    assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    assert_eq!(redact_url("postgres://fleet:pw@db/fleet"), "postgres://fleet:***@db/fleet");
    assert!(!redact_url("not a url:pw@host").contains("pw"));
    let mut c = Config::default();
    c.set("nats", "tls://node:s3cret@nats.internal:4222").unwrap();
    c.set("database_url", "postgres://db/fleet?user=fleet&password=pw2").unwrap();
    c.set("admin_database_url", "postgres://admin:pw3@db/fleet").unwrap();
    let printed = c.redacted().to_toml();
    for secret in ["s3cret", "pw2", "pw3"] {
        assert!(!printed.contains(secret), "{printed}");
    }
}

#[test]
fn every_key_is_settable_by_name_and_round_trips_through_the_file_format() {
    let mut c = Config::default();
    for k in Config::KEYS {
        assert!(!k.help.trim().is_empty(), "{} has no doc", k.name);
        assert!(matches!(c.set(k.name, "not a value at all"), Err(ConfigError::Value { .. }) | Ok(())));
    }
    c = Config::default();
    c.set("max_packet_size", "8192").unwrap();
    c.set("metrics_listen", "off").unwrap();
    c.set("crl_policy", "fail-open").unwrap();
    c.set("database_url", "postgres://u@h/db").unwrap();
    c.set("handshake_timeout_secs", "2.5").unwrap();
    assert_eq!(
        (c.max_packet_size, c.metrics_listen, c.crl_policy),
        (8192, Endpoint(None), CrlPolicy::FailOpen)
    );
    assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    let resolved = Config::default().resolved();
    assert_eq!(Config::from_toml(&resolved.to_toml()).unwrap(), resolved);
    assert!(matches!(c.set("no_such_key", "1"), Err(ConfigError::UnknownKey(_))));
    assert!(matches!(c.set("max_packet_size", "big"), Err(ConfigError::Value { .. })));
}

#[test]
fn flags_are_the_keys_and_keep_their_old_spellings_as_aliases() {
    let key = |n: &str| *Config::KEYS.iter().find(|k| k.name == n).unwrap();
    assert_eq!(key("handshake_timeout_secs").flag(), "handshake-timeout-secs");
    assert_eq!(key("handshake_timeout_secs").alias, Some("handshake-timeout"));
    assert_eq!(key("max_packet_size").flag(), "max-packet-size");
    assert_eq!(Config::KEYS[0].env(), "FLEET_LISTEN");
    for k in Config::KEYS {
        assert!(Config::default_text(k.name).is_some(), "{} has no default text", k.name);
    }
    assert_eq!(Config::default_text("handshake_timeout_secs").as_deref(), Some("10.0"));
    assert_eq!(Config::default_text("nats").as_deref(), Some("off"));
}

#[test]
fn the_commented_file_parses_back_to_the_same_configuration() {
    let mut c = Config::default().resolved();
    c.set("nats_readers", "analytics=devices/+/telemetry").unwrap();
    let text = c.to_commented_toml();
    assert_eq!(Config::from_toml(&text).unwrap(), c, "{text}");
    assert!(text.contains("# TLS handshake deadline, seconds.\nhandshake_timeout_secs = 10.0\n"), "{text}");
    assert!(text.contains("# nats: not set\n"), "{text}");
    assert!(!text.contains("Some(") && !text.contains("None"), "{text}");
}

#[test]
fn a_duration_checks_itself_where_it_is_parsed() {
    let mut c = Config::default();
    for bad in ["0", "-1", "3601", "NaN", "inf", "soon"] {
        assert!(c.set("write_timeout_secs", bad).is_err(), "{bad}");
    }
    c.set("write_timeout_secs", "2.5").unwrap();
    assert_eq!(c.write_timeout(), std::time::Duration::from_millis(2500));
    assert!(Config::from_toml("write_timeout_secs = 0\n").is_err());
    assert_eq!(Config::from_toml("write_timeout_secs = 60\n").unwrap().write_timeout_secs.get(), 60.0);
    // The defaults (written unchecked with `Secs::of`) are within range too.
    assert_eq!(Config::from_toml(&Config::default().to_toml()).unwrap(), Config::default());
}

#[test]
fn moved_to_is_a_host_and_port_the_sdk_can_keep() {
    let with = |to: &str| {
        let mut c = Config::default();
        c.set("moved_to", to).unwrap();
        c.validate()
    };
    for fine in ["fleet-2.example.com:8883", "127.0.0.1:1", "[::1]:8883"] {
        with(fine).unwrap_or_else(|e| panic!("{fine}: {e}"));
    }
    let long = format!("{}:8883", "a".repeat(96));
    for bad in ["fleet-2.example.com", ":8883", "host:0", "host:99999", "host name:8883", long.as_str()] {
        let e = with(bad).unwrap_err().to_string();
        assert!(e.contains("moved_to:"), "{bad}: {e}");
    }
}

#[test]
fn a_cluster_member_keeps_topics_short_enough_for_nats_subjects() {
    let mut c = Config::default();
    c.set("database_url", "postgres://u@h/db").unwrap();
    c.set("nats", "tls://node:secret@127.0.0.1:4222").unwrap();
    c.set("max_topic_length", "640").unwrap();
    c.validate().unwrap();
    c.set("max_topic_length", "641").unwrap();
    assert!(c.validate().unwrap_err().to_string().contains("at most 640 on a cluster member"));
    // A single node has no such limit.
    let mut single = Config::default();
    single.set("max_topic_length", "4000").unwrap();
    single.validate().unwrap();
}

#[test]
fn the_store_is_the_log_unless_told_and_nothing_else_is_accepted() {
    let mut c = Config::default();
    assert!(c.store_in_log());
    c.set("store", "registry").unwrap();
    c.validate().unwrap();
    assert!(!c.store_in_log());
    c.set("store", "memory").unwrap();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("store") && e.contains("registry"), "{e}");
}

#[test]
fn store_fsync_is_every_commit_unless_told_and_nothing_else_is_accepted() {
    let mut c = Config::default();
    assert_eq!(c.store_fsync(), fleet_registry::WriterSync::EveryCommit);
    c.set("store_fsync", "checkpoint").unwrap();
    c.validate().unwrap();
    assert_eq!(c.store_fsync(), fleet_registry::WriterSync::Checkpoint);
    c.set("store_fsync", "sometimes").unwrap();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("store_fsync") && e.contains("every-commit"), "{e}");
}
