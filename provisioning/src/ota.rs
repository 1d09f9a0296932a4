//! The station's side of firmware updates (docs/spec/ota.md): the image-signing key
//! (`firmware-key`) and signed releases (`release`, `releases`).
//!
//! The signing key is kept like the root CA key: made once, never overwritten, PKCS#8 PEM with
//! mode 0600 under `private/` (0700), and it can live offline: `release` reads it from
//! `HOME/private/firmware.key` or from wherever `--key` says (removable media), and signs only
//! with the key whose public half is `HOME/firmware.pub` — the one devices embed. Signing needs
//! no network: the registry is the home's SQLite file unless told otherwise.
//!
//! Every key and every release goes into the issuance log (`firmware-key`, `release`), and each
//! release into the `releases` table, before its files are written: nothing the key signed is
//! unrecorded. Signing is deterministic, so a run that stopped after recording writes the same
//! files when run again.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::{Error, Result};
use crate::firmware::{self, FirmwarePublicKey, Manifest, ReleaseSpec, SigningKey};
use crate::home;
use crate::station::{now, Station};
use fleet_registry::releases::Recorded;
use fleet_registry::{NewRelease, ReleaseFiles, ReleaseRecord};

/// The largest image `release` takes unless told otherwise (`--max-size`): 1 MiB.
pub const DEFAULT_MAX_IMAGE: u64 = 1 << 20;

/// What `firmware-key` made.
#[derive(Debug, Clone)]
pub struct FirmwareKeyMade {
    /// The public key.
    pub public: FirmwarePublicKey,
    /// The private key (PKCS#8 PEM, 0600).
    pub key: PathBuf,
    /// The public key, 32 raw bytes.
    pub raw: PathBuf,
    /// The public key, PEM.
    pub pem: PathBuf,
}

/// What to release.
#[derive(Debug, Clone)]
pub struct ReleaseOptions {
    /// The image file (the raw binary the bootloader swaps in, e.g. `objcopy -O binary`).
    pub image: PathBuf,
    /// Version, minimum version, board.
    pub spec: ReleaseSpec,
    /// Largest image accepted: the board's update partition.
    pub max_size: u64,
    /// The signing key's file; default `HOME/private/firmware.key`.
    pub key: Option<PathBuf>,
    /// The release directory to create; default `HOME/releases/<board>-<version>`.
    pub out: Option<PathBuf>,
}

/// A signed, recorded release.
#[derive(Debug, Clone)]
pub struct SignedRelease {
    /// Its manifest.
    pub manifest: Manifest,
    /// The directory holding it ([`ReleaseFiles`]).
    pub dir: PathBuf,
    /// When it was first recorded (unix seconds).
    pub created_at: i64,
    /// Whether it had been recorded before (a second run over the same image and version).
    pub again: bool,
}

/// A release's manifest as JSON (`manifest.json`, `releases --json`): every field of the signed
/// manifest, hex in lowercase, plus when it was recorded.
pub fn manifest_json(m: &Manifest, created_at: i64) -> serde_json::Value {
    json!({
        "format": "fgota-m1",
        "board": m.board.as_str(),
        "version": m.version.to_string(),
        "min_version": m.min_version.to_string(),
        "size": m.image_size,
        "sha512": hex::encode(m.image_sha512),
        "signature": hex::encode(m.image_signature),
        "key_id": hex::encode(m.key_id),
        "manifest_signature": hex::encode(m.manifest_signature),
        "image": ReleaseFiles::IMAGE,
        "created_at": created_at,
    })
}

/// The registry row of a manifest.
fn new_release(m: &Manifest) -> NewRelease {
    NewRelease {
        board: m.board.as_str().to_owned(),
        version: m.version.to_string(),
        min_version: m.min_version.to_string(),
        size: i64::from(m.image_size),
        sha512: hex::encode(m.image_sha512),
        signature: hex::encode(m.image_signature),
        key_id: hex::encode(m.key_id),
        manifest: m.encode().to_vec(),
    }
}

impl Station {
    /// Creates the firmware signing key: `HOME/private/firmware.key` (0600) and its public half
    /// in `HOME/firmware.pub` (32 bytes) and `HOME/firmware.pub.pem`, and logs it. Refuses if
    /// any of the three exists: devices embed the public key, so it is made once (the private
    /// key may have been moved offline; the public files say it was made).
    pub async fn firmware_key(&self) -> Result<FirmwareKeyMade> {
        let h = &self.home;
        let (key, raw, pem) = (h.firmware_key(), h.firmware_pub(), h.firmware_pub_pem());
        for p in [&key, &raw, &pem] {
            if p.exists() {
                return Err(Error::FirmwareKeyExists(p.clone()));
            }
        }
        let (signing, key_pem) = SigningKey::generate()?;
        let public = signing.public_key();
        home::create_dir(&h.private_dir(), true)?;
        // The private key first, with O_EXCL: of two runs at once, one fails here.
        home::write_new(&key, key_pem.as_bytes(), true)?;
        home::write_new(&pem, public.to_pem().as_bytes(), false)?;
        // `firmware.pub` last: its presence is what `release` signs against.
        home::write_new(&raw, public.as_bytes(), false)?;
        self.registry
            .record_firmware_key(&public.key_id_hex(), public.as_bytes(), now().unix_timestamp())
            .await?;
        Ok(FirmwareKeyMade { public, key, raw, pem })
    }

    /// The station's firmware signing public key (`HOME/firmware.pub`).
    pub fn firmware_public_key(&self) -> Result<FirmwarePublicKey> {
        let path = self.home.firmware_pub();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NoFirmwareKey(path)),
            Err(e) => return Err(Error::Io { path, source: e }),
        };
        FirmwarePublicKey::from_bytes(&bytes).ok_or_else(|| {
            Error::BadPkiFile(path, format!("{} bytes, not a 32-byte Ed25519 public key", bytes.len()))
        })
    }

    /// The signing key from `path` (default: the home's), checked to be the station's.
    fn signing_key(&self, path: Option<&Path>) -> Result<SigningKey> {
        let public = self.firmware_public_key()?;
        let default = self.home.firmware_key();
        let path = path.unwrap_or(&default);
        let pem = match std::fs::read(path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == default => {
                return Err(Error::FirmwareKeyOffline(default))
            }
            Err(e) => return Err(Error::Io { path: path.to_path_buf(), source: e }),
        };
        let key = SigningKey::from_pem(&pem).map_err(|e| Error::BadPkiFile(path.to_path_buf(), e))?;
        if key.public_key() != public {
            return Err(Error::FirmwareKeyMismatch {
                path: path.to_path_buf(),
                given: key.public_key().key_id_hex(),
                expected: public.key_id_hex(),
            });
        }
        Ok(key)
    }

    /// Signs the image as a release, records it (issuance log, `releases` table) and writes
    /// its directory: `image.bin`, `image.sha512`, `image.sig`, `manifest.bin`,
    /// `manifest.json`. The directory must not exist. A board and version already released
    /// with another image is refused; with the same image and minimum version the release is
    /// the same bytes, recorded once.
    pub async fn release(&self, opts: &ReleaseOptions) -> Result<SignedRelease> {
        let key = self.signing_key(opts.key.as_deref())?;
        let image = read_image(&opts.image, opts.max_size)?;
        let manifest = firmware::sign_release(&key, &image, &opts.spec)?;
        let row = new_release(&manifest);
        // Said before the directory: "released before" is the news, not "directory exists".
        if let Some(old) = self.registry.release(&row.board, &row.version).await? {
            if old.release.manifest != row.manifest {
                let (board, version) = (row.board, row.version);
                return Err(fleet_registry::Error::ReleaseExists { board, version }.into());
            }
        }
        let dir = match &opts.out {
            Some(d) => d.clone(),
            None => self.home.releases_dir().join(format!("{}-{}", opts.spec.board, opts.spec.version)),
        };
        if dir.exists() {
            return Err(Error::Io {
                path: dir,
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "already exists; refusing to overwrite",
                ),
            });
        }
        let recorded = self.registry.record_release(&row, now().unix_timestamp()).await?;
        let created_at = recorded.created_at();
        let mut json = serde_json::to_vec_pretty(&manifest_json(&manifest, created_at))
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        json.push(b'\n');
        let encoded = manifest.encode();
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::InvalidInput("the output path must name a directory".into()))?;
        home::create_dir(parent, false)?;
        let dir = home::write_dir_atomically(
            parent,
            &name,
            &[
                (ReleaseFiles::IMAGE, &image, false),
                (ReleaseFiles::DIGEST, &manifest.image_sha512, false),
                (ReleaseFiles::SIGNATURE, &manifest.image_signature, false),
                (ReleaseFiles::MANIFEST, &encoded, false),
                (ReleaseFiles::MANIFEST_JSON, &json, false),
            ],
        )?;
        // Release files are public; the temporary directory was made 0700 like a key's.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .map_err(Error::io(&dir))?;
        }
        Ok(SignedRelease { manifest, dir, created_at, again: matches!(recorded, Recorded::Again(_)) })
    }

    /// The recorded releases (or `board`'s), by board, oldest first.
    pub async fn releases(&self, board: Option<&firmware::Board>) -> Result<Vec<ReleaseRecord>> {
        Ok(self.registry.releases(board.map(firmware::Board::as_str)).await?)
    }
}

/// Reads an image file: a regular file of 1 to `max` bytes (its size is checked before it is
/// read, so a wrong path to a huge file costs nothing).
fn read_image(path: &Path, max: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(Error::io(path))?;
    if !meta.is_file() {
        return Err(Error::InvalidInput(format!("the image {} is not a file", path.display())));
    }
    let too_large = |size: u64| Error::ImageTooLarge { path: path.to_path_buf(), size, max };
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    let image = std::fs::read(path).map_err(Error::io(path))?;
    if image.is_empty() {
        return Err(Error::ImageEmpty(path.to_path_buf()));
    }
    if image.len() as u64 > max {
        return Err(too_large(image.len() as u64));
    }
    Ok(image)
}
