//! Firmware signing: the station's Ed25519 image-signing key and signed releases in the form
//! embassy-boot 0.7 verifies (docs/spec/ota.md).
//!
//! embassy-boot's `FirmwareUpdater::verify_and_mark_updated(public_key, signature, update_len)`
//! (0.7.0, `src/firmware_updater/{blocking,asynch}.rs`) hashes the first `update_len` bytes of
//! the update partition with SHA-512 and checks `signature` as a plain Ed25519 signature (not
//! Ed25519ph) over those 64 digest bytes, with ed25519-dalek's `Verifier::verify` (feature
//! `ed25519-dalek`) or salty (feature `ed25519-salty`), then marks the partition for swap. So
//! the image signature here is Ed25519 over SHA-512(image), and `update_len` is the image size.
//!
//! A [`Manifest`] carries that signature with the release's version, minimum version, board and
//! size, under a second signature by the same key ([`Manifest::signed_part`]): embassy-boot
//! authenticates the bytes, the manifest says which release they are.
//!
//! Pure functions over bytes: keys in and out as PEM, no files, no registry.

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use sha2::{Digest, Sha256, Sha512};

use crate::error::{Error, Result};
pub use fleet_device::release::{Board, Manifest, Version, KEY_ID_LEN, MANIFEST_LEN};

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): `SEQUENCE { SEQUENCE { OID
/// 1.3.101.112 }, BIT STRING (0 unused bits) }`, followed by the 32 key bytes.
const SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// DER prefix of an Ed25519 PKCS#8 v1 private key (RFC 8410 §7): `SEQUENCE { INTEGER 0,
/// SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32) } }`, followed by the seed.
const PKCS8_V1_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// The firmware signing public key: the 32 bytes a device embeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirmwarePublicKey([u8; 32]);

impl FirmwarePublicKey {
    /// From its 32 raw bytes (the `firmware.pub` file).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// From a `PUBLIC KEY` PEM (Ed25519 SubjectPublicKeyInfo, as OpenSSL writes it).
    pub fn from_pem(pem: &str) -> Option<Self> {
        let der = crate::pki::pem_decode(pem, "PUBLIC KEY")?;
        let key = der.strip_prefix(&SPKI_PREFIX[..])?;
        Self::from_bytes(key)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Its id in manifests: the first 8 bytes of SHA-256 over the 32 bytes.
    pub fn key_id(&self) -> [u8; KEY_ID_LEN] {
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&Sha256::digest(self.0)[..KEY_ID_LEN]);
        id
    }

    /// [`FirmwarePublicKey::key_id`] in lowercase hex.
    pub fn key_id_hex(&self) -> String {
        hex::encode(self.key_id())
    }

    /// SubjectPublicKeyInfo PEM, for `openssl pkeyutl -verify -pubin -inkey`.
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        crate::pki::pem_encode("PUBLIC KEY", &der)
    }

    /// Whether `signature` is this key's Ed25519 signature over `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, self.0).verify(message, signature).is_ok()
    }
}

/// The firmware signing key (Ed25519).
#[derive(Debug)]
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// A new key and its PEM: PKCS#8 v1 (RFC 8410, `BEGIN PRIVATE KEY`), the form of the CA
    /// keys and of `openssl genpkey -algorithm ed25519`, which OpenSSL reads. (ring's own
    /// PKCS#8 v2 output is not readable by OpenSSL 3.0.)
    pub fn generate() -> Result<(SigningKey, String)> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut seed)
            .map_err(|_| Error::InvalidInput("the system random generator failed".into()))?;
        let mut der = PKCS8_V1_PREFIX.to_vec();
        der.extend_from_slice(&seed);
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|_| Error::InvalidInput("a generated key does not load".into()))?;
        Ok((SigningKey(key), crate::pki::pem_encode("PRIVATE KEY", &der)))
    }

    /// Loads a PKCS#8 PEM Ed25519 key: the station's, or any v1 or v2 one (`openssl genpkey
    /// -algorithm ed25519` writes v1).
    pub fn from_pem(pem: &[u8]) -> std::result::Result<SigningKey, String> {
        const NOT_PEM: &str = "not a PEM private key (BEGIN PRIVATE KEY, PKCS#8)";
        let text = std::str::from_utf8(pem).map_err(|_| NOT_PEM)?;
        let der = crate::pki::pem_decode(text, "PRIVATE KEY").ok_or(NOT_PEM)?;
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map(SigningKey)
            .map_err(|_| "not an Ed25519 private key".to_owned())
    }

    /// Its public key.
    pub fn public_key(&self) -> FirmwarePublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.0.public_key().as_ref());
        FirmwarePublicKey(k)
    }

    fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut sig = [0u8; 64];
        sig.copy_from_slice(self.0.sign(message).as_ref());
        sig
    }
}

/// What to release: everything of the manifest but what signing computes.
#[derive(Debug, Clone, Copy)]
pub struct ReleaseSpec {
    /// The release's version.
    pub version: Version,
    /// The oldest running version that may install it.
    pub min_version: Version,
    /// The board it runs on.
    pub board: Board,
}

/// Why a release does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseCheck {
    /// The manifest names another key.
    #[error("the manifest names signing key {0}, not this one")]
    OtherKey(String),
    /// The manifest signature does not verify.
    #[error("the manifest signature does not verify")]
    ManifestSignature,
    /// The image is not as long as the manifest says.
    #[error("the image is {actual} bytes, the manifest says {stated}")]
    Size {
        /// Bytes of the image.
        actual: usize,
        /// `image_size` in the manifest.
        stated: u32,
    },
    /// The image's SHA-512 is not the manifest's.
    #[error("the image's SHA-512 is not the manifest's (the image was changed)")]
    Digest,
    /// The image signature does not verify over the digest.
    #[error("the image signature does not verify")]
    ImageSignature,
}

/// The SHA-512 of `image`: the message of the image signature.
pub fn image_digest(image: &[u8]) -> [u8; 64] {
    let mut d = [0u8; 64];
    d.copy_from_slice(&Sha512::digest(image));
    d
}

/// Signs `image` as `spec` says: the image signature (Ed25519 over SHA-512(image), what
/// embassy-boot verifies) and the manifest signature. Deterministic: the same key, image and
/// spec give the same bytes. Checks its own result with [`verify_release`].
pub fn sign_release(key: &SigningKey, image: &[u8], spec: &ReleaseSpec) -> Result<Manifest> {
    let image_size = u32::try_from(image.len())
        .map_err(|_| Error::InvalidInput("an image is at most 4 GiB (embassy-boot counts in u32)".into()))?;
    if image_size == 0 {
        return Err(Error::InvalidInput("the image is empty".into()));
    }
    if spec.min_version >= spec.version {
        return Err(Error::InvalidInput(format!(
            "the minimum version {} is not below the version {}: no device could install it",
            spec.min_version, spec.version
        )));
    }
    let public = key.public_key();
    let image_sha512 = image_digest(image);
    let mut m = Manifest {
        image_size,
        version: spec.version,
        min_version: spec.min_version,
        board: spec.board,
        key_id: public.key_id(),
        image_sha512,
        image_signature: key.sign(&image_sha512),
        manifest_signature: [0; 64],
    };
    m.manifest_signature = key.sign(&m.signed_part());
    verify_release(&public, &m, image)
        .map_err(|e| Error::InvalidInput(format!("the release just signed does not verify: {e}")))?;
    Ok(m)
}

/// Checks a release as a device does before it marks the image for swap: the manifest is
/// signed by `key`, and `image` has the manifest's size and digest and carries a valid image
/// signature. (The device's own rules, board and versions, are [`Manifest::check_offer`].)
pub fn verify_release(
    key: &FirmwarePublicKey,
    manifest: &Manifest,
    image: &[u8],
) -> std::result::Result<(), ReleaseCheck> {
    if manifest.key_id != key.key_id() {
        return Err(ReleaseCheck::OtherKey(hex::encode(manifest.key_id)));
    }
    if !key.verifies(&manifest.signed_part(), &manifest.manifest_signature) {
        return Err(ReleaseCheck::ManifestSignature);
    }
    if image.len() != manifest.image_size as usize {
        return Err(ReleaseCheck::Size { actual: image.len(), stated: manifest.image_size });
    }
    let digest = image_digest(image);
    if digest != manifest.image_sha512 {
        return Err(ReleaseCheck::Digest);
    }
    if !key.verifies(&digest, &manifest.image_signature) {
        return Err(ReleaseCheck::ImageSignature);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> ReleaseSpec {
        ReleaseSpec {
            version: Version::new(1, 2, 0),
            min_version: Version::ZERO,
            board: Board::parse("mps2-an386").unwrap(),
        }
    }

    /// RFC 8032 §7.1 TEST 1 (empty message), through the PKCS#8 v1 form OpenSSL writes: the
    /// signing primitive is plain Ed25519.
    #[test]
    fn rfc8032_vector_through_an_openssl_style_key() {
        let seed = hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60").unwrap();
        let mut der = PKCS8_V1_PREFIX.to_vec();
        der.extend_from_slice(&seed);
        let key = SigningKey::from_pem(crate::pki::pem_encode("PRIVATE KEY", &der).as_bytes()).unwrap();
        assert_eq!(
            hex::encode(key.public_key().as_bytes()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        assert_eq!(
            hex::encode(key.sign(b"")),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
        let pem = key.public_key().to_pem();
        assert_eq!(FirmwarePublicKey::from_pem(&pem), Some(key.public_key()));
    }

    #[test]
    fn a_release_signs_the_sha512_digest_and_its_manifest() {
        let (key, pem) = SigningKey::generate().unwrap();
        assert_eq!(SigningKey::from_pem(pem.as_bytes()).unwrap().public_key(), key.public_key());
        let image = b"firmware image bytes".repeat(100);
        let m = sign_release(&key, &image, &spec()).unwrap();
        let public = key.public_key();
        assert_eq!(m.image_sha512, image_digest(&image));
        assert!(public.verifies(&image_digest(&image), &m.image_signature));
        assert!(
            !public.verifies(&image, &m.image_signature),
            "the signature is over the digest, not the image"
        );
        assert_eq!(sign_release(&key, &image, &spec()).unwrap(), m, "deterministic");
        assert_eq!(Manifest::decode(&m.encode()), Ok(m.clone()));

        let mut tampered = image.clone();
        tampered[7] ^= 1;
        assert_eq!(verify_release(&public, &m, &tampered), Err(ReleaseCheck::Digest));
        let mut forged = m.clone();
        forged.version = Version::new(9, 0, 0);
        assert_eq!(verify_release(&public, &forged, &image), Err(ReleaseCheck::ManifestSignature));
        let (other, _) = SigningKey::generate().unwrap();
        assert!(matches!(verify_release(&other.public_key(), &m, &image), Err(ReleaseCheck::OtherKey(_))));
    }

    #[test]
    fn empty_images_and_impossible_minimum_versions_are_refused() {
        let (key, _) = SigningKey::generate().unwrap();
        assert!(sign_release(&key, b"", &spec()).is_err());
        let s = ReleaseSpec { min_version: Version::new(1, 2, 0), ..spec() };
        assert!(sign_release(&key, b"x", &s).is_err());
    }
}
