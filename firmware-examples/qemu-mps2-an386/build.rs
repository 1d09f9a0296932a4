//! Puts memory.x where the linker (cortex-m-rt's link.x) finds it, and turns the vendored
//! Wycheproof ECDSA P-256/SHA-256 vectors (device/tests/data/wycheproof/) into the compact table
//! `--bin crosscheck` runs on the Cortex-M4F: per vector, little-endian `tcId: u16`,
//! `valid: u8`, the 65-byte SEC1 key, `msg_len: u16`, msg, `sig_len: u16`, DER signature.
use std::{env, fs, path::PathBuf};

const WYCHEPROOF: &str = "../../device/tests/data/wycheproof/ecdsa_secp256r1_sha256_test.json";

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex {s}");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn len16(n: usize) -> [u8; 2] {
    u16::try_from(n).expect("vector field under 64 KiB").to_le_bytes()
}

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    fs::copy("memory.x", out.join("memory.x")).expect("copy memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");

    let text = fs::read_to_string(WYCHEPROOF).expect("read the Wycheproof vectors");
    let file: serde_json::Value = serde_json::from_str(&text).expect("Wycheproof JSON");
    let mut table = Vec::new();
    for group in file["testGroups"].as_array().expect("testGroups") {
        assert_eq!(group["sha"], "SHA-256");
        let key = hex(group["publicKey"]["uncompressed"].as_str().expect("key"));
        assert_eq!(key.len(), 65, "uncompressed SEC1 key");
        for t in group["tests"].as_array().expect("tests") {
            let id = u16::try_from(t["tcId"].as_u64().expect("tcId")).expect("tcId fits u16");
            let valid = match t["result"].as_str().expect("result") {
                "valid" => 1u8,
                "invalid" => 0,
                // None in the vendored file: a new one needs its verdict chosen and documented
                // (device/tests/data/wycheproof/README.md) before the firmware builds.
                other => panic!("vector {id}: result {other:?} has no documented verdict"),
            };
            let msg = hex(t["msg"].as_str().expect("msg"));
            let sig = hex(t["sig"].as_str().expect("sig"));
            table.extend_from_slice(&id.to_le_bytes());
            table.push(valid);
            table.extend_from_slice(&key);
            table.extend_from_slice(&len16(msg.len()));
            table.extend_from_slice(&msg);
            table.extend_from_slice(&len16(sig.len()));
            table.extend_from_slice(&sig);
        }
    }
    fs::write(out.join("wycheproof.bin"), table).expect("write the vector table");
    println!("cargo:rerun-if-changed={WYCHEPROOF}");
}
