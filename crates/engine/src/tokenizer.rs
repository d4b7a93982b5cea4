//! Text to token ids and back, with the model's own `tokenizer.json`, and the set of ids
//! that end generation.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    eos: BTreeSet<u32>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory. End-of-sequence ids are gathered from
    /// `extra_eos` (config.json), `generation_config.json` and `tokenizer_config.json`.
    pub fn from_dir(dir: &Path, extra_eos: &[u32]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not found"),
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut eos: BTreeSet<u32> = extra_eos.iter().copied().collect();
        if let Some(json) = read_json(&dir.join("generation_config.json"))? {
            eos.extend(ids_of(json.get("eos_token_id")));
        }
        if let Some(json) = read_json(&dir.join("tokenizer_config.json"))? {
            let token = json
                .get("eos_token")
                .and_then(|t| t.as_str().or_else(|| t.get("content")?.as_str()));
            eos.extend(token.and_then(|t| inner.token_to_id(t)));
        }
        Ok(Tokenizer { inner, path, eos })
    }

    fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Token ids of `text`, special tokens in the text recognised, nothing added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| self.error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| self.error(e))
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    pub fn eos_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.eos.iter().copied()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The bytes one token stands for, which need not be whole UTF-8 characters (a byte-level
    /// BPE token may hold part of one): its text when that decodes whole, else its vocabulary
    /// entry mapped back through the byte-level alphabet.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let text = self.decode(&[id]).unwrap_or_default();
        if !text.contains('\u{FFFD}') {
            return text.into_bytes();
        }
        let entry = self.inner.id_to_token(id).unwrap_or_default();
        entry
            .chars()
            .map(byte_level_byte)
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| text.into_bytes())
    }
}

/// The byte a character of the byte-level BPE alphabet (GPT-2's) stands for: printable
/// Latin-1 characters for themselves, the other 68 bytes shifted to U+0100 and up in order.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = c as u32;
    if printable(code) {
        return u8::try_from(code).ok();
    }
    let shifted = code.checked_sub(256)?;
    (0..=255u32)
        .filter(|&b| !printable(b))
        .nth(shifted as usize)
        .and_then(|b| u8::try_from(b).ok())
}

/// Turns a growing list of ids into text pieces, holding back bytes of an unfinished
/// UTF-8 character until the token that completes it arrives.
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = tokenizer.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.is_char_boundary(before.len()) {
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(after[before.len()..].to_string())
        } else {
            Ok(String::new())
        }
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        error: source,
    })
}

fn ids_of(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
        Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bytes_join_into_the_text() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-qwen35moe-4bit");
        let tokenizer = Tokenizer::from_dir(&dir, &[]).expect("the bundled tokenizer loads");
        // Characters the small vocabulary splits into bytes, and a special token.
        let text = "naïve café: 3 € → 東京 🙂<|im_end|>";
        let ids = tokenizer.encode(text).expect("encodes");
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| tokenizer.token_bytes(id)).collect();
        assert_eq!(String::from_utf8_lossy(&bytes), text);
        assert!(
            ids.iter()
                .any(|&id| std::str::from_utf8(&tokenizer.token_bytes(id)).is_err()),
            "the text should hold a token that is part of a character"
        );
    }

    #[test]
    fn the_byte_level_alphabet_maps_back() {
        assert_eq!(byte_level_byte('a'), Some(b'a'));
        assert_eq!(byte_level_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_byte('Ċ'), Some(b'\n'));
        assert_eq!(byte_level_byte('\u{100}'), Some(0));
        assert_eq!(byte_level_byte('\u{143}'), Some(0xAD));
        assert_eq!(byte_level_byte('東'), None);
    }
}
