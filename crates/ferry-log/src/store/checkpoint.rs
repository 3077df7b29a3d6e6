//! The store's index checkpoint: every stream's state at a log position, so that opening the
//! store scans only the log written after it.
//!
//! # FORMAT (version 1)
//! One file, `streams.checkpoint`, in the store's directory. Integers are unsigned LEB128
//! varints unless a width is given; fixed-width integers are little-endian.
//!
//! - magic `FERRYCKP` (8 bytes), format version `u16` = 1, flags `u16` = 0;
//! - the segments of the log when it was written: count, then `(base offset, creation time)`
//!   each (the creation time is the one in the segment's file header);
//! - the uncommitted transaction parts discarded when the store last opened, which readers
//!   skip: count, then their log offsets;
//! - `position`: the log offset the state is at (a batch boundary: every batch below it is
//!   accounted for, none at or above it), the byte clock there, the next stream id, the
//!   control stream's next offset;
//! - the transaction parts written below `position` that no commit record below it named:
//!   count, then their log offsets (the checkpoint counts them: it is usable only if a commit
//!   record after `position` names each of them);
//! - the streams: count, then per stream its id, a flags byte (bit 0: its definition was
//!   seen), its name (length, UTF-8 bytes), start, next offset, the byte clock at the end of
//!   its last batch, its bytes since its last index entry, its bytes so far, its largest
//!   timestamp, the log offset of its latest definition, then its index entries: count, then
//!   `(stream offset, log offset, largest timestamp before, bytes before)` each;
//! - CRC32C of every byte before it, `u32`.
//!
//! The file is written to `streams.checkpoint.tmp`, fsynced, renamed over the previous one and
//! the directory fsynced, so it is always whole: the old checkpoint or the new one (with
//! durability `Never` nothing is fsynced, the log included: after a power loss a torn
//! checkpoint fails its CRC, and one ahead of the log does not match it).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Entry, StreamState, Streams, CONTROL};
use crate::error::LogError;
use crate::segment::sync_dir;

/// The checkpoint's file name in the store's directory.
pub(super) const FILE: &str = "streams.checkpoint";
/// Where a checkpoint is written before it replaces the previous one.
const TMP: &str = "streams.checkpoint.tmp";
const MAGIC: &[u8; 8] = b"FERRYCKP";
/// The format version written and read.
const VERSION: u16 = 1;

/// A checkpoint read back.
#[derive(Debug)]
pub(super) struct Checkpoint {
    /// The log offset the state is at.
    pub position: u64,
    /// The streams' state there (`end` = `position`, `open_parts` as written, nothing pending).
    pub streams: Streams,
    /// `(base offset, creation time)` of the log's segments when it was written.
    pub segments: Vec<(u64, u64)>,
    /// Transaction parts readers skip.
    pub dead: HashSet<u64>,
}

/// The path of the checkpoint in `dir`.
pub(super) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The streams' part of a checkpoint (taken under the streams' lock), from `position` on.
pub(super) fn encode_state(s: &Streams) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + s.by_id.len() * 96);
    for v in [s.end, s.clock, u64::from(s.next_id), s.control_next] {
        put(&mut out, v);
    }
    put(&mut out, s.open_parts.len() as u64);
    for &seq in &s.open_parts {
        put(&mut out, seq);
    }
    put(&mut out, s.by_id.len() as u64);
    for (&id, st) in &s.by_id {
        put(&mut out, u64::from(id));
        out.push(u8::from(st.defined));
        put(&mut out, st.name.len() as u64);
        out.extend_from_slice(st.name.as_bytes());
        for v in [
            st.start,
            st.next,
            st.last_end,
            st.since_entry,
            st.bytes,
            st.max_ts,
            st.define_seq,
        ] {
            put(&mut out, v);
        }
        put(&mut out, st.entries.len() as u64);
        for e in &st.entries {
            for v in [e.offset, e.seq, e.ts_before, e.bytes_before] {
                put(&mut out, v);
            }
        }
    }
    out
}

/// A whole checkpoint file: header, `segments`, `dead`, the `state` of [`encode_state`], CRC.
pub(super) fn assemble(segments: &[(u64, u64)], dead: &[u64], state: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(state.len() + 64 + 16 * (segments.len() + dead.len()));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    put(&mut out, segments.len() as u64);
    for &(base, created) in segments {
        put(&mut out, base);
        put(&mut out, created);
    }
    put(&mut out, dead.len() as u64);
    for &seq in dead {
        put(&mut out, seq);
    }
    out.extend_from_slice(state);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Writes `bytes` as the checkpoint of `dir`, atomically: a temporary file, fsynced (if
/// `durable`), renamed over the previous checkpoint, then the directory fsynced (if
/// `durable`). A checkpoint torn by a power loss without `durable` fails its CRC.
pub(super) fn write(dir: &Path, bytes: &[u8], durable: bool) -> Result<(), LogError> {
    let tmp = dir.join(TMP);
    let mut file = File::create(&tmp).map_err(|e| LogError::io("create", &tmp, e))?;
    file.write_all(bytes)
        .map_err(|e| LogError::io("write", &tmp, e))?;
    if durable {
        file.sync_all()
            .map_err(|e| LogError::io("fsync", &tmp, e))?;
    }
    drop(file);
    let target = path(dir);
    fs::rename(&tmp, &target).map_err(|e| LogError::io("rename", &tmp, e))?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

/// The bytes of the checkpoint of `dir`, `None` if there is none. Removes a temporary file
/// left by an interrupted write.
pub(super) fn read(dir: &Path) -> Result<Option<Vec<u8>>, LogError> {
    let tmp = dir.join(TMP);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(LogError::io("delete", tmp, e)),
    }
    let target = path(dir);
    match fs::read(&target) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LogError::io("read", target, e)),
    }
}

/// Deletes the checkpoint of `dir` (one that does not match the log must never be used later,
/// when the log may have grown past it with other data), and syncs the directory.
pub(super) fn remove(dir: &Path) -> Result<(), LogError> {
    let target = path(dir);
    match fs::remove_file(&target) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LogError::io("delete", target, e)),
    }
}

/// Decodes and checks a checkpoint file; the error says what is wrong with it.
pub(super) fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
    let header = MAGIC.len() + 4;
    if bytes.len() < header + 4 {
        return Err(format!(
            "file of {} bytes, shorter than a header",
            bytes.len()
        ));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a checkpoint file (bad magic)".into());
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != VERSION {
        return Err(format!("format version {version}, expected {VERSION}"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(format!(
            "CRC32C mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    let flags = u16::from_le_bytes([bytes[10], bytes[11]]);
    if flags != 0 {
        return Err(format!("unknown flags {flags:#06x}"));
    }
    let mut r = Reader {
        buf: &body[header..],
    };
    let segments = (0..r.count(2)?)
        .map(|_| Ok((r.u64()?, r.u64()?)))
        .collect::<Result<Vec<_>, String>>()?;
    let dead = (0..r.count(1)?)
        .map(|_| r.u64())
        .collect::<Result<HashSet<_>, String>>()?;
    let position = r.u64()?;
    let clock = r.u64()?;
    let next_id = u32::try_from(r.u64()?).map_err(|_| "next stream id out of range")?;
    let control_next = r.u64()?;
    let open_parts = (0..r.count(1)?)
        .map(|_| r.u64())
        .collect::<Result<BTreeSet<_>, String>>()?;
    let count = r.count(11)?;
    let mut by_id = HashMap::with_capacity(count);
    let mut by_name = BTreeMap::new();
    for _ in 0..count {
        let id = u32::try_from(r.u64()?).map_err(|_| "stream id out of range")?;
        let defined = match r.byte()? {
            0 => false,
            1 => true,
            f => return Err(format!("stream {id}: unknown flags {f:#04x}")),
        };
        let len = r.count(1)?;
        let name = std::str::from_utf8(r.take(len)?)
            .map_err(|_| format!("stream {id}: name is not UTF-8"))?;
        let name: Arc<str> = Arc::from(name);
        let mut v = [0u64; 7];
        for x in &mut v {
            *x = r.u64()?;
        }
        let [start, next, last_end, since_entry, bytes, max_ts, define_seq] = v;
        // Exactly as many as there are: most streams of a store with many have one entry.
        let count = r.count(4)?;
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            entries.push(Entry {
                offset: r.u64()?,
                seq: r.u64()?,
                ts_before: r.u64()?,
                bytes_before: r.u64()?,
            });
        }
        let sorted = entries.windows(2).all(|w| w[0].offset < w[1].offset);
        if id == CONTROL
            || id >= next_id
            || start > next
            || !sorted
            || entries
                .iter()
                .any(|e| e.seq >= position || e.offset >= next)
        {
            return Err(format!("stream {id} ({name:?}) does not add up"));
        }
        if defined && by_name.insert(name.clone(), id).is_some() {
            return Err(format!("stream name {name:?} appears twice"));
        }
        let st = StreamState {
            name,
            start,
            next,
            entries,
            last_end,
            since_entry,
            bytes,
            max_ts,
            define_seq,
            defined,
            retention: None,
            forgetting: false,
        };
        if by_id.insert(id, st).is_some() {
            return Err(format!("stream {id} appears twice"));
        }
    }
    if !r.buf.is_empty() {
        return Err(format!("{} bytes after the last stream", r.buf.len()));
    }
    if open_parts.iter().any(|&seq| seq >= position) {
        return Err("a transaction part at or after its position".into());
    }
    Ok(Checkpoint {
        position,
        streams: Streams {
            by_name,
            by_id,
            next_id,
            control_next,
            clock,
            end: position,
            pending: HashMap::new(),
            open_parts,
            lost_floor: 0,
        },
        segments,
        dead,
    })
}

/// Appends `v` as an unsigned LEB128 varint.
fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a checkpoint's body; every read is checked against what is left.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn truncated() -> String {
        "truncated".into()
    }

    fn byte(&mut self) -> Result<u8, String> {
        let (&b, rest) = self.buf.split_first().ok_or_else(Self::truncated)?;
        self.buf = rest;
        Ok(b)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err("varint overflows 64 bits".into());
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    /// A count of items of at least `min_bytes` each: never more than what is left could
    /// hold (so a damaged count cannot make a huge allocation).
    fn count(&mut self, min_bytes: usize) -> Result<usize, String> {
        let n = self.u64()?;
        if n > (self.buf.len() / min_bytes) as u64 {
            return Err(format!(
                "count {n} larger than the {} bytes left can hold",
                self.buf.len()
            ));
        }
        Ok(n as usize)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.buf.len() {
            return Err(Self::truncated());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn varints_round_trip() {
        let values = [
            0,
            1,
            127,
            128,
            300,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ];
        let mut out = Vec::new();
        for v in values {
            put(&mut out, v);
        }
        let mut r = Reader { buf: &out };
        for v in values {
            assert_eq!(r.u64(), Ok(v));
        }
        assert!(r.buf.is_empty());
        assert!(Reader { buf: &[0xff; 11] }.u64().is_err());
        assert!(Reader { buf: &[0x80] }.u64().is_err());
    }

    #[test]
    fn any_damage_is_an_error_never_a_panic() {
        let mut s = Streams {
            next_id: 3,
            end: 500,
            clock: 9000,
            ..Streams::default()
        };
        for id in 1..3u32 {
            let mut st = StreamState::new(Arc::from(format!("s{id}")), 0, 0);
            st.defined = true;
            st.next = 10;
            st.entries.push(Entry {
                offset: 0,
                seq: u64::from(id) * 7,
                ts_before: 0,
                bytes_before: 0,
            });
            s.by_name.insert(st.name.clone(), id);
            s.by_id.insert(id, st);
        }
        let good = assemble(&[(0, 1234)], &[42], &encode_state(&s));
        let ck = decode(&good).unwrap();
        assert_eq!(ck.position, 500);
        assert_eq!(ck.segments, vec![(0, 1234)]);
        assert_eq!(ck.streams.by_id.len(), 2);
        assert_eq!(ck.streams.by_name.get("s2"), Some(&2));
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x41;
            assert!(decode(&bad).is_err(), "byte {i}");
            assert!(decode(&good[..i]).is_err(), "cut at {i}");
        }
    }
}
