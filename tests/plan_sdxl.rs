//! The communication plan of the real SDXL-base UNet from its config alone (no weights; PCPP §3.3,
//! §3.4): the inventory matches the SDXL appendix counts, DistriFusion's attention and group-norm
//! volumes match the closed-form §3.3 formulas, and PCPP at portion 0.3 moves at most 0.2× the
//! bytes of DistriFusion at 1024² on 8 ranks, with and without CFG split.

use pcpp_core::plan::{plan, LayerKind, PlanSetup};
use pcpp_core::ParallelConfig;
use pcpp_sdxl::{unet_inventory, UNetConfig};
use pcpp_tests::repo;

fn sdxl() -> pcpp_core::Inventory {
    let cfg = UNetConfig::from_file(&repo().join("models/sdxl-base-1.0-configs/unet/config.json"))
        .expect("SDXL config");
    unet_inventory(&cfg)
}

fn setup(world_size: usize, cfg_split: bool) -> PlanSetup {
    PlanSetup {
        height: 128,
        width: 128,
        world_size,
        cfg_split,
        batch: if cfg_split { 1 } else { 2 },
        elem_size: 2,
    }
}

#[test]
fn inventory_matches_the_sdxl_appendix() {
    let inv = sdxl();
    let count = |f: &dyn Fn(&LayerKind) -> bool| inv.layers.iter().filter(|l| f(&l.kind)).count();
    assert_eq!(inv.levels, 2);
    assert_eq!(count(&|k| matches!(k, LayerKind::SelfAttention { .. })), 70);
    assert_eq!(
        count(&|k| matches!(k, LayerKind::GroupNorm { groups: 32 })),
        46
    );
    assert_eq!(count(&|k| matches!(k, LayerKind::Conv { .. })), 39);
    // Σ C_in of the distributed convs per level: 5760, 10240, 20480.
    for (level, want) in [(0, 5760), (1, 10240), (2, 20480)] {
        let got: usize = inv
            .layers
            .iter()
            .filter(|l| matches!(l.kind, LayerKind::Conv { .. }) && l.level == level)
            .map(|l| l.channels)
            .sum();
        assert_eq!(got, want, "level {level}");
    }
}

#[test]
fn distrifusion_volumes_match_the_closed_form() {
    let inv = sdxl();
    for (n, split) in [(8, false), (8, true), (4, true)] {
        let s = setup(n, split);
        let p = plan(&inv, &s, &ParallelConfig::distrifusion()).expect("plan");
        let per_image = if split { n / 2 } else { n } as u64;
        let (b, a) = (s.batch as u64, 1024u64 * 1024);
        // KV = 200·b·A/n elements per rank, GN = 46·2·32·b values per rank (f32 on the wire).
        let kv = 200 * b * a / per_image * 2;
        let gn = 46 * 2 * 32 * b * 4;
        for r in &p.ranks {
            assert_eq!(
                r.steady.recvd.attention,
                (per_image - 1) * kv,
                "n={n} split={split}"
            );
            assert_eq!(r.steady.recvd.group_norm, (per_image - 1) * gn);
        }
    }
}

#[test]
fn pcpp_moves_at_most_a_fifth_of_distrifusion_at_1024_on_8_ranks() {
    let inv = sdxl();
    for split in [true, false] {
        let s = setup(8, split);
        let pcpp = plan(&inv, &s, &ParallelConfig::pcpp(0.3)).expect("pcpp");
        let df = plan(&inv, &s, &ParallelConfig::distrifusion()).expect("distrifusion");
        let ratio = pcpp.bytes_per_step / df.bytes_per_step;
        assert!(
            ratio <= 0.2,
            "split {split}: pcpp {} B vs distrifusion {} B per step (ratio {ratio:.3})",
            pcpp.bytes_per_step,
            df.bytes_per_step
        );
        // Warm-up steps move DistriFusion's full volume in both schemes.
        assert_eq!(pcpp.bytes_per_warmup_step, df.bytes_per_warmup_step);
    }
}
