//! Two credential slots (A/B) that survive power loss: a new identity is staged in the spare
//! slot, tried, and made active only once the broker admitted it; until then, and after any
//! interrupted write, the device boots with the identity it had.
//!
//! A slot is `magic | state | seq | len | crc32 | bundle`, the CRC over everything before it and
//! the bundle. A slot whose CRC does not match (a write cut by a power loss) is ignored. The
//! active identity is the `Active` slot with the highest sequence number; a `Pending` slot with
//! a higher one is the candidate to try. Committing rewrites the candidate as `Active` (same
//! bytes, new state): cut half-way, that slot is invalid and the old identity is still active.

/// Which slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Slot {
    /// The first slot.
    A,
    /// The second slot.
    B,
}

impl Slot {
    fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

/// The raw storage of the two slots (flash pages, EEPROM, a file): whole-slot reads and writes.
pub trait SlotStorage {
    /// Storage error.
    type Error;
    /// Bytes per slot (header included).
    fn slot_size(&self) -> usize;
    /// Reads `buf.len()` bytes from the start of `slot`.
    fn read(&mut self, slot: Slot, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Erases `slot` and writes `data` at its start (may be cut by a power loss anywhere).
    fn write(&mut self, slot: Slot, data: &[u8]) -> Result<(), Self::Error>;
}

/// Why a store operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum StoreError<E> {
    /// The storage failed.
    Storage(E),
    /// The bundle does not fit a slot, or the caller's buffer.
    TooLarge,
    /// No valid active identity (a device never provisioned, or both slots corrupt).
    Empty,
    /// `commit` without a staged candidate.
    NoCandidate,
}

const MAGIC: [u8; 4] = *b"FGS1";
const HEADER: usize = 4 + 1 + 4 + 4 + 4;
const PENDING: u8 = 1;
const ACTIVE: u8 = 2;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// A slot's header, if the slot is valid.
#[derive(Debug, Clone, Copy)]
struct Meta {
    state: u8,
    seq: u32,
    len: usize,
}

/// The two slots over `S`. Every method takes `buf`, scratch of at least one slot's size (no
/// allocator: the caller owns the memory).
#[derive(Debug)]
pub struct CredentialStore<S> {
    storage: S,
}

impl<S: SlotStorage> CredentialStore<S> {
    /// Over `storage`.
    pub fn new(storage: S) -> Self {
        Self { storage }
    }

    /// The storage (e.g. to inspect or reconfigure it).
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    /// The storage, back.
    pub fn into_inner(self) -> S {
        self.storage
    }

    /// Reads `slot` into `buf` and checks it.
    fn meta(&mut self, slot: Slot, buf: &mut [u8]) -> Result<Option<Meta>, StoreError<S::Error>> {
        let size = self.storage.slot_size().min(buf.len());
        if size < HEADER {
            return Err(StoreError::TooLarge);
        }
        self.storage.read(slot, &mut buf[..size]).map_err(StoreError::Storage)?;
        if buf[..4] != MAGIC {
            return Ok(None);
        }
        let u32_at = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let (state, seq, len, crc) = (buf[4], u32_at(5), u32_at(9) as usize, u32_at(13));
        if !matches!(state, PENDING | ACTIVE) || HEADER + len > size {
            return Ok(None);
        }
        let mut digest = CRC.digest();
        digest.update(&buf[..13]);
        digest.update(&buf[HEADER..HEADER + len]);
        Ok((digest.finalize() == crc).then_some(Meta { state, seq, len }))
    }

    fn metas(&mut self, buf: &mut [u8]) -> Result<[Option<Meta>; 2], StoreError<S::Error>> {
        Ok([self.meta(Slot::A, buf)?, self.meta(Slot::B, buf)?])
    }

    /// The active slot and its header.
    fn active_meta(&mut self, buf: &mut [u8]) -> Result<Option<(Slot, Meta)>, StoreError<S::Error>> {
        let [a, b] = self.metas(buf)?;
        let pick = |m: Option<Meta>, s: Slot| m.filter(|m| m.state == ACTIVE).map(|m| (s, m));
        Ok(match (pick(a, Slot::A), pick(b, Slot::B)) {
            (Some(x), Some(y)) => Some(if y.1.seq.wrapping_sub(x.1.seq) as i32 > 0 { y } else { x }),
            (x, y) => x.or(y),
        })
    }

    /// Copies the active identity's bundle into `out` (reading through `buf`); returns its length.
    pub fn load(&mut self, buf: &mut [u8], out: &mut [u8]) -> Result<usize, StoreError<S::Error>> {
        let (slot, m) = self.active_meta(buf)?.ok_or(StoreError::Empty)?;
        self.copy(slot, m, buf, out)
    }

    fn copy(
        &mut self,
        slot: Slot,
        m: Meta,
        buf: &mut [u8],
        out: &mut [u8],
    ) -> Result<usize, StoreError<S::Error>> {
        // `buf` holds the last slot read: read this one again.
        self.meta(slot, buf)?;
        let dst = out.get_mut(..m.len).ok_or(StoreError::TooLarge)?;
        dst.copy_from_slice(&buf[HEADER..HEADER + m.len]);
        Ok(m.len)
    }

    /// Writes `bundle` into `slot` with `state` and `seq` (through `buf`).
    fn put(
        &mut self,
        slot: Slot,
        state: u8,
        seq: u32,
        bundle: &[u8],
        buf: &mut [u8],
    ) -> Result<(), StoreError<S::Error>> {
        let total = HEADER + bundle.len();
        if total > self.storage.slot_size() || total > buf.len() {
            return Err(StoreError::TooLarge);
        }
        buf[..4].copy_from_slice(&MAGIC);
        buf[4] = state;
        buf[5..9].copy_from_slice(&seq.to_le_bytes());
        buf[9..13].copy_from_slice(&(bundle.len() as u32).to_le_bytes());
        buf[HEADER..total].copy_from_slice(bundle);
        let mut digest = CRC.digest();
        digest.update(&buf[..13]);
        digest.update(bundle);
        buf[13..17].copy_from_slice(&digest.finalize().to_le_bytes());
        self.storage.write(slot, &buf[..total]).map_err(StoreError::Storage)
    }

    /// First provisioning (factory or claim): `bundle` becomes the active identity.
    pub fn provision(&mut self, bundle: &[u8], buf: &mut [u8]) -> Result<(), StoreError<S::Error>> {
        let (slot, seq) = match self.active_meta(buf)? {
            Some((s, m)) => (s.other(), m.seq.wrapping_add(1)),
            None => (Slot::A, 1),
        };
        self.put(slot, ACTIVE, seq, bundle, buf)
    }

    /// Stages a new identity in the spare slot, to be tried; the active one stays active.
    pub fn stage(&mut self, bundle: &[u8], buf: &mut [u8]) -> Result<(), StoreError<S::Error>> {
        let (active, m) = self.active_meta(buf)?.ok_or(StoreError::Empty)?;
        self.put(active.other(), PENDING, m.seq.wrapping_add(1), bundle, buf)
    }

    /// The staged identity, if one is newer than the active one: copied into `out`.
    pub fn candidate(
        &mut self,
        buf: &mut [u8],
        out: &mut [u8],
    ) -> Result<Option<usize>, StoreError<S::Error>> {
        let Some((active, am)) = self.active_meta(buf)? else { return Ok(None) };
        let spare = active.other();
        match self.meta(spare, buf)? {
            Some(m) if m.state == PENDING && m.seq == am.seq.wrapping_add(1) => {
                self.copy(spare, m, buf, out).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The staged identity was refused (or is no longer wanted): its slot is erased, the active
    /// identity stays. Returns whether there was one.
    pub fn abandon(&mut self, buf: &mut [u8]) -> Result<bool, StoreError<S::Error>> {
        let Some((active, am)) = self.active_meta(buf)? else { return Ok(false) };
        match self.meta(active.other(), buf)? {
            Some(m) if m.state == PENDING && m.seq == am.seq.wrapping_add(1) => {
                self.storage.write(active.other(), &[]).map_err(StoreError::Storage)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The broker admitted the staged identity: it becomes the active one.
    pub fn commit(&mut self, buf: &mut [u8], scratch: &mut [u8]) -> Result<(), StoreError<S::Error>> {
        let len = self.candidate(buf, scratch)?.ok_or(StoreError::NoCandidate)?;
        let (active, am) = self.active_meta(buf)?.ok_or(StoreError::Empty)?;
        self.put(active.other(), ACTIVE, am.seq.wrapping_add(1), &scratch[..len], buf)
    }
}

impl<E: core::fmt::Display> core::fmt::Display for StoreError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Storage(e) => write!(f, "storage failed: {e}"),
            Self::TooLarge => f.write_str("the credentials do not fit a slot"),
            Self::Empty => f.write_str("no valid identity in either slot"),
            Self::NoCandidate => f.write_str("no staged identity to commit"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two slots in memory; a write may be cut after `cut_after` bytes (a power loss), leaving
    /// the erased slot partly written.
    struct Mem {
        slots: [[u8; 256]; 2],
        cut_after: Option<usize>,
    }

    impl SlotStorage for Mem {
        type Error = ();
        fn slot_size(&self) -> usize {
            256
        }
        fn read(&mut self, slot: Slot, buf: &mut [u8]) -> Result<(), ()> {
            buf.copy_from_slice(&self.slots[slot as usize][..buf.len()]);
            Ok(())
        }
        fn write(&mut self, slot: Slot, data: &[u8]) -> Result<(), ()> {
            let s = &mut self.slots[slot as usize];
            s.fill(0xff); // erased flash
            let n = self.cut_after.take().unwrap_or(data.len()).min(data.len());
            s[..n].copy_from_slice(&data[..n]);
            if n < data.len() {
                return Err(()); // the device lost power here
            }
            Ok(())
        }
    }

    fn store() -> (CredentialStore<Mem>, [u8; 256], [u8; 256]) {
        let mut st = CredentialStore::new(Mem { slots: [[0xff; 256]; 2], cut_after: None });
        let mut buf = [0u8; 256];
        st.provision(b"identity-1", &mut buf).expect("provision");
        (st, buf, [0u8; 256])
    }

    fn loaded(st: &mut CredentialStore<Mem>, buf: &mut [u8], out: &mut [u8]) -> Vec<u8> {
        let n = st.load(buf, out).expect("load");
        out[..n].to_vec()
    }

    #[test]
    fn a_staged_identity_is_tried_then_committed_and_rotation_goes_on() {
        let (mut st, mut buf, mut out) = store();
        assert_eq!(loaded(&mut st, &mut buf, &mut out), b"identity-1");
        st.stage(b"identity-2", &mut buf).expect("stage");
        // Staged, not active: a reboot now still runs the old identity, and offers the new one.
        assert_eq!(loaded(&mut st, &mut buf, &mut out), b"identity-1");
        assert_eq!(st.candidate(&mut buf, &mut out).expect("candidate"), Some(10));
        assert_eq!(&out[..10], b"identity-2");
        let mut scratch = [0u8; 256];
        st.commit(&mut buf, &mut scratch).expect("commit");
        assert_eq!(loaded(&mut st, &mut buf, &mut out), b"identity-2");
        assert_eq!(st.candidate(&mut buf, &mut out).expect("none"), None);
        // A refused candidate is abandoned: the active identity stays, nothing is offered.
        st.stage(b"identity-x", &mut buf).expect("stage");
        assert!(st.abandon(&mut buf).expect("abandon"));
        assert_eq!(st.candidate(&mut buf, &mut out).expect("none"), None);
        assert_eq!(loaded(&mut st, &mut buf, &mut out), b"identity-2");
        assert!(!st.abandon(&mut buf).expect("nothing to abandon"));
        // And again, into the other slot.
        st.stage(b"identity-3", &mut buf).expect("stage");
        st.commit(&mut buf, &mut scratch).expect("commit");
        assert_eq!(loaded(&mut st, &mut buf, &mut out), b"identity-3");
    }

    #[test]
    fn a_power_loss_in_any_write_leaves_the_old_identity_working() {
        for cut in 0..(HEADER + 10) {
            // Cut while staging.
            let (mut st, mut buf, mut out) = store();
            st.storage.cut_after = Some(cut);
            assert!(st.stage(b"identity-2", &mut buf).is_err());
            assert_eq!(loaded(&mut st, &mut buf, &mut out), b"identity-1", "stage cut at {cut}");
            assert_eq!(st.candidate(&mut buf, &mut out).expect("candidate"), None);
            // Cut while committing.
            let (mut st, mut buf, mut out) = store();
            st.stage(b"identity-2", &mut buf).expect("stage");
            st.storage.cut_after = Some(cut);
            let mut scratch = [0u8; 256];
            assert!(st.commit(&mut buf, &mut scratch).is_err());
            assert_eq!(loaded(&mut st, &mut buf, &mut out), b"identity-1", "commit cut at {cut}");
        }
    }

    #[test]
    fn limits_and_an_empty_store() {
        let mut st = CredentialStore::new(Mem { slots: [[0xff; 256]; 2], cut_after: None });
        let (mut buf, mut out) = ([0u8; 256], [0u8; 256]);
        assert_eq!(st.load(&mut buf, &mut out), Err(StoreError::Empty));
        assert_eq!(st.stage(b"x", &mut buf), Err(StoreError::Empty));
        assert_eq!(st.provision(&[0u8; 250], &mut buf), Err(StoreError::TooLarge));
        st.provision(b"one", &mut buf).expect("provision");
        let mut scratch = [0u8; 256];
        assert_eq!(st.commit(&mut buf, &mut scratch), Err(StoreError::NoCandidate));
    }
}
