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

    /// The image whose SHA-512 is `sha512` (hex), read and checked on first use.
    pub(crate) async fn image(&self, sha512: &str) -> Result<Bytes, BlobError> {
        if !is_digest(sha512) {
            return Err(BlobError::Digest(sha512.to_owned()));
        }
        if let Some(b) = self.lock().iter().find(|(d, _)| d == sha512).map(|(_, b)| b.clone()) {
            return Ok(b);
        }
        let path = self.dir.join(sha512);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::Missing(sha512.to_owned(), self.dir.display().to_string()))
            }
            Err(e) => return Err(BlobError::Io(path.display().to_string(), e)),
        };
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
        assert_eq!(blobs.image(&name).await.ok().as_deref(), Some(image.as_slice()));
        assert!(matches!(blobs.image(&other).await, Err(BlobError::Digest(_))));
        assert!(matches!(blobs.image(&"1".repeat(128)).await, Err(BlobError::Missing(..))));
        assert!(matches!(blobs.image("../etc/passwd").await, Err(BlobError::Digest(_))));
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
