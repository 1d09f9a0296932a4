//! Builds and shows the QEMU board's update flash file (`fleet_tests::ota_flash`), to run the
//! A/B bootloader by hand:
//!
//! ```text
//! cargo run -p fleet-tests --example ota_flash -- build --dir /tmp/board \
//!     --app firmware-examples/qemu-mps2-an386/target/ota/thumbv7em-none-eabihf/release/fleet-firmware-mps2-an386 \
//!     --version 1.0.0 --update 2.0.0
//! cargo run -p fleet-tests --example ota_flash -- show /tmp/board/fleet-flash.bin
//! ```
//!
//! `build` stamps the application with `--version` into ACTIVE and, with `--update`, the same
//! build stamped with that version into DFU, marked for the swap through embassy-boot's ed25519
//! check. The signing key is made for this run and forgotten: its public half is stamped into
//! both images, so the update verifies and nothing later can be signed with it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleet_tests::ota_flash::{self, FlashFile, Image, OtaFlashError};

#[derive(Parser)]
#[command(about = "The QEMU board's update flash file for its A/B bootloader")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A new flash file: the application in ACTIVE, optionally an update in DFU marked for the swap.
    Build {
        /// Directory for the file (QEMU's working directory when it runs the bootloader).
        #[arg(long)]
        dir: PathBuf,
        /// The application ELF (built with `--features ota`).
        #[arg(long)]
        app: PathBuf,
        /// Version stamped into the image in ACTIVE.
        #[arg(long)]
        version: String,
        /// Version stamped into the same build placed in DFU and marked for the swap.
        #[arg(long)]
        update: Option<String>,
    },
    /// The bootloader state and the versions in ACTIVE and DFU.
    Show { file: PathBuf },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ota_flash: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<(), OtaFlashError> {
    match cmd {
        Cmd::Build { dir, app, version, update } => {
            let key = ota_flash::generate_key();
            let app = Image::from_elf(&app)?;
            let path = dir.join(ota_flash::FLASH_FILE);
            let flash = FlashFile::create(&path, &app.stamped(&version, &key)?)?;
            if let Some(v) = update {
                let next = app.stamped(&v, &key)?;
                flash.place_update(&next)?;
                flash.mark_update(
                    key.verifying_key().as_bytes(),
                    &ota_flash::sign(&next, &key),
                    next.len(),
                )?;
            }
            println!("{}", path.display());
            show(&flash)
        }
        Cmd::Show { file } => show(&FlashFile::open(&file)),
    }
}

fn show(flash: &FlashFile) -> Result<(), OtaFlashError> {
    let version = |bytes: Vec<u8>| ota_flash::image_version(&bytes).unwrap_or_else(|| "no image".to_owned());
    println!("state:  {:?}", flash.state()?);
    println!("ACTIVE: {}", version(flash.active(ota_flash::ACTIVE_SIZE)?));
    println!("DFU:    {}", version(flash.dfu(ota_flash::ACTIVE_SIZE)?));
    Ok(())
}
