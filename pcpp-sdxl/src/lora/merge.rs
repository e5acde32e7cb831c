//! The weight-store side of LoRA: which adapters target a tensor the model takes, the merge
//! `W + Σ factor · up @ down` (PEFT's `LoraLayer.merge`, which diffusers' `fuse_lora` calls) in f32
//! on the store's device, and the check that every adapter found its module.
//!
//! A requested tensor `<module>.weight` is matched by module name: PEFT adapters by the dotted
//! diffusers name, kohya adapters by that name with `_` for `.` and, for the UNet, by its original
//! (SGM) name as the single-file checkpoint mapping ([`crate::checkpoint`]) gives it. Text-encoder
//! names are compared without the `text_model` level (transformers 4 has it, 5 not always).

use std::collections::HashMap;
use std::sync::Mutex;

use pcpp_kernels::{DType, Device, Tensor};

use super::{Adapter, ComponentLora, LoraComponent, Target};
use crate::checkpoint::unet_key_to_original_for;
use crate::error::{Result, SdxlError};
use crate::unet_config::{BlockKind, UNetConfig};

/// The SGM layout facts of a UNet: resnets per down block, cross-attention per up block.
#[derive(Debug, Clone)]
struct SgmLayout {
    layers_per_block: usize,
    up_attn: Vec<bool>,
}

/// A component's adapters inside a [`Weights`](crate::weights::Weights) store.
pub(crate) struct LoraMerge {
    component: LoraComponent,
    adapters: Vec<Adapter>,
    index: HashMap<Target, Vec<usize>>,
    used: Mutex<Vec<bool>>,
    sgm: Mutex<Option<SgmLayout>>,
}

fn flat(module: &str) -> String {
    module.replace('.', "_")
}

impl LoraMerge {
    /// `None` when there is no adapter.
    pub(crate) fn new(lora: ComponentLora) -> Option<LoraMerge> {
        if lora.adapters.is_empty() {
            return None;
        }
        let mut index: HashMap<Target, Vec<usize>> = HashMap::new();
        for (i, a) in lora.adapters.iter().enumerate() {
            index.entry(a.target.clone()).or_default().push(i);
        }
        Some(LoraMerge {
            component: lora.component,
            used: Mutex::new(vec![false; lora.adapters.len()]),
            adapters: lora.adapters,
            index,
            sgm: Mutex::new(None),
        })
    }

    /// Lets kohya adapters with SGM block names (`input_blocks_4_1_…`) find the modules of a UNet
    /// of configuration `cfg` (possible when every down block has the same number of resnets).
    pub(crate) fn set_unet_config(&self, cfg: &UNetConfig) {
        let layers = cfg.down.first().map_or(0, |b| b.layers);
        let uniform = cfg.down.iter().all(|b| b.layers == layers)
            && cfg.up.iter().all(|b| b.layers == layers + 1);
        if let Ok(mut s) = self.sgm.lock() {
            *s = uniform.then(|| SgmLayout {
                layers_per_block: layers,
                up_attn: cfg
                    .up
                    .iter()
                    .map(|b| b.kind == BlockKind::CrossAttn)
                    .collect(),
            });
        }
    }

    /// The adapters that target tensor `name` (only `….weight` tensors have any), marked used.
    pub(crate) fn adapters_for(&self, name: &str) -> Vec<usize> {
        let Some(module) = name.strip_suffix(".weight") else {
            return Vec::new();
        };
        let mut targets = Vec::with_capacity(3);
        if self.component == LoraComponent::Unet {
            targets.push(Target::Dotted(module.to_string()));
            targets.push(Target::Flat(flat(module)));
            let sgm = self.sgm.lock().ok().and_then(|s| s.clone());
            if let Some(original) =
                sgm.and_then(|l| unet_key_to_original_for(l.layers_per_block, &l.up_attn, name))
            {
                if let Some(m) = original.strip_suffix(".weight") {
                    targets.push(Target::Flat(flat(m)));
                }
            }
        } else {
            let m = module.strip_prefix("text_model.").unwrap_or(module);
            targets.push(Target::Dotted(m.to_string()));
            targets.push(Target::Flat(flat(m)));
        }
        let mut hits: Vec<usize> = targets
            .iter()
            .filter_map(|t| self.index.get(t))
            .flatten()
            .copied()
            .collect();
        hits.sort_unstable();
        hits.dedup();
        if let Ok(mut u) = self.used.lock() {
            for &i in &hits {
                u[i] = true;
            }
        }
        hits
    }

    /// `base` (f32, on `device`) plus the deltas of adapters `hits`, in f32 on `device`.
    pub(crate) fn merge(
        &self,
        name: &str,
        base: Tensor,
        hits: &[usize],
        device: Device,
    ) -> Result<Tensor> {
        let shape = base.shape().to_vec();
        let out = shape.first().copied().unwrap_or(0);
        let rest: usize = shape.iter().skip(1).product();
        let mut w = base;
        for &i in hits {
            let a = &self.adapters[i];
            let (ds, us) = (a.down.shape(), a.up.shape());
            let r = ds[0];
            let d_rest: usize = ds[1..].iter().product();
            let kernel_ok = ds.len() != 4 || shape.len() != 4 || ds[1..] == shape[1..];
            if us[0] != out || d_rest != rest || !kernel_ok {
                return Err(self.shape_error(a, name, &shape));
            }
            let f32_on = |t: &Tensor, s: &[usize]| -> Result<Tensor> {
                Ok(t.to_device(device)?.to_dtype(DType::F32)?.reshape(s)?)
            };
            let delta = f32_on(&a.up, &[out, r])?
                .matmul(&f32_on(&a.down, &[r, rest])?)?
                .affine(a.factor, 0.0)?
                .reshape(&shape)?;
            w = w.add(&delta)?;
        }
        Ok(w)
    }

    fn shape_error(&self, a: &Adapter, name: &str, shape: &[usize]) -> SdxlError {
        let (ds, us) = (a.down.shape(), a.up.shape());
        let width = ds[1..].iter().product::<usize>();
        let cross_kv = name.ends_with("attn2.to_k.weight") || name.ends_with("attn2.to_v.weight");
        let hint = match width {
            768 if cross_kv && shape.get(1) != Some(&768) => format!(
                "; this is an SD 1.x adapter (cross-attention input width 768; this model's is {})",
                shape.get(1).copied().unwrap_or(0)
            ),
            1024 if cross_kv && shape.get(1) != Some(&1024) => format!(
                "; this is an SD 2.x adapter (cross-attention input width 1024; this model's is {})",
                shape.get(1).copied().unwrap_or(0)
            ),
            _ => String::new(),
        };
        SdxlError::Weight {
            path: a.file.as_ref().clone(),
            tensor: a.down_key.clone(),
            msg: format!(
                "adapter `{}` (down {ds:?}, up {us:?}) does not fit {} tensor `{name}` of shape {shape:?}{hint}",
                a.key,
                self.component.describe()
            ),
        }
    }

    /// Errors on the adapters that matched no tensor the model took, naming the first one's key
    /// and file.
    pub(crate) fn check_consumed(&self) -> Result<()> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        let unused: Vec<&Adapter> = self
            .adapters
            .iter()
            .zip(&used)
            .filter(|(_, &u)| !u)
            .map(|(a, _)| a)
            .collect();
        let Some(first) = unused.first() else {
            return Ok(());
        };
        let shown: Vec<&str> = unused.iter().take(5).map(|a| a.key.as_str()).collect();
        let sgm_names = unused
            .iter()
            .any(|a| matches!(&a.target, Target::Flat(m) if m.starts_with("input_blocks_") || m.starts_with("middle_block_") || m.starts_with("output_blocks_")));
        let no_layout = self.sgm.lock().map(|s| s.is_none()).unwrap_or(true);
        Err(SdxlError::Weight {
            path: first.file.as_ref().clone(),
            tensor: first.key.clone(),
            msg: format!(
                "LoRA adapter matches no {} module of this model ({} unmatched in all: {}{}){}",
                self.component.describe(),
                unused.len(),
                shown.join(", "),
                if unused.len() > 5 { ", ..." } else { "" },
                if sgm_names && no_layout {
                    "; SGM block names need a UNet with the same number of resnets in every block"
                } else {
                    ""
                }
            ),
        })
    }
}
