//! One segment: its three files, its in-memory metadata, positional I/O, index look-ups and the
//! batch scan used by recovery.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::codec::{
    decode_frame, BatchHeader, DecodedBatch, SegmentHeader, BATCH_HEADER_LEN, SEGMENT_HEADER_LEN,
    STREAM_BATCH_HEADER_LEN,
};
use crate::error::LogError;

/// Size of one index entry: two little-endian u64.
const ENTRY_LEN: u64 = 16;
/// Window read when looking for a valid batch after a damaged one.
const PROBE_WINDOW: usize = 1 << 20;

/// File name of a segment's file: the base offset on 20 digits and `ext`.
pub(crate) fn segment_path(dir: &Path, base: u64, ext: &str) -> PathBuf {
    dir.join(format!("{base:020}.{ext}"))
}

/// Fsyncs a directory so that file creations and deletions in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LogError::io("fsync directory", dir, e))
}

/// Reads exactly `buf.len()` bytes at `pos`.
pub(crate) fn read_exact_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    pos: u64,
) -> Result<(), LogError> {
    file.read_exact_at(buf, pos)
        .map_err(|e| LogError::io("read", path, e))
}

/// Writes all of `buf` at `pos`.
pub(crate) fn write_all_at(file: &File, path: &Path, buf: &[u8], pos: u64) -> Result<(), LogError> {
    file.write_all_at(buf, pos)
        .map_err(|e| LogError::io("write", path, e))
}

/// Opens `path` read-write, creating it if missing; with `truncate`, empties it.
fn open_rw(path: &Path, truncate: bool) -> Result<File, LogError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .open(path)
        .map_err(|e| LogError::io("open", path, e))
}

fn file_len(file: &File, path: &Path) -> Result<u64, LogError> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| LogError::io("stat", path, e))
}

/// An index file: fixed 16-byte entries of two little-endian u64, sorted so that a monotone
/// predicate can be binary-searched. `.index` holds `(offset, position)` of a batch start;
/// `.timeindex` holds `(max timestamp of the records before offset, offset)`.
#[derive(Debug)]
pub(crate) struct IndexFile {
    pub path: PathBuf,
    file: File,
}

impl IndexFile {
    fn open(path: PathBuf) -> Result<Self, LogError> {
        let file = open_rw(&path, false)?;
        Ok(IndexFile { path, file })
    }

    fn entry(&self, i: u64) -> Result<(u64, u64), LogError> {
        let mut b = [0u8; ENTRY_LEN as usize];
        read_exact_at(&self.file, &self.path, &mut b, i * ENTRY_LEN)?;
        Ok(decode_entry(&b))
    }

    /// Writes entry number `i`.
    pub fn put(&self, i: u64, entry: (u64, u64)) -> Result<(), LogError> {
        write_all_at(&self.file, &self.path, &encode_entry(entry), i * ENTRY_LEN)
    }

    /// Replaces the whole file with `entries`.
    pub fn rewrite(&self, entries: &[(u64, u64)]) -> Result<(), LogError> {
        self.file
            .set_len(0)
            .map_err(|e| LogError::io("truncate", &self.path, e))?;
        let bytes: Vec<u8> = entries.iter().flat_map(|&e| encode_entry(e)).collect();
        write_all_at(&self.file, &self.path, &bytes, 0)
    }

    /// All entries, or `None` if the file size is not a whole number of entries.
    fn load(&self) -> Result<Option<Entries>, LogError> {
        let len = file_len(&self.file, &self.path)?;
        if len % ENTRY_LEN != 0 {
            return Ok(None);
        }
        let mut bytes = vec![0u8; len as usize];
        read_exact_at(&self.file, &self.path, &mut bytes, 0)?;
        Ok(Some(
            bytes
                .chunks_exact(ENTRY_LEN as usize)
                .map(decode_entry)
                .collect(),
        ))
    }

    /// The last of the first `count` entries satisfying `pred`, which must hold for a prefix of
    /// the entries (binary search, one read per probe).
    pub fn search_last(
        &self,
        count: u64,
        pred: impl Fn((u64, u64)) -> bool,
    ) -> Result<Option<(u64, u64)>, LogError> {
        let (mut lo, mut hi) = (0u64, count); // answer index + 1 lies in [lo, hi]
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(self.entry(mid)?) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo == 0 {
            return Ok(None);
        }
        self.entry(lo - 1).map(Some)
    }

    fn sync(&self) -> Result<(), LogError> {
        self.file
            .sync_data()
            .map_err(|e| LogError::io("fsync", &self.path, e))
    }
}

fn encode_entry((a, b): (u64, u64)) -> [u8; ENTRY_LEN as usize] {
    let mut out = [0u8; ENTRY_LEN as usize];
    out[..8].copy_from_slice(&a.to_le_bytes());
    out[8..].copy_from_slice(&b.to_le_bytes());
    out
}

fn decode_entry(b: &[u8]) -> (u64, u64) {
    let mut x = [0u8; 8];
    let mut y = [0u8; 8];
    x.copy_from_slice(&b[..8]);
    y.copy_from_slice(&b[8..16]);
    (u64::from_le_bytes(x), u64::from_le_bytes(y))
}

/// Where a batch lies and what it holds, as far as segment bookkeeping is concerned.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchSpan {
    pub base_offset: u64,
    pub next_offset: u64,
    pub len: u64,
    pub max_ts: u64,
}

impl From<&BatchHeader> for BatchSpan {
    fn from(h: &BatchHeader) -> Self {
        BatchSpan {
            base_offset: h.base_offset,
            next_offset: h.next_offset(),
            len: h.total_len(),
            max_ts: h.max_timestamp,
        }
    }
}

/// In-memory state of a segment: how much of it is valid and what it holds.
#[derive(Debug, Clone)]
pub(crate) struct SegmentMeta {
    /// End of the valid data (file header included).
    pub len: u64,
    /// Offset after the last record.
    pub next_offset: u64,
    /// Largest record timestamp, `None` while empty.
    pub max_ts: Option<u64>,
    /// Creation time from the header.
    pub created_ms: u64,
    /// Entries in `.index`.
    pub index_count: u64,
    /// Entries in `.timeindex`.
    pub time_count: u64,
    /// Position of the batch the last `.index` entry points to (header end if none).
    pub last_index_pos: u64,
    /// Position of the batch the last `.timeindex` entry was taken at (header end if none).
    pub last_time_pos: u64,
}

/// The entries of an index file.
pub(crate) type Entries = Vec<(u64, u64)>;

/// Index entries due after a batch: `(offset, position)` and `(timestamp, offset)`.
pub(crate) type DueEntries = (Option<(u64, u64)>, Option<(u64, u64)>);

impl SegmentMeta {
    pub fn empty(base: u64, created_ms: u64) -> Self {
        SegmentMeta {
            len: SEGMENT_HEADER_LEN,
            next_offset: base,
            max_ts: None,
            created_ms,
            index_count: 0,
            time_count: 0,
            last_index_pos: SEGMENT_HEADER_LEN,
            last_time_pos: SEGMENT_HEADER_LEN,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len <= SEGMENT_HEADER_LEN
    }

    /// Accounts for `batch` written at `self.len`; returns the index entries now due (and
    /// counts them): one of each kind at most every `interval` bytes.
    pub fn push_batch(&mut self, batch: BatchSpan, interval: u64) -> DueEntries {
        let pos = self.len;
        let index = (pos >= self.last_index_pos.saturating_add(interval)).then(|| {
            self.last_index_pos = pos;
            self.index_count += 1;
            (batch.base_offset, pos)
        });
        let time = match self.max_ts {
            Some(max) if pos >= self.last_time_pos.saturating_add(interval) => {
                self.last_time_pos = pos;
                self.time_count += 1;
                Some((max, batch.base_offset))
            }
            _ => None,
        };
        self.len += batch.len;
        self.next_offset = batch.next_offset;
        self.max_ts = Some(self.max_ts.map_or(batch.max_ts, |m| m.max(batch.max_ts)));
        (index, time)
    }

    /// The time-index entry that closes a sealed segment: `(max timestamp, next offset)`.
    pub fn seal_entry(&self) -> Option<(u64, u64)> {
        self.max_ts.map(|m| (m, self.next_offset))
    }
}

/// Bytes [`Segment::scan`] reads at a time.
const SCAN_CHUNK: u64 = 1 << 20;

/// A window of a segment file held in memory by [`Segment::scan`].
#[derive(Default)]
struct Chunk {
    buf: Vec<u8>,
    at: u64,
}

impl Chunk {
    /// The bytes `[pos, pos + len)` of `seg` (which must lie before `end`), reading from `pos`
    /// up to [`SCAN_CHUNK`] bytes (or `len`, if more) when they are not held.
    fn get(&mut self, seg: &Segment, pos: u64, len: u64, end: u64) -> Result<&[u8], LogError> {
        let held = pos >= self.at && pos + len <= self.at + self.buf.len() as u64;
        if !held {
            let want = len.max(SCAN_CHUNK.min(end - pos));
            self.buf.resize(want as usize, 0);
            seg.read_at(&mut self.buf, pos)?;
            self.at = pos;
        }
        let from = (pos - self.at) as usize;
        Ok(&self.buf[from..from + len as usize])
    }
}

/// A probe with `avail` bytes left, fewer than a batch header.
fn short(avail: u64) -> Probe {
    Probe::Invalid(format!("{avail} bytes left, less than a batch header"))
}

/// What the bytes `b` (a header's worth, or all that is left) say, `avail` bytes being left
/// before the end of the data.
fn parse_probe(b: &[u8], avail: u64) -> Probe {
    match BatchHeader::parse(b) {
        Ok(h) if h.total_len() > avail => Probe::Invalid(format!(
            "batch of {} bytes runs past the end ({avail} bytes left)",
            h.total_len()
        )),
        Ok(h) => Probe::Batch(h),
        Err(e) => Probe::Invalid(e.to_string()),
    }
}

/// What is at a position of a segment.
pub(crate) enum Probe {
    /// A plausible batch header whose batch fits before the end of the data.
    Batch(BatchHeader),
    /// Not a batch (torn, garbage, or running past the end), with the reason.
    Invalid(String),
}

/// Result of scanning a segment's batches.
pub(crate) struct Scan {
    pub meta: SegmentMeta,
    pub index: Entries,
    pub time: Entries,
    /// Where and why the scan stopped before the end of the file.
    pub stopped: Option<(u64, String)>,
}

/// A segment's files. The log file is written only at its end, with positional writes; readers
/// use positional reads, so the handle is shared without a lock.
#[derive(Debug)]
pub(crate) struct Segment {
    pub base: u64,
    pub path: PathBuf,
    log: File,
    pub index: IndexFile,
    pub time: IndexFile,
}

impl Segment {
    /// Opens (index files are created if missing) an existing segment.
    pub fn open(dir: &Path, base: u64) -> Result<Self, LogError> {
        let path = segment_path(dir, base, "log");
        let log = open_rw(&path, false)?;
        Self::with_log(dir, base, path, log)
    }

    /// Creates a new segment with its header (replacing any leftover file of that name: it can
    /// only hold offsets past the end of the log), saying whether the segment before it may
    /// not be synced yet ([`SegmentHeader::prev_unsynced`]); with `durable`, fsyncs it and the
    /// directory.
    pub fn create(
        dir: &Path,
        base: u64,
        created_ms: u64,
        prev_unsynced: bool,
        durable: bool,
    ) -> Result<(Self, SegmentMeta), LogError> {
        let path = segment_path(dir, base, "log");
        let log = open_rw(&path, true)?;
        let seg = Self::with_log(dir, base, path, log)?;
        seg.index.rewrite(&[])?;
        seg.time.rewrite(&[])?;
        seg.write_header(created_ms, prev_unsynced, durable)?;
        if durable {
            sync_dir(dir)?;
        }
        Ok((seg, SegmentMeta::empty(base, created_ms)))
    }

    fn with_log(dir: &Path, base: u64, path: PathBuf, log: File) -> Result<Self, LogError> {
        Ok(Segment {
            base,
            path,
            log,
            index: IndexFile::open(segment_path(dir, base, "index"))?,
            time: IndexFile::open(segment_path(dir, base, "timeindex"))?,
        })
    }

    /// (Re)writes the file header and cuts the file after it.
    pub fn write_header(
        &self,
        created_ms: u64,
        prev_unsynced: bool,
        durable: bool,
    ) -> Result<(), LogError> {
        let header = SegmentHeader {
            base_offset: self.base,
            created_ms,
            prev_unsynced,
        };
        self.set_len(0)?;
        self.write_at(&header.encode(), 0)
            .and_then(|()| if durable { self.sync_data() } else { Ok(()) })
    }

    /// Rewrites the file header in place (the data after it stays) with the flag
    /// [`SegmentHeader::prev_unsynced`] cleared: the segment before this one is durable.
    pub fn clear_prev_unsynced(&self, created_ms: u64) -> Result<(), LogError> {
        let header = SegmentHeader {
            base_offset: self.base,
            created_ms,
            prev_unsynced: false,
        };
        self.write_at(&header.encode(), 0)
    }

    /// Reads and checks the file header; `Ok(Err(reason))` if it is damaged.
    pub fn read_header(&self) -> Result<Result<SegmentHeader, String>, LogError> {
        if self.file_len()? < SEGMENT_HEADER_LEN {
            return Ok(Err("file shorter than its header".into()));
        }
        let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
        read_exact_at(&self.log, &self.path, &mut b, 0)?;
        Ok(match SegmentHeader::decode(&b) {
            Ok(h) if h.base_offset != self.base => Err(format!(
                "header names base offset {}, file name {}",
                h.base_offset, self.base
            )),
            Ok(h) => Ok(h),
            Err(e) => Err(e.to_string()),
        })
    }

    pub fn file_len(&self) -> Result<u64, LogError> {
        file_len(&self.log, &self.path)
    }

    pub fn write_at(&self, bytes: &[u8], pos: u64) -> Result<(), LogError> {
        write_all_at(&self.log, &self.path, bytes, pos)
    }

    pub fn set_len(&self, len: u64) -> Result<(), LogError> {
        self.log
            .set_len(len)
            .map_err(|e| LogError::io("truncate", &self.path, e))
    }

    pub fn sync_data(&self) -> Result<(), LogError> {
        self.log
            .sync_data()
            .map_err(|e| LogError::io("fsync", &self.path, e))
    }

    /// Fsyncs the log file and both indexes.
    pub fn sync_all(&self) -> Result<(), LogError> {
        self.sync_data()?;
        self.index.sync()?;
        self.time.sync()
    }

    /// Deletes the segment's files, log file first (an index without its log file is an
    /// orphan removed at the next open).
    pub fn delete(&self) -> Result<(), LogError> {
        for path in [&self.path, &self.index.path, &self.time.path] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LogError::io("delete", path, e)),
            }
        }
        Ok(())
    }

    /// What is at `pos`, given that valid data ends at `end`.
    pub fn probe(&self, pos: u64, end: u64) -> Result<Probe, LogError> {
        let avail = end.saturating_sub(pos);
        if avail < BATCH_HEADER_LEN as u64 {
            return Ok(short(avail));
        }
        let mut buf = [0u8; STREAM_BATCH_HEADER_LEN];
        let b = &mut buf[..avail.min(STREAM_BATCH_HEADER_LEN as u64) as usize];
        read_exact_at(&self.log, &self.path, b, pos)?;
        Ok(parse_probe(b, avail))
    }

    /// The batch header at `pos`, which must be valid and start at offset `expected`:
    /// [`LogError::Corrupt`] otherwise.
    pub fn header_at(&self, pos: u64, end: u64, expected: u64) -> Result<BatchHeader, LogError> {
        match self.probe(pos, end)? {
            Probe::Batch(h) if h.base_offset == expected => Ok(h),
            Probe::Batch(h) => Err(LogError::corrupt(
                &self.path,
                pos,
                format!("batch at offset {}, expected {expected}", h.base_offset),
            )),
            Probe::Invalid(reason) => Err(LogError::corrupt(&self.path, pos, reason)),
        }
    }

    /// Reads the whole batch described by `header` at `pos`.
    fn read_frame(&self, pos: u64, header: &BatchHeader) -> Result<Bytes, LogError> {
        // `parse` bounds the length by MAX_BATCH_BYTES.
        let mut frame = vec![0u8; header.total_len() as usize];
        read_exact_at(&self.log, &self.path, &mut frame, pos)?;
        Ok(Bytes::from(frame))
    }

    /// Reads and decodes the batch at `pos`; damage is [`LogError::Corrupt`].
    pub fn decode_at(&self, pos: u64, header: BatchHeader) -> Result<DecodedBatch, LogError> {
        let frame = self.read_frame(pos, &header)?;
        decode_frame(header, frame).map_err(|e| LogError::corrupt(&self.path, pos, e.to_string()))
    }

    /// Reads exactly `buf.len()` bytes of the log file at `pos`.
    pub fn read_at(&self, buf: &mut [u8], pos: u64) -> Result<(), LogError> {
        read_exact_at(&self.log, &self.path, buf, pos)
    }

    /// Whether every byte of `[from, to)` is zero.
    pub fn zeros(&self, from: u64, to: u64) -> Result<bool, LogError> {
        let mut buf = vec![0u8; PROBE_WINDOW];
        let mut at = from;
        while at < to {
            let n = (to - at).min(PROBE_WINDOW as u64) as usize;
            self.read_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += n as u64;
        }
        Ok(true)
    }

    /// Whether the batch at `pos` is whole and its CRC matches.
    fn crc_ok(&self, pos: u64, header: &BatchHeader) -> Result<bool, LogError> {
        let frame = self.read_frame(pos, header)?;
        Ok(header.verify_crc(&frame).is_ok())
    }

    /// A start point for reading `offset`: the position and base offset of a batch at or before
    /// it, from the index when the entry checks out, else the start of the segment.
    pub fn seek(&self, meta: &SegmentMeta, offset: u64) -> Result<(u64, u64), LogError> {
        if let Some((o, pos)) = self
            .index
            .search_last(meta.index_count, |(o, _)| o <= offset)?
        {
            if let Probe::Batch(h) = self.probe(pos, meta.len)? {
                if h.base_offset == o {
                    return Ok((pos, o));
                }
            }
        }
        Ok((SEGMENT_HEADER_LEN, self.base))
    }

    /// Scans batches from `start.len` to `end`, checking each CRC and that offsets follow on.
    /// Stops at the first batch that is not whole and valid (`Scan::stopped`); a valid batch with
    /// the wrong offset is [`LogError::Corrupt`] at once (that is not a torn write).
    /// Reads the file sequentially in large chunks.
    pub fn scan(&self, start: SegmentMeta, end: u64, interval: u64) -> Result<Scan, LogError> {
        let mut scan = Scan {
            meta: start,
            index: Vec::new(),
            time: Vec::new(),
            stopped: None,
        };
        let mut chunk = Chunk::default();
        while scan.meta.len < end {
            let pos = scan.meta.len;
            let avail = end - pos;
            let probe = if avail < BATCH_HEADER_LEN as u64 {
                short(avail)
            } else {
                let len = avail.min(STREAM_BATCH_HEADER_LEN as u64);
                parse_probe(chunk.get(self, pos, len, end)?, avail)
            };
            let header = match probe {
                Probe::Batch(h) => h,
                Probe::Invalid(reason) => {
                    scan.stopped = Some((pos, reason));
                    break;
                }
            };
            let frame = chunk.get(self, pos, header.total_len(), end)?;
            if let Err(e) = header.verify_crc(frame) {
                scan.stopped = Some((pos, e.to_string()));
                break;
            }
            if header.base_offset != scan.meta.next_offset {
                return Err(LogError::corrupt(
                    &self.path,
                    pos,
                    format!(
                        "batch at offset {}, expected {}",
                        header.base_offset, scan.meta.next_offset
                    ),
                ));
            }
            let (index, time) = scan.meta.push_batch(BatchSpan::from(&header), interval);
            scan.index.extend(index);
            scan.time.extend(time);
        }
        Ok(scan)
    }

    /// The first whole, CRC-valid batch with an offset above `after` that starts in
    /// `(from, end)`, as its position and base offset: if there is one, the damage at `from`
    /// is in the middle of the data (not a torn tail), and reading can resume there.
    pub fn next_valid_batch(
        &self,
        from: u64,
        after: u64,
        end: u64,
    ) -> Result<Option<(u64, u64)>, LogError> {
        let hdr = BATCH_HEADER_LEN as u64;
        let mut window_start = from + 1;
        let mut buf = Vec::new();
        while window_start.saturating_add(hdr) <= end {
            let window_end = end.min(window_start + PROBE_WINDOW as u64 + hdr);
            buf.resize((window_end - window_start) as usize, 0);
            read_exact_at(&self.log, &self.path, &mut buf, window_start)?;
            for i in 0..buf
                .len()
                .saturating_sub(BATCH_HEADER_LEN - 1)
                .min(PROBE_WINDOW)
            {
                let Ok(h) = BatchHeader::parse(&buf[i..]) else {
                    continue;
                };
                let pos = window_start + i as u64;
                if h.base_offset > after && h.total_len() <= end - pos && self.crc_ok(pos, &h)? {
                    return Ok(Some((pos, h.base_offset)));
                }
            }
            window_start += PROBE_WINDOW as u64;
        }
        Ok(None)
    }

    /// Loads both index files if they are well-formed for a sealed segment ending at `file_len`
    /// and `next_offset`: sorted, in range, the time index closed by its seal entry.
    pub fn load_sealed_indexes(
        &self,
        file_len: u64,
        next_offset: u64,
    ) -> Result<Option<(Entries, Entries)>, LogError> {
        let (Some(index), Some(time)) = (self.index.load()?, self.time.load()?) else {
            return Ok(None);
        };
        let index_ok = index.iter().all(|&(o, p)| {
            (self.base..next_offset).contains(&o) && (SEGMENT_HEADER_LEN..file_len).contains(&p)
        }) && index.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
        let time_ok = time.last().is_some_and(|&(_, o)| o == next_offset)
            && time.iter().all(|&(_, o)| o > self.base && o <= next_offset)
            && time.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1);
        Ok((index_ok && time_ok).then_some((index, time)))
    }
}
