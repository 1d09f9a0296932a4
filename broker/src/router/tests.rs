use super::*;

fn publish(topic: &str) -> Message {
    Message::new(topic, QoS::AtMostOnce, b"x".to_vec())
}

#[test]
fn a_closed_connection_gets_nothing_and_leaves_nothing_behind() {
    let router = Router::default();
    let metrics = Metrics::new();
    let route = |p: &Message| router.route(p, RetainBudget::Clients, &metrics).expect("not retained");
    let (rx1, rx2) = (Arc::new(Inbox::new(8)), Arc::new(Inbox::new(8)));
    router.subscribe(1, "devices/a/commands/#", QoS::AtMostOnce, SubOpts::default(), rx1.clone());
    router.subscribe(1, "devices/+/telemetry", QoS::AtMostOnce, SubOpts::default(), rx1.clone());
    router.subscribe(2, "devices/a/commands/#", QoS::AtMostOnce, SubOpts::default(), rx2.clone());
    route(&publish("devices/a/commands/reboot"));
    route(&publish("devices/b/telemetry"));
    assert_eq!(rx1.try_next().map(|p| p.topic).as_deref(), Some("devices/a/commands/reboot"));
    assert_eq!(rx1.try_next().map(|p| p.topic).as_deref(), Some("devices/b/telemetry"));
    assert!(rx2.try_next().is_some());

    router.remove_connection(1);
    route(&publish("devices/a/commands/reboot"));
    route(&publish("devices/b/telemetry"));
    assert!(rx1.try_next().is_none(), "a removed connection still receives");
    assert!(rx2.try_next().is_some());
    router.remove_connection(2);
    let inner = lock(&router.inner);
    assert!(inner.subs.is_empty() && inner.by_conn.is_empty(), "{inner:?}");
}

fn retained(topic: &str, payload: &[u8]) -> Message {
    let mut p = Message::new(topic, QoS::AtMostOnce, payload.to_vec());
    p.retain = true;
    p
}

#[test]
fn retained_messages_are_capped_per_device_and_in_bytes_and_cleared() {
    let router = Router::new(RetainLimits { per_device: 2, total_bytes: 100, issuer_bytes: 100 });
    let m = Metrics::new();
    assert_eq!(router.route(&retained("devices/a/s1", b"x"), RetainBudget::Clients, &m), Ok(()));
    assert_eq!(router.route(&retained("devices/a/s2", b"x"), RetainBudget::Clients, &m), Ok(()));
    assert_eq!(
        router.route(&retained("devices/a/s3", b"x"), RetainBudget::Clients, &m),
        Err(RetainRefused::PerDevice)
    );
    // Replacing an existing topic is no new entry.
    assert_eq!(router.route(&retained("devices/a/s1", b"y"), RetainBudget::Clients, &m), Ok(()));
    assert_eq!(
        router.route(&retained("devices/b/big", &[0u8; 90]), RetainBudget::Clients, &m),
        Err(RetainRefused::TotalBytes)
    );
    assert_eq!(router.route(&retained("devices/b/ok", &[0u8; 50]), RetainBudget::Clients, &m), Ok(()));
    // Only the device's own retained messages are looked at for its literal filter.
    let inbox = Arc::new(Inbox::new(8));
    assert_eq!(
        router.subscribe(1, "devices/a/#", QoS::AtMostOnce, SubOpts::default(), inbox.clone()).len(),
        2
    );
    assert_eq!(router.subscribe(2, "devices/+/#", QoS::AtMostOnce, SubOpts::default(), inbox).len(), 3);
    assert_eq!(router.clear_retained("a"), 2);
    assert_eq!(lock(&router.inner).retained_bytes, ["devices/b/ok".len() + 50, 0]);
    // An empty retained payload deletes.
    assert_eq!(router.route(&retained("devices/b/ok", b""), RetainBudget::Clients, &m), Ok(()));
    let inner = lock(&router.inner);
    assert!(inner.retained.is_empty() && inner.retained_bytes == [0, 0], "{inner:?}");
}

#[test]
fn devices_filling_their_retained_budget_leave_the_issuers_alone() {
    let router = Router::new(RetainLimits { per_device: 2, total_bytes: 100, issuer_bytes: 100 });
    let m = Metrics::new();
    let clients = |p: &Message| router.route(p, RetainBudget::Clients, &m);
    assert_eq!(clients(&retained("devices/a/s1", &[0u8; 70])), Ok(()));
    assert_eq!(clients(&retained("devices/a/s2", b"x")), Ok(()));
    assert_eq!(clients(&retained("devices/b/s1", &[0u8; 50])), Err(RetainRefused::TotalBytes));
    // Full on both counts for device a, and in bytes: the issuer's rotate still goes in.
    let rotate = retained("devices/a/certs/rotate", b"rotate");
    assert_eq!(router.route(&rotate, RetainBudget::Issuer, &m), Ok(()));
    let inbox = Arc::new(Inbox::new(8));
    let got = router.subscribe(1, "devices/a/certs/+", QoS::AtMostOnce, SubOpts::default(), inbox);
    assert_eq!(got.iter().map(|p| p.topic.as_str()).collect::<Vec<_>>(), ["devices/a/certs/rotate"]);
    // Withdrawn with an empty payload; its bytes go back to the issuer's budget.
    assert_eq!(router.route(&retained("devices/a/certs/rotate", b""), RetainBudget::Issuer, &m), Ok(()));
    assert_eq!(lock(&router.inner).retained_bytes[1], 0);
    assert_eq!(router.clear_retained("a"), 2);
    assert_eq!(lock(&router.inner).retained_bytes, [0, 0]);
}

#[test]
fn a_shared_group_takes_turns_passes_over_a_full_queue_and_gets_no_retained_messages() {
    let router = Router::default();
    let (a, b) = (Arc::new(Inbox::new(100)), Arc::new(Inbox::new(1)));
    let metrics = Metrics::new();
    let mut keep = publish("devices/a/telemetry");
    keep.retain = true;
    router.route(&keep, RetainBudget::Clients, &metrics).unwrap();
    let f = "$share/g/devices/+/telemetry";
    assert!(router.subscribe(1, f, QoS::AtMostOnce, SubOpts::default(), a.clone()).is_empty());
    assert!(router.subscribe(2, f, QoS::AtMostOnce, SubOpts::default(), b.clone()).is_empty());
    for _ in 0..4 {
        router.route(&publish("devices/a/telemetry"), RetainBudget::Clients, &metrics).unwrap();
    }
    let count = |i: &Inbox| std::iter::from_fn(|| i.try_next()).count();
    // b holds one: the turns that fell to it while full went to a.
    assert_eq!((count(&a), count(&b)), (3, 1));
    router.unsubscribe(1, f);
    router.route(&publish("devices/a/telemetry"), RetainBudget::Clients, &metrics).unwrap();
    assert_eq!((count(&a), count(&b)), (0, 1), "only the member left");
    assert_eq!(router.remove_connection(2), vec![f.to_owned()]);
}
