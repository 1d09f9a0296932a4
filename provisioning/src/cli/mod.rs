//! The binary's side of `fleet-provision` (not part of the library): [`commands`] runs each
//! command and returns a value; [`report`] prints it. `main.rs` parses the arguments and
//! dispatches between the two.

pub(crate) mod commands;
pub(crate) mod report;
