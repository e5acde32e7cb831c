//! Device exchanges of [`UcxTransport`] ([`DeviceP2p`], PCPP §7.4's communication-stream traffic
//! over UCX): the [`Wire`] of the engine in [`crate::device`] on tagged messages of a reserved
//! tag, with `UCS_MEMORY_TYPE_CUDA` on the CUDA-aware path, which a UCX with the `cuda_copy` /
//! `cuda_ipc` transports takes when its context lists the CUDA memory type.

use std::ffi::c_void;
use std::sync::Arc;

use super::checked::{Posted, Request};
use super::{ffi, make_tag, UcxTransport, World};
use crate::device::engine::{describe_reqs, DeviceEngine, Wire, WireMsg};
use crate::device::{DeviceComm, DevicePath};
use crate::error::CommError;
use crate::stats::CommKind;
use crate::transport::{
    check_device_msgs, count_device_msgs, DeviceMsg, DeviceP2p, TransportOptions, RESERVED_TAG_BASE,
};

const OP: &str = "device exchange";
/// Layer tag of device traffic (above the collectives' tags, never used by layers).
const DEVICE_TAG: u32 = RESERVED_TAG_BASE + 0xD0;

/// A send or receive of the device engine.
pub(crate) struct UcxReq {
    req: Request,
    peer: usize,
    /// Expected length and UCX's receive info, for a receive.
    recv: Option<(usize, Box<ffi::ucp_tag_recv_info_t>)>,
}

/// Tagged point-to-point of one group (`ctx`) of the world.
pub(crate) struct UcxWire {
    world: Arc<World>,
    ctx: u16,
    rank: usize,
    members: Vec<usize>,
}

fn backend(peer: usize, what: &str, s: impl std::fmt::Display) -> CommError {
    CommError::Backend {
        op: OP,
        peer,
        tag: DEVICE_TAG,
        detail: format!("{what}: {s}"),
    }
}

impl Wire for UcxWire {
    type Req = UcxReq;

    unsafe fn post(
        &self,
        sends: &[WireMsg],
        recvs: &[WireMsg],
        device: bool,
        reqs: &mut Vec<UcxReq>,
    ) -> Result<(), CommError> {
        if let Some(e) = self.world.aborted_err(OP, self.rank, DEVICE_TAG) {
            return Err(e);
        }
        let st = self.world.lock();
        let stag = make_tag(self.ctx, self.rank, DEVICE_TAG);
        for m in sends {
            let ep = &st.eps[self.members[m.peer]];
            // SAFETY: the address holds `len` bytes until the request completes (the caller's
            // promise); on the device path it is memory of the bound CUDA context.
            let posted = unsafe {
                st.worker
                    .tag_send_mem(ep, m.ptr as *const u8, m.len, stag, device)
            }
            .map_err(|s| backend(m.peer, "ucp_tag_send_nbx", s))?;
            if let Posted::InFlight(req) = posted {
                reqs.push(UcxReq {
                    req,
                    peer: m.peer,
                    recv: None,
                });
            }
        }
        for m in recvs {
            let mut info = Box::<ffi::ucp_tag_recv_info_t>::default();
            let rtag = make_tag(self.ctx, m.peer, DEVICE_TAG);
            // SAFETY: as above; `info` is boxed and kept with the request.
            let posted = unsafe {
                st.worker
                    .tag_recv_mem(m.ptr as *mut u8, m.len, rtag, u64::MAX, &mut *info, device)
            }
            .map_err(|s| backend(m.peer, "ucp_tag_recv_nbx", s))?;
            match posted {
                Posted::InFlight(req) => reqs.push(UcxReq {
                    req,
                    peer: m.peer,
                    recv: Some((m.len, info)),
                }),
                Posted::Done if info.length != m.len => {
                    return Err(CommError::LengthMismatch {
                        op: OP,
                        peer: m.peer,
                        tag: DEVICE_TAG,
                        expected: m.len,
                        actual: info.length,
                    })
                }
                Posted::Done => {}
            }
        }
        Ok(())
    }

    fn test(&self, reqs: &mut Vec<UcxReq>) -> Result<bool, CommError> {
        let mut st = self.world.lock();
        self.world.progress(&mut st);
        let mut err = None;
        reqs.retain(|r| {
            if err.is_some() {
                return true;
            }
            let done = match &r.recv {
                None => r.req.check().map(|d| d.then_some(0)),
                Some(_) => r.req.check_recv(),
            };
            match done {
                Ok(None) => {
                    if let Some(s) = self.world.peer_failed(self.members[r.peer]) {
                        err = Some(backend(r.peer, "peer failed", s));
                    }
                    true
                }
                Ok(Some(len)) => {
                    if let Some((expected, _)) = &r.recv {
                        if len != *expected {
                            err = Some(CommError::LengthMismatch {
                                op: OP,
                                peer: r.peer,
                                tag: DEVICE_TAG,
                                expected: *expected,
                                actual: len,
                            });
                        }
                    }
                    false
                }
                Err(s) if s.is_truncated() => {
                    err = Some(CommError::Truncated {
                        op: OP,
                        peer: r.peer,
                        tag: DEVICE_TAG,
                        expected: r.recv.as_ref().map_or(0, |x| x.0),
                    });
                    false
                }
                Err(s) => {
                    err = Some(backend(r.peer, "request", s));
                    false
                }
            }
        });
        drop(st);
        if let Some(e) = self.world.aborted_err(OP, self.rank, DEVICE_TAG) {
            return Err(e);
        }
        match err {
            Some(e) => Err(e),
            None => Ok(reqs.is_empty()),
        }
    }

    fn describe(&self, reqs: &[UcxReq]) -> String {
        describe_reqs(reqs.iter().map(|r| (r.peer, r.recv.as_ref().map(|x| x.0))))
    }
}

/// UCX's CUDA transports, left out of the context when no device memory reaches UCX.
const WITHOUT_CUDA_TLS: &str = "^cuda_copy,cuda_ipc,gdr_copy";

/// The transport list of the UCX context (`None`: `UCX_TLS` or UCX's default). Only the
/// CUDA-aware path hands UCX device memory; every other path gives it host memory, so UCX's CUDA
/// transports are left out of the context unless the user chose the transports with `UCX_TLS`.
/// With them loaded, UCX's progress calls the CUDA driver from the communication thread, and on an
/// H200 (UCX 1.22, 4 ranks on one GPU) a staged `generate` then stalled inside UCX's progress
/// call; without them it is bitwise equal to the local transport (docs/clusters.md).
pub(super) fn context_tls(opts: &TransportOptions) -> Option<&'static str> {
    let user_tls = std::env::var_os("UCX_TLS").is_some_and(|v| !v.is_empty());
    (opts.device_comm != DeviceComm::CudaAware && !user_tls).then_some(WITHOUT_CUDA_TLS)
}

/// The device engine `opts` ask for on the group `ctx` of `world` (`members`: world rank of each
/// group rank), or `None` for the host path. With `log`, rank 0 prints the choice.
pub(super) fn engine_for(
    world: &Arc<World>,
    ctx: u16,
    rank: usize,
    members: &[usize],
    opts: &TransportOptions,
    log: bool,
) -> Option<Arc<DeviceEngine<UcxWire>>> {
    let cuda = world.cuda_memory;
    let how = if context_tls(opts).is_some() {
        "UCX's CUDA transports left out: the staged path gives UCX host memory"
    } else if cuda {
        "UCX lists the CUDA memory type"
    } else {
        "UCX does not list the CUDA memory type (no cuda_copy / cuda_ipc transports)"
    };
    // `auto` takes the staged path even where UCX moves device memory: on the one machine tested
    // (UCX 1.22, ranks sharing one GPU) the CUDA-aware path failed (docs/clusters.md); it stays
    // available when forced.
    let path = match opts.device_comm {
        DeviceComm::Auto => Some(DevicePath::Staged),
        other => other.resolve(cuda),
    }?;
    let ops = crate::device::stream_ops(opts.device_streams)?;
    if log && rank == 0 {
        let warn = if path == DevicePath::CudaAware
            && !cuda
            && opts.device_streams == crate::DeviceStreams::Cuda
        {
            " — forced, but device pointers will fail without UCX's CUDA transports"
        } else {
            ""
        };
        eprintln!(
            "pcpp-comm: ucx device exchanges: {path} ({how}; --device-comm {}; {}){warn}",
            opts.device_comm,
            crate::device::DeviceWait::log_note()
        );
    }
    Some(Arc::new(DeviceEngine::new(
        UcxWire {
            world: world.clone(),
            ctx,
            rank,
            members: members.to_vec(),
        },
        path,
        ops,
        opts.timeout,
        rank,
        if ctx == 0 {
            format!("ucx rank {rank}")
        } else {
            format!("ucx rank {} (rank {rank} of a group)", world.world_rank)
        },
    )))
}

impl UcxTransport {
    /// The path of this transport's device exchanges; `None` without any (`--device-comm host`,
    /// or CUDA streams in a build without the `cuda` feature).
    pub fn device_path(&self) -> Option<DevicePath> {
        self.device.as_ref().map(|d| d.path())
    }

    /// Whether the loaded UCX moves CUDA memory (its context lists `UCS_MEMORY_TYPE_CUDA`).
    pub fn supports_cuda_memory(&self) -> bool {
        self.world.cuda_memory
    }
}

impl DeviceP2p for UcxTransport {
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
        check_device_msgs("enqueue", self.members.len(), sends, recvs)?;
        let dev = self.device.as_ref().ok_or_else(|| CommError::Backend {
            op: "enqueue",
            peer: self.rank,
            tag: 0,
            detail: "this UCX transport has no device exchanges (--device-comm host)".into(),
        })?;
        // SAFETY: the caller upholds `DeviceP2p::enqueue`'s contract.
        unsafe { dev.enqueue(sends, recvs, stream) }?;
        count_device_msgs(&self.stats, kind, sends, recvs);
        Ok(())
    }
}
