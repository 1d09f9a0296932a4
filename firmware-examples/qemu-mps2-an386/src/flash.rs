//! The 64 KiB credentials region as the device's credential store: the factory writes
//! `credentials.bin` (a device identity, or a batch claim) at its start; the firmware keeps its
//! own identities in two slots after it (A/B, see `fleet_device::store`), so a rotation or a
//! first boot never overwrites the factory bundle, and a write cut by a power loss never bricks
//! the device.
//!
//! On this board the region is RAM-like code memory (QEMU's SSRAM): programming is a volatile
//! byte copy. A real MCU erases and programs its flash sectors here instead.

use fleet_device::store::{Slot, SlotStorage};

/// Bytes per slot (a bundle is ~1.1 KiB).
pub(crate) const SLOT: usize = 2048;
/// Slot A starts 16 KiB into the region, slot B 32 KiB into it.
const SLOT_A: usize = 16 * 1024;
const SLOT_B: usize = 32 * 1024;

fn base() -> usize {
    crate::semihost::credentials_base()
}

/// The factory's part of the region (a bundle; its own length is in its header).
pub(crate) fn factory() -> &'static [u8] {
    crate::semihost::factory_part(SLOT_A)
}

/// The two slots.
#[derive(Debug)]
pub(crate) struct Slots;

fn offset(slot: Slot) -> usize {
    match slot {
        Slot::A => SLOT_A,
        Slot::B => SLOT_B,
    }
}

impl SlotStorage for Slots {
    type Error = ();

    fn slot_size(&self) -> usize {
        SLOT
    }

    fn read(&mut self, slot: Slot, buf: &mut [u8]) -> Result<(), ()> {
        if buf.len() > SLOT {
            return Err(());
        }
        let at = base() + offset(slot);
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: inside the slot, in the mapped credentials region (memory.x); the firmware
            // holds no reference into the slots, only copies.
            *b = unsafe { core::ptr::read_volatile((at + i) as *const u8) };
        }
        Ok(())
    }

    fn write(&mut self, slot: Slot, data: &[u8]) -> Result<(), ()> {
        if data.len() > SLOT {
            return Err(());
        }
        let at = base() + offset(slot);
        for i in 0..SLOT {
            let b = data.get(i).copied().unwrap_or(0xff); // erased bytes after the data
                                                          // SAFETY: `at..at + SLOT` lies inside the 64 KiB credentials region (memory.x),
                                                          // which is writable memory on this board and never part of the firmware image; no
                                                          // reference into a slot is alive across this write (reads copy out).
            unsafe { core::ptr::write_volatile((at + i) as *mut u8, b) };
        }
        Ok(())
    }
}
