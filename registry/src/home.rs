//! The fleet home: the one place that names the files a provisioning station writes and a broker
//! reads.
//!
//! ```text
//! HOME/
//!   root-ca.pem            root CA certificate (its key goes offline after init)
//!   device-ca.pem          device issuing CA: the broker's client CA
//!   device-ca-chain.pem    device CA + root, for `openssl verify -CAfile`
//!   server-ca.pem          server CA: what devices pin
//!   server-ca-chain.pem    server CA + root, for OpenSSL-based clients
//!   crl.pem                the latest signed CRL (replaced atomically)
//!   registry.db            the SQLite registry (default database)
//!   station.json           station settings
//!   firmware.pub           the firmware signing public key, 32 raw bytes (what devices embed)
//!   firmware.pub.pem       the same key as PEM, for OpenSSL
//!   private/               CA keys and the firmware signing key, mode 0700 (files 0600)
//!   broker-tls/            the broker's certificate chain, key and client CA
//!   releases/              signed firmware releases, one directory each (`<board>-<version>`)
//! ```

use std::path::{Path, PathBuf};

/// Paths inside a fleet home (which need not exist yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// The default home directory, relative to the working directory.
    pub const DEFAULT_DIR: &'static str = "fleet-pki";

    /// A home at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Directory of the CA keys.
    pub fn private_dir(&self) -> PathBuf {
        self.root.join("private")
    }
    /// Root CA certificate.
    pub fn root_ca(&self) -> PathBuf {
        self.root.join("root-ca.pem")
    }
    /// Root CA key: move it offline after `init`.
    pub fn root_ca_key(&self) -> PathBuf {
        self.private_dir().join("root-ca.key")
    }
    /// Device issuing CA certificate.
    pub fn device_ca(&self) -> PathBuf {
        self.root.join("device-ca.pem")
    }
    /// Device issuing CA key.
    pub fn device_ca_key(&self) -> PathBuf {
        self.private_dir().join("device-ca.key")
    }
    /// Device CA + root, for `openssl verify -CAfile`.
    pub fn device_ca_chain(&self) -> PathBuf {
        self.root.join("device-ca-chain.pem")
    }
    /// Server CA certificate.
    pub fn server_ca(&self) -> PathBuf {
        self.root.join("server-ca.pem")
    }
    /// Server CA key.
    pub fn server_ca_key(&self) -> PathBuf {
        self.private_dir().join("server-ca.key")
    }
    /// Server CA + root, for OpenSSL-based clients (mosquitto_pub, paho) that need a root.
    pub fn server_ca_chain(&self) -> PathBuf {
        self.root.join("server-ca-chain.pem")
    }
    /// The firmware image-signing key (Ed25519, PKCS#8 PEM), kept like the root CA key: created
    /// once, mode 0600, and movable offline (`release --key` reads it from elsewhere).
    pub fn firmware_key(&self) -> PathBuf {
        self.private_dir().join("firmware.key")
    }
    /// The firmware signing public key, 32 raw bytes: what a device's firmware embeds and gives
    /// to embassy-boot's `verify_and_mark_updated`.
    pub fn firmware_pub(&self) -> PathBuf {
        self.root.join("firmware.pub")
    }
    /// The firmware signing public key as PEM (SubjectPublicKeyInfo), for OpenSSL.
    pub fn firmware_pub_pem(&self) -> PathBuf {
        self.root.join("firmware.pub.pem")
    }
    /// Where `release` writes signed releases by default, one directory each.
    pub fn releases_dir(&self) -> PathBuf {
        self.root.join("releases")
    }
    /// Where `ota publish` copies release images for a broker to serve, each named by its
    /// SHA-512 in hex (the broker's `ota_blob_dir` default).
    pub fn ota_blobs(&self) -> PathBuf {
        self.root.join("ota-blobs")
    }
    /// Latest CRL (PEM).
    pub fn crl(&self) -> PathBuf {
        self.root.join("crl.pem")
    }
    /// Station settings.
    pub fn settings(&self) -> PathBuf {
        self.root.join("station.json")
    }
    /// The SQLite registry file.
    pub fn registry_db(&self) -> PathBuf {
        self.root.join("registry.db")
    }
    /// Default registry URL: the SQLite file in the home.
    pub fn default_database_url(&self) -> String {
        format!("sqlite://{}", self.registry_db().display())
    }
    /// Where the station writes the broker's TLS files by default, and the broker reads them.
    pub fn broker_tls(&self) -> BrokerTls {
        BrokerTls::new(self.root.join(BrokerTls::DEFAULT_DIR))
    }
}

/// A broker's TLS directory, as `server-cert` writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerTls {
    dir: PathBuf,
}

impl BrokerTls {
    /// Its name inside the home.
    pub const DEFAULT_DIR: &'static str = "broker-tls";
    /// File name of the certificate chain (leaf, then server CA).
    pub const CERT: &'static str = "cert.pem";
    /// File name of the private key.
    pub const KEY: &'static str = "key.pem";
    /// File name of the client CA (a copy of the device issuing CA).
    pub const CLIENT_CA: &'static str = "client-ca.pem";

    /// The directory `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Certificate chain.
    pub fn cert(&self) -> PathBuf {
        self.dir.join(Self::CERT)
    }
    /// Private key.
    pub fn key(&self) -> PathBuf {
        self.dir.join(Self::KEY)
    }
    /// Client CA copy.
    pub fn client_ca(&self) -> PathBuf {
        self.dir.join(Self::CLIENT_CA)
    }
}

/// File names inside one device's (or service's) credential directory.
#[derive(Debug, Clone, Copy)]
pub struct IdentityFiles;

impl IdentityFiles {
    /// Certificate (PEM).
    pub const CERT: &'static str = "cert.pem";
    /// Private key (PEM, mode 0600).
    pub const KEY: &'static str = "key.pem";
    /// The server CA alone (what the device SDK pins).
    pub const SERVER_CA: &'static str = "server-ca.pem";
    /// Server CA + root, for OpenSSL-based clients.
    pub const BROKER_TRUST: &'static str = "broker-trust.pem";
    /// The credential bundle the SDK loads (postcard).
    pub const BUNDLE: &'static str = "credentials.bin";
    /// A claim's device-id prefix (UTF-8, no newline): devices it creates are named
    /// `<prefix>-...`. Beside a claim's bundle, for the factory's firmware configuration and for
    /// `fleet-sim claim`; the issuer holds the authoritative copy in the registry.
    pub const CLAIM_PREFIX: &'static str = "id-prefix";
}

/// File names inside one signed release's directory (docs/spec/ota.md).
#[derive(Debug, Clone, Copy)]
pub struct ReleaseFiles;

impl ReleaseFiles {
    /// The image, byte for byte as given.
    pub const IMAGE: &'static str = "image.bin";
    /// SHA-512 of the image, 64 raw bytes: the message the image signature signs.
    pub const DIGEST: &'static str = "image.sha512";
    /// Ed25519 signature over the digest, 64 raw bytes (embassy-boot's `verify_and_mark_updated`).
    pub const SIGNATURE: &'static str = "image.sig";
    /// The signed manifest, layout `fgota-m1` (268 bytes): what a device is offered.
    pub const MANIFEST: &'static str = "manifest.bin";
    /// The same manifest as JSON, for people and the admin side.
    pub const MANIFEST_JSON: &'static str = "manifest.json";
}
