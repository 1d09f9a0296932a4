//! `fleet-provision list` is one registry query, on SQLite and on PostgreSQL, and says what the
//! old per-device queries said; "expiring" means the same in every place that asks
//! (`fleet_registry::expiry`): the listing, `rotate --expiring-within`, the console's page filter
//! and its count.
//!
//! Queries are counted from sqlx's own statement log (tracing target `sqlx::query`, one event
//! per statement executed), so a listing that went back to one query per device fails here.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::{Arc, Mutex, OnceLock};

use fleet_provision::home::Home;
use fleet_provision::station::{MintOptions, Station};
use fleet_provision::{DeviceId, RevocationReason, Status};
use fleet_registry::{expiry, DeviceQuery, ExpiryWindow, ListedIdentity};
use tracing_subscriber::layer::SubscriberExt as _;

/// Every SQL statement sqlx executed in this process, as logged.
#[derive(Debug, Default, Clone)]
struct Statements(Arc<Mutex<Vec<String>>>);

impl Statements {
    /// The process-wide log (sqlx runs SQLite statements on its own worker threads, so the
    /// subscriber has to be global).
    fn global() -> Statements {
        static LOG: OnceLock<Statements> = OnceLock::new();
        LOG.get_or_init(|| {
            let log = Statements::default();
            let subscriber = tracing_subscriber::registry().with(log.clone());
            tracing::subscriber::set_global_default(subscriber).unwrap();
            log
        })
        .clone()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// The statements logged since `mark` (a [`Statements::len`]), without the connection
    /// set-up a new SQLite connection runs (`PRAGMA ...`).
    fn since(&self, mark: usize) -> Vec<String> {
        self.0.lock().unwrap()[mark..]
            .iter()
            .filter(|s| !s.trim_start().starts_with("PRAGMA"))
            .cloned()
            .collect()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Statements {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "sqlx::query" {
            return;
        }
        struct Sql(Option<String>);
        impl tracing::field::Visit for Sql {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "db.statement" {
                    self.0 = Some(value.to_owned());
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "db.statement" && self.0.is_none() {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        let mut sql = Sql(None);
        event.record(&mut sql);
        self.0.lock().unwrap().push(sql.0.unwrap_or_else(|| "(statement not logged)".into()));
    }
}

/// What `list` printed before it was one query: `devices()`, then `certificates_of()` for each
/// (the newest first), kept when [`fleet_registry::expiry`] of those certificates is in `window`.
async fn per_device(
    s: &Station,
    status: Option<Status>,
    window: Option<ExpiryWindow>,
) -> Vec<ListedIdentity> {
    let mut out = Vec::new();
    for device in s.registry().devices(status).await.unwrap() {
        let certs = s.registry().certificates_of(&device.device_id).await.unwrap();
        let expiry = expiry(&certs);
        if window.is_some_and(|w| !w.contains(expiry)) {
            continue;
        }
        let newest = certs.first().map(|c| (c.serial.clone(), c.not_after));
        out.push(ListedIdentity { device, newest, expiry });
    }
    out
}

/// A fleet of 50 long-lived devices (one revoked; one renewed with a 10-day certificate that was
/// then revoked), 10 short-lived ones (one renewed: two active certificates) and a service.
/// Returns the renewed long-lived and short-lived devices.
async fn fleet(db: Option<&str>) -> (tempfile::TempDir, Station, DeviceId, DeviceId) {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::new(dir.path().join("home"));
    let mut s = Station::init(home, "Acme", db).await.unwrap();
    let mint = |prefix: &str, count| MintOptions {
        count,
        prefix: prefix.into(),
        out: dir.path().join(prefix),
        broker_host: "localhost".into(),
        broker_port: 8883,
        chunk: 256,
    };
    let long = s.mint(&mint("dev", 50), &|_| ()).await.unwrap();
    s.service_cert("svc", &dir.path().join("svc")).await.unwrap();
    s.set_client_lifetime(10).unwrap();
    let short = s.mint(&mint("short", 10), &|_| ()).await.unwrap();
    s.revoke_device(&long[0].device_id, RevocationReason::KeyCompromise).await.unwrap();
    let renewed = s.renew(&long[1].device_id).await.unwrap();
    s.revoke_serial(&renewed.serial, RevocationReason::Unspecified).await.unwrap();
    s.renew(&short[0].device_id).await.unwrap();
    (dir, s, long[1].device_id.clone(), short[0].device_id.clone())
}

async fn one_query_and_same_answers(db: Option<&str>) {
    let log = Statements::global();
    let (_dir, s, long_renewed, short_renewed) = fleet(db).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let statuses = [None, Some(Status::Active), Some(Status::Revoked)];
    let windows = [None, Some(30 * 86_400), Some(0), Some(-400 * 86_400)];
    for status in statuses {
        for within in windows {
            let mark = log.len();
            let listed = s.list(status, within).await.unwrap();
            let sql = log.since(mark);
            assert_eq!(sql.len(), 1, "list({status:?}, {within:?}) ran {} statements: {sql:#?}", sql.len());
            let window = within.map(|w| ExpiryWindow::within(now, w));
            let expected = per_device(&s, status, window).await;
            assert_eq!(listed, expected, "list({status:?}, {within:?})");
        }
    }
    let all = s.list(None, None).await.unwrap();
    assert_eq!(all.len(), 50 + 10 + 1, "60 devices and a service");
    // The counter sees what the old way cost: one query, then one per identity.
    let mark = log.len();
    per_device(&s, None, None).await;
    assert_eq!(log.since(mark).len(), 1 + all.len());
    let of = |id: &DeviceId| all.iter().find(|l| &l.device.device_id == id).unwrap();

    // The renewed device whose 10-day certificate was revoked runs on its first one: its expiry
    // is years away.
    let l = of(&long_renewed);
    assert!(l.expiry.unwrap() > now + 365 * 86_400, "{l:?}");

    // Expiring within 30 days: exactly the ten short-lived devices, wherever it is asked.
    let window = ExpiryWindow::within(now, 30 * 86_400);
    let expiring: Vec<DeviceId> =
        all.iter().filter(|l| window.contains(l.expiry)).map(|l| l.device.device_id.clone()).collect();
    assert_eq!(expiring.len(), 10, "{expiring:?}");
    assert!(expiring.iter().all(|id| id.as_str().starts_with("short-")), "{expiring:?}");
    let listed: Vec<_> =
        s.list(None, Some(30 * 86_400)).await.unwrap().into_iter().map(|l| l.device.device_id).collect();
    assert_eq!(listed, expiring, "list --expiring-within 30d");
    let mut to_rotate = s.devices_to_rotate(Some(30 * 86_400)).await.unwrap();
    to_rotate.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(to_rotate, expiring, "rotate --expiring-within 30d");
    let page = s
        .registry()
        .device_page(&DeviceQuery {
            expiring_before: Some(window.end()),
            limit: 1000,
            ..DeviceQuery::default()
        })
        .await
        .unwrap();
    let paged: Vec<_> = page.into_iter().map(|r| r.device.device_id).collect();
    assert_eq!(paged, expiring, "the console's expiring filter");
    let (count, first) = s.registry().expiring(window.end(), 1000).await.unwrap();
    assert_eq!(count, 10, "the console's expiring count: identities, not certificates");
    let mut counted: Vec<_> = first.iter().map(|e| e.device_id.clone()).collect();
    counted.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(counted, expiring, "the console's expiring list");
    // The device with two active certificates appears once, with its later one.
    let e = first.iter().find(|e| e.device_id == short_renewed).unwrap();
    assert_eq!(Some(e.not_after), of(&short_renewed).expiry);
}

#[test]
fn list_is_one_query_with_the_answers_of_per_device_queries() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(one_query_and_same_answers(None));
    let pg = fleet_tests::PgCluster::start();
    let url = pg.create_database("list");
    rt.block_on(one_query_and_same_answers(Some(&url)));
}
