//! The kernel module's source and its compile: the CUDA C of every hand-written kernel as one
//! translation unit, compiled by NVRTC to PTX for the GPU's architecture on first use, and kept
//! per architecture for the process and on disk between runs (a stale or unloadable file is
//! dropped and compiled again).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::{KernelError, Result};

/// CUDA C source of every hand-written kernel (compiled at run time by NVRTC), one translation
/// unit from seven files: the scalar kernels, the flash attention (tensor-core MMAs, and Hopper's
/// warpgroup MMAs, plain and warp-specialised), the small-row GEMMs on warpgroup MMAs, the
/// vectorised kernels, and the `extern "C"` instances.
pub const KERNEL_SOURCE: &str = concat!(
    include_str!("kernels.cu"),
    include_str!("flash_attn.cu"),
    include_str!("flash_hopper.cu"),
    include_str!("flash_ws.cu"),
    include_str!("gemm_wg.cu"),
    include_str!("vector.cu"),
    include_str!("instances.cu")
);

/// Architectures the CI compile check covers (Ampere, Ada, Hopper). Hopper's kernels are compiled
/// for `sm_90a`, the architecture-specific target that has the warpgroup MMAs.
pub const CHECKED_ARCHS: &[&str] = &["sm_80", "sm_89", "sm_90a"];

/// Compiles [`KERNEL_SOURCE`] to PTX for `arch` (e.g. `sm_90a`) with NVRTC. Needs only libnvrtc, no
/// driver and no GPU, so CI can check that every kernel compiles.
pub fn compile_kernels(arch: &'static str) -> Result<Ptx> {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(KernelError::Device {
            device: "cuda".into(),
            msg: "NVRTC (libnvrtc.so) not found: install the CUDA toolkit or put libnvrtc on LD_LIBRARY_PATH".into(),
        });
    }
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some("pcpp_kernels.cu".into()),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SOURCE, opts).map_err(|e| {
        let msg = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        };
        KernelError::Device {
            device: "cuda".into(),
            msg: format!("NVRTC failed to compile the kernels for {arch}:\n{msg}"),
        }
    })
}

/// The in-process PTX per architecture.
fn ptx_cache() -> &'static Mutex<HashMap<&'static str, String>> {
    static CACHE: OnceLock<Mutex<HashMap<&'static str, String>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Drops the cached PTX of `arch` (in the process and on disk); whether there was a disk file.
pub(super) fn forget_cached_ptx(arch: &'static str) -> bool {
    if let Ok(mut c) = ptx_cache().lock() {
        c.remove(arch);
    }
    disk_cache_path(arch).is_some_and(|p| std::fs::remove_file(p).is_ok())
}

/// PTX per architecture, compiled once per process (and cached on disk between runs).
pub(super) fn ptx_for(arch: &'static str) -> Result<Ptx> {
    let cache = ptx_cache();
    if let Some(src) = cache.lock().ok().and_then(|c| c.get(arch).cloned()) {
        return Ok(Ptx::from_src(src));
    }
    let disk = disk_cache_path(arch);
    if let Some(src) = disk.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        if let Ok(mut c) = cache.lock() {
            c.insert(arch, src.clone());
        }
        return Ok(Ptx::from_src(src));
    }
    let ptx = compile_kernels(arch)?;
    let src = ptx.to_src();
    if let Some(p) = disk {
        // A cache that cannot be written only costs the next start-up a compile.
        let _ = p
            .parent()
            .map(std::fs::create_dir_all)
            .and_then(|_| write_new(&p, src.as_bytes()).ok());
    }
    if let Ok(mut c) = cache.lock() {
        c.insert(arch, src);
    }
    Ok(ptx)
}

/// Where the PTX of [`KERNEL_SOURCE`] for `arch` is cached between runs:
/// `$PCPP_CACHE_DIR`, else `$XDG_CACHE_HOME/pcpp`, else `~/.cache/pcpp`, in a file named by a hash
/// of the source, the architecture and the NVRTC version (so an edited kernel or another NVRTC
/// never reads a stale file). `PCPP_CACHE_DIR=` (empty) turns the cache off.
fn disk_cache_path(arch: &str) -> Option<std::path::PathBuf> {
    let dir = match std::env::var_os("PCPP_CACHE_DIR") {
        Some(d) if d.is_empty() => return None,
        Some(d) => std::path::PathBuf::from(d),
        None => match std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            Some(d) => std::path::PathBuf::from(d).join("pcpp"),
            None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cache/pcpp"),
        },
    };
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters; only called after `compile_kernels`' library probe succeeded or
    // before a compile that performs it (a missing library leaves the version at 0.0).
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        let _ = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    }
    let version = (major, minor);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in KERNEL_SOURCE
        .bytes()
        .chain(arch.bytes())
        .chain(format!("{version:?}").into_bytes())
    {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    Some(dir.join(format!("kernels-{arch}-{h:016x}.ptx")))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees a
/// partial file.
fn write_new(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    // One temporary file per call: threads of one process may write the cache at the same time.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

pub(super) fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        // sm_90a: the warpgroup MMAs of the Hopper attention kernels (flash_hopper.cu).
        (9, 0) => "sm_90a",
        (10, _) => "sm_100",
        (12, _) => "sm_120",
        _ => "sm_80",
    }
}
