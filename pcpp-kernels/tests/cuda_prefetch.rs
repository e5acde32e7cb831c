//! The L2 weight prefetch on its own stream (`cuda/prefetch.rs`): results are bit-equal with it
//! and without it, eager and replayed from a CUDA graph, in both modes; inside a capture the
//! prefetch is a branch of the graph and the capture ends joined. Ignored by default (needs a
//! GPU): `cargo test -p pcpp-kernels --features cuda --test cuda_prefetch -- --ignored`. Its own
//! test binary, since the mode is process-wide.
#![cfg(feature = "cuda")]

mod common;

use common::GPU;
use pcpp_kernels::cuda::{capture_graph, copy_into, set_l2_prefetch, L2Prefetch};
use pcpp_kernels::{DType, Device, Tensor};

fn rand(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, DType::F16, GPU, (-1.0, 1.0), seed).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn results_are_the_same_with_the_prefetch_eager_and_replayed() {
    let x = rand(&[256, 1280], 1);
    let w = rand(&[5120, 1280], 2);
    let b = rand(&[5120], 3);
    // Ten ranges (two launches of at most eight), one under 16 bytes, one not a 16-byte multiple.
    let mut hinted: Vec<Tensor> = (0..8)
        .map(|i| rand(&[333 + i, 17], 10 + i as u64))
        .collect();
    hinted.push(rand(&[7], 30));
    hinted.push(w.clone());
    let hinted: Vec<&Tensor> = hinted.iter().collect();

    set_l2_prefetch(L2Prefetch::Off);
    let want = x.linear(&w, Some(&b)).unwrap().to_bytes().unwrap();
    let out = Tensor::zeros_on(&[256, 5120], DType::F16, GPU).unwrap();
    let off = capture_graph(0, || {
        Tensor::prefetch_l2(&hinted)?;
        copy_into(&x.linear(&w, Some(&b))?, &out)
    })
    .unwrap();
    assert!(
        !off.node_kinds().unwrap().contains_key("l2_prefetch"),
        "a prefetch node with the prefetch off"
    );

    for mode in [L2Prefetch::Bulk, L2Prefetch::Lines] {
        set_l2_prefetch(mode);
        Tensor::prefetch_l2(&hinted).unwrap();
        let got = x.linear(&w, Some(&b)).unwrap();
        // A second prefetch joins the first one's stream before it forks again.
        Tensor::prefetch_l2(&hinted[9..]).unwrap();
        assert_eq!(got.to_bytes().unwrap(), want, "{mode:?}: eager");

        let out = Tensor::zeros_on(&[256, 5120], DType::F16, GPU).unwrap();
        let step = capture_graph(0, || {
            Tensor::prefetch_l2(&hinted)?;
            let y = x.linear(&w, Some(&b))?;
            Tensor::prefetch_l2(&hinted[..2])?;
            copy_into(&y, &out)
        })
        .unwrap();
        let kinds = step.node_kinds().unwrap();
        assert_eq!(
            kinds.get("l2_prefetch"),
            Some(&3),
            "{mode:?}: two launches for ten ranges and one for two in {kinds:?}"
        );
        for _ in 0..2 {
            step.replay().unwrap();
            assert_eq!(out.to_bytes().unwrap(), want, "{mode:?}: replayed");
        }
    }
    set_l2_prefetch(L2Prefetch::Off);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_prefetch_of_tensors_on_two_devices_is_an_error() {
    // Checked before the mode (not set here: the other test sets it for the process).
    let g = rand(&[64], 1);
    let c = Tensor::zeros_on(&[64], DType::F16, Device::Cpu).unwrap();
    let e = Tensor::prefetch_l2(&[&g, &c]).unwrap_err().to_string();
    assert!(e.contains("different devices"), "{e}");
}
