//! A counting global allocator.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(true);

/// A global allocator that counts the bytes allocated now and at the peak, for tests and
/// benchmarks that must show memory stays bounded. It delegates to the system allocator.
///
///
/// Shared by the tests and the benchmarks (`#[path]`-included: the library itself forbids
/// unsafe code, which a global allocator needs).
#[derive(Clone, Copy, Debug, Default)]
#[allow(dead_code)]
pub struct CountingAllocator;

impl CountingAllocator {
    /// Bytes allocated and not yet freed.
    pub fn current() -> usize {
        CURRENT.load(Relaxed)
    }

    /// The most bytes allocated at once since the last [`reset_peak`](Self::reset_peak).
    pub fn peak() -> usize {
        PEAK.load(Relaxed)
    }

    /// Starts measuring the peak from now.
    pub fn reset_peak() {
        PEAK.store(CURRENT.load(Relaxed), Relaxed);
    }

    /// Stops counting, for good: from here the allocator is the system allocator plus one
    /// relaxed load per call. Counting costs two atomic operations on counters shared by every
    /// thread, per allocation: a benchmark measures memory first, then stops counting so that
    /// its throughput figures are not weighed down by the instrument.
    pub fn stop_counting() {
        COUNTING.store(false, Relaxed);
    }

    fn grew(bytes: usize) {
        let now = CURRENT.fetch_add(bytes, Relaxed) + bytes;
        PEAK.fetch_max(now, Relaxed);
    }
}

// It only counts, around the system allocator's own calls with the caller's arguments.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            Self::grew(layout.size());
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.load(Relaxed) {
            CURRENT.fetch_sub(layout.size(), Relaxed);
        }
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            if new_size >= layout.size() {
                Self::grew(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
