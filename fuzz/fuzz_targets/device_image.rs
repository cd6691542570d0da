//! A device whose first bytes are the fuzzer's input (a label, a slot, anything) and whose
//! back label is a copy of its front: rediscovery reports it one way or another and never
//! panics or hangs.
#![no_main]

use std::sync::Arc;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use strata_block::{BlockIo, Durability, MemDevice};
use strata_pool::Pool;

const SIZE: u64 = 8 << 20;

fuzz_target!(|data: &[u8]| {
    let image = &data[..data.len().min(1 << 20)];
    let dev = MemDevice::new("fuzz", SIZE, 512);
    futures::executor::block_on(async {
        let padded = image.len().div_ceil(512) * 512;
        let mut front = image.to_vec();
        front.resize(padded, 0);
        if !front.is_empty() {
            dev.write(0, Bytes::from(front.clone()), Durability::Cached).await.unwrap();
            let back: Vec<u8> = front.iter().copied().take(4096).chain(std::iter::repeat(0)).take(4096).collect();
            dev.write(SIZE - 4096, Bytes::from(back), Durability::Cached).await.unwrap();
        }
        let candidates: Vec<(String, Arc<dyn BlockIo>)> = vec![("fuzz".into(), dev)];
        let _ = Pool::open(candidates).await;
    });
});
