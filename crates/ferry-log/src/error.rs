//! Error types: [`LogError`] for the log, [`DecodeError`] for the pure codec.

use std::io;
use std::path::PathBuf;

/// Why a byte sequence is not a valid batch (or segment header).
///
/// Returned by the pure decoder ([`crate::decode_batches`], [`crate::decode_batch`]); the log wraps
/// it into [`LogError::Corrupt`] with the segment path and file position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends before the structure it announces.
    #[error("truncated: needs {needed} bytes, {available} available")]
    Truncated {
        /// Bytes the structure needs.
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// A length field is outside the limits of the format.
    #[error("{what} {value} out of range")]
    BadLength {
        /// Which length.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The stored checksum does not match the bytes.
    #[error("CRC32C mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// Checksum stored in the header.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// Unknown magic number or format/batch version.
    #[error("bad magic or unsupported version: {0}")]
    BadMagic(String),
    /// The attribute bits name an unknown compression codec or reserved bits are set.
    #[error("bad batch attributes {0:#06x}")]
    BadAttributes(u16),
    /// The compressed section does not decompress to the announced size.
    #[error("decompression failed: {0}")]
    Decompress(String),
    /// A record inside a batch is malformed.
    #[error("record {index}: {reason}")]
    BadRecord {
        /// Index of the record inside its batch.
        index: u32,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An I/O operation failed on a file or directory.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (for example "write", "fsync", "open").
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Stored data is damaged somewhere the log cannot repair by itself: in the middle of the
    /// active segment, anywhere in a sealed segment, or between segments (a gap).
    #[error("corrupt segment {segment} at position {position}: {reason}")]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Byte position in the file where the damage starts.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// The encoded batch exceeds `LogConfig::max_batch_bytes`.
    #[error("batch of {size} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge {
        /// Encoded size of the batch.
        size: u64,
        /// The configured limit.
        max: u64,
    },
    /// `append` was called with no record.
    #[error("empty batch")]
    EmptyBatch,
    /// The offset is outside the retained range `[start, end]`.
    #[error("offset {offset} out of range [{start}, {end}]")]
    OffsetOutOfRange {
        /// The requested offset.
        offset: u64,
        /// First retained offset.
        start: u64,
        /// Next offset to be assigned.
        end: u64,
    },
    /// The log was closed, or a previous fsync failed and the log refuses further writes.
    #[error("log is closed")]
    Closed,
    /// An fsync failed: the data written since the last successful sync may be lost. The log
    /// closes itself: after an fsync failure the page cache state is unknown.
    #[error("fsync failed, log closed: {0}")]
    SyncFailed(String),
    /// The same directory is already open by another `Log` in this process.
    #[error("log directory {0} is already open")]
    AlreadyOpen(PathBuf),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Records of a stream could not be read: damaged on disk. The range is what a reader
    /// skips to get past the damage (the whole damaged batch, or up to the stream's next index
    /// entry when the damage hides where its batches are).
    #[error("stream {stream:?}: records {from}..{to} are damaged: {reason}")]
    Damaged {
        /// The stream.
        stream: String,
        /// First offset of the damaged range.
        from: u64,
        /// Offset after it.
        to: u64,
        /// What is wrong, with the segment file and position.
        reason: String,
    },
    /// A store's streams do not add up: a batch of a stream that was never defined, offsets
    /// that go back, a control record that cannot be read, or an append below a stream's end.
    #[error("inconsistent store: {0}")]
    Inconsistent(String),
}

impl LogError {
    /// An [`LogError::Io`] for `path`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        LogError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// A [`LogError::Corrupt`].
    pub(crate) fn corrupt(
        segment: impl Into<PathBuf>,
        position: u64,
        reason: impl Into<String>,
    ) -> Self {
        LogError::Corrupt {
            segment: segment.into(),
            position,
            reason: reason.into(),
        }
    }
}
