//! The station's side of delivery and campaigns (docs/spec/ota.md, "Campaigns"): `ota publish`
//! copies a release's image into a broker's blob directory under its SHA-512; `ota start`
//! writes a campaign and one job per device (logged) for the brokers' campaign runner; `ota
//! status` reads them back. The flags' grammars are parsed here, once.

use std::path::{Path, PathBuf};

use fleet_registry::{Campaign, DeviceId, DeviceSelector, Job, NewCampaign, ReleaseFiles};

use crate::error::{Error, Result};
use crate::firmware::{self, Board, Version};
use crate::station::Station;

/// The longest an offer may wait in a device's queue (the command queue's limit), seconds.
pub const MAX_OFFER_TTL: i64 = 30 * 86_400;

/// `--release <board>/<version>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseRef {
    /// The board.
    pub board: Board,
    /// The version.
    pub version: Version,
}

impl ReleaseRef {
    /// Parses `<board>/<version>`, e.g. `mps2-an386/1.2.0`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let (b, v) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not <board>/<version> (e.g. mps2-an386/1.2.0)"))?;
        let board = Board::parse(b).map_err(|e| e.to_string())?;
        let version = Version::parse(v).map_err(|e| e.to_string())?;
        Ok(Self { board, version })
    }
}

impl std::fmt::Display for ReleaseRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.board, self.version)
    }
}

/// `--waves 1%,10%,100%`: cumulative percentages of the campaign's devices, strictly rising,
/// the last 100%.
pub fn parse_waves(s: &str) -> std::result::Result<Vec<u32>, String> {
    let mut out: Vec<u32> = Vec::new();
    for w in s.split(',').map(str::trim) {
        let n: u32 = w
            .strip_suffix('%')
            .unwrap_or(w)
            .parse()
            .map_err(|_| format!("wave `{w}` is not a whole percentage such as 10%"))?;
        if !(1..=100).contains(&n) {
            return Err(format!("wave `{w}` is not between 1% and 100%"));
        }
        if out.last().is_some_and(|last| n <= *last) {
            return Err(format!(
                "waves are cumulative and must rise: `{w}` follows {}%",
                out.last().copied().unwrap_or(0)
            ));
        }
        out.push(n);
    }
    if out.last() != Some(&100) {
        return Err("the last wave must be 100% (every device of the campaign)".into());
    }
    Ok(out)
}

/// `--abort-if-failed 2%` (or `0.5%`): in basis points, 0% to 100%.
pub fn parse_threshold(s: &str) -> std::result::Result<i64, String> {
    let t = s.trim();
    let n = t.strip_suffix('%').ok_or_else(|| format!("`{s}` is not a percentage such as 2%"))?;
    let (whole, frac) = n.split_once('.').unwrap_or((n, ""));
    let bad = || format!("`{s}` is not a percentage between 0% and 100% with at most two decimals");
    if whole.is_empty() || frac.len() > 2 || !whole.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let whole: i64 = whole.parse().map_err(|_| bad())?;
    let frac: i64 = if frac.is_empty() { 0 } else { format!("{frac:0<2}").parse().map_err(|_| bad())? };
    let bp = whole.checked_mul(100).and_then(|w| w.checked_add(frac)).ok_or_else(bad)?;
    if bp > 10_000 {
        return Err(bad());
    }
    Ok(bp)
}

/// `--devices`: `all`; `prefix:<p>` (or `<p>*`); `status:<status>`; or a comma-separated list
/// of device ids.
pub fn parse_devices(s: &str) -> std::result::Result<DeviceSelector, String> {
    let s = s.trim();
    if s == "all" {
        return Ok(DeviceSelector::All);
    }
    if let Some(p) = s.strip_prefix("prefix:").or_else(|| s.strip_suffix('*')) {
        if p.is_empty()
            || !p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(format!("`{p}` is not the start of a device id (a-z, 0-9, '.', '_', '-')"));
        }
        return Ok(DeviceSelector::Prefix(p.to_owned()));
    }
    if let Some(st) = s.strip_prefix("status:") {
        return match st {
            "active" => Ok(DeviceSelector::Status(st.to_owned())),
            _ => Err(format!(
                "`{st}` is not a device status a campaign can target: only active devices are updated"
            )),
        };
    }
    let mut ids = Vec::new();
    for id in s.split(',').map(str::trim) {
        DeviceId::parse(id).map_err(|e| e.to_string())?;
        ids.push(id.to_owned());
    }
    Ok(DeviceSelector::List(ids))
}

/// What `ota publish` did.
#[derive(Debug, Clone)]
pub struct Published {
    /// The release.
    pub release: ReleaseRef,
    /// The image's SHA-512, hex.
    pub sha512: String,
    /// Bytes.
    pub size: u64,
    /// The blob written (or already there).
    pub blob: PathBuf,
    /// It was there already, with these bytes.
    pub already: bool,
}

/// What `ota start` asks for.
#[derive(Debug, Clone)]
pub struct CampaignOptions {
    /// The release.
    pub release: ReleaseRef,
    /// `--devices` as given.
    pub devices_text: String,
    /// `--devices`, parsed.
    pub devices: DeviceSelector,
    /// Cumulative percentages.
    pub waves: Vec<u32>,
    /// Basis points.
    pub abort_bp: i64,
    /// Seconds.
    pub offer_ttl: i64,
    /// Where the broker serves images from: the release must be published there.
    pub blob_dir: PathBuf,
}

impl Station {
    /// The release's directory (`dir`, or `HOME/releases/<board>-<version>`) image, checked
    /// against the registry's SHA-512 and copied into `blob_dir` under that name (write then
    /// rename: a broker never reads half an image).
    pub async fn publish_release(
        &self,
        r: ReleaseRef,
        dir: Option<PathBuf>,
        blob_dir: &Path,
    ) -> Result<Published> {
        let (board, version) = (r.board.to_string(), r.version.to_string());
        let rec = self.registry().release(&board, &version).await?.ok_or_else(|| {
            Error::InvalidInput(format!(
                "no release {r} in the registry (fleet-provision releases lists them)"
            ))
        })?;
        let dir = dir.unwrap_or_else(|| self.home().releases_dir().join(format!("{board}-{version}")));
        let image_path = dir.join(ReleaseFiles::IMAGE);
        let image = std::fs::read(&image_path).map_err(Error::io(&image_path))?;
        let sha512 = hex::encode(firmware::image_digest(&image));
        if sha512 != rec.release.sha512 {
            return Err(Error::InvalidInput(format!(
                "{} is not release {r}'s image (its SHA-512 differs from the registry's)",
                image_path.display()
            )));
        }
        std::fs::create_dir_all(blob_dir).map_err(Error::io(blob_dir))?;
        let blob = blob_dir.join(&sha512);
        if std::fs::read(&blob).is_ok_and(|b| b == image) {
            return Ok(Published { release: r, sha512, size: image.len() as u64, blob, already: true });
        }
        let tmp = blob_dir.join(format!(".{sha512}.tmp"));
        place_blob(&tmp, &blob, &image).map_err(Error::io(&tmp))?;
        Ok(Published { release: r, sha512, size: image.len() as u64, blob, already: false })
    }

    /// Creates a campaign: the devices the selector names, one job each in its wave, logged.
    pub async fn start_campaign(&self, o: &CampaignOptions) -> Result<Campaign> {
        if !(1..=MAX_OFFER_TTL).contains(&o.offer_ttl) {
            return Err(Error::InvalidInput(format!("--offer-ttl must be 1 to {MAX_OFFER_TTL} seconds")));
        }
        let (board, version) = (o.release.board.to_string(), o.release.version.to_string());
        let rec = self.registry().release(&board, &version).await?.ok_or_else(|| {
            Error::InvalidInput(format!(
                "no release {} in the registry (fleet-provision releases lists them)",
                o.release
            ))
        })?;
        let blob = o.blob_dir.join(&rec.release.sha512);
        if !blob.is_file() {
            return Err(Error::InvalidInput(format!(
                "release {} is not published in {} (run `fleet-provision ota publish --release {}` first, or give --blob-dir the broker's ota_blob_dir)",
                o.release,
                o.blob_dir.display(),
                o.release
            )));
        }
        let devices = self.registry().select_devices(&o.devices).await?;
        let id = format!("ota-{:016x}", rand::random::<u64>());
        let new = NewCampaign {
            id,
            board,
            version,
            devices: o.devices_text.clone(),
            waves: o.waves.clone(),
            abort_bp: o.abort_bp,
            offer_ttl: o.offer_ttl,
        };
        Ok(self
            .registry()
            .create_campaign(&new, &devices, crate::station::now().unix_timestamp() * 1000)
            .await?)
    }

    /// Campaign `id` (or every campaign, newest first) with its jobs.
    pub async fn campaigns(&self, id: Option<&str>) -> Result<Vec<(Campaign, Vec<Job>)>> {
        let list = match id {
            Some(id) => vec![self.registry().campaign(id).await?.ok_or_else(|| {
                Error::InvalidInput(format!("no campaign `{id}` (fleet-provision ota status lists them)"))
            })?],
            None => self.registry().campaigns().await?,
        };
        let mut out = Vec::with_capacity(list.len());
        for c in list {
            let jobs = self.registry().ota_jobs(&c.id).await?;
            out.push((c, jobs));
        }
        Ok(out)
    }
}

/// Writes `image` to a new file `tmp`, then renames it to `blob`. The blob directory is shared
/// with the broker: whatever is at `tmp` (a left-over file, or a symlink someone planted to a
/// station file) is removed, not written through, and the file is created exclusively
/// (`O_EXCL`, which also refuses a symlink put back meanwhile).
fn place_blob(tmp: &Path, blob: &Path, image: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    match std::fs::remove_file(tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(tmp)?;
    f.write_all(image)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(tmp, blob)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_planted_temporary_file_cannot_redirect_the_blob_write() {
        // Whoever can write into the blob directory (the broker's `ota_blob_dir`) knows the
        // temporary name (the release's SHA-512 is public) and plants a symlink there to a
        // station file: the station must not write the image through it.
        let dir = std::env::temp_dir().join(format!(
            "fleet-place-blob-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let victim = dir.join("root-ca.key");
        std::fs::write(&victim, b"the station's key").unwrap_or_else(|e| panic!("{e}"));
        let (tmp, blob) = (dir.join(".abc.tmp"), dir.join("abc"));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap_or_else(|e| panic!("{e}"));
        let _ = place_blob(&tmp, &blob, b"image bytes");
        assert_eq!(std::fs::read(&victim).ok().as_deref(), Some(&b"the station's key"[..]));
        if let Ok(b) = std::fs::read(&blob) {
            assert_eq!(b, b"image bytes");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn flags_parse_once_with_clear_refusals() {
        assert_eq!(parse_waves("1%,10%,100%"), Ok(vec![1, 10, 100]));
        assert_eq!(parse_waves("100%"), Ok(vec![100]));
        assert!(parse_waves("10%,5%,100%").unwrap_err().contains("rise"));
        assert!(parse_waves("1%,10%").unwrap_err().contains("100%"));
        assert!(parse_waves("0%,100%").is_err());
        assert!(parse_waves("x").is_err());
        assert_eq!(parse_threshold("2%"), Ok(200));
        assert_eq!(parse_threshold("0.5%"), Ok(50));
        assert_eq!(parse_threshold("0%"), Ok(0));
        assert_eq!(parse_threshold("100%"), Ok(10_000));
        for bad in ["2", "101%", "-1%", "0.123%", "%", "a%"] {
            assert!(parse_threshold(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_devices("all"), Ok(DeviceSelector::All));
        assert_eq!(parse_devices("prefix:dev-"), Ok(DeviceSelector::Prefix("dev-".into())));
        assert_eq!(parse_devices("dev-*"), Ok(DeviceSelector::Prefix("dev-".into())));
        assert_eq!(parse_devices("status:active"), Ok(DeviceSelector::Status("active".into())));
        assert!(parse_devices("status:revoked").is_err());
        assert_eq!(parse_devices("a,b"), Ok(DeviceSelector::List(vec!["a".into(), "b".into()])));
        assert!(parse_devices("A,b").is_err());
        let r = ReleaseRef::parse("mps2-an386/1.2.0").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.to_string(), "mps2-an386/1.2.0");
        assert!(ReleaseRef::parse("1.2.0").is_err());
        assert!(ReleaseRef::parse("mps2-an386/1.2").is_err());
    }
}
