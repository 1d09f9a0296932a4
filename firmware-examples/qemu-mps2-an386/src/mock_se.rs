//! A mock secure element on its own "bus", to show where a real one plugs in.
//!
//! The chip side (`MockChip`) holds the key in its own storage, personalised once (at the
//! factory; here from the bundle at first boot) and never read back. The firmware side
//! (`SeSigner`) speaks a small command/response protocol to it, shaped like an ATECC608's:
//! `NONCE` loads the 32-byte digest into the chip's TempKey, `SIGN` signs TempKey with the key
//! in slot 0 and returns `r ‖ s`, `GENKEY` (public mode) returns the public key. Every frame
//! carries a CRC-16 as on the real I2C link. A real driver replaces `MockChip::transact` with
//! the I2C write/poll/read sequence; `SeSigner` (the `DeviceSigner`) stays as it is.

use fleet_device::tls::{DeviceSigner, RamSigner};

const NONCE: u8 = 0x16;
const SIGN: u8 = 0x41;
const GENKEY: u8 = 0x40;
const OK: u8 = 0x00;
const EXEC_ERROR: u8 = 0x0F;

const CRC: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_IBM_3740);

/// The chip: its key slot and its TempKey register.
pub(crate) struct MockChip {
    slot0: Option<RamSigner>,
    tempkey: Option<[u8; 32]>,
    /// Signatures made (for the example's log).
    pub(crate) signed: u32,
}

impl MockChip {
    /// A chip with its key slot written (factory personalisation); `None` if the key is not a
    /// P-256 key.
    pub(crate) fn personalised(key_der: &[u8]) -> Self {
        Self { slot0: RamSigner::from_sec1_der(key_der), tempkey: None, signed: 0 }
    }

    /// One bus transaction: a command frame in, a response frame out (its length).
    fn transact(&mut self, cmd: &[u8], resp: &mut [u8; 68]) -> usize {
        let status_only = |resp: &mut [u8; 68], status: u8| {
            resp[0] = status;
            seal(resp, 1)
        };
        let Some(body) = open(cmd) else { return status_only(resp, EXEC_ERROR) };
        match (body.first().copied(), &mut self.slot0) {
            (Some(NONCE), _) if body.len() == 33 => {
                let mut t = [0u8; 32];
                t.copy_from_slice(&body[1..]);
                self.tempkey = Some(t);
                status_only(resp, OK)
            }
            (Some(SIGN), Some(key)) => match self.tempkey.take().and_then(|t| key.sign_digest(&t)) {
                Some(rs) => {
                    self.signed += 1;
                    resp[0] = OK;
                    resp[1..65].copy_from_slice(&rs);
                    seal(resp, 65)
                }
                None => status_only(resp, EXEC_ERROR),
            },
            (Some(GENKEY), Some(key)) => match key.public_key() {
                Some(p) => {
                    resp[0] = OK;
                    resp[1..65].copy_from_slice(&p[1..]);
                    seal(resp, 65)
                }
                None => status_only(resp, EXEC_ERROR),
            },
            _ => status_only(resp, EXEC_ERROR),
        }
    }
}

/// Appends the CRC to the first `n` bytes; returns the frame length.
fn seal(buf: &mut [u8], n: usize) -> usize {
    let crc = CRC.checksum(&buf[..n]).to_le_bytes();
    buf[n..n + 2].copy_from_slice(&crc);
    n + 2
}

/// The body of a frame whose CRC checks.
fn open(frame: &[u8]) -> Option<&[u8]> {
    let (body, crc) = frame.split_at(frame.len().checked_sub(2)?);
    (CRC.checksum(body).to_le_bytes() == crc).then_some(body)
}

/// The firmware's side: the `DeviceSigner` the SDK signs the handshake with.
pub(crate) struct SeSigner<'c>(pub(crate) &'c mut MockChip);

impl SeSigner<'_> {
    fn command(&mut self, body: &[u8], resp: &mut [u8; 68]) -> Option<usize> {
        let mut cmd = [0u8; 40];
        cmd[..body.len()].copy_from_slice(body);
        let n = seal(&mut cmd, body.len());
        let m = self.0.transact(&cmd[..n], resp);
        let ok = open(&resp[..m]).is_some_and(|b| b.first() == Some(&OK));
        ok.then_some(m - 2)
    }
}

impl DeviceSigner for SeSigner<'_> {
    fn public_key(&mut self) -> Option<[u8; 65]> {
        let mut resp = [0u8; 68];
        if self.command(&[GENKEY], &mut resp)? != 65 {
            return None;
        }
        let mut key = [4u8; 65];
        key[1..].copy_from_slice(&resp[1..65]);
        Some(key)
    }

    fn sign_digest(&mut self, digest: &[u8; 32]) -> Option<[u8; 64]> {
        let mut resp = [0u8; 68];
        let mut nonce = [NONCE; 33];
        nonce[1..].copy_from_slice(digest);
        self.command(&nonce, &mut resp)?;
        if self.command(&[SIGN], &mut resp)? != 65 {
            return None;
        }
        let mut rs = [0u8; 64];
        rs.copy_from_slice(&resp[1..65]);
        Some(rs)
    }
}
