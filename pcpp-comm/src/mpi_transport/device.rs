//! Device exchanges of [`MpiTransport`] ([`DeviceP2p`], PCPP §7.4's communication-stream traffic
//! over MPI): the [`Wire`] of the engine in [`crate::device`] on a duplicate of the transport's
//! communicator (so device traffic never matches [`crate::Transport::exchange`]'s), and the
//! start-up choice of its path from `MPIX_Query_cuda_support` (Open MPI) or
//! `MPIX_GPU_query_support` (MPICH), looked up at run time because not every MPI has them.

use std::ffi::{c_char, c_int, c_void};
use std::mem::MaybeUninit;
use std::sync::Arc;

use mpi::ffi;

use super::{check, error_class, error_string, mpi_lock, to_c_int, u8_type, Comm, MpiTransport};
use crate::device::engine::{describe_reqs, DeviceEngine, Wire, WireMsg};
use crate::device::{DevicePath, DeviceStreams};
use crate::error::CommError;
use crate::stats::CommKind;
use crate::transport::{
    check_device_msgs, count_device_msgs, DeviceMsg, DeviceP2p, TransportOptions,
};

const OP: &str = "device exchange";

/// A send or receive of the device engine.
pub(crate) struct MpiReq {
    raw: ffi::MPI_Request,
    peer: usize,
    /// Expected length of a receive; `None` for a send.
    recv: Option<usize>,
}

// SAFETY: an `MPI_Request` is an opaque handle usable from any thread; every MPI call on it is
// serialised by MPI_LOCK.
unsafe impl Send for MpiReq {}

/// Point-to-point on the duplicated communicator.
pub(crate) struct MpiWire {
    comm: Comm,
}

impl Wire for MpiWire {
    type Req = MpiReq;

    unsafe fn post(
        &self,
        sends: &[WireMsg],
        recvs: &[WireMsg],
        _device: bool,
        reqs: &mut Vec<MpiReq>,
    ) -> Result<(), CommError> {
        let _g = mpi_lock();
        for (m, is_recv) in sends
            .iter()
            .map(|m| (m, false))
            .chain(recvs.iter().map(|m| (m, true)))
        {
            let len = to_c_int(m.len, OP, m.peer, 0)?;
            let peer = to_c_int(m.peer, OP, m.peer, 0)?;
            // SAFETY: REQUEST_NULL is an immutable handle constant.
            let mut raw = unsafe { ffi::RSMPI_REQUEST_NULL };
            // SAFETY: the address holds `len` bytes until the request completes (the caller's
            // promise); the communicator is live.
            let rc = unsafe {
                if is_recv {
                    ffi::MPI_Irecv(
                        m.ptr as *mut c_void,
                        len,
                        u8_type(),
                        peer,
                        0,
                        self.comm.raw,
                        &mut raw,
                    )
                } else {
                    ffi::MPI_Isend(
                        m.ptr as *const c_void,
                        len,
                        u8_type(),
                        peer,
                        0,
                        self.comm.raw,
                        &mut raw,
                    )
                }
            };
            check(rc, OP, m.peer, 0)?;
            reqs.push(MpiReq {
                raw,
                peer: m.peer,
                recv: is_recv.then_some(m.len),
            });
        }
        Ok(())
    }

    fn test(&self, reqs: &mut Vec<MpiReq>) -> Result<bool, CommError> {
        let _g = mpi_lock();
        let mut err = None;
        reqs.retain_mut(|r| {
            if err.is_some() {
                return true;
            }
            let mut flag: c_int = 0;
            let mut status = MaybeUninit::<ffi::MPI_Status>::zeroed();
            // SAFETY: an active request; valid out-pointers.
            let rc = unsafe { ffi::MPI_Test(&mut r.raw, &mut flag, status.as_mut_ptr()) };
            if rc != ffi::MPI_SUCCESS as c_int {
                err = Some(match r.recv {
                    Some(expected) if error_class(rc) == ffi::MPI_ERR_TRUNCATE as c_int => {
                        CommError::Truncated {
                            op: OP,
                            peer: r.peer,
                            tag: 0,
                            expected,
                        }
                    }
                    _ => CommError::Backend {
                        op: OP,
                        peer: r.peer,
                        tag: 0,
                        detail: error_string(rc),
                    },
                });
                return false;
            }
            if flag == 0 {
                return true;
            }
            if let Some(expected) = r.recv {
                let mut count: c_int = 0;
                // SAFETY: `status` was filled by the completed MPI_Test.
                let rc = unsafe { ffi::MPI_Get_count(status.as_ptr(), u8_type(), &mut count) };
                let actual = usize::try_from(count).unwrap_or(usize::MAX);
                if rc != ffi::MPI_SUCCESS as c_int || actual != expected {
                    err = Some(CommError::LengthMismatch {
                        op: OP,
                        peer: r.peer,
                        tag: 0,
                        expected,
                        actual,
                    });
                }
            }
            false
        });
        match err {
            Some(e) => Err(e),
            None => Ok(reqs.is_empty()),
        }
    }

    fn describe(&self, reqs: &[MpiReq]) -> String {
        describe_reqs(reqs.iter().map(|r| (r.peer, r.recv)))
    }
}

/// Whether the loaded MPI says it moves CUDA memory, and how it said so.
pub fn mpi_cuda_support() -> (bool, String) {
    extern "C" {
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }
    // SAFETY: RTLD_DEFAULT (null) searches the loaded objects; the names are NUL-terminated.
    let ompi = unsafe { dlsym(std::ptr::null_mut(), c"MPIX_Query_cuda_support".as_ptr()) };
    if !ompi.is_null() {
        // SAFETY: Open MPI's `int MPIX_Query_cuda_support(void)`, callable after MPI_Init.
        let f: unsafe extern "C" fn() -> c_int = unsafe { std::mem::transmute(ompi) };
        let v = unsafe { f() };
        return (v == 1, format!("MPIX_Query_cuda_support() = {v}"));
    }
    // SAFETY: as above.
    let mpich = unsafe { dlsym(std::ptr::null_mut(), c"MPIX_GPU_query_support".as_ptr()) };
    if !mpich.is_null() {
        // SAFETY: MPICH's `int MPIX_GPU_query_support(int gpu_type, int *is_supported)`, with
        // MPIX_GPU_SUPPORT_CUDA = 0.
        let f: unsafe extern "C" fn(c_int, *mut c_int) -> c_int =
            unsafe { std::mem::transmute(mpich) };
        let mut v: c_int = 0;
        let rc = unsafe { f(0, &mut v) };
        return (
            rc == 0 && v == 1,
            format!("MPIX_GPU_query_support(CUDA) = {v}"),
        );
    }
    (false, "no MPIX CUDA query in this MPI".into())
}

/// Collective over `comm`'s ranks: the device engine `opts` ask for (a duplicate of `comm`, the
/// path resolved against this MPI's CUDA support), or `None` for the host path. With `log`, rank 0
/// prints the choice.
pub(crate) fn engine_for(
    comm: ffi::MPI_Comm,
    rank: usize,
    opts: &TransportOptions,
    log: bool,
) -> Result<Option<Arc<DeviceEngine<MpiWire>>>, CommError> {
    let (cuda, how) = mpi_cuda_support();
    let Some(path) = opts.device_comm.resolve(cuda) else {
        return Ok(None);
    };
    let Some(ops) = crate::device::stream_ops(opts.device_streams) else {
        return Ok(None);
    };
    let raw = {
        let _g = mpi_lock();
        // SAFETY: COMM_NULL is an immutable handle constant.
        let mut dup = unsafe { ffi::RSMPI_COMM_NULL };
        // SAFETY: collective over a live communicator; valid out-pointer.
        check(
            unsafe { ffi::MPI_Comm_dup(comm, &mut dup) },
            "device comm",
            rank,
            0,
        )?;
        dup
    };
    if log && rank == 0 {
        let warn =
            if path == DevicePath::CudaAware && !cuda && opts.device_streams == DeviceStreams::Cuda
            {
                " — forced, but this MPI does not report CUDA support: device pointers may crash it"
            } else {
                ""
            };
        eprintln!(
            "pcpp-comm: mpi device exchanges: {path} ({how}; --device-comm {}; {}){warn}",
            opts.device_comm,
            crate::device::DeviceWait::log_note()
        );
    }
    Ok(Some(Arc::new(DeviceEngine::new(
        MpiWire {
            comm: Comm { raw, owned: true },
        },
        path,
        ops,
        opts.timeout,
        rank,
        format!("mpi rank {rank}"),
    ))))
}

impl MpiTransport {
    /// The path of this transport's device exchanges; `None` without any (`--device-comm host`,
    /// or CUDA streams in a build without the `cuda` feature).
    pub fn device_path(&self) -> Option<DevicePath> {
        self.device.as_ref().map(|d| d.path())
    }
}

impl DeviceP2p for MpiTransport {
    fn device_ordinal(&self) -> usize {
        self.device.as_ref().map_or(0, |d| d.ordinal())
    }

    fn data_path(&self) -> &'static str {
        self.device.as_ref().map_or("host", |d| d.path().name())
    }

    unsafe fn enqueue(
        &self,
        kind: CommKind,
        sends: &[DeviceMsg],
        recvs: &[DeviceMsg],
        stream: *mut c_void,
    ) -> Result<(), CommError> {
        check_device_msgs("enqueue", self.size, sends, recvs)?;
        let dev = self.device.as_ref().ok_or_else(|| CommError::Backend {
            op: "enqueue",
            peer: self.rank,
            tag: 0,
            detail: "this MPI transport has no device exchanges (--device-comm host)".into(),
        })?;
        // SAFETY: the caller upholds `DeviceP2p::enqueue`'s contract.
        unsafe { dev.enqueue(sends, recvs, stream) }?;
        count_device_msgs(&self.stats, kind, sends, recvs);
        Ok(())
    }
}
