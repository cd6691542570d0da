//! Parity arithmetic: XOR for P, GF(2^8) with generator 2 and polynomial 0x11d for Q,
//! the field Linux md and most RAID 6 implementations use.
//!
//! `P = Σ Dk` and `Q = Σ g^k·Dk` over the data chunks of a row. Any two missing members of
//! a row can be solved from the others.

// Field elements are bytes: the table and test code narrow on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::sync::OnceLock;

struct Tables {
    exp: [u8; 512],
    log: [u8; 256],
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut exp = [0u8; 512];
        let mut log = [0u8; 256];
        let mut x: u16 = 1;
        for (i, e) in exp.iter_mut().enumerate().take(255) {
            *e = x as u8;
            log[x as usize] = i as u8;
            x <<= 1;
            if x & 0x100 != 0 {
                x ^= 0x11d;
            }
        }
        // log a + log b is at most 508: repeat the cycle so no reduction is needed.
        exp.copy_within(0..255, 255);
        Tables { exp, log }
    })
}

/// `a · b` in GF(2^8).
pub fn mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        return 0;
    }
    let t = tables();
    t.exp[t.log[a as usize] as usize + t.log[b as usize] as usize]
}

/// `g^k`.
pub fn pow2(k: usize) -> u8 {
    tables().exp[k % 255]
}

/// `1 / a` in GF(2^8); `a` must not be zero.
pub fn inv(a: u8) -> u8 {
    debug_assert_ne!(a, 0);
    let t = tables();
    t.exp[255 - t.log[a as usize] as usize]
}

/// `dst ^= src`.
pub fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= *s;
    }
}

/// `dst ^= c · src`.
pub fn mul_xor_into(dst: &mut [u8], src: &[u8], c: u8) {
    match c {
        0 => {}
        1 => xor_into(dst, src),
        _ => {
            let table: [u8; 256] = std::array::from_fn(|x| mul(x as u8, c));
            for (d, s) in dst.iter_mut().zip(src) {
                *d ^= table[*s as usize];
            }
        }
    }
}

/// `buf = c · buf`.
pub fn scale(buf: &mut [u8], c: u8) {
    let table: [u8; 256] = std::array::from_fn(|x| mul(x as u8, c));
    for b in buf.iter_mut() {
        *b = table[*b as usize];
    }
}

/// The parity of one row over a byte range: `data[k]` is data chunk `k`.
pub fn compute(data: &[&[u8]], q: bool) -> (Vec<u8>, Option<Vec<u8>>) {
    let len = data.first().map_or(0, |d| d.len());
    let mut p = vec![0u8; len];
    let mut qv = q.then(|| vec![0u8; len]);
    for (k, d) in data.iter().enumerate() {
        xor_into(&mut p, d);
        if let Some(qv) = &mut qv {
            mul_xor_into(qv, d, pow2(k));
        }
    }
    (p, qv)
}

/// Solves the missing members of one row.
///
/// `data[k]` is data chunk `k` or `None` if missing; `p` and `q` likewise (`q` is ignored for
/// single parity, `has_q` false). Returns false when more members are missing than the
/// parity covers. On success every `Some` slot is filled.
pub fn reconstruct(
    data: &mut [Option<Vec<u8>>],
    p: &mut Option<Vec<u8>>,
    q: &mut Option<Vec<u8>>,
    has_q: bool,
    len: usize,
) -> bool {
    let missing: Vec<usize> = (0..data.len()).filter(|&k| data[k].is_none()).collect();
    let parity_missing = usize::from(p.is_none()) + usize::from(has_q && q.is_none());
    let allowed = if has_q { 2 } else { 1 };
    if missing.len() + parity_missing > allowed {
        return false;
    }
    match (missing.as_slice(), p.is_some(), q.is_some() || !has_q) {
        ([], _, _) => {}
        ([x], true, _) => {
            // Dx = P ^ Σ others
            let mut d = p.clone().expect("checked");
            for (k, other) in data.iter().enumerate() {
                if k != *x {
                    xor_into(&mut d, other.as_ref().expect("one missing"));
                }
            }
            data[*x] = Some(d);
        }
        ([x], false, true) => {
            // Dx = (Q ^ Σ g^k·Dk, k≠x) / g^x
            let mut d = q.clone().expect("checked");
            for (k, other) in data.iter().enumerate() {
                if k != *x {
                    mul_xor_into(&mut d, other.as_ref().expect("one missing"), pow2(k));
                }
            }
            scale(&mut d, inv(pow2(*x)));
            data[*x] = Some(d);
        }
        ([x, y], true, true) => {
            // Pxy = P ^ Σ others, Qxy = Q ^ Σ g^k·others;
            // Dx = (g^(y-x)·Pxy ^ g^-x·Qxy) / (g^(y-x) ^ 1), Dy = Pxy ^ Dx.
            let (x, y) = (*x, *y);
            let mut pxy = p.clone().expect("checked");
            let mut qxy = q.clone().expect("checked");
            for (k, other) in data.iter().enumerate() {
                if k != x && k != y {
                    let other = other.as_ref().expect("two missing");
                    xor_into(&mut pxy, other);
                    mul_xor_into(&mut qxy, other, pow2(k));
                }
            }
            let gyx = pow2(y + 255 - x);
            let denom = inv(gyx ^ 1);
            let a = mul(gyx, denom);
            let b = mul(inv(pow2(x)), denom);
            let mut dx = vec![0u8; len];
            mul_xor_into(&mut dx, &pxy, a);
            mul_xor_into(&mut dx, &qxy, b);
            let mut dy = pxy;
            xor_into(&mut dy, &dx);
            data[x] = Some(dx);
            data[y] = Some(dy);
        }
        _ => return false,
    }
    if p.is_none() || (has_q && q.is_none()) {
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_deref().expect("solved")).collect();
        let (np, nq) = compute(&refs, has_q);
        if p.is_none() {
            *p = Some(np);
        }
        if has_q && q.is_none() {
            *q = nq;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_two_missing_members_are_recovered() {
        let width = 5;
        let data: Vec<Vec<u8>> =
            (0..width).map(|k| (0..64).map(|i| (i * 7 + k * 31) as u8).collect()).collect();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let (p, q) = compute(&refs, true);
        // Members 0..width are data, width is P, width + 1 is Q.
        for a in 0..width + 2 {
            for b in a..width + 2 {
                let mut d: Vec<Option<Vec<u8>>> = data.iter().cloned().map(Some).collect();
                let (mut pp, mut qq) = (Some(p.clone()), q.clone());
                for m in [a, b] {
                    match m {
                        m if m < width => d[m] = None,
                        m if m == width => pp = None,
                        _ => qq = None,
                    }
                }
                assert!(reconstruct(&mut d, &mut pp, &mut qq, true, 64), "{a} {b}");
                assert_eq!(d.into_iter().map(Option::unwrap).collect::<Vec<_>>(), data, "{a} {b}");
                assert_eq!(pp.unwrap(), p);
                assert_eq!(qq, q);
            }
        }
    }

    #[test]
    fn three_missing_is_refused() {
        let mut d = vec![None, None, Some(vec![0u8; 4])];
        assert!(!reconstruct(&mut d, &mut None, &mut Some(vec![0; 4]), true, 4));
    }
}
