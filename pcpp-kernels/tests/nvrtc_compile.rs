//! CI check that every CUDA kernel of the back-end compiles with NVRTC for every architecture we
//! ship for. Needs only libnvrtc (no driver, no GPU): `scripts/check-cuda-kernels.sh` installs it and
//! runs this test with `--ignored`.
#![cfg(feature = "cuda")]

use pcpp_kernels::cuda::{compile_kernels, kernel_names, CHECKED_ARCHS};

#[test]
#[ignore = "needs libnvrtc; run by scripts/check-cuda-kernels.sh"]
fn every_kernel_compiles_for_every_arch() {
    for &arch in CHECKED_ARCHS {
        let ptx = match compile_kernels(arch) {
            Ok(p) => p.to_src(),
            Err(e) => panic!("{e}"),
        };
        for name in kernel_names() {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "kernel {name} missing from the PTX for {arch}"
            );
        }
        // Programmatic dependent launch: on sm_90 and later every kernel waits for the one before
        // it (`pdl_begin`); earlier architectures have no such instruction.
        let sm: u32 = arch
            .trim_start_matches("sm_")
            .trim_end_matches('a')
            .parse()
            .expect("architecture number");
        for entry in ptx.split(".entry ").skip(1) {
            let name = entry.split('(').next().unwrap_or_default();
            let waits = entry.contains("griddepcontrol.wait");
            assert_eq!(
                waits,
                sm >= 90,
                "kernel {name} for {arch}: griddepcontrol.wait present = {waits}"
            );
        }
        println!(
            "{arch}: {} kernels, {} bytes of PTX",
            kernel_names().len(),
            ptx.len()
        );
    }
}
