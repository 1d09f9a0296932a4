//! Mutual TLS 1.3 for the device: an embedded-tls `CryptoProvider` that signs with the device key
//! from the credentials bundle and verifies the broker with [`ServerVerifier`].
//!
//! The RNG and the clock come from the caller: the SDK never reaches for them itself.

pub mod verifier;
pub mod x509;

use embedded_tls::{Aes128GcmSha256, Certificate, CryptoProvider, SignatureScheme, TlsError, TlsVerifier};
use p256::ecdsa::{DerSignature, SigningKey};
use rand_core::CryptoRngCore;

pub use verifier::{Rejection, ServerVerifier};

use crate::credentials::Credentials;

/// The device's TLS identity and its view of the broker.
#[derive(Debug)]
pub struct DeviceProvider<'a, R> {
    rng: R,
    creds: Credentials<'a>,
    verifier: ServerVerifier<'a>,
}

impl<'a, R: CryptoRngCore> DeviceProvider<'a, R> {
    /// A provider for `creds`. `now` (unix seconds) enables validity checks of the broker
    /// certificate; pass `None` on a device without a trustworthy clock.
    pub fn new(creds: Credentials<'a>, rng: R, now: Option<i64>) -> Self {
        let verifier = ServerVerifier::new(creds.server_ca_der, creds.broker_host, now);
        Self { rng, creds, verifier }
    }

    /// Why the broker was refused, after a failed handshake.
    pub fn rejection(&self) -> Option<Rejection> {
        self.verifier.last_rejection
    }
}

impl<R: CryptoRngCore> CryptoProvider for DeviceProvider<'_, R> {
    type CipherSuite = Aes128GcmSha256;
    type Signature = DerSignature;

    fn rng(&mut self) -> impl CryptoRngCore {
        &mut self.rng
    }

    fn verifier(&mut self) -> Result<&mut impl TlsVerifier<Self::CipherSuite>, TlsError> {
        Ok(&mut self.verifier)
    }

    fn signer(
        &mut self,
    ) -> Result<(impl p256::ecdsa::signature::SignerMut<Self::Signature>, SignatureScheme), TlsError> {
        let key =
            p256::SecretKey::from_sec1_der(self.creds.key_der).map_err(|_| TlsError::InvalidPrivateKey)?;
        Ok((SigningKey::from(&key), SignatureScheme::EcdsaSecp256r1Sha256))
    }

    fn client_cert(&mut self) -> Option<Certificate<impl AsRef<[u8]>>> {
        Some(Certificate::X509(self.creds.cert_der))
    }
}
