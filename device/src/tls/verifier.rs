//! The broker verifier: the exact chain shape fleetgate issues, nothing else.
//!
//! embedded-tls's own `rustpki` verifier checks signatures and the host name but not basic
//! constraints, EKU or issuer-name chaining, so a device's own key could sign a "broker"
//! certificate it would accept (DESIGN.md, "Trust model"). This verifier accepts a server
//! certificate only if:
//! - its issuer name equals the pinned server CA's subject and its ECDSA P-256/SHA-256 signature
//!   verifies with the server CA's key (the leaf is signed *directly* by the pinned CA; any
//!   intermediates the server sends are ignored, never trusted);
//! - it is not a CA (basicConstraints cA FALSE or absent);
//! - it carries an extendedKeyUsage extension that includes serverAuth;
//! - a dNSName in its subjectAltName equals the expected host name (ASCII case-insensitive);
//! - it is within its validity period, when the firmware supplied the time;
//! - it has no critical extension this verifier does not understand;
//! - and the handshake's CertificateVerify is an ECDSA P-256 signature by its key.
//!
//! embedded-tls 0.19 calls a verifier only for the messages that arrive: a server that omits the
//! Certificate or the CertificateVerify still reaches its Finished and completes the handshake.
//! So the verifier also records how far the server has proven itself ([`ServerVerifier::authenticated`]):
//! one Certificate that passed every check above, then one CertificateVerify by that leaf's key
//! over the transcript up to that Certificate, in that order and nothing else. The provider shows
//! no client certificate and [`crate::client::Device::connect`] sends no byte of MQTT until it is
//! `Ok`.

use embedded_tls::{
    CertificateRef, CertificateVerifyRef, SignatureScheme, TlsCipherSuite, TlsError, TlsVerifier,
};

use super::x509::{self, oid, X509Error};

/// Why the broker was refused (kept for diagnostics; the TLS layer only sees a bad certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The server sent no certificate.
    NoCertificate,
    /// The certificate or the pinned CA does not parse.
    Malformed(X509Error),
    /// Not issued by the pinned server CA (name or signature).
    WrongIssuer,
    /// Not P-256 ECDSA.
    UnsupportedKey,
    /// A CA certificate presented as the server.
    CaAsServer,
    /// No serverAuth extended key usage.
    NotServerAuth,
    /// No subjectAltName dNSName matches the expected host.
    HostMismatch,
    /// Outside its validity period.
    Expired,
    /// Not yet valid.
    NotYetValid,
    /// CertificateVerify signature invalid.
    BadHandshakeSignature,
    /// The server finished its handshake after a Certificate but without a CertificateVerify:
    /// it never proved it holds the certificate's key.
    NoCertificateVerify,
    /// A CertificateVerify arrived before any verified Certificate.
    CertificateVerifyBeforeCertificate,
    /// A second Certificate (or one after the CertificateVerify) arrived.
    UnexpectedCertificate,
}

/// How far the server has authenticated itself in this handshake (only ever moves forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proof {
    /// Nothing verified yet.
    None,
    /// A Certificate passed the checks; its CertificateVerify is due.
    Certificate,
    /// Certificate and CertificateVerify both verified.
    Authenticated,
    /// A check failed; nothing later can succeed.
    Failed,
}

/// Verifies the broker against a pinned server CA.
#[derive(Debug)]
pub struct ServerVerifier<'a> {
    ca_der: &'a [u8],
    host: &'a str,
    now: Option<i64>,
    proof: Proof,
    /// Uncompressed P-256 point of the verified leaf, for CertificateVerify.
    leaf_key: Option<heapless::Vec<u8, 65>>,
    transcript: Option<[u8; 32]>,
    /// Why the last verification failed.
    pub last_rejection: Option<Rejection>,
}

impl<'a> ServerVerifier<'a> {
    /// Pins `server_ca_der`, expects `host` in the broker's SAN, and checks validity against
    /// `now` (unix seconds) when given.
    pub fn new(server_ca_der: &'a [u8], host: &'a str, now: Option<i64>) -> Self {
        Self {
            ca_der: server_ca_der,
            host,
            now,
            proof: Proof::None,
            leaf_key: None,
            transcript: None,
            last_rejection: None,
        }
    }

    /// `Ok` only once the server sent a Certificate that passed every check and then a
    /// CertificateVerify by that certificate's key; otherwise the step that was missing or failed.
    /// Call it after the handshake and before any application data.
    pub fn authenticated(&self) -> Result<(), Rejection> {
        match self.proof {
            Proof::Authenticated => Ok(()),
            Proof::None => Err(Rejection::NoCertificate),
            Proof::Certificate => Err(Rejection::NoCertificateVerify),
            // A failure always records its reason first.
            Proof::Failed => Err(self.last_rejection.unwrap_or(Rejection::NoCertificate)),
        }
    }

    /// Checks a server certificate chain (`chain[0]` is the leaf) as the TLS handshake would.
    pub fn check_chain(&mut self, leaf_der: &[u8]) -> Result<(), Rejection> {
        let ca = x509::parse(self.ca_der).map_err(Rejection::Malformed)?;
        let leaf = x509::parse(leaf_der).map_err(Rejection::Malformed)?;
        if leaf.issuer != ca.subject {
            return Err(Rejection::WrongIssuer);
        }
        if leaf.signature_algorithm != oid::ECDSA_SHA256 || ca.key_curve != Some(oid::P256) {
            return Err(Rejection::WrongIssuer);
        }
        if !super::ecc::verify_der(ca.public_key, leaf.tbs, leaf.signature) {
            return Err(Rejection::WrongIssuer);
        }
        if leaf.is_ca {
            return Err(Rejection::CaAsServer);
        }
        if !leaf.has_eku || !leaf.eku_server_auth {
            return Err(Rejection::NotServerAuth);
        }
        let host = self.host.as_bytes();
        let matches = leaf.san.is_some_and(|san| x509::dns_names(san).any(|n| n.eq_ignore_ascii_case(host)));
        if !matches {
            return Err(Rejection::HostMismatch);
        }
        if let Some(now) = self.now {
            if now < leaf.not_before {
                return Err(Rejection::NotYetValid);
            }
            if now > leaf.not_after {
                return Err(Rejection::Expired);
            }
        }
        if leaf.key_algorithm != oid::EC_PUBLIC_KEY
            || leaf.key_curve != Some(oid::P256)
            || leaf.public_key.len() != 65
        {
            return Err(Rejection::UnsupportedKey);
        }
        self.leaf_key = heapless::Vec::from_slice(leaf.public_key).ok();
        Ok(())
    }

    fn reject(&mut self, r: Rejection) -> TlsError {
        self.proof = Proof::Failed;
        self.leaf_key = None;
        self.transcript = None;
        self.last_rejection = Some(r);
        TlsError::InvalidCertificate
    }
}

impl<CipherSuite: TlsCipherSuite> TlsVerifier<CipherSuite> for ServerVerifier<'_> {
    fn set_hostname_verification(&mut self, hostname: &str) -> Result<(), TlsError> {
        // The expected host comes from the credentials bundle; a different SNI is a bug.
        if hostname.eq_ignore_ascii_case(self.host) {
            Ok(())
        } else {
            Err(self.reject(Rejection::HostMismatch))
        }
    }

    fn verify_certificate(
        &mut self,
        transcript: &CipherSuite::Hash,
        cert: CertificateRef,
    ) -> Result<(), TlsError> {
        match self.proof {
            Proof::None => {}
            Proof::Failed => return Err(TlsError::InvalidCertificate),
            Proof::Certificate | Proof::Authenticated => {
                return Err(self.reject(Rejection::UnexpectedCertificate))
            }
        }
        let Some(embedded_tls::CertificateEntryRef::X509(leaf)) = cert.entries.first() else {
            return Err(self.reject(Rejection::NoCertificate));
        };
        self.check_chain(leaf).map_err(|r| self.reject(r))?;
        let digest = digest::Digest::finalize(transcript.clone());
        let mut t = [0u8; 32];
        if digest.len() != 32 {
            return Err(self.reject(Rejection::UnsupportedKey));
        }
        t.copy_from_slice(&digest);
        self.transcript = Some(t);
        self.proof = Proof::Certificate;
        Ok(())
    }

    fn verify_signature(&mut self, verify: CertificateVerifyRef) -> Result<(), TlsError> {
        match self.proof {
            Proof::Certificate => {}
            Proof::Failed => return Err(TlsError::InvalidSignature),
            Proof::None => return Err(self.reject(Rejection::CertificateVerifyBeforeCertificate)),
            Proof::Authenticated => return Err(self.reject(Rejection::UnexpectedCertificate)),
        }
        let (Some(key), Some(transcript)) = (self.leaf_key.take(), self.transcript.take()) else {
            // Proof::Certificate always stores both.
            return Err(self.reject(Rejection::NoCertificate));
        };
        if verify.signature_scheme != SignatureScheme::EcdsaSecp256r1Sha256 {
            return Err(self.reject(Rejection::UnsupportedKey));
        }
        // RFC 8446 §4.4.3: 64 spaces, context string, 0, transcript hash.
        let mut msg = [0x20u8; 64 + 34 + 32];
        msg[64..98].copy_from_slice(b"TLS 1.3, server CertificateVerify\x00");
        msg[98..].copy_from_slice(&transcript);
        if super::ecc::verify_der(&key, &msg, verify.signature) {
            self.proof = Proof::Authenticated;
            Ok(())
        } else {
            Err(self.reject(Rejection::BadHandshakeSignature))
        }
    }
}

impl core::fmt::Display for Rejection {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::NoCertificate => "the server sent no certificate",
            Self::Malformed(e) => return write!(f, "the server's certificate or the pinned CA: {e}"),
            Self::WrongIssuer => "the server's certificate is not issued by the pinned server CA",
            Self::UnsupportedKey => "the server's key is not P-256 ECDSA",
            Self::CaAsServer => "the server presented a CA certificate",
            Self::NotServerAuth => "the server's certificate is not for server authentication (EKU)",
            Self::HostMismatch => "the server's certificate does not name the broker host",
            Self::Expired => "the server's certificate has expired",
            Self::NotYetValid => "the server's certificate is not valid yet",
            Self::BadHandshakeSignature => "the server's handshake signature does not verify",
            Self::NoCertificateVerify => "the server never proved it holds its certificate's key",
            Self::CertificateVerifyBeforeCertificate => "the server signed before sending its certificate",
            Self::UnexpectedCertificate => "the server sent a second certificate",
        })
    }
}
