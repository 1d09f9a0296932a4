//! The SDK's signature check (`tls::ecc::verify_der`, used for the broker's certificate and its
//! CertificateVerify) never panics, and agrees with the RustCrypto reference on every input:
//! the first 65 bytes are the key, the next byte splits message and DER signature. On Cortex-M4
//! the same function runs on `p256-cm4`; that side is cross-checked in QEMU (`scripts/fuzz`).
#![no_main]
use fleet_device::tls::ecc;
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::signature::Verifier as _;

fuzz_target!(|data: &[u8]| {
    if data.len() < 66 {
        let _ = ecc::verify_der(data, data, data);
        return;
    }
    let (key, rest) = data.split_at(65);
    let split = usize::from(rest[0]).min(rest.len() - 1);
    let (msg, der) = rest[1..].split_at(split);
    let ours = ecc::verify_der(key, msg, der);
    let reference = p256::ecdsa::VerifyingKey::from_sec1_bytes(key)
        .ok()
        .zip(p256::ecdsa::Signature::from_der(der).ok())
        .is_some_and(|(k, s)| k.verify(msg, &s).is_ok());
    // A 65-byte key is the uncompressed form the SDK accepts; the reference takes the same.
    assert_eq!(ours, reference && key[0] == 4, "verify_der disagrees with p256");
});
