use super::*;

fn row(i: u32) -> Telemetry {
    Telemetry {
        device_id: DeviceId::parse("dev-1").expect("id"),
        topic: format!("devices/dev-1/t/{i}"),
        payload: Bytes::from(format!("m{i}")),
        qos: u8::from(i.is_multiple_of(2)),
        received_at: 1_700_000_000_000 + i64::from(i),
        properties: i.is_multiple_of(3).then(|| format!("{{\"content_type\":\"c{i}\"}}")),
    }
}

fn settings(dir: &Path) -> Settings {
    Settings { dir: dir.to_owned(), sync: true, max_backlog: 0, segment_bytes: SEGMENT_BYTES }
}

fn open(s: &Settings, fed: u64) -> (Log, Reader) {
    let (id, lock) = open_id(s).expect("open");
    Log::start(s, id, lock, fed).expect("start")
}

async fn append(log: &Log, rows: &[Telemetry]) {
    log.store(rows, &vec![1; rows.len()]).await.expect("append");
}

/// Everything the reader can read now: (seq of the last, rows).
fn read_all(r: &mut Reader) -> (Option<u64>, Vec<Telemetry>) {
    let end = *r.end.borrow();
    let mut rows = Vec::new();
    let mut last = None;
    while r.behind(end) {
        let (got, l) = r.read(end, 7);
        if let Some(e) = &r.stalled {
            panic!("reading stalled: {e}");
        }
        rows.extend(got.into_iter().map(|(_, row)| row));
        last = l.or(last);
    }
    (last, rows)
}

#[test]
fn a_record_reads_back_as_written_and_a_payload_that_looks_like_a_record_stays_a_payload() {
    let mut inner = Vec::new();
    encode(&mut inner, 99, &row(3));
    let mut sneaky = row(4);
    sneaky.payload = Bytes::from(inner.clone());
    let mut buf = Vec::new();
    encode(&mut buf, 1, &row(0));
    encode(&mut buf, 2, &sneaky);
    encode(&mut buf, 3, &row(6));
    let mut at = 0;
    let mut got = Vec::new();
    while let Some((rec, used)) = decode(&buf[at..]) {
        got.push((rec.seq, rec.row.expect("row")));
        at += used;
    }
    assert_eq!(at, buf.len());
    assert_eq!(got, vec![(1, row(0)), (2, sneaky), (3, row(6))]);
    // Any bit flipped is caught by the CRC (or the length).
    for i in 0..inner.len() {
        let mut bad = inner.clone();
        bad[i] ^= 0x10;
        assert!(decode(&bad).is_none_or(|(r, _)| r.seq != 99 || r.row.as_ref() != Some(&row(3))), "byte {i}");
    }
    // Cut anywhere: no record.
    for cut in 0..inner.len() {
        assert!(decode(&inner[..cut]).is_none());
    }
}

#[tokio::test]
async fn appended_batches_read_back_in_order_and_a_restart_goes_on_from_the_last_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path());
    let (log, mut reader) = open(&s, 0);
    append(&log, &[row(1), row(2), row(3)]).await;
    append(&log, &[row(4)]).await;
    let (last, rows) = read_all(&mut reader);
    assert_eq!((last, rows), (Some(4), vec![row(1), row(2), row(3), row(4)]));
    assert_eq!(position(dir.path()).expect("position").map(|p| p.1), Some(4));
    drop((log, reader));

    // Copied up to 3: the new reader starts after it, the writer after 4.
    let (log, mut reader) = open(&s, 3);
    append(&log, &[row(5)]).await;
    let (last, rows) = read_all(&mut reader);
    assert_eq!((last, rows), (Some(5), vec![row(4), row(5)]));
    assert_eq!(reader.end.borrow().seq, 5);
}

#[tokio::test]
async fn a_torn_tail_is_cut_at_start_and_only_whole_records_are_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path());
    let (log, reader) = open(&s, 0);
    append(&log, &[row(1), row(2)]).await;
    drop((log, reader));
    // A broker that died inside a write: half of a third record.
    let seg = dir.path().join(segment_name(1));
    let mut half = Vec::new();
    encode(&mut half, 3, &row(3));
    half.truncate(half.len() / 2);
    OpenOptions::new().append(true).open(&seg).expect("seg").write_all(&half).expect("write");
    assert_eq!(position(dir.path()).expect("position").map(|p| p.1), Some(2));

    let (log, mut reader) = open(&s, 0);
    append(&log, &[row(30)]).await;
    let (last, rows) = read_all(&mut reader);
    assert_eq!((last, rows), (Some(3), vec![row(1), row(2), row(30)]));
    // The cut bytes are kept beside it (damage, unlike a torn tail, may hold acknowledged
    // records after the bad spot).
    let kept: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{}.cut-", segment_name(1))))
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(std::fs::read(kept[0].path()).expect("kept"), half);
}

#[tokio::test]
async fn copied_segments_are_deleted_and_a_damaged_one_is_set_aside_and_passed_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Settings { segment_bytes: 200, ..settings(dir.path()) };
    let (log, mut reader) = open(&s, 0);
    for i in 1..=6 {
        append(&log, &[row(i)]).await;
    }
    let before = segments(dir.path()).expect("segments");
    assert!(before.len() >= 3, "{before:?}");
    let (last, rows) = read_all(&mut reader);
    assert_eq!((last, rows.len()), (Some(6), 6));
    assert!(reader.backlog.load(Ordering::Relaxed) > 0);
    assert_eq!(reader.settle(), before.len() - 1);
    assert_eq!(reader.backlog.load(Ordering::Relaxed), 0, "all of it copied");
    let after = segments(dir.path()).expect("segments");
    assert_eq!(after.len(), 1, "only the segment being written stays: {after:?}");

    // Damage inside a complete segment: its rest is skipped, the file kept, the next one read.
    for i in 7..=12 {
        append(&log, &[row(i)]).await;
    }
    let segs = segments(dir.path()).expect("segments");
    let (first, path, _) = &segs[1];
    // One record per append, row i at seq i: the damaged record is the segment's last.
    let damaged = u32::try_from(segs[2].0 - 1).expect("small");
    let mut bytes = std::fs::read(path).expect("read");
    let n = bytes.len();
    bytes[n - 3] ^= 0xff;
    std::fs::write(path, &bytes).expect("write");
    let (_, rows) = read_all(&mut reader);
    let got: Vec<u32> =
        rows.iter().map(|r| r.topic.rsplit('/').next().unwrap_or("").parse().unwrap_or(0)).collect();
    assert!(!got.contains(&damaged), "the damaged record was read: {got:?}");
    assert!(got.len() < 6, "{got:?}");
    assert_eq!(got.last(), Some(&12));
    assert!(dir.path().join(format!("{}.damaged", segment_name(*first))).exists());
}

#[tokio::test]
async fn a_backlog_over_the_limit_is_refused_and_a_second_broker_cannot_open_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Settings { max_backlog: 100, ..settings(dir.path()) };
    let (log, mut reader) = open(&s, 0);
    assert!(matches!(open_id(&s), Err(LogError::Busy(_))));
    append(&log, &[row(1), row(2), row(3)]).await;
    let e = log.store(&[row(4)], &[1]).await.expect_err("over the limit").to_string();
    assert!(e.contains("store_log_max_bytes"), "{e}");
    // Copied: room again.
    let (last, _) = read_all(&mut reader);
    assert_eq!(last, Some(3));
    reader.settle();
    append(&log, &[row(4)]).await;
}

#[tokio::test]
async fn a_table_ahead_of_the_log_moves_the_next_sequence_number_past_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path());
    let (log, reader) = open(&s, 0);
    append(&log, &[row(1)]).await;
    drop((log, reader));
    // The table has up to 10 (a log whose tail a power cut took, with `checkpoint`): new
    // records must not reuse 2..=10, which the table counts as copied.
    let (log, mut reader) = open(&s, 10);
    append(&log, &[row(2)]).await;
    let (last, rows) = read_all(&mut reader);
    assert_eq!((last, rows), (Some(11), vec![row(2)]));
}

#[test]
fn segments_without_an_id_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(segment_name(1)), MAGIC).expect("write");
    assert!(matches!(open_id(&settings(dir.path())), Err(LogError::NoId(_))));
}

#[tokio::test]
async fn a_restart_after_a_failed_roll_never_reuses_a_sequence_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path());
    let (log, reader) = open(&s, 0);
    append(&log, &[row(1)]).await;
    // A roll that failed after creating its file (disk full, a failed flush) leaves it behind
    // empty; the next, smaller batch still fits and goes on in segment 1.
    std::fs::write(dir.path().join(segment_name(2)), MAGIC).expect("write");
    append(&log, &[row(2), row(3)]).await;
    drop((log, reader));
    assert_eq!(position(dir.path()).expect("position").map(|p| p.1), Some(3));

    let (log, mut reader) = open(&s, 0);
    append(&log, &[row(4)]).await;
    let (last, rows) = read_all(&mut reader);
    assert_eq!((last, rows), (Some(4), vec![row(1), row(2), row(3), row(4)]));
}

#[tokio::test]
async fn the_reader_never_takes_bytes_past_the_written_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Settings { sync: false, ..settings(dir.path()) };
    let (log, mut reader) = open(&s, 0);
    append(&log, &[row(1), row(2)]).await;
    let seg = dir.path().join(segment_name(1));
    let written = std::fs::metadata(&seg).expect("meta").len();
    // A write that failed half way (disk full): its bytes are in the file for a moment, then
    // cut off, and the same sequence numbers are written again with the next batch.
    let mut failed = Vec::new();
    encode(&mut failed, 3, &row(9));
    OpenOptions::new().append(true).open(&seg).expect("seg").write_all(&failed).expect("write");
    assert_eq!(read_all(&mut reader).0, Some(2));
    OpenOptions::new().write(true).open(&seg).expect("seg").set_len(written).expect("cut");
    append(&log, &[row(3)]).await;
    let (last, rows) = read_all(&mut reader);
    assert_eq!((last, rows), (Some(3), vec![row(3)]), "a message never acknowledged was copied");
}

#[tokio::test]
async fn a_segment_that_cannot_be_read_for_a_while_is_read_later_not_passed_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Settings { segment_bytes: 200, ..settings(dir.path()) };
    let (log, mut reader) = open(&s, 0);
    for i in 1..=6 {
        append(&log, &[row(i)]).await;
    }
    let segs = segments(dir.path()).expect("segments");
    assert!(segs.len() >= 3, "{segs:?}");
    // The first segment cannot be read for now (as with no file descriptors left, or an I/O
    // error that goes away): here a directory stands in its place.
    let path = segs[0].1.clone();
    let aside = dir.path().join("aside");
    std::fs::rename(&path, &aside).expect("rename");
    std::fs::create_dir(&path).expect("mkdir");
    let end = *reader.end.borrow();
    let (rows, _) = reader.read(end, 100);
    assert!(rows.is_empty(), "read past a segment it could not read: {rows:?}");
    assert!(reader.stalled.is_some(), "a read that failed went unreported");
    let _ = std::fs::remove_dir(&path);
    std::fs::rename(&aside, &path).expect("rename back");
    let (last, rows) = read_all(&mut reader);
    assert_eq!((last, rows), (Some(6), (1..=6).map(row).collect::<Vec<_>>()));
}

#[tokio::test]
async fn the_log_stays_locked_until_its_reader_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path());
    let (log, reader) = open(&s, 0);
    // The writer stops first at shutdown; the copy may go on for a while.
    drop(log);
    assert!(
        matches!(open_id(&s), Err(LogError::Busy(_))),
        "a second broker could open a log whose copy is still running"
    );
    drop(reader);
    open_id(&s).expect("free once both ends are gone");
}

#[tokio::test]
async fn a_torn_tail_cut_at_start_is_not_counted_as_backlog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Settings { max_backlog: 500, ..settings(dir.path()) };
    let (log, reader) = open(&s, 0);
    append(&log, &[row(1)]).await;
    drop((log, reader));
    // A broker killed inside a large write.
    let mut big = row(2);
    big.payload = Bytes::from(vec![7u8; 2000]);
    let mut torn = Vec::new();
    encode(&mut torn, 2, &big);
    torn.truncate(1500);
    let seg = dir.path().join(segment_name(1));
    OpenOptions::new().append(true).open(&seg).expect("seg").write_all(&torn).expect("write");

    let (log, mut reader) = open(&s, 0);
    assert_eq!(read_all(&mut reader).0, Some(1));
    reader.settle();
    assert_eq!(reader.backlog.load(Ordering::Relaxed), 0, "bytes cut off still count");
    append(&log, &[row(2)]).await;
}

#[tokio::test]
async fn a_write_that_failed_is_cut_off_and_the_log_takes_the_next_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path());
    let (log, mut reader) = open(&s, 0);
    append(&log, &[row(1)]).await;
    // A write that fails part way (EFBIG here, as ENOSPC on a full disk): the appender's file
    // is moved to just before the largest offset the filesystem allows for one batch.
    {
        let mut a = log.appender.lock().expect("lock");
        let (mut lo, mut hi) = (0u64, i64::MAX as u64);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if a.file.seek(SeekFrom::Start(mid)).is_ok() {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        a.file.seek(SeekFrom::Start(lo - 4)).expect("seek");
    }
    log.store(&[row(2)], &[1]).await.expect_err("a failed write acknowledged");
    // Room again: the next batch is taken, at the same place.
    append(&log, &[row(3)]).await;
    let (last, rows) = read_all(&mut reader);
    assert_eq!((last, rows), (Some(2), vec![row(1), row(3)]));
}

#[test]
fn the_fuzzing_seeds_are_records_of_this_format() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/telemetry_log");
    let read = |name: &str| std::fs::read(seeds.join(name)).expect("seed");
    let two = read("two-records");
    let (first, used) = decode(&two).expect("first");
    let (second, rest) = decode(&two[used..]).expect("second");
    assert_eq!(used + rest, two.len());
    assert_eq!((first.seq, second.seq), (1, 2));
    assert_eq!(first.row.expect("a message").topic, "devices/dev-1/telemetry");
    let inner = decode(&read("record-in-payload")).expect("outer").0.row.expect("a message").payload;
    assert_eq!(decode(&inner).expect("inner").0.seq, 99, "the payload is itself a record");
    assert!(decode(&read("bad-crc")).is_none());
    assert_eq!(decode(&read("not-a-message")).expect("record").0.row, None);
}

#[tokio::test]
async fn a_write_that_cannot_be_cut_off_stops_the_log_and_says_so_in_the_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path());
    let (log, _reader) = open(&s, 0);
    let metrics = crate::observe::metrics::Metrics::new();
    let log = log.with_metrics(metrics.clone());
    append(&log, &[row(1)]).await;
    assert!(metrics.stopped_stores().is_empty());
    // The segment's handle swapped for a read-only one: the write fails and so does cutting
    // the file back, so what is on disk after the last acknowledged record is unknown.
    let writable = {
        let mut a = log.appender.lock().expect("lock");
        let path = a.dir.join(segment_name(a.segment));
        std::mem::replace(&mut a.file, std::fs::File::open(path).expect("read-only"))
    };
    log.store(&[row(2)], &[1]).await.expect_err("a failed write acknowledged");
    assert_eq!(metrics.stopped_stores(), ["telemetry_log"], "/healthz would still say ok");
    // The handle back: the log still takes nothing until the broker restarts.
    log.appender.lock().expect("lock").file = writable;
    log.store(&[row(3)], &[1]).await.expect_err("acknowledged after the log stopped");
}
