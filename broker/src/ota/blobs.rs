//! Release images, stored once (docs/spec/ota.md, "Images stored once"): a directory of files
//! each named by its image's SHA-512 in hex, copied in by `fleet-provision ota publish`. An
//! image is read when a device first asks for it, its digest checked against its name (a file
//! changed on disk is refused, not served), and kept in memory while it is in use.

use std::path::PathBuf;
use std::sync::Mutex;

use bytes::Bytes;

/// Images held in memory at most; more and the oldest are read again when asked for.
const CACHED: usize = 8;

/// Why an image cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum BlobError {
    /// Not in the blob directory (not published with `ota publish`).
    #[error("image {0} is not in the blob directory {1} (fleet-provision ota publish)")]
    Missing(String, String),
    /// The file's SHA-512 is not its name.
    #[error("image {0} in the blob directory does not match its SHA-512: refused")]
    Digest(String),
    /// The file's length is not the release's size: refused before it is read.
    #[error("image {digest} in the blob directory is {found} bytes, its release {size}: refused")]
    Size { digest: String, found: u64, size: u64 },
    /// Unreadable.
    #[error("image {0}: {1}")]
    Io(String, std::io::Error),
}

/// The blob directory and the images in use.
#[derive(Debug)]
pub(crate) struct Blobs {
    dir: PathBuf,
    cache: Mutex<Vec<(String, Bytes)>>,
}

/// Is `s` a SHA-512 in lowercase hex?
fn is_digest(s: &str) -> bool {
    s.len() == 128 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Blobs {
    /// The images in `dir`.
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self { dir, cache: Mutex::new(Vec::new()) }
    }

    /// The image whose SHA-512 is `sha512` (hex) and whose release says it is `size` bytes,
    /// read and checked on first use. The length is checked before the file is read: whoever
    /// can write into the directory cannot make the broker read a huge file into memory.
    pub(crate) async fn image(&self, sha512: &str, size: u64) -> Result<Bytes, BlobError> {
        if !is_digest(sha512) {
            return Err(BlobError::Digest(sha512.to_owned()));
        }
        if let Some(b) = self.lock().iter().find(|(d, _)| d == sha512).map(|(_, b)| b.clone()) {
            return Ok(b);
        }
        let path = self.dir.join(sha512);
        // Opened once, its length checked, then at most one byte more than the release is
        // read: a file growing meanwhile is refused too.
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::Missing(sha512.to_owned(), self.dir.display().to_string()))
            }
            Err(e) => return Err(BlobError::Io(path.display().to_string(), e)),
        };
        let io = |e| BlobError::Io(path.display().to_string(), e);
        let found = file.metadata().await.map_err(io)?.len();
        if found != size {
            return Err(BlobError::Size { digest: sha512.to_owned(), found, size });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        tokio::io::AsyncReadExt::read_to_end(
            &mut tokio::io::AsyncReadExt::take(file, size.saturating_add(1)),
            &mut bytes,
        )
        .await
        .map_err(io)?;
        if bytes.len() as u64 != size {
            return Err(BlobError::Size { digest: sha512.to_owned(), found: bytes.len() as u64, size });
        }
        let digest = ring::digest::digest(&ring::digest::SHA512, &bytes);
        if hex::encode(digest.as_ref()) != sha512 {
            return Err(BlobError::Digest(sha512.to_owned()));
        }
        let bytes = Bytes::from(bytes);
        let mut cache = self.lock();
        if cache.len() >= CACHED {
            cache.remove(0);
        }
        cache.push((sha512.to_owned(), bytes.clone()));
        Ok(bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Bytes)>> {
        // A panic while holding this lock leaves a list of whole entries: still usable.
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
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
        let blobs = Blobs::new(dir.clone());
        assert_eq!(blobs.image(&name, image.len() as u64).await.ok().as_deref(), Some(image.as_slice()));
        assert!(matches!(blobs.image(&other, image.len() as u64).await, Err(BlobError::Digest(_))));
        assert!(matches!(blobs.image(&"1".repeat(128), 1).await, Err(BlobError::Missing(..))));
        assert!(matches!(blobs.image("../etc/passwd", 1).await, Err(BlobError::Digest(_))));
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
        let blobs = Blobs::new(dir.clone());
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
