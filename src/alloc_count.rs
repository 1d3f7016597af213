//! Allocation counting for the benchmarks (`--features count-alloc`, never in
//! a release package): the system allocator wrapped with two counters,
//! reported on SIGUSR1 as one stderr line `alloc-count allocations=N bytes=B`.
//! The system allocator rather than mimalloc, so that heaptrack and valgrind
//! see the same allocations and can name their call sites (the counts do not
//! depend on the allocator).
//! `bench/alloc` samples it before and after a fixed number of requests to
//! get allocations and bytes per request on portico's real code path.
//!
//! Hand-written: a `GlobalAlloc` wrapper is the only way to see every
//! allocation of the process, and it is a few lines.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

fn count(size: usize) {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    BYTES.fetch_add(size as u64, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds the
// GlobalAlloc contract; the counters have no effect on the memory returned.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's layout contract is passed on as is.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

/// Print the counters on every SIGUSR1 until the runtime ends.
pub async fn report_on_sigusr1() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        eprintln!("alloc-count: cannot listen for SIGUSR1");
        return;
    };
    while usr1.recv().await.is_some() {
        eprintln!(
            "alloc-count allocations={} bytes={}",
            ALLOCATIONS.load(Ordering::Relaxed),
            BYTES.load(Ordering::Relaxed)
        );
    }
}
