//! Extent allocation and placement.
//!
//! Each device's allocatable area is cut into extents of the pool's extent size; a
//! free map per device is rebuilt from the volume trees whenever the pool opens, so the
//! trees are the only record of what is used. Placement puts every leg of a mirror or
//! parity set on its own device (and its own fault domain, where devices carry one),
//! starts each new volume one device further round the pool, and refuses with a clear
//! error when a request cannot be met.

use strata_volume::{AllocatedLeg, Allocator, Layout, LayoutError, NodeSpec};
use uuid::Uuid;

/// Free extents of one device.
#[derive(Clone, Debug)]
pub(crate) struct DeviceSpace {
    pub id: Uuid,
    pub fault_domain: Option<String>,
    pub data_offset: u64,
    /// `used[i]` covers `[data_offset + i * extent, data_offset + (i + 1) * extent)`.
    pub used: Vec<bool>,
    /// False for a device that is missing: nothing new goes there.
    pub present: bool,
}

impl DeviceSpace {
    pub(crate) fn new(
        id: Uuid,
        fault_domain: Option<String>,
        data_offset: u64,
        data_size: u64,
        extent: u64,
        present: bool,
    ) -> Self {
        let count = usize::try_from(data_size / extent).unwrap_or(0);
        Self { id, fault_domain, data_offset, used: vec![false; count], present }
    }

    pub(crate) fn free_extents(&self) -> usize {
        self.used.iter().filter(|u| !**u).count()
    }

    /// Marks `[offset, offset + length)` as used; false if it is outside the area or
    /// already used (the configuration is inconsistent).
    pub(crate) fn mark(&mut self, offset: u64, length: u64, extent: u64) -> bool {
        if offset < self.data_offset || length == 0 {
            return false;
        }
        let Some(end) = (offset - self.data_offset).checked_add(length) else { return false };
        let first = (offset - self.data_offset) / extent;
        let (Ok(first), Ok(end)) = (usize::try_from(first), usize::try_from(end.div_ceil(extent))) else {
            return false;
        };
        if first >= end || end > self.used.len() || self.used[first..end].iter().any(|u| *u) {
            return false;
        }
        self.used[first..end].iter_mut().for_each(|u| *u = true);
        true
    }

    /// Takes `count` free extents, first fit, as runs of `(offset, extents)`.
    fn take(&mut self, mut count: usize, extent: u64) -> Vec<(u64, usize)> {
        let mut runs: Vec<(u64, usize)> = Vec::new();
        for i in 0..self.used.len() {
            if count == 0 {
                break;
            }
            if self.used[i] {
                continue;
            }
            self.used[i] = true;
            count -= 1;
            let offset = self.data_offset + i as u64 * extent;
            match runs.last_mut() {
                Some((start, n)) if *start + *n as u64 * extent == offset => *n += 1,
                _ => runs.push((offset, 1)),
            }
        }
        runs
    }

    /// The failure domain used for spreading: the tag, or the device itself.
    fn domain(&self) -> String {
        self.fault_domain.clone().unwrap_or_else(|| self.id.to_string())
    }
}

/// A planning session over a copy of the pool's free space; dropped on error, committed
/// by the pool on success.
pub(crate) struct Planner {
    pub devices: Vec<DeviceSpace>,
    pub extent: u64,
    pub block_size: u32,
    /// Where round-robin placement starts.
    pub cursor: usize,
}

/// Builds a node of exactly `length` bytes from runs of extents on one device.
fn node_from_runs(device: Uuid, runs: &[(u64, usize)], extent: u64, mut length: u64) -> NodeSpec {
    let mut children = Vec::new();
    for &(offset, n) in runs {
        let take = (n as u64 * extent).min(length);
        if take == 0 {
            break;
        }
        children.push(NodeSpec::Extent { device, offset, length: take });
        length -= take;
    }
    if children.len() == 1 { children.pop().expect("one child") } else { NodeSpec::Concat { children } }
}

impl Planner {
    fn free_bytes(&self) -> u64 {
        self.devices.iter().filter(|d| d.present).map(|d| d.free_extents() as u64 * self.extent).sum()
    }

    /// Device indexes starting at the cursor.
    fn rotation(&self) -> Vec<usize> {
        let n = self.devices.len();
        (0..n).map(|i| (self.cursor + i) % n.max(1)).collect()
    }
}

impl Allocator for Planner {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn device_count(&self) -> usize {
        self.devices.iter().filter(|d| d.present).count()
    }

    fn allocate_set(
        &mut self,
        layout: Layout,
        parameter: &'static str,
        legs: usize,
        leg_size: u64,
        bitmap_size: u64,
    ) -> Result<Vec<AllocatedLeg>, LayoutError> {
        let data_extents =
            usize::try_from(leg_size.div_ceil(self.extent)).map_err(|_| LayoutError::TooLarge(leg_size))?;
        let bitmap_extents = usize::try_from(bitmap_size.div_ceil(self.extent)).unwrap_or(usize::MAX);
        let need = data_extents.saturating_add(bitmap_extents);
        let tagged = self.devices.iter().any(|d| d.fault_domain.is_some());
        // Fullest-first would bunch volumes together; go round the pool instead, skipping
        // devices without room and domains already used by this set.
        let mut chosen: Vec<usize> = Vec::new();
        let mut domains: Vec<String> = Vec::new();
        for i in self.rotation() {
            let d = &self.devices[i];
            if d.present && d.free_extents() >= need && !domains.contains(&d.domain()) {
                domains.push(d.domain());
                chosen.push(i);
            }
        }
        if chosen.len() < legs {
            return Err(LayoutError::NotEnoughDevices {
                layout,
                parameter,
                needed: legs,
                available: chosen.len(),
                leg_bytes: (need as u64).saturating_mul(self.extent),
                domains: if tagged { " in different fault domains" } else { "" },
            });
        }
        self.cursor = self.cursor.wrapping_add(legs);
        let extent = self.extent;
        Ok(chosen[..legs]
            .iter()
            .map(|&i| {
                let device = &mut self.devices[i];
                let data = device.take(data_extents, extent);
                let bitmap = (bitmap_extents > 0).then(|| {
                    let runs = device.take(bitmap_extents, extent);
                    node_from_runs(device.id, &runs, extent, bitmap_size)
                });
                AllocatedLeg { data: node_from_runs(device.id, &data, extent, leg_size), bitmap }
            })
            .collect())
    }

    fn allocate_linear(&mut self, size: u64) -> Result<NodeSpec, LayoutError> {
        let free = self.free_bytes();
        if free < size {
            return Err(LayoutError::NotEnoughSpace { needed: size, free });
        }
        let mut left =
            usize::try_from(size.div_ceil(self.extent)).map_err(|_| LayoutError::TooLarge(size))?;
        let mut remaining = size;
        let mut children = Vec::new();
        for i in self.rotation() {
            if left == 0 {
                break;
            }
            let device = &mut self.devices[i];
            if !device.present {
                continue;
            }
            let n = left.min(device.free_extents());
            let runs = device.take(n, self.extent);
            let bytes = (n as u64 * self.extent).min(remaining);
            match node_from_runs(device.id, &runs, self.extent, bytes) {
                NodeSpec::Concat { children: c } => children.extend(c),
                node => children.push(node),
            }
            left -= n;
            remaining -= bytes;
        }
        self.cursor = self.cursor.wrapping_add(1);
        Ok(if children.len() == 1 {
            children.pop().expect("one child")
        } else {
            NodeSpec::Concat { children }
        })
    }
}

#[cfg(test)]
mod tests {
    use strata_volume::VolumeRequest;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn planner(domains: &[Option<&str>], extents_each: u64) -> Planner {
        let devices = domains
            .iter()
            .enumerate()
            .map(|(i, d)| {
                DeviceSpace::new(
                    Uuid::from_u128(i as u128 + 1),
                    d.map(String::from),
                    MIB,
                    extents_each * MIB,
                    MIB,
                    true,
                )
            })
            .collect();
        Planner { devices, extent: MIB, block_size: 4096, cursor: 0 }
    }

    fn devices_of(spec: &NodeSpec) -> Vec<Uuid> {
        spec.devices()
    }

    #[test]
    fn mirror_legs_land_on_different_fault_domains() {
        let mut p = planner(&[Some("a"), Some("a"), Some("b"), Some("b")], 16);
        let spec = VolumeRequest::new(4 * MIB, Layout::Mirror).plan(&mut p).unwrap();
        let NodeSpec::Mirror { children, .. } = spec else { panic!("{spec:?}") };
        let domain = |c: &NodeSpec| {
            let id = devices_of(c)[0];
            p.devices.iter().find(|d| d.id == id).unwrap().fault_domain.clone()
        };
        assert_ne!(domain(&children[0]), domain(&children[1]));
        let three = VolumeRequest { copies: Some(3), ..VolumeRequest::new(4 * MIB, Layout::Mirror) };
        let err = three.plan(&mut p).unwrap_err().to_string();
        assert!(err.contains("different fault domains"), "{err}");
    }

    #[test]
    fn volumes_are_spread_round_robin() {
        let mut p = planner(&[None; 4], 16);
        let firsts: Vec<Uuid> = (0..4)
            .map(|_| devices_of(&VolumeRequest::new(MIB, Layout::Linear).plan(&mut p).unwrap())[0])
            .collect();
        let mut unique = firsts.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 4, "{firsts:?}");
    }

    #[test]
    fn refusals_say_what_is_missing() {
        let mut p = planner(&[None; 3], 4);
        let err = VolumeRequest::new(20 * MIB, Layout::Linear).plan(&mut p).unwrap_err();
        assert!(matches!(err, LayoutError::NotEnoughSpace { .. }), "{err}");
        let err = VolumeRequest { width: Some(4), ..VolumeRequest::new(MIB, Layout::Raid5) }
            .plan(&mut p)
            .unwrap_err();
        assert!(err.to_string().contains("needs 4 devices"), "{err}");
    }

    #[test]
    fn a_linear_volume_spans_devices_when_one_is_not_enough() {
        let mut p = planner(&[None; 2], 4);
        let spec = VolumeRequest::new(6 * MIB, Layout::Linear).plan(&mut p).unwrap();
        assert_eq!(spec.size(), 6 * MIB);
        assert_eq!(devices_of(&spec).len(), 2);
    }
}
