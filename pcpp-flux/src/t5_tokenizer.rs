//! The T5 tokenizer of a Flux folder (`tokenizer_2/tokenizer.json`, a SentencePiece Unigram model
//! as transformers' `T5TokenizerFast` saves it), with FluxPipeline's rules: the prompt plus `</s>`,
//! truncated and then padded with `<pad>` to exactly `max_sequence_length` ids.
//!
//! As transformers' `T5Tokenizer` (5.x) does, the vocabulary and normaliser come from the file and
//! the pre-tokeniser is always `WhitespaceSplit` then `Metaspace("▁", always, split)`, so runs
//! of whitespace (spaces, tabs, newlines) count as one word boundary whatever the file says.

use std::path::{Path, PathBuf};

use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::utils::padding::{PaddingDirection, PaddingParams, PaddingStrategy};
use tokenizers::utils::truncation::{TruncationDirection, TruncationParams, TruncationStrategy};
use tokenizers::Tokenizer;

use crate::error::{FluxError, Result};

/// FluxPipeline's default (and largest) `max_sequence_length`.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// The T5 tokenizer.
pub struct T5Tokenizer {
    path: PathBuf,
    tokenizer: Tokenizer,
    pad_id: u32,
}

/// A prompt encoded for T5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct T5Encoded {
    /// Exactly `max_sequence_length` ids.
    pub ids: Vec<u32>,
    /// Whether the prompt was cut to fit.
    pub truncated: bool,
}

impl T5Tokenizer {
    /// Loads `dir/tokenizer.json`; the pad token is `pad_token` of `tokenizer_config.json`
    /// (default `<pad>`).
    pub fn from_dir(dir: &Path) -> Result<T5Tokenizer> {
        let path = dir.join("tokenizer.json");
        let err = |msg: String| FluxError::Tokenizer {
            path: path.clone(),
            msg,
        };
        if !path.is_file() {
            return Err(err(
                "missing: the T5 tokenizer must be given as tokenizer.json".into(),
            ));
        }
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| err(e.to_string()))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::WhitespaceSplit(WhitespaceSplit),
            PreTokenizerWrapper::Metaspace(Metaspace::new('▁', PrependScheme::Always, true)),
        ]))));
        let pad = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                v.get("pad_token")
                    .and_then(|p| p.as_str())
                    .map(String::from)
            })
            .unwrap_or_else(|| "<pad>".into());
        let pad_id = tokenizer
            .token_to_id(&pad)
            .ok_or_else(|| err(format!("pad token `{pad}` is not in the vocabulary")))?;
        Ok(T5Tokenizer {
            path,
            tokenizer,
            pad_id,
        })
    }

    /// Encodes `prompt` to exactly `max_len` ids (prompt tokens, `</s>`, pads), as
    /// `tokenizer_2(prompt, padding="max_length", max_length=max_len, truncation=True)`.
    pub fn encode(&self, prompt: &str, max_len: usize) -> Result<T5Encoded> {
        let err = |msg: String| FluxError::Tokenizer {
            path: self.path.clone(),
            msg,
        };
        if max_len == 0 || max_len > MAX_SEQUENCE_LENGTH {
            return Err(FluxError::Input(format!(
                "max_sequence_length {max_len} must be in 1..={MAX_SEQUENCE_LENGTH}"
            )));
        }
        let full = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| err(e.to_string()))?;
        let truncated = full.get_ids().len() > max_len;
        let mut t = self.tokenizer.clone();
        t.with_truncation(Some(TruncationParams {
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| err(e.to_string()))?;
        t.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: self
                .tokenizer
                .id_to_token(self.pad_id)
                .unwrap_or_else(|| "<pad>".into()),
        }));
        let enc = t.encode(prompt, true).map_err(|e| err(e.to_string()))?;
        let ids = enc.get_ids().to_vec();
        if ids.len() != max_len {
            return Err(err(format!(
                "encoded to {} ids, expected {max_len}",
                ids.len()
            )));
        }
        Ok(T5Encoded { ids, truncated })
    }
}
