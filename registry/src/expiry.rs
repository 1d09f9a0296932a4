//! "Expiring": the one definition, used by everything that asks which identities expire soon:
//! the station's `list --expiring-within` and `rotate --expiring-within`, the online issuer's
//! rotation window (`serve --renew-within`), and the console's expiry filter and count.
//!
//! An identity's **expiry** is the notAfter of the newest-expiring of its *active*
//! certificates: the moment it can no longer connect. A revoked certificate never counts (not
//! even the newest one, say after `revoke --serial`), and an older certificate that ends sooner
//! does not matter while a newer one is valid (`renew` leaves the old one active). An identity
//! without an active certificate has no expiry (it cannot connect at all; a revoked identity has
//! none) and is never expiring. An identity is **expiring within a window** when its expiry is
//! at or before the window's end; already expired ones are included.
//!
//! The definition has two forms that must agree: [`expiry`] and [`ExpiryWindow::contains`] over
//! certificate rows in memory (the issuer, which has them loaded), and [`EXPIRY_SQL`] with
//! [`ExpiryWindow::sql_condition`] inside a query (listings, pages and counts, so that a
//! listing stays one query). Both live here, and the tests hold them together (`provisioning/tests/list.rs` compares both forms on
//! SQLite and PostgreSQL).

use crate::ids::Status;
use crate::rows::CertRecord;

/// The end of an expiry window: identities whose expiry is at or before it are expiring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryWindow {
    until: i64,
}

impl ExpiryWindow {
    /// Expiring within `secs` seconds of `now` (unix seconds).
    pub fn within(now: i64, secs: i64) -> Self {
        Self { until: now.saturating_add(secs) }
    }

    /// Expiring at or before `until` (unix seconds).
    pub fn until(until: i64) -> Self {
        Self { until }
    }

    /// The window's end (unix seconds).
    pub fn end(&self) -> i64 {
        self.until
    }

    /// Whether an identity whose [`expiry`] is `expiry` is expiring within this window.
    pub fn contains(&self, expiry: Option<i64>) -> bool {
        expiry.is_some_and(|e| e <= self.until)
    }

    /// [`ExpiryWindow::contains`] in SQL, over a column or expression holding [`EXPIRY_SQL`].
    /// The bound is an integer written into the text: nothing from outside reaches the SQL.
    pub(crate) fn sql_condition(&self, expiry: &str) -> String {
        format!("{expiry} IS NOT NULL AND {expiry} <= {}", self.until)
    }
}

/// An identity's expiry: the latest notAfter among its active certificates, if it has any.
pub fn expiry<'a>(certs: impl IntoIterator<Item = &'a CertRecord>) -> Option<i64> {
    certs.into_iter().filter(|c| c.status == Status::Active).map(|c| c.not_after).max()
}

/// [`expiry`] in SQL: the expiry of the identity in the row aliased `d` (a `devices` row).
pub(crate) const EXPIRY_SQL: &str = "(SELECT MAX(c.not_after) FROM certificates c \
     WHERE c.device_id = d.device_id AND c.status = 'active')";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DeviceId, SerialNumber};

    fn cert(not_after: i64, status: Status) -> CertRecord {
        CertRecord {
            serial: SerialNumber::random(),
            device_id: DeviceId::parse("dev-000000000001").unwrap_or_else(|_| unreachable!("a valid id")),
            not_before: 0,
            not_after,
            key_source: "station".into(),
            status,
            issued_at: 0,
            revoked_at: None,
            revocation_reason: None,
            cert_der: Vec::new(),
        }
    }

    #[test]
    fn the_newest_active_certificate_decides() {
        let w = ExpiryWindow::within(1_000, 100);
        assert_eq!(w.end(), 1_100);
        // Renewed: the old certificate ends inside the window, the new one after it.
        let renewed = [cert(1_050, Status::Active), cert(5_000, Status::Active)];
        assert_eq!(expiry(&renewed), Some(5_000));
        assert!(!w.contains(expiry(&renewed)));
        // The newest certificate was revoked: the older active one is what the device runs on.
        let revoked_newest = [cert(9_000, Status::Revoked), cert(1_100, Status::Active)];
        assert!(w.contains(expiry(&revoked_newest)));
        // Already expired: included.
        assert!(w.contains(expiry(&[cert(10, Status::Active)])));
        // No active certificate: no expiry, never expiring.
        assert_eq!(expiry(&[cert(10, Status::Revoked)]), None);
        assert!(!w.contains(None));
        // The window's end saturates instead of overflowing.
        assert_eq!(ExpiryWindow::within(i64::MAX - 1, 100).end(), i64::MAX);
    }

    #[test]
    fn the_sql_form_names_the_same_bound() {
        let w = ExpiryWindow::until(1_234);
        assert_eq!(w.sql_condition("t.expiry"), "t.expiry IS NOT NULL AND t.expiry <= 1234");
        assert!(EXPIRY_SQL.contains("MAX(c.not_after)") && EXPIRY_SQL.contains("c.status = 'active'"));
    }
}
