//! The kernel module's source and its compile: the CUDA C of every hand-written kernel as one
//! source, compiled by NVRTC for the GPU's architecture on first use as [`PARTS`] programs on
//! parallel threads (each emits the entry points of its part, `PCPP_PART` in the source), straight
//! to machine code (CUBIN, so the driver has nothing left to compile when it loads them), and kept
//! per architecture for the process and on disk between runs (a stale or unloadable file is
//! dropped and compiled again). A first run on a machine pays the compile once; with a core per
//! part it takes about as long as the heaviest part instead of the sum.

use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

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

/// The programs [`KERNEL_SOURCE`] is compiled as (`PCPP_PART` = 0 .. `PARTS`): the f32 and
/// untyped element-wise kernels (0), the `mma.sync` attention (1, its small-grid forms 10),
/// Hopper's plain warpgroup attention (2), four groups of the warp-specialised attention (3-6),
/// the small-row GEMMs (7) and the f16 and bf16 element-wise kernels (8, 9).
pub const PARTS: usize = 11;

/// What NVRTC hands back for one program.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    Ptx,
    Cubin,
}

fn nvrtc_present() -> Result<()> {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(KernelError::Device {
            device: "cuda".into(),
            msg: "NVRTC (libnvrtc.so) not found: install the CUDA toolkit or put libnvrtc on LD_LIBRARY_PATH".into(),
        });
    }
    Ok(())
}

/// Compiles part `part` of [`KERNEL_SOURCE`] for `arch` (e.g. `sm_90a`) to `out`.
fn compile_part(arch: &str, part: usize, out: Output) -> Result<Vec<u8>> {
    let fail = |what: String| KernelError::Device {
        device: "cuda".into(),
        msg: format!("NVRTC failed to compile part {part} of the kernels for {arch}: {what}"),
    };
    let src = CString::new(KERNEL_SOURCE).map_err(|e| fail(e.to_string()))?;
    let name = CString::new("pcpp_kernels.cu").map_err(|e| fail(e.to_string()))?;
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        format!("-DPCPP_PART={part}"),
    ];
    // SAFETY: `prog` is a live program (destroyed below, once); the out-buffers are sized by the
    // size queries before them.
    let r = unsafe {
        match nvrtc::compile_program(prog, &options) {
            Err(e) => {
                let log = nvrtc::get_program_log(prog)
                    .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_default();
                Err(fail(format!("{e:?}\n{log}")))
            }
            Ok(()) if out == Output::Ptx => nvrtc::get_ptx(prog)
                .map(|p| p.iter().map(|&c| c as u8).collect())
                .map_err(|e| fail(format!("{e:?}"))),
            Ok(()) => {
                let mut n = 0usize;
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut n)
                    .result()
                    .map_err(|e| fail(format!("nvrtcGetCUBINSize: {e:?}")))?;
                let mut buf = vec![0u8; n];
                nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char)
                    .result()
                    .map_err(|e| fail(format!("nvrtcGetCUBIN: {e:?}")))?;
                Ok(buf)
            }
        }
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    r
}

/// Compiles every part for `arch` on up to one thread per core, each taking the next part not yet
/// taken (NVRTC's memory grows with the programs at once); the outputs in part order.
fn compile_parts(arch: &str, out: Output) -> Result<Vec<Vec<u8>>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    nvrtc_present()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(PARTS));
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Option<Result<Vec<u8>>>>> = Mutex::new((0..PARTS).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let part = next.fetch_add(1, Ordering::Relaxed);
                if part >= PARTS {
                    break;
                }
                let r = compile_part(arch, part, out);
                if let Ok(mut d) = done.lock() {
                    d[part] = Some(r);
                }
            });
        }
    });
    let done = done.into_inner().unwrap_or_default();
    done.into_iter()
        .enumerate()
        .map(|(part, r)| {
            r.unwrap_or_else(|| {
                Err(KernelError::Device {
                    device: "cuda".into(),
                    msg: format!("NVRTC: part {part} of the kernels for {arch} was not compiled"),
                })
            })
        })
        .collect()
}

/// Compiles [`KERNEL_SOURCE`] to PTX for `arch` (e.g. `sm_90a`) with NVRTC, one PTX text per part
/// in part order. Needs only libnvrtc, no driver and no GPU, so CI can check that every kernel
/// compiles.
pub fn compile_kernels(arch: &'static str) -> Result<Vec<String>> {
    Ok(compile_parts(arch, Output::Ptx)?
        .into_iter()
        .map(|p| {
            let text = p.split(|&b| b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(text).into_owned()
        })
        .collect())
}

/// Compiles [`KERNEL_SOURCE`] to machine code (CUBIN) for `arch`, one image per part in part
/// order: what [`super::gpu`] loads. Needs only libnvrtc (its built-in assembler), no GPU.
pub fn compile_kernel_images(arch: &'static str) -> Result<Vec<Vec<u8>>> {
    compile_parts(arch, Output::Cubin)
}

/// Module images (CUBIN) by architecture, one per part.
type Images = HashMap<&'static str, Vec<Vec<u8>>>;

/// The in-process module images per architecture.
fn image_cache() -> &'static Mutex<Images> {
    static CACHE: OnceLock<Mutex<Images>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Drops the cached images of `arch` (in the process and on disk); whether there was a disk file.
pub(super) fn forget_cached_images(arch: &'static str) -> bool {
    if let Ok(mut c) = image_cache().lock() {
        c.remove(arch);
    }
    let mut any = false;
    for part in 0..PARTS {
        any |= disk_cache_path(arch, part).is_some_and(|p| std::fs::remove_file(p).is_ok());
    }
    any
}

/// The module images (CUBIN) of every part for `arch`, compiled once per process (and cached on
/// disk between runs), as the driver loads them.
pub(super) fn images_for(arch: &'static str) -> Result<Vec<Ptx>> {
    let as_ptx = |v: &[Vec<u8>]| v.iter().map(|b| Ptx::from_binary(b.clone())).collect();
    let cache = image_cache();
    if let Some(v) = cache.lock().ok().and_then(|c| c.get(arch).cloned()) {
        return Ok(as_ptx(&v));
    }
    let paths: Vec<_> = (0..PARTS).map(|p| disk_cache_path(arch, p)).collect();
    let on_disk: Option<Vec<Vec<u8>>> = paths
        .iter()
        .map(|p| p.as_ref().and_then(|p| std::fs::read(p).ok()))
        .collect();
    let images = match on_disk {
        Some(v) => v,
        None => {
            let v = compile_parts(arch, Output::Cubin)?;
            for (p, bytes) in paths.iter().zip(&v) {
                if let Some(p) = p {
                    // A cache that cannot be written only costs the next start-up a compile.
                    let _ = p
                        .parent()
                        .map(std::fs::create_dir_all)
                        .and_then(|_| write_new(p, bytes).ok());
                }
            }
            v
        }
    };
    if let Ok(mut c) = cache.lock() {
        c.insert(arch, images.clone());
    }
    Ok(as_ptx(&images))
}

/// Where the image of part `part` of [`KERNEL_SOURCE`] for `arch` is cached between runs:
/// `$PCPP_CACHE_DIR`, else `$XDG_CACHE_HOME/pcpp`, else `~/.cache/pcpp`, in a file named by a hash
/// of the source, the architecture and the NVRTC version (so an edited kernel or another NVRTC
/// never reads a stale file) and the part. `PCPP_CACHE_DIR=` (empty) turns the cache off.
fn disk_cache_path(arch: &str, part: usize) -> Option<std::path::PathBuf> {
    let dir = match std::env::var_os("PCPP_CACHE_DIR") {
        Some(d) if d.is_empty() => return None,
        Some(d) => std::path::PathBuf::from(d),
        None => match std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            Some(d) => std::path::PathBuf::from(d).join("pcpp"),
            None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cache/pcpp"),
        },
    };
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters; only called after `compile_parts`' library probe succeeded or
    // before a compile that performs it (a missing library leaves the version at 0.0).
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        let _ = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    }
    let version = (major, minor, PARTS);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in KERNEL_SOURCE
        .bytes()
        .chain(arch.bytes())
        .chain(format!("{version:?}").into_bytes())
    {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    Some(dir.join(format!("kernels-{arch}-{h:016x}-{part}.cubin")))
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
