//! TMA tensor maps (Hopper's tensor memory accelerator) for the warp-specialised attention
//! kernels of `flash_ws.cu`: the driver's description of a row-major 16-bit matrix that the
//! kernels' producer thread copies boxes of into shared memory with `cp.async.bulk.tensor`.

use cudarc::driver::{sys, DeviceRepr};

use crate::DType;

/// An encoded tensor map, passed to a kernel by value (`__grid_constant__`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct TensorMap(sys::CUtensorMap);

// SAFETY: plain bytes the driver encoded; the kernels declare the parameter as a 128-byte,
// 128-aligned struct (`TmaMap`), the layout of `CUtensorMap`.
unsafe impl DeviceRepr for TensorMap {}

/// Columns per box: 128 bytes of 16-bit elements, the width of the 128-byte swizzle.
pub(crate) const BOX_COLS: u32 = 64;

/// The map of `batch` row-major matrices of `rows` × `cols` 16-bit elements (`dt`) at device
/// address `addr`, rows `stride` elements apart (≥ `cols`: the matrix may be a block of columns
/// of a wider one), one matrix after another, read in boxes of [`BOX_COLS`] columns and
/// `box_rows` rows in the 128-byte-swizzle layout; rows past `rows` and columns past `cols` read
/// as zeros. `None` where the driver cannot describe it (an address not 16-byte aligned, a row
/// stride not a multiple of 16 bytes) or refuses: the caller takes a kernel without TMA.
pub(crate) fn matrix_map(
    addr: u64,
    dt: DType,
    (batch, rows, cols): (usize, usize, usize),
    stride: usize,
    box_rows: u32,
) -> Option<TensorMap> {
    let ty = match dt {
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F32 => return None,
    };
    let row_bytes = (stride * 2) as u64;
    if addr % 16 != 0 || row_bytes % 16 != 0 || rows == 0 || batch == 0 || stride < cols {
        return None;
    }
    let dims = [cols as u64, rows as u64, batch as u64];
    let strides = [row_bytes, row_bytes * rows as u64];
    let boxes = [BOX_COLS, box_rows, 1];
    let elem = [1u32, 1, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every array holds the rank (3) entries the driver reads (strides: rank − 1); the
    // call only encodes (no device work, no context needed); `map` is read only on success.
    let status = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            ty,
            3,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if status != sys::CUresult::CUDA_SUCCESS {
        return None;
    }
    // SAFETY: written by the successful call above.
    Some(TensorMap(unsafe { map.assume_init() }))
}
