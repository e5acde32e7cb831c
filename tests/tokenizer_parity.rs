//! Tokenizer parity against transformers 5.24: the ids of both SDXL tokenizers for the reference
//! prompts (`tests/data/refs-tiny-sdxl/text_encoders.safetensors`), and equality of the
//! `tokenizer.json` path with the `vocab.json` + `merges.txt` path.

use std::path::{Path, PathBuf};

use pcpp_sdxl::tokenizer::{ClipTokenizer, TokenizerError};
use safetensors::{Dtype, SafeTensors};

/// CLIP's end-of-text id.
const EOS: u32 = 49407;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir(name: &str) -> PathBuf {
    root().join("models/tiny-sdxl").join(name)
}

fn prompts() -> Vec<String> {
    let path = root().join("tests/data/refs-tiny-sdxl/meta.json");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read meta.json")).expect("meta.json");
    meta["text_encoders"]["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| p.as_str().expect("prompt").to_string())
        .collect()
}

/// Reference ids `[prompts, 77]` stored as int64.
fn reference_ids(name: &str) -> Vec<Vec<u32>> {
    let path = root().join("tests/data/refs-tiny-sdxl/text_encoders.safetensors");
    let bytes = std::fs::read(&path).expect("read text_encoders.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let view = st.tensor(name).expect("ids tensor");
    assert_eq!(view.dtype(), Dtype::I64, "{name} dtype");
    let cols = view.shape()[1];
    let ids: Vec<u32> = view
        .data()
        .chunks_exact(8)
        .map(|b| u32::try_from(i64::from_le_bytes(b.try_into().expect("8 bytes"))).expect("id"))
        .collect();
    ids.chunks(cols).map(<[u32]>::to_vec).collect()
}

/// Writes `vocab.json`, `merges.txt` and `tokenizer_config.json` from a `tokenizer.json` folder.
fn export_vocab_merges(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("create dir");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("tokenizer.json")).expect("read"))
            .expect("tokenizer.json");
    let model = &json["model"];
    std::fs::write(dst.join("vocab.json"), model["vocab"].to_string()).expect("write vocab");
    let mut merges = String::from("#version: 0.2\n");
    for pair in model["merges"].as_array().expect("merges") {
        let line = match pair {
            serde_json::Value::Array(p) => format!(
                "{} {}",
                p[0].as_str().expect("merge"),
                p[1].as_str().expect("merge")
            ),
            other => other.as_str().expect("merge").to_string(),
        };
        merges.push_str(&line);
        merges.push('\n');
    }
    std::fs::write(dst.join("merges.txt"), merges).expect("write merges");
    std::fs::copy(
        src.join("tokenizer_config.json"),
        dst.join("tokenizer_config.json"),
    )
    .expect("copy config");
}

fn check_against_reference(tok: &ClipTokenizer, reference: &[Vec<u32>], label: &str) {
    let prompts = prompts();
    assert_eq!(prompts.len(), reference.len());
    for (i, (prompt, want)) in prompts.iter().zip(reference).enumerate() {
        let enc = tok.encode(prompt).expect("encode");
        assert_eq!(&enc.ids, want, "{label} prompt {i}: {prompt:?}");
        let first_eos = want.iter().position(|&id| id == EOS).expect("eos");
        assert_eq!(enc.eos_index, first_eos, "{label} prompt {i} eos_index");
        assert_eq!(enc.truncated, i == 4, "{label} prompt {i} truncated");
    }
}

#[test]
fn tokenizer_json_matches_transformers() {
    let tok1 = ClipTokenizer::from_dir(model_dir("tokenizer")).expect("tokenizer");
    let tok2 = ClipTokenizer::from_dir(model_dir("tokenizer_2")).expect("tokenizer_2");
    assert_eq!((tok1.pad_id(), tok2.pad_id()), (EOS, 0));
    assert_eq!(tok1.max_length(), 77);
    check_against_reference(&tok1, &reference_ids("te1.input_ids"), "te1");
    check_against_reference(&tok2, &reference_ids("te2.input_ids"), "te2");
}

#[test]
fn vocab_merges_path_matches_tokenizer_json() {
    let extra = [
        "",
        "!!!",
        "wow! such ! spacing!",
        "  leading and trailing  ",
        "hello <|endoftext|> world",
        "ÀÉÎÕÜ ß ﬁ œ — “quotes” ‘single’ …",
        "a\u{301}bc e\u{301}",
    ];
    let base = std::env::temp_dir().join(format!("pcpp-tokenizer-parity-{}", std::process::id()));
    for (name, te) in [
        ("tokenizer", "te1.input_ids"),
        ("tokenizer_2", "te2.input_ids"),
    ] {
        let dir = base.join(name);
        export_vocab_merges(&model_dir(name), &dir);
        assert!(!dir.join("tokenizer.json").exists());
        let from_json = ClipTokenizer::from_dir(model_dir(name)).expect("tokenizer.json");
        let from_vocab = ClipTokenizer::from_dir(&dir).expect("vocab.json + merges.txt");
        check_against_reference(&from_vocab, &reference_ids(te), name);
        for prompt in prompts().iter().map(String::as_str).chain(extra) {
            assert_eq!(
                from_json.encode(prompt).expect("encode"),
                from_vocab.encode(prompt).expect("encode"),
                "{name}: {prompt:?}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn tokenizer_2_maps_every_bang_to_pad() {
    let tok2 = ClipTokenizer::from_dir(model_dir("tokenizer_2")).expect("tokenizer_2");
    let enc = tok2.encode("a!b!!").expect("encode");
    assert_eq!(
        enc.ids.iter().filter(|&&id| id == 0).count(),
        77 - enc.eos_index - 1 + 3
    );
    let tok1 = ClipTokenizer::from_dir(model_dir("tokenizer")).expect("tokenizer");
    let enc1 = tok1.encode("a!b!!").expect("encode");
    assert!(
        !enc1.ids.contains(&0),
        "tokenizer 1 keeps '!' as normal BPE tokens"
    );
}

#[test]
fn empty_prompt_and_errors() {
    let tok1 = ClipTokenizer::from_dir(model_dir("tokenizer")).expect("tokenizer");
    let enc = tok1.encode("").expect("encode");
    assert_eq!(&enc.ids[..2], &[49406, EOS]);
    assert_eq!(
        (enc.eos_index, enc.truncated, enc.ids.len()),
        (1, false, 77)
    );
    let err = ClipTokenizer::from_dir(root().join("tests/data/no-such-tokenizer")).unwrap_err();
    assert!(matches!(err, TokenizerError::MissingFiles { .. }), "{err}");
}
