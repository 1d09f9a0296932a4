//! Mutual TLS 1.3 for the device: an embedded-tls `CryptoProvider` that signs with the device key
//! from the credentials bundle and verifies the broker with [`ServerVerifier`].
//!
//! The RNG and the clock come from the caller: the SDK never reaches for them itself.

pub mod ecc;
pub mod signer;
pub mod verifier;
pub mod x509;

use embedded_tls::{Aes128GcmSha256, Certificate, CryptoProvider, SignatureScheme, TlsError, TlsVerifier};
use p256::ecdsa::DerSignature;
use rand_core::CryptoRngCore;

pub use signer::{DeviceSigner, RamSigner};
pub use verifier::{Rejection, ServerVerifier};

use crate::credentials::Credentials;

/// The device's TLS identity and its view of the broker.
#[derive(Debug)]
pub struct DeviceProvider<'a, R, S> {
    rng: R,
    creds: Credentials<'a>,
    signer: S,
    sign_failed: bool,
    verifier: ServerVerifier<'a>,
}

impl<'a, R: CryptoRngCore, S: DeviceSigner> DeviceProvider<'a, R, S> {
    /// A provider for `creds` whose key is held by `signer`. `now` (unix seconds) enables
    /// validity checks of the broker certificate; pass `None` on a device without a trustworthy
    /// clock.
    pub fn new(creds: Credentials<'a>, signer: S, rng: R, now: Option<i64>) -> Self {
        let verifier = ServerVerifier::new(creds.server_ca_der, creds.broker_host, now);
        Self { rng, creds, signer, sign_failed: false, verifier }
    }

    /// Why the broker was refused, after a failed handshake.
    pub fn rejection(&self) -> Option<Rejection> {
        self.verifier.last_rejection
    }

    /// Did the signer fail during the handshake? (The broker was sent an invalid signature
    /// instead, and refuses the connection.)
    pub fn signer_failed(&self) -> bool {
        self.sign_failed
    }

    /// `Ok` once the broker proved its identity (verified Certificate, then CertificateVerify by
    /// its key). embedded-tls completes a handshake with a server that skips either message, so
    /// whoever drives `TlsConnection::open` with this provider must check this before writing
    /// anything; [`crate::client::Device::connect`] does.
    pub fn authenticated(&self) -> Result<(), Rejection> {
        self.verifier.authenticated()
    }
}

impl<R: CryptoRngCore, S: DeviceSigner> CryptoProvider for DeviceProvider<'_, R, S> {
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
        // Never sign for a server that has not authenticated (see `client_cert`).
        if self.verifier.authenticated().is_err() {
            return Err(TlsError::InvalidCertificate);
        }
        let signer = signer::TlsSigner { signer: &mut self.signer, failed: &mut self.sign_failed };
        Ok((signer, SignatureScheme::EcdsaSecp256r1Sha256))
    }

    /// embedded-tls asks for the client certificate right after it accepted the server's
    /// Finished. A server that has not authenticated gets an empty certificate list: the device
    /// does not reveal its identity to it, and `Device::connect` then drops the connection.
    fn client_cert(&mut self) -> Option<Certificate<impl AsRef<[u8]>>> {
        self.verifier.authenticated().ok().map(|()| Certificate::X509(self.creds.cert_der))
    }
}
