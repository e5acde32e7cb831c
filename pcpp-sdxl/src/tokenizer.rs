//! CLIP BPE tokenizers for SDXL's two text encoders.
//!
//! [`ClipTokenizer::from_dir`] loads a diffusers `tokenizer/` or `tokenizer_2/` folder: either the
//! `tokenizer.json` that `transformers` writes, or (what public SDXL repositories ship) a
//! `vocab.json` + `merges.txt` pair, from which the same pipeline as transformers' CLIP converter is
//! rebuilt (NFC, whitespace runs to one space, lowercase; CLIP's split regex; byte-level mapping; BPE
//! with the `</w>` end-of-word suffix). `tokenizer_config.json` supplies the special tokens and
//! `model_max_length`.
//!
//! [`ClipTokenizer::encode`] pads and truncates like `tokenizer(prompt, padding="max_length",
//! max_length=77, truncation=True)`: BOS, at most 75 prompt tokens, EOS, then the pad token. The
//! special tokens (pad included) are registered as added tokens, so with SDXL's `tokenizer_2`, whose
//! pad token is `"!"`, every `"!"` of the prompt becomes id 0 as it does in transformers.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// CLIP's pre-tokenization regex, as transformers' `CLIPConverter` writes it.
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// Default beginning-of-text token.
const DEFAULT_BOS: &str = "<|startoftext|>";
/// Default end-of-text token (also CLIP's unknown and, for `tokenizer`, pad token).
const DEFAULT_EOS: &str = "<|endoftext|>";
/// Default sequence length of CLIP text encoders.
const DEFAULT_MAX_LENGTH: usize = 77;
/// Largest `model_max_length` accepted (guards against transformers' "unlimited" sentinel).
const MAX_SUPPORTED_LENGTH: usize = 4096;

/// Errors from loading a tokenizer folder or encoding a prompt.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is malformed.
    #[error("invalid JSON in {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The folder has neither `tokenizer.json` nor `vocab.json` + `merges.txt`.
    #[error("{dir} has neither tokenizer.json nor vocab.json + merges.txt")]
    MissingFiles {
        /// The tokenizer folder.
        dir: PathBuf,
    },
    /// The `tokenizers` crate rejected a file.
    #[error("cannot load tokenizer from {path}: {message}")]
    Load {
        /// The file (or folder) at fault.
        path: PathBuf,
        /// The `tokenizers` error message.
        message: String,
    },
    /// A configuration key holds an unusable value.
    #[error("{path}: key `{key}`: {message}")]
    InvalidConfig {
        /// The configuration file.
        path: PathBuf,
        /// The key at fault.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A special token named in the configuration is not in the vocabulary.
    #[error("{path}: key `{key}`: token {token:?} is not in the vocabulary")]
    UnknownToken {
        /// The configuration file naming the token.
        path: PathBuf,
        /// The key naming the token.
        key: String,
        /// The token.
        token: String,
    },
    /// Encoding a prompt failed.
    #[error("cannot encode prompt: {0}")]
    Encode(String),
}

/// A prompt encoded for a CLIP text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, exactly `model_max_length` (77) of them: BOS, prompt tokens, EOS, pads.
    pub ids: Vec<u32>,
    /// Whether the prompt had more tokens than fit and was cut (the caller should warn).
    pub truncated: bool,
    /// Index of the first EOS id in `ids`: the token the pooled output is taken from
    /// (transformers' `argmax(input_ids)`). This is the appended EOS unless the prompt itself
    /// contains the literal EOS token.
    pub eos_index: usize,
}

/// A CLIP BPE tokenizer with SDXL's padding and truncation rules.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

/// Special tokens and length read from `tokenizer_config.json` (or defaults).
struct SpecialTokens {
    path: PathBuf,
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    extra: Vec<String>,
    max_length: usize,
}

impl ClipTokenizer {
    /// Loads a tokenizer folder (`tokenizer/` or `tokenizer_2/` of a diffusers model).
    ///
    /// Uses `tokenizer.json` if present, else builds CLIP's tokenizer from `vocab.json` and
    /// `merges.txt`. `tokenizer_config.json` (optional) gives `bos_token`, `eos_token`,
    /// `unk_token`, `pad_token` and `model_max_length`; CLIP's defaults fill in what is absent.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let dir = dir.as_ref();
        let special = read_special_tokens(dir)?;
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let (mut tokenizer, source) = if json.is_file() {
            let tok = Tokenizer::from_file(&json).map_err(|e| TokenizerError::Load {
                path: json.clone(),
                message: e.to_string(),
            })?;
            (tok, json)
        } else if vocab.is_file() && merges.is_file() {
            (build_clip(&vocab, &merges, &special)?, vocab)
        } else {
            return Err(TokenizerError::MissingFiles {
                dir: dir.to_path_buf(),
            });
        };
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| TokenizerError::Load {
                path: source.clone(),
                message: e.to_string(),
            })?;
        let specials: Vec<AddedToken> = [&special.bos, &special.eos, &special.unk, &special.pad]
            .into_iter()
            .chain(special.extra.iter())
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        tokenizer.add_special_tokens(&specials);
        let id_of = |key: &str, token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::UnknownToken {
                    path: special.path.clone(),
                    key: key.to_string(),
                    token: token.to_string(),
                })
        };
        let bos_id = id_of("bos_token", &special.bos)?;
        let eos_id = id_of("eos_token", &special.eos)?;
        let pad_id = id_of("pad_token", &special.pad)?;
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            max_length: special.max_length,
        })
    }

    /// Encodes a prompt to exactly [`Self::max_length`] ids: BOS, at most `max_length − 2` prompt
    /// tokens, EOS, then pad ids.
    pub fn encode(&self, prompt: &str) -> Result<Encoded, TokenizerError> {
        let encoding = self
            .tokenizer
            .encode_fast(prompt, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let tokens = encoding.get_ids();
        let room = self.max_length - 2;
        let truncated = tokens.len() > room;
        let kept = &tokens[..tokens.len().min(room)];
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(kept);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        let eos_index = ids
            .iter()
            .position(|&id| id == self.eos_id)
            .unwrap_or(kept.len() + 1);
        Ok(Encoded {
            ids,
            truncated,
            eos_index,
        })
    }

    /// Number of ids [`Self::encode`] returns (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id of the beginning-of-text token.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of the end-of-text token.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of the pad token (49407 for SDXL's `tokenizer`, 0 for `tokenizer_2`).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// Reads a special-token entry: a string or an `{"content": ...}` object.
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// Reads `tokenizer_config.json` if present, else returns CLIP's defaults.
fn read_special_tokens(dir: &Path) -> Result<SpecialTokens, TokenizerError> {
    let path = dir.join("tokenizer_config.json");
    let mut special = SpecialTokens {
        path: path.clone(),
        bos: DEFAULT_BOS.to_string(),
        eos: DEFAULT_EOS.to_string(),
        unk: DEFAULT_EOS.to_string(),
        pad: DEFAULT_EOS.to_string(),
        extra: Vec::new(),
        max_length: DEFAULT_MAX_LENGTH,
    };
    if !path.is_file() {
        return Ok(special);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| TokenizerError::Io {
        path: path.clone(),
        source,
    })?;
    let config: Value = serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
        path: path.clone(),
        source,
    })?;
    let invalid = |key: &str, message: &str| TokenizerError::InvalidConfig {
        path: path.clone(),
        key: key.to_string(),
        message: message.to_string(),
    };
    for (key, slot) in [
        ("bos_token", &mut special.bos),
        ("eos_token", &mut special.eos),
        ("unk_token", &mut special.unk),
        ("pad_token", &mut special.pad),
    ] {
        match config.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => {
                *slot =
                    token_content(v).ok_or_else(|| invalid(key, "expected a string or object"))?
            }
        }
    }
    if let Some(Value::Object(decoder)) = config.get("added_tokens_decoder") {
        for entry in decoder.values() {
            let is_special = entry
                .get("special")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if let (true, Some(content)) = (is_special, token_content(entry)) {
                special.extra.push(content);
            }
        }
    }
    match config.get("model_max_length") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let n = v
                .as_f64()
                .ok_or_else(|| invalid("model_max_length", "expected a number"))?;
            if !(n >= 2.0 && n <= MAX_SUPPORTED_LENGTH as f64 && n.fract() == 0.0) {
                return Err(invalid(
                    "model_max_length",
                    &format!("{n} is not an integer in 2..={MAX_SUPPORTED_LENGTH}"),
                ));
            }
            special.max_length = n as usize;
        }
    }
    Ok(special)
}

/// Builds CLIP's tokenizer from `vocab.json` + `merges.txt` as transformers' `CLIPConverter` does.
fn build_clip(
    vocab: &Path,
    merges: &Path,
    special: &SpecialTokens,
) -> Result<Tokenizer, TokenizerError> {
    let load_err = |path: &Path, e: &dyn std::fmt::Display| TokenizerError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let vocab_str = vocab
        .to_str()
        .ok_or_else(|| load_err(vocab, &"path is not valid UTF-8"))?;
    let merges_str = merges
        .to_str()
        .ok_or_else(|| load_err(merges, &"path is not valid UTF-8"))?;
    let bpe = BPE::from_file(vocab_str, merges_str)
        .unk_token(special.unk.clone())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_string())
        .fuse_unk(false)
        .byte_fallback(false)
        .build()
        .map_err(|e| load_err(vocab, &e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let replace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".to_string()),
        " ",
    )
    .map_err(|e| load_err(vocab, &e))?;
    tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
        NFC.into(),
        replace.into(),
        Lowercase.into(),
    ])));
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_REGEX.to_string()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| load_err(vocab, &e))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    let bos_id = token_id(&tokenizer, &special.bos, &special.path, "bos_token")?;
    let eos_id = token_id(&tokenizer, &special.eos, &special.path, "eos_token")?;
    tokenizer.with_post_processor(Some(
        RobertaProcessing::new((special.eos.clone(), eos_id), (special.bos.clone(), bos_id))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    tokenizer.with_decoder(Some(ByteLevel::new(true, true, true)));
    Ok(tokenizer)
}

/// Looks a token up in the vocabulary, naming the config key if it is missing.
fn token_id(
    tokenizer: &Tokenizer,
    token: &str,
    path: &Path,
    key: &str,
) -> Result<u32, TokenizerError> {
    tokenizer
        .token_to_id(token)
        .ok_or_else(|| TokenizerError::UnknownToken {
            path: path.to_path_buf(),
            key: key.to_string(),
            token: token.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pcpp-tok-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    #[test]
    fn missing_files_is_an_error() {
        let dir = temp_dir("empty");
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, TokenizerError::MissingFiles { .. }), "{err}");
    }

    #[test]
    fn bad_config_json_names_the_file() {
        let dir = temp_dir("badjson");
        std::fs::write(dir.join("tokenizer_config.json"), "{ not json").expect("write");
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    }

    #[test]
    fn bad_max_length_names_the_key() {
        let dir = temp_dir("badlen");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"model_max_length": 1e30}"#,
        )
        .expect("write");
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("model_max_length"), "{err}");
    }
}
