//! CI check that every CUDA kernel of the back-end compiles with NVRTC for every architecture we
//! ship for, part by part as the back-end compiles them. Needs only libnvrtc (no driver, no GPU):
//! `scripts/check-cuda-kernels.sh` installs it and runs these tests with `--ignored`.
#![cfg(feature = "cuda")]

use pcpp_kernels::cuda::{
    compile_kernel_images, compile_kernels, kernel_names, CHECKED_ARCHS, PARTS,
};

/// The entry points named in one part's PTX.
fn entries(ptx: &str) -> Vec<&str> {
    ptx.split(".entry ")
        .skip(1)
        .map(|e| e.split('(').next().unwrap_or_default())
        .collect()
}

#[test]
#[ignore = "needs libnvrtc; run by scripts/check-cuda-kernels.sh"]
fn every_kernel_compiles_for_every_arch_in_exactly_one_part() {
    for &arch in CHECKED_ARCHS {
        let parts = compile_kernels(arch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parts.len(), PARTS);
        // Every entry point the host loads is emitted by exactly one part, and no part emits one
        // the host does not know.
        let names = kernel_names();
        for (i, ptx) in parts.iter().enumerate() {
            for e in entries(ptx) {
                assert!(
                    names.iter().any(|n| n == e),
                    "part {i} for {arch} emits {e}, which kernel_names() does not list"
                );
            }
        }
        for name in &names {
            let found: Vec<usize> = (0..PARTS)
                .filter(|&i| entries(&parts[i]).contains(&name.as_str()))
                .collect();
            assert_eq!(
                found.len(),
                1,
                "kernel {name} for {arch} in parts {found:?}"
            );
        }
        // Programmatic dependent launch: on sm_90 and later every kernel waits for the one before
        // it (`pdl_begin`); earlier architectures have no such instruction.
        let sm: u32 = arch
            .trim_start_matches("sm_")
            .trim_end_matches('a')
            .parse()
            .expect("architecture number");
        for ptx in &parts {
            for entry in ptx.split(".entry ").skip(1) {
                let name = entry.split('(').next().unwrap_or_default();
                let waits = entry.contains("griddepcontrol.wait");
                assert_eq!(
                    waits,
                    sm >= 90,
                    "kernel {name} for {arch}: griddepcontrol.wait present = {waits}"
                );
            }
        }
        let sizes: Vec<usize> = parts.iter().map(String::len).collect();
        println!(
            "{arch}: {} kernels, bytes of PTX per part {sizes:?}",
            names.len()
        );
    }
}

/// What the back-end loads: machine code from NVRTC's own assembler, one ELF image per part.
#[test]
#[ignore = "needs libnvrtc; run by scripts/check-cuda-kernels.sh"]
fn the_hopper_images_assemble() {
    let images = compile_kernel_images("sm_90a").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(images.len(), PARTS);
    for (i, img) in images.iter().enumerate() {
        assert!(
            img.len() > 1024 && img.starts_with(b"\x7fELF"),
            "part {i}: {} bytes, not an ELF image",
            img.len()
        );
    }
}
