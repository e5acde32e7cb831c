//! The completion flags of the device exchange engine ([`super::engine`], PCPP §7.4's
//! communication stream): the stream waits on an exchange's flag after its host function, the
//! communication thread sets the flag to 1 when the exchange has completed (or failed), and the
//! stream resets it to 0 (see [`super`] for why the host function does not wait itself).
//!
//! Flags are 32-bit words of pinned host memory mapped for the device, allocated in blocks of
//! [`BLOCK`] ([`StreamOps::alloc_flags`]) and owned by a [`FlagPool`]. An exchange enqueued
//! eagerly runs once: its flag returns to the pool once the communication thread has released it
//! *and* the stream has reset it (the host reads 0 again after the release), so the next
//! exchange to get it can never see the 1 meant for another. An exchange captured into a CUDA
//! graph runs at every replay and keeps its flag until the pool is freed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Flag, StreamOps};

/// Flags per allocation.
pub(crate) const BLOCK: usize = 256;

/// The flag of one exchange.
pub(crate) struct Slot {
    pub flag: Flag,
    /// Whether the communication thread has set the flag since it was lent.
    released: AtomicBool,
}

impl Slot {
    /// Lets the stream waiting on the flag go on: sets it to 1.
    ///
    /// # Safety
    /// The pool that lent the slot has not been freed.
    pub unsafe fn release(&self, ops: &dyn StreamOps) {
        // SAFETY: the flag's block is allocated (the caller's promise).
        unsafe { ops.signal_flag(self.flag) };
        self.released.store(true, Ordering::Release);
    }

    /// Whether the flag has been released and then reset by the stream: no work uses it any more.
    ///
    /// # Safety
    /// As [`Slot::release`].
    unsafe fn done(&self, ops: &dyn StreamOps) -> bool {
        // SAFETY: allocated (the caller's promise).
        self.released.load(Ordering::Acquire) && unsafe { ops.flag_value(self.flag) } == 0
    }
}

/// The flags of one engine.
#[derive(Default)]
pub(crate) struct FlagPool {
    /// The first flag of every block.
    blocks: Vec<Flag>,
    /// Flags no exchange uses.
    free: Vec<Flag>,
    /// Flags of exchanges that run once, until they are [`Slot::done`].
    lent: Vec<Arc<Slot>>,
}

impl FlagPool {
    /// A flag (0) for an exchange on `stream` that runs once (`one_shot`) or at every replay of a
    /// graph.
    ///
    /// # Safety
    /// `stream` is a live stream of `ops`' kind, the pool's flags came from `ops`.
    pub unsafe fn lend(
        &mut self,
        ops: &dyn StreamOps,
        stream: *mut std::ffi::c_void,
        one_shot: bool,
    ) -> Result<Arc<Slot>, String> {
        // SAFETY: the pool's blocks are allocated.
        unsafe { self.recycle(ops) };
        if self.free.is_empty() {
            // SAFETY: live stream (the caller's promise).
            let first = unsafe { ops.alloc_flags(stream, BLOCK) }?;
            self.blocks.push(first);
            // SAFETY: the block holds BLOCK flags.
            self.free
                .extend((0..BLOCK).rev().map(|i| unsafe { first.offset(i) }));
        }
        let flag = self.free.pop().ok_or("no completion flag left")?;
        let slot = Arc::new(Slot {
            flag,
            released: AtomicBool::new(false),
        });
        if one_shot {
            self.lent.push(slot.clone());
        }
        Ok(slot)
    }

    /// Gives up `slot` for good, when its exchange could not be enqueued whole (the stream may
    /// wait on it without a reset, or reset it without a release): it is freed with its block.
    pub fn abandon(&mut self, slot: &Arc<Slot>) {
        self.lent.retain(|s| !Arc::ptr_eq(s, slot));
    }

    /// Blocks allocated so far.
    #[cfg(test)]
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Moves the lent flags that are done to the free list.
    ///
    /// # Safety
    /// The pool's flags came from `ops`.
    unsafe fn recycle(&mut self, ops: &dyn StreamOps) {
        let free = &mut self.free;
        self.lent.retain(|s| {
            // SAFETY: the pool's blocks are allocated.
            let done = unsafe { s.done(ops) };
            if done {
                free.push(s.flag);
            }
            !done
        });
    }

    /// At shutdown, once the communication thread has ended: releases every lent flag it has not
    /// released (their exchanges will never complete), then waits up to `limit` for the streams
    /// to reset them all. True when they have, so that no enqueued work of a one-shot exchange
    /// uses the engine's flags or staging buffers any more.
    ///
    /// # Safety
    /// The pool's flags came from `ops`; nothing else releases flags any more.
    pub unsafe fn drain(&mut self, ops: &dyn StreamOps, limit: Duration) -> bool {
        for s in &self.lent {
            if !s.released.load(Ordering::Acquire) {
                // SAFETY: the pool's blocks are allocated.
                unsafe { s.release(ops) };
            }
        }
        let t0 = Instant::now();
        loop {
            // SAFETY: as above.
            unsafe { self.recycle(ops) };
            if self.lent.is_empty() {
                return true;
            }
            if t0.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Frees every block.
    ///
    /// # Safety
    /// The pool's flags came from `ops`, and no enqueued work uses them any more (after a
    /// successful [`FlagPool::drain`]; graphs that captured exchanges are not replayed again).
    pub unsafe fn free(&mut self, ops: &dyn StreamOps) {
        self.free.clear();
        self.lent.clear();
        for b in self.blocks.drain(..) {
            // SAFETY: a block of BLOCK flags from `ops.alloc_flags`, unused (the caller's promise).
            unsafe { ops.free_flags(b, BLOCK) };
        }
    }
}
