//! Sharded checkpoints (`<stem>-0000N-of-0000M.safetensors` + `<stem>.safetensors.index.json`,
//! as diffusers and transformers write large models): a tiny SDXL component split into shards must
//! load to exactly the model of the single file, and a damaged index must fail with an error that
//! names the index, the shard and the tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pcpp_core::{SerialFactory, StepCtx};
use pcpp_kernels::{io, DType, Tensor};
use pcpp_sdxl::{ClipTextModel, UNet, UNetCond};
use pcpp_tests::tiny_model;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pcpp-sharded-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Copies component `sub` of the tiny model into a fresh folder, its weight file `stem` split
/// round-robin into `n` shards with an index, as `save_pretrained(max_shard_size=...)` lays them
/// out. Returns the folder and the index's weight map.
fn shard(sub: &str, stem: &str, n: usize, tag: &str) -> (PathBuf, BTreeMap<String, String>) {
    let src = tiny_model().join(sub);
    let dst = tmp(tag).join(sub);
    std::fs::create_dir_all(&dst).expect("mkdir");
    std::fs::copy(src.join("config.json"), dst.join("config.json")).expect("config");
    let f = io::SafetensorsFile::open(src.join(format!("{stem}.safetensors"))).expect("open");
    let names: Vec<String> = f.shapes().into_iter().map(|(n, _)| n).collect();
    let tensors: Vec<(String, Tensor)> = names
        .iter()
        .map(|n| (n.clone(), f.load(n, None).expect("load")))
        .collect();
    let mut map = BTreeMap::new();
    for i in 0..n {
        let file = format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1);
        let part: Vec<(&str, &Tensor)> = tensors
            .iter()
            .enumerate()
            .filter(|(j, _)| j % n == i)
            .map(|(_, (k, t))| (k.as_str(), t))
            .collect();
        for (k, _) in &part {
            map.insert(k.to_string(), file.clone());
        }
        io::save(dst.join(&file), &part, None).expect("save shard");
    }
    write_index(&dst, stem, &map);
    (dst, map)
}

fn write_index(dir: &Path, stem: &str, map: &BTreeMap<String, String>) {
    let idx = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        dir.join(format!("{stem}.safetensors.index.json")),
        serde_json::to_string_pretty(&idx).expect("json"),
    )
    .expect("write index");
}

#[test]
fn sharded_text_encoder_matches_the_single_file() {
    let (dir, map) = shard("text_encoder", "model", 3, "clip");
    assert!(!dir.join("model.safetensors").exists());
    assert_eq!(
        map.values()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3
    );
    let one = ClipTextModel::load(&tiny_model().join("text_encoder"), DType::F32).expect("single");
    let sharded = ClipTextModel::load(&dir, DType::F32).expect("sharded");
    let ids = Tensor::from_vec(
        &[1, 8],
        vec![49406., 320., 1125., 539., 320., 2368., 49407., 49407.],
    )
    .expect("ids");
    let (a, b) = (
        one.forward(&ids).expect("a"),
        sharded.forward(&ids).expect("b"),
    );
    assert_eq!(
        a.last_hidden_state
            .max_abs_diff(&b.last_hidden_state)
            .unwrap(),
        0.0
    );
    assert_eq!(a.pooled.max_abs_diff(&b.pooled).unwrap(), 0.0);
}

#[test]
fn sharded_unet_matches_the_single_file() {
    let (dir, _) = shard("unet", "diffusion_pytorch_model", 2, "unet");
    let one = UNet::load(&tiny_model().join("unet"), DType::F32, &SerialFactory).expect("single");
    let sharded = UNet::load(&dir, DType::F32, &SerialFactory).expect("sharded");
    let r = pcpp_tests::refs("refs-tiny-sdxl/unet_forward.safetensors");
    let cond = UNetCond::new(
        r["encoder_hidden_states"].clone(),
        Some(r["text_embeds"].clone()),
        Some(r["time_ids"].clone()),
    );
    let ctx = StepCtx::serial();
    let a = one
        .forward(&ctx, &r["sample"], &r["timestep"], &cond, None)
        .expect("a");
    let b = sharded
        .forward(&ctx, &r["sample"], &r["timestep"], &cond, None)
        .expect("b");
    assert_eq!(a.max_abs_diff(&b).unwrap(), 0.0);
}

#[test]
fn damaged_index_errors_name_the_shard_and_tensor() {
    let (dir, map) = shard("text_encoder", "model", 2, "bad");
    let err = |dir: &Path| match ClipTextModel::load(dir, DType::F32) {
        Ok(_) => panic!("a damaged index was accepted"),
        Err(e) => e.to_string(),
    };
    // a shard the index names is missing
    let gone = map.values().next().expect("a shard").clone();
    let saved = dir.join("saved.bin");
    std::fs::rename(dir.join(&gone), &saved).expect("hide shard");
    let e = err(&dir);
    assert!(e.contains(&gone) && e.contains("missing"), "{e}");
    std::fs::rename(&saved, dir.join(&gone)).expect("restore shard");
    // the index lists a tensor its shard does not hold
    let mut extra = map.clone();
    extra.insert("text_model.ghost.weight".into(), gone.clone());
    write_index(&dir, "model", &extra);
    let e = err(&dir);
    assert!(
        e.contains("text_model.ghost.weight") && e.contains("does not hold"),
        "{e}"
    );
    // a tensor the index does not list
    let mut fewer = map.clone();
    let dropped = fewer.keys().next().expect("a tensor").clone();
    fewer.remove(&dropped);
    write_index(&dir, "model", &fewer);
    let e = err(&dir);
    assert!(e.contains(&dropped) && e.contains("not listed"), "{e}");
}
