//! `cfg(p256_cm4)`: the assembly-tuned P-256 (`p256-cm4`, a dependency for these triples in
//! Cargo.toml) applies to this target: Armv7E-M, i.e. Cortex-M4/M7.
fn main() {
    println!("cargo:rustc-check-cfg=cfg(p256_cm4)");
    println!("cargo:rerun-if-env-changed=TARGET");
    let target = std::env::var("TARGET").unwrap_or_default();
    let tls = std::env::var_os("CARGO_FEATURE_TLS").is_some();
    let generic = std::env::var_os("CARGO_FEATURE_P256_GENERIC").is_some();
    if tls && !generic && target.starts_with("thumbv7em-none-eabi") {
        println!("cargo:rustc-cfg=p256_cm4");
    }
}
