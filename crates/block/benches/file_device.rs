//! The file backend's cost per 4 KiB request, one at a time, on a file in /dev/shm (tmpfs,
//! so no device time): a plain `pread`/`pwrite` on the calling thread as the floor, the
//! backend running requests inline (as it does on tmpfs), and the backend handing every
//! request to the blocking pool.
//!
//! Run: `cargo bench -p strata-block --bench file_device`.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput};
use strata_block::{BlockIo, Durability, FileDevice, FileOptions};

const SIZE: u64 = 256 << 20;
const BLOCK: u64 = 4096;
const BLOCK_BYTES: usize = 4096;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm is writable");
    let path = dir.path().join("dev");
    std::fs::write(&path, vec![0x5au8; usize::try_from(SIZE).unwrap()]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let plain = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let fast = FileDevice::open(&path, &FileOptions::default()).unwrap();
    let pooled = FileDevice::open(&path, &FileOptions { inline: false, ..FileOptions::default() }).unwrap();
    let mut next = 0u64;
    let mut offset = move || {
        next = (next + 7919 * BLOCK) % SIZE;
        next
    };

    let mut group = c.benchmark_group("file-4k-randread");
    group.throughput(Throughput::Bytes(BLOCK));
    let mut buf = vec![0u8; BLOCK_BYTES];
    group.bench_function("pread", |b| b.iter(|| plain.read_exact_at(&mut buf, offset()).unwrap()));
    for (name, dev) in [("inline", &fast), ("pool", &pooled)] {
        let kept = std::cell::RefCell::new(BytesMut::zeroed(BLOCK_BYTES));
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let at = offset();
                let kept = &kept;
                async move {
                    let buf = kept.take();
                    *kept.borrow_mut() = dev.read_into(at, buf).await.unwrap();
                }
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("file-4k-randwrite");
    group.throughput(Throughput::Bytes(BLOCK));
    let data = Bytes::from(vec![0xa5u8; BLOCK_BYTES]);
    group.bench_function("pwrite", |b| b.iter(|| plain.write_all_at(&data, offset()).unwrap()));
    for (name, dev) in [("inline", &fast), ("pool", &pooled)] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| dev.write(offset(), data.clone(), Durability::Cached))
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
}
