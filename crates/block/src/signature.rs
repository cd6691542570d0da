//! Foreign signatures: what else a device may already hold, so that claiming it for a pool
//! does not destroy a filesystem, a partition table or another storage stack's member.
//!
//! The probes follow libblkid's (what `wipefs -n` lists): each looks for a magic value at a
//! fixed offset from the start or the end of the device. Only the first [`HEAD`] bytes and
//! the last [`TAIL`] bytes are read, which covers every signature below:
//!
//! ```text
//!   0 ─ MBR/boot sector (510), XFS, LUKS, md 1.1, ELF, ZFS label 0 (uberblocks 128..256 KiB)
//!   512 / 4096 ─ GPT header, LVM2 label (sectors 0-3), md 1.2 (4 KiB), bcache (4 KiB + 24)
//!   1080 ─ ext2/3/4 magic; 4086.. ─ swap; 32 KiB ─ ISO 9660; 64 KiB ─ Btrfs
//!   end - 512 KiB / 256 KiB ─ ZFS labels 2, 3; end - 64..128 KiB ─ md 0.90; end - 8 KiB ─ md 1.0
//! ```
//!
//! Nothing here writes. [`first_data`] answers the other question an operator cares
//! about: does a range hold anything but zeroes (a copied binary has no signature).

use std::ops::Range;

use bytes::Bytes;

use crate::{BlockIo, IoError};

/// Bytes read from the start of a device.
pub const HEAD: u64 = 1 << 20;
/// Bytes read from the end of a device.
pub const TAIL: u64 = 512 << 10;

/// A signature found on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// Short name, as `wipefs` prints it: `ext4`, `dos`, `gpt`, `LVM2_member`, ...
    pub name: &'static str,
    /// What it is, in words: "an ext4 filesystem".
    pub what: &'static str,
    /// Byte offset of the magic value.
    pub offset: u64,
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} signature at byte {})", self.what, self.name, self.offset)
    }
}

/// md's superblock magic (both 0.90 and 1.x), in the byte order of the machine that made it.
const MD_MAGIC: u32 = 0xa92b_4efc;
/// bcache's superblock magic, at 4 KiB + 24.
const BCACHE_MAGIC: [u8; 16] =
    [0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d, 0x81];
/// ZFS uberblock magic.
const ZFS_MAGIC: u64 = 0x00ba_b10c;
/// Size of one ZFS vdev label.
const ZFS_LABEL: u64 = 256 << 10;

/// The bytes read from a device: its head and its tail.
struct Window {
    size: u64,
    head: Bytes,
    tail_at: u64,
    tail: Bytes,
}

impl Window {
    /// `len` bytes at `offset`, if they were read.
    fn at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len as u64)?;
        if end <= self.head.len() as u64 {
            return Some(&self.head[usize::try_from(offset).ok()?..usize::try_from(end).ok()?]);
        }
        if offset >= self.tail_at && end <= self.size {
            let from = usize::try_from(offset - self.tail_at).ok()?;
            return Some(&self.tail[from..from + len]);
        }
        None
    }

    fn is(&self, offset: u64, magic: &[u8]) -> bool {
        self.at(offset, magic.len()) == Some(magic)
    }

    fn u16_le(&self, offset: u64) -> Option<u16> {
        self.at(offset, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32_le(&self, offset: u64) -> Option<u32> {
        self.at(offset, 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn md_magic(&self, offset: u64) -> bool {
        self.u32_le(offset).is_some_and(|m| m == MD_MAGIC || m.swap_bytes() == MD_MAGIC)
    }
}

/// Every known foreign signature on `io`, in order of offset; empty when there is none.
pub async fn probe(io: &dyn BlockIo) -> Result<Vec<Signature>, IoError> {
    let g = io.geometry();
    let bs = u64::from(g.block_size);
    let head_len = HEAD.min(g.size_bytes) / bs * bs;
    let tail_at = g.size_bytes.saturating_sub(TAIL) / bs * bs;
    let head = if head_len > 0 { io.read(0, head_len).await? } else { Bytes::new() };
    let tail = io.read(tail_at, g.size_bytes - tail_at).await?;
    let mut found = probe_window(&Window { size: g.size_bytes, head, tail_at, tail });
    found.sort_by_key(|s| s.offset);
    Ok(found)
}

fn probe_window(w: &Window) -> Vec<Signature> {
    let mut found = Vec::new();
    let mut add = |name, what, offset| found.push(Signature { name, what, offset });
    // Filesystems.
    if w.u16_le(1080) == Some(0xef53) {
        let (name, what) = ext_kind(w);
        add(name, what, 1080);
    }
    if w.is(0, b"XFSB") {
        add("xfs", "an XFS filesystem", 0);
    }
    if w.is(65536 + 64, b"_BHRfS_M") {
        add("btrfs", "a Btrfs filesystem", 65536 + 64);
    }
    if w.is(3, b"NTFS    ") {
        add("ntfs", "an NTFS filesystem", 3);
    }
    if w.is(3, b"EXFAT   ") {
        add("exfat", "an exFAT filesystem", 3);
    }
    let boot_sector = w.is(510, &[0x55, 0xaa]);
    let fat = [(54, b"FAT12   "), (54, b"FAT16   "), (82, b"FAT32   ")]
        .into_iter()
        .find(|(at, magic)| boot_sector && w.is(*at, *magic))
        .map(|(at, _)| at);
    if let Some(at) = fat {
        add("vfat", "a FAT filesystem", at);
    }
    if w.is(32769, b"CD001") {
        add("iso9660", "an ISO 9660 filesystem", 32769);
    }
    for page in [4096u64, 8192, 16384, 65536] {
        if w.is(page - 10, b"SWAPSPACE2") || w.is(page - 10, b"SWAP-SPACE") {
            add("swap", "swap space", page - 10);
            break;
        }
    }
    // Partition tables.
    let gpt = [512u64, 4096].into_iter().find(|&at| w.is(at, b"EFI PART"));
    if let Some(at) = gpt {
        add("gpt", "a GPT partition table", at);
    } else if let Some(at) =
        [512u64, 4096].into_iter().find(|&bs| w.is(w.size.saturating_sub(bs), b"EFI PART"))
    {
        add("gpt", "a GPT partition table (its backup header)", w.size - at);
    }
    let filesystem_at_zero = fat.is_some() || w.is(3, b"NTFS    ") || w.is(3, b"EXFAT   ");
    if boot_sector && gpt.is_none() && !filesystem_at_zero && mbr_entries_valid(w) {
        add("dos", "an MBR partition table", 510);
    }
    // Volume managers, RAID, encryption, caches.
    for sector in 0..4u64 {
        if w.is(sector * 512, b"LABELONE") && w.is(sector * 512 + 24, b"LVM2 001") {
            add("LVM2_member", "an LVM2 physical volume", sector * 512);
        }
    }
    if w.md_magic(0) {
        add("linux_raid_member", "a Linux RAID member (md 1.1 superblock)", 0);
    }
    if w.md_magic(4096) {
        add("linux_raid_member", "a Linux RAID member (md 1.2 superblock)", 4096);
    }
    if w.size >= 8192 && w.md_magic((w.size - 8192) & !4095) {
        add("linux_raid_member", "a Linux RAID member (md 1.0 superblock)", (w.size - 8192) & !4095);
    }
    if w.size >= 131072 && w.md_magic((w.size & !65535) - 65536) {
        add("linux_raid_member", "a Linux RAID member (md 0.90 superblock)", (w.size & !65535) - 65536);
    }
    if w.is(0, b"LUKS\xba\xbe") {
        let two = w.at(6, 2) == Some(&[0, 2]);
        add("crypto_LUKS", if two { "a LUKS2 encrypted volume" } else { "a LUKS encrypted volume" }, 0);
    } else if let Some(at) = (14..=19).map(|shift| 1u64 << shift).find(|&at| w.is(at, b"SKUL\xba\xbe")) {
        add("crypto_LUKS", "a LUKS2 encrypted volume (its secondary header)", at);
    }
    if w.is(4096 + 24, &BCACHE_MAGIC) {
        add("bcache", "a bcache device", 4096 + 24);
    }
    if let Some(at) = zfs_uberblock(w) {
        add("zfs_member", "a ZFS pool member", at);
    }
    // Not a blkid probe, but common enough in a careless `device add` to name.
    if w.is(0, b"\x7fELF") {
        add("elf", "an ELF executable", 0);
    }
    found
}

/// ext2, ext3 or ext4, from the superblock's feature flags as libblkid tells them apart.
fn ext_kind(w: &Window) -> (&'static str, &'static str) {
    const SB: u64 = 1024;
    let compat = w.u32_le(SB + 0x5c).unwrap_or(0);
    let incompat = w.u32_le(SB + 0x60).unwrap_or(0);
    let ro_compat = w.u32_le(SB + 0x64).unwrap_or(0);
    // What ext3 knows: FILETYPE, RECOVER, META_BG; SPARSE_SUPER, LARGE_FILE, BTREE_DIR.
    let beyond_ext3 = incompat & !0x16 != 0 || ro_compat & !0x7 != 0;
    if incompat & 0x8 != 0 {
        ("jbd", "an ext3/ext4 external journal")
    } else if beyond_ext3 {
        ("ext4", "an ext4 filesystem")
    } else if compat & 0x4 != 0 {
        ("ext3", "an ext3 filesystem")
    } else {
        ("ext2", "an ext2 filesystem")
    }
}

/// True when the four MBR partition entries look like a partition table: boot flags 0 or
/// 0x80, and at least one partition.
fn mbr_entries_valid(w: &Window) -> bool {
    let Some(table) = w.at(446, 64) else { return false };
    let entries: Vec<&[u8]> = table.chunks(16).collect();
    entries.iter().all(|e| e[0] == 0 || e[0] == 0x80) && entries.iter().any(|e| e[4] != 0)
}

/// The offset of a ZFS uberblock in any of the four vdev labels, if two or more are there.
fn zfs_uberblock(w: &Window) -> Option<u64> {
    let aligned = w.size & !(ZFS_LABEL - 1);
    let labels = [0, ZFS_LABEL, aligned.checked_sub(2 * ZFS_LABEL)?, aligned.checked_sub(ZFS_LABEL)?];
    let mut hits = labels.iter().flat_map(|&label| {
        (0..128u64).map(move |i| label + 128 * 1024 + i * 1024).filter(|&at| {
            w.at(at, 8).is_some_and(|b| {
                let v = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                v == ZFS_MAGIC || v.swap_bytes() == ZFS_MAGIC
            })
        })
    });
    let first = hits.next()?;
    hits.next().map(|_| first)
}

/// Bytes read at a time when looking for data.
const SCAN_CHUNK: u64 = 1 << 20;

/// The offset of the first byte that is not zero in `ranges` of `io` (rounded out to whole
/// blocks and cut at the end of the device), skipping holes; `None` when all are zeroes.
pub async fn first_data(io: &dyn BlockIo, ranges: &[Range<u64>]) -> Result<Option<u64>, IoError> {
    let g = io.geometry();
    let bs = u64::from(g.block_size);
    for range in ranges {
        let mut at = range.start / bs * bs;
        let end = range.end.div_ceil(bs).saturating_mul(bs).min(g.size_bytes);
        while at < end {
            let spans = io.allocation(at, end - at).await?;
            if spans.is_empty() {
                break;
            }
            for span in spans {
                if !span.hole {
                    let stop = at + span.len;
                    let mut read_at = at;
                    while read_at < stop {
                        let len = (stop - read_at).min(SCAN_CHUNK);
                        let data = io.read(read_at, len).await?;
                        if let Some(i) = data.iter().position(|&b| b != 0) {
                            return Ok(Some(read_at + i as u64));
                        }
                        read_at += len;
                    }
                }
                at += span.len;
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Durability, MemDevice};

    async fn device_with(patches: &[(u64, &[u8])], size: u64) -> std::sync::Arc<MemDevice> {
        let dev = MemDevice::new("d", size, 512);
        for &(at, bytes) in patches {
            let block = at / 512 * 512;
            let mut data = dev.read(block, 1024.min(size - block)).await.unwrap().to_vec();
            let from = usize::try_from(at - block).unwrap();
            data[from..from + bytes.len()].copy_from_slice(bytes);
            dev.write(block, Bytes::from(data), Durability::Cached).await.unwrap();
        }
        dev
    }

    async fn names(patches: &[(u64, &[u8])]) -> Vec<&'static str> {
        let dev = device_with(patches, 8 << 20).await;
        probe(dev.as_ref()).await.unwrap().into_iter().map(|s| s.name).collect()
    }

    #[tokio::test]
    async fn blank_and_strata_devices_have_no_signature() {
        assert!(names(&[]).await.is_empty());
        assert!(names(&[(0, b"STRATA\0\0")]).await.is_empty());
    }

    #[tokio::test]
    async fn each_known_magic_is_named() {
        let size: u64 = 8 << 20;
        let md090 = (size & !65535) - 65536;
        let mut partition = [0u8; 16];
        partition[4] = 0x83;
        let md = MD_MAGIC.to_le_bytes();
        let zfs = ZFS_MAGIC.to_le_bytes();
        type Case<'a> = (Vec<(u64, &'a [u8])>, &'static str);
        let cases: Vec<Case> = vec![
            (vec![(1080, &[0x53, 0xef]), (1024 + 0x60, &[0x42, 0x02, 0, 0])], "ext4"),
            (vec![(1080, &[0x53, 0xef]), (1024 + 0x5c, &[4, 0, 0, 0])], "ext3"),
            (vec![(1080, &[0x53, 0xef])], "ext2"),
            (vec![(0, b"XFSB")], "xfs"),
            (vec![(65536 + 64, b"_BHRfS_M")], "btrfs"),
            (vec![(54, b"FAT16   "), (510, &[0x55, 0xaa])], "vfat"),
            (vec![(3, b"EXFAT   "), (510, &[0x55, 0xaa])], "exfat"),
            (vec![(3, b"NTFS    "), (510, &[0x55, 0xaa])], "ntfs"),
            (vec![(4086, b"SWAPSPACE2")], "swap"),
            (vec![(446, &partition), (510, &[0x55, 0xaa])], "dos"),
            (vec![(512, b"EFI PART")], "gpt"),
            (vec![(512, b"LABELONE"), (512 + 24, b"LVM2 001")], "LVM2_member"),
            (vec![(4096, &md)], "linux_raid_member"),
            (vec![(md090, &md)], "linux_raid_member"),
            (vec![(0, b"LUKS\xba\xbe\0\x02")], "crypto_LUKS"),
            (vec![(4096 + 24, &BCACHE_MAGIC)], "bcache"),
            (vec![(128 << 10, &zfs), (129 << 10, &zfs)], "zfs_member"),
            (vec![(0, b"\x7fELF")], "elf"),
        ];
        for (patches, name) in cases {
            assert_eq!(names(&patches).await, vec![name], "{name}");
        }
        // A boot sector with an invalid partition entry is not a table.
        let mut bad = [0u8; 16];
        bad[0] = 0x13;
        assert!(names(&[(446, &bad), (510, &[0x55, 0xaa])]).await.is_empty());
    }

    #[tokio::test]
    async fn first_data_skips_zeroes_and_finds_a_byte() {
        let dev = device_with(&[(3 << 20, b"x")], 8 << 20).await;
        assert_eq!(first_data(dev.as_ref(), &[0..(2 << 20), 0..0]).await.unwrap(), None);
        assert_eq!(first_data(dev.as_ref(), &[0..4096, (2 << 20)..(8 << 20)]).await.unwrap(), Some(3 << 20));
        assert_eq!(first_data(dev.as_ref(), &[(7 << 20)..(9 << 20), 0..0]).await.unwrap(), None);
    }
}
