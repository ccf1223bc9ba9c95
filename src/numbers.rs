//! Numbers no other caller in the process gets, taken without a shared write each: every
//! thread holds a block of them and takes the next, and the shared counter is written once
//! per [`BLOCK`] numbers. Worker threads serving requests side by side then write no cache
//! line the other writes for every request.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// How many numbers a thread takes at once.
pub(crate) const BLOCK: u64 = 1024;

/// The next number of the calling thread's block in `range` (next, end), a new block from
/// `blocks` when it is used up. Unique across threads for one `blocks`; never below the
/// counter's first value.
pub(crate) fn next_from(blocks: &AtomicU64, range: &Cell<(u64, u64)>) -> u64 {
    let (mut next, mut end) = range.get();
    if next == end {
        next = blocks.fetch_add(BLOCK, Ordering::Relaxed);
        end = next + BLOCK;
    }
    range.set((next + 1, end));
    next
}
