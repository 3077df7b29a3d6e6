//! Primitive wire types shared by every packet: a bounds-checked reader over one packet's bytes and
//! a [`Sink`] that either counts or writes, so each packet's encoder is written once and run twice
//! (first to learn its length, then to emit it).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};

/// Largest value of a Variable Byte Integer (four bytes of seven bits).
pub(crate) const MAX_VARINT: usize = 268_435_455;

/// Outcome of parsing a Variable Byte Integer from the front of a slice.
pub(crate) enum VarInt {
    /// The value and how many bytes encoded it.
    Value(usize, usize),
    /// The slice ended before the last byte of the integer.
    Incomplete,
}

/// Parses a Variable Byte Integer, rejecting more than four bytes and non-minimal encodings.
pub(crate) fn parse_varint(buf: &[u8]) -> Result<VarInt, DecodeError> {
    let mut value = 0usize;
    for (i, &byte) in buf.iter().enumerate().take(4) {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            // A trailing zero byte after a continuation bit is a non-minimal encoding.
            if i > 0 && byte == 0 {
                return Err(DecodeError::MalformedVariableInteger);
            }
            return Ok(VarInt::Value(value, i + 1));
        }
    }
    if buf.len() >= 4 {
        Err(DecodeError::MalformedVariableInteger)
    } else {
        Ok(VarInt::Incomplete)
    }
}

/// Number of bytes the Variable Byte Integer encoding of `value` takes.
pub(crate) fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A bounds-checked cursor over the bytes of one packet (or one section of it).
///
/// Every read that runs past the end fails with [`DecodeError::FieldOutOfBounds`]; byte slices are
/// handed out as zero-copy [`Bytes`] views of the packet.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            Err(DecodeError::FieldOutOfBounds)
        } else {
            Ok(())
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    /// A Variable Byte Integer that must end inside this reader.
    pub(crate) fn varint(&mut self) -> Result<usize, DecodeError> {
        match parse_varint(&self.buf)? {
            VarInt::Value(value, len) => {
                self.buf.advance(len);
                Ok(value)
            }
            VarInt::Incomplete => Err(DecodeError::FieldOutOfBounds),
        }
    }

    /// The next `n` bytes, zero-copy.
    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }

    /// A reader over the next `n` bytes, which this reader skips.
    pub(crate) fn section(&mut self, n: usize) -> Result<Reader, DecodeError> {
        self.take(n).map(Reader::new)
    }

    /// Everything left, zero-copy.
    pub(crate) fn rest(&mut self) -> Bytes {
        self.buf.split_off(0)
    }

    /// Binary Data: a two-byte length and that many bytes.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A UTF-8 Encoded String: well-formed UTF-8 without U+0000.
    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        let text = std::str::from_utf8(&raw).map_err(|_| DecodeError::InvalidUtf8)?;
        check_no_null(text)?;
        Ok(text.to_owned())
    }

    /// Fails with [`DecodeError::TrailingBytes`] unless everything was read.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

/// Rejects U+0000, which no MQTT UTF-8 string may contain.
pub(crate) fn check_no_null(text: &str) -> Result<(), DecodeError> {
    if text.as_bytes().contains(&0) {
        Err(DecodeError::NullCharacter)
    } else {
        Ok(())
    }
}

/// Where encoders put bytes: a [`Counter`] to measure, a [`BytesMut`] to emit.
pub(crate) trait Sink {
    fn put_slice(&mut self, bytes: &[u8]);

    fn put_u8(&mut self, v: u8) {
        self.put_slice(&[v]);
    }

    fn put_u16(&mut self, v: u16) {
        self.put_slice(&v.to_be_bytes());
    }

    fn put_u32(&mut self, v: u32) {
        self.put_slice(&v.to_be_bytes());
    }

    /// A Variable Byte Integer; the caller guarantees `value <= MAX_VARINT`.
    fn put_varint(&mut self, mut value: usize) {
        loop {
            // Masked to seven bits, so the cast cannot truncate.
            let mut byte = (value & 0x7F) as u8;
            value >>= 7;
            if value > 0 {
                byte |= 0x80;
            }
            self.put_u8(byte);
            if value == 0 {
                break;
            }
        }
    }

    /// Binary Data with its two-byte length.
    fn put_binary(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        let len = u16::try_from(bytes.len()).map_err(|_| EncodeError::FieldTooLong(bytes.len()))?;
        self.put_u16(len);
        self.put_slice(bytes);
        Ok(())
    }

    /// A UTF-8 Encoded String with its two-byte length; U+0000 is refused.
    fn put_string(&mut self, text: &str) -> Result<(), EncodeError> {
        check_no_null(text)?;
        self.put_binary(text.as_bytes())
    }
}

/// A [`Sink`] that only counts.
#[derive(Default)]
pub(crate) struct Counter(pub(crate) usize);

impl Sink for Counter {
    fn put_slice(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

impl Sink for BytesMut {
    fn put_slice(&mut self, bytes: &[u8]) {
        BufMut::put_slice(self, bytes);
    }
}

/// Runs `write` into a [`Counter`] and returns how many bytes it produced.
pub(crate) fn measure(
    write: impl FnOnce(&mut Counter) -> Result<(), EncodeError>,
) -> Result<usize, EncodeError> {
    let mut counter = Counter::default();
    write(&mut counter)?;
    Ok(counter.0)
}
