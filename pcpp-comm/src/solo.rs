//! [`SoloTransport`]: one rank of a patch-parallel world whose other ranks do not exist.
//!
//! Measuring what one rank computes in a PCPP step (its patch's convolutions, attention over
//! all patches' keys and values, its share of the group-norm statistics) does not need the
//! other GPUs: their data only changes values, not shapes or work. A `SoloTransport` is rank
//! `rank` of a world of `size`; it accepts every operation a real back-end would, with the same
//! lengths and the same byte accounting, but nothing leaves the process and nothing arrives:
//!
//! - [`Transport::exchange`] validates the peers, drops the sends and returns an
//!   already-complete [`Pending`] whose receives are zero-filled buffers of the posted
//!   lengths (receives from this rank itself too: nothing is delivered, even to itself);
//! - [`DeviceP2p::enqueue`] validates and counts, but enqueues nothing and touches no device
//!   memory (receive buffers are left as they are); it needs no CUDA;
//! - the collectives return what the world would give if every other rank contributed zeros
//!   of this rank's lengths (see each method);
//! - [`Transport::split`] fails: the other ranks' colours and keys are unknown.
//!
//! Bytes and messages are counted in [`Transport::stats`] as a real back-end counts them:
//! exchanges and device enqueues message by message, the collectives as the point-to-point
//! algorithms of [`crate::collectives`] (the default of [`Transport`]) would send and receive
//! them, assuming every other rank has this rank's lengths.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::collectives::{
    TAG_ALL_GATHER_DATA, TAG_ALL_GATHER_LEN, TAG_ALL_REDUCE, TAG_BARRIER, TAG_BROADCAST,
};
use crate::error::CommError;
use crate::stats::{CommKind, CommStats, StatsCounter};
use crate::transport::{
    check_device_msgs, count_device_msgs, DeviceMsg, DeviceP2p, Pending, Transport,
    TransportOptions,
};

/// Rank `rank` of a world of `size` whose other ranks do not exist (see the module docs).
#[derive(Debug)]
pub struct SoloTransport {
    rank: usize,
    size: usize,
    ordinal: AtomicUsize,
    opts: TransportOptions,
    stats: StatsCounter,
    abort: Mutex<Option<String>>,
}

impl SoloTransport {
    /// Rank `rank` of a world of `size` ranks, on CUDA device 0 (see
    /// [`SoloTransport::with_device`]). Fails with [`CommError::Setup`] when `size` is 0 or
    /// `rank >= size`.
    pub fn new(
        rank: usize,
        size: usize,
        opts: TransportOptions,
    ) -> Result<Arc<SoloTransport>, CommError> {
        if size == 0 || rank >= size {
            return Err(CommError::Setup {
                op: "solo transport",
                rank,
                detail: format!("rank {rank} is out of range for a world of {size} ranks"),
            });
        }
        Ok(Arc::new(SoloTransport {
            rank,
            size,
            ordinal: AtomicUsize::new(0),
            opts,
            stats: StatsCounter::new(),
            abort: Mutex::new(None),
        }))
    }

    /// Sets the CUDA device ordinal [`DeviceP2p::device_ordinal`] reports (0 unless set) and
    /// returns the transport, for `SoloTransport::new(rank, size, opts)?.with_device(gpu)`.
    /// Nothing is opened on the device.
    pub fn with_device(self: Arc<Self>, ordinal: usize) -> Arc<Self> {
        self.ordinal.store(ordinal, Ordering::Relaxed);
        self
    }

    /// Fails with [`CommError::Aborted`] once [`Transport::abort`] has been called.
    fn check_abort(&self, op: &'static str, peer: usize, tag: u32) -> Result<(), CommError> {
        let guard = self.abort.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(reason) => Err(CommError::Aborted {
                op,
                peer,
                tag,
                by_rank: self.rank,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Every rank but this one.
    fn others(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.size).filter(move |&p| p != self.rank)
    }

    /// [`Transport::exchange`] with lengths only: checks, counts and returns the zero-filled
    /// receives; `op` names the calling operation in errors.
    fn post(
        &self,
        op: &'static str,
        kind: CommKind,
        tag: u32,
        sends: &[(usize, usize)],
        recvs: &[(usize, usize)],
    ) -> Result<Vec<Vec<u8>>, CommError> {
        let first_peer = sends
            .first()
            .or_else(|| recvs.first())
            .map_or(self.rank, |m| m.0);
        self.check_abort(op, first_peer, tag)?;
        for &(peer, _) in sends.iter().chain(recvs) {
            if peer >= self.size {
                return Err(CommError::InvalidRank {
                    op,
                    peer,
                    tag,
                    size: self.size,
                });
            }
        }
        for &(_, len) in sends {
            self.stats.record_send(kind, len);
        }
        for &(_, len) in recvs {
            self.stats.record_recv(kind, len);
        }
        Ok(recvs.iter().map(|&(_, len)| vec![0; len]).collect())
    }
}

impl Transport for SoloTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn options(&self) -> &TransportOptions {
        &self.opts
    }

    /// Always fails: the other ranks' colours and keys are unknown. Build the transport of the
    /// group directly with [`SoloTransport::new`] instead.
    fn split(&self, _color: u32, _key: u32) -> Result<Arc<dyn Transport>, CommError> {
        self.check_abort("split", self.rank, 0)?;
        Err(CommError::Setup {
            op: "split",
            rank: self.rank,
            detail: "a solo transport cannot be split: the other ranks' colours are unknown; \
                     build the group transport with SoloTransport::new"
                .into(),
        })
    }

    /// Validates the peers, drops the sends and returns an already-complete [`Pending`] whose
    /// receives are zero-filled buffers of the posted lengths.
    fn exchange(
        &self,
        kind: CommKind,
        tag: u32,
        sends: Vec<(usize, Vec<u8>)>,
        recvs: Vec<(usize, usize)>,
    ) -> Result<Pending, CommError> {
        let sends: Vec<(usize, usize)> = sends.iter().map(|(p, d)| (*p, d.len())).collect();
        let got = self.post("exchange", kind, tag, &sends, &recvs)?;
        Ok(Pending::ready(Ok(got)))
    }

    /// This rank's `data` at its index and zero-filled buffers of the same length for the
    /// others.
    fn all_gather(&self, kind: CommKind, data: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        const OP: &str = "all_gather";
        self.check_abort(OP, self.rank, TAG_ALL_GATHER_LEN)?;
        let headers: Vec<(usize, usize)> = self.others().map(|p| (p, 8)).collect();
        self.post(OP, kind, TAG_ALL_GATHER_LEN, &headers, &headers)?;
        let bodies: Vec<(usize, usize)> = self.others().map(|p| (p, data.len())).collect();
        let mut out = self.post(OP, kind, TAG_ALL_GATHER_DATA, &bodies, &bodies)?;
        out.insert(self.rank, data.to_vec());
        Ok(out)
    }

    /// [`Transport::all_gather`], already complete.
    fn start_all_gather(&self, kind: CommKind, data: &[u8]) -> Result<Pending, CommError> {
        Ok(Pending::ready(self.all_gather(kind, data)))
    }

    /// Leaves `data` unchanged (the other ranks contribute zeros).
    fn all_reduce_sum_f32(&self, kind: CommKind, data: &mut [f32]) -> Result<(), CommError> {
        const OP: &str = "all_reduce_sum_f32";
        self.check_abort(OP, self.rank, TAG_ALL_REDUCE)?;
        if self.size == 1 {
            return Ok(());
        }
        let nbytes = std::mem::size_of_val(data);
        if self.rank == 0 {
            let parts: Vec<(usize, usize)> = self.others().map(|p| (p, nbytes)).collect();
            self.post(OP, kind, TAG_ALL_REDUCE, &[], &parts)?;
            self.post(OP, kind, TAG_ALL_REDUCE, &parts, &[])?;
        } else {
            self.post(OP, kind, TAG_ALL_REDUCE, &[(0, nbytes)], &[(0, nbytes)])?;
        }
        Ok(())
    }

    /// Leaves `data` unchanged when `root` is this rank; otherwise replaces it with zeros of
    /// the same length (the root's data is unknown, its length assumed to be this rank's).
    fn broadcast(&self, kind: CommKind, root: usize, data: &mut Vec<u8>) -> Result<(), CommError> {
        const OP: &str = "broadcast";
        self.check_abort(OP, root, TAG_BROADCAST)?;
        if root >= self.size {
            return Err(CommError::InvalidRank {
                op: OP,
                peer: root,
                tag: TAG_BROADCAST,
                size: self.size,
            });
        }
        if self.size == 1 {
            return Ok(());
        }
        if root == self.rank {
            let sends: Vec<(usize, usize)> = self
                .others()
                .flat_map(|p| [(p, 8), (p, data.len())])
                .collect();
            self.post(OP, kind, TAG_BROADCAST, &sends, &[])?;
        } else {
            self.post(OP, kind, TAG_BROADCAST, &[], &[(root, 8)])?;
            self.post(OP, kind, TAG_BROADCAST, &[], &[(root, data.len())])?;
            data.fill(0);
        }
        Ok(())
    }

    /// Returns at once (after the empty messages of a dissemination barrier are counted).
    fn barrier(&self) -> Result<(), CommError> {
        const OP: &str = "barrier";
        self.check_abort(OP, self.rank, TAG_BARRIER)?;
        let (n, me) = (self.size, self.rank);
        let mut k = 1;
        while k < n {
            let to = (me + k) % n;
            let from = (me + n - k) % n;
            self.post(OP, CommKind::Control, TAG_BARRIER, &[(to, 0)], &[(from, 0)])?;
            k *= 2;
        }
        Ok(())
    }

    /// Makes every later operation of this transport fail with [`CommError::Aborted`] (there
    /// is no other rank to tell).
    fn abort(&self, reason: &str) {
        let mut guard = self.abort.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            *guard = Some(reason.to_string());
        }
    }

    fn stats(&self) -> CommStats {
        self.stats.snapshot()
    }

    fn reset_stats(&self) {
        self.stats.reset();
    }

    fn device_p2p(&self) -> Option<&dyn DeviceP2p> {
        Some(self)
    }
}

impl DeviceP2p for SoloTransport {
    fn device_ordinal(&self) -> usize {
        self.ordinal.load(Ordering::Relaxed)
    }

    /// Validates and counts the messages like the NCCL back-end, but enqueues nothing: no
    /// device memory is read or written and `stream` is not used (any value is accepted).
    ///
    /// # Safety
    ///
    /// Nothing is dereferenced, so no requirement beyond [`DeviceP2p::enqueue`]'s applies; it
    /// is `unsafe` only because the trait method is.
    unsafe fn enqueue(
        &self,
        kind: CommKind,
        sends: &[DeviceMsg],
        recvs: &[DeviceMsg],
        _stream: *mut std::ffi::c_void,
    ) -> Result<(), CommError> {
        const OP: &str = "enqueue";
        let first_peer = sends
            .first()
            .or_else(|| recvs.first())
            .map_or(self.rank, |m| m.peer);
        self.check_abort(OP, first_peer, 0)?;
        check_device_msgs(OP, self.size, sends, recvs)?;
        count_device_msgs(&self.stats, kind, sends, recvs);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::KindStats;

    fn solo(rank: usize, size: usize) -> Arc<SoloTransport> {
        SoloTransport::new(rank, size, TransportOptions::default()).unwrap()
    }

    fn msg(peer: usize, ptr: u64, len: usize) -> DeviceMsg {
        DeviceMsg { peer, ptr, len }
    }

    #[test]
    fn new_rejects_bad_rank_and_empty_world() {
        for (rank, size) in [(0, 0), (3, 3), (7, 2)] {
            let e = SoloTransport::new(rank, size, TransportOptions::default()).unwrap_err();
            assert!(
                matches!(e, CommError::Setup { rank: r, .. } if r == rank),
                "{e}"
            );
        }
        let t = solo(2, 3);
        assert_eq!((t.rank(), t.size()), (2, 3));
    }

    #[test]
    fn exchange_returns_zero_filled_receives_of_the_posted_lengths() {
        let t = solo(1, 4);
        let got = t
            .exchange(
                CommKind::Halo,
                5,
                vec![(0, vec![9; 10]), (2, vec![7; 3])],
                vec![(0, 12), (2, 0), (3, 5), (1, 4)],
            )
            .unwrap();
        assert!(got.is_complete());
        let got = got.wait().unwrap();
        assert_eq!(got, vec![vec![0; 12], vec![], vec![0; 5], vec![0; 4]]);
        let none = t
            .exchange(CommKind::Other, 6, Vec::new(), Vec::new())
            .unwrap()
            .wait()
            .unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn exchange_counts_bytes_and_messages_per_kind() {
        let t = solo(0, 2);
        t.exchange(
            CommKind::Halo,
            1,
            vec![(1, vec![1; 1000]), (1, vec![2; 17])],
            vec![(1, 1001), (1, 17)],
        )
        .unwrap()
        .wait()
        .unwrap();
        t.exchange(CommKind::Attention, 2, vec![(1, Vec::new())], vec![(1, 0)])
            .unwrap()
            .wait()
            .unwrap();
        let s = t.stats();
        let halo = KindStats {
            bytes_sent: 1017,
            bytes_recvd: 1018,
            msgs_sent: 2,
            msgs_recvd: 2,
        };
        let attn = KindStats {
            bytes_sent: 0,
            bytes_recvd: 0,
            msgs_sent: 1,
            msgs_recvd: 1,
        };
        assert_eq!(s.get(CommKind::Halo), halo);
        assert_eq!(s.get(CommKind::Attention), attn);
        for k in [
            CommKind::GroupNorm,
            CommKind::Gather,
            CommKind::Control,
            CommKind::Other,
        ] {
            assert_eq!(s.get(k), KindStats::default(), "{}", k.name());
        }
        t.reset_stats();
        assert_eq!(t.stats(), CommStats::default());
    }

    #[test]
    fn exchange_rejects_out_of_range_peers_without_counting() {
        let t = solo(1, 3);
        let e = t
            .exchange(
                CommKind::Halo,
                8,
                vec![(0, vec![1; 4]), (3, vec![1])],
                vec![],
            )
            .unwrap_err();
        assert_eq!(
            e,
            CommError::InvalidRank {
                op: "exchange",
                peer: 3,
                tag: 8,
                size: 3
            }
        );
        let e = t
            .exchange(CommKind::Halo, 9, vec![], vec![(0, 4), (usize::MAX, 1)])
            .unwrap_err();
        assert!(
            matches!(
                e,
                CommError::InvalidRank {
                    peer: usize::MAX,
                    tag: 9,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(t.stats(), CommStats::default());
    }

    #[test]
    fn device_enqueue_counts_and_moves_nothing() {
        let t = solo(0, 2).with_device(3);
        let p2p = t.device_p2p().expect("solo transport offers device p2p");
        assert_eq!(p2p.device_ordinal(), 3);
        let mut buf = [0xABu8; 8];
        let ptr = buf.as_mut_ptr() as u64;
        // SAFETY: the solo back-end dereferences neither the pointers nor the stream.
        unsafe {
            p2p.enqueue(
                CommKind::Attention,
                &[msg(1, ptr, 8), msg(0, ptr, 3), msg(1, 0, 0)],
                &[msg(1, ptr, 8), msg(0, ptr, 3)],
                std::ptr::null_mut(),
            )
        }
        .unwrap();
        assert_eq!(buf, [0xAB; 8]);
        let s = t.stats().get(CommKind::Attention);
        assert_eq!(
            s,
            KindStats {
                bytes_sent: 11,
                bytes_recvd: 11,
                msgs_sent: 3,
                msgs_recvd: 2
            }
        );
        assert_eq!(t.stats().total(), s);
        // SAFETY: as above.
        unsafe { p2p.enqueue(CommKind::Halo, &[], &[], std::ptr::null_mut()) }.unwrap();
        assert_eq!(t.stats().get(CommKind::Halo), KindStats::default());
        assert_eq!(solo(0, 1).device_p2p().unwrap().device_ordinal(), 0);
    }

    #[test]
    fn device_enqueue_rejects_bad_peers_and_null_pointers_without_counting() {
        let t = solo(1, 2);
        let p2p = t.device_p2p().unwrap();
        // SAFETY: the solo back-end dereferences neither the pointers nor the stream.
        let bad_send = unsafe {
            p2p.enqueue(
                CommKind::Halo,
                &[msg(0, 64, 4), msg(2, 64, 4)],
                &[],
                std::ptr::null_mut(),
            )
        };
        assert_eq!(
            bad_send,
            Err(CommError::InvalidRank {
                op: "enqueue",
                peer: 2,
                tag: 0,
                size: 2
            })
        );
        // SAFETY: as above.
        let bad_recv =
            unsafe { p2p.enqueue(CommKind::Halo, &[], &[msg(5, 64, 4)], std::ptr::null_mut()) };
        assert!(matches!(
            bad_recv,
            Err(CommError::InvalidRank { peer: 5, .. })
        ));
        // SAFETY: as above.
        let null =
            unsafe { p2p.enqueue(CommKind::Halo, &[msg(0, 0, 4)], &[], std::ptr::null_mut()) };
        assert!(
            matches!(
                null,
                Err(CommError::Protocol {
                    op: "enqueue",
                    peer: 0,
                    ..
                })
            ),
            "{null:?}"
        );
        assert_eq!(t.stats(), CommStats::default());
    }

    #[test]
    fn collectives_fill_in_zeros_for_the_missing_ranks() {
        let t = solo(1, 3);
        let all = t.all_gather(CommKind::Gather, &[5, 6, 7]).unwrap();
        assert_eq!(all, vec![vec![0; 3], vec![5, 6, 7], vec![0; 3]]);
        let all = t
            .start_all_gather(CommKind::Gather, &[1])
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(all, vec![vec![0], vec![1], vec![0]]);
        let g = t.stats().get(CommKind::Gather);
        assert_eq!(
            (g.bytes_sent, g.bytes_recvd),
            (2 * (8 + 3) + 2 * (8 + 1), 2 * (8 + 3) + 2 * (8 + 1))
        );
        assert_eq!((g.msgs_sent, g.msgs_recvd), (8, 8));

        let mut v = vec![1.5f32, -0.0, 3.0];
        t.all_reduce_sum_f32(CommKind::GroupNorm, &mut v).unwrap();
        assert_eq!(
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            [1.5f32, -0.0, 3.0].map(f32::to_bits)
        );
        assert_eq!(t.stats().bytes(CommKind::GroupNorm), (12, 12));

        let mut d = vec![4u8; 6];
        t.broadcast(CommKind::Control, 1, &mut d).unwrap();
        assert_eq!(d, vec![4; 6]);
        t.broadcast(CommKind::Control, 0, &mut d).unwrap();
        assert_eq!(d, vec![0; 6]);
        let e = t.broadcast(CommKind::Control, 3, &mut d).unwrap_err();
        assert!(
            matches!(
                e,
                CommError::InvalidRank {
                    op: "broadcast",
                    peer: 3,
                    ..
                }
            ),
            "{e}"
        );
        t.barrier().unwrap();

        let one = solo(0, 1);
        assert_eq!(
            one.all_gather(CommKind::Gather, &[9]).unwrap(),
            vec![vec![9]]
        );
        let mut v = vec![2.0f32];
        one.all_reduce_sum_f32(CommKind::GroupNorm, &mut v).unwrap();
        assert_eq!(v, vec![2.0]);
        one.barrier().unwrap();
        assert_eq!(one.stats(), CommStats::default());
    }

    #[test]
    fn split_fails_with_a_setup_error() {
        let t = solo(0, 2);
        let e = t.split(0, 0).err().expect("split must fail");
        match e {
            CommError::Setup { op, rank, detail } => {
                assert_eq!((op, rank), ("split", 0));
                assert!(detail.contains("SoloTransport::new"), "{detail}");
            }
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn abort_makes_later_operations_fail() {
        let t = solo(1, 2);
        t.abort("stop here");
        t.abort("second reason is ignored");
        let e = t
            .exchange(CommKind::Halo, 4, vec![(0, vec![1])], vec![(0, 1)])
            .unwrap_err();
        assert_eq!(
            e,
            CommError::Aborted {
                op: "exchange",
                peer: 0,
                tag: 4,
                by_rank: 1,
                reason: "stop here".into()
            }
        );
        assert!(matches!(
            t.barrier(),
            Err(CommError::Aborted { op: "barrier", .. })
        ));
        assert!(matches!(
            t.all_gather(CommKind::Gather, &[1]),
            Err(CommError::Aborted { .. })
        ));
        let mut v = vec![1.0f32];
        assert!(t.all_reduce_sum_f32(CommKind::GroupNorm, &mut v).is_err());
        let mut d = vec![1u8];
        assert!(t.broadcast(CommKind::Control, 0, &mut d).is_err());
        assert!(matches!(t.split(0, 0), Err(CommError::Aborted { .. })));
        // SAFETY: the solo back-end dereferences neither the pointers nor the stream.
        let r = unsafe {
            t.device_p2p().unwrap().enqueue(
                CommKind::Halo,
                &[msg(0, 64, 1)],
                &[],
                std::ptr::null_mut(),
            )
        };
        assert!(matches!(
            r,
            Err(CommError::Aborted {
                op: "enqueue",
                peer: 0,
                ..
            })
        ));
        assert_eq!(t.stats(), CommStats::default());
    }
}
