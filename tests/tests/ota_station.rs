//! The station's side of firmware updates (issue 30, docs/spec/ota.md), driven through the
//! `fleet-provision` binary as an operator drives it: `firmware-key` makes the image-signing key
//! once and keeps it like the root CA key; `release` signs what embassy-boot 0.7 verifies.
//!
//! Every release is checked by code that shares nothing with the station's signing code
//! (ring): OpenSSL 3 (`pkeyutl -verify -rawin`, plain Ed25519 over the digest file), the
//! Ed25519 verifier embassy-boot links (ed25519-dalek, called as embassy-boot calls it), and
//! embassy-boot's own `verify_and_mark_updated` over an in-memory NOR flash the image was
//! written into as a device writes it. The manifest is read by byte offsets from the spec, not
//! with the codec the station wrote it with.
#![allow(clippy::unwrap_used)] // test code

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use embassy_boot::{BlockingFirmwareUpdater, FirmwareUpdaterConfig, FirmwareUpdaterError, State};
use embedded_storage::nor_flash::{ErrorType, NorFlash, NorFlashErrorKind, ReadNorFlash};
use fleet_tests::ota_flash::test_image;
use fleet_tests::{assert_plain_words, require_program, run, PgCluster};
use sha2::{Digest, Sha256, Sha512};

const BOARD: &str = "mps2-an386";

/// A station home made by `fleet-provision init`, its registry in the home (SQLite) or at `db`.
struct Station {
    dir: tempfile::TempDir,
    db: Option<String>,
}

impl Station {
    fn new(db: Option<String>) -> Station {
        let s = Station { dir: tempfile::tempdir().unwrap(), db };
        s.ok(&["init", "--org", "Acme"]);
        s
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cmd(&self, args: &[&str]) -> Output {
        let bin = fleet_tests::workspace_bin_dir(&["fleet-provision"]).join("fleet-provision");
        let mut c = Command::new(bin);
        c.env_remove("FLEET_HOME").env_remove("FLEET_DATABASE_URL").stdin(Stdio::null());
        c.arg("--home").arg(self.home());
        if let Some(db) = &self.db {
            c.args(["--database-url", db]);
        }
        run(c.args(args))
    }

    /// Runs a command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(out.status.success(), "fleet-provision {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail with one error in plain words saying each of `must_say`.
    fn fails(&self, args: &[&str], must_say: &[&str]) -> String {
        let out = self.cmd(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "fleet-provision {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(err.starts_with("error: "), "{args:?}:\n{err}");
        assert_eq!(
            err.lines().filter(|l| l.contains("error")).count(),
            1,
            "{args:?}: one error, said once:\n{err}"
        );
        assert!(!err.contains("panicked"), "{args:?}:\n{err}");
        for s in must_say {
            assert!(err.contains(s), "{args:?} does not say `{s}`:\n{err}");
        }
        assert_plain_words(&err);
        err
    }

    fn write(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_string_lossy().into_owned()
    }

    fn public_key(&self) -> [u8; 32] {
        std::fs::read(self.home().join("firmware.pub")).unwrap().try_into().unwrap()
    }

    fn release_dir(&self, version: &str) -> PathBuf {
        self.home().join("releases").join(format!("{BOARD}-{version}"))
    }

    fn releases(&self) -> Vec<serde_json::Value> {
        serde_json::from_str::<serde_json::Value>(&self.ok(&["releases", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    async fn registry(&self) -> fleet_registry::Registry {
        let url = self
            .db
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.home().join("registry.db").display()));
        fleet_registry::Registry::open(&url, false).await.unwrap()
    }
}

fn sha512(bytes: &[u8]) -> [u8; 64] {
    Sha512::digest(bytes).into()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// `openssl pkeyutl -verify -pubin -inkey <pem> -rawin -in <digest> -sigfile <sig>` (OpenSSL 3,
/// Ed25519 over the file's bytes). A refusal must be OpenSSL's verdict, not a usage error.
fn openssl_verifies(public_pem: &Path, digest: &Path, signature: &Path) -> bool {
    let openssl = require_program("openssl", "openssl");
    let out = run(Command::new(openssl)
        .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
        .arg(public_pem)
        .arg("-rawin")
        .arg("-in")
        .arg(digest)
        .arg("-sigfile")
        .arg(signature));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        assert!(said.contains("Signature Verified Successfully"), "{said}");
        true
    } else {
        assert!(said.contains("Signature Verification Failure"), "openssl did not get to verify: {said}");
        false
    }
}

/// What embassy-boot's `verify_and_mark_updated` does with the dalek feature, step for step:
/// `VerifyingKey::from_bytes`, `Signature::from_bytes`, `Verifier::verify` over the message.
fn dalek_verifies(public: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};
    let Ok(key) = VerifyingKey::from_bytes(public) else { return false };
    key.verify(message, &Signature::from_bytes(signature)).is_ok()
}

/// NOR flash in memory: erase sets 0xFF, a write can only clear bits.
struct Nor(Vec<u8>);

const SECTOR: usize = 4096;

impl ErrorType for Nor {
    type Error = NorFlashErrorKind;
}

impl ReadNorFlash for Nor {
    const READ_SIZE: usize = 1;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        let at = offset as usize;
        bytes.copy_from_slice(self.0.get(at..at + bytes.len()).ok_or(NorFlashErrorKind::OutOfBounds)?);
        Ok(())
    }
    fn capacity(&self) -> usize {
        self.0.len()
    }
}

impl NorFlash for Nor {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = SECTOR;
    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        let (from, to) = (from as usize, to as usize);
        if !from.is_multiple_of(SECTOR) || !to.is_multiple_of(SECTOR) {
            return Err(NorFlashErrorKind::NotAligned);
        }
        self.0.get_mut(from..to).ok_or(NorFlashErrorKind::OutOfBounds)?.fill(0xFF);
        Ok(())
    }
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        let at = offset as usize;
        if !at.is_multiple_of(4) || !bytes.len().is_multiple_of(4) {
            return Err(NorFlashErrorKind::NotAligned);
        }
        let cells = self.0.get_mut(at..at + bytes.len()).ok_or(NorFlashErrorKind::OutOfBounds)?;
        cells.iter_mut().zip(bytes).for_each(|(c, b)| *c &= b);
        Ok(())
    }
}

/// embassy-boot 0.7 on a device: `image` written into a fresh 256 KiB update partition in 1 KiB
/// chunks with `write_firmware` (the last one padded to the write size with 0xFF), then
/// `verify_and_mark_updated(public key, signature, image size)`. Its verdict, and the state the
/// bootloader will act on at the next reset (`Swap`: the new image is swapped in).
fn embassy_boot(
    image: &[u8],
    public: &[u8; 32],
    signature: &[u8; 64],
) -> (Result<(), FirmwareUpdaterError>, State) {
    let config = FirmwareUpdaterConfig { dfu: Nor(vec![0xFF; 256 * 1024]), state: Nor(vec![0xFF; SECTOR]) };
    let mut aligned = [0u8; 4];
    let mut updater = BlockingFirmwareUpdater::new(config, &mut aligned);
    assert_eq!(updater.get_state().unwrap(), State::Boot);
    for (i, chunk) in image.chunks(1024).enumerate() {
        let mut padded = chunk.to_vec();
        padded.resize(chunk.len().div_ceil(4) * 4, 0xFF);
        updater.write_firmware(i * 1024, &padded).unwrap();
    }
    let verdict = updater.verify_and_mark_updated(public, signature, image.len() as u32);
    (verdict, updater.get_state().unwrap())
}

fn read64(p: &Path) -> [u8; 64] {
    std::fs::read(p).unwrap().try_into().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_firmware_key_is_made_once_and_kept_like_the_root_key() {
    let st = Station::new(None);
    let home = st.home();
    let out = st.ok(&["firmware-key"]);
    let (key, raw, pem) =
        (home.join("private/firmware.key"), home.join("firmware.pub"), home.join("firmware.pub.pem"));

    // Kept like the root CA key: under private/ (0700), mode 0600, the same as root-ca.key.
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&key), mode(&home.join("private/root-ca.key")));
    assert_eq!(mode(&home.join("private")), 0o700);

    // The public half as a device embeds it (32 bytes) and as OpenSSL reads it; the private key
    // is a standard PKCS#8 Ed25519 key that OpenSSL reads and that belongs to it.
    let public = st.public_key();
    let openssl = require_program("openssl", "openssl");
    let der = run(Command::new(&openssl).args(["pkey", "-pubin", "-outform", "DER", "-in"]).arg(&pem));
    assert!(der.status.success(), "{}", String::from_utf8_lossy(&der.stderr));
    assert_eq!(der.stdout.len(), 44);
    assert_eq!(der.stdout[12..], public, "firmware.pub.pem is firmware.pub");
    let from_private = run(Command::new(&openssl).args(["pkey", "-pubout", "-in"]).arg(&key));
    assert!(
        from_private.status.success(),
        "OpenSSL cannot read the key: {}",
        String::from_utf8_lossy(&from_private.stderr)
    );
    assert_eq!(from_private.stdout, std::fs::read(&pem).unwrap(), "the private key is firmware.pub's");
    let key_id = hex::encode(&Sha256::digest(public)[..8]);
    assert!(out.contains(&hex::encode(public)) && out.contains(&key_id), "{out}");

    // Made once: a second run changes nothing, with the key at home or moved offline.
    let before: Vec<Vec<u8>> = [&key, &raw, &pem].iter().map(|p| std::fs::read(p).unwrap()).collect();
    st.fails(&["firmware-key"], &["firmware.key", "already exists", "refusing"]);
    let after: Vec<Vec<u8>> = [&key, &raw, &pem].iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(before, after);
    std::fs::rename(&key, st.path("offline.key")).unwrap();
    st.fails(&["firmware-key"], &["firmware.pub", "already exists"]);
    assert!(!key.exists(), "no new key made while the first is offline");
    assert_eq!(std::fs::read(&raw).unwrap(), before[1]);

    // Logged once, with its public key.
    let reg = st.registry().await;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT device_id, detail FROM issuance_log WHERE event = 'firmware-key'")
            .fetch_all(reg.pool())
            .await
            .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, key_id);
    assert!(rows[0].1.contains(&hex::encode(public)), "{}", rows[0].1);
    st.ok(&["verify-log"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_release_verifies_with_openssl_ed25519_dalek_and_embassy_boot() {
    let st = Station::new(None);
    st.ok(&["firmware-key"]);
    // An odd size, over many flash sectors: embassy-boot hashes exactly `update_len` bytes.
    let img = test_image(100_001, 7);
    let path = st.write("app.bin", &img);
    let out = st.ok(&[
        "release",
        "--image",
        &path,
        "--version",
        "1.2.0",
        "--board",
        BOARD,
        "--min-version",
        "1.0.0",
    ]);
    let dir = st.release_dir("1.2.0");
    assert!(out.contains(&dir.display().to_string()), "{out}");
    let public = st.public_key();
    let digest = sha512(&img);
    let signature = read64(&dir.join("image.sig"));

    assert_eq!(std::fs::read(dir.join("image.bin")).unwrap(), img);
    assert_eq!(read64(&dir.join("image.sha512")), digest, "image.sha512 is the image's SHA-512");
    assert!(openssl_verifies(
        &st.home().join("firmware.pub.pem"),
        &dir.join("image.sha512"),
        &dir.join("image.sig")
    ));
    assert!(dalek_verifies(&public, &digest, &signature));
    // Ed25519 is deterministic: OpenSSL signing the digest with the station's key file makes the
    // same 64 bytes (the key file is a plain RFC 8410 key, usable offline with OpenSSL alone).
    let openssl = require_program("openssl", "openssl");
    let by_openssl = run(Command::new(openssl)
        .args(["pkeyutl", "-sign", "-rawin", "-inkey"])
        .arg(st.home().join("private/firmware.key"))
        .arg("-in")
        .arg(dir.join("image.sha512")));
    assert!(by_openssl.status.success(), "{}", String::from_utf8_lossy(&by_openssl.stderr));
    assert_eq!(by_openssl.stdout, signature);
    let (verdict, state) = embassy_boot(&img, &public, &signature);
    assert!(verdict.is_ok(), "embassy-boot refused the release: {verdict:?}");
    assert_eq!(state, State::Swap, "embassy-boot marked the update for swap");

    // The manifest, read by the spec's offsets (docs/spec/ota.md), signed by the same key.
    let m = std::fs::read(dir.join("manifest.bin")).unwrap();
    assert_eq!(m.len(), 268);
    assert_eq!(&m[0..8], b"fgota-m1");
    let u32_at = |i: usize| u32::from_le_bytes(m[i..i + 4].try_into().unwrap());
    assert_eq!(u32_at(8), 100_001);
    assert_eq!((u32_at(12), u32_at(16), u32_at(20)), (1, 2, 0));
    assert_eq!((u32_at(24), u32_at(28), u32_at(32)), (1, 0, 0));
    assert_eq!(&m[36..36 + BOARD.len()], BOARD.as_bytes());
    assert!(m[36 + BOARD.len()..68].iter().all(|&b| b == 0));
    assert_eq!(m[68..76], Sha256::digest(public)[..8]);
    assert_eq!(m[76..140], digest);
    assert_eq!(m[140..204], signature);
    let manifest_signature: [u8; 64] = m[204..268].try_into().unwrap();
    assert!(
        dalek_verifies(&public, &m[..204], &manifest_signature),
        "the manifest signature covers bytes 0..204"
    );
    std::fs::write(st.path("signed-part"), &m[..204]).unwrap();
    std::fs::write(st.path("manifest.sig"), manifest_signature).unwrap();
    assert!(openssl_verifies(
        &st.home().join("firmware.pub.pem"),
        &st.path("signed-part"),
        &st.path("manifest.sig")
    ));

    // manifest.json and the registry say the same.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    for (k, v) in [
        ("format", "fgota-m1".to_owned()),
        ("board", BOARD.to_owned()),
        ("version", "1.2.0".to_owned()),
        ("min_version", "1.0.0".to_owned()),
        ("sha512", hex::encode(digest)),
        ("signature", hex::encode(signature)),
        ("key_id", hex::encode(&m[68..76])),
        ("manifest_signature", hex::encode(manifest_signature)),
    ] {
        assert_eq!(json[k], v, "manifest.json {k}");
    }
    assert_eq!(json["size"], 100_001);
    let listed = st.releases();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["sha512"], json["sha512"]);
    assert_eq!(listed[0]["manifest_signature"], json["manifest_signature"]);
    let log = st.ok(&["verify-log"]);
    assert!(log.contains("issuance log OK"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_image_or_another_stations_release_fails_every_verifier() {
    let (a, b) = (Station::new(None), Station::new(None));
    let img = test_image(40_000, 11);
    for st in [&a, &b] {
        st.ok(&["firmware-key"]);
        let path = st.write("app.bin", &img);
        st.ok(&["release", "--image", &path, "--version", "1.2.0", "--board", BOARD]);
    }
    let (a_pub, b_pub) = (a.public_key(), b.public_key());
    let a_dir = a.release_dir("1.2.0");
    let a_sig = read64(&a_dir.join("image.sig"));
    let b_sig = read64(&b.release_dir("1.2.0").join("image.sig"));
    let a_pem = a.home().join("firmware.pub.pem");

    // Control: each station's release verifies under its own key.
    assert!(embassy_boot(&img, &a_pub, &a_sig).0.is_ok());
    assert!(embassy_boot(&img, &b_pub, &b_sig).0.is_ok());

    // One byte of the image changed after signing.
    let mut tampered = img.clone();
    tampered[20_000] ^= 0x01;
    std::fs::write(a.path("tampered.sha512"), sha512(&tampered)).unwrap();
    assert!(!openssl_verifies(&a_pem, &a.path("tampered.sha512"), &a_dir.join("image.sig")));
    assert!(!dalek_verifies(&a_pub, &sha512(&tampered), &a_sig));
    let (verdict, state) = embassy_boot(&tampered, &a_pub, &a_sig);
    assert!(matches!(verdict, Err(FirmwareUpdaterError::Signature(_))), "{verdict:?}");
    assert_eq!(state, State::Boot, "a refused image is not marked for swap");

    // The same image released by another station (another key): A's devices refuse it.
    std::fs::write(a.path("b.sig"), b_sig).unwrap();
    assert!(!openssl_verifies(&a_pem, &a_dir.join("image.sha512"), &a.path("b.sig")));
    assert!(!dalek_verifies(&a_pub, &sha512(&img), &b_sig));
    let (verdict, state) = embassy_boot(&img, &a_pub, &b_sig);
    assert!(matches!(verdict, Err(FirmwareUpdaterError::Signature(_))), "{verdict:?}");
    assert_eq!(state, State::Boot);

    // And A's station will not sign with B's key.
    let b_key = b.home().join("private/firmware.key");
    let v2 = a.write("v2.bin", &test_image(100, 3));
    let err = a.fails(
        &[
            "release",
            "--image",
            &v2,
            "--version",
            "1.3.0",
            "--board",
            BOARD,
            "--key",
            b_key.to_str().unwrap(),
        ],
        &["is not this station's firmware signing key"],
    );
    assert!(err.contains(&hex::encode(&Sha256::digest(b_pub)[..8])), "{err}");
    assert_eq!(a.releases().len(), 1, "nothing recorded");
    assert!(!a.release_dir("1.3.0").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gives_one_clear_error_and_records_nothing() {
    let st = Station::new(None);
    let img = st.write("app.bin", &test_image(2048, 5));
    let rel = |extra: &[&str]| -> Vec<String> {
        // `release --image app.bin --board mps2-an386 --version 1.2.0`, with `extra` in place
        // of those flags it names.
        let mut v: Vec<String> = vec!["release".into(), "--image".into(), img.clone()];
        for (flag, default) in [("--board", BOARD), ("--version", "1.2.0")] {
            if !extra.contains(&flag) {
                v.extend([flag.to_owned(), default.to_owned()]);
            }
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let fails = |args: Vec<String>, must_say: &[&str]| {
        st.fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), must_say);
    };

    // Before the station has a key.
    fails(rel(&[]), &["no firmware signing key", "firmware-key"]);
    st.ok(&["firmware-key"]);

    let empty = st.write("empty.bin", b"");
    let missing = st.path("missing.bin").to_string_lossy().into_owned();
    let dir = st.path("").to_string_lossy().into_owned();
    let garbage = st.write("garbage.key", &test_image(100, 9));
    let root_key = st.home().join("private/root-ca.key").to_string_lossy().into_owned();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            rel(&[]).into_iter().map(|a| if a == img { missing.clone() } else { a }).collect(),
            vec!["missing.bin", "No such file"],
        ),
        (
            rel(&[]).into_iter().map(|a| if a == img { empty.clone() } else { a }).collect(),
            vec!["empty.bin", "is empty"],
        ),
        (
            rel(&[]).into_iter().map(|a| if a == img { dir.clone() } else { a }).collect(),
            vec!["is not a file"],
        ),
        (rel(&["--max-size", "1KiB"]), vec!["2048 bytes", "more than the 1024 bytes", "--max-size"]),
        (rel(&["--max-size", "big"]), vec!["--max-size", "big"]),
        (rel(&["--max-size", "4GiB"]), vec!["--max-size", "at most 4 GiB"]),
        (rel(&["--version", "1.2"]), vec!["--version", "'1.2'", "MAJOR.MINOR.PATCH"]),
        (rel(&["--version", "v1.2.0"]), vec!["--version", "MAJOR.MINOR.PATCH"]),
        (rel(&["--version", "01.2.0"]), vec!["--version", "leading zero"]),
        (rel(&["--version", "1.2.0-rc.1"]), vec!["--version", "pre-release"]),
        (rel(&["--version", "1.2.0+abc"]), vec!["--version", "build metadata"]),
        (rel(&["--min-version", "1.2.0"]), vec!["minimum version 1.2.0", "no device could install it"]),
        (rel(&["--min-version", "2.0"]), vec!["--min-version", "MAJOR.MINOR.PATCH"]),
        (rel(&["--board", "Mps2"]), vec!["--board", "'Mps2'", "a-z"]),
        (rel(&["--board", &"b".repeat(33)]), vec!["--board", "1-32 characters"]),
        (rel(&["--key", &garbage]), vec!["garbage.key", "not a PEM private key"]),
        (rel(&["--key", &root_key]), vec!["root-ca.key", "not an Ed25519 private key"]),
        (rel(&["--key", &missing]), vec!["missing.bin", "No such file"]),
    ];
    for (args, must_say) in cases {
        fails(args, &must_say);
    }
    assert!(st.releases().is_empty(), "nothing recorded");
    assert!(
        !st.home().join("releases").exists()
            || std::fs::read_dir(st.home().join("releases")).unwrap().next().is_none()
    );

    // The key moved offline: said so, and `--key` takes its copy.
    std::fs::rename(st.home().join("private/firmware.key"), st.path("offline.key")).unwrap();
    fails(rel(&[]), &["not at", "moved offline", "--key"]);
    let offline = st.path("offline.key").to_string_lossy().into_owned();
    st.ok(&rel(&["--key", &offline]).iter().map(String::as_str).collect::<Vec<_>>());

    // A version is released once per board: another image under 1.2.0 is refused.
    let other = st.write("other.bin", &test_image(2048, 6));
    let again: Vec<String> =
        rel(&["--key", &offline]).into_iter().map(|a| if a == img { other.clone() } else { a }).collect();
    fails(again, &["already has a release 1.2.0 of another image", "new version"]);
    assert_eq!(st.releases().len(), 1);
    st.ok(&["verify-log"]);
}

/// The `releases` table on both back ends: recorded with the log, listed, refused twice, and a
/// row changed or removed behind the station's back is what `verify-log` reports.
#[tokio::test(flavor = "multi_thread")]
async fn releases_are_recorded_and_checked_in_sqlite_and_postgresql() {
    let pg = PgCluster::start();
    for db in [None, Some(pg.create_database("fleet_ota"))] {
        let st = Station::new(db.clone());
        st.ok(&["firmware-key"]);
        let v1 = st.write("v1.bin", &test_image(5000, 1));
        let v2 = st.write("v2.bin", &test_image(6000, 2));
        st.ok(&["release", "--image", &v1, "--version", "1.0.0", "--board", BOARD]);
        st.ok(&["release", "--image", &v2, "--version", "1.1.0", "--board", BOARD, "--min-version", "1.0.0"]);
        // The same image, version and board again: the same signed bytes, recorded once.
        let out = st.path("again").to_string_lossy().into_owned();
        let said = st.ok(&["release", "--image", &v1, "--version", "1.0.0", "--board", BOARD, "--out", &out]);
        assert!(said.contains("was recorded at"), "{said}");
        assert_eq!(
            std::fs::read(st.path("again/manifest.bin")).unwrap(),
            std::fs::read(st.release_dir("1.0.0").join("manifest.bin")).unwrap()
        );
        st.fails(
            &["release", "--image", &v2, "--version", "1.0.0", "--board", BOARD, "--out", &out],
            &["already has a release 1.0.0"],
        );

        let listed = st.releases();
        let versions: Vec<_> = listed
            .iter()
            .map(|r| (r["version"].as_str().unwrap(), r["min_version"].as_str().unwrap()))
            .collect();
        assert_eq!(versions, [("1.0.0", "0.0.0"), ("1.1.0", "1.0.0")], "{db:?}");
        assert!(st.ok(&["verify-log"]).contains("issuance log OK"));

        // Someone with database access points 1.1.0 at another digest, then removes 1.0.0.
        let reg = st.registry().await;
        sqlx::query("UPDATE releases SET sha512 = $1 WHERE version = '1.1.0'")
            .bind(hex::encode(sha512(b"evil")))
            .execute(reg.pool())
            .await
            .unwrap();
        let out = st.cmd(&["verify-log"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains(&format!("release {BOARD} 1.1.0 differs from what the log recorded")),
            "{db:?}: {err}"
        );
        sqlx::query("DELETE FROM releases WHERE version = '1.0.0'").execute(reg.pool()).await.unwrap();
        let err = String::from_utf8_lossy(&st.cmd(&["verify-log"]).stderr).into_owned();
        assert!(
            err.contains(&format!("release {BOARD} 1.0.0 was recorded per the log but is missing")),
            "{db:?}: {err}"
        );
    }
}
