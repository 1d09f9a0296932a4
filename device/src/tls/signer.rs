//! Where the device key lives: the [`DeviceSigner`] trait.
//!
//! The handshake needs the device key once, to sign the client's CertificateVerify (a SHA-256
//! digest). Anything that can sign a 32-byte digest with P-256 can hold the key:
//!
//! - [`RamSigner`]: the key from the credentials bundle, in RAM (the default);
//! - a secure element: an ATECC608 (`Sign` command, external message mode, after `Nonce` loads
//!   the digest into TempKey), an NXP SE050 (`ECDSASign` with `kSE05x_ECSignatureAlgo_SHA_256`
//!   over the digest), or PSA Crypto (`psa_sign_hash(key, PSA_ALG_ECDSA(PSA_ALG_SHA_256), ...)`
//!   on a TF-M or mbed-crypto target). Each returns the signature as `r ‖ s` (or DER, which the
//!   driver converts): implement the trait over the driver, pass it to
//!   [`crate::client::Device::connect_with`], and the key never enters the MCU's RAM.
//!
//! The firmware example's mock secure element (`firmware-examples/qemu-mps2-an386-async`) shows
//! the shape: the key sits in a separate task behind a command/response channel.

use p256::ecdsa::signature::{Error, SignerMut};
use p256::ecdsa::DerSignature;

/// Signs with the device's P-256 key, wherever it lives.
pub trait DeviceSigner {
    /// The uncompressed SEC1 public key (`04 ‖ X ‖ Y`) of the key this signer uses: checked
    /// against the certificate before the handshake, so a wrong slot fails with a clear error.
    fn public_key(&mut self) -> Option<[u8; 65]>;

    /// ECDSA P-256 over `digest` (a SHA-256 hash): `r ‖ s`, each 32 bytes big-endian. `None`
    /// when the key or the device holding it fails.
    fn sign_digest(&mut self, digest: &[u8; 32]) -> Option<[u8; 64]>;
}

impl<S: DeviceSigner + ?Sized> DeviceSigner for &mut S {
    fn public_key(&mut self) -> Option<[u8; 65]> {
        (**self).public_key()
    }

    fn sign_digest(&mut self, digest: &[u8; 32]) -> Option<[u8; 64]> {
        (**self).sign_digest(digest)
    }
}

/// The device key in RAM: the secret scalar of the bundle's `key_der`.
pub struct RamSigner {
    secret: [u8; 32],
}

impl core::fmt::Debug for RamSigner {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("RamSigner(..)")
    }
}

impl RamSigner {
    /// The key of a SEC1 `ECPrivateKey` DER (the bundle's `key_der`, RFC 5915), if it holds a
    /// valid P-256 scalar.
    ///
    /// Only the scalar is read. `p256::SecretKey::from_sec1_der` would also check the embedded
    /// public key by recomputing it: a generic scalar multiplication, 7 M instructions on a
    /// Cortex-M4, at every connection. [`crate::client::Device::check_signer`] makes that check
    /// against the certificate once, at boot.
    pub fn from_sec1_der(der: &[u8]) -> Option<Self> {
        use super::x509::read_tlv;
        let (seq, _) = read_tlv(der).ok()?;
        let (version, rest) = read_tlv(seq.value).ok()?;
        let (scalar, _) = read_tlv(rest).ok()?;
        if seq.tag != 0x30 || version.tag != 0x02 || version.value != [1] || scalar.tag != 0x04 {
            return None;
        }
        let secret: [u8; 32] = scalar.value.try_into().ok()?;
        // In range 1..n-1 (a cheap comparison, no point arithmetic).
        p256::SecretKey::from_bytes(&secret.into()).ok()?;
        Some(Self { secret })
    }

    /// A key from its 32-byte big-endian scalar.
    pub fn from_scalar(secret: [u8; 32]) -> Self {
        Self { secret }
    }
}

impl Drop for RamSigner {
    fn drop(&mut self) {
        self.secret = [0; 32];
    }
}

impl DeviceSigner for RamSigner {
    fn public_key(&mut self) -> Option<[u8; 65]> {
        super::ecc::public_key(&self.secret)
    }

    fn sign_digest(&mut self, digest: &[u8; 32]) -> Option<[u8; 64]> {
        super::ecc::sign_digest(&self.secret, digest)
    }
}

/// A [`DeviceSigner`] as the `SignerMut` embedded-tls asks for: it hashes the CertificateVerify
/// content and returns the DER signature TLS carries.
#[derive(Debug)]
pub(crate) struct TlsSigner<'f, S> {
    pub(crate) signer: S,
    /// Set when the signer failed (`Device::connect` then reports `ClientError::Key`).
    pub(crate) failed: &'f mut bool,
}

impl<S: DeviceSigner> SignerMut<DerSignature> for TlsSigner<'_, S> {
    fn try_sign(&mut self, msg: &[u8]) -> Result<DerSignature, Error> {
        use sha2::Digest as _;
        let digest: [u8; 32] = sha2::Sha256::digest(msg).into();
        let rs = self.signer.sign_digest(&digest).ok_or_else(Error::new)?;
        let sig = p256::ecdsa::Signature::from_slice(&rs)?;
        Ok(sig.to_der())
    }

    /// embedded-tls calls `sign`, whose default panics when `try_sign` fails: a secure element
    /// that does not answer would halt the firmware. Instead the handshake goes on with a
    /// signature no key can have made (r = s = 1), the broker refuses it, and the failure is
    /// recorded for `Device::connect` to report.
    fn sign(&mut self, msg: &[u8]) -> DerSignature {
        match self.try_sign(msg) {
            Ok(sig) => sig,
            Err(_) => {
                *self.failed = true;
                let mut one = [0u8; 64];
                one[31] = 1;
                one[63] = 1;
                p256::ecdsa::Signature::from_slice(&one).map(|s| s.to_der()).unwrap_or_else(|_| {
                    DerSignature::from_bytes(&[0x30, 0x06, 2, 1, 1, 2, 1, 1]).expect("fixed DER")
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier as _;
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;

    #[test]
    fn the_tls_adapter_signs_what_p256_verifies() {
        let key = p256::SecretKey::from_bytes(&[3u8; 32].into()).expect("scalar");
        let mut der = [0u8; crate::rotation::KEY_DER_LEN];
        crate::rotation::key_der(&p256::ecdsa::SigningKey::from(&key), &mut der);
        let mut ram = RamSigner::from_sec1_der(&der).expect("sec1");
        let public = ram.public_key().expect("key");
        assert_eq!(&public[..], key.public_key().to_encoded_point(false).as_bytes());
        let mut failed = false;
        let sig = TlsSigner { signer: &mut ram, failed: &mut failed }
            .try_sign(b"TLS 1.3, client CertificateVerify")
            .expect("sign");
        let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&public).expect("point");
        assert!(vk.verify(b"TLS 1.3, client CertificateVerify", &sig).is_ok());
        assert!(RamSigner::from_sec1_der(&[0x30, 0]).is_none());
        // The scalar as p256 reads it, from DER with and without the optional fields.
        assert_eq!(RamSigner::from_sec1_der(&der).expect("sec1").secret, [3u8; 32]);
        let mut bare = std::vec![0x30, 37, 2, 1, 1, 4, 32];
        bare.extend_from_slice(&[3u8; 32]);
        assert_eq!(RamSigner::from_sec1_der(&bare).expect("bare").secret, [3u8; 32]);
        let mut zero = bare.clone();
        zero[7..].fill(0);
        assert!(RamSigner::from_sec1_der(&zero).is_none(), "zero is no key");
        let mut v2 = bare.clone();
        v2[4] = 2;
        assert!(RamSigner::from_sec1_der(&v2).is_none(), "version 2");
        assert!(!failed);
    }

    struct Broken;

    impl DeviceSigner for Broken {
        fn public_key(&mut self) -> Option<[u8; 65]> {
            None
        }
        fn sign_digest(&mut self, _: &[u8; 32]) -> Option<[u8; 64]> {
            None
        }
    }

    #[test]
    fn a_failing_signer_is_recorded_not_a_panic() {
        let mut failed = false;
        let sig = TlsSigner { signer: Broken, failed: &mut failed }.sign(b"m");
        assert_eq!(sig.as_bytes(), &[0x30, 0x06, 2, 1, 1, 2, 1, 1]);
        assert!(failed);
    }
}
