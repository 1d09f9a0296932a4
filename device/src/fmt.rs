//! One logging shim for the whole crate (embassy's `fmt.rs` pattern): `warn!`, `info!` and
//! `debug!` go to the `log` facade with the `log` feature, to `defmt` with the `defmt` feature,
//! and to nothing otherwise. Arguments are formatted with `{}`/`{:?}` as for `log`; under defmt
//! each is passed through `Debug2Format`, so every argument only needs `core::fmt::Debug`.
#![allow(unused_macros)]

macro_rules! fleet_log {
    ($level:ident, $s:literal $(, $x:expr)* $(,)?) => {{
        #[cfg(feature = "log")]
        ::log::$level!($s $(, $x)*);
        #[cfg(feature = "defmt")]
        ::defmt::$level!($s $(, $crate::fmt::Dbg(&$x))*);
        #[cfg(not(any(feature = "log", feature = "defmt")))]
        {
            let _ = ($(&$x,)*);
        }
    }};
}

macro_rules! warn {
    ($($t:tt)*) => { fleet_log!(warn, $($t)*) };
}

macro_rules! info {
    ($($t:tt)*) => { fleet_log!(info, $($t)*) };
}

macro_rules! debug {
    ($($t:tt)*) => { fleet_log!(debug, $($t)*) };
}

/// A `Debug` value shown through defmt.
#[cfg(feature = "defmt")]
pub(crate) struct Dbg<'a, T: core::fmt::Debug + ?Sized>(pub(crate) &'a T);

#[cfg(feature = "defmt")]
impl<T: core::fmt::Debug + ?Sized> defmt::Format for Dbg<'_, T> {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{}", defmt::Debug2Format(self.0));
    }
}
