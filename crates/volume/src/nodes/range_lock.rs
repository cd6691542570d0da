//! A range lock: exclusive access to byte ranges, granted in the order it was asked for.
//!
//! A mirror sends a write to every leg at once. Two overlapping writes in flight together
//! can then land in one order on one leg and in the other order on the next, and the
//! copies disagree for good. Holding the written range while the legs are written orders
//! overlapping writes the same way on every leg; writes that share no byte never wait for
//! each other.
//!
//! ```text
//!   asked:   A [0, 64K)   B [32K, 96K)   C [128K, 192K)   D [40K, 48K)
//!   granted: A at once    B after A      C at once        D after A and B
//! ```
//!
//! A request waits for every earlier request whose range overlaps its own, whether that
//! one holds its range or is itself still waiting. So overlapping requests are granted
//! strictly in the order they asked (first come, first served), and a large range is
//! never starved by a stream of small ones that keep overlapping it. A caller that holds
//! one range and asks for another can deadlock with one doing the reverse: hold one at a
//! time.
//!
//! Ranges are bytes, half-open; the nodes lock a request's own range, which is aligned to
//! the block size, so any two requests that touch a common block are ordered and requests
//! in different blocks never are. The same type is meant to serve range locks between
//! controllers (DESIGN.md): the queue here is the wait queue.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

/// Exclusive access to byte ranges, granted first come, first served among overlapping
/// ranges; see the module documentation.
#[derive(Default)]
pub struct RangeLock {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The next request's id; ids grow in the order requests are made.
    next_id: u64,
    /// Every holder and waiter, in the order they asked (ids ascending).
    queue: Vec<Entry>,
}

struct Entry {
    id: u64,
    range: Range<u64>,
    granted: bool,
    waker: Option<Waker>,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end && !a.is_empty() && !b.is_empty()
}

impl RangeLock {
    /// A lock with nothing held.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for `range`. The request takes its place in the queue now, when `lock` is
    /// called, not when the returned future is first polled; the future resolves once no
    /// earlier request overlapping `range` remains, to a guard that holds the range until
    /// it is dropped. Dropping the future before then withdraws the request. An empty
    /// range overlaps nothing and is granted at once.
    pub fn lock(&self, range: Range<u64>) -> Acquire<'_> {
        let mut state = self.state.lock();
        let id = state.next_id;
        state.next_id += 1;
        let granted = !state.queue.iter().any(|e| overlaps(&e.range, &range));
        state.queue.push(Entry { id, range, granted, waker: None });
        Acquire { lock: self, id, granted_at_once: granted, done: false }
    }

    /// Removes request `id` (held or waiting) and grants what it was holding up.
    fn release(&self, id: u64) {
        let mut woken = Vec::new();
        {
            let mut state = self.state.lock();
            let Ok(at) = state.queue.binary_search_by_key(&id, |e| e.id) else { return };
            let gone = state.queue.remove(at);
            // Only later requests that overlapped it can have been waiting for it.
            for j in at..state.queue.len() {
                let entry = &state.queue[j];
                if entry.granted
                    || !overlaps(&entry.range, &gone.range)
                    || state.queue[..j].iter().any(|earlier| overlaps(&earlier.range, &entry.range))
                {
                    continue;
                }
                let entry = &mut state.queue[j];
                entry.granted = true;
                woken.extend(entry.waker.take());
            }
        }
        woken.into_iter().for_each(Waker::wake);
    }
}

/// A request for a range, queued by [`RangeLock::lock`]; resolves to a [`RangeGuard`].
#[must_use = "the request is withdrawn when dropped"]
pub struct Acquire<'a> {
    lock: &'a RangeLock,
    id: u64,
    /// Granted when asked: the first poll needs no look at the queue.
    granted_at_once: bool,
    /// A guard was handed out; it, not this future, now owns the request.
    done: bool,
}

impl<'a> Future for Acquire<'a> {
    type Output = RangeGuard<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RangeGuard<'a>> {
        let this = self.get_mut();
        assert!(!this.done, "a range lock request was polled after it completed");
        if !this.granted_at_once {
            let mut state = this.lock.state.lock();
            let at = state.queue.binary_search_by_key(&this.id, |e| e.id).expect("queued until released");
            let entry = &mut state.queue[at];
            if !entry.granted {
                match &mut entry.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    w => *w = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
        }
        this.done = true;
        Poll::Ready(RangeGuard { lock: this.lock, id: this.id })
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.lock.release(self.id);
        }
    }
}

/// A range held in a [`RangeLock`]; dropping it lets the next overlapping request in.
#[must_use = "the range is released when the guard is dropped"]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.release(self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use futures::FutureExt;

    use super::*;

    #[test]
    fn ranges_that_share_no_byte_do_not_wait() {
        let lock = RangeLock::new();
        let _a = lock.lock(0..4096).now_or_never().expect("free");
        let _b = lock.lock(4096..8192).now_or_never().expect("adjacent, not overlapping");
        let _c = lock.lock(1 << 20..2 << 20).now_or_never().expect("far away");
        let _empty = lock.lock(100..100).now_or_never().expect("an empty range overlaps nothing");
        assert!(lock.lock(4095..4097).now_or_never().is_none(), "overlaps both held blocks");
    }

    #[test]
    fn an_overlapping_range_waits_until_the_holder_lets_go() {
        let lock = RangeLock::new();
        let a = lock.lock(0..8192).now_or_never().expect("free");
        let mut b = lock.lock(4096..12288);
        assert!((&mut b).now_or_never().is_none());
        drop(a);
        let _b = b.now_or_never().expect("granted once A is dropped");
    }

    #[test]
    fn a_waiting_large_range_is_not_starved_by_later_small_ones() {
        let lock = RangeLock::new();
        let first = lock.lock(0..4096).now_or_never().expect("free");
        let mut large = lock.lock(0..1 << 20);
        // Small requests inside the large range, none overlapping the first holder: they
        // still queue behind the large one, which asked earlier.
        let mut small: Vec<_> = (1..8u64).map(|i| lock.lock(i * 4096..(i + 1) * 4096)).collect();
        assert!(small.iter_mut().all(|s| s.now_or_never().is_none()));
        drop(first);
        let large = (&mut large).now_or_never().expect("the large range goes first");
        assert!(small.iter_mut().all(|s| s.now_or_never().is_none()));
        drop(large);
        let _held: Vec<_> = small.into_iter().map(|s| s.now_or_never().expect("granted")).collect();
    }

    #[test]
    fn a_withdrawn_request_holds_nobody_up() {
        let lock = RangeLock::new();
        let a = lock.lock(0..4096).now_or_never().expect("free");
        let withdrawn = lock.lock(0..8192);
        let mut c = lock.lock(4096..8192);
        assert!((&mut c).now_or_never().is_none(), "behind the waiting request");
        drop(withdrawn);
        let _c = c.now_or_never().expect("the request it waited behind is gone");
        drop(a);
        // A request granted but never polled releases its range when dropped.
        drop(lock.lock(0..4096));
        let _d = lock.lock(0..4096).now_or_never().expect("nothing is held");
    }

    /// Tasks on several threads lock overlapping ranges at random: no two ever hold the
    /// same block, and each block's holders come in the order they asked.
    #[test]
    fn holders_of_a_block_are_exclusive_and_in_the_order_they_asked() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).build().unwrap();
        let lock = Arc::new(RangeLock::new());
        let holders: Arc<Vec<AtomicU32>> = Arc::new((0..16).map(|_| AtomicU32::new(0)).collect());
        // Per block, the order requests were made and the order they were granted.
        let asked = Arc::new(parking_lot::Mutex::new(vec![Vec::new(); 16]));
        let granted = Arc::new(parking_lot::Mutex::new(vec![Vec::new(); 16]));
        rt.block_on(async {
            let tasks: Vec<_> = (0..8u64)
                .map(|t| {
                    let (lock, holders, asked, granted) =
                        (lock.clone(), holders.clone(), asked.clone(), granted.clone());
                    tokio::spawn(async move {
                        let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                        for i in 0..300u64 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let first = usize::try_from(x % 16).unwrap();
                            let n = usize::try_from(1 + (x >> 8) % 4).unwrap();
                            let blocks = first..(first + n).min(16);
                            let request = (t, i);
                            let acquire = {
                                let mut asked = asked.lock();
                                blocks.clone().for_each(|b| asked[b].push(request));
                                lock.lock(blocks.start as u64 * 4096..blocks.end as u64 * 4096)
                            };
                            let _guard = acquire.await;
                            {
                                let mut granted = granted.lock();
                                blocks.clone().for_each(|b| granted[b].push(request));
                            }
                            for b in blocks.clone() {
                                assert_eq!(holders[b].fetch_add(1, Ordering::SeqCst), 0);
                            }
                            tokio::task::yield_now().await;
                            for b in blocks {
                                holders[b].fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        assert_eq!(*asked.lock(), *granted.lock(), "a block's holders came out of order");
        assert!(lock.state.lock().queue.is_empty());
    }
}
