//! Peak stack measurement by painting: fill the unused stack below the current frame with a
//! pattern before the work, and afterwards find the deepest word that was overwritten.

const PATTERN: u32 = 0xCAFE_F00D;
/// How far below the painting frame to paint (the board has 4 MiB of RAM; the SDK needs far less).
const DEPTH: usize = 256 * 1024;
/// Left alone just below the painting frame (this function's own frame).
const GUARD: usize = 512;

fn here() -> usize {
    let marker = 0u32;
    core::ptr::addr_of!(marker) as usize
}

/// Paints the stack below the caller; returns the top address used as the reference.
#[inline(never)]
pub(crate) fn paint() -> usize {
    let top = here() - GUARD;
    let mut p = top - DEPTH;
    while p < top {
        // SAFETY: [top - DEPTH, top) is stack memory below every live frame (RAM is 4 MiB and
        // nothing else is placed there); it is not in use while we paint it.
        unsafe { core::ptr::write_volatile(p as *mut u32, PATTERN) };
        p += 4;
    }
    top
}

/// Bytes of stack used below `top` since `paint`.
pub(crate) fn used(top: usize) -> usize {
    let mut p = top - DEPTH;
    // SAFETY: reads of the region painted above, which is mapped RAM.
    while p < top && unsafe { core::ptr::read_volatile(p as *const u32) } == PATTERN {
        p += 4;
    }
    top - p
}
