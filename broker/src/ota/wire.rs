//! The chunk request and the chunk (docs/spec/ota.md, "Delivery over MQTT"): sans-IO, little
//! endian, pinned by byte vectors below.

/// A chunk request is exactly this long.
pub(crate) const REQUEST_LEN: usize = 14;
/// A chunk's header: tag (8), offset (4), status (1).
pub(crate) const CHUNK_HEADER: usize = 13;

/// The first 8 bytes of an image's SHA-512: names a release on the wire.
pub(crate) type Tag = [u8; 8];

/// `ota/get`: tag, offset, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) tag: Tag,
    pub(crate) offset: u32,
    pub(crate) len: u16,
}

impl Request {
    /// Decodes a request: exactly 14 bytes, length at least 1.
    pub(crate) fn decode(b: &[u8]) -> Option<Request> {
        let b: &[u8; REQUEST_LEN] = b.try_into().ok()?;
        let mut tag = [0; 8];
        tag.copy_from_slice(&b[..8]);
        let offset = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let len = u16::from_le_bytes([b[12], b[13]]);
        (len >= 1).then_some(Request { tag, offset, len })
    }
}

/// A chunk's status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Status {
    /// Data follows.
    Data = 0,
    /// No open job of this device for this release: stop.
    NotOffered = 1,
    /// The offset is at or past the end of the image.
    BeyondImage = 2,
    /// Too many requests outstanding: ask again later.
    Busy = 3,
}

impl Status {
    /// Its `fleet_ota_refused_total` reason.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Status::Data => "data",
            Status::NotOffered => "not_offered",
            Status::BeyondImage => "beyond_image",
            Status::Busy => "busy",
        }
    }
}

/// Encodes a chunk: the request's tag and offset, the status, then `data`.
pub(crate) fn chunk(tag: &Tag, offset: u32, status: Status, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER + data.len());
    out.extend_from_slice(tag);
    out.extend_from_slice(&offset.to_le_bytes());
    out.push(status as u8);
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_from_their_fourteen_bytes() {
        let b = [0x3f, 0xa9, 0xaa, 0x1d, 0xe8, 0x0d, 0x06, 0x43, 0x00, 0x04, 0x01, 0x00, 0x00, 0x04];
        assert_eq!(
            Request::decode(&b),
            Some(Request {
                tag: [0x3f, 0xa9, 0xaa, 0x1d, 0xe8, 0x0d, 0x06, 0x43],
                offset: 0x0001_0400,
                len: 1024
            })
        );
        assert_eq!(Request::decode(&b[..13]), None);
        assert_eq!(Request::decode(&[b.as_slice(), &[0]].concat()), None);
        let mut zero = b;
        zero[12] = 0;
        zero[13] = 0;
        assert_eq!(Request::decode(&zero), None);
    }

    #[test]
    fn chunks_carry_tag_offset_status_and_data() {
        let tag = [1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(
            chunk(&tag, 0x0102_0304, Status::Data, b"ab"),
            [1, 2, 3, 4, 5, 6, 7, 8, 4, 3, 2, 1, 0, b'a', b'b']
        );
        assert_eq!(chunk(&tag, 7, Status::NotOffered, &[]), [1, 2, 3, 4, 5, 6, 7, 8, 7, 0, 0, 0, 1]);
        assert_eq!(chunk(&tag, 7, Status::Busy, &[])[12], 3);
        assert_eq!(chunk(&tag, 7, Status::BeyondImage, &[])[12], 2);
    }
}
