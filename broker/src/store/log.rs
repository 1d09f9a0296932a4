//! The telemetry log: where a single node's acknowledged device messages are durable first.
//!
//! A group commit is one `write` of its records to the end of the current segment file and, with
//! `store_fsync = every-commit` (the default), one `fdatasync` before any of its PUBACKs; the
//! registry's `telemetry` table is filled from the log afterwards, in large batches, by
//! [`super::feed`]. So a PUBACK waits for a sequential append instead of B-tree inserts, and
//! the table's inserts run off the acknowledgement path.
//!
//! On disk (`store_log_dir`, default HOME/telemetry-log):
//! - `id`: the log's number (a random positive i64, decimal), which the registry's
//!   `telemetry_feed` row of this log is keyed by;
//! - `lock`: held (an exclusive file lock) by the broker using the log;
//! - `<first seq, 20 digits>.seg`: segments, each [`MAGIC`] and then records, rolled at
//!   [`SEGMENT_BYTES`]; a segment is deleted once every record of it is in the table.
//!
//! A record: `len` (u32 LE, the bytes after the CRC), CRC-32C (u32 LE) of those bytes, then
//! `seq` (u64 LE, consecutive within a segment), `qos` (u8), `received_at` (i64 LE), the device
//! id (u16 LE length + bytes), the topic (u32 LE length + bytes), the payload (u32 LE length +
//! bytes) and the MQTT 5 properties (u32 LE: 0 for none, else length + 1; then bytes). Every
//! field a device sends is inside a length the broker wrote, so no payload can end a record or
//! start one.
//!
//! What survives: with `every-commit`, every acknowledged message survives a crash of the broker
//! and a power cut (data flushed before the PUBACK, and a new segment's directory entry before
//! its first record is acknowledged). With `checkpoint`, every acknowledged message survives a
//! crash of the broker (it is in the kernel's page cache); a power cut may lose the last seconds.
//! At start the last segment is read to its last whole record whose CRC matches and cut there: a
//! torn tail can only hold records that were never acknowledged.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fleet_registry::{DeviceId, Telemetry};
use tokio::sync::watch;

use super::sink::{Sink, SinkError};

/// The first bytes of every segment (format version 1).
pub(crate) const MAGIC: &[u8; 8] = b"FGTLOG01";
/// A segment is closed and a new one started once it holds this many bytes.
pub(crate) const SEGMENT_BYTES: u64 = 64 << 20;
/// A read for the copy stops after rows of this many topic and payload bytes (with large
/// packets, a batch of rows would otherwise hold gigabytes).
const READ_BYTES: usize = 16 << 20;
/// `len` and CRC before each record's body.
const FRAME: usize = 8;
/// The body's fixed part: seq, qos, received_at.
const FIXED: usize = 8 + 1 + 8;

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Why the log cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LogError {
    /// A file operation failed.
    #[error("telemetry log {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// Another process holds the log.
    #[error("telemetry log {0}: another broker is using it (its `lock` file is held); give each broker its own store_log_dir")]
    Busy(PathBuf),
    /// The directory has segments but no `id` (or an unreadable one): which rows of the table
    /// came from it cannot be told.
    #[error("telemetry log {0}: segments without a readable `id` file; restore the file or move the segments away")]
    NoId(PathBuf),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_owned(), source }
}

/// How far the log is written: everything up to here is acknowledged-durable and may be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct End {
    /// The last record's sequence number (0: none yet).
    pub seq: u64,
    /// The segment written to (its first sequence number).
    pub segment: u64,
    /// Bytes of that segment that are written.
    pub offset: u64,
}

/// How the log is kept.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Its directory.
    pub dir: PathBuf,
    /// Flush every append before it is acknowledged (`store_fsync = every-commit`).
    pub sync: bool,
    /// Refuse appends (no PUBACK) while the log holds more than this many bytes of records the
    /// table has not taken (0: no limit).
    pub max_backlog: u64,
    /// Roll segments at this size.
    pub segment_bytes: u64,
}

/// The writing end; the store's [`Sink`] on a single node.
#[derive(Debug)]
pub(crate) struct Log {
    appender: Arc<Mutex<Appender>>,
    end: watch::Sender<End>,
    backlog: Arc<AtomicU64>,
    max_backlog: u64,
    /// The reader's [`Reader::copied`].
    copied: Arc<AtomicU64>,
    metrics: Option<crate::observe::metrics::Metrics>,
}

#[derive(Debug)]
struct Appender {
    dir: PathBuf,
    file: File,
    segment: u64,
    len: u64,
    next_seq: u64,
    sync: bool,
    segment_bytes: u64,
    /// Set when a failed write or flush leaves the file in a state that cannot be trusted.
    poisoned: Option<String>,
    /// Kept open: its lock is the log's.
    _lock: File,
}

/// The reading end, for [`super::feed`].
#[derive(Debug)]
pub(crate) struct Reader {
    pub(crate) id: i64,
    dir: PathBuf,
    pub(crate) end: watch::Receiver<End>,
    pub(crate) backlog: Arc<AtomicU64>,
    /// [`Reader::fed`], for the writer's gauges.
    pub(crate) copied: Arc<AtomicU64>,
    /// Records at or below this are in the table.
    pub(crate) fed: u64,
    segment: u64,
    offset: u64,
    /// Reads through a [`io::Take`] set to where the writer is: no read-ahead takes bytes of a
    /// write in progress, which a failed write cuts off and the next one writes over.
    file: Option<io::BufReader<io::Take<File>>>,
    /// Segments read to their end, to delete once what was read from them is in the table.
    pub(crate) finished: Vec<PathBuf>,
    /// Bytes of records read since the last [`Reader::settle`].
    read_bytes: u64,
    /// Why the last [`Reader::read`] stopped short of `end`: a read that failed without the
    /// segment being damaged (no file descriptors left, an I/O error); tried again later.
    pub(crate) stalled: Option<io::Error>,
    /// A second handle on the log's lock: a broker stopping releases it only once its copy
    /// has stopped too, so no other broker copies the same records meanwhile.
    _lock: File,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

/// The segments in `dir`, oldest first: (first seq, path, size).
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf, u64)>, LogError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_at(dir))? {
        let entry = entry.map_err(io_at(dir))?;
        let name = entry.file_name();
        let Some(first) =
            name.to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let size = entry.metadata().map_err(io_at(&entry.path()))?.len();
        out.push((first, entry.path(), size));
    }
    out.sort_by_key(|s| s.0);
    Ok(out)
}

/// Reads the log's `id` in `dir` (without opening or locking it). `None`: no log there yet.
pub(crate) fn read_id(dir: &Path) -> Result<Option<i64>, LogError> {
    let path = dir.join("id");
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<i64>().map(Some).map_err(|_| LogError::NoId(dir.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LogError::Io { path, source: e }),
    }
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

/// Opens the log in `settings.dir` (creating it), or refuses. Gives the log's id; the caller
/// reads how far the table has it ([`fleet_registry::Registry::telemetry_fed`]) and passes
/// that to [`Log::start`].
pub(crate) fn open_id(settings: &Settings) -> Result<(i64, File), LogError> {
    let dir = &settings.dir;
    create_private_dir(dir)?;
    let lock_path = dir.join("lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_at(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(LogError::Busy(dir.clone())),
        Err(std::fs::TryLockError::Error(e)) => return Err(LogError::Io { path: lock_path, source: e }),
    }
    if let Some(id) = read_id(dir)? {
        return Ok((id, lock));
    }
    if !segments(dir)?.is_empty() {
        return Err(LogError::NoId(dir.clone()));
    }
    // Positive and non-zero: 63 random bits.
    let id = i64::try_from((rand::random::<u64>() >> 1).max(1)).unwrap_or(1);
    let tmp = dir.join("id.tmp");
    let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
    f.write_all(format!("{id}\n").as_bytes()).and_then(|()| f.sync_all()).map_err(io_at(&tmp))?;
    std::fs::rename(&tmp, dir.join("id")).map_err(io_at(dir))?;
    sync_dir(dir)?;
    Ok((id, lock))
}

fn create_private_dir(dir: &Path) -> Result<(), LogError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(io_at(dir))
}

/// Sets the backlog gauges: records after `copied` up to `end_seq`, and bytes.
pub(crate) fn gauges(
    m: &crate::observe::metrics::Metrics,
    end_seq: u64,
    copied: &AtomicU64,
    backlog: &AtomicU64,
) {
    let records = end_seq.saturating_sub(copied.load(Ordering::Relaxed));
    m.store_log_backlog_records.set(i64::try_from(records).unwrap_or(i64::MAX));
    m.store_log_backlog_bytes.set(i64::try_from(backlog.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
}

impl Log {
    /// Keeps `metrics`' backlog gauges up to date on every append.
    pub(crate) fn with_metrics(mut self, metrics: crate::observe::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Opens the log for appending, its id and lock from [`open_id`]; `fed` is how far the
    /// table has it. Cuts a torn tail off the last segment. Gives the writing end and the
    /// reading end.
    pub(crate) fn start(
        settings: &Settings,
        id: i64,
        lock: File,
        fed: u64,
    ) -> Result<(Log, Reader), LogError> {
        let dir = settings.dir.clone();
        let segs = segments(&dir)?;
        // Every record on disk counts until the reader has passed it; a torn tail cut off
        // below is taken off again.
        let mut backlog: u64 = segs.iter().map(|s| s.2.saturating_sub(MAGIC.len() as u64)).sum();
        // The last segment's whole records; the file is cut after them.
        let mut last_seq = fed;
        let mut tail = None;
        if let Some(((first, path, size), before)) = segs.split_last() {
            let (valid_len, last) = scan(path, *first)?;
            let cut = size.saturating_sub(valid_len.max(MAGIC.len() as u64));
            if valid_len < *size {
                // A torn tail holds only what was never acknowledged; damage in the middle of
                // the segment would hold acknowledged records after it: the bytes are kept.
                let kept = keep_cut(path, valid_len);
                tracing::warn!(
                    segment = %path.display(),
                    dropped_bytes = size - valid_len,
                    kept_in = %kept,
                    "telemetry log: cut a torn or damaged tail (a broker that stopped inside a write; damage otherwise)"
                );
            }
            let on_disk = match last {
                Some(last) => {
                    // Cut whether or not appends go on here, so the reader never meets it.
                    if valid_len < *size {
                        OpenOptions::new()
                            .write(true)
                            .open(path)
                            .and_then(|f| f.set_len(valid_len))
                            .map_err(io_at(path))?;
                        backlog = backlog.saturating_sub(cut);
                    }
                    last
                }
                None => last_on_disk(before)?.max(first.saturating_sub(1)),
            };
            last_seq = last_seq.max(on_disk);
            tail = Some((*first, path.clone(), valid_len, last, cut));
        }
        let next_seq = last_seq + 1;
        let (file, segment, len) = match tail {
            // Append to the last segment when its records run on to `next_seq`.
            Some((first, path, valid_len, last, cut))
                if last.unwrap_or(first.saturating_sub(1)) + 1 == next_seq =>
            {
                let file = OpenOptions::new().write(true).open(&path).map_err(io_at(&path))?;
                file.set_len(valid_len).map_err(io_at(&path))?;
                if last.is_none() {
                    backlog = backlog.saturating_sub(cut);
                }
                if valid_len < MAGIC.len() as u64 {
                    // A segment cut inside its magic: write it again.
                    file.set_len(0).map_err(io_at(&path))?;
                    (&file).write_all(MAGIC).map_err(io_at(&path))?;
                    (file, first, MAGIC.len() as u64)
                } else {
                    (file, first, valid_len)
                }
            }
            _ => {
                let (file, len) = new_segment(&dir, next_seq, settings.sync)?;
                (file, next_seq, len)
            }
        };
        let mut file = file;
        file.seek(SeekFrom::Start(len)).map_err(io_at(&dir))?;
        if settings.sync {
            file.sync_data().map_err(io_at(&dir))?;
        }
        let end = End { seq: next_seq - 1, segment, offset: len };
        let (tx, rx) = watch::channel(end);
        let backlog = Arc::new(AtomicU64::new(backlog));
        let first = segs.first().map_or(segment, |s| s.0);
        let reader_lock = lock.try_clone().map_err(io_at(&dir))?;
        let log = Log {
            appender: Arc::new(Mutex::new(Appender {
                dir: dir.clone(),
                file,
                segment,
                len,
                next_seq,
                sync: settings.sync,
                segment_bytes: settings.segment_bytes.max(MAGIC.len() as u64 + 1),
                poisoned: None,
                _lock: lock,
            })),
            end: tx,
            backlog: backlog.clone(),
            max_backlog: settings.max_backlog,
            copied: Arc::new(AtomicU64::new(fed)),
            metrics: None,
        };
        let reader = Reader {
            id,
            dir,
            end: rx,
            backlog,
            copied: log.copied.clone(),
            fed,
            segment: first,
            offset: MAGIC.len() as u64,
            file: None,
            finished: Vec::new(),
            read_bytes: 0,
            stalled: None,
            _lock: reader_lock,
        };
        Ok((log, reader))
    }
}

/// Copies what follows `valid_len` in segment `path` to `<segment>.cut-<valid_len>` before the
/// segment is cut there; says where (or why not).
fn keep_cut(path: &Path, valid_len: u64) -> String {
    let aside = path.with_extension(format!("seg.cut-{valid_len}"));
    let copied = File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(valid_len))?;
        let mut out = File::create(&aside)?;
        io::copy(&mut f, &mut out)?;
        out.sync_all()
    });
    match copied {
        Ok(()) => aside.display().to_string(),
        Err(e) => format!("nowhere ({e})"),
    }
}

/// Creates segment `first` in `dir` with its magic (flushed with its directory entry when
/// `sync`). Gives the file and its length.
fn new_segment(dir: &Path, first: u64, sync: bool) -> Result<(File, u64), LogError> {
    let path = dir.join(segment_name(first));
    let mut file =
        OpenOptions::new().create(true).truncate(true).write(true).open(&path).map_err(io_at(&path))?;
    file.write_all(MAGIC).map_err(io_at(&path))?;
    if sync {
        file.sync_all().map_err(io_at(&path))?;
        sync_dir(dir)?;
    }
    Ok((file, MAGIC.len() as u64))
}

/// Reads segment `path` (first seq `first`) to its last whole, intact, consecutive record:
/// gives the length up to there and that record's seq.
fn scan(path: &Path, first: u64) -> Result<(u64, Option<u64>), LogError> {
    let bytes = std::fs::read(path).map_err(io_at(path))?;
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Ok((0, None));
    }
    let mut at = MAGIC.len();
    let mut last = None;
    let mut expect = first;
    while let Some((rec, used)) = decode(&bytes[at..]) {
        if rec.seq != expect {
            break;
        }
        last = Some(rec.seq);
        expect += 1;
        at += used;
    }
    Ok((at as u64, last))
}

/// The seq of the last record in `segs` (none: the one before the last segment's first). The
/// last segment by name may hold none: a roll that failed after creating its file leaves it
/// behind while the next batches go on in the segment before, so those are looked at too.
fn last_on_disk(segs: &[(u64, PathBuf, u64)]) -> Result<u64, LogError> {
    let mut last = segs.last().map_or(0, |s| s.0.saturating_sub(1));
    for (first, path, _) in segs.iter().rev() {
        if let (_, Some(seq)) = scan(path, *first)? {
            last = last.max(seq);
            break;
        }
    }
    Ok(last)
}

/// One record read back.
#[derive(Debug, PartialEq)]
pub struct Record {
    /// Its sequence number.
    pub seq: u64,
    /// The message, `None` for a record whose fields do not make one.
    pub row: Option<Telemetry>,
}

/// Appends `row` as record `seq` to `out`.
pub fn encode(out: &mut Vec<u8>, seq: u64, row: &Telemetry) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(row.qos);
    out.extend_from_slice(&row.received_at.to_le_bytes());
    let id = row.device_id.as_str().as_bytes();
    // Device ids are short (the registry's rules); a longer one cannot be stored.
    out.extend_from_slice(&(id.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
    out.extend_from_slice(&id[..id.len().min(usize::from(u16::MAX))]);
    let field = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    };
    field(out, row.topic.as_bytes());
    field(out, &row.payload);
    match &row.properties {
        None => out.extend_from_slice(&0u32.to_le_bytes()),
        Some(p) => {
            out.extend_from_slice(&(p.len() as u32 + 1).to_le_bytes());
            out.extend_from_slice(p.as_bytes());
        }
    }
    let body = (out.len() - start - FRAME) as u32;
    let crc = CRC.checksum(&out[start + FRAME..]);
    out[start..start + 4].copy_from_slice(&body.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes the record at the start of `buf`: the record and its length, or `None` when `buf`
/// does not start with a whole record whose CRC matches. A record whose fields do not make a
/// telemetry row (not something the broker writes) comes back with `row: None`.
pub fn decode(buf: &[u8]) -> Option<(Record, usize)> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    let body = buf.get(FRAME..FRAME.checked_add(len)?)?;
    if len < FIXED || CRC.checksum(body) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(body[..8].try_into().ok()?);
    Some((Record { seq, row: row_of(&body[8..]) }, FRAME + len))
}

fn row_of(b: &[u8]) -> Option<Telemetry> {
    let qos = *b.first()?;
    let received_at = i64::from_le_bytes(b.get(1..9)?.try_into().ok()?);
    let mut at: usize = 9;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let id_len = u16::from_le_bytes(take(2)?.try_into().ok()?);
    let id = DeviceId::parse(std::str::from_utf8(take(usize::from(id_len))?).ok()?).ok()?;
    let topic_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let topic = std::str::from_utf8(take(topic_len)?).ok()?.to_owned();
    let payload_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let payload = Bytes::copy_from_slice(take(payload_len)?);
    let props = match u32::from_le_bytes(take(4)?.try_into().ok()?) as usize {
        0 => None,
        n => Some(std::str::from_utf8(take(n - 1)?).ok()?.to_owned()),
    };
    (at == b.len() && qos <= 2).then_some(Telemetry {
        device_id: id,
        topic,
        payload,
        qos,
        received_at,
        properties: props,
    })
}

impl Appender {
    /// Writes `buf` (records `self.next_seq..self.next_seq + n`) and flushes it by policy;
    /// on failure the file is cut back, so no unacknowledged record stays in it.
    fn append(&mut self, buf: &[u8], n: u64) -> Result<End, String> {
        if let Some(why) = &self.poisoned {
            return Err(why.clone());
        }
        if self.len + buf.len() as u64 > self.segment_bytes && self.len > MAGIC.len() as u64 {
            let (file, len) = new_segment(&self.dir, self.next_seq, self.sync).map_err(|e| e.to_string())?;
            self.file = file;
            self.segment = self.next_seq;
            self.len = len;
        }
        let mut flushed = true;
        let written = self.file.write_all(buf).and_then(|()| {
            flushed = false;
            if self.sync {
                self.file.sync_data()?;
            }
            flushed = true;
            Ok(())
        });
        if let Err(e) = written {
            let path = self.dir.join(segment_name(self.segment));
            // After a failed flush the page cache cannot be trusted (the kernel may have
            // dropped the dirty pages): nothing more is acknowledged from this log. A failed
            // write (the disk full) is cut off and the next batch tried once there is room.
            let cut = self.file.set_len(self.len).and_then(|()| self.file.seek(SeekFrom::Start(self.len)));
            if !flushed || cut.is_err() {
                self.poisoned = Some(format!(
                    "telemetry log {}: {e}; the broker stores nothing more until it is restarted",
                    path.display()
                ));
            }
            return Err(format!("telemetry log {}: {e}", path.display()));
        }
        self.len += buf.len() as u64;
        self.next_seq += n;
        Ok(End { seq: self.next_seq - 1, segment: self.segment, offset: self.len })
    }
}

impl Sink for Log {
    async fn store(&self, rows: &[Telemetry], _pkids: &[u16]) -> Result<(), SinkError> {
        let backlog = self.backlog.load(Ordering::Relaxed);
        if self.max_backlog > 0 && backlog > self.max_backlog {
            return Err(format!(
                "telemetry log holds {backlog} bytes the registry has not taken (store_log_max_bytes {}): \
                 the registry is down or slower than ingest",
                self.max_backlog
            )
            .into());
        }
        let first = self.appender.lock().map_err(|_| "telemetry log: writer lock poisoned")?.next_seq;
        let mut buf = Vec::with_capacity(rows.iter().map(|r| 64 + r.topic.len() + r.payload.len()).sum());
        for (i, row) in rows.iter().enumerate() {
            encode(&mut buf, first + i as u64, row);
        }
        let bytes = buf.len() as u64;
        let appender = self.appender.clone();
        let n = rows.len() as u64;
        let (end, stopped) = tokio::task::spawn_blocking(move || {
            let mut a = appender.lock().map_err(|_| "telemetry log: writer lock poisoned".to_owned())?;
            let end = a.append(&buf, n);
            Ok::<_, String>((end, a.poisoned.is_some()))
        })
        .await
        .map_err(|e| format!("telemetry log: {e}"))??;
        if stopped {
            if let Some(m) = &self.metrics {
                m.store_stopped("telemetry_log");
            }
        }
        let end = end?;
        self.backlog.fetch_add(bytes, Ordering::Relaxed);
        self.end.send_replace(end);
        if let Some(m) = &self.metrics {
            gauges(m, end.seq, &self.copied, &self.backlog);
        }
        Ok(())
    }
}

impl Reader {
    /// Is there more to read before `end`?
    pub(crate) fn behind(&self, end: End) -> bool {
        (self.segment, self.offset) < (end.segment, end.offset)
    }

    /// Reads up to `max` records after the reader's position, no further than `end`: the rows
    /// with their seqs and the last seq read (records at or below [`Reader::fed`] are passed
    /// over). Segments read to their end go to [`Reader::finished`]; a damaged one is logged
    /// and passed over. A read that fails otherwise stops here and sets [`Reader::stalled`].
    pub(crate) fn read(&mut self, end: End, max: usize) -> (Vec<(u64, Telemetry)>, Option<u64>) {
        let mut rows = Vec::new();
        let mut last = None;
        self.stalled = None;
        let mut bytes = 0usize;
        while rows.len() < max
            && bytes < READ_BYTES
            && (self.segment, self.offset) < (end.segment, end.offset)
        {
            let limit = if self.segment == end.segment { Some(end.offset) } else { None };
            let next = match self.next_record(limit) {
                Ok(Some(rec)) => {
                    last = Some(rec.seq);
                    if rec.seq <= self.fed {
                        continue;
                    }
                    match rec.row {
                        Some(row) => {
                            bytes += row.topic.len() + row.payload.len();
                            rows.push((rec.seq, row));
                        }
                        None => tracing::error!(
                            seq = rec.seq,
                            "telemetry log: a record that is not a message; passed over"
                        ),
                    }
                    Ok(())
                }
                Ok(None) => self.next_segment(end, false),
                Err(e) if damaged(&e) => {
                    tracing::error!(segment = self.segment, offset = self.offset, error = %e,
                        "telemetry log: damaged segment; the rest of it is passed over (kept as .damaged)");
                    if self.segment == end.segment {
                        // What is passed over counts as read.
                        self.read_bytes += end.offset - self.offset;
                        self.offset = end.offset;
                        self.file = None;
                        Ok(())
                    } else {
                        self.next_segment(end, true)
                    }
                }
                Err(e) => Err(e),
            };
            if let Err(e) = next {
                // Not the segment's fault (no file descriptors left, an I/O error): nothing is
                // passed over; the same place is read again later.
                self.file = None;
                self.stalled = Some(e);
                break;
            }
        }
        (rows, last)
    }

    /// The next record of the current segment, `None` at its end (`limit`: where the writer
    /// is, in the segment it writes).
    fn next_record(&mut self, limit: Option<u64>) -> io::Result<Option<Record>> {
        if self.file.is_none() {
            let path = self.dir.join(segment_name(self.segment));
            let mut f = File::open(&path)?;
            let mut magic = [0u8; 8];
            f.read_exact(&mut magic)?;
            if &magic != MAGIC {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "not a segment"));
            }
            f.seek(SeekFrom::Start(self.offset))?;
            self.file = Some(io::BufReader::with_capacity(1 << 20, f.take(0)));
        }
        let Some(file) = self.file.as_mut() else { return Ok(None) };
        if limit.is_some_and(|l| self.offset >= l) {
            return Ok(None);
        }
        // The file is read up to the writer's end and no further (bytes buffered already are
        // before it).
        let ahead = self.offset + file.buffer().len() as u64;
        file.get_mut().set_limit(limit.map_or(u64::MAX, |l| l.saturating_sub(ahead)));
        let mut frame = [0u8; FRAME];
        match file.read_exact(&mut frame) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && limit.is_none() => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        let room = limit.map_or(u64::MAX, |l| l - self.offset);
        if (FRAME + len) as u64 > room {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "record runs past the written end"));
        }
        // Grown as the bytes come: a damaged length cannot make it allocate gigabytes.
        let mut whole = Vec::with_capacity(FRAME + len.min(1 << 20));
        whole.extend_from_slice(&frame);
        file.by_ref().take(len as u64).read_to_end(&mut whole)?;
        if whole.len() < FRAME + len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "record cut short"));
        }
        let (rec, used) = decode(&whole)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "record checksum mismatch"))?;
        self.offset += used as u64;
        self.read_bytes += used as u64;
        Ok(Some(rec))
    }

    /// Moves to the segment after the current one (the current one is complete: the writer is
    /// in a later one). A `damaged` one is renamed `<name>.damaged` and kept, not deleted.
    fn next_segment(&mut self, end: End, damaged: bool) -> io::Result<()> {
        self.file = None;
        if self.segment >= end.segment {
            return Ok(());
        }
        // The next segment is the smallest name after this one, at most the writer's. Not
        // knowing it is no reason to skip to the writer's.
        let next = segments(&self.dir)
            .map_err(io::Error::other)?
            .into_iter()
            .map(|s| s.0)
            .find(|&f| f > self.segment)
            .unwrap_or(end.segment);
        let done = self.dir.join(segment_name(self.segment));
        // What is left of it (only a damaged segment has any) counts as read.
        let size = std::fs::metadata(&done).map_or(0, |m| m.len());
        self.read_bytes += size.saturating_sub(self.offset);
        if damaged {
            let aside = self.dir.join(format!("{}.damaged", segment_name(self.segment)));
            if let Err(e) = std::fs::rename(&done, &aside) {
                tracing::warn!(segment = %done.display(), error = %e, "telemetry log: could not set a damaged segment aside");
            }
        } else {
            self.finished.push(done);
        }
        self.segment = next.min(end.segment);
        self.offset = MAGIC.len() as u64;
        Ok(())
    }

    /// Everything read so far is in the table: takes it off the backlog and deletes the
    /// segments read to their end. Gives how many segments were deleted.
    pub(crate) fn settle(&mut self) -> usize {
        let read = std::mem::take(&mut self.read_bytes);
        let _ =
            self.backlog.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(read)));
        let mut deleted = 0;
        for path in self.finished.drain(..) {
            match std::fs::remove_file(&path) {
                Ok(()) => deleted += 1,
                Err(e) => {
                    tracing::warn!(segment = %path.display(), error = %e, "telemetry log: could not delete a copied segment")
                }
            }
        }
        deleted
    }
}

/// Does `e`, from reading a segment, mean the segment is damaged (cut short, not one, a
/// checksum that does not match) or gone, rather than that reading failed for now?
fn damaged(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof | io::ErrorKind::NotFound)
}

/// Where a log stands, read from its files without opening it (for tests and tools): its id and
/// the last record's seq. `None`: no log in `dir`.
pub(crate) fn position(dir: &Path) -> Result<Option<(i64, u64)>, String> {
    let Some(id) = read_id(dir).map_err(|e| e.to_string())? else { return Ok(None) };
    let segs = segments(dir).map_err(|e| e.to_string())?;
    Ok(Some((id, last_on_disk(&segs).map_err(|e| e.to_string())?)))
}

#[cfg(test)]
mod tests;
