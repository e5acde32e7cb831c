//! The completion flags of the device exchange engine ([`super::engine`], PCPP §7.4's
//! communication stream): the communication thread sets an exchange's flag to 1 when the
//! exchange has completed (or failed); in `stream` mode the stream waits for that after the host
//! function (see [`super`] for why the host function does not wait itself); in both modes the
//! stream writes [`FLAG_DONE`] after the exchange's receive copies.
//!
//! Flags are 32-bit words of pinned host memory mapped for the device, allocated in blocks of
//! [`BLOCK`] ([`StreamOps::alloc_flags`]) and owned by a [`FlagPool`]. An exchange enqueued
//! eagerly runs once: its flag returns to the pool (cleared to 0 by the host) once the stream
//! has written [`FLAG_DONE`], so no work of the exchange uses the engine's staging buffers any
//! more and the next exchange to get the flag can never see a value meant for another. An
//! exchange captured into a CUDA graph runs at every replay (the comm thread sets 1, the stream
//! waits for 1 and writes [`FLAG_DONE`]) and keeps its flag until the pool is freed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Flag, StreamOps, FLAG_DONE};

/// Flags per allocation.
pub(crate) const BLOCK: usize = 256;

/// The flag of one exchange.
pub(crate) struct Slot {
    pub flag: Flag,
}

impl Slot {
    /// Lets the stream waiting on the flag go on: sets it to 1.
    ///
    /// # Safety
    /// The pool that lent the slot has not been freed.
    pub unsafe fn release(&self, ops: &dyn StreamOps) {
        // SAFETY: the flag's block is allocated (the caller's promise).
        unsafe { ops.signal_flag(self.flag) };
    }

    /// Whether the stream has written [`FLAG_DONE`]: no work of the exchange runs any more.
    ///
    /// # Safety
    /// As [`Slot::release`].
    unsafe fn done(&self, ops: &dyn StreamOps) -> bool {
        // SAFETY: allocated (the caller's promise).
        (unsafe { ops.flag_value(self.flag) }) == FLAG_DONE
    }

    /// At shutdown: releases the flag unless the communication thread or the stream got to it
    /// first (a compare-and-swap from 0, so that a [`FLAG_DONE`] already written stays).
    ///
    /// # Safety
    /// As [`Slot::release`].
    unsafe fn release_if_lent(&self) {
        // SAFETY: allocated (the caller's promise).
        let word = unsafe { self.flag.atomic() };
        let _ = word.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire);
        std::sync::atomic::fence(Ordering::SeqCst);
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
        let slot = Arc::new(Slot { flag });
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
                // SAFETY: allocated; no work uses the flag any more.
                unsafe { s.flag.atomic() }.store(0, Ordering::Release);
                free.push(s.flag);
            }
            !done
        });
    }

    /// At shutdown, once the communication thread has ended: releases every lent flag still 0
    /// (their exchanges will never complete), then waits up to `limit` for the streams to mark
    /// them all [`FLAG_DONE`]. True when they have, so that no enqueued work of a one-shot
    /// exchange uses the engine's flags or staging buffers any more.
    ///
    /// # Safety
    /// The pool's flags came from `ops`; nothing else releases flags any more.
    pub unsafe fn drain(&mut self, ops: &dyn StreamOps, limit: Duration) -> bool {
        for s in &self.lent {
            // SAFETY: the pool's blocks are allocated.
            unsafe { s.release_if_lent() };
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
