//! Tensor parallelism (PCPP §5 `parallelism = tensor`) on a held-back UNet configuration (the SD
//! 1.5-family test model: 8 heads, 8 group-norm groups, 16 and 24 channels), so the heads,
//! feed-forward hidden units and ResNet channels split 2, 3 and 4 ways, evenly and unevenly: one
//! forward equals the serial one, and the bytes equal the plan's formula and the transport's count.

use std::sync::Arc;

use pcpp_comm::{CommKind, LocalTransport, Transport, TransportOptions};
use pcpp_core::plan::{plan, PlanSetup};
use pcpp_core::{ParallelConfig, PatchRuntime, SerialFactory};
use pcpp_kernels::{DType, Tensor};
use pcpp_sdxl::{unet_inventory, UNet, UNetCond, UNetConfig};
use pcpp_tests::{assert_close, data, TOL_RANKS};

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

const H: usize = 16;
const W: usize = 16;

fn inputs() -> (Tensor, Tensor, UNetCond) {
    let n = 2 * 4 * H * W;
    let sample = Tensor::from_vec(
        &[2, 4, H, W],
        (0..n).map(|i| ((i * 7 % 23) as f32 - 11.0) / 8.0).collect(),
    )
    .expect("sample");
    let t = Tensor::from_vec(&[2], vec![700.0; 2]).expect("t");
    let e = Tensor::from_vec(
        &[2, 77, 32],
        (0..2 * 77 * 32)
            .map(|i| ((i % 13) as f32 - 6.0) / 6.0)
            .collect(),
    )
    .expect("embeds");
    (sample, t, UNetCond::new(e, None, None))
}

#[test]
fn tensor_parallel_forward_equals_serial_for_2_3_4_ranks() {
    let dir = data("unet-sd15/unet");
    let (sample, t, cond) = inputs();
    let serial = UNet::load(&dir, DType::F32, &SerialFactory).expect("serial unet");
    let want = serial
        .forward(&pcpp_core::StepCtx::serial(), &sample, &t, &cond, None)
        .expect("serial forward");
    let cfg = UNetConfig::from_file(&dir.join("config.json")).expect("config");
    let inv = unet_inventory(&cfg);
    for n in [2, 3, 4] {
        let outs = LocalTransport::run(n, TransportOptions::default(), |w: Arc<dyn Transport>| {
            let rt = PatchRuntime::new(w, false, ParallelConfig::tensor(), H, W, 2)?;
            let unet = UNet::load(&dir, DType::F32, rt.factory())?;
            let (sample, t, cond) = inputs();
            rt.driver().begin_generation()?;
            let ctx = rt.driver().step_ctx(0);
            let out = unet.forward(&ctx, &sample, &t, &cond, None)?;
            rt.driver().end_generation()?;
            let stats = rt.group_transport().stats();
            Ok::<_, BoxErr>((out, rt.report(), stats.bytes(CommKind::Other)))
        })
        .expect("ranks");
        let setup = PlanSetup {
            height: H,
            width: W,
            world_size: n,
            cfg_split: false,
            batch: 2,
            elem_size: 4,
        };
        let p = plan(&inv, &setup, &ParallelConfig::tensor()).expect("plan");
        for (r, (out, report, transport)) in outs.iter().enumerate() {
            let what = format!("tensor parallel, {n} ranks, rank {r}");
            assert_close(&what, out, &want, TOL_RANKS);
            assert_eq!(report.total, p.ranks[r].steady, "{what}: bytes vs plan");
            assert_eq!(
                *transport,
                (report.total.sent.all_reduce, report.total.recvd.all_reduce),
                "{what}: transport counters"
            );
            assert!(report.total.recvd.all_reduce > 0, "{what}");
        }
    }
}
