//! Cross-check of the SDK's P-256 on the Cortex-M4F (QEMU mps2-an386): `p256-cm4` (what
//! `fleet_device::tls::ecc` uses on this target) against the generic RustCrypto `p256`, both
//! ways, on random keys and digests, plus tampered signatures; and the cost of each in core
//! ticks (x40 = instructions under `qemu -icount shift=0`). Exits 0 when every case agrees.
//!
//! Also hostile inputs both must refuse the same way: random "public keys" (off the curve),
//! `r` or `s` zero, equal to the group order or all ones. `scripts/fuzz` runs it with thousands
//! of cases: `qemu-system-arm ... -device loader,addr=0x003f0000,data=CASES,data-len=4`
//! (default 64).
//!
//! First, an independent judge: the Wycheproof ECDSA P-256/SHA-256 vectors
//! (device/tests/data/wycheproof/, a table made by build.rs) through `ecc::verify_der`, the
//! SDK's check of the broker's signatures; every verdict must be Wycheproof's.
#![no_std]
#![no_main]

#[path = "../qemu_ldm.rs"]
mod qemu_ldm;
#[path = "../semihost.rs"]
#[allow(dead_code)]
mod semihost;
#[path = "../systick.rs"]
mod systick;
#[path = "../ticks.rs"]
mod ticks;

use core::fmt::Write as _;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hio};
use fleet_device::tls::ecc;
use p256::ecdsa::signature::hazmat::{PrehashSigner as _, PrehashVerifier as _};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use rand_core::{RngCore, SeedableRng};

fn say(args: core::fmt::Arguments<'_>) {
    if let Ok(mut out) = hio::hstdout() {
        let _ = out.write_fmt(format_args!("CROSSCHECK: {args}\n"));
    }
}

macro_rules! say {
    ($($t:tt)*) => { say(format_args!($($t)*)) };
}

/// The case count: a u32 QEMU's loader puts at the start of the (otherwise unused) credentials
/// region (`-device loader,addr=0x003f0000,data=CASES,data-len=4`); 64 when none is there.
fn cases() -> u32 {
    // SAFETY: 0x003f0000 is mapped code memory on mps2-an386 (memory.x), aligned, only read.
    let n = unsafe { core::ptr::read_volatile(0x003f_0000 as *const u32) };
    if n == 0 || n == u32::MAX {
        64
    } else {
        n
    }
}

/// The group order n, big-endian.
const N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xbc,
    0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// Does the generic code accept `rs` over `digest` with `key`?
fn generic_accepts(key: &[u8; 65], digest: &[u8; 32], rs: &[u8; 64]) -> bool {
    let (Ok(vk), Ok(sig)) = (VerifyingKey::from_sec1_bytes(key), Signature::from_slice(rs)) else {
        return false;
    };
    vk.verify_prehash(digest, &sig).is_ok()
}

/// Hostile inputs: both implementations must refuse them alike. Returns the disagreements.
fn hostile(rng: &mut impl RngCore, key: &[u8; 65], digest: &[u8; 32], good: &[u8; 64]) -> u32 {
    let mut bad = 0;
    let mut check = |k: &[u8; 65], rs: &[u8; 64]| {
        if ecc::verify_digest(k, digest, rs) != generic_accepts(k, digest, rs) {
            bad += 1;
        }
    };
    // A random point encoding: off the curve (almost surely).
    let mut off = [4u8; 65];
    rng.fill_bytes(&mut off[1..]);
    check(&off, good);
    // The right point with a flipped y: on no curve point.
    let mut flipped = *key;
    flipped[64] ^= 1;
    check(&flipped, good);
    for half in [0usize, 32] {
        for value in [[0u8; 32], N, [0xff; 32]] {
            let mut rs = *good;
            rs[half..half + 32].copy_from_slice(&value);
            check(key, &rs);
        }
    }
    bad
}

/// The Wycheproof table (build.rs): `tcId: u16`, `valid: u8`, key (65), `msg_len: u16`, msg,
/// `sig_len: u16`, DER signature; little-endian.
static WYCHEPROOF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/wycheproof.bin"));

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, rest) = r.split_at_checked(n)?;
    *r = rest;
    Some(head)
}

fn take_u16(r: &mut &[u8]) -> Option<u16> {
    take(r, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
}

/// Runs every Wycheproof vector through `ecc::verify_der`: (vectors, disagreements).
fn wycheproof() -> (u32, u32) {
    let (mut vectors, mut bad) = (0u32, 0u32);
    let mut r = WYCHEPROOF;
    while !r.is_empty() {
        let mut one = || -> Option<(u16, bool, bool)> {
            let id = take_u16(&mut r)?;
            let valid = take(&mut r, 1)?[0] == 1;
            let key = take(&mut r, 65)?;
            let len = take_u16(&mut r)?;
            let msg = take(&mut r, usize::from(len))?;
            let len = take_u16(&mut r)?;
            let sig = take(&mut r, usize::from(len))?;
            Some((id, valid, ecc::verify_der(key, msg, sig)))
        };
        let Some((id, expected, got)) = one() else {
            say!("wycheproof: the vector table is truncated");
            return (vectors, bad + 1);
        };
        vectors += 1;
        if got != expected {
            say!("wycheproof vector {id}: verify_der says {got}, Wycheproof {expected}");
            bad += 1;
        }
    }
    (vectors, bad)
}

/// Ticks of the cheapest of the runs: (ecc sign, ecc verify, generic sign, generic verify).
#[derive(Default)]
struct Cost([u64; 4]);

impl Cost {
    fn time<T>(&mut self, which: usize, f: impl FnOnce() -> T) -> T {
        let t0 = ticks::now();
        let out = f();
        let t = ticks::now() - t0;
        if self.0[which] == 0 || t < self.0[which] {
            self.0[which] = t;
        }
        out
    }
}

#[entry]
fn main() -> ! {
    if let Some(mut p) = cortex_m::Peripherals::take() {
        qemu_ldm::enable(&mut p.SCB);
        ticks::start(p.SYST);
    }
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(semihost::host_entropy());
    let (vectors, wrong) = wycheproof();
    say!("wycheproof: {vectors} vectors, {wrong} disagreements");
    let cases = cases();
    let mut cost = Cost::default();
    let mut failures = wrong;
    for case in 0..cases {
        let mut secret = [0u8; 32];
        let mut digest = [0u8; 32];
        rng.fill_bytes(&mut secret);
        rng.fill_bytes(&mut digest);
        let Ok(generic) = SigningKey::from_bytes(&secret.into()) else { continue };
        let generic_pub = generic.verifying_key().to_encoded_point(false);
        let Some(fast_pub) = ecc::public_key(&secret) else {
            say!("case {case}: no public key for a valid scalar");
            failures += 1;
            continue;
        };
        let vk = VerifyingKey::from_sec1_bytes(&fast_pub).ok();
        let mut ok = fast_pub[..] == *generic_pub.as_bytes() && vk.is_some();
        // ecc signs, the generic code verifies.
        let rs = cost.time(0, || ecc::sign_digest(&secret, &digest));
        let sig = rs.and_then(|rs| Signature::from_slice(&rs).ok());
        ok &= sig.zip(vk).is_some_and(|(s, vk)| cost.time(3, || vk.verify_prehash(&digest, &s)).is_ok());
        // The generic code signs, ecc verifies.
        let theirs: Option<Signature> = cost.time(2, || generic.sign_prehash(&digest).ok());
        let theirs: [u8; 64] = theirs.map(|s| s.to_bytes().into()).unwrap_or([0; 64]);
        ok &= cost.time(1, || ecc::verify_digest(&fast_pub, &digest, &theirs));
        // Tampering is caught by both.
        let mut bad = theirs;
        bad[usize::try_from(rng.next_u32() % 64).unwrap_or(0)] ^= 1 << (rng.next_u32() % 8);
        ok &= !ecc::verify_digest(&fast_pub, &digest, &bad);
        let mut other = digest;
        other[0] ^= 0x80;
        ok &= !ecc::verify_digest(&fast_pub, &other, &theirs);
        ok &= hostile(&mut rng, &fast_pub, &digest, &theirs) == 0;
        if !ok {
            say!("case {case}: the implementations disagree");
            failures += 1;
        }
    }
    let [s, v, gs, gv] = cost.0;
    say!("p256-cm4 in use: {}", ecc::FAST);
    say!("ticks (x40 = instructions): sign {s}, verify {v}; generic p256: sign {gs}, verify {gv}");
    say!("{cases} cases, {} disagreements", failures - wrong);
    debug::exit(if failures == 0 { debug::EXIT_SUCCESS } else { debug::EXIT_FAILURE });
    #[allow(clippy::empty_loop)]
    loop {}
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    say!("panic: {info}");
    debug::exit(debug::EXIT_FAILURE);
    #[allow(clippy::empty_loop)]
    loop {}
}
