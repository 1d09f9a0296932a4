//! Release images, stored once (docs/spec/ota.md, "Images stored once"): a directory of files
//! each named by its image's SHA-512 in hex, copied in by `fleet-provision ota publish`. An
//! image is read when a device first asks for it, its digest checked against its name (a file
//! changed on disk is refused, not served), and kept in memory while it is in use.
//!
//! In a cluster the nodes share the images through a JetStream object store, [`BUCKET`]: a node
//! that has a running campaign's image in its directory puts it there ([`Blobs::share`]), and a
//! node asked for an image it does not have fetches it from there, checks its SHA-512 and keeps
//! a copy in its directory. Whoever can write into the bucket (the nodes' NATS users) can at
//! worst make an image unavailable: bytes that are not their name's SHA-512 are never served,
//! an object whose size is not its release's is refused before it is read, a link object is
//! refused (the object store follows links, a link to itself for ever), and every read from
//! the bucket has a deadline ([`patience`]: an object whose chunks never come). Neither a
//! device's session nor the campaign runner waits for the bucket: a fetch and a share run on
//! their own tasks, one per image at a time, and a failed fetch is tried again only after
//! [`FETCH_RETRY`], however many devices ask meanwhile (they are told busy).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};

/// Images held in memory at most; more and the oldest are read again when asked for.
const CACHED: usize = 8;
/// The cluster's object store bucket of release images (stream `OBJ_FLEET_OTA`).
pub(crate) const BUCKET: &str = "FLEET_OTA";
/// After a failed attempt to share an image, the next one waits this long.
const SHARE_RETRY: Duration = Duration::from_secs(30);
/// A shared image's copy in the bucket is checked again (read whole, compared) this often
/// while its campaign runs: bytes forged in after the share are put back within it.
const SHARE_RECHECK: Duration = Duration::from_secs(10);
/// After a failed fetch from the object store (missing, refused, or past its deadline), the
/// next one waits this long: devices asking meanwhile are told busy without a fetch each.
const FETCH_RETRY: Duration = Duration::from_secs(2);

/// How long reading an object of `size` bytes from the bucket may take: 5 s, plus 4 ms per
/// KiB (a 1 MiB image within 9 s; the cluster's NATS serves one in well under a second).
fn patience(size: u64) -> Duration {
    Duration::from_secs(5) + Duration::from_millis(size / 256)
}

/// Why an image cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum BlobError {
    /// Not in the blob directory (not published with `ota publish`), nor in the cluster's
    /// object store.
    #[error("image {0} is not in {1} (fleet-provision ota publish)")]
    Missing(String, String),
    /// The file's SHA-512 is not its name.
    #[error("image {0} in {1} does not match its SHA-512: refused")]
    Digest(String, &'static str),
    /// The file's length is not the release's size: refused before it is read.
    #[error("image {digest} in {place} is {found} bytes, its release {size}: refused")]
    Size { digest: String, place: &'static str, found: u64, size: u64 },
    /// Unreadable.
    #[error("image {0}: {1}")]
    Io(String, std::io::Error),
    /// The cluster's object store failed.
    #[error("image {0} in the cluster's object store {BUCKET}: {1}")]
    Store(String, String),
    /// The object under the image's name is a link (to another object or bucket): images are
    /// stored as themselves only.
    #[error("image {0} in {STORE} {BUCKET} is a link: refused")]
    Link(String),
    /// Reading the object took longer than [`patience`] allows.
    #[error("image {0} in {STORE} {BUCKET}: not read within {1:?}: refused")]
    Deadline(String, Duration),
    /// Being read now (from the directory or the object store), or the last fetch failed
    /// less than [`FETCH_RETRY`] ago: ask again later.
    #[error("image {0} is being fetched, or its last fetch failed moments ago")]
    Pending(String),
}

impl BlobError {
    /// Worth a warning: not [`BlobError::Pending`] (said at every device's request meanwhile).
    pub(crate) fn is_news(&self) -> bool {
        !matches!(self, BlobError::Pending(_))
    }
}

/// The blob directory, the cluster's object store, and the images in use.
#[derive(Debug)]
pub(crate) struct Blobs {
    dir: PathBuf,
    cache: Mutex<Vec<(String, Bytes)>>,
    /// A cluster member's JetStream.
    js: Option<jetstream::Context>,
    /// Images put into (or found in) the object store, being shared, or failed to.
    shared: Mutex<HashMap<String, Attempt>>,
    /// Images being read (from the directory or the object store), or whose last fetch from
    /// the object store failed.
    loads: Mutex<HashMap<String, Attempt>>,
}

/// Where an image's share or load stands.
#[derive(Debug, Clone, Copy)]
enum Attempt {
    Running,
    Done,
    /// Shared (or nothing to share: not in this node's directory), at this instant.
    Checked(Instant),
    Failed(Instant),
}

/// Clears a `Running` load when its reader is dropped before it recorded an outcome (a
/// session closed while it read the directory): the next request reads again.
struct Loading<'a>(&'a Mutex<HashMap<String, Attempt>>, &'a str);

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        let mut loads = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if matches!(loads.get(self.1), Some(Attempt::Running)) {
            loads.remove(self.1);
        }
    }
}

/// Is `s` a SHA-512 in lowercase hex?
fn is_digest(s: &str) -> bool {
    s.len() == 128 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

const DIR: &str = "the blob directory";
const STORE: &str = "the cluster's object store";

/// Reads at most one byte more than `size` from `r` and checks the length and the SHA-512.
async fn read_checked(
    r: impl tokio::io::AsyncRead + Unpin,
    sha512: &str,
    size: u64,
    place: &'static str,
) -> Result<Bytes, BlobError> {
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    r.take(size.saturating_add(1))
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| BlobError::Io(format!("{sha512} in {place}"), e))?;
    if bytes.len() as u64 != size {
        return Err(BlobError::Size { digest: sha512.to_owned(), place, found: bytes.len() as u64, size });
    }
    let digest = ring::digest::digest(&ring::digest::SHA512, &bytes);
    if hex::encode(digest.as_ref()) != sha512 {
        return Err(BlobError::Digest(sha512.to_owned(), place));
    }
    Ok(Bytes::from(bytes))
}

impl Blobs {
    /// The images in `dir`, and (a cluster member) in the object store of `js`.
    pub(crate) fn new(dir: PathBuf, js: Option<jetstream::Context>) -> Self {
        Self {
            dir,
            cache: Mutex::new(Vec::new()),
            js,
            shared: Mutex::new(HashMap::new()),
            loads: Mutex::new(HashMap::new()),
        }
    }

    /// The image whose SHA-512 is `sha512` (hex) and whose release says it is `size` bytes,
    /// read and checked on first use: from the blob directory, else (a cluster member) from the
    /// object store, then kept in the directory. The length is checked before the image is
    /// read: whoever can write into the directory or the bucket cannot make the broker read a
    /// huge file into memory. One read per image at a time: while it runs, and for
    /// [`FETCH_RETRY`] after a failed fetch, the answer is [`BlobError::Pending`]. A fetch from
    /// the object store runs on its own task (the first asker is told `Pending` too): no
    /// session waits for the bucket.
    pub(crate) async fn image(self: &Arc<Self>, sha512: &str, size: u64) -> Result<Bytes, BlobError> {
        if !is_digest(sha512) {
            return Err(BlobError::Digest(sha512.to_owned(), DIR));
        }
        if let Some(b) = self.cached(sha512) {
            return Ok(b);
        }
        {
            let mut loads = self.loads_lock();
            match loads.get(sha512) {
                Some(Attempt::Running) => return Err(BlobError::Pending(sha512.to_owned())),
                Some(Attempt::Failed(at)) if at.elapsed() < FETCH_RETRY => {
                    return Err(BlobError::Pending(sha512.to_owned()))
                }
                _ => {}
            }
            loads.insert(sha512.to_owned(), Attempt::Running);
        }
        let guard = Loading(&self.loads, sha512);
        match (self.local(sha512, size).await, &self.js) {
            (Ok(b), _) => {
                self.remember(sha512, &b);
                drop(guard);
                Ok(b)
            }
            (Err(BlobError::Missing(..)), Some(js)) => {
                // The load stays `Running` until the task records its outcome.
                std::mem::forget(guard);
                let (blobs, js, sha512, digest) =
                    (self.clone(), js.clone(), sha512.to_owned(), sha512.to_owned());
                tokio::spawn(async move {
                    let outcome = match tokio::time::timeout(patience(size), fetch(&js, &sha512, size)).await
                    {
                        Ok(r) => r,
                        Err(_) => Err(BlobError::Deadline(sha512.clone(), patience(size))),
                    };
                    let attempt = match outcome {
                        Ok(b) => {
                            info!(image = %sha512, "firmware image fetched from the cluster's object store");
                            blobs.keep(&sha512, &b).await;
                            blobs.remember(&sha512, &b);
                            Attempt::Done
                        }
                        Err(e) => {
                            warn!(error = %e, "firmware image not fetched from the cluster's object store");
                            Attempt::Failed(Instant::now())
                        }
                    };
                    blobs.loads_lock().insert(sha512, attempt);
                });
                Err(BlobError::Pending(digest))
            }
            (Err(e), _) => {
                drop(guard);
                Err(e)
            }
        }
    }

    fn cached(&self, sha512: &str) -> Option<Bytes> {
        self.lock().iter().find(|(d, _)| d == sha512).map(|(_, b)| b.clone())
    }

    /// Keeps `bytes` in memory (the oldest of [`CACHED`] out) and ends its load.
    fn remember(&self, sha512: &str, bytes: &Bytes) {
        {
            let mut cache = self.lock();
            if !cache.iter().any(|(d, _)| d == sha512) {
                if cache.len() >= CACHED {
                    cache.remove(0);
                }
                cache.push((sha512.to_owned(), bytes.clone()));
            }
        }
        self.loads_lock().insert(sha512.to_owned(), Attempt::Done);
    }

    /// The image from the blob directory, checked.
    async fn local(&self, sha512: &str, size: u64) -> Result<Bytes, BlobError> {
        let path = self.dir.join(sha512);
        // Opened once, its length checked, then at most one byte more than the release is
        // read: a file growing meanwhile is refused too.
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let where_ = match self.js {
                    Some(_) => format!("the blob directory {} or {STORE} {BUCKET}", self.dir.display()),
                    None => format!("the blob directory {}", self.dir.display()),
                };
                return Err(BlobError::Missing(sha512.to_owned(), where_));
            }
            Err(e) => return Err(BlobError::Io(path.display().to_string(), e)),
        };
        let found = file.metadata().await.map_err(|e| BlobError::Io(path.display().to_string(), e))?.len();
        if found != size {
            return Err(BlobError::Size { digest: sha512.to_owned(), place: DIR, found, size });
        }
        read_checked(file, sha512, size, DIR).await
    }

    /// Keeps a fetched image in the blob directory (written aside, then renamed: a reader never
    /// sees part of it); a failure only costs a fetch next time.
    async fn keep(&self, sha512: &str, bytes: &Bytes) {
        let tmp = self.dir.join(format!(".{sha512}.{}", rand::random::<u32>()));
        let done = async {
            tokio::fs::create_dir_all(&self.dir).await?;
            tokio::fs::write(&tmp, bytes).await?;
            tokio::fs::rename(&tmp, self.dir.join(sha512)).await
        }
        .await;
        if let Err(e) = done {
            let _ = tokio::fs::remove_file(&tmp).await;
            warn!(image = %sha512, dir = %self.dir.display(), error = %e, "cannot keep the fetched image");
        }
    }

    /// A cluster member with this image in its blob directory makes sure the object store
    /// holds it too, byte for byte (an object under its name that is not its bytes, or that
    /// cannot be read within [`patience`], is replaced). Once per image per process; after a
    /// failure, again after [`SHARE_RETRY`]; checked again every [`SHARE_RECHECK`] (a node
    /// without the image in its directory only opens its file). Runs on its own task: the
    /// campaign runner does not wait for the bucket.
    pub(crate) fn share(self: &Arc<Self>, sha512: &str, size: u64) {
        let Some(js) = &self.js else { return };
        if !is_digest(sha512) {
            return;
        }
        {
            let mut shared = self.shared_lock();
            let due = match shared.get(sha512) {
                None => true,
                Some(Attempt::Running | Attempt::Done) => false,
                Some(Attempt::Checked(at)) => at.elapsed() >= SHARE_RECHECK,
                Some(Attempt::Failed(at)) => at.elapsed() >= SHARE_RETRY,
            };
            if !due {
                return;
            }
            shared.insert(sha512.to_owned(), Attempt::Running);
        }
        let (blobs, js, sha512) = (self.clone(), js.clone(), sha512.to_owned());
        tokio::spawn(async move {
            let outcome =
                match tokio::time::timeout(2 * patience(size), blobs.put_if_needed(&js, &sha512, size)).await
                {
                    Ok(r) => r,
                    Err(_) => Err(BlobError::Deadline(sha512.clone(), 2 * patience(size))),
                };
            let attempt = match outcome {
                Ok(_) => Attempt::Checked(Instant::now()),
                Err(e) => {
                    warn!(error = %e, "cannot share the firmware image with the cluster");
                    Attempt::Failed(Instant::now())
                }
            };
            blobs.shared_lock().insert(sha512, attempt);
        });
    }

    async fn put_if_needed(
        &self,
        js: &jetstream::Context,
        sha512: &str,
        size: u64,
    ) -> Result<bool, BlobError> {
        let store_err = |e: &dyn std::fmt::Display| BlobError::Store(sha512.to_owned(), e.to_string());
        let found = match self.cached(sha512) {
            Some(b) => Ok(b),
            None => self.local(sha512, size).await,
        };
        let bytes = match found {
            Ok(b) => b,
            // Not here: another node shares it (or nobody has it: devices are told status 1).
            Err(BlobError::Missing(..)) => return Ok(false),
            Err(e) => return Err(e),
        };
        // Anything but the image's bytes, read in time, is replaced (a forged object, a link,
        // one whose chunks never come); if the store itself fails, so does the put.
        match tokio::time::timeout(patience(size), fetch(js, sha512, size)).await {
            Ok(Ok(_)) => return Ok(false),
            Ok(Err(e)) => debug!(error = %e, "the object store's copy is not the image: putting it"),
            Err(_) => debug!(image = %sha512, "the object store's copy is not read in time: putting it"),
        }
        let store = match js.get_object_store(BUCKET).await {
            Ok(s) => s,
            Err(_) => js
                .create_object_store(jetstream::object_store::Config {
                    bucket: BUCKET.to_owned(),
                    description: Some("fleetgate firmware images, each named by its SHA-512".to_owned()),
                    ..Default::default()
                })
                .await
                .map_err(|e| store_err(&e))?,
        };
        store.put(sha512, &mut bytes.as_ref()).await.map_err(|e| store_err(&e))?;
        info!(image = %sha512, bytes = size, "firmware image put into the cluster's object store");
        Ok(true)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Bytes)>> {
        // A panic while holding this lock leaves a list of whole entries: still usable.
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn shared_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Attempt>> {
        self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn loads_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Attempt>> {
        self.loads.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The image from the cluster's object store, its size checked from the object's info before
/// it is read and its SHA-512 after; a link refused (the object read must be the one whose
/// info was checked). The caller bounds it in time ([`patience`]).
async fn fetch(js: &jetstream::Context, sha512: &str, size: u64) -> Result<Bytes, BlobError> {
    use jetstream::object_store::{GetErrorKind, InfoErrorKind};
    let missing = || BlobError::Missing(sha512.to_owned(), format!("{STORE} {BUCKET}"));
    let store_err = |e: &dyn std::fmt::Display| BlobError::Store(sha512.to_owned(), e.to_string());
    let store = match js.get_object_store(BUCKET).await {
        Ok(s) => s,
        Err(e) if e.kind() == jetstream::context::ObjectStoreErrorKind::GetStore => return Err(missing()),
        Err(e) => return Err(store_err(&e)),
    };
    let info = match store.info(sha512).await {
        Ok(i) if !i.deleted => i,
        Ok(_) => return Err(missing()),
        Err(e) if e.kind() == InfoErrorKind::NotFound => return Err(missing()),
        Err(e) => return Err(store_err(&e)),
    };
    if info.options.as_ref().is_some_and(|o| o.link.is_some()) {
        return Err(BlobError::Link(sha512.to_owned()));
    }
    if info.size as u64 != size {
        return Err(BlobError::Size {
            digest: sha512.to_owned(),
            place: STORE,
            found: info.size as u64,
            size,
        });
    }
    let object = match store.get(sha512).await {
        Ok(o) => o,
        Err(e) if e.kind() == GetErrorKind::NotFound => return Err(missing()),
        Err(e) => return Err(store_err(&e)),
    };
    // Replaced by a link between the two reads: `get` followed it.
    if object.info().nuid != info.nuid {
        return Err(BlobError::Link(sha512.to_owned()));
    }
    read_checked(object, sha512, size, STORE).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_image_is_served_only_while_its_bytes_match_its_name() {
        let dir = tempfile_dir();
        let image = b"firmware image".to_vec();
        let name = hex::encode(ring::digest::digest(&ring::digest::SHA512, &image).as_ref());
        std::fs::write(dir.join(&name), &image).unwrap_or_else(|e| panic!("{e}"));
        let other = "0".repeat(128);
        std::fs::write(dir.join(&other), &image).unwrap_or_else(|e| panic!("{e}"));
        let blobs = Arc::new(Blobs::new(dir.clone(), None));
        assert_eq!(blobs.image(&name, image.len() as u64).await.ok().as_deref(), Some(image.as_slice()));
        assert!(matches!(blobs.image(&other, image.len() as u64).await, Err(BlobError::Digest(..))));
        assert!(matches!(blobs.image(&"1".repeat(128), 1).await, Err(BlobError::Missing(..))));
        assert!(matches!(blobs.image("../etc/passwd", 1).await, Err(BlobError::Digest(..))));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_blob_longer_than_its_release_is_refused_before_it_is_read() {
        // Someone who can write into `ota_blob_dir` puts a huge file under a release's name:
        // the broker read it whole into memory (then refused the digest) at every device's
        // first request; the job's size now refuses it from its length alone.
        let dir = tempfile_dir();
        let image = b"firmware image".to_vec();
        let name = hex::encode(ring::digest::digest(&ring::digest::SHA512, &image).as_ref());
        let f = std::fs::File::create(dir.join(&name)).unwrap_or_else(|e| panic!("{e}"));
        f.set_len(64 << 20).unwrap_or_else(|e| panic!("{e}")); // sparse: no disk, 64 MiB to read
        let blobs = Arc::new(Blobs::new(dir.clone(), None));
        assert!(matches!(blobs.image(&name, image.len() as u64).await, Err(BlobError::Size { .. })));
        std::fs::write(dir.join(&name), &image).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(blobs.image(&name, image.len() as u64 + 1).await, Err(BlobError::Size { .. })));
        assert_eq!(blobs.image(&name, image.len() as u64).await.ok().as_deref(), Some(image.as_slice()));
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "fleet-blobs-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        d
    }
}
