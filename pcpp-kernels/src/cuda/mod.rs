//! The CUDA back-end (feature `cuda`): device start-up, device storage and the kernel module.
//!
//! Every CUDA op is the twin of the CPU op of the same name (the specification) and is checked
//! against it by the parity tests. GEMMs go through cuBLAS / cuBLASLt (f32 accumulation), convolutions
//! through cuDNN, everything else through the CUDA C kernels of `kernels.cu`, compiled with NVRTC
//! for the GPU's architecture on first use and cached per architecture for the process. Libraries
//! are loaded dynamically: a build with this feature runs on machines without CUDA until a CUDA
//! device is asked for, and then [`gpu`] answers with an error instead of a panic.
//!
//! All compute work of one device runs on one stream, in order; host reads synchronise that
//! stream. A second stream per device, the comm stream ([`Gpu::comm_stream`]), carries
//! communication (NCCL) so that it can overlap compute; [`Gpu::fork_to_comm`] and
//! [`Gpu::join_comm`] order the two streams, also inside a captured CUDA graph.

mod compile;
mod graph_nodes;
mod names;
mod ops;
pub mod profile;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::{DType, Device, KernelError, Result, Tensor};
use cudarc::cublas::CudaBlas;
use cudarc::cudnn::Cudnn;
use cudarc::driver::{
    sys as drv_sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr,
    LaunchConfig,
};

use compile::{arch_name, forget_cached_images, images_for};
pub use compile::{compile_kernel_images, compile_kernels, CHECKED_ARCHS, KERNEL_SOURCE, PARTS};
pub use graph_nodes::{short_name, MEMCPY_KIND, MEMSET_KIND};
pub use names::kernel_names;
pub(crate) use ops::vector::{add_gated, modulated_layer_norm, rotate_pairs};
pub use ops::vector::{
    geglu_prefetch, norm_registers, set_geglu_prefetch, set_norm_registers, set_vector_kernels,
    vector_kernels,
};
pub(crate) use ops::*;
pub use ops::{
    autotune, capture_graph, conv2d_in_bands, conv_nhwc, copy_into, copy_rows_into, flash128,
    flash_persistent, fused_epilogues, group_norm_merged_into, group_norm_merged_into_nhwc,
    group_norm_merged_nhwc, linear_rows_into, lt_reduction, nchw_rows_into_nhwc,
    norm_linear_rows_into, programmatic_launch, set_autotune, set_autotune_report, set_conv_nhwc,
    set_flash128, set_flash_persistent, set_fused_epilogues, set_lt_reduction,
    set_programmatic_launch, set_small_gemm, set_small_gemm_rows, set_small_gemm_splits,
    set_small_split, small_gemm, small_gemm_rows, small_gemm_splits, small_grid, small_split,
    CudaGraphStep, Flash128, LtReduction, SmallGemm, StatsWindow, SMALL_GEMM_ROWS, SMALL_GRID_KEYS,
    SMALL_SPLIT_DEFAULT,
};

fn cuda_err(device: usize, what: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Device {
        device: format!("cuda:{device}"),
        msg: format!("{what}: {e:?}"),
    }
}

/// cuBLASLt handle and workspace.
struct Lt {
    handle: cudarc::cublaslt::sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

/// One CUDA device: context, compute and comm streams, library handles and the loaded kernels.
pub struct Gpu {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// The communication stream (NCCL), ordered against `stream` by the events below.
    comm: Arc<CudaStream>,
    /// Recorded on the compute stream and waited on by the comm stream ([`Gpu::fork_to_comm`]).
    fork_event: CudaEvent,
    /// Recorded on the comm stream and waited on by the compute stream ([`Gpu::join_comm`]).
    join_event: CudaEvent,
    /// Keeps each record + wait pair of the fork/join events together across threads.
    event_lock: Mutex<()>,
    arch: &'static str,
    funcs: HashMap<String, CudaFunction>,
    blas: CudaBlas,
    /// cuBLAS's workspace (set on `blas`; kept alive here).
    _blas_workspace: CudaSlice<u8>,
    lt: Lt,
    cudnn: Arc<Cudnn>,
    /// Serialises library calls (cuDNN and cuBLASLt handles are not thread-safe).
    lock: Mutex<()>,
    conv_algos:
        Mutex<HashMap<ops::ConvKey, (cudarc::cudnn::sys::cudnnConvolutionFwdAlgo_t, usize)>>,
    lt_algos: Mutex<HashMap<ops::LtKey, cudarc::cublaslt::sys::cublasLtMatmulAlgo_t>>,
    /// NHWC copies of convolution filters, by the storage of the NCHW weight (see
    /// `ops/conv.rs`): a weak handle on it, its shape and the copy.
    #[allow(clippy::type_complexity)]
    conv_filters:
        Mutex<HashMap<usize, (std::sync::Weak<crate::tensor::Storage>, Vec<usize>, Tensor)>>,
    /// Whether f32 convolutions and GEMMs may use TF32 tensor cores ([`Gpu::set_tf32`]).
    tf32: std::sync::atomic::AtomicBool,
    /// Whether the Q-in-shared-memory flash kernels got their shared memory
    /// ([`ops::Flash128::SharedQ`], [`ops::Flash128::SharedQ64`]); without it they are not used.
    flash_shared_q: bool,
    flash_shared_q64: bool,
    /// Whether the Hopper attention kernels ([`ops::Flash128::Hopper`]) can run here: an sm_90a
    /// device that gave them their shared memory.
    flash_hopper: bool,
    /// Whether the warp-specialised Hopper kernels ([`ops::Flash128::Warpspec`]) can run here:
    /// the same conditions for `flash_ws.cu`.
    flash_ws: bool,
    /// Whether its three-warpgroup head-size-64 kernels ([`ops::Flash128::Warpspec3`]) got their
    /// shared memory.
    flash_ws3: bool,
    /// The most key-split groups of the small-grid attention kernel that got their shared
    /// memory (1, 2 or 4; see `ops::small_split_groups`).
    small_split: usize,
    /// Whether the small-row GEMMs on warpgroup MMAs (`gemm_wg.cu`) can run here: an sm_90a
    /// device with cluster launch that gave them their shared memory.
    gemm_wg: bool,
    /// Streaming multiprocessors of the device.
    sms: usize,
    /// Whether the device has programmatic dependent launch (sm_90 and later; see
    /// `ops::launch_ex`).
    programmatic: bool,
}

// SAFETY: every handle is used under `lock` or through the single stream in issue order; cudarc's
// context binds itself to the calling thread before each driver call.
unsafe impl Send for Gpu {}
// SAFETY: as above; shared access never mutates library handles without holding `lock`.
unsafe impl Sync for Gpu {}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `Gpu::open` and is destroyed once here.
        let _ = unsafe { cudarc::cublaslt::result::destroy_handle(self.lt.handle) };
    }
}

/// Checks that the CUDA libraries this back-end loads are present (cudarc panics otherwise).
fn probe_libraries() -> std::result::Result<(), String> {
    // SAFETY: each call only tries to open a shared library.
    let checks: [(&str, bool); 5] = unsafe {
        [
            (
                "no CUDA driver found (libcuda.so)",
                cudarc::driver::sys::is_culib_present(),
            ),
            (
                "NVRTC not found (libnvrtc.so)",
                cudarc::nvrtc::sys::is_culib_present(),
            ),
            (
                "cuBLAS not found (libcublas.so)",
                cudarc::cublas::sys::is_culib_present(),
            ),
            (
                "cuBLASLt not found (libcublasLt.so)",
                cudarc::cublaslt::sys::is_culib_present(),
            ),
            (
                "cuDNN not found (libcudnn.so)",
                cudarc::cudnn::sys::is_culib_present(),
            ),
        ]
    };
    for (msg, ok) in checks {
        if !ok {
            return Err(msg.to_string());
        }
    }
    Ok(())
}

/// Number of CUDA devices, or an error saying why there are none usable.
pub fn device_count() -> Result<usize> {
    probe_libraries().map_err(|msg| KernelError::Device {
        device: "cuda".into(),
        msg,
    })?;
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| cuda_err(0, "cuDeviceGetCount", e))
}

/// The process-wide handle of CUDA device `ordinal`, opened on first use.
pub fn gpu(ordinal: usize) -> Result<Arc<Gpu>> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    let map = GPUS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().map_err(|_| KernelError::Device {
        device: format!("cuda:{ordinal}"),
        msg: "device table poisoned by an earlier panic".into(),
    })?;
    if let Some(g) = map.get(&ordinal) {
        return Ok(g.clone());
    }
    let g = Arc::new(Gpu::open(ordinal)?);
    map.insert(ordinal, g.clone());
    Ok(g)
}

/// The process-wide handle of a CUDA device (as [`gpu`]); an error for the CPU.
pub fn gpu_of_device(device: Device) -> Result<Arc<Gpu>> {
    match device {
        Device::Cuda(i) => gpu(i),
        Device::Cpu => Err(KernelError::invalid(
            "gpu_of_device",
            "the CPU is not a CUDA device",
        )),
    }
}

impl Gpu {
    fn open(ordinal: usize) -> Result<Gpu> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(KernelError::Device {
                device: format!("cuda:{ordinal}"),
                msg: format!("no such device ({n} CUDA device(s) visible)"),
            });
        }
        let e = |what: &str, err: &dyn std::fmt::Debug| cuda_err(ordinal, what, err);
        let ctx = CudaContext::new(ordinal).map_err(|x| e("creating the context", &x))?;
        // SAFETY: this back-end issues all compute work on one stream, and orders the comm stream
        // against it explicitly (fork_to_comm / join_comm), so cudarc's cross-stream event tracking
        // is not needed.
        unsafe { ctx.disable_event_tracking() };
        // Created streams (not the legacy default stream) so that CUDA graphs can capture them.
        let stream = ctx.new_stream().map_err(|x| e("creating the stream", &x))?;
        let comm = ctx
            .new_stream()
            .map_err(|x| e("creating the comm stream", &x))?;
        let no_timing = Some(drv_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        let fork_event = ctx
            .new_event(no_timing)
            .map_err(|x| e("creating the fork event", &x))?;
        let join_event = ctx
            .new_event(no_timing)
            .map_err(|x| e("creating the join event", &x))?;
        // Keep freed memory in the stream-ordered pool instead of returning it at each sync.
        // SAFETY: plain attribute setting on the device's default pool.
        unsafe {
            use drv_sys as sys;
            let mut pool = std::mem::MaybeUninit::uninit();
            if sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device())
                == sys::CUresult::CUDA_SUCCESS
            {
                let mut thr: u64 = u64::MAX;
                sys::cuMemPoolSetAttribute(
                    pool.assume_init(),
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut thr as *mut u64 as *mut std::ffi::c_void,
                );
            }
        }
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|x| e("compute capability", &x))?;
        let arch = arch_name(major, minor);
        let load = |images: Vec<cudarc::nvrtc::Ptx>| {
            images
                .into_iter()
                .map(|m| ctx.load_module(m))
                .collect::<std::result::Result<Vec<_>, _>>()
        };
        let modules = match load(images_for(arch)?) {
            Ok(m) => m,
            // Cached images the driver refuses (e.g. written by a newer NVRTC): compile afresh.
            Err(_) if forget_cached_images(arch) => {
                load(images_for(arch)?).map_err(|x| e("loading the kernels", &x))?
            }
            Err(x) => return Err(e("loading the kernels", &x)),
        };
        // Each entry point from the one part that emits it.
        let mut funcs = HashMap::new();
        for name in kernel_names() {
            let f = modules
                .iter()
                .find_map(|m| m.load_function(&name).ok())
                .ok_or_else(|| e(&format!("kernel {name}"), &"in none of the compiled parts"))?;
            funcs.insert(name, f);
        }
        // The Q-in-shared-memory flash kernels need more than the default 48 KiB.
        let smem_ok = |names: [&str; 2], bytes: u32| {
            names.iter().filter_map(|n| funcs.get(*n)).all(|f| {
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .is_ok()
            })
        };
        let flash_shared_q = smem_ok(
            ["flash_attn128q_f16", "flash_attn128q_bf16"],
            ops::FLASH_SHARED_Q_BYTES,
        );
        let flash_shared_q64 = smem_ok(
            ["flash_attn128q64_f16", "flash_attn128q64_bf16"],
            ops::FLASH_SHARED_Q64_BYTES,
        );
        // The Hopper attention kernels (plain and warp-specialised, named per head size by
        // `name`): compiled with their warpgroup MMAs only for sm_90a.
        let hopper_ok = |name: &dyn Fn(usize) -> String| {
            arch == "sm_90a"
                && [64, 128].into_iter().all(|dh| {
                    let n = name(dh);
                    smem_ok(
                        [&*format!("{n}_f16"), &*format!("{n}_bf16")],
                        ops::flash_hopper_bytes(dh),
                    )
                })
        };
        let flash_hopper = hopper_ok(&ops::flash_hopper_name);
        // The default schedule, its persistent form (`r`) and the two single-schedule forms.
        let flash_ws = ["", "r", "p", "o"]
            .into_iter()
            .all(|form| hopper_ok(&|dh| ops::flash_ws_name(dh, form)));
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_or(1, |n| n.max(1) as usize);
        let flash_ws3 = arch == "sm_90a"
            && ["3w", "3wo", "3wr"].into_iter().all(|form| {
                let n = ops::flash_ws_name(64, form);
                smem_ok(
                    [&*format!("{n}_f16"), &*format!("{n}_bf16")],
                    ops::flash_ws_bytes(64, 3),
                )
            });
        // The small-grid attention with its key tiles split between 2 or 4 groups of warps: the
        // most groups whose kernel and every smaller split's got their shared memory.
        let small_split = [2usize, 4]
            .into_iter()
            .take_while(|&g| {
                smem_ok(
                    [
                        &*format!("flash_small64s{g}_f16"),
                        &*format!("flash_small64s{g}_bf16"),
                    ],
                    ops::small_split_bytes(g),
                )
            })
            .last()
            .unwrap_or(1);
        // The small-row GEMMs split K across thread-block clusters.
        let clusters = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH)
            .is_ok_and(|v| v != 0);
        let gemm_wg = arch == "sm_90a"
            && clusters
            && [(false, false), (true, false), (false, true), (true, true)]
                .into_iter()
                .all(|(geglu, norm)| {
                    let n = ops::gemm_wg_name(geglu, norm);
                    smem_ok(
                        [&*format!("{n}_f16"), &*format!("{n}_bf16")],
                        ops::gemm_wg_bytes(ops::GEMM_WG_MAX_WARPGROUPS),
                    )
                });
        let blas = CudaBlas::new(stream.clone()).map_err(|x| e("cuBLAS", &x))?;
        // A workspace of cuBLAS's own: without one, cuBLAS picks other (workspace-free) kernels
        // while a CUDA graph is being captured, and a replayed step would round differently from
        // an eager one.
        // SAFETY: scratch memory that only cuBLAS uses, kept alive in `Gpu` with the handle.
        let blas_workspace =
            unsafe { stream.alloc::<u8>(32 << 20) }.map_err(|x| e("cuBLAS workspace", &x))?;
        {
            let (ptr, _sync) = blas_workspace.device_ptr(&stream);
            // SAFETY: the handle is live and the workspace outlives it (both owned by `Gpu`).
            let status = unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut std::ffi::c_void,
                    32 << 20,
                )
            };
            if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(e("cublasSetWorkspace", &status));
            }
        }
        let lt_handle = cudarc::cublaslt::result::create_handle().map_err(|x| e("cuBLASLt", &x))?;
        // SAFETY: uninitialised scratch memory for cuBLASLt.
        let workspace =
            unsafe { stream.alloc::<u8>(32 << 20) }.map_err(|x| e("cuBLASLt workspace", &x))?;
        let cudnn = Cudnn::new(stream.clone()).map_err(|x| e("cuDNN", &x))?;
        Ok(Gpu {
            ordinal,
            ctx,
            stream,
            comm,
            fork_event,
            join_event,
            event_lock: Mutex::new(()),
            arch,
            funcs,
            flash_shared_q,
            flash_shared_q64,
            flash_hopper,
            flash_ws,
            flash_ws3,
            small_split,
            gemm_wg,
            sms,
            programmatic: major >= 9,
            blas,
            _blas_workspace: blas_workspace,
            lt: Lt {
                handle: lt_handle,
                workspace,
            },
            cudnn,
            lock: Mutex::new(()),
            conv_algos: Mutex::new(HashMap::new()),
            lt_algos: Mutex::new(HashMap::new()),
            conv_filters: Mutex::new(HashMap::new()),
            tf32: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The architecture the kernels were compiled for (e.g. `sm_90a`).
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// Whether attention with head sizes 64 and 128 may take the Hopper kernels (warpgroup MMAs)
    /// when [`ops::Flash128::Hopper`] is chosen.
    pub fn has_hopper_attention(&self) -> bool {
        self.flash_hopper
    }

    /// Whether attention with head sizes 64 and 128 may take the warp-specialised Hopper kernels
    /// when [`ops::Flash128::Warpspec`] (or one of its lighter forms) is chosen.
    pub fn has_warpspec_attention(&self) -> bool {
        self.flash_ws
    }

    /// The device's multiprocessors.
    pub fn sms(&self) -> usize {
        self.sms
    }

    /// Whether head size 64 may take the three-warpgroup warp-specialised kernels when
    /// [`ops::Flash128::Warpspec3`] (or its overlap-only form) is chosen.
    pub fn has_warpspec3_attention(&self) -> bool {
        self.flash_ws3
    }

    /// The most key-split groups the small-grid attention kernel can take here (1, 2 or 4).
    pub fn small_split_available(&self) -> usize {
        self.small_split
    }

    /// The device name reported by the driver.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown".into())
    }

    /// The stream all compute work of this device runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The communication stream of this device (for NCCL), created with the compute stream.
    /// Nothing of this crate runs on it; order work on it with [`Gpu::fork_to_comm`] and
    /// [`Gpu::join_comm`].
    pub fn comm_stream(&self) -> &Arc<CudaStream> {
        &self.comm
    }

    /// The raw `CUstream` of [`Gpu::comm_stream`] (what NCCL calls take as `cudaStream_t`); valid
    /// while this `Gpu` lives (the process-wide handle of [`gpu`] lives as long as the process).
    pub fn comm_stream_raw(&self) -> *mut std::ffi::c_void {
        self.comm.cu_stream() as *mut std::ffi::c_void
    }

    /// Makes everything enqueued so far on the compute stream happen before whatever is enqueued
    /// next on the comm stream (records an event on the compute stream, the comm stream waits on
    /// it). Legal while the compute stream is being captured into a CUDA graph: the comm stream
    /// then joins the capture (the classic fork pattern), and must be joined back with
    /// [`Gpu::join_comm`] before the capture ends.
    ///
    /// One event serves every fork: `cuStreamWaitEvent` waits for the work captured by the event's
    /// most recent record at the time of the wait, so recording it again later does not affect a
    /// wait already enqueued; record and wait are issued together under a lock.
    pub fn fork_to_comm(&self) -> Result<()> {
        self.order(&self.fork_event, (&self.stream, &self.comm), "fork_to_comm")
    }

    /// Makes everything enqueued so far on the comm stream happen before whatever is enqueued next
    /// on the compute stream (the reverse of [`Gpu::fork_to_comm`], with its own event). Inside a
    /// CUDA-graph capture this joins the comm stream's captured work back into the graph.
    pub fn join_comm(&self) -> Result<()> {
        self.order(&self.join_event, (&self.comm, &self.stream), "join_comm")
    }

    /// Records `event` on `from` and makes `to` wait on it.
    fn order(
        &self,
        event: &CudaEvent,
        (from, to): (&CudaStream, &CudaStream),
        op: &str,
    ) -> Result<()> {
        let _g = self
            .event_lock
            .lock()
            .map_err(|_| self.err(op, "event lock poisoned"))?;
        event
            .record(from)
            .map_err(|e| self.err(&format!("{op}: cuEventRecord"), e))?;
        to.wait(event)
            .map_err(|e| self.err(&format!("{op}: cuStreamWaitEvent"), e))
    }

    /// Waits for all queued work, on the compute and the comm stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| self.err("synchronize", e))?;
        self.comm
            .synchronize()
            .map_err(|e| self.err("synchronize (comm stream)", e))
    }

    /// Waits until everything enqueued so far on both streams has run, polling instead of
    /// blocking in the driver, for at most `timeout`. `Ok(false)` when it timed out (work that
    /// never finishes, e.g. a communication kernel whose peer is gone).
    pub fn wait_idle(&self, timeout: std::time::Duration) -> Result<bool> {
        let start = std::time::Instant::now();
        for (s, name) in [(&self.stream, "compute"), (&self.comm, "comm")] {
            let ev = s
                .record_event(None)
                .map_err(|e| self.err(&format!("wait_idle: event on the {name} stream"), e))?;
            while !ev.is_complete() {
                if start.elapsed() > timeout {
                    return Ok(false);
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }
        Ok(true)
    }

    /// High-water marks of the device's stream-ordered memory pool, where every tensor, workspace
    /// and graph buffer of this back-end is allocated: `(used, reserved)` bytes, the counterparts
    /// of PyTorch's `max_memory_allocated` and `max_memory_reserved`.
    pub fn pool_high_water(&self) -> Result<(u64, u64)> {
        use drv_sys as sys;
        let pool = self.default_pool()?;
        let get = |attr| {
            let mut v: u64 = 0;
            // SAFETY: `pool` is the device's default pool; the attribute is a u64.
            let r = unsafe {
                sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void)
            };
            if r == sys::CUresult::CUDA_SUCCESS {
                Ok(v)
            } else {
                Err(self.err("cuMemPoolGetAttribute", r))
            }
        };
        Ok((
            get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        ))
    }

    /// Restarts both high-water marks of [`Gpu::pool_high_water`] at the current use.
    pub fn reset_pool_high_water(&self) -> Result<()> {
        use drv_sys as sys;
        let pool = self.default_pool()?;
        for attr in [
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
        ] {
            let mut zero: u64 = 0;
            // SAFETY: setting a high-water mark to 0 resets it (driver API contract).
            let r = unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    attr,
                    &mut zero as *mut u64 as *mut std::ffi::c_void,
                )
            };
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(self.err("cuMemPoolSetAttribute", r));
            }
        }
        Ok(())
    }

    fn default_pool(&self) -> Result<drv_sys::CUmemoryPool> {
        let mut pool = std::mem::MaybeUninit::uninit();
        // SAFETY: queries the default pool of this context's device.
        let r =
            unsafe { drv_sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), self.ctx.cu_device()) };
        if r != drv_sys::CUresult::CUDA_SUCCESS {
            return Err(self.err("cuDeviceGetDefaultMemPool", r));
        }
        // SAFETY: initialised by the successful call above.
        Ok(unsafe { pool.assume_init() })
    }

    /// Lets f32 convolutions and GEMMs (linear layers, matmuls and the unfused attention, e.g. the
    /// VAE mid-block's single 512-wide head) use TF32 tensor cores (10-bit mantissa products, f32
    /// accumulation), as PyTorch does by default for convolutions
    /// (`torch.backends.cudnn.allow_tf32`) and on request for GEMMs
    /// (`torch.backends.cuda.matmul.allow_tf32`). Off unless asked for: the f32 parity tests need
    /// full f32 products. An f16/bf16 pipeline turns it on for its f32 VAE.
    pub fn set_tf32(&self, on: bool) {
        self.tf32.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether [`Gpu::set_tf32`] is on.
    pub fn tf32(&self) -> bool {
        self.tf32.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `(free, total)` device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| self.err("cuMemGetInfo", e))
    }

    pub(crate) fn err(&self, what: &str, e: impl std::fmt::Debug) -> KernelError {
        cuda_err(self.ordinal, what, e)
    }

    pub(crate) fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs.get(name).ok_or_else(|| KernelError::Device {
            device: format!("cuda:{}", self.ordinal),
            msg: format!("kernel {name} is not in the module"),
        })
    }

    /// Uninitialised device memory for `n` elements of `dtype`.
    pub(crate) fn alloc(self: &Arc<Self>, dtype: DType, n: usize) -> Result<CudaStorage> {
        let bytes = (n * dtype.size()).max(4);
        // SAFETY: every caller writes all `n` elements before the storage is read.
        let buf = unsafe { self.stream.alloc::<u8>(bytes) }
            .map_err(|e| self.err(&format!("allocating {bytes} bytes"), e))?;
        Ok(CudaStorage {
            buf,
            gpu: self.clone(),
        })
    }

    /// Zero-filled device memory for `n` elements of `dtype`, cleared on the compute stream
    /// (`cuMemsetD8Async`, no host upload).
    pub(crate) fn alloc_zeroed(self: &Arc<Self>, dtype: DType, n: usize) -> Result<CudaStorage> {
        let mut s = self.alloc(dtype, n)?;
        self.stream
            .memset_zeros(&mut s.buf)
            .map_err(|e| self.err("cuMemsetD8Async", e))?;
        Ok(s)
    }

    /// Element-wise launch configuration (grid-stride loops).
    pub(crate) fn cfg_elems(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 16384) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Device memory of one tensor (bytes; the tensor holds the dtype and shape).
pub struct CudaStorage {
    buf: CudaSlice<u8>,
    gpu: Arc<Gpu>,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaStorage(cuda:{}, {} bytes)",
            self.gpu.ordinal,
            self.buf.len()
        )
    }
}

impl CudaStorage {
    /// The device holding the memory.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The device.
    pub fn device(&self) -> Device {
        Device::Cuda(self.gpu.ordinal)
    }

    /// Raw device address (valid while `self` lives; all work is on the one stream).
    pub(crate) fn ptr(&self) -> u64 {
        let (p, _sync) = self.buf.device_ptr(&self.gpu.stream);
        p
    }

    /// Copies host bytes to a new device buffer.
    pub(crate) fn from_bytes(gpu: &Arc<Gpu>, bytes: &[u8]) -> Result<CudaStorage> {
        let data: &[u8] = if bytes.is_empty() { &[0; 4] } else { bytes };
        let buf = gpu
            .stream
            .clone_htod(data)
            .map_err(|e| gpu.err("host-to-device copy", e))?;
        Ok(CudaStorage {
            buf,
            gpu: gpu.clone(),
        })
    }

    /// Copies the first `len` bytes back to the host (synchronises the stream).
    pub(crate) fn to_bytes(&self, len: usize) -> Result<Vec<u8>> {
        let mut v = self
            .gpu
            .stream
            .clone_dtoh(&self.buf)
            .map_err(|e| self.gpu.err("device-to-host copy", e))?;
        v.truncate(len);
        Ok(v)
    }
}
