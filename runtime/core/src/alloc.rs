//! [`Recycle`]: a global allocator for edgepack's binaries that keeps large freed blocks for the next request of
//! about their size, so that a steady-state inference run does not fault its activations in from the OS again.
//!
//! The CPU backends allocate every activation of a run (tract's plan, the kernel nodes). The system allocator maps
//! large blocks fresh for each allocation (glibc: above its mmap threshold, 32 MiB at most) and unmaps them when
//! they are freed, so every run pays a page fault per 4 KiB of every large activation: EfficientNet-Lite0 at batch
//! 32 on two threads spent more than half its time there (122 samples/s; 247 with the faults gone). onnxruntime
//! avoids this with its arena; this is the same idea one level down, for any code in the process.
//!
//! Blocks of at least [`LARGE`] bytes (alignment ≤ [`ALIGN`]) carry a header with their capacity; a freed one is
//! kept (up to a byte limit) and handed to a later request it fits within 50 % (best fit). Smaller or more
//! strictly aligned requests go to the system allocator unchanged. The cache is guarded by a spin lock: its
//! critical sections are a scan of a fixed array, it never allocates (an allocator must not), and the system
//! allocator is called outside it.
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};

/// Blocks of at least this many bytes are recycled.
pub const LARGE: usize = 1 << 20;
/// Alignment of recycled blocks and size of their header.
pub const ALIGN: usize = 64;
/// Freed blocks kept at most (a fixed array: the allocator cannot grow a collection).
const SLOTS: usize = 256;

/// A caching allocator over [`System`]; install it with `#[global_allocator]` (the edgepack binary does).
pub struct Recycle {
    lock: AtomicBool,
    /// `(header address, capacity)` of kept blocks; capacity 0 marks a free slot.
    slots: UnsafeCell<[(usize, usize); SLOTS]>,
    /// Bytes held by kept blocks (under the lock).
    cached: UnsafeCell<usize>,
    limit: AtomicUsize,
    hits: AtomicUsize,
    misses: AtomicUsize,
}

// SAFETY: `slots` and `cached` are only touched while `lock` is held.
unsafe impl Sync for Recycle {}

/// What a [`Recycle`] allocator has done: large requests served from kept blocks and from the system, and the
/// bytes kept now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecycleStats {
    pub hits: usize,
    pub misses: usize,
    pub cached_bytes: usize,
}

impl Recycle {
    /// An allocator that keeps up to `limit` bytes of freed large blocks.
    pub const fn new(limit: usize) -> Recycle {
        Recycle {
            lock: AtomicBool::new(false),
            slots: UnsafeCell::new([(0, 0); SLOTS]),
            cached: UnsafeCell::new(0),
            limit: AtomicUsize::new(limit),
            hits: AtomicUsize::new(0),
            misses: AtomicUsize::new(0),
        }
    }

    /// Changes how many bytes of freed blocks are kept; blocks already kept beyond it are released as they are
    /// reused or by [`Recycle::release`].
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Relaxed);
    }

    pub fn stats(&self) -> RecycleStats {
        let cached = self.locked(|_, cached| *cached);
        RecycleStats { hits: self.hits.load(Relaxed), misses: self.misses.load(Relaxed), cached_bytes: cached }
    }

    /// Returns every kept block to the system (e.g. after a model is unloaded).
    pub fn release(&self) {
        loop {
            let taken = self.locked(|slots, cached| {
                let s = slots.iter_mut().find(|s| s.1 != 0)?;
                let block = *s;
                *s = (0, 0);
                *cached -= block.1;
                Some(block)
            });
            match taken {
                // SAFETY: a kept block was allocated by `System` with this layout and is owned by no one.
                Some((base, cap)) => unsafe { System.dealloc(base as *mut u8, block_layout(cap)) },
                None => return,
            }
        }
    }

    fn locked<R>(&self, f: impl FnOnce(&mut [(usize, usize); SLOTS], &mut usize) -> R) -> R {
        let mut spins = 0u32;
        while self.lock.compare_exchange_weak(false, true, Acquire, Relaxed).is_err() {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: the lock is held until the end of this function.
        let r = unsafe { f(&mut *self.slots.get(), &mut *self.cached.get()) };
        self.lock.store(false, Release);
        r
    }

    /// A large block of at least `size` bytes, its first `size` bytes zero if `zeroed`.
    unsafe fn alloc_large(&self, size: usize, zeroed: bool) -> *mut u8 {
        let kept = self.locked(|slots, cached| {
            let (i, _) = slots
                .iter()
                .enumerate()
                .filter(|&(_, &(_, cap))| cap >= size && cap - size <= size / 2)
                .min_by_key(|&(_, &(_, cap))| cap)?;
            let block = slots[i];
            slots[i] = (0, 0);
            *cached -= block.1;
            Some(block)
        });
        if let Some((base, _)) = kept {
            self.hits.fetch_add(1, Relaxed);
            let p = (base + ALIGN) as *mut u8;
            if zeroed {
                // SAFETY: the block holds at least `size` bytes after its header.
                unsafe { std::ptr::write_bytes(p, 0, size) };
            }
            return p;
        }
        self.misses.fetch_add(1, Relaxed);
        if size > isize::MAX as usize - 2 * ALIGN {
            return std::ptr::null_mut();
        }
        // SAFETY: the layout is non-zero sized with a power-of-two alignment; a fresh zeroed block comes from the
        // system zeroed (untouched pages, no write needed).
        let base =
            unsafe { if zeroed { System.alloc_zeroed(block_layout(size)) } else { System.alloc(block_layout(size)) } };
        if base.is_null() {
            return base;
        }
        // SAFETY: the header lies at the start of the block, aligned to 64.
        unsafe { (base as *mut usize).write(size) };
        unsafe { base.add(ALIGN) }
    }

    unsafe fn dealloc_large(&self, ptr: *mut u8) {
        // SAFETY: `ptr` came from `alloc_large`: its header is `ALIGN` bytes before it.
        let base = unsafe { ptr.sub(ALIGN) };
        let cap = unsafe { (base as *const usize).read() };
        let limit = self.limit.load(Relaxed);
        let kept = self.locked(|slots, cached| {
            if *cached + cap > limit {
                return false;
            }
            match slots.iter_mut().find(|s| s.1 == 0) {
                Some(s) => {
                    *s = (base as usize, cap);
                    *cached += cap;
                    true
                }
                None => false,
            }
        });
        if !kept {
            // SAFETY: allocated by `System` with this layout.
            unsafe { System.dealloc(base, block_layout(cap)) };
        }
    }
}

fn block_layout(cap: usize) -> Layout {
    // SAFETY: `cap + ALIGN` was checked to stay below `isize::MAX` when the block was made.
    unsafe { Layout::from_size_align_unchecked(cap + ALIGN, ALIGN) }
}

fn is_large(layout: &Layout) -> bool {
    layout.size() >= LARGE && layout.align() <= ALIGN
}

unsafe impl GlobalAlloc for Recycle {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            unsafe { self.alloc_large(layout.size(), false) }
        } else {
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            unsafe { self.alloc_large(layout.size(), true) }
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_large(&layout) { unsafe { self.dealloc_large(ptr) } } else { unsafe { System.dealloc(ptr, layout) } }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY (caller): `new_size` rounded up to the alignment does not overflow.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (is_large(&layout), is_large(&new_layout)) {
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            (true, true) if new_size <= unsafe { (ptr.sub(ALIGN) as *const usize).read() } => ptr,
            _ => {
                let new = unsafe { self.alloc(new_layout) };
                if !new.is_null() {
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn a_freed_large_block_serves_the_next_request_of_its_size() {
        let a = Recycle::new(1 << 30);
        unsafe {
            let l = layout(3 << 20, 16);
            let p = a.alloc(l);
            assert!(!p.is_null() && (p as usize).is_multiple_of(ALIGN));
            p.write_bytes(7, l.size());
            a.dealloc(p, l);
            assert_eq!(a.stats().cached_bytes, 3 << 20);
            let q = a.alloc(l);
            assert_eq!(p, q, "the kept block is reused");
            assert_eq!(a.stats(), RecycleStats { hits: 1, misses: 1, cached_bytes: 0 });
            // Zeroed requests get zeroed memory from a recycled block.
            a.dealloc(q, l);
            let z = a.alloc_zeroed(l);
            assert_eq!(z, p);
            assert!(std::slice::from_raw_parts(z, l.size()).iter().all(|&b| b == 0));
            a.dealloc(z, l);
            a.release();
            assert_eq!(a.stats().cached_bytes, 0);
        }
    }

    #[test]
    fn best_fit_within_half_and_small_or_overaligned_requests_pass_through() {
        let a = Recycle::new(1 << 30);
        unsafe {
            let (big, mid) = (layout(8 << 20, 8), layout(4 << 20, 8));
            let (pb, pm) = (a.alloc(big), a.alloc(mid));
            a.dealloc(pb, big);
            a.dealloc(pm, mid);
            // 3.5 MiB fits the 4 MiB block (best fit), not the 8 MiB one.
            let l = layout(7 << 19, 8);
            let p = a.alloc(l);
            assert_eq!(p, pm);
            // 2 MiB fits neither within 50 %: fresh.
            let l2 = layout(2 << 20, 8);
            let p2 = a.alloc(l2);
            assert!(p2 != pb && p2 != pm);
            a.dealloc(p, l);
            a.dealloc(p2, l2);
            let before = a.stats();
            for l in [layout(1000, 8), layout(4 << 20, 4096)] {
                let p = a.alloc(l);
                assert!(!p.is_null() && (p as usize).is_multiple_of(l.align()));
                a.dealloc(p, l);
            }
            assert_eq!(a.stats(), before, "small and over-aligned blocks bypass the cache");
            a.release();
        }
    }

    #[test]
    fn the_limit_bounds_kept_bytes_and_realloc_keeps_contents() {
        let a = Recycle::new(5 << 20);
        unsafe {
            let l = layout(3 << 20, 8);
            let (p, q) = (a.alloc(l), a.alloc(l));
            a.dealloc(p, l);
            a.dealloc(q, l);
            assert_eq!(a.stats().cached_bytes, 3 << 20, "the second block is over the limit: released");
            // Growing across the threshold, within a block, and shrinking below it keep the bytes.
            let s = layout(1000, 8);
            let mut v = a.alloc(s);
            for i in 0..1000 {
                *v.add(i) = i as u8;
            }
            v = a.realloc(v, s, 2 << 20);
            let l2 = layout(2 << 20, 8);
            let w = a.realloc(v, l2, (2 << 20) - 10);
            assert_eq!(w, v, "shrinking within the block stays in place");
            let x = a.realloc(w, layout((2 << 20) - 10, 8), 500);
            assert!((0..500).all(|i| *x.add(i) == i as u8));
            a.dealloc(x, layout(500, 8));
            a.set_limit(0);
            a.release();
            assert_eq!(a.stats().cached_bytes, 0);
        }
    }

    #[test]
    fn threads_share_the_cache_without_losing_blocks() {
        static A: Recycle = Recycle::new(64 << 20);
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || unsafe {
                    for i in 0..200 {
                        let l = layout(LARGE + ((i + t) % 5) * 4096, 8);
                        let p = A.alloc(l);
                        assert!(!p.is_null());
                        p.write_bytes(t as u8, l.size());
                        assert_eq!(*p.add(l.size() - 1), t as u8);
                        A.dealloc(p, l);
                    }
                });
            }
        });
        let st = A.stats();
        assert_eq!(st.hits + st.misses, 800);
        assert!(st.misses <= 40, "blocks are reused across threads: {st:?}");
        A.release();
    }
}
