//! Records going in ([`RecordIn`]) and coming out ([`StoredRecord`]) of the log.

use bytes::Bytes;

use crate::codec::RecordView;

/// A record to append. The log assigns its offset; the timestamp defaults to "now".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordIn {
    /// Milliseconds since the Unix epoch; `None` stamps the record with the current time when
    /// the batch is appended.
    pub timestamp: Option<u64>,
    /// Opaque flags for the engine; the log stores them untouched.
    pub flags: u16,
    /// Optional key.
    pub key: Option<Bytes>,
    /// Headers, in order (names may repeat).
    pub headers: Vec<(String, Bytes)>,
    /// The payload.
    pub payload: Bytes,
}

impl RecordIn {
    /// A record with `payload` and nothing else.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        RecordIn {
            payload: payload.into(),
            ..RecordIn::default()
        }
    }

    /// Sets the key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the timestamp (milliseconds since the Unix epoch).
    #[must_use]
    pub fn with_timestamp(mut self, timestamp_ms: u64) -> Self {
        self.timestamp = Some(timestamp_ms);
        self
    }

    /// Sets the flags.
    #[must_use]
    pub fn with_flags(mut self, flags: u16) -> Self {
        self.flags = flags;
        self
    }

    /// The record to encode, stamped with `now` if it has no timestamp.
    pub(crate) fn view(&self, now: u64) -> RecordView<'_> {
        RecordView {
            timestamp: self.timestamp.unwrap_or(now),
            flags: self.flags,
            key: self.key.as_deref(),
            headers: &self.headers,
            payload: &self.payload,
        }
    }

    /// The stored form at `offset` with the resolved `timestamp` (payloads are shared).
    pub(crate) fn to_stored(&self, offset: u64, timestamp: u64) -> StoredRecord {
        StoredRecord {
            offset,
            timestamp,
            flags: self.flags,
            key: self.key.clone(),
            headers: self.headers.clone(),
            payload: self.payload.clone(),
        }
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// A record as stored in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Its offset in the log.
    pub offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// Opaque flags for the engine.
    pub flags: u16,
    /// Optional key.
    pub key: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<(String, Bytes)>,
    /// The payload.
    pub payload: Bytes,
}

impl StoredRecord {
    /// The size counted against `max_bytes` by [`crate::Log::read`]: key, header names and
    /// values, and payload.
    pub fn size(&self) -> usize {
        record_size(self.key.as_deref(), &self.headers, &self.payload)
    }
}

/// Key + header names and values + payload lengths.
pub(crate) fn record_size(
    key: Option<&[u8]>,
    headers: &[(String, Bytes)],
    payload: &[u8],
) -> usize {
    let headers: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    key.map_or(0, <[u8]>::len) + headers + payload.len()
}

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset of the first record of the batch.
    pub base_offset: u64,
    /// Offset of the last record of the batch.
    pub last_offset: u64,
}
