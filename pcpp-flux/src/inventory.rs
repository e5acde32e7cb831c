//! The Flux transformer's layers that couple image rows, listed from its config alone (the DiT
//! case of PCPP §3.3's appendix): the packing input layer (a 2×2 stride-2 convolution over the
//! latent channels), one projected joint attention per double- and single-stream block (the
//! image K/V of `inner_dim` channels are what travels; text K/V stay local) and the output
//! gather of the packed `out_channels`, in the order [`crate::FluxTransformer::build`] creates
//! them through the layer factory. Level 0 is the packed token grid (latent / 2); there are no
//! coarser levels. `pcpp_core::plan::plan` turns it into bytes per step and memory per rank.

use pcpp_core::plan::{Inventory, LayerKind, LayerSpec};

use crate::config::FluxTransformerConfig;

/// The inventory of a transformer of config `c`.
pub fn flux_inventory(c: &FluxTransformerConfig) -> Inventory {
    let spec = |id: String, kind: LayerKind, channels: usize| LayerSpec {
        id,
        kind,
        channels,
        level: 0,
    };
    let mut layers = vec![spec(
        "x_embedder".into(),
        LayerKind::InputConv {
            kernel: 2,
            stride: 2,
            padding: 0,
        },
        c.in_channels / 4,
    )];
    let attn = LayerKind::ProjectedAttention {
        heads: c.num_attention_heads,
    };
    let d = c.inner_dim();
    layers.extend((0..c.num_layers).map(|i| spec(format!("transformer_blocks.{i}.attn"), attn, d)));
    layers.extend(
        (0..c.num_single_layers)
            .map(|i| spec(format!("single_transformer_blocks.{i}.attn"), attn, d)),
    );
    layers.push(spec("proj_out".into(), LayerKind::Gather, c.out_channels()));
    Inventory {
        model: "flux-transformer".into(),
        levels: 0,
        layers,
    }
}
