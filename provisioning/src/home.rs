//! Writing the station's home directory (its layout is [`fleet_registry::Home`]: CA
//! certificates, CA keys, the SQLite registry and the latest CRL). Private keys are written with mode 0600 under `private/` (0700), never
//! overwritten (files are created with `O_EXCL`), and device directories appear atomically
//! (written to a hidden temporary directory, then renamed).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub use fleet_registry::Home;

/// Fails unless `init` has run in `home`.
pub fn require_initialised(home: &Home) -> Result<()> {
    for (p, what) in [(home.device_ca(), "device-ca.pem"), (home.device_ca_key(), "private/device-ca.key")] {
        if !p.exists() {
            return Err(Error::NotInitialised(home.root().to_path_buf(), what));
        }
    }
    Ok(())
}

/// Reads a text file with the path in the error.
pub fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(Error::io(path))
}

/// Creates `path` (must not exist) with `contents`; `private` sets mode 0600.
pub fn write_new(path: &Path, contents: &[u8], private: bool) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(Error::io(path))?;
    f.write_all(contents).map_err(Error::io(path))?;
    Ok(())
}

/// Writes `path` atomically (temporary file + rename), replacing what was there.
pub fn write_replace(path: &Path, contents: &[u8]) -> Result<()> {
    write_replace_with(path, contents, false)
}

/// As [`write_replace`]; `private` makes the file mode 0600 (a key).
pub fn write_replace_with(path: &Path, contents: &[u8], private: bool) -> Result<()> {
    // A temporary name of its own: concurrent writers (two `revoke` runs) must never share,
    // delete or rename each other's temporary file.
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp =
        path.with_file_name(format!(".{name}.{}.{:016x}.tmp", std::process::id(), rand::random::<u64>()));
    write_new(&tmp, contents, private)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::Io { path: path.to_path_buf(), source: e }
    })
}

/// Creates a directory (and parents); `private` sets mode 0700 on the leaf.
pub fn create_dir(path: &Path, private: bool) -> Result<()> {
    fs::create_dir_all(path).map_err(Error::io(path))?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(Error::io(path))?;
    }
    Ok(())
}

/// Writes a set of files into `dir/name` so that the directory appears whole or not at all.
/// `files` are `(file name, contents, private)`.
pub fn write_dir_atomically(dir: &Path, name: &str, files: &[(&str, &[u8], bool)]) -> Result<PathBuf> {
    let target = dir.join(name);
    if target.exists() {
        return Err(Error::Io {
            path: target,
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists; refusing to overwrite",
            ),
        });
    }
    let tmp = dir.join(format!(".tmp-{name}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(Error::io(&tmp))?;
    }
    create_dir(&tmp, true)?;
    for (file, contents, private) in files {
        write_new(&tmp.join(file), contents, *private)?;
    }
    fs::rename(&tmp, &target).map_err(Error::io(&target))?;
    Ok(target)
}

/// Removes `.tmp-*` directories left by an interrupted run.
pub fn clean_partial_dirs(dir: &Path) -> Result<usize> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(0) };
    let mut n = 0;
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            fs::remove_dir_all(e.path()).map_err(Error::io(e.path()))?;
            n += 1;
        }
    }
    Ok(n)
}
