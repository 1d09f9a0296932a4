//! The A/B bootloader of the QEMU board (embassy-boot 0.7): the only `-kernel` image of the
//! bootloaded build.
//!
//! At every boot it opens the update flash (a host file over semihosting, `host_flash`), lets
//! embassy-boot finish what the state partition asks for (swap in a marked update, or revert an
//! update that was never confirmed, both resumable after a power cut), copies ACTIVE into the
//! execution region (`ota_layout::EXEC_ADDR`, code memory that QEMU's loader never writes) and
//! starts the application there. Why not run ACTIVE in place: see `ota_layout.rs`.
//!
//! One line per step on the semihosting console, prefixed `FLEETGATE: bootloader:`. No
//! `core::fmt`: the bootloader stays small.
#![no_std]
#![no_main]

#[path = "../host_flash.rs"]
mod host_flash;
#[path = "../ota_layout.rs"]
#[allow(dead_code)] // the application's part of the layout
mod ota_layout;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hio, syscall};
use embassy_boot::{AlignedBuffer, BootLoader, BootLoaderConfig, State};
use embedded_storage::nor_flash::ReadNorFlash;
use host_flash::{ActiveFlash, DfuFlash, HostFlash, StateFlash};
use ota_layout::{ACTIVE_OFFSET, ACTIVE_SIZE, DFU_OFFSET, EXEC_ADDR, PAGE, STATE_OFFSET};

/// RAM of the board (the application's initial stack pointer must lie in it).
const RAM: core::ops::Range<u32> = 0x2000_0000..0x2040_0000;

fn say(parts: &[&str]) {
    if let Ok(mut out) = hio::hstdout() {
        let _ = out.write_all(b"FLEETGATE: bootloader: ");
        for p in parts {
            let _ = out.write_all(p.as_bytes());
        }
        let _ = out.write_all(b"\n");
    }
}

fn fail(why: &str) -> ! {
    say(&["cannot boot: ", why]);
    debug::exit(debug::EXIT_FAILURE);
    #[allow(clippy::empty_loop)]
    loop {}
}

/// Centiseconds since QEMU started (SYS_CLOCK).
fn clock_centis() -> u32 {
    // SAFETY: SYS_CLOCK takes no argument block.
    unsafe { syscall!(CLOCK) as u32 }
}

/// `n` in decimal.
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    core::str::from_utf8(&buf[i..]).unwrap_or("?")
}

/// `HostFlash::open` failed.
fn no_flash<T>(_: host_flash::FlashError) -> T {
    fail("cannot open the update flash file (fleet-flash.bin in QEMU's working directory)")
}

#[entry]
fn main() -> ! {
    let t0 = clock_centis();
    let (found, now, mut active) = {
        let active: ActiveFlash = HostFlash::open(ACTIVE_OFFSET).unwrap_or_else(no_flash);
        let dfu: DfuFlash = HostFlash::open(DFU_OFFSET).unwrap_or_else(no_flash);
        let state: StateFlash = HostFlash::open(STATE_OFFSET).unwrap_or_else(no_flash);
        let mut boot = BootLoader::new(BootLoaderConfig { active, dfu, state });
        let mut buf = AlignedBuffer([0u8; PAGE as usize]);
        // `prepare_boot` returns the state it found (`Swap` both when it swaps and when it
        // reverts); the state word afterwards tells which it did.
        let (found, now) =
            match boot.prepare_boot(buf.as_mut()).and_then(|f| Ok((f, boot.read_state(buf.as_mut())?))) {
                Ok(s) => s,
                Err(_) => fail("the swap or revert failed (update flash error)"),
            };
        // The partitions are closed with `boot`; ACTIVE is read once more for the copy.
        drop(boot);
        (found, now, HostFlash::<ACTIVE_SIZE>::open(ACTIVE_OFFSET).unwrap_or_else(no_flash))
    };
    say(&[match (found, now) {
        (State::Swap, State::Swap) => {
            "swapped the update into ACTIVE: trial boot, the image must confirm itself"
        }
        (State::Swap, _) => "the update was never confirmed: reverted ACTIVE to the previous image",
        (State::Revert, _) => "ACTIVE as it is (reverted at an earlier boot, not confirmed since)",
        (State::DfuDetach, _) => "DFU detach requested (not supported here): ACTIVE as it is",
        (State::Boot, _) => "ACTIVE as it is",
    }]);
    // The image's first two vectors, checked before anything runs.
    let mut vectors = [0u8; 8];
    if active.read(0, &mut vectors).is_err() {
        fail("cannot read ACTIVE");
    }
    let word = |i: usize| u32::from_le_bytes([vectors[i], vectors[i + 1], vectors[i + 2], vectors[i + 3]]);
    let (sp, reset) = (word(0), word(4));
    let exec = EXEC_ADDR..EXEC_ADDR + ACTIVE_SIZE;
    if !(RAM.start < sp && sp <= RAM.end && exec.contains(&(reset & !1)) && reset & 1 == 1) {
        fail("no bootable image in ACTIVE");
    }
    let mut a = [0u8; 10];
    let mut b = [0u8; 10];
    say(&[
        "starting the application at 0x",
        hex(EXEC_ADDR, &mut a),
        " (",
        decimal(clock_centis().wrapping_sub(t0).saturating_mul(10), &mut b),
        " ms in the bootloader before the copy)",
    ]);
    start_application(active)
}

/// `n` in hexadecimal, 8 digits.
fn hex(n: u32, buf: &mut [u8; 10]) -> &str {
    for (i, b) in buf[..8].iter_mut().enumerate() {
        let d = (n >> (28 - 4 * i)) & 0xf;
        *b = if d < 10 { b'0' + d as u8 } else { b'a' + (d - 10) as u8 };
    }
    core::str::from_utf8(&buf[..8]).unwrap_or("?")
}

/// Copies ACTIVE (its vectors checked) into the execution region and hands the core to it: its
/// vector table becomes the core's (VTOR), its initial stack pointer the MSP, and its reset
/// handler runs. The bootloader's only unsafe code apart from semihosting calls; never returns.
fn start_application(mut active: ActiveFlash) -> ! {
    // SAFETY: `EXEC_ADDR..EXEC_ADDR + ACTIVE_SIZE` is mapped, writable code memory (SSRAM1)
    // that no part of the bootloader occupies (bootloader.x fails the link if its image reaches
    // EXEC_ADDR; its RAM is at 0x2000_0000) and that nothing references. After the copy it holds
    // ACTIVE whole, whose first two vectors were checked (stack pointer in RAM, Thumb reset
    // handler inside the region). The bootloader enabled no interrupt and leaves nothing that
    // the application relies on: its stack is abandoned (the MSP is reloaded from the table),
    // its partitions are closed. The barriers make the copied code and the new VTOR visible
    // before the branch.
    unsafe {
        if active.read_to_address(EXEC_ADDR as usize, ACTIVE_SIZE as usize).is_err() {
            fail("cannot read ACTIVE");
        }
        drop(active);
        let p = cortex_m::Peripherals::steal();
        p.SCB.vtor.write(EXEC_ADDR);
        cortex_m::asm::dsb();
        cortex_m::asm::isb();
        cortex_m::asm::bootload(EXEC_ADDR as *const u32)
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    fail("panic")
}
