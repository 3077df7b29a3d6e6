//! `ferry-log`: a synchronous, crash-safe, segmented append-only log (one per topic).
//!
//! A [`Log`] owns one directory of segment files. Appends take a batch of [`RecordIn`] and give
//! it contiguous offsets, all or nothing; [`Durability`] says when `append` may return relative
//! to fsync (with group commit for [`Durability::Always`]). Reads go to disk through a sparse
//! offset index, apart from a small bounded cache of recently appended batches
//! ([`LogConfig::cache_bytes`]): memory does not grow with the log. The log is `Send + Sync`
//! and has no async code.
//!
//! ```
//! # fn main() -> Result<(), ferry_log::LogError> {
//! use ferry_log::{Durability, Log, LogConfig, RecordIn};
//! # let dir = std::env::temp_dir().join(format!("ferry-log-doc-{}", std::process::id()));
//! let log = Log::open(&dir, LogConfig { durability: Durability::Never, ..LogConfig::default() })?;
//! let at = log.append(&[RecordIn::new("hello").with_key("k"), RecordIn::new("world")])?;
//! assert_eq!((at.base_offset, at.last_offset), (0, 1));
//! let records = log.read(0, 10, 1 << 20)?;
//! assert_eq!(&records[1].payload[..], b"world");
//! # drop(log); std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```
//!
//! # Timestamps
//! Milliseconds since the Unix epoch, `u64`. A record without one is stamped when appended.
//! Timestamps need not increase; [`Log::offset_for_timestamp`] finds the first offset whose
//! timestamp is at or after the target.
//!
//! # FORMAT (version 1)
//! All integers are little-endian. A log directory holds, per segment, named by the segment's
//! base offset on 20 digits:
//! - `<base>.log`: a 32-byte file header, then batches back to back;
//! - `<base>.index`: sparse offset index, 16-byte entries `(offset u64, position u64)`: the
//!   batch starting at `offset` is at byte `position` of the `.log`. At most one entry every
//!   [`LogConfig::index_interval_bytes`] (4 KiB by default);
//! - `<base>.timeindex`: 16-byte entries `(timestamp u64, offset u64)`: `timestamp` is the
//!   largest record timestamp in the segment *before* `offset` (a batch start), at the same
//!   cadence. A sealed segment's time index ends with `(max timestamp, next offset)`.
//!
//! Both indexes are hints, rebuilt from the `.log` whenever missing or damaged. A [`Store`]'s
//! directory also holds `streams.checkpoint`, the checkpoint of its streams' in-memory index
//! (see [`Store::checkpoint`]; a hint too: opening without it scans the whole log).
//!
//! **File header** (32 bytes): magic `FERRYLOG` (8), format version `u16` = 1, flags `u16`,
//! base offset `u64`, creation time `u64` (ms), CRC32C of the preceding 28 bytes `u32`. Flag
//! bit 0 (`prev_unsynced`, see [`SegmentHeader`]): the segment before this one may not be
//! synced yet; other bits are 0 (files written before the flag existed have flags 0).
//!
//! **Batch** ([`BATCH_HEADER_LEN`] = 43-byte header, then the records section):
//!
//! | at | field | |
//! |----|-------|-|
//! | 0  | length `u32` | bytes after this field (so the batch is `4 + length` bytes), at most [`MAX_BATCH_BYTES`] |
//! | 4  | crc `u32` | CRC32C (Castagnoli) of every byte after this field |
//! | 8  | version `u8` = 1 | |
//! | 9  | attributes `u16` | bits 0–2: codec (0 none, 1 LZ4 block); other bits 0 |
//! | 11 | base offset `u64` | offset of the first record |
//! | 19 | record count `u32` | at least 1 |
//! | 23 | first timestamp `u64` | of the first record |
//! | 31 | max timestamp `u64` | largest record timestamp |
//! | 39 | records length `u32` | records section size, uncompressed |
//! | 43 | records | as is, or one LZ4 block (only when smaller) |
//!
//! A **stream batch** (written by a [`Store`]) has version 2 and [`STREAM_BATCH_HEADER_LEN`] =
//! 55 header bytes: the fields above, then stream id `u32` at 43 and the stream offset of its
//! first record `u64` at 47, the records section following at 55. Its attribute bit 3 marks a
//! transaction part, which counts only once a commit record of the store's control stream
//! names it (see [`StreamTag`]).
//!
//! **Record** (lengths are unsigned LEB128 varints, at most 10 bytes):
//! `length` (bytes of the record after this field), `offset delta` (= index in the batch),
//! `timestamp delta` (zigzag varint of `timestamp - first timestamp`, wrapping), `flags` (`u16`),
//! `key length + 1` (0 = no key) and key bytes, `header count`, then per header
//! `name length`, UTF-8 name, `value length`, value; then `payload length` and payload.
//!
//! The decoder ([`decode_batches`], [`decode_batch`]) accepts any bytes without panicking:
//! every length is checked against the remaining input and the format limits, the record count
//! against the section size, and the LZ4 output size against the input size.
//!
//! # RECOVERY
//! On open, segments other than the last (sealed) are checked cheaply: their indexes must be
//! well-formed and the batches from the last index entry to the end of the file must be whole,
//! CRC-valid, contiguous and end exactly at the next segment's base offset; otherwise their
//! indexes are rebuilt by a full scan, and any damage found then is [`LogError::Corrupt`].
//!
//! **Invariant: a sealed segment can be torn only while the segment after it is flagged.** A
//! roll does no fsync (see Durability): the sealed segment is made durable by the next sync,
//! which acknowledges nothing before it has fsynced it, cleared the `prev_unsynced` flag of the
//! segment after it (written when the roll created that segment) and synced that one and the
//! directory. So when the segment after a sealed one is still flagged on disk (or its header
//! never reached the disk: torn or all zeros), no sync completed since that roll, and nothing
//! from the sealed segment's unsynced tail on was acknowledged. Recovery then scans that sealed
//! segment fully: if its data ends before the next segment's base with nothing valid after
//! the end (a torn write), the segments after it are removed (they held only unsynced data,
//! and keeping them would leave a gap in the offsets), it becomes the active segment and its
//! torn tail is cut; both are reported in [`Log::recovery_notes`]. Offsets after the cut were
//! never acknowledged, so giving them again reuses no acknowledged offset (a [`Store`] keeps
//! a stream's offsets above any end its checkpoint knows). Damage with valid batches after
//! it, and any damage in a sealed segment whose successor is not flagged (a synced segment
//! cannot be torn), is reported exactly as before. With [`Durability::Never`] nothing is
//! flagged: a sealed segment torn by a power loss is damage, as it always was.
//!
//! The last (active) segment is scanned fully, checking every CRC and that offsets follow on.
//! At the first batch that is not whole and valid (short, zero-filled, bad length or CRC):
//! - **mid-segment corruption** if a whole, CRC-valid batch with a higher base offset starts
//!   anywhere after it in the file: [`LogError::Corrupt`] with the segment and the position of
//!   the bad batch, and the log does not open (nothing is silently skipped). With
//!   [`LogConfig::tolerate_damage`] it opens: the batches from that valid one to the end of the
//!   file are copied to a new segment named by its base offset (written under a temporary
//!   `.split` name, synced, renamed), the damaged segment is cut there and quarantined from the
//!   damage on like a damaged sealed segment, and the recovery notes say which log offsets
//!   were lost. The new segment is recovered as the active one (damage further on splits it
//!   again), so appends go on after every offset seen, and the next open finds the same;
//! - otherwise a **torn tail**: the file is cut at the last valid batch, and
//!   [`Log::recovery_notes`] says where and how much, unless all that is cut is zeros (the
//!   active segment's file is extended with zeros ahead of its writes, so that an fdatasync has
//!   no size or extent metadata to write; a closed log ends its file with its data again).
//!
//! With [`LogConfig::tolerate_damage`] a damaged sealed segment does not fail the open: the
//! damage goes to the recovery notes and scans skip the rest of that segment. A [`Store`]
//! opens that way and then checks the CRC of every batch of its sealed segments before
//! trusting a header ([`Log::scan_around_damage`]); opened from its index checkpoint
//! ([`Store::checkpoint`]), every stream keeps the end the checkpoint knows, so that offsets
//! lost with the end of the log are not given out again.
//!
//! A CRC-valid batch whose offset does not follow on is corruption wherever it is. The active
//! segment's indexes are always rebuilt. A file header torn while the segment was created (file
//! no longer than the header) is rewritten. Index files without a `.log` (interrupted deletion)
//! are removed, and so are `.split` copies (an interrupted split, which starts again). Reads that meet damaged data return [`LogError::Corrupt`] too.
//!
//! # Durability
//! - [`Durability::Always`]: `append` returns after `File::sync_data` covered its batch. The
//!   first waiter that finds no fsync running syncs everything written so far and wakes the
//!   others it covered (leader/follower over write sequence numbers, a `Mutex` + `Condvar`);
//!   [`LogStats::fsyncs`] counts the fsyncs.
//! - [`Durability::Interval`]: a background thread does the same every interval, and on drop.
//! - [`Durability::Never`]: the OS writes back when it likes.
//!
//! Rolling does no fsync under the writer lock (appenders of every stream wait on it): the new
//! segment is created with the `prev_unsynced` flag in its header and no fsync, and the sealed
//! one joins the segments the next sync fsyncs before the active one. That sync (group commit,
//! the flusher, [`Log::sync`], `close`) fsyncs each sealed segment not synced yet (data and
//! indexes), oldest first, clearing the flag of the segment after each once it is synced, then
//! the active segment, then the directory that holds the new files, before it acknowledges
//! anything (see RECOVERY for what a crash in between leaves). Deleting and cutting segment
//! files fsyncs them and the directory, except with `Never` (where a power loss can leave a
//! sealed segment torn, which the next open reports as [`LogError::Corrupt`]). An fsync failure closes the log ([`LogError::SyncFailed`], then
//! [`LogError::Closed`]). Only one `Log` per directory may be open in a process
//! ([`LogError::AlreadyOpen`]); nothing guards against two processes.

#![deny(missing_docs)]

mod cache;
mod codec;
mod config;
mod error;
mod log;
mod record;
mod recovery;
mod segment;
mod store;
mod sync;

pub use codec::{
    decode_batch, decode_batches, encode_batch, encode_stream_batch, reseal_batch, BatchHeader,
    Compression, DecodeBatches, DecodedBatch, EncodeError, SegmentHeader, StreamTag,
    BATCH_HEADER_LEN, BATCH_VERSION, FORMAT_VERSION, MAX_BATCH_BYTES, SEGMENT_HEADER_LEN,
    SEGMENT_MAGIC, STREAM_BATCH_HEADER_LEN, STREAM_BATCH_VERSION,
};
pub use config::{Durability, LogConfig, RetentionPolicy};
pub use error::{DecodeError, LogError};
pub use log::{Log, LogStats, Visit};
pub use record::{AppendInfo, RecordIn, StoredRecord};
pub use store::{OpenScan, Store, StoreConfig, Stream};

pub(crate) use log::State;

#[cfg(not(unix))]
compile_error!("ferry-log uses positional file I/O (std::os::unix::fs::FileExt): Unix only");
