//! Opening a log directory: listing segments, checking sealed ones, repairing the active one.
//!
//! Rules (also in the crate docs, RECOVERY):
//! - sealed segments (all but the last) are trusted up to a cheap check: well-formed indexes and
//!   a valid tail from the last index entry to the end of the file, ending exactly where the next
//!   segment starts. If the indexes are missing or damaged they are rebuilt by a full scan; any
//!   damage in the data of a sealed segment is [`LogError::Corrupt`];
//! - except a sealed segment whose successor is flagged `prev_unsynced` (or has a header that
//!   never reached the disk): a roll does not fsync, the next sync does before it acknowledges
//!   anything and then clears the flag, so such a segment may be torn, and nothing after its
//!   tear was acknowledged. It is scanned fully; a torn tail (its data ends before the next
//!   segment's base, nothing valid after the end) makes it the active segment again, the
//!   segments after it (only unsynced data) are removed and the tail is cut, with notes.
//!   Damage with valid batches after it is damage, as above;
//! - the active (last) segment is scanned fully, checking every CRC. At the first batch that is
//!   not whole and valid, the rest of the file is searched for a whole, CRC-valid batch with a
//!   higher offset: if there is one, the damage is in the middle ([`LogError::Corrupt`], or
//!   with `tolerate_damage`, the batches from that one on move to a new segment and the
//!   damaged one is quarantined from the damage on, see [`split_at_damage`]); otherwise it is
//!   a torn tail and the file is cut there. Its indexes are always rebuilt.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use crate::codec::{SegmentHeader, SEGMENT_HEADER_LEN};
use crate::config::{Durability, LogConfig};
use crate::error::LogError;
use crate::segment::{segment_path, sync_dir, Segment, SegmentMeta};
use crate::State;

/// A segment with its metadata, as the log holds it.
#[derive(Debug, Clone)]
pub(crate) struct SegmentState {
    pub seg: Arc<Segment>,
    pub meta: SegmentMeta,
    /// Where known damage starts in a sealed segment opened with `tolerate_damage`: scans skip
    /// the rest of the segment from there.
    pub damaged_at: Option<u64>,
}

/// Opens or creates the segments of `dir`, in offset order.
pub(crate) fn recover(dir: &Path, config: &LogConfig, now_ms: u64) -> Result<State, LogError> {
    let bases = list_segments(dir)?;
    let mut segments = Vec::with_capacity(bases.len().max(1));
    let mut notes = Vec::new();
    for (i, &base) in bases.iter().enumerate() {
        let seg = Segment::open(dir, base)?;
        let mut damaged_at = None;
        let meta = match bases.get(i + 1) {
            Some(&next) => {
                if successor_flagged(dir, next)? {
                    if let Some(tear) = check_unsynced(&seg, next, config)? {
                        // Nothing after the tear was acknowledged: the segments after this
                        // one held only unsynced data (see the crate docs, RECOVERY).
                        for &later in bases[i + 1..].iter().rev() {
                            Segment::open(dir, later)?.delete()?;
                        }
                        if durable(config) {
                            sync_dir(dir)?;
                        }
                        notes.push(format!(
                            "segment {} was sealed but not yet synced when the log stopped, \
                             and is torn at position {} (after log offset {}): {}; the {} \
                             segments after it (log offsets {}.., never synced, so never \
                             acknowledged) were removed and it is the active segment again",
                            seg.path.display(),
                            tear.at,
                            tear.offset,
                            tear.reason,
                            bases.len() - i - 1,
                            next
                        ));
                        recover_active(dir, seg, config, now_ms, &mut notes, &mut segments)?;
                        break;
                    }
                }
                match open_sealed(&seg, next, config, &mut notes) {
                    Err(LogError::Corrupt {
                        segment,
                        position,
                        reason,
                    }) if config.tolerate_damage => {
                        notes.push(format!(
                            "damaged segment {} at position {position}: {reason}; the rest of \
                             it is skipped",
                            segment.display()
                        ));
                        damaged_at = Some(position);
                        damaged_meta(&seg, next, position)?
                    }
                    other => other?,
                }
            }
            None => {
                recover_active(dir, seg, config, now_ms, &mut notes, &mut segments)?;
                break;
            }
        };
        segments.push(SegmentState {
            seg: Arc::new(seg),
            meta,
            damaged_at,
        });
    }
    if segments.is_empty() {
        let (seg, meta) = Segment::create(dir, 0, now_ms, false, durable(config))?;
        segments.push(SegmentState {
            seg: Arc::new(seg),
            meta,
            damaged_at: None,
        });
    }
    // Segments still flagged (their predecessor may be only in the page cache): the first
    // sync syncs every sealed segment from the one before the first of them, then clears
    // the flags (see `Log::sync_all_written`).
    let mut flagged = Vec::new();
    for sg in &segments {
        if matches!(sg.seg.read_header()?, Ok(h) if h.prev_unsynced) {
            flagged.push((Arc::clone(&sg.seg), sg.meta.created_ms));
        }
    }
    let unsynced = match flagged.first() {
        Some((first, _)) => {
            let at = segments.partition_point(|sg| sg.seg.base < first.base);
            segments[at.saturating_sub(1)..segments.len() - 1]
                .iter()
                .map(|sg| Arc::clone(&sg.seg))
                .collect()
        }
        None => Vec::new(),
    };
    Ok(State {
        segments,
        written_seq: 0,
        unsynced,
        flagged,
        notes,
    })
}

/// Whether the segment starting at `base` says that the one before it may not be synced: its
/// header has [`SegmentHeader::prev_unsynced`], or is torn or all zeros (its header never
/// reached the disk, so no sync covered it: a sync writes it before it acknowledges
/// anything).
fn successor_flagged(dir: &Path, base: u64) -> Result<bool, LogError> {
    let path = segment_path(dir, base, "log");
    let file = File::open(&path).map_err(|e| LogError::io("open", &path, e))?;
    let len = file
        .metadata()
        .map_err(|e| LogError::io("stat", &path, e))?
        .len();
    if len < SEGMENT_HEADER_LEN {
        return Ok(true);
    }
    let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
    crate::segment::read_exact_at(&file, &path, &mut b, 0)?;
    Ok(match SegmentHeader::decode(&b) {
        Ok(h) => h.prev_unsynced,
        Err(_) => len == SEGMENT_HEADER_LEN || b.iter().all(|&x| x == 0),
    })
}

/// A torn tail found in a sealed segment that may not have been synced.
struct Tear {
    at: u64,
    offset: u64,
    reason: String,
}

/// Checks a sealed segment that may not have been synced when the log stopped (the segment
/// after it is flagged): `Some` if its data ends before `next_base` with nothing valid after
/// the end (a torn write: nothing after it was acknowledged); `None` if it is whole (bytes
/// after its last batch, preallocated zeros whose cut was not synced, are cut) or damaged in
/// another way, which [`open_sealed`] then reports as for any sealed segment.
fn check_unsynced(
    seg: &Segment,
    next_base: u64,
    config: &LogConfig,
) -> Result<Option<Tear>, LogError> {
    let file_len = seg.file_len()?;
    let header = match seg.read_header()? {
        Ok(h) => h,
        Err(reason) if file_len <= SEGMENT_HEADER_LEN => {
            return Ok(Some(Tear {
                at: 0,
                offset: seg.base,
                reason,
            }))
        }
        Err(_) => return Ok(None),
    };
    let scan = match seg.scan(
        SegmentMeta::empty(seg.base, header.created_ms),
        file_len,
        config.index_interval_bytes,
    ) {
        Ok(scan) => scan,
        Err(LogError::Corrupt { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let end = scan.meta.next_offset;
    if end > next_base {
        return Ok(None);
    }
    let Some((pos, reason)) = scan.stopped else {
        return Ok((end < next_base).then(|| Tear {
            at: file_len,
            offset: end,
            reason: format!(
                "its data ends at log offset {end}, the next segment starts at {next_base}"
            ),
        }));
    };
    if seg.next_valid_batch(pos, end, file_len)?.is_some() {
        return Ok(None);
    }
    if end == next_base {
        // Whole: what follows its last batch is past every offset it holds.
        seg.set_len(pos)?;
        if durable(config) {
            seg.sync_data()?;
        }
        return Ok(None);
    }
    Ok(Some(Tear {
        at: pos,
        offset: end,
        reason,
    }))
}

fn durable(config: &LogConfig) -> bool {
    config.durability != Durability::Never
}

/// Base offsets of the segment files in `dir`, sorted; removes index files left without their
/// log file (by an interrupted deletion) and segments left half copied by an interrupted
/// [`split_at_damage`] (which starts again).
fn list_segments(dir: &Path) -> Result<Vec<u64>, LogError> {
    let mut logs = Vec::new();
    let mut indexes = Vec::new();
    let mut splits = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| LogError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io("list", dir, e))?;
        let name = entry.file_name();
        let Some((stem, ext)) = name.to_str().and_then(|n| n.split_once('.')) else {
            continue;
        };
        let Some(base) = (stem.len() == 20)
            .then(|| stem.parse::<u64>().ok())
            .flatten()
        else {
            continue;
        };
        match ext {
            "log" => logs.push(base),
            "index" | "timeindex" => indexes.push((base, entry.path())),
            SPLIT => splits.push(entry.path()),
            _ => {}
        }
    }
    for path in splits {
        fs::remove_file(&path).map_err(|e| LogError::io("delete", path, e))?;
    }
    logs.sort_unstable();
    for (base, path) in indexes {
        if logs.binary_search(&base).is_err() {
            fs::remove_file(&path).map_err(|e| LogError::io("delete", path, e))?;
        }
    }
    Ok(logs)
}

/// The metadata of a sealed segment damaged at `position`: whole as far as reads go (they meet
/// the damage and report it), with no index entries (reads scan from the segment's start).
fn damaged_meta(seg: &Segment, next_base: u64, position: u64) -> Result<SegmentMeta, LogError> {
    let file_len = seg.file_len()?;
    let created_ms = seg.read_header()?.map(|h| h.created_ms).unwrap_or_default();
    let mut meta = SegmentMeta::empty(seg.base, created_ms);
    meta.len = file_len.max(position);
    meta.next_offset = next_base;
    meta.max_ts = Some(created_ms);
    seg.index.rewrite(&[])?;
    seg.time.rewrite(&[])?;
    Ok(meta)
}

/// Checks a sealed segment that must end where the next one (`next_base`) starts. With
/// `tolerate_damage`, a damaged file header is reported in `notes` and the batches are checked
/// and used without it (it holds nothing they need: the base offset is the file's name).
fn open_sealed(
    seg: &Segment,
    next_base: u64,
    config: &LogConfig,
    notes: &mut Vec<String>,
) -> Result<SegmentMeta, LogError> {
    let created_ms = match seg.read_header()? {
        Ok(header) => header.created_ms,
        Err(reason) if config.tolerate_damage => {
            notes.push(format!(
                "damaged file header of segment {} at position 0: {reason}; its batches are \
                 checked and read without it",
                seg.path.display()
            ));
            0
        }
        Err(reason) => return Err(LogError::corrupt(&seg.path, 0, reason)),
    };
    let file_len = seg.file_len()?;
    if let Some(meta) = check_sealed(seg, created_ms, file_len, next_base, config)? {
        return Ok(meta);
    }
    // Indexes missing or damaged: a full scan, where any damage is corruption.
    let scan = seg.scan(
        SegmentMeta::empty(seg.base, created_ms),
        file_len,
        config.index_interval_bytes,
    )?;
    if let Some((pos, reason)) = scan.stopped {
        return Err(LogError::corrupt(&seg.path, pos, reason));
    }
    let mut meta = scan.meta;
    if meta.next_offset != next_base {
        return Err(LogError::corrupt(
            &seg.path,
            file_len,
            format!(
                "segment ends at offset {}, the next one starts at {next_base}",
                meta.next_offset
            ),
        ));
    }
    let mut time = scan.time;
    time.extend(meta.seal_entry());
    meta.time_count = time.len() as u64;
    seg.index.rewrite(&scan.index)?;
    seg.time.rewrite(&time)?;
    Ok(meta)
}

/// The metadata of a sealed segment if its indexes are well-formed and the data after the last
/// offset-index entry is whole, valid and ends at `next_base`; `None` means "rebuild".
fn check_sealed(
    seg: &Segment,
    created_ms: u64,
    file_len: u64,
    next_base: u64,
    config: &LogConfig,
) -> Result<Option<SegmentMeta>, LogError> {
    let Some((index, time)) = seg.load_sealed_indexes(file_len, next_base)? else {
        return Ok(None);
    };
    let Some(&(seal_ts, _)) = time.last() else {
        return Ok(None);
    };
    let (pos, offset) = index
        .last()
        .map_or((SEGMENT_HEADER_LEN, seg.base), |&(o, p)| (p, o));
    let mut start = SegmentMeta::empty(seg.base, created_ms);
    start.len = pos;
    start.next_offset = offset;
    let tail = match seg.scan(start, file_len, config.index_interval_bytes) {
        Ok(tail) => tail,
        // An index entry pointing at the wrong batch: rebuild rather than blame the data.
        Err(LogError::Corrupt { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let consistent = tail.stopped.is_none()
        && tail.meta.next_offset == next_base
        && tail.meta.max_ts.is_some_and(|m| m <= seal_ts);
    Ok(consistent.then_some(SegmentMeta {
        len: file_len,
        next_offset: next_base,
        max_ts: Some(seal_ts),
        created_ms,
        index_count: index.len() as u64,
        time_count: time.len() as u64,
        last_index_pos: pos,
        last_time_pos: pos,
    }))
}

/// Extension of a segment being copied by [`split_at_damage`].
const SPLIT: &str = "split";

/// Recovers the active segment `seg` into `segments`: one segment, or with `tolerate_damage`
/// and damage in the middle of it, the damaged one and the segments its valid batches after
/// the damage moved to (the last of them active).
fn recover_active(
    dir: &Path,
    mut seg: Segment,
    config: &LogConfig,
    now_ms: u64,
    notes: &mut Vec<String>,
    segments: &mut Vec<SegmentState>,
) -> Result<(), LogError> {
    loop {
        match scan_active(&seg, config, now_ms, notes, config.tolerate_damage)? {
            Active::Whole(meta) => {
                segments.push(SegmentState {
                    seg: Arc::new(seg),
                    meta,
                    damaged_at: None,
                });
                return Ok(());
            }
            Active::Damaged(damage) => {
                let tail = split_at_damage(dir, &seg, &damage, now_ms, durable(config))?;
                let meta = damaged_meta(&seg, damage.resume_offset, damage.at)?;
                notes.push(format!(
                    "damaged segment {} at position {}: {}; log offsets {}..{} are lost, the \
                     valid batches after them (from position {}) now start segment {}",
                    seg.path.display(),
                    damage.at,
                    damage.reason,
                    damage.lost_from,
                    damage.resume_offset,
                    damage.resume,
                    tail.path.display()
                ));
                segments.push(SegmentState {
                    seg: Arc::new(seg),
                    meta,
                    damaged_at: Some(damage.at),
                });
                seg = tail;
            }
        }
    }
}

/// Damage in the middle of the active segment, with valid batches after it.
struct Damage {
    /// Where the first bad batch starts.
    at: u64,
    reason: String,
    /// The offset the bad batch should have had: the first one lost.
    lost_from: u64,
    /// Where the first valid batch after the damage starts, and its base offset.
    resume: u64,
    resume_offset: u64,
}

/// What [`scan_active`] found.
enum Active {
    /// Whole, once a torn tail was cut.
    Whole(SegmentMeta),
    /// Damaged in the middle (only with `tolerate`: otherwise that is an error); nothing was
    /// changed.
    Damaged(Damage),
}

/// Moves the batches of the damaged `seg` from `damage.resume` to the end of its file into a
/// new segment starting at `damage.resume_offset` (above every offset before it, so no offset
/// is ever given twice), then cuts `seg` there: what is left of it is its valid batches, then
/// the damage, which the caller quarantines. The copy is written under a temporary name and
/// renamed once whole (and synced, with `durable`), before `seg` is cut: a crash at any point
/// leaves either the damaged segment as it was (the split starts again) or both whole. Returns
/// the new segment, to recover as the active one.
fn split_at_damage(
    dir: &Path,
    seg: &Segment,
    damage: &Damage,
    now_ms: u64,
    durable: bool,
) -> Result<Segment, LogError> {
    let base = damage.resume_offset;
    let tmp = segment_path(dir, base, SPLIT);
    let file_len = seg.file_len()?;
    let mut out = File::create(&tmp).map_err(|e| LogError::io("create", &tmp, e))?;
    let header = SegmentHeader {
        base_offset: base,
        created_ms: now_ms,
        prev_unsynced: false,
    };
    out.write_all(&header.encode())
        .map_err(|e| LogError::io("write", &tmp, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = damage.resume;
    while pos < file_len {
        let n = (file_len - pos).min(buf.len() as u64) as usize;
        seg.read_at(&mut buf[..n], pos)?;
        out.write_all(&buf[..n])
            .map_err(|e| LogError::io("write", &tmp, e))?;
        pos += n as u64;
    }
    if durable {
        out.sync_all().map_err(|e| LogError::io("fsync", &tmp, e))?;
    }
    drop(out);
    let target = segment_path(dir, base, "log");
    fs::rename(&tmp, &target).map_err(|e| LogError::io("rename", &tmp, e))?;
    if durable {
        sync_dir(dir)?;
    }
    seg.set_len(damage.resume)?;
    if durable {
        seg.sync_data()?;
    }
    Segment::open(dir, base)
}

/// Recovers the active segment: full scan, torn tail cut, indexes rebuilt. Damage in the
/// middle is [`LogError::Corrupt`].
pub(crate) fn open_active(
    seg: &Segment,
    config: &LogConfig,
    now_ms: u64,
    notes: &mut Vec<String>,
) -> Result<SegmentMeta, LogError> {
    match scan_active(seg, config, now_ms, notes, false)? {
        Active::Whole(meta) => Ok(meta),
        Active::Damaged(d) => Err(LogError::corrupt(&seg.path, d.at, d.reason)),
    }
}

/// Scans the active segment: full scan, torn tail cut, indexes rebuilt; damage in the middle is
/// [`LogError::Corrupt`], or with `tolerate`, [`Active::Damaged`].
fn scan_active(
    seg: &Segment,
    config: &LogConfig,
    now_ms: u64,
    notes: &mut Vec<String>,
    tolerate: bool,
) -> Result<Active, LogError> {
    let file_len = seg.file_len()?;
    let header = match seg.read_header()? {
        Ok(h) => h,
        // Torn while being created: nothing was ever appended to it.
        Err(_) if file_len <= SEGMENT_HEADER_LEN => {
            // Flagged: the segment before it (checked as possibly unsynced) is synced by
            // the first sync, which then clears the flag.
            seg.write_header(now_ms, durable(config), durable(config))?;
            seg.index.rewrite(&[])?;
            seg.time.rewrite(&[])?;
            return Ok(Active::Whole(SegmentMeta::empty(seg.base, now_ms)));
        }
        Err(reason) => return Err(LogError::corrupt(&seg.path, 0, reason)),
    };
    let scan = seg.scan(
        SegmentMeta::empty(seg.base, header.created_ms),
        file_len,
        config.index_interval_bytes,
    )?;
    if let Some((pos, reason)) = scan.stopped {
        // Zeros after the data are preallocated space (see `Shared::preallocate`), not a tear,
        // and no batch can follow them.
        if !seg.zeros(pos, file_len)? {
            let after = scan.meta.next_offset;
            if let Some((resume, resume_offset)) = seg.next_valid_batch(pos, after, file_len)? {
                let reason = format!("{reason} (valid batches follow: not a torn tail)");
                if !tolerate {
                    return Err(LogError::corrupt(&seg.path, pos, reason));
                }
                return Ok(Active::Damaged(Damage {
                    at: pos,
                    reason,
                    lost_from: after,
                    resume,
                    resume_offset,
                }));
            }
            notes.push(format!(
                "torn tail of {} cut at position {pos} ({} bytes after offset {}): {reason}",
                seg.path.display(),
                file_len - pos,
                scan.meta.next_offset
            ));
        }
        seg.set_len(pos)?;
        if durable(config) {
            seg.sync_data()?;
        }
    }
    seg.index.rewrite(&scan.index)?;
    seg.time.rewrite(&scan.time)?;
    Ok(Active::Whole(scan.meta))
}
