//! The firmware's console: one line per event on the semihosting console, prefixed
//! `FLEETGATE:` for tests to read, and the exit status for QEMU.

/// Prints a line (nothing in the `minimal` build, for size figures: no `core::fmt` there).
#[cfg(not(feature = "minimal"))]
pub(crate) fn say(args: core::fmt::Arguments<'_>) {
    use core::fmt::Write as _;
    if let Ok(mut out) = cortex_m_semihosting::hio::hstdout() {
        let _ = out.write_fmt(format_args!("FLEETGATE: {args}\n"));
    }
}

/// The `minimal` build prints nothing.
#[cfg(feature = "minimal")]
pub(crate) fn say(_: core::fmt::Arguments<'_>) {}

/// `say!("...", args)`: a formatted console line.
macro_rules! say {
    ($($t:tt)*) => { $crate::console::say(format_args!($($t)*)) };
}

/// Ends the program: QEMU exits with status 0 (`ok`) or 1.
pub(crate) fn exit(ok: bool) -> ! {
    use cortex_m_semihosting::debug;
    debug::exit(if ok { debug::EXIT_SUCCESS } else { debug::EXIT_FAILURE });
    #[allow(clippy::empty_loop)]
    loop {}
}
