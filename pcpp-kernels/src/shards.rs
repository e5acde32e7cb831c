//! Sharded safetensors checkpoints: diffusers and transformers write a large component as
//! `<stem>-0000N-of-0000M.safetensors` shards plus `<stem>.safetensors.index.json`, whose
//! `weight_map` maps every tensor name to the shard holding it.
//!
//! [`WeightFiles`] presents one file or such a set of shards as one store of named tensors, so a
//! model loader never needs to know which it was given. The index is checked when it is opened:
//! a shard it names that is not there, a tensor it lists that its shard does not hold, a tensor
//! held by two shards and a tensor a shard holds that the index does not list are errors that name
//! the index, the shard and the tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::io::SafetensorsFile;
use crate::{DType, Device, KernelError, Result, Tensor};

/// Suffix of a shard index file.
pub const INDEX_SUFFIX: &str = ".safetensors.index.json";

fn file_err(path: &Path, msg: impl Into<String>) -> KernelError {
    KernelError::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The weight file of a component folder for the file stem `stem` (e.g.
/// `diffusion_pytorch_model` or `model`), in order of preference: `<stem>.safetensors`,
/// `<stem>.fp16.safetensors`, `<stem>.safetensors.index.json`, `<stem>.fp16.safetensors.index.json`.
/// `None` when there is none of them.
pub fn find_weights(dir: &Path, stem: &str) -> Option<PathBuf> {
    [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
        format!("{stem}{INDEX_SUFFIX}"),
        format!("{stem}.fp16{INDEX_SUFFIX}"),
    ]
    .into_iter()
    .map(|n| dir.join(n))
    .find(|p| p.is_file())
}

/// Whether `path` names a shard index (`*.safetensors.index.json`).
pub fn is_index(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with(INDEX_SUFFIX))
}

/// One safetensors file, or the shards of an index, seen as one store of named tensors.
pub struct WeightFiles {
    /// The file opened: the safetensors file, or the index.
    path: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    owner: HashMap<String, usize>,
}

/// The parts of an index file this loader reads.
#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl WeightFiles {
    /// Opens a safetensors file, or the shards of an index when `path` ends with
    /// `.safetensors.index.json`.
    pub fn open(path: impl AsRef<Path>) -> Result<WeightFiles> {
        let path = path.as_ref();
        if is_index(path) {
            return WeightFiles::open_index(path);
        }
        let f = SafetensorsFile::open(path)?;
        let owner = f.shapes().into_iter().map(|(n, _)| (n, 0)).collect();
        Ok(WeightFiles {
            path: path.to_path_buf(),
            files: vec![f],
            owner,
        })
    }

    fn open_index(index: &Path) -> Result<WeightFiles> {
        let text = std::fs::read_to_string(index).map_err(|source| KernelError::Io {
            path: index.to_path_buf(),
            source,
        })?;
        let idx: Index = serde_json::from_str(&text)
            .map_err(|e| file_err(index, format!("not a valid shard index: {e}")))?;
        if idx.weight_map.is_empty() {
            return Err(file_err(index, "the shard index lists no tensors"));
        }
        let dir = index.parent().unwrap_or(Path::new("."));
        // shard file name -> position in `files`
        let mut shard_of: BTreeMap<&str, usize> = BTreeMap::new();
        let mut files = Vec::new();
        for shard in idx.weight_map.values() {
            if shard_of.contains_key(shard.as_str()) {
                continue;
            }
            if shard.is_empty()
                || shard.contains(['/', '\\'])
                || shard == ".."
                || !shard.ends_with(".safetensors")
            {
                return Err(file_err(
                    index,
                    format!("shard `{shard}` is not a safetensors file name in the index's folder"),
                ));
            }
            let p = dir.join(shard);
            if !p.is_file() {
                return Err(file_err(
                    index,
                    format!(
                        "shard `{shard}` named in the index is missing ({})",
                        p.display()
                    ),
                ));
            }
            shard_of.insert(shard, files.len());
            files.push(SafetensorsFile::open(&p)?);
        }
        let mut owner: HashMap<String, usize> = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for (name, _) in f.shapes() {
                if let Some(&j) = owner.get(&name) {
                    return Err(file_err(
                        index,
                        format!(
                            "tensor `{name}` is in two shards: {} and {}",
                            files[j].path().display(),
                            f.path().display()
                        ),
                    ));
                }
                owner.insert(name, i);
            }
        }
        for (name, shard) in &idx.weight_map {
            let want = shard_of[shard.as_str()];
            match owner.get(name) {
                Some(&i) if i == want => {}
                Some(&i) => {
                    return Err(file_err(
                        index,
                        format!(
                            "tensor `{name}` is listed in shard `{shard}` but found in {}",
                            files[i].path().display()
                        ),
                    ))
                }
                None => {
                    return Err(file_err(
                        index,
                        format!("tensor `{name}` is listed in shard `{shard}` but that shard does not hold it"),
                    ))
                }
            }
        }
        if let Some((name, &i)) = owner
            .iter()
            .filter(|(n, _)| !idx.weight_map.contains_key(*n))
            .min_by(|a, b| a.0.cmp(b.0))
        {
            return Err(file_err(
                index,
                format!(
                    "tensor `{name}` of shard {} is not listed in the index",
                    files[i].path().display()
                ),
            ));
        }
        Ok(WeightFiles {
            path: index.to_path_buf(),
            files,
            owner,
        })
    }

    /// The path opened (the safetensors file, or the index).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a set of shards.
    pub fn is_sharded(&self) -> bool {
        is_index(&self.path)
    }

    /// The file that holds tensor `name` (its shard), if any.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.owner.get(name).map(|&i| self.files[i].path())
    }

    /// Names and shapes of all tensors, sorted by name.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<_> = self.files.iter().flat_map(|f| f.shapes()).collect();
        v.sort();
        v
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.owner.contains_key(name)
    }

    /// The `__metadata__` maps of all files, merged (the first file's value wins).
    pub fn metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        for f in self.files.iter().rev() {
            m.extend(f.metadata());
        }
        m
    }

    fn file(&self, name: &str) -> Result<&SafetensorsFile> {
        self.owner
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| file_err(&self.path, format!("tensor `{name}` is missing")))
    }

    /// Loads tensor `name` on the CPU, cast to `dtype` if given (see [`SafetensorsFile::load`]).
    pub fn load(&self, name: &str, dtype: Option<DType>) -> Result<Tensor> {
        self.file(name)?.load(name, dtype)
    }

    /// Tensor `name` on `device`, cast to `dtype` if given (see [`SafetensorsFile::load_on`]).
    pub fn load_on(&self, name: &str, dtype: Option<DType>, device: Device) -> Result<Tensor> {
        self.file(name)?.load_on(name, dtype, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pcpp-shards-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn t(v: f32) -> Tensor {
        Tensor::from_vec(&[2], vec![v, v + 1.0]).unwrap()
    }

    /// Writes shards `a.safetensors` {x, y} and `b.safetensors` {z} and an index with `map`.
    fn write(dir: &Path, map: &str) -> PathBuf {
        crate::io::save(
            dir.join("a.safetensors"),
            &[("x", &t(1.0)), ("y", &t(2.0))],
            None,
        )
        .unwrap();
        crate::io::save(dir.join("b.safetensors"), &[("z", &t(3.0))], None).unwrap();
        let p = dir.join("m.safetensors.index.json");
        std::fs::write(&p, format!("{{\"metadata\": {{}}, \"weight_map\": {map}}}")).unwrap();
        p
    }

    const GOOD: &str = r#"{"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}"#;

    #[test]
    fn reads_every_tensor_from_its_shard() {
        let d = tmp("good");
        let w = WeightFiles::open(write(&d, GOOD)).unwrap();
        assert!(w.is_sharded());
        assert_eq!(w.shapes().len(), 3);
        assert_eq!(w.load("z", None).unwrap().to_vec_f32().unwrap(), [3.0, 4.0]);
        assert_eq!(w.load("x", None).unwrap().to_vec_f32().unwrap(), [1.0, 2.0]);
        assert!(w.file_of("z").unwrap().ends_with("b.safetensors"));
        assert_eq!(
            find_weights(&d, "m"),
            Some(d.join("m.safetensors.index.json"))
        );
    }

    fn err_of(tag: &str, map: &str) -> String {
        let d = tmp(tag);
        match WeightFiles::open(write(&d, map)) {
            Ok(_) => panic!("index {map} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn missing_shard_is_named() {
        let e = err_of(
            "missing",
            r#"{"x": "a.safetensors", "y": "a.safetensors", "z": "c.safetensors"}"#,
        );
        assert!(
            e.contains("shard `c.safetensors`") && e.contains("missing"),
            "{e}"
        );
    }

    #[test]
    fn tensor_listed_but_absent_is_named() {
        let e = err_of(
            "absent",
            r#"{"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors", "w": "b.safetensors"}"#,
        );
        assert!(e.contains("`w`") && e.contains("does not hold"), "{e}");
    }

    #[test]
    fn tensor_in_wrong_shard_or_unlisted_is_named() {
        let e = err_of(
            "wrong",
            r#"{"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"}"#,
        );
        assert!(e.contains("`y`") && e.contains("found in"), "{e}");
        let e = err_of(
            "unlisted",
            r#"{"x": "a.safetensors", "z": "b.safetensors"}"#,
        );
        assert!(e.contains("`y`") && e.contains("not listed"), "{e}");
    }

    #[test]
    fn duplicate_tensor_is_named() {
        let d = tmp("dup");
        let p = write(&d, GOOD);
        crate::io::save(
            d.join("b.safetensors"),
            &[("z", &t(3.0)), ("x", &t(5.0))],
            None,
        )
        .unwrap();
        let e = WeightFiles::open(p).err().expect("accepted").to_string();
        assert!(e.contains("`x`") && e.contains("two shards"), "{e}");
    }

    #[test]
    fn shard_outside_the_folder_is_refused() {
        let e = err_of(
            "escape",
            r#"{"x": "../a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}"#,
        );
        assert!(e.contains("not a safetensors file name"), "{e}");
    }
}
