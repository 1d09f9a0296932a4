//! Certificate rotation and claim-based first boot, device side (docs/spec/rotation.md), sans-IO
//! and without an allocator.
//!
//! A [`Rotator`] holds the fresh key (generated with the caller's RNG; it never leaves the
//! device) from the moment a rotation starts until the issued certificate is accepted. It says
//! when to (re)send the CSR: at once, then again after `answer_timeout_ms` without an answer or
//! after a rejection, with exponential back-off up to `backoff_max_ms`, so an issuer that is down
//! costs the device one small publish now and then, and its old identity keeps working.
//!
//! ```text
//! if rotation::renewal_due(creds.cert_der, now_unix, 30 * 86_400) { rot.start(&mut rng, now) }
//! loop {
//!     if let Some(csr) = rot.poll_csr(creds.device_id, now, &mut csr_buf)? { device.publish("certs/csr", csr, QoS::AtLeastOnce)? }
//!     match device.poll(&mut tls, now)? {
//!         Some(Incoming::RotateRequested) => rot.start(&mut rng, now),
//!         Some(Incoming::Certificate { der }) => {
//!             let n = rot.bundle(&creds, creds.device_id, &der, &mut bundle)?;   // checks the certificate
//!             store.stage(&bundle[..n], &mut scratch)?;                            // spare slot
//!             // reconnect with the staged identity; once the broker admits it:
//!             store.commit(&mut scratch, &mut bundle)?; device.publish("certs/active", b"", QoS::AtLeastOnce)?;
//!         }
//!         Some(Incoming::CertificateRejected { .. }) => rot.rejected(now),
//!         _ => {}
//!     }
//! }
//! ```

use p256::ecdsa::SigningKey;
use rand_core::CryptoRngCore;

use crate::credentials::{BundleError, Credentials};
use crate::csr::{self, CsrError};
use crate::mqtt::Millis;
use crate::tls::x509;

/// Bytes of a P-256 `ECPrivateKey` (SEC1) DER as this module writes it.
pub const KEY_DER_LEN: usize = 121;
/// Largest certificate the device accepts from the issuer.
pub const CERT_MAX: usize = 1024;

/// Why an issued certificate was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum RotationError {
    /// No rotation is in progress (or it was already completed).
    NotStarted,
    /// The certificate does not parse.
    Malformed,
    /// It certifies another key than the one this device generated.
    WrongKey,
    /// It names another device.
    WrongId,
    /// The output buffer is too small, or the bundle did not encode.
    Bundle(BundleError),
    /// The CSR did not fit its buffer.
    Csr(CsrError),
}

/// When a certificate is inside its renewal window: `not_after - now <= window`. A certificate
/// that does not parse is due (a device should not sit on an identity it cannot read).
pub fn renewal_due(cert_der: &[u8], now_unix: i64, window_secs: i64) -> bool {
    match x509::parse(cert_der) {
        Ok(c) => c.not_after.saturating_sub(now_unix) <= window_secs,
        Err(_) => true,
    }
}

/// The notAfter of a certificate (unix seconds), if it parses.
pub fn not_after(cert_der: &[u8]) -> Option<i64> {
    x509::parse(cert_der).ok().map(|c| c.not_after)
}

/// Writes `key` as SEC1 `ECPrivateKey` DER (RFC 5915, with the curve and the public key), the
/// form credentials bundles carry.
pub fn key_der(key: &SigningKey, out: &mut [u8; KEY_DER_LEN]) {
    const HEAD: [u8; 7] = [0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20];
    const MID: [u8; 16] =
        [0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0xa1, 0x44, 0x03, 0x42];
    out[..7].copy_from_slice(&HEAD);
    out[7..39].copy_from_slice(&key.to_bytes());
    out[39..55].copy_from_slice(&MID);
    out[55] = 0x00;
    let point = key.verifying_key().to_encoded_point(false);
    out[56..].copy_from_slice(point.as_bytes());
}

/// Timing of CSR (re)sends.
#[derive(Debug, Clone, Copy)]
pub struct RotationConfig {
    /// Send the CSR again if no answer came within this long.
    pub answer_timeout_ms: u64,
    /// Largest wait between attempts.
    pub backoff_max_ms: u64,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self { answer_timeout_ms: 30_000, backoff_max_ms: 3_600_000 }
    }
}

/// One rotation (or first boot) in progress: the new key and when to ask.
#[derive(Debug)]
pub struct Rotator {
    cfg: RotationConfig,
    key: Option<SigningKey>,
    next_send: Millis,
    attempt: u32,
    sent: u32,
}

impl Rotator {
    /// Idle.
    pub fn new(cfg: RotationConfig) -> Self {
        Self { cfg, key: None, next_send: Millis(0), attempt: 0, sent: 0 }
    }

    /// Starts a rotation with a fresh key, unless one is in progress (an operator's repeated
    /// request does not throw away a key the issuer may have certified already).
    pub fn start(&mut self, rng: &mut impl CryptoRngCore, now: Millis) {
        if self.key.is_none() {
            self.key = Some(csr::generate_key(rng));
            self.next_send = now;
            self.attempt = 0;
        }
    }

    /// Whether a rotation is in progress.
    pub fn in_progress(&self) -> bool {
        self.key.is_some()
    }

    /// CSRs sent for the current rotation so far.
    pub fn attempts(&self) -> u32 {
        self.sent
    }

    /// The CSR to publish on `certs/csr` now, if one is due: built into `out`. After this, the
    /// next send is scheduled `answer_timeout_ms` later, doubling with each attempt.
    pub fn poll_csr<'o>(
        &mut self,
        device_id: &str,
        now: Millis,
        out: &'o mut [u8],
    ) -> Result<Option<&'o [u8]>, RotationError> {
        let Some(key) = &self.key else { return Ok(None) };
        if now < self.next_send {
            return Ok(None);
        }
        let n = csr::build(device_id, key, out).map_err(RotationError::Csr)?;
        self.sent += 1;
        self.schedule(now, self.cfg.answer_timeout_ms);
        Ok(Some(&out[..n]))
    }

    fn schedule(&mut self, now: Millis, base: u64) {
        let wait = base.saturating_mul(1u64 << self.attempt.min(20)).min(self.cfg.backoff_max_ms);
        self.attempt = self.attempt.saturating_add(1);
        self.next_send = Millis(now.0.saturating_add(wait));
    }

    /// The issuer refused (`certs/rejected`): ask again later, with back-off.
    pub fn rejected(&mut self, now: Millis) {
        if self.key.is_some() {
            self.schedule(now, self.cfg.answer_timeout_ms);
        }
    }

    /// When the next CSR is due, if a rotation is in progress.
    pub fn next_send(&self) -> Option<Millis> {
        self.key.as_ref().map(|_| self.next_send)
    }

    /// Checks an issued certificate (`certs/issued`, leaf first): it must certify this
    /// rotation's key and name `device_id`. Returns the leaf's DER.
    pub fn check<'c>(&self, issued: &'c [u8], device_id: &str) -> Result<&'c [u8], RotationError> {
        let key = self.key.as_ref().ok_or(RotationError::NotStarted)?;
        let (leaf, _) = x509::read_tlv(issued).map_err(|_| RotationError::Malformed)?;
        let cert = x509::parse(leaf.raw).map_err(|_| RotationError::Malformed)?;
        if cert.public_key != key.verifying_key().to_encoded_point(false).as_bytes() {
            return Err(RotationError::WrongKey);
        }
        let names_it = cert.san.is_some_and(|san| {
            x509::uris(san)
                .any(|u| u.strip_prefix(fleet_topic::uri::DEVICE.as_bytes()) == Some(device_id.as_bytes()))
        });
        if !names_it {
            return Err(RotationError::WrongId);
        }
        Ok(leaf.raw)
    }

    /// Checks `issued` (see [`Rotator::check`]) and writes the new credentials bundle into `out`:
    /// `device_id`, the new certificate and key, the broker settings of `template`. Returns its
    /// length. The rotation stays in progress until [`Rotator::finish`].
    pub fn bundle(
        &self,
        template: &Credentials<'_>,
        device_id: &str,
        issued: &[u8],
        out: &mut [u8],
    ) -> Result<usize, RotationError> {
        let leaf = self.check(issued, device_id)?;
        let key = self.key.as_ref().ok_or(RotationError::NotStarted)?;
        let mut der = [0u8; KEY_DER_LEN];
        key_der(key, &mut der);
        let creds = Credentials { device_id, cert_der: leaf, key_der: &der, ..*template };
        let n = creds.encode(out).map_err(RotationError::Bundle);
        der.fill(0);
        n
    }

    /// The new identity is stored (and admitted): forget the key.
    pub fn finish(&mut self) {
        self.key = None;
        self.attempt = 0;
        self.sent = 0;
    }
}

impl core::fmt::Display for RotationError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotStarted => f.write_str("no rotation is in progress"),
            Self::Malformed => f.write_str("the issued certificate does not parse"),
            Self::WrongKey => f.write_str("the issued certificate is for another key"),
            Self::WrongId => f.write_str("the issued certificate names another device"),
            Self::Bundle(e) => write!(f, "the new credentials: {e}"),
            Self::Csr(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TestRng(u64);
    impl rand_core::RngCore for TestRng {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for b in dest {
                *b = self.next_u64() as u8;
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }
    impl rand_core::CryptoRng for TestRng {}

    #[test]
    fn the_key_encodes_as_sec1_der_that_p256_reads_back() {
        let key = csr::generate_key(&mut TestRng(7));
        let mut der = [0u8; KEY_DER_LEN];
        key_der(&key, &mut der);
        let back = p256::SecretKey::from_sec1_der(&der).expect("sec1");
        assert_eq!(back.to_bytes(), key.to_bytes());
    }

    #[test]
    fn csrs_are_resent_with_backoff_until_an_answer() {
        let mut r = Rotator::new(RotationConfig { answer_timeout_ms: 1_000, backoff_max_ms: 5_000 });
        let mut buf = [0u8; 512];
        assert_eq!(r.poll_csr("dev-1", Millis(0), &mut buf), Ok(None), "idle");
        r.start(&mut TestRng(3), Millis(100));
        let mut sends = std::vec::Vec::new();
        for t in (100..20_000).step_by(50) {
            if r.poll_csr("dev-1", Millis(t), &mut buf).expect("csr").is_some() {
                sends.push(t);
            }
        }
        // at once, then +1 s, +2 s, +4 s, then capped at 5 s
        assert_eq!(&sends[..5], &[100, 1_100, 3_100, 7_100, 12_100]);
        assert_eq!(sends[5] - sends[4], 5_000);
        r.finish();
        assert!(!r.in_progress());
        assert_eq!(r.check(&[0x30, 0], "dev-1"), Err(RotationError::NotStarted));
    }
}
