//! Opening a CUDA device never panics: on a machine without a driver, NVRTC, cuBLAS or cuDNN (or
//! without a GPU) the error names what is missing; with a GPU the device opens.
#![cfg(feature = "cuda")]

use pcpp_kernels::cuda::device_count;
use pcpp_kernels::Device;

#[test]
fn opening_cuda_explains_what_is_missing() {
    match Device::Cuda(0).open() {
        Ok(()) => assert!(device_count().unwrap() >= 1),
        Err(e) => {
            let m = e.to_string();
            assert!(
                m.contains("found") || m.contains("no such device"),
                "unhelpful error: {m}"
            );
            println!("{m}");
        }
    }
}

#[test]
fn an_absent_ordinal_is_an_error() {
    let e = Device::Cuda(4096).open().unwrap_err().to_string();
    assert!(e.contains("cuda"), "{e}");
}
