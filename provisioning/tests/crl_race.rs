//! Concurrent revocations never produce a higher-numbered CRL that misses a revocation: the
//! station reads the revoked entries and assigns the CRL number in one transaction. Each
//! revocation runs on its own `Station` (its own connection pool, as separate `revoke`
//! processes would), on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used)] // test code

use std::collections::BTreeSet;

use fleet_provision::home::Home;
use fleet_provision::station::{MintOptions, Station};
use fleet_provision::{DeviceId, RevocationReason};

const DEVICES: usize = 24;

fn revoked_serials(der: &[u8]) -> BTreeSet<Vec<u8>> {
    let (_, crl) = x509_parser::parse_x509_crl(der).unwrap();
    crl.iter_revoked_certificates().map(|r| r.raw_serial().to_vec()).collect()
}

async fn concurrent_revocations_keep_crls_monotonic(db: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let st = Station::init(Home::new(&home), "Race", db.as_deref()).await.unwrap();
    let opts = MintOptions {
        count: DEVICES,
        prefix: "race".into(),
        out: dir.path().join("devices"),
        broker_host: "localhost".into(),
        broker_port: 8883,
        chunk: 64,
    };
    let ids: Vec<DeviceId> =
        st.mint(&opts, &|_| {}).await.unwrap().into_iter().map(|d| d.device_id).collect();
    let mut tasks = Vec::new();
    for id in ids {
        let (home, db) = (home.clone(), db.clone());
        tasks.push(tokio::spawn(async move {
            let st = Station::open(Home::new(home), db.as_deref()).await.unwrap();
            let (serials, crl) = st.revoke_device(&id, RevocationReason::KeyCompromise).await.unwrap();
            (serials, crl.number, revoked_serials(&crl.der))
        }));
    }
    let mut crls = Vec::new();
    for t in tasks {
        crls.push(t.await.unwrap());
    }
    crls.sort_by_key(|c| c.1);
    let numbers: BTreeSet<u64> = crls.iter().map(|c| c.1).collect();
    assert_eq!(numbers.len(), crls.len(), "CRL numbers must be unique");
    for (serials, number, listed) in &crls {
        for s in serials {
            assert!(listed.contains(s.as_bytes()), "CRL #{number} misses its own revocation");
        }
    }
    // The file left in the home is the newest CRL, whichever run wrote last.
    let pem = std::fs::read_to_string(home.join("crl.pem")).unwrap();
    assert_eq!(fleet_provision::pki::crl_number_of_pem(&pem), crls.last().map(|c| c.1));
    for pair in crls.windows(2) {
        let (lower, higher) = (&pair[0], &pair[1]);
        let missing = lower.2.difference(&higher.2).count();
        assert_eq!(missing, 0, "CRL #{} misses {missing} revocation(s) listed in CRL #{}", higher.1, lower.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_revocations_keep_crls_monotonic_sqlite() {
    concurrent_revocations_keep_crls_monotonic(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_revocations_keep_crls_monotonic_postgres() {
    let pg = fleet_tests::PgCluster::start();
    concurrent_revocations_keep_crls_monotonic(Some(pg.create_database("race"))).await;
}
