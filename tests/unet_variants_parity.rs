//! UNet parity for the two differently shaped configurations shipped in `tests/data` (an SDXL-style
//! 3-level UNet with per-level head sizes, and an SD-1.5-style UNet with conv projections and no
//! added conditioning): the CPU kernels must hold the module tolerance on every head size.

use pcpp_core::{SerialFactory, StepCtx};
use pcpp_kernels::DType;
use pcpp_sdxl::{UNet, UNetCond};
use pcpp_tests::{assert_close, data, refs, TOL_MODULE};

fn check(dir: &str, refs_file: &str) {
    let unet = UNet::load(&data(dir), DType::F32, &SerialFactory).expect("load unet");
    let r = refs(refs_file);
    let cond = UNetCond::new(
        r["encoder_hidden_states"].clone(),
        r.get("text_embeds").cloned(),
        r.get("time_ids").cloned(),
    );
    let out = unet
        .forward(
            &StepCtx::serial(),
            &r["sample"],
            &r["timestep"],
            &cond,
            None,
        )
        .expect("forward");
    assert_close(refs_file, &out, &r["out"], TOL_MODULE);
}

#[test]
fn alt_unet_matches_diffusers() {
    check("unet-alt/unet", "unet-alt/unet_forward.safetensors");
}

#[test]
fn sd15_unet_matches_diffusers() {
    check("unet-sd15/unet", "unet-sd15/unet_forward.safetensors");
}
