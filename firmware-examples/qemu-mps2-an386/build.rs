//! Writes memory.x (the board's map, mps2-an386.x) where the linker (cortex-m-rt's link.x) finds
//! it, and turns the vendored
//! Wycheproof ECDSA P-256/SHA-256 vectors (device/tests/data/wycheproof/) into the compact table
//! `--bin crosscheck` runs on the Cortex-M4F: per vector, little-endian `tcId: u16`,
//! `valid: u8`, the 65-byte SEC1 key, `msg_len: u16`, msg, `sig_len: u16`, DER signature.
//!
//! With feature `ota` the image is the bootloaded application: its memory.x puts FLASH at the
//! execution region of `src/ota_layout.rs` (where the bootloader copies ACTIVE) instead of 0x0.
//! (The map is not named memory.x in the crate: the linker looks in its working directory, the
//! crate, before the search path, and would take that one for every build.)
//! `--bin bootloader` gets bootloader.x, which fails the link if the bootloader would reach
//! into that region.
use std::{env, fs, path::PathBuf};

#[allow(dead_code)] // build.rs uses the addresses only
mod layout {
    include!("src/ota_layout.rs");
}

/// The board's memory map (memory.x of the images linked at 0x0).
const BOARD: &str = "mps2-an386.x";
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
    let memory = fs::read_to_string(BOARD).expect("read the board's memory map");
    if env::var_os("CARGO_FEATURE__OTA").is_some() {
        let flash = memory.lines().find(|l| l.trim_start().starts_with("FLASH ")).expect("FLASH in the map");
        let app = format!(
            "  FLASH       : ORIGIN = {:#010x}, LENGTH = {}K",
            layout::EXEC_ADDR,
            layout::ACTIVE_SIZE / 1024
        );
        fs::write(out.join("memory.x"), memory.replace(flash, &app)).expect("write memory.x");
    } else {
        fs::write(out.join("memory.x"), memory).expect("write memory.x");
    }
    // The end of the bootloader's image in flash: .data's load address plus its size.
    fs::write(
        out.join("bootloader.x"),
        format!(
            "ASSERT(ORIGIN(FLASH) == 0 && __sidata + (__edata - __sdata) <= {:#x}, \"the bootloader must link at 0x0 \
             (build it without feature ota) and end below the execution region (ota_layout.rs)\");\n",
            layout::BOOTLOADER_MAX
        ),
    )
    .expect("write bootloader.x");
    println!("cargo:rustc-link-arg-bin=bootloader=-Tbootloader.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed={BOARD}");
    println!("cargo:rerun-if-changed=src/ota_layout.rs");

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
