//! Any bytes as a stream of iSCSI PDUs, with and without digests, and their text
//! segments: decoding returns PDUs or an error, never panics, and what decodes encodes
//! back to the same PDU.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use strata_iscsi::pdu::{self, Digests};
use strata_iscsi::text::Pairs;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let digests = Digests { header: mode & 1 != 0, data: mode & 2 != 0 };
    let mut buf = BytesMut::from(rest);
    while let Ok(Some(decoded)) = pdu::decode(&mut buf, digests, 64 << 10) {
        let _ = Pairs::parse(&decoded.data);
        let mut wire = BytesMut::new();
        let mut plain = decoded.clone();
        plain.header[4] = 0;
        plain.ahs = bytes::Bytes::new();
        pdu::encode(&mut wire, &plain, digests);
        let again = pdu::decode(&mut wire, digests, 64 << 10).expect("re-encoded PDU decodes").expect("whole");
        assert_eq!(again.data, decoded.data);
        assert_eq!(again.header[..4], decoded.header[..4]);
    }
});
