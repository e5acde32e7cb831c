//! The UNet's layers that couple rows, listed from its config alone (PCPP §3.3 appendix): every
//! 3×3 convolution, group norm and self-attention with its channels, resolution level, stride and
//! heads, plus the input convolution and the output gather, in the order [`crate::UNet::build`]
//! creates them through the layer factory. `pcpp_core::plan::plan` turns it into bytes per step
//! and memory per rank without loading weights. `1×1` convolutions are local and not listed.

use pcpp_core::plan::{Inventory, LayerKind, LayerSpec};

use crate::unet_config::{BlockKind, BlockSpec, UNetConfig};

/// An inventory being listed, layer by layer (shared with the VAE decoder's inventory).
pub(crate) struct Lister {
    pub(crate) layers: Vec<LayerSpec>,
    pub(crate) groups: usize,
}

impl Lister {
    pub(crate) fn push(&mut self, id: String, kind: LayerKind, channels: usize, level: usize) {
        self.layers.push(LayerSpec {
            id,
            kind,
            channels,
            level,
        });
    }

    pub(crate) fn conv3(
        &mut self,
        id: String,
        channels: usize,
        level: usize,
        stride: usize,
        pad: usize,
    ) {
        self.push(
            id,
            LayerKind::Conv {
                kernel: 3,
                stride,
                padding: pad,
            },
            channels,
            level,
        );
    }

    pub(crate) fn norm(&mut self, id: String, channels: usize, level: usize) {
        let groups = self.groups;
        self.push(id, LayerKind::GroupNorm { groups }, channels, level);
    }

    fn resnet(&mut self, p: &str, ci: usize, co: usize, level: usize) {
        self.norm(format!("{p}.norm1"), ci, level);
        self.conv3(format!("{p}.conv1"), ci, level, 1, 1);
        self.norm(format!("{p}.norm2"), co, level);
        self.conv3(format!("{p}.conv2"), co, level, 1, 1);
        let groups = self.groups;
        self.push(p.to_string(), LayerKind::ChannelSplit { groups }, co, level);
    }

    fn transformer(&mut self, p: &str, c: usize, depth: usize, heads: usize, level: usize) {
        self.norm(format!("{p}.norm"), c, level);
        for i in 0..depth {
            self.push(
                format!("{p}.transformer_blocks.{i}.attn1"),
                LayerKind::SelfAttention { heads },
                c,
                level,
            );
            self.push(
                format!("{p}.transformer_blocks.{i}.ff"),
                LayerKind::FeedForward,
                c,
                level,
            );
        }
    }

    fn block(&mut self, p: &str, s: &BlockSpec, cfg: &UNetConfig, up: bool, level: usize) {
        for j in 0..s.layers {
            let ci = if up {
                let res_skip = if j == s.layers - 1 {
                    s.in_channels
                } else {
                    s.out_channels
                };
                let res_in = if j == 0 {
                    s.prev_out_channels
                } else {
                    s.out_channels
                };
                res_in + res_skip
            } else if j == 0 {
                s.in_channels
            } else {
                s.out_channels
            };
            self.resnet(&format!("{p}.resnets.{j}"), ci, s.out_channels, level);
            if s.kind == BlockKind::CrossAttn {
                let depth = s.transformer_layers.get(j).copied().unwrap_or(1);
                self.transformer(
                    &format!("{p}.attentions.{j}"),
                    s.out_channels,
                    depth,
                    s.heads,
                    level,
                );
            }
        }
        if s.resample {
            if up {
                // Nearest ×2 first: the conv runs at the finer level.
                self.conv3(
                    format!("{p}.upsamplers.0.conv"),
                    s.out_channels,
                    level.saturating_sub(1),
                    1,
                    1,
                );
            } else {
                self.conv3(
                    format!("{p}.downsamplers.0.conv"),
                    s.out_channels,
                    level,
                    2,
                    cfg.downsample_padding,
                );
            }
        }
    }
}

/// The inventory of a UNet with config `cfg`.
pub fn unet_inventory(cfg: &UNetConfig) -> Inventory {
    let levels = cfg.down.iter().filter(|s| s.resample).count();
    let mut l = Lister {
        layers: Vec::new(),
        groups: cfg.groups,
    };
    let c0 = cfg.block_out_channels[0];
    l.push(
        "conv_in".into(),
        LayerKind::InputConv {
            kernel: cfg.conv_in_kernel,
            stride: 1,
            padding: (cfg.conv_in_kernel - 1) / 2,
        },
        cfg.in_channels,
        0,
    );
    let mut level = 0;
    for (i, s) in cfg.down.iter().enumerate() {
        l.block(&format!("down_blocks.{i}"), s, cfg, false, level);
        if s.resample {
            level += 1;
        }
    }
    if let Some((depth, heads, _)) = cfg.mid {
        let cl = *cfg.block_out_channels.last().unwrap_or(&c0);
        l.resnet("mid_block.resnets.0", cl, cl, level);
        l.transformer("mid_block.attentions.0", cl, depth, heads, level);
        l.resnet("mid_block.resnets.1", cl, cl, level);
    }
    for (i, s) in cfg.up.iter().enumerate() {
        l.block(&format!("up_blocks.{i}"), s, cfg, true, level);
        if s.resample {
            level = level.saturating_sub(1);
        }
    }
    l.norm("conv_norm_out".into(), c0, 0);
    let k_out = cfg.conv_out_kernel;
    if k_out > 1 {
        l.push(
            "conv_out".into(),
            LayerKind::Conv {
                kernel: k_out,
                stride: 1,
                padding: (k_out - 1) / 2,
            },
            c0,
            0,
        );
    }
    l.push("out".into(), LayerKind::Gather, cfg.out_channels, 0);
    Inventory {
        model: "UNet2DConditionModel".into(),
        levels,
        layers: l.layers,
    }
}
