-- Signed firmware releases (docs/spec/ota.md), written by `fleet-provision release` with a
-- `release` entry in the issuance log. One per board and version: a device orders releases by
-- version, so two images under one version would be ambiguous. The manifest is the truth (its
-- 268 bytes are what the device is offered and what the manifest signature covers); the other
-- columns are its fields, for queries. Hex columns are lowercase. Times are unix seconds.
CREATE TABLE releases (
    board        TEXT NOT NULL,
    version      TEXT NOT NULL,          -- MAJOR.MINOR.PATCH
    min_version  TEXT NOT NULL,          -- the oldest running version that may install it
    size         BIGINT NOT NULL,        -- image bytes
    sha512       TEXT NOT NULL,          -- SHA-512 of the image
    signature    TEXT NOT NULL,          -- Ed25519 over the SHA-512 digest (embassy-boot's)
    key_id       TEXT NOT NULL,          -- first 8 bytes of SHA-256 over the public key
    manifest     BYTEA NOT NULL,         -- the signed manifest, layout fgota-m1
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (board, version)
);
