//! The binary format: segment headers, batch framing and records (see the crate docs, FORMAT).
//!
//! Everything here is pure and total: any input bytes give a value or a [`DecodeError`], never a
//! panic. Lengths are checked against the remaining input before use, allocations are bounded by
//! the input size, and arithmetic on untrusted values is checked or wrapping.

use bytes::Bytes;

use crate::error::DecodeError;
use crate::record::StoredRecord;

/// Magic number at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"FERRYLOG";
/// Version of the segment file format.
pub const FORMAT_VERSION: u16 = 1;
/// Size of the segment file header.
pub const SEGMENT_HEADER_LEN: u64 = 32;
/// Version byte of a batch.
pub const BATCH_VERSION: u8 = 1;
/// Version byte of a batch that belongs to a stream of a multi-stream store: its header is
/// followed by the stream id and the stream offset of its first record ([`StreamTag`]).
pub const STREAM_BATCH_VERSION: u8 = 2;
/// Size of the fixed batch header.
pub const BATCH_HEADER_LEN: usize = 43;
/// Size of the fixed header of a stream batch ([`STREAM_BATCH_VERSION`]).
pub const STREAM_BATCH_HEADER_LEN: usize = BATCH_HEADER_LEN + 12;
/// Hard limit of the format on the size of one batch (header included), and on the
/// decompressed size of its records.
pub const MAX_BATCH_BYTES: u32 = 256 << 20;
/// Smallest possible encoded record (every field present with its shortest encoding).
const MIN_RECORD_LEN: u32 = 8;

/// Size of the fixed header of a plain or a stream batch.
fn header_len(stream: bool) -> usize {
    if stream {
        STREAM_BATCH_HEADER_LEN
    } else {
        BATCH_HEADER_LEN
    }
}
/// Attribute bits holding the compression codec; every other bit is reserved and must be 0,
/// but [`TX_PART`] on a stream batch.
const CODEC_MASK: u16 = 0x7;
/// Attribute bit of a stream batch that is part of a transaction (see [`StreamTag::tx_part`]).
const TX_PART: u16 = 0x8;

/// Compression codec of a batch's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Records stored as they are.
    #[default]
    None,
    /// Records compressed as one LZ4 block (used only when it makes the batch smaller).
    Lz4,
}

impl Compression {
    fn from_bits(bits: u16) -> Option<Self> {
        match bits {
            0 => Some(Compression::None),
            1 => Some(Compression::Lz4),
            _ => None,
        }
    }

    fn bits(self) -> u16 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
        }
    }
}

/// The fixed header of a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Offset of the first record the segment holds (also its file name).
    pub base_offset: u64,
    /// When the segment was created, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Flag bit 0: the segment before this one may not be synced yet (set when a roll
    /// creates this segment, cleared once the sync after it made the previous segment
    /// durable). Recovery treats a torn tail of the previous segment as a torn write, not as
    /// damage, only while this is set (see the crate docs, RECOVERY).
    pub prev_unsynced: bool,
}

/// Flag bit of [`SegmentHeader::prev_unsynced`].
const PREV_UNSYNCED: u16 = 1;

impl SegmentHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut out = [0u8; SEGMENT_HEADER_LEN as usize];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        let flags = if self.prev_unsynced { PREV_UNSYNCED } else { 0 };
        out[10..12].copy_from_slice(&flags.to_le_bytes());
        out[12..20].copy_from_slice(&self.base_offset.to_le_bytes());
        out[20..28].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32c::crc32c(&out[..28]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header (magic, version, checksum).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b = bytes
            .get(..SEGMENT_HEADER_LEN as usize)
            .ok_or(DecodeError::Truncated {
                needed: SEGMENT_HEADER_LEN,
                available: bytes.len() as u64,
            })?;
        if b[0..8] != SEGMENT_MAGIC {
            return Err(DecodeError::BadMagic("not a ferry-log segment".into()));
        }
        let version = le_u16(b, 8);
        let flags = le_u16(b, 10);
        if version != FORMAT_VERSION || flags & !PREV_UNSYNCED != 0 {
            return Err(DecodeError::BadMagic(format!(
                "segment format {version}, flags {flags:#x}"
            )));
        }
        let stored = le_u32(b, 28);
        let computed = crc32c::crc32c(&b[..28]);
        if stored != computed {
            return Err(DecodeError::CrcMismatch { stored, computed });
        }
        Ok(SegmentHeader {
            base_offset: le_u64(b, 12),
            created_ms: le_u64(b, 20),
            prev_unsynced: flags & PREV_UNSYNCED != 0,
        })
    }
}

/// Which stream of a multi-stream store a batch belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamTag {
    /// The stream id (0 is the store's own control stream).
    pub id: u32,
    /// Stream offset of the batch's first record.
    pub base: u64,
    /// Part of a transaction: valid only once a commit record names it (attribute bit 3).
    pub tx_part: bool,
}

/// The fixed header of a batch, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Bytes following the length field (so the whole batch is `4 + length` bytes).
    pub length: u32,
    /// CRC32C of everything after the CRC field.
    pub crc: u32,
    /// Codec of the records section.
    pub compression: Compression,
    /// Offset of the first record.
    pub base_offset: u64,
    /// Number of records (at least 1).
    pub record_count: u32,
    /// Timestamp of the first record.
    pub first_timestamp: u64,
    /// Largest record timestamp.
    pub max_timestamp: u64,
    /// Size of the records section once decompressed.
    pub records_len: u32,
    /// The stream of a [`STREAM_BATCH_VERSION`] batch; `None` for a plain batch.
    pub stream: Option<StreamTag>,
}

impl BatchHeader {
    /// Parses and sanity-checks a batch header from the start of `bytes` (which need not hold the
    /// whole batch). Does not check the CRC.
    pub fn parse(bytes: &[u8]) -> Result<Self, DecodeError> {
        let b = bytes
            .get(..BATCH_HEADER_LEN)
            .ok_or(DecodeError::Truncated {
                needed: BATCH_HEADER_LEN as u64,
                available: bytes.len() as u64,
            })?;
        let length = le_u32(b, 0);
        let stream = match b[8] {
            BATCH_VERSION => None,
            STREAM_BATCH_VERSION => {
                let t = bytes.get(BATCH_HEADER_LEN..STREAM_BATCH_HEADER_LEN).ok_or(
                    DecodeError::Truncated {
                        needed: STREAM_BATCH_HEADER_LEN as u64,
                        available: bytes.len() as u64,
                    },
                )?;
                Some(StreamTag {
                    id: le_u32(t, 0),
                    base: le_u64(t, 4),
                    tx_part: false,
                })
            }
            v => return Err(DecodeError::BadMagic(format!("batch version {v}"))),
        };
        let after_length = header_len(stream.is_some()) as u32 - 4;
        if !(after_length..=MAX_BATCH_BYTES - 4).contains(&length) {
            return Err(DecodeError::BadLength {
                what: "batch length",
                value: length.into(),
            });
        }
        let attributes = le_u16(b, 9);
        // The transaction-part bit exists only on stream batches.
        let allowed = if stream.is_some() {
            CODEC_MASK | TX_PART
        } else {
            CODEC_MASK
        };
        let compression = match Compression::from_bits(attributes & CODEC_MASK) {
            Some(c) if attributes & !allowed == 0 => c,
            _ => return Err(DecodeError::BadAttributes(attributes)),
        };
        let stream = stream.map(|t| StreamTag {
            tx_part: attributes & TX_PART != 0,
            ..t
        });
        let header = BatchHeader {
            length,
            crc: le_u32(b, 4),
            compression,
            base_offset: le_u64(b, 11),
            record_count: le_u32(b, 19),
            first_timestamp: le_u64(b, 23),
            max_timestamp: le_u64(b, 31),
            records_len: le_u32(b, 39),
            stream,
        };
        let body_len = header.body_len();
        let records_len_ok = match compression {
            Compression::None => header.records_len == body_len,
            // LZ4 cannot expand more than ~255x: this bounds the decompression buffer.
            Compression::Lz4 => {
                header.records_len <= MAX_BATCH_BYTES
                    && u64::from(header.records_len) <= u64::from(body_len) * 256 + 64
            }
        };
        if !records_len_ok {
            return Err(DecodeError::BadLength {
                what: "records section length",
                value: header.records_len.into(),
            });
        }
        if header.record_count == 0 || header.record_count > header.records_len / MIN_RECORD_LEN {
            return Err(DecodeError::BadLength {
                what: "record count",
                value: header.record_count.into(),
            });
        }
        let overflows = |base: u64| base.checked_add(header.record_count.into()).is_none();
        if overflows(header.base_offset) || stream.is_some_and(|t| overflows(t.base)) {
            return Err(DecodeError::BadLength {
                what: "base offset",
                value: header.base_offset,
            });
        }
        Ok(header)
    }

    /// Size of the whole batch on disk.
    pub fn total_len(&self) -> u64 {
        u64::from(self.length) + 4
    }

    /// Size of the fixed header (longer for a stream batch).
    pub fn header_len(&self) -> usize {
        header_len(self.stream.is_some())
    }

    /// Size of the (possibly compressed) records section.
    fn body_len(&self) -> u32 {
        // `parse` checked that the length covers the header.
        self.length - (self.header_len() as u32 - 4)
    }

    /// Stream offset after the last record of a stream batch.
    pub fn stream_next(&self) -> Option<u64> {
        // Checked in `parse`.
        self.stream
            .map(|t| t.base.saturating_add(self.record_count.into()))
    }

    /// Offset after the last record of the batch.
    pub fn next_offset(&self) -> u64 {
        // Checked in `parse`.
        self.base_offset.saturating_add(self.record_count.into())
    }

    /// Checks the CRC of a whole batch (`frame` starts at the length field).
    pub fn verify_crc(&self, frame: &[u8]) -> Result<(), DecodeError> {
        let total = self.total_len();
        let covered = usize::try_from(total)
            .ok()
            .and_then(|end| frame.get(8..end))
            .ok_or(DecodeError::Truncated {
                needed: total,
                available: frame.len() as u64,
            })?;
        let computed = crc32c::crc32c(covered);
        if computed != self.crc {
            return Err(DecodeError::CrcMismatch {
                stored: self.crc,
                computed,
            });
        }
        Ok(())
    }
}

/// A decoded batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedBatch {
    /// The batch header.
    pub header: BatchHeader,
    /// Its records, offsets `base_offset..base_offset + record_count`.
    pub records: Vec<StoredRecord>,
}

/// Decodes one whole batch from the start of `bytes`; returns it and the bytes it used.
pub fn decode_batch(bytes: &[u8]) -> Result<(DecodedBatch, usize), DecodeError> {
    let header = BatchHeader::parse(bytes)?;
    let total = header.total_len();
    let frame = usize::try_from(total)
        .ok()
        .and_then(|end| bytes.get(..end))
        .ok_or(DecodeError::Truncated {
            needed: total,
            available: bytes.len() as u64,
        })?;
    let batch = decode_frame(header, Bytes::copy_from_slice(frame))?;
    Ok((batch, frame.len()))
}

/// Decodes a sequence of batches (segment contents after the file header). The iterator stops
/// after the first error.
pub fn decode_batches(bytes: &[u8]) -> DecodeBatches<'_> {
    DecodeBatches {
        rest: bytes,
        failed: false,
    }
}

/// Iterator returned by [`decode_batches`].
#[derive(Debug)]
pub struct DecodeBatches<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl Iterator for DecodeBatches<'_> {
    type Item = Result<DecodedBatch, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match decode_batch(self.rest) {
            Ok((batch, used)) => {
                self.rest = self.rest.get(used..).unwrap_or_default();
                Some(Ok(batch))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Checks the CRC of `frame` (a whole batch described by `header`) and decodes its records,
/// sharing `frame`'s memory for uncompressed payloads.
pub(crate) fn decode_frame(header: BatchHeader, frame: Bytes) -> Result<DecodedBatch, DecodeError> {
    header.verify_crc(&frame)?;
    let body = frame.slice(header.header_len()..);
    let section = match header.compression {
        Compression::None => body,
        Compression::Lz4 => {
            let mut out = vec![0u8; header.records_len as usize];
            let n = lz4_flex::block::decompress_into(&body, &mut out)
                .map_err(|e| DecodeError::Decompress(e.to_string()))?;
            if n != out.len() {
                return Err(DecodeError::Decompress(format!(
                    "{n} bytes instead of {}",
                    out.len()
                )));
            }
            Bytes::from(out)
        }
    };
    let records = decode_records(&header, &section)?;
    Ok(DecodedBatch { header, records })
}

fn decode_records(header: &BatchHeader, section: &Bytes) -> Result<Vec<StoredRecord>, DecodeError> {
    // `record_count <= records_len / MIN_RECORD_LEN` (checked in `parse`) bounds this.
    let mut records = Vec::with_capacity(header.record_count as usize);
    let mut r = Reader {
        buf: section,
        pos: 0,
    };
    let mut max_ts = None::<u64>;
    for index in 0..header.record_count {
        let bad = |reason| DecodeError::BadRecord { index, reason };
        let len = r.varint().ok_or(bad("bad record length"))?;
        let end = r.end_of(len).ok_or(bad("record length past the batch"))?;
        if r.varint() != Some(index.into()) {
            return Err(bad("offset delta out of sequence"));
        }
        let ts_delta = r.varint().ok_or(bad("bad timestamp"))?;
        let timestamp = header
            .first_timestamp
            .wrapping_add(unzigzag(ts_delta) as u64);
        if index == 0 && timestamp != header.first_timestamp {
            return Err(bad("first timestamp mismatch"));
        }
        max_ts = Some(max_ts.map_or(timestamp, |m| m.max(timestamp)));
        let flags = r.take(2).map(|b| le_u16(b, 0)).ok_or(bad("bad flags"))?;
        let key = match r.varint().ok_or(bad("bad key length"))? {
            0 => None,
            n => Some(r.slice(section, n - 1).ok_or(bad("key past the record"))?),
        };
        let header_count = r.varint().ok_or(bad("bad header count"))?;
        // Each header takes at least 2 bytes: bound the allocation by the input.
        if header_count > r.remaining() / 2 {
            return Err(bad("header count past the record"));
        }
        let mut headers = Vec::with_capacity(header_count as usize);
        for _ in 0..header_count {
            let name_len = r.varint().ok_or(bad("bad header name length"))?;
            let name = r
                .take_len(name_len)
                .ok_or(bad("header name past the record"))?;
            let name = std::str::from_utf8(name)
                .map_err(|_| bad("header name is not UTF-8"))?
                .to_owned();
            let value_len = r.varint().ok_or(bad("bad header value length"))?;
            let value = r
                .slice(section, value_len)
                .ok_or(bad("header value past the record"))?;
            headers.push((name, value));
        }
        let payload_len = r.varint().ok_or(bad("bad payload length"))?;
        let payload = r
            .slice(section, payload_len)
            .ok_or(bad("payload past the record"))?;
        if r.pos != end {
            return Err(bad("record length mismatch"));
        }
        records.push(StoredRecord {
            offset: header.base_offset + u64::from(index),
            timestamp,
            flags,
            key,
            headers,
            payload,
        });
    }
    if r.pos != section.len() {
        return Err(DecodeError::BadRecord {
            index: header.record_count,
            reason: "trailing bytes after the last record",
        });
    }
    if max_ts != Some(header.max_timestamp) {
        return Err(DecodeError::BadRecord {
            index: 0,
            reason: "max timestamp mismatch",
        });
    }
    Ok(records)
}

/// A record to encode, borrowed from a [`crate::RecordIn`] (timestamp resolved) or a
/// [`StoredRecord`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordView<'a> {
    pub timestamp: u64,
    pub flags: u16,
    pub key: Option<&'a [u8]>,
    pub headers: &'a [(String, Bytes)],
    pub payload: &'a [u8],
}

impl<'a> From<&'a StoredRecord> for RecordView<'a> {
    fn from(r: &'a StoredRecord) -> Self {
        RecordView {
            timestamp: r.timestamp,
            flags: r.flags,
            key: r.key.as_deref(),
            headers: &r.headers,
            payload: &r.payload,
        }
    }
}

/// The batch (header included) would exceed [`MAX_BATCH_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("batch of at least {size} bytes exceeds the format limit")]
pub struct EncodeError {
    /// Size reached when encoding stopped.
    pub size: u64,
}

/// Encodes `records` (their `offset` fields are ignored: they get `base_offset..`) as one batch.
pub fn encode_batch(
    base_offset: u64,
    records: &[StoredRecord],
    compression: Compression,
) -> Result<Vec<u8>, EncodeError> {
    let views: Vec<RecordView<'_>> = records.iter().map(RecordView::from).collect();
    encode_views(base_offset, &views, compression, None)
}

/// Encodes `records` as one batch of a stream (see [`StreamTag`]).
pub fn encode_stream_batch(
    base_offset: u64,
    stream: StreamTag,
    records: &[StoredRecord],
    compression: Compression,
) -> Result<Vec<u8>, EncodeError> {
    let views: Vec<RecordView<'_>> = records.iter().map(RecordView::from).collect();
    encode_views(base_offset, &views, compression, Some(stream))
}

/// Encodes one batch, of a stream if `stream` is set. An empty slice is encoded too (the
/// decoder rejects it): callers check.
pub(crate) fn encode_views(
    base_offset: u64,
    records: &[RecordView<'_>],
    compression: Compression,
    stream: Option<StreamTag>,
) -> Result<Vec<u8>, EncodeError> {
    let hlen = header_len(stream.is_some());
    let limit = u64::from(MAX_BATCH_BYTES);
    let too_large = |size: u64| EncodeError { size };
    let first = records.first().map_or(0, |r| r.timestamp);
    let sizes: Vec<u64> = records
        .iter()
        .enumerate()
        .map(|(i, r)| body_len(i as u64, r, first))
        .collect();
    let records_len = sizes
        .iter()
        .map(|&s| s.saturating_add(varint_len(s)))
        .fold(0u64, u64::saturating_add);
    let total = records_len.saturating_add(hlen as u64);
    let count = u32::try_from(records.len()).map_err(|_| too_large(total))?;
    if total > limit {
        return Err(too_large(total));
    }
    let mut out = Vec::with_capacity(hlen + records_len as usize);
    out.resize(hlen, 0);
    for (i, (r, &size)) in records.iter().zip(&sizes).enumerate() {
        put_varint(&mut out, size);
        put_varint(&mut out, i as u64);
        put_varint(&mut out, zigzag(r.timestamp.wrapping_sub(first) as i64));
        out.extend_from_slice(&r.flags.to_le_bytes());
        match r.key {
            None => put_varint(&mut out, 0),
            Some(k) => {
                put_varint(&mut out, k.len() as u64 + 1);
                out.extend_from_slice(k);
            }
        }
        put_varint(&mut out, r.headers.len() as u64);
        for (name, value) in r.headers {
            put_bytes(&mut out, name.as_bytes());
            put_bytes(&mut out, value);
        }
        put_bytes(&mut out, r.payload);
    }
    let mut codec = Compression::None;
    if compression == Compression::Lz4 {
        let packed = lz4_flex::block::compress(&out[hlen..]);
        if packed.len() < out.len() - hlen {
            out.truncate(hlen);
            out.extend_from_slice(&packed);
            codec = Compression::Lz4;
        }
    }
    let max_ts = records.iter().map(|r| r.timestamp).max().unwrap_or(first);
    let length = u32::try_from(out.len() - 4).map_err(|_| too_large(out.len() as u64))?;
    out[0..4].copy_from_slice(&length.to_le_bytes());
    out[8] = if stream.is_some() {
        STREAM_BATCH_VERSION
    } else {
        BATCH_VERSION
    };
    let tx = if stream.is_some_and(|t| t.tx_part) {
        TX_PART
    } else {
        0
    };
    out[9..11].copy_from_slice(&(codec.bits() | tx).to_le_bytes());
    out[11..19].copy_from_slice(&base_offset.to_le_bytes());
    out[19..23].copy_from_slice(&count.to_le_bytes());
    out[23..31].copy_from_slice(&first.to_le_bytes());
    out[31..39].copy_from_slice(&max_ts.to_le_bytes());
    out[39..43].copy_from_slice(&(records_len as u32).to_le_bytes());
    if let Some(t) = stream {
        out[43..47].copy_from_slice(&t.id.to_le_bytes());
        out[47..55].copy_from_slice(&t.base.to_le_bytes());
    }
    write_crc(&mut out);
    Ok(out)
}

/// Rewrites the base offset of an encoded batch (from [`encode_views`]) and its CRC.
pub(crate) fn set_base_offset(frame: &mut [u8], base_offset: u64) {
    frame[11..19].copy_from_slice(&base_offset.to_le_bytes());
    write_crc(frame);
}

/// Stores the CRC of a whole batch (`frame.len() >= BATCH_HEADER_LEN`).
fn write_crc(frame: &mut [u8]) {
    let crc = crc32c::crc32c(&frame[8..]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Recomputes and stores the CRC of the batch at the start of `bytes`, if its header parses and
/// the whole batch is there; returns the batch's length. For tools that build or alter batches
/// by hand (the fuzz target uses it to reach the record decoder past the checksum).
pub fn reseal_batch(bytes: &mut [u8]) -> Option<usize> {
    let header = BatchHeader::parse(bytes).ok()?;
    let total = usize::try_from(header.total_len()).ok()?;
    write_crc(bytes.get_mut(..total)?);
    Some(total)
}

/// Encoded size of a record after its length prefix (saturating: the caller checks the total).
fn body_len(index: u64, r: &RecordView<'_>, first_ts: u64) -> u64 {
    let field = |len: usize| varint_len(len as u64).saturating_add(len as u64);
    let key = r.key.map_or(1, |k| {
        varint_len(k.len() as u64 + 1).saturating_add(k.len() as u64)
    });
    let headers = r
        .headers
        .iter()
        .map(|(n, v)| field(n.len()).saturating_add(field(v.len())))
        .fold(varint_len(r.headers.len() as u64), u64::saturating_add);
    [
        varint_len(index),
        varint_len(zigzag(r.timestamp.wrapping_sub(first_ts) as i64)),
        2,
        key,
        headers,
        field(r.payload.len()),
    ]
    .into_iter()
    .fold(0, u64::saturating_add)
}

/// A cursor over untrusted bytes; every method returns `None` instead of reading past the end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    /// LEB128 unsigned varint of at most 10 bytes.
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = *self.buf.get(self.pos)?;
            self.pos += 1;
            let bits = u64::from(byte & 0x7f);
            if i == 9 && bits > 1 {
                return None;
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// Position `len` bytes ahead, if within the buffer.
    fn end_of(&self, len: u64) -> Option<usize> {
        if len > self.remaining() {
            return None;
        }
        Some(self.pos + len as usize)
    }

    fn take(&mut self, len: usize) -> Option<&[u8]> {
        let end = self.end_of(len as u64)?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Some(out)
    }

    fn take_len(&mut self, len: u64) -> Option<&[u8]> {
        self.take(usize::try_from(len).ok()?)
    }

    /// Like `take_len`, as a zero-copy slice of `owner` (which `buf` borrows).
    fn slice(&mut self, owner: &Bytes, len: u64) -> Option<Bytes> {
        let start = self.pos;
        let end = self.end_of(len)?;
        self.pos = end;
        Some(owner.slice(start..end))
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint_len(v: u64) -> u64 {
    u64::from((64 - v.leading_zeros()).max(1).div_ceil(7))
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rec(ts: u64, key: Option<&'static [u8]>, payload: &'static [u8]) -> StoredRecord {
        StoredRecord {
            offset: 0,
            timestamp: ts,
            flags: 0xbeef,
            key: key.map(Bytes::from_static),
            headers: vec![
                ("h".into(), Bytes::from_static(b"v")),
                (String::new(), Bytes::new()),
            ],
            payload: Bytes::from_static(payload),
        }
    }

    fn sample() -> Vec<StoredRecord> {
        vec![
            rec(1_000, Some(b"k1"), b"hello"),
            rec(900, None, b""),
            rec(u64::MAX, Some(b""), &[7u8; 300]),
            rec(0, None, b"x"),
        ]
    }

    fn with_offsets(base: u64, mut records: Vec<StoredRecord>) -> Vec<StoredRecord> {
        for (i, r) in records.iter_mut().enumerate() {
            r.offset = base + i as u64;
        }
        records
    }

    #[test]
    fn varint_and_zigzag_round_trip() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            u32::MAX.into(),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len() as u64, varint_len(v));
            let mut r = Reader { buf: &out, pos: 0 };
            assert_eq!(r.varint(), Some(v));
            assert_eq!(r.pos, out.len());
        }
        for v in [0i64, 1, -1, i64::MIN, i64::MAX, 12345, -98765] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        // 11-byte and overflowing 10-byte varints are rejected.
        let mut r = Reader {
            buf: &[0xff; 11],
            pos: 0,
        };
        assert_eq!(r.varint(), None);
        let mut r = Reader {
            buf: &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
            pos: 0,
        };
        assert_eq!(r.varint(), None);
    }

    #[test]
    fn batch_round_trip_both_codecs() {
        for codec in [Compression::None, Compression::Lz4] {
            let bytes = encode_batch(42, &sample(), codec).unwrap();
            let (batch, used) = decode_batch(&bytes).unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(batch.header.base_offset, 42);
            assert_eq!(batch.header.record_count, 4);
            assert_eq!(batch.header.first_timestamp, 1_000);
            assert_eq!(batch.header.max_timestamp, u64::MAX);
            assert_eq!(batch.header.next_offset(), 46);
            assert_eq!(batch.records, with_offsets(42, sample()));
        }
    }

    #[test]
    fn lz4_used_only_when_smaller() {
        let big = encode_batch(0, &sample(), Compression::Lz4).unwrap();
        assert_eq!(
            BatchHeader::parse(&big).unwrap().compression,
            Compression::Lz4
        );
        let plain = encode_batch(0, &sample(), Compression::None).unwrap();
        assert!(big.len() < plain.len());
        let tiny = vec![rec(1, None, b"ab")];
        let bytes = encode_batch(0, &tiny, Compression::Lz4).unwrap();
        assert_eq!(
            BatchHeader::parse(&bytes).unwrap().compression,
            Compression::None
        );
    }

    #[test]
    fn several_batches_then_garbage() {
        let mut bytes = encode_batch(0, &sample(), Compression::None).unwrap();
        bytes.extend(encode_batch(4, &sample()[..1], Compression::Lz4).unwrap());
        bytes.extend([0u8; 10]);
        let out: Vec<_> = decode_batches(&bytes).collect();
        assert_eq!(out.len(), 3);
        assert_eq!(out[1].as_ref().unwrap().records[0].offset, 4);
        assert!(matches!(out[2], Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = encode_batch(7, &sample(), Compression::None).unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(decode_batch(&b).is_err(), "flip at byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let bytes = encode_batch(7, &sample(), Compression::Lz4).unwrap();
        for len in 0..bytes.len() {
            assert!(matches!(
                decode_batch(&bytes[..len]),
                Err(DecodeError::Truncated { .. } | DecodeError::BadLength { .. })
            ));
        }
    }

    #[test]
    fn crc_valid_but_malformed_records_are_rejected() {
        // A hand-made batch whose records section is garbage but whose CRC is right.
        let mut bytes = encode_batch(0, &sample()[..1], Compression::None).unwrap();
        let n = bytes.len();
        bytes[BATCH_HEADER_LEN + 1] = 5; // offset delta 5 instead of 0
        let crc = crc32c::crc32c(&bytes[8..n]);
        bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode_batch(&bytes),
            Err(DecodeError::BadRecord { index: 0, .. })
        ));
    }

    #[test]
    fn segment_header_round_trip_and_checks() {
        let h = SegmentHeader {
            base_offset: 99,
            created_ms: 1234,
            prev_unsynced: false,
        };
        let bytes = h.encode();
        assert_eq!(SegmentHeader::decode(&bytes).unwrap(), h);
        // Flags as written before the flag existed (zero) decode as "previous synced"; the
        // flag round-trips; unknown flags are refused.
        assert_eq!(&bytes[10..12], &[0, 0]);
        let flagged = SegmentHeader {
            prev_unsynced: true,
            ..h
        };
        assert_eq!(SegmentHeader::decode(&flagged.encode()).unwrap(), flagged);
        let mut unknown = flagged.encode();
        unknown[10] = 2;
        let crc = crc32c::crc32c(&unknown[..28]);
        unknown[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(SegmentHeader::decode(&unknown).is_err());
        let mut bad = bytes;
        bad[15] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&bad),
            Err(DecodeError::CrcMismatch { .. })
        ));
        assert!(SegmentHeader::decode(&bytes[..31]).is_err());
        assert!(SegmentHeader::decode(&[0u8; 32]).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for len in 0..2000usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            for r in decode_batches(&bytes) {
                let _ = r;
            }
        }
    }
}
