//! P-256 ECDSA for the handshake: sign a digest, verify a signature.
//!
//! On Cortex-M4/M7 (`thumbv7em-none-eabi`, `thumbv7em-none-eabihf`) this
//! is `p256-cm4`: Emil Lenngren's assembly-tuned field arithmetic, about 18× faster than the
//! generic code and a fifth of its flash. Everywhere else (Cortex-M0+, RISC-V, hosts) and with
//! the `p256-generic` feature it is the RustCrypto `p256` crate. Both sides take and give the
//! same bytes (digest, SEC1 public key, `r ‖ s`), so callers never see which one runs; the QEMU
//! cross-check (`firmware-examples/qemu-mps2-an386`, `--bin crosscheck`) signs and verifies with
//! each against the other.

/// Is the assembly implementation in use on this target?
pub const FAST: bool = cfg!(p256_cm4);

/// ECDSA P-256 signature over `digest` (SHA-256 of the message) with the secret scalar
/// `secret` (big-endian). The nonce is derived from the key, the digest and a counter (RFC 6979
/// in spirit; `p256` uses RFC 6979 itself), so no RNG is needed. `None` if `secret` is not a
/// valid scalar.
pub fn sign_digest(secret: &[u8; 32], digest: &[u8; 32]) -> Option<[u8; 64]> {
    imp::sign_digest(secret, digest)
}

/// Verifies `r ‖ s` over `digest` with the uncompressed SEC1 public key `key`.
pub fn verify_digest(key: &[u8; 65], digest: &[u8; 32], rs: &[u8; 64]) -> bool {
    imp::verify_digest(key, digest, rs)
}

/// The uncompressed SEC1 public key of `secret`, or `None` if it is not a valid scalar.
pub fn public_key(secret: &[u8; 32]) -> Option<[u8; 65]> {
    imp::public_key(secret)
}

/// Verifies a DER-encoded ECDSA signature over `msg` (hashed here with SHA-256).
pub fn verify_der(key: &[u8], msg: &[u8], der: &[u8]) -> bool {
    use sha2::Digest as _;
    let (Ok(key), Ok(sig)) = (<&[u8; 65]>::try_from(key), p256::ecdsa::Signature::from_der(der)) else {
        return false;
    };
    let digest: [u8; 32] = sha2::Sha256::digest(msg).into();
    verify_digest(key, &digest, &sig.to_bytes().into())
}

#[cfg(not(p256_cm4))]
mod imp {
    use p256::ecdsa::signature::hazmat::{PrehashSigner as _, PrehashVerifier as _};
    use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

    pub(super) fn sign_digest(secret: &[u8; 32], digest: &[u8; 32]) -> Option<[u8; 64]> {
        let key = SigningKey::from_bytes(secret.into()).ok()?;
        let sig: Signature = key.sign_prehash(digest).ok()?;
        Some(sig.to_bytes().into())
    }

    pub(super) fn verify_digest(key: &[u8; 65], digest: &[u8; 32], rs: &[u8; 64]) -> bool {
        let (Ok(key), Ok(sig)) = (VerifyingKey::from_sec1_bytes(key), Signature::from_slice(rs)) else {
            return false;
        };
        key.verify_prehash(digest, &sig).is_ok()
    }

    pub(super) fn public_key(secret: &[u8; 32]) -> Option<[u8; 65]> {
        let key = SigningKey::from_bytes(secret.into()).ok()?;
        let point = key.verifying_key().to_encoded_point(false);
        point.as_bytes().try_into().ok()
    }
}

#[cfg(p256_cm4)]
mod imp {
    use sha2::Digest as _;

    /// Big-endian bytes to p256-cm4's little-endian 32-bit words.
    fn words(be: &[u8; 32]) -> [u32; 8] {
        let mut w = [0u32; 8];
        for (i, chunk) in be.rchunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        w
    }

    fn bytes(w: &[u32; 8], out: &mut [u8]) {
        for (i, chunk) in out.rchunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&w[i].to_be_bytes());
        }
    }

    pub(super) fn sign_digest(secret: &[u8; 32], digest: &[u8; 32]) -> Option<[u8; 64]> {
        let d = words(secret);
        if !p256_cm4::check_range_n(&d) {
            return None;
        }
        // k = SHA-256(d ‖ digest ‖ counter), retried until it is a valid scalar and the
        // signature is non-degenerate (both: probability ~2^-32 per try).
        for counter in 0u32..16 {
            let mut h = sha2::Sha256::new();
            h.update(secret);
            h.update(digest);
            h.update(counter.to_be_bytes());
            let k = words(&h.finalize().into());
            let (mut r, mut s) = ([0u32; 8], [0u32; 8]);
            if p256_cm4::check_range_n(&k) && p256_cm4::sign(&mut r, &mut s, digest, &d, &k) {
                let mut rs = [0u8; 64];
                bytes(&r, &mut rs[..32]);
                bytes(&s, &mut rs[32..]);
                return Some(rs);
            }
        }
        None
    }

    pub(super) fn verify_digest(key: &[u8; 65], digest: &[u8; 32], rs: &[u8; 64]) -> bool {
        let (mut x, mut y) = ([0u32; 8], [0u32; 8]);
        if key[0] != 4 || !p256_cm4::octet_string_to_point(&mut x, &mut y, key) {
            return false;
        }
        let (mut r_be, mut s_be) = ([0u8; 32], [0u8; 32]);
        r_be.copy_from_slice(&rs[..32]);
        s_be.copy_from_slice(&rs[32..]);
        p256_cm4::verify(&x, &y, digest, &words(&r_be), &words(&s_be))
    }

    pub(super) fn public_key(secret: &[u8; 32]) -> Option<[u8; 65]> {
        let (mut x, mut y) = ([0u32; 8], [0u32; 8]);
        if !p256_cm4::keygen(&mut x, &mut y, &words(secret)) {
            return None;
        }
        let mut out = [0u8; 65];
        p256_cm4::point_to_octet_string_uncompressed(&mut out, &x, &y);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::hazmat::PrehashVerifier as _;

    #[test]
    fn signs_and_verifies_against_the_reference_code() {
        for i in 1u8..20 {
            let secret = [i; 32];
            let digest = [i.wrapping_mul(7); 32];
            let rs = sign_digest(&secret, &digest).expect("valid scalar");
            let key = public_key(&secret).expect("valid scalar");
            assert!(verify_digest(&key, &digest, &rs));
            let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&key).expect("point");
            let sig = p256::ecdsa::Signature::from_slice(&rs).expect("sig");
            assert!(vk.verify_prehash(&digest, &sig).is_ok());
            let mut bad = rs;
            bad[40] ^= 1;
            assert!(!verify_digest(&key, &digest, &bad));
        }
        assert!(sign_digest(&[0; 32], &[1; 32]).is_none(), "zero is no key");
        assert!(!verify_der(&[4; 64], b"m", &[0x30, 0]), "short key, bad DER");
    }

    fn hex(s: &str) -> Vec<u8> {
        assert!(s.len().is_multiple_of(2), "odd hex {s}");
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
    }

    /// The Wycheproof ECDSA P-256/SHA-256 vectors (tests/data/wycheproof/README.md) through the
    /// verifier the handshake uses: the test above compares `p256` with itself on the host, this
    /// one an independent judge. The same vectors run on `p256-cm4` in QEMU (`crosscheck`).
    #[test]
    fn wycheproof_ecdsa_p256_sha256() {
        let text = include_str!("../../tests/data/wycheproof/ecdsa_secp256r1_sha256_test.json");
        let file: serde_json::Value = serde_json::from_str(text).expect("JSON");
        let (mut valid, mut invalid, mut wrong) = (0, 0, Vec::new());
        for group in file["testGroups"].as_array().expect("testGroups") {
            assert_eq!(group["sha"], "SHA-256");
            assert_eq!(group["publicKey"]["curve"], "secp256r1");
            let key = hex(group["publicKey"]["uncompressed"].as_str().expect("key"));
            for t in group["tests"].as_array().expect("tests") {
                let id = &t["tcId"];
                let expected = match t["result"].as_str().expect("result") {
                    "valid" => true,
                    "invalid" => false,
                    // None in this file; a new one needs a decision recorded in the README.
                    other => panic!("vector {id}: result {other:?} has no documented verdict"),
                };
                let msg = hex(t["msg"].as_str().expect("msg"));
                let sig = hex(t["sig"].as_str().expect("sig"));
                if verify_der(&key, &msg, &sig) != expected {
                    wrong.push(format!("{id} ({}, expected {expected})", t["comment"]));
                }
                if expected {
                    valid += 1;
                } else {
                    invalid += 1;
                }
            }
        }
        assert!(wrong.is_empty(), "verdicts that differ from Wycheproof's: {wrong:#?}");
        assert_eq!((valid, invalid), (174, 310), "the vendored file's vector counts");
    }
}
