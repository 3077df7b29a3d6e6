//! Segment headers and log batches from arbitrary bytes: decoding never panics, and every batch
//! that decodes re-encodes to a batch that decodes to the same records and header fields. The
//! input is decoded as it is and once more with every batch's CRC fixed up, so that the record
//! decoder (and LZ4) sees mutated records rather than only checksum failures.
#![no_main]

use ferry_log::{decode_batch, decode_batches, encode_batch, reseal_batch, SegmentHeader};
use libfuzzer_sys::fuzz_target;

fn check_batches(data: &[u8]) {
    for batch in decode_batches(data) {
        let Ok(batch) = batch else { break };
        let h = batch.header;
        let bytes = encode_batch(h.base_offset, &batch.records, h.compression)
            .expect("a decoded batch re-encodes");
        let (again, used) = decode_batch(&bytes).expect("a re-encoded batch decodes");
        assert_eq!(used, bytes.len());
        assert_eq!(again.records, batch.records);
        let g = again.header;
        assert_eq!(
            (g.base_offset, g.record_count, g.first_timestamp, g.max_timestamp, g.records_len),
            (h.base_offset, h.record_count, h.first_timestamp, h.max_timestamp, h.records_len)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = SegmentHeader::decode(data) {
        assert_eq!(SegmentHeader::decode(&header.encode()), Ok(header));
    }
    check_batches(data);
    let mut resealed = data.to_vec();
    let mut pos = 0;
    while let Some(len) = resealed.get_mut(pos..).and_then(reseal_batch) {
        pos += len;
    }
    check_batches(&resealed);
});
