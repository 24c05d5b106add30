//! The heap: the RAM between the image and the ring-3 stack, which the vmm
//! reports in the boot information. Pages are touched only when allocated.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

pub(crate) fn init(start: u64, end: u64) {
    if end > start {
        // SAFETY: the vmm reserves [start, end) for the heap: mapped RAM that
        // nothing else uses. `init` runs once, before any allocation.
        unsafe { HEAP.lock().init(start as *mut u8, (end - start) as usize) };
    }
}
