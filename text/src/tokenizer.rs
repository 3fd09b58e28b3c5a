//! Tokenizer: text -> token ids at the coordinator, token ids -> text when streaming.
//!
//! chat template -> prompt text --[Tokenizer::encode]--> ids --> prefill worker
//! decode worker --ids--> [IncrementalDetokenizer, built on Tokenizer::decode] --> text deltas
//!
//! A [`Tokenizer`] wraps a Hugging Face `tokenizers::Tokenizer` built from one of two sources:
//!
//! - GGUF metadata (`tokenizer.ggml.*`), reproducing what llama.cpp does with the same keys:
//!   `gpt2` (byte-level BPE from `tokens` and `merges`, pre-tokenizer chosen by
//!   `tokenizer.ggml.pre`) and `llama` (SentencePiece BPE from `tokens` and `scores`, `▁` for
//!   spaces, byte fallback), see [`Tokenizer::from_gguf`];
//! - a Hugging Face model directory (`tokenizer.json`, plus `tokenizer_config.json` and
//!   `generation_config.json` when present), see [`Tokenizer::from_hf_dir`].
//!
//! Invariants: a loaded tokenizer is immutable and cheap to clone (one `Arc`); its
//! [`Tokenizer::digest`] depends only on what it computes (vocabulary, merges, pre-tokenizer,
//! special tokens), never on hash-map iteration order, so two loads of one file agree.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value as GgufValue;
use serde_json::Value as Json;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{NFC, Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior,
};

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};

/// Version tag of the digest layout; bump it when the digested description changes.
const DIGEST_TAG: &[u8] = b"baton.tokenizer.v1\0";

/// SentencePiece's visible space, `▁` (U+2581).
const SPM_SPACE: &str = "\u{2581}";

/// GPT-2's pre-tokenizer regex, as in Hugging Face's `ByteLevel` pre-tokenizer (llama.cpp's
/// `LLAMA_VOCAB_PRE_TYPE_GPT2` implements the same split by hand).
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3's pre-tokenizer regex, from its tokenizer.json (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's pre-tokenizer regex, from its tokenizer.json (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen3.5's pre-tokenizer regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN35`): Qwen2's with marks
/// (`\p{M}`) kept with letters.
const QWEN35_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's fallback splits for `tokenizer.ggml.pre = "default"`, applied one after another.
const DEFAULT_REGEXES: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    GPT2_REGEX,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];

/// Texts llama.cpp recognises as end-of-turn tokens when the GGUF does not name them
/// (`special_eot_id` detection in llama-vocab.cpp); generation stops on them as on EOS.
const END_OF_TURN_TEXTS: [&str; 11] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

mod key {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    pub const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
    pub const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
    pub const PAD_ID: &str = "tokenizer.ggml.padding_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// GGUF `token_type` values (llama.cpp's `llama_token_type`).
mod token_type {
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
}

/// Converts text to token ids and back for one model. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    hf: tokenizers::Tokenizer,
    /// One past the largest id the tokenizer knows.
    vocab_size: usize,
    specials: SpecialIds,
    /// Ids of special (control) tokens, sorted; `decode(.., skip_special_tokens = true)` drops them.
    special_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
    digest: [u8; 32],
}

/// The ids a server needs to know about, resolved at load time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SpecialIds {
    bos: Option<u32>,
    /// Generation stops on any of these; the model's EOS first.
    eos: Vec<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata, the way
    /// llama.cpp reads the same keys. `path` names the file in errors.
    ///
    /// Supported `tokenizer.ggml.model` values:
    /// - `gpt2`: byte-level BPE from `tokens` and `merges`; the pre-tokenizer follows
    ///   `tokenizer.ggml.pre`: `default` (also when absent), `gpt2`/`gpt-2` family, `smollm`
    ///   (and the `starcoder` family sharing its regex), `llama-bpe`/`llama3`, `qwen2`, `qwen35`;
    /// - `llama`: SentencePiece BPE from `tokens` and `scores` with byte fallback.
    ///
    /// Tokens of type control (3) and unknown (2) become special tokens: text that spells them
    /// encodes to their id, and `decode(.., true)` drops them. User-defined tokens (4) are
    /// matched in text too but are not special.
    pub fn from_gguf(path: &Path, metadata: &HashMap<String, GgufValue>) -> Result<Tokenizer> {
        let meta = Metadata {
            path,
            map: metadata,
        };
        let model = meta.require_str(key::MODEL)?;
        let tokens = meta.require_strings(key::TOKENS)?;
        let types = match meta.get(key::TOKEN_TYPE) {
            Some(value) => {
                let types = meta.integers(key::TOKEN_TYPE, value)?;
                if types.len() != tokens.len() {
                    return Err(meta.invalid(
                        key::TOKEN_TYPE,
                        format!("has {} entries for {} tokens", types.len(), tokens.len()),
                    ));
                }
                types
            }
            None => vec![1; tokens.len()],
        };
        let vocab = vocab_from_tokens(&meta, &tokens)?;

        let (mut hf, default_add_bos) = match model {
            "gpt2" => {
                let pre_name = meta.optional_str(key::PRE)?.unwrap_or("default");
                let pre = BpePre::from_gguf_name(pre_name).ok_or_else(|| {
                    Error::UnsupportedPreTokenizer {
                        path: path.to_owned(),
                        pre: pre_name.to_owned(),
                    }
                })?;
                (
                    byte_level_bpe(&meta, vocab, pre)?,
                    pre.adds_bos_by_default(),
                )
            }
            "llama" => (sentencepiece_bpe(&meta, &tokens, &types, vocab)?, true),
            other => {
                return Err(Error::UnsupportedTokenizer {
                    path: path.to_owned(),
                    model: other.to_owned(),
                });
            }
        };

        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|&(_, &ty)| ty == token_type::CONTROL || ty == token_type::UNKNOWN)
            .map(|(&text, _)| AddedToken::from(text, true))
            .collect();
        let user_defined: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|&(_, &ty)| ty == token_type::USER_DEFINED)
            .map(|(&text, _)| AddedToken::from(text, false).normalized(false))
            .collect();
        hf.add_special_tokens(&special);
        hf.add_tokens(&user_defined);

        let n_tokens = tokens.len();
        let bos = meta.token_id(key::BOS_ID, n_tokens)?;
        let eos = meta.token_id(key::EOS_ID, n_tokens)?;
        let mut eos_ids: Vec<u32> = [eos, meta.token_id(key::EOT_ID, n_tokens)?]
            .into_iter()
            .chain([meta.token_id(key::EOM_ID, n_tokens)?])
            .flatten()
            .collect();
        // Like llama.cpp, control tokens that spell an end of turn also end generation, so a
        // chat model stops at `<|im_end|>` or `<|eot_id|>` even when its GGUF names another EOS.
        for (id, (&text, &ty)) in tokens.iter().zip(&types).enumerate() {
            if ty == token_type::CONTROL && END_OF_TURN_TEXTS.contains(&text) {
                eos_ids.push(id as u32);
            }
        }
        dedup_in_order(&mut eos_ids);
        let specials = SpecialIds {
            bos,
            eos: eos_ids,
            unk: meta.token_id(key::UNK_ID, n_tokens)?,
            pad: meta.token_id(key::PAD_ID, n_tokens)?,
        };

        let add_bos = meta.optional_bool(key::ADD_BOS)?.unwrap_or(default_add_bos);
        let add_eos = meta.optional_bool(key::ADD_EOS)?.unwrap_or(false);
        let bos_special = match (add_bos, bos) {
            (false, _) => None,
            (true, Some(id)) => Some((tokens[id as usize], id)),
            (true, None) => {
                return Err(meta.invalid(
                    key::ADD_BOS,
                    format!("is true but {} is not set", key::BOS_ID),
                ));
            }
        };
        let eos_special = match (add_eos, eos) {
            (false, _) => None,
            (true, Some(id)) => Some((tokens[id as usize], id)),
            (true, None) => {
                return Err(meta.invalid(
                    key::ADD_EOS,
                    format!("is true but {} is not set", key::EOS_ID),
                ));
            }
        };
        if let Some(processor) = bos_eos_processor(bos_special, eos_special)
            .map_err(|reason| meta.invalid(key::TOKENS, reason))?
        {
            hf.with_post_processor(Some(processor));
        }

        let chat_template = match meta.optional_str(key::CHAT_TEMPLATE)? {
            Some(source) => Some(ChatTemplate::new(
                source,
                bos.map(|id| tokens[id as usize].to_owned()),
                eos.map(|id| tokens[id as usize].to_owned()),
            )?),
            None => None,
        };

        Inner::build(hf, specials, chat_template)
            .map_err(|reason| meta.invalid(key::TOKENS, reason))
    }

    /// Loads the tokenizer of a model path the way the engine finds the model: a `.gguf` file
    /// (its metadata) or a Hugging Face directory. Reads no tensors.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        if path.is_dir() {
            return Tokenizer::from_hf_dir(path);
        }
        let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let corrupt = |reason: String| Error::CorruptFile {
            path: path.to_path_buf(),
            format: "GGUF",
            reason,
        };
        // candle's reader panics on some malformed headers (the engine guards it the same way).
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            candle_core::quantized::gguf_file::Content::read(&mut file)
        }));
        let content = match read {
            Ok(Ok(content)) => content,
            Ok(Err(e)) => return Err(corrupt(e.to_string())),
            Err(_) => return Err(corrupt("the GGUF reader panicked on the header".into())),
        };
        Tokenizer::from_gguf(path, &content.metadata)
    }

    /// Loads a Hugging Face model directory: `tokenizer.json` (required), `tokenizer_config.json`
    /// (chat template, BOS/EOS/PAD/UNK tokens, `add_bos_token`, `add_eos_token`) and
    /// `generation_config.json` (EOS ids) when present. A `chat_template.jinja` file, which newer
    /// `transformers` versions write, takes precedence over the config's `chat_template`.
    ///
    /// When the config sets `add_bos_token` or `add_eos_token`, the BOS/EOS insertion is rebuilt
    /// from those flags, as `transformers` does; otherwise `tokenizer.json`'s post-processor stays.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        let tokenizer_path = dir.join("tokenizer.json");
        let bytes = read_file(&tokenizer_path)?;
        let mut hf =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|err| Error::CorruptFile {
                path: tokenizer_path.clone(),
                format: "tokenizer.json",
                reason: err.to_string(),
            })?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional_json(&config_path)?.unwrap_or(Json::Null);
        let generation_path = dir.join("generation_config.json");
        let generation = read_optional_json(&generation_path)?.unwrap_or(Json::Null);
        let config_file = HfConfig {
            path: &config_path,
            json: &config,
        };

        let bos_text = config_file.token_text("bos_token")?;
        let eos_text = config_file.token_text("eos_token")?;
        let lookup = |text: &Option<String>| text.as_deref().and_then(|t| hf.token_to_id(t));
        let bos =
            lookup(&bos_text).or_else(|| id_field(&generation, "bos_token_id").first().copied());
        let mut eos = id_field(&generation, "eos_token_id");
        eos.extend(lookup(&eos_text));
        dedup_in_order(&mut eos);
        let specials = SpecialIds {
            bos,
            eos,
            unk: lookup(&config_file.token_text("unk_token")?),
            pad: lookup(&config_file.token_text("pad_token")?),
        };

        let add_bos = config_file.optional_bool("add_bos_token")?;
        let add_eos = config_file.optional_bool("add_eos_token")?;
        if add_bos.is_some() || add_eos.is_some() {
            let bos_id = lookup(&bos_text);
            let eos_id = lookup(&eos_text);
            let processor = bos_eos_processor(
                config_file.added_token(add_bos, "bos_token", bos_text.as_deref(), bos_id)?,
                config_file.added_token(add_eos, "eos_token", eos_text.as_deref(), eos_id)?,
            )
            .map_err(|reason| config_file.invalid(reason))?;
            hf.with_post_processor(processor);
        }

        let template_file = dir.join("chat_template.jinja");
        let template_source = if template_file.is_file() {
            let bytes = read_file(&template_file)?;
            Some(String::from_utf8(bytes).map_err(|err| Error::CorruptFile {
                path: template_file.clone(),
                format: "jinja template",
                reason: err.to_string(),
            })?)
        } else {
            config_file.chat_template()?
        };
        let chat_template = template_source
            .map(|source| ChatTemplate::new(source, bos_text.clone(), eos_text.clone()))
            .transpose()?;

        Inner::build(hf, specials, chat_template).map_err(|reason| Error::CorruptFile {
            path: tokenizer_path,
            format: "tokenizer.json",
            reason,
        })
    }

    /// Encodes `text` to token ids. Special tokens written in the text (`<|im_start|>`) become
    /// their ids. With `add_special_tokens` the model's BOS/EOS are added where its tokenizer
    /// says so (`add_bos_token`); a rendered chat template already contains them, so encode it
    /// with `false`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .hf
            .encode_fast(text, add_special_tokens)
            .map_err(|err| Error::Tokenizer(format!("encode failed: {err}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes token ids to text. Bytes that do not form whole UTF-8 characters become U+FFFD;
    /// [`crate::IncrementalDetokenizer`] avoids emitting those while streaming. An id outside the
    /// vocabulary is [`Error::TokenOutOfRange`].
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let vocab_size = self.inner.vocab_size;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(Error::TokenOutOfRange { id, vocab_size });
        }
        self.inner
            .hf
            .decode(ids, skip_special_tokens)
            .map_err(|err| Error::Tokenizer(format!("decode failed: {err}")))
    }

    /// Ids on which generation stops: the model's EOS first, then end-of-turn tokens.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.inner.specials.eos
    }

    /// The model's beginning-of-sequence token, if it has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.specials.bos
    }

    /// The padding token, if the model names one.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.inner.specials.pad
    }

    /// The unknown token, if the model names one.
    pub fn unk_token_id(&self) -> Option<u32> {
        self.inner.specials.unk
    }

    /// Number of token ids: one past the largest id, special tokens included. Sampling must stay
    /// below it even when the model's embedding has padding rows past it.
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    /// The model's chat template, or `None` when it ships none.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.inner.chat_template.as_ref()
    }

    /// The vocabulary entry for `id` as stored (byte-level pieces look like `Ġworld`,
    /// SentencePiece pieces like `▁world`); `None` outside the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.hf.id_to_token(id)
    }

    /// The id of a vocabulary entry spelled as stored (see [`Tokenizer::id_to_token`]).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.hf.token_to_id(token)
    }

    /// Whether `id` is a special (control) token, which `decode(.., true)` drops.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.special_ids.binary_search(&id).is_ok()
    }

    /// This tokenizer in Hugging Face's `tokenizer.json` format, which [`Tokenizer::from_hf_dir`]
    /// reads back (special ids and the chat template live in the other files of that directory).
    pub fn to_tokenizer_json(&self) -> Result<String> {
        self.inner
            .hf
            .to_string(false)
            .map_err(|err| Error::Tokenizer(format!("cannot serialize: {err}")))
    }

    /// Feeds a deterministic description of this tokenizer into `hasher`: its whole pipeline
    /// (vocabulary, merges or scores, normalizer, pre-tokenizer, post-processor, decoder, added
    /// tokens) and its special ids. Part of the model fingerprint. The chat template is not
    /// included: it shapes prompts, not what a token id means.
    pub fn digest(&self, hasher: &mut blake3::Hasher) {
        hasher.update(&self.inner.digest);
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        f.debug_struct("Tokenizer")
            .field("vocab_size", &inner.vocab_size)
            .field("bos", &inner.specials.bos)
            .field("eos", &inner.specials.eos)
            .field("chat_template", &inner.chat_template.is_some())
            .finish()
    }
}

impl Inner {
    /// Finishes a tokenizer: sizes, special ids and digest. Errors are reasons for the caller to
    /// attach to its file.
    fn build(
        hf: tokenizers::Tokenizer,
        specials: SpecialIds,
        chat_template: Option<ChatTemplate>,
    ) -> Result<Tokenizer, String> {
        let vocab_size = hf
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&max| max as usize + 1);
        let mut special_ids: Vec<u32> = hf
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, token)| token.special)
            .map(|(&id, _)| id)
            .collect();
        special_ids.sort_unstable();
        let digest = digest_of(&hf, &specials)?;
        Ok(Tokenizer {
            inner: Arc::new(Inner {
                hf,
                vocab_size,
                specials,
                special_ids,
                chat_template,
                digest,
            }),
        })
    }
}

/// Byte-level BPE pre-tokenizers, named by GGUF `tokenizer.ggml.pre` the way llama.cpp groups
/// them (`llama_vocab::impl::load` and `llm_tokenizer_bpe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BpePre {
    /// llama.cpp's fallback: punctuation runs, GPT-2 split, digit runs, then digit triples.
    Default,
    /// GPT-2's regex alone.
    Gpt2,
    /// Each digit alone, then GPT-2's regex (SmolLM, StarCoder).
    Smollm,
    /// Llama 3's regex; whole words found in the vocabulary skip the merges.
    Llama3,
    /// Qwen2's regex after NFC normalization. llama.cpp skips the NFC step; Qwen2's
    /// tokenizer.json (and its Python tokenizer) apply it, so text with decomposed accents
    /// encodes as the model saw it in training.
    Qwen2,
    /// Qwen3.5's regex, without normalization (its test vectors keep decomposed accents).
    Qwen35,
}

impl BpePre {
    fn from_gguf_name(name: &str) -> Option<Self> {
        Some(match name {
            "default" => BpePre::Default,
            "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" => BpePre::Gpt2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => BpePre::Smollm,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => BpePre::Llama3,
            "qwen2" | "deepseek-r1-qwen" => BpePre::Qwen2,
            "qwen35" => BpePre::Qwen35,
            _ => return None,
        })
    }

    /// llama.cpp turns `add_bos` on for the Llama 3 family unless the file says otherwise.
    fn adds_bos_by_default(self) -> bool {
        self == BpePre::Llama3
    }
}

fn byte_level_bpe(meta: &Metadata<'_>, vocab: Vocab, pre: BpePre) -> Result<tokenizers::Tokenizer> {
    let merges = meta
        .require_strings(key::MERGES)?
        .into_iter()
        .enumerate()
        .map(|(rank, merge)| {
            // llama.cpp splits at the first space after the first byte.
            merge
                .bytes()
                .skip(1)
                .position(|b| b == b' ')
                .map(|pos| (merge[..pos + 1].to_owned(), merge[pos + 2..].to_owned()))
                .ok_or_else(|| {
                    meta.invalid(
                        key::MERGES,
                        format!("entry {rank} ({merge:?}) has no space"),
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre == BpePre::Llama3)
        .build()
        .map_err(|err| meta.invalid(key::MERGES, err.to_string()))?;

    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        Split::new(
            SplitPattern::Regex(pattern.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(Into::into)
        .map_err(|err| meta.invalid(key::PRE, format!("pre-tokenizer regex: {err}")))
    };
    // `ByteLevel` only maps bytes to its alphabet once the text is split; with `use_regex` it
    // splits with GPT-2's regex first, as GPT-2 and SmolLM's tokenizer.json do.
    let bytes_only: PreTokenizerWrapper = ByteLevel::new(false, true, false).into();
    let gpt2: PreTokenizerWrapper = ByteLevel::new(false, true, true).into();
    let (normalizer, pre_tokenizer): (Option<NormalizerWrapper>, PreTokenizerWrapper) = match pre {
        BpePre::Default => {
            let mut steps = DEFAULT_REGEXES
                .iter()
                .map(|pattern| split(pattern))
                .collect::<Result<Vec<_>>>()?;
            steps.push(bytes_only);
            (None, PreTokenizerSequence::new(steps).into())
        }
        BpePre::Gpt2 => (None, gpt2),
        BpePre::Smollm => (
            None,
            PreTokenizerSequence::new(vec![Digits::new(true).into(), gpt2]).into(),
        ),
        BpePre::Llama3 => (
            None,
            PreTokenizerSequence::new(vec![split(LLAMA3_REGEX)?, bytes_only]).into(),
        ),
        BpePre::Qwen2 => (
            Some(NFC.into()),
            PreTokenizerSequence::new(vec![split(QWEN2_REGEX)?, bytes_only]).into(),
        ),
        BpePre::Qwen35 => (
            None,
            PreTokenizerSequence::new(vec![split(QWEN35_REGEX)?, bytes_only]).into(),
        ),
    };

    let mut hf = tokenizers::Tokenizer::new(model);
    hf.with_normalizer(normalizer);
    hf.with_pre_tokenizer(Some(pre_tokenizer));
    hf.with_decoder(Some(ByteLevel::default()));
    Ok(hf)
}

/// SentencePiece BPE as Hugging Face's `LlamaConverter` builds it (legacy mode, which is what
/// llama.cpp implements): `▁` for spaces with one prepended to each text run, merges derived
/// from the scores, byte fallback through the `<0xNN>` tokens.
fn sentencepiece_bpe(
    meta: &Metadata<'_>,
    tokens: &[&str],
    types: &[i64],
    vocab: Vocab,
) -> Result<tokenizers::Tokenizer> {
    let scores = match meta.get(key::SCORES) {
        Some(value) => meta.floats(key::SCORES, value)?,
        None => return Err(meta.missing(key::SCORES)),
    };
    if scores.len() != tokens.len() {
        return Err(meta.invalid(
            key::SCORES,
            format!("has {} entries for {} tokens", scores.len(), tokens.len()),
        ));
    }
    let merges = merges_from_scores(tokens, &scores, &vocab);

    let unk = meta.token_id(key::UNK_ID, tokens.len())?.or_else(|| {
        types
            .iter()
            .position(|&ty| ty == token_type::UNKNOWN)
            .map(|id| id as u32)
    });
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(tokens[unk as usize].to_owned());
    }
    let model = builder
        .build()
        .map_err(|err| meta.invalid(key::SCORES, err.to_string()))?;

    let add_space_prefix = meta.optional_bool(key::ADD_SPACE_PREFIX)?.unwrap_or(true);
    let to_spm_space =
        Replace::new(" ", SPM_SPACE).map_err(|err| meta.invalid(key::TOKENS, err.to_string()))?;
    let from_spm_space =
        Replace::new(SPM_SPACE, " ").map_err(|err| meta.invalid(key::TOKENS, err.to_string()))?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![
            Prepend::new(SPM_SPACE.to_owned()).into(),
            to_spm_space.into(),
        ])
        .into()
    } else {
        to_spm_space.into()
    };
    let mut decoders: Vec<DecoderWrapper> = vec![
        from_spm_space.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }

    let mut hf = tokenizers::Tokenizer::new(model);
    hf.with_normalizer(Some(normalizer));
    hf.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(hf)
}

/// BPE merges equivalent to SentencePiece's score-driven merging, built exactly like Hugging
/// Face's `SentencePieceExtractor`: every split of a piece into two pieces of the vocabulary is
/// a merge; merges are ordered by the merged piece's score, highest first, ties in vocabulary
/// order (then by the ids of the two halves).
fn merges_from_scores(tokens: &[&str], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut merges: Vec<(u32, u32, f32)> = Vec::new();
    for (&piece, &score) in tokens.iter().zip(scores) {
        let start = merges.len();
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                merges.push((l, r, score));
            }
        }
        merges[start..].sort_by_key(|&(l, r, _)| (l, r));
    }
    // Stable, so equal scores keep the order above.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| (tokens[l as usize].to_owned(), tokens[r as usize].to_owned()))
        .collect()
}

fn vocab_from_tokens(meta: &Metadata<'_>, tokens: &[&str]) -> Result<Vocab> {
    let mut vocab = Vocab::default();
    vocab.reserve(tokens.len());
    for (id, &token) in tokens.iter().enumerate() {
        if let Some(first) = vocab.insert(token.to_owned(), id as u32) {
            return Err(meta.invalid(
                key::TOKENS,
                format!("token {token:?} appears twice, as ids {first} and {id}"),
            ));
        }
    }
    if u32::try_from(tokens.len()).is_err() {
        return Err(meta.invalid(key::TOKENS, "has more than 2^32 entries"));
    }
    Ok(vocab)
}

/// A `TemplateProcessing` that adds BOS before and EOS after a sequence, or `None` when neither
/// is added. Built from its JSON form, which (unlike the `"<s>:0 $A:0"` shorthand) takes any
/// token text.
fn bos_eos_processor(
    bos: Option<(&str, u32)>,
    eos: Option<(&str, u32)>,
) -> Result<Option<PostProcessorWrapper>, String> {
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let special = |text: &str| serde_json::json!({ "SpecialToken": { "id": text, "type_id": 0 } });
    let sequence = |id: &str| serde_json::json!({ "Sequence": { "id": id, "type_id": 0 } });
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special_tokens = serde_json::Map::new();
    if let Some((text, id)) = bos {
        single.push(special(text));
        pair.push(special(text));
        special_tokens.insert(
            text.to_owned(),
            serde_json::json!({ "id": text, "ids": [id], "tokens": [text] }),
        );
    }
    single.push(sequence("A"));
    pair.push(sequence("A"));
    if let Some((text, _)) = eos {
        single.push(special(text));
        pair.push(special(text));
    }
    if let Some((text, _)) = bos {
        pair.push(special(text));
    }
    pair.push(sequence("B"));
    if let Some((text, id)) = eos {
        pair.push(special(text));
        special_tokens.insert(
            text.to_owned(),
            serde_json::json!({ "id": text, "ids": [id], "tokens": [text] }),
        );
    }
    let json = serde_json::json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    });
    let processor: TemplateProcessing =
        serde_json::from_value(json).map_err(|err| format!("bos/eos template: {err}"))?;
    Ok(Some(processor.into()))
}

/// The tokenizer's canonical description, hashed: its serialized pipeline with object keys
/// sorted (so map order never matters), then the special ids.
fn digest_of(hf: &tokenizers::Tokenizer, specials: &SpecialIds) -> Result<[u8; 32], String> {
    let serialized = hf
        .to_string(false)
        .map_err(|err| format!("cannot serialize tokenizer for its digest: {err}"))?;
    let json: Json = serde_json::from_str(&serialized)
        .map_err(|err| format!("cannot reparse tokenizer for its digest: {err}"))?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(DIGEST_TAG);
    hash_canonical(&json, &mut hasher);
    let id = |hasher: &mut blake3::Hasher, id: Option<u32>| match id {
        Some(id) => {
            hasher.update(&[1]);
            hasher.update(&id.to_le_bytes());
        }
        None => {
            hasher.update(&[0]);
        }
    };
    id(&mut hasher, specials.bos);
    id(&mut hasher, specials.unk);
    id(&mut hasher, specials.pad);
    hasher.update(&(specials.eos.len() as u64).to_le_bytes());
    for &eos in &specials.eos {
        hasher.update(&eos.to_le_bytes());
    }
    Ok(*hasher.finalize().as_bytes())
}

/// Feeds `value` into `hasher` unambiguously: a type byte, lengths before contents, object
/// entries in key order.
fn hash_canonical(value: &Json, hasher: &mut blake3::Hasher) {
    let bytes = |hasher: &mut blake3::Hasher, b: &[u8]| {
        hasher.update(&(b.len() as u64).to_le_bytes());
        hasher.update(b);
    };
    match value {
        Json::Null => {
            hasher.update(b"n");
        }
        Json::Bool(b) => {
            hasher.update(if *b { b"t" } else { b"f" });
        }
        Json::Number(n) => {
            hasher.update(b"#");
            bytes(hasher, n.to_string().as_bytes());
        }
        Json::String(s) => {
            hasher.update(b"s");
            bytes(hasher, s.as_bytes());
        }
        Json::Array(items) => {
            hasher.update(b"[");
            hasher.update(&(items.len() as u64).to_le_bytes());
            for item in items {
                hash_canonical(item, hasher);
            }
        }
        Json::Object(map) => {
            hasher.update(b"{");
            hasher.update(&(map.len() as u64).to_le_bytes());
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (k, v) in entries {
                bytes(hasher, k.as_bytes());
                hash_canonical(v, hasher);
            }
        }
    }
}

fn dedup_in_order(ids: &mut Vec<u32>) {
    let mut seen = HashSet::new();
    ids.retain(|id| seen.insert(*id));
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_optional_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|err| Error::CorruptFile {
            path: path.to_owned(),
            format: "json",
            reason: err.to_string(),
        })
}

/// Ids from a `generation_config.json` field that holds one id or a list of them.
fn id_field(json: &Json, field: &str) -> Vec<u32> {
    let as_id = |v: &Json| v.as_u64().and_then(|id| u32::try_from(id).ok());
    match json.get(field) {
        Some(Json::Array(items)) => items.iter().filter_map(as_id).collect(),
        Some(v) => as_id(v).into_iter().collect(),
        None => Vec::new(),
    }
}

/// `tokenizer_config.json`, read leniently: absent fields are `None`, wrongly typed ones errors.
struct HfConfig<'a> {
    path: &'a Path,
    json: &'a Json,
}

impl HfConfig<'_> {
    fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::CorruptFile {
            path: self.path.to_owned(),
            format: "tokenizer_config.json",
            reason: reason.into(),
        }
    }

    /// A special token's text; `transformers` writes either `"<s>"` or `{"content": "<s>", ..}`.
    fn token_text(&self, field: &str) -> Result<Option<String>> {
        match self.json.get(field) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.clone())),
            Some(Json::Object(obj)) => match obj.get("content") {
                Some(Json::String(s)) => Ok(Some(s.clone())),
                _ => Err(self.invalid(format!("{field} has no string \"content\""))),
            },
            Some(_) => Err(self.invalid(format!("{field} is neither a string nor an object"))),
        }
    }

    /// The token `add_<field>` asks to add, if it does; it must be in the vocabulary.
    fn added_token<'t>(
        &self,
        add: Option<bool>,
        field: &str,
        text: Option<&'t str>,
        id: Option<u32>,
    ) -> Result<Option<(&'t str, u32)>> {
        match (add.unwrap_or(false), text, id) {
            (false, _, _) => Ok(None),
            (true, Some(text), Some(id)) => Ok(Some((text, id))),
            (true, _, _) => Err(self.invalid(format!(
                "add_{field} is true but {field} is missing or not in the vocabulary"
            ))),
        }
    }

    fn optional_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.json.get(field) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.invalid(format!("{field} is not a boolean"))),
        }
    }

    /// `chat_template` is a string, or a list of `{"name", "template"}` of which `default` is
    /// the chat template.
    fn chat_template(&self) -> Result<Option<String>> {
        match self.json.get("chat_template") {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.clone())),
            Some(Json::Array(items)) => Ok(items.iter().find_map(|item| {
                (item.get("name")?.as_str()? == "default")
                    .then(|| item.get("template")?.as_str().map(str::to_owned))
                    .flatten()
            })),
            Some(_) => Err(self.invalid("chat_template is neither a string nor a list")),
        }
    }
}

/// Typed access to GGUF metadata, with errors that name the file and the key.
struct Metadata<'a> {
    path: &'a Path,
    map: &'a HashMap<String, GgufValue>,
}

impl<'a> Metadata<'a> {
    fn get(&self, key: &str) -> Option<&'a GgufValue> {
        self.map.get(key)
    }

    fn missing(&self, key: &str) -> Error {
        Error::MissingMetadata {
            path: self.path_buf(),
            key: key.to_owned(),
        }
    }

    fn invalid(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::InvalidMetadata {
            path: self.path_buf(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    fn path_buf(&self) -> PathBuf {
        self.path.to_owned()
    }

    fn require_str(&self, key: &str) -> Result<&'a str> {
        self.optional_str(key)?.ok_or_else(|| self.missing(key))
    }

    fn optional_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.invalid(
                key,
                format!("expected a string, found {:?}", other.value_type()),
            )),
        }
    }

    fn optional_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.invalid(
                key,
                format!("expected a bool, found {:?}", other.value_type()),
            )),
        }
    }

    fn require_strings(&self, key: &str) -> Result<Vec<&'a str>> {
        let items = match self.get(key) {
            None => return Err(self.missing(key)),
            Some(GgufValue::Array(items)) => items,
            Some(other) => {
                return Err(self.invalid(
                    key,
                    format!("expected an array, found {:?}", other.value_type()),
                ));
            }
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                GgufValue::String(s) => Ok(s.as_str()),
                other => Err(self.invalid(
                    key,
                    format!("entry {i} is {:?}, not a string", other.value_type()),
                )),
            })
            .collect()
    }

    fn integers(&self, key: &str, value: &GgufValue) -> Result<Vec<i64>> {
        let GgufValue::Array(items) = value else {
            return Err(self.invalid(
                key,
                format!("expected an array, found {:?}", value.value_type()),
            ));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                integer(item).ok_or_else(|| {
                    self.invalid(
                        key,
                        format!("entry {i} is {:?}, not an integer", item.value_type()),
                    )
                })
            })
            .collect()
    }

    fn floats(&self, key: &str, value: &GgufValue) -> Result<Vec<f32>> {
        let GgufValue::Array(items) = value else {
            return Err(self.invalid(
                key,
                format!("expected an array, found {:?}", value.value_type()),
            ));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                GgufValue::F32(x) => Ok(*x),
                GgufValue::F64(x) => Ok(*x as f32),
                // llama.cpp also accepts integer scores.
                other => integer(other).map(|x| x as f32).ok_or_else(|| {
                    self.invalid(
                        key,
                        format!("entry {i} is {:?}, not a number", other.value_type()),
                    )
                }),
            })
            .collect()
    }

    /// A token id key. Like llama.cpp, an id outside the vocabulary is ignored (with a warning)
    /// rather than fatal; a value that is not an integer is an error.
    fn token_id(&self, key: &str, n_tokens: usize) -> Result<Option<u32>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let id = integer(value).ok_or_else(|| {
            self.invalid(
                key,
                format!("expected an integer, found {:?}", value.value_type()),
            )
        })?;
        match u32::try_from(id) {
            Ok(id) if (id as usize) < n_tokens => Ok(Some(id)),
            _ => {
                tracing::warn!(path = %self.path.display(), key, id, n_tokens, "special token id outside the vocabulary, ignored");
                Ok(None)
            }
        }
    }
}

fn integer(value: &GgufValue) -> Option<i64> {
    match *value {
        GgufValue::U8(x) => Some(x.into()),
        GgufValue::I8(x) => Some(x.into()),
        GgufValue::U16(x) => Some(x.into()),
        GgufValue::I16(x) => Some(x.into()),
        GgufValue::U32(x) => Some(x.into()),
        GgufValue::I32(x) => Some(x.into()),
        GgufValue::U64(x) => i64::try_from(x).ok(),
        GgufValue::I64(x) => Some(x),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A byte-level tokenizer over [`tiny_gpt2_metadata`]`("gpt2")`: control tokens
    /// `<|endoftext|>` (0, BOS) and `<|im_end|>` (1, EOS), every byte symbol, merges up to `hello`.
    pub(crate) fn tiny_byte_level_tokenizer() -> Tokenizer {
        Tokenizer::from_gguf(path(), &tiny_gpt2_metadata("gpt2")).expect("tiny tokenizer loads")
    }

    /// A tiny byte-level vocabulary: every byte's symbol, a few merges, two control tokens.
    fn tiny_gpt2_metadata(pre: &str) -> HashMap<String, GgufValue> {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_end|>".into()];
        let byte_symbols = ByteLevel::alphabet();
        let mut byte_symbols: Vec<char> = byte_symbols.into_iter().collect();
        byte_symbols.sort_unstable();
        tokens.extend(byte_symbols.iter().map(|c| c.to_string()));
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "3 4"];
        for merge in merges {
            tokens.push(merge.replace(' ', ""));
        }
        let mut types = vec![GgufValue::I32(3), GgufValue::I32(3)];
        types.resize(tokens.len(), GgufValue::I32(1));
        let strings = |items: Vec<String>| {
            GgufValue::Array(items.into_iter().map(GgufValue::String).collect())
        };
        HashMap::from([
            (key::MODEL.to_owned(), GgufValue::String("gpt2".into())),
            (key::PRE.to_owned(), GgufValue::String(pre.into())),
            (key::TOKENS.to_owned(), strings(tokens)),
            (key::TOKEN_TYPE.to_owned(), GgufValue::Array(types)),
            (
                key::MERGES.to_owned(),
                strings(merges.iter().map(|m| m.to_string()).collect()),
            ),
            (key::EOS_ID.to_owned(), GgufValue::U32(1)),
            (key::BOS_ID.to_owned(), GgufValue::U32(0)),
        ])
    }

    fn path() -> &'static Path {
        Path::new("tiny.gguf")
    }

    #[test]
    fn tiny_byte_level_vocab_encodes_with_merges_and_specials() {
        let tok = Tokenizer::from_gguf(path(), &tiny_gpt2_metadata("gpt2")).expect("loads");
        let ids = tok.encode("hello<|im_end|>", false).expect("encodes");
        assert_eq!(tok.id_to_token(ids[0]).as_deref(), Some("hello"));
        assert_eq!(ids[1], 1);
        assert_eq!(tok.decode(&ids, true).expect("decodes"), "hello");
        assert_eq!(tok.decode(&ids, false).expect("decodes"), "hello<|im_end|>");
        // `<|im_end|>` is the EOS and `<|endoftext|>` an end-of-turn text, so both stop generation.
        assert_eq!(tok.eos_token_ids(), &[1, 0]);
        assert!(tok.is_special(0) && tok.is_special(1) && !tok.is_special(2));
    }

    #[test]
    fn add_bos_token_prepends_bos_only_with_special_tokens() {
        let mut meta = tiny_gpt2_metadata("gpt2");
        meta.insert(key::ADD_BOS.to_owned(), GgufValue::Bool(true));
        let tok = Tokenizer::from_gguf(path(), &meta).expect("loads");
        let plain = tok.encode("hello", false).expect("encodes");
        let with_bos = tok.encode("hello", true).expect("encodes");
        assert_eq!(with_bos[0], 0);
        assert_eq!(&with_bos[1..], &plain[..]);
    }

    #[test]
    fn llama3_pre_adds_bos_by_default_like_llama_cpp() {
        let tok = Tokenizer::from_gguf(path(), &tiny_gpt2_metadata("llama-bpe")).expect("loads");
        assert_eq!(
            tok.encode("hello", true).expect("encodes").first(),
            Some(&0)
        );
    }

    #[test]
    fn default_pre_splits_digit_runs_into_triples() {
        let pieces = |pre: &str| -> Vec<String> {
            let tok = Tokenizer::from_gguf(path(), &tiny_gpt2_metadata(pre)).expect("loads");
            let ids = tok.encode("1234567", false).expect("encodes");
            ids.iter().filter_map(|&id| tok.id_to_token(id)).collect()
        };
        // The vocabulary merges "3 4": GPT-2 keeps the digit run whole, so it applies; llama.cpp's
        // default splits "123|456|7", so it cannot; SmolLM splits every digit.
        assert_eq!(pieces("gpt2"), ["1", "2", "34", "5", "6", "7"]);
        assert_eq!(pieces("default"), ["1", "2", "3", "4", "5", "6", "7"]);
        assert_eq!(pieces("smollm"), ["1", "2", "3", "4", "5", "6", "7"]);
    }

    #[test]
    fn out_of_range_id_is_a_typed_error() {
        let tok = Tokenizer::from_gguf(path(), &tiny_gpt2_metadata("gpt2")).expect("loads");
        let n = tok.vocab_size() as u32;
        match tok.decode(&[2, n], false) {
            Err(Error::TokenOutOfRange { id, vocab_size }) => {
                assert_eq!((id, vocab_size), (n, n as usize))
            }
            other => panic!("expected TokenOutOfRange, got {other:?}"),
        }
    }

    #[test]
    fn unknown_pre_tokenizer_is_a_typed_error() {
        match Tokenizer::from_gguf(path(), &tiny_gpt2_metadata("klingon")) {
            Err(Error::UnsupportedPreTokenizer { pre, .. }) => assert_eq!(pre, "klingon"),
            other => panic!("expected UnsupportedPreTokenizer, got {other:?}"),
        }
    }

    #[test]
    fn duplicate_token_is_invalid_metadata() {
        let mut meta = tiny_gpt2_metadata("gpt2");
        if let Some(GgufValue::Array(tokens)) = meta.get_mut(key::TOKENS) {
            tokens[3] = tokens[2].clone();
        }
        assert!(matches!(
            Tokenizer::from_gguf(path(), &meta),
            Err(Error::InvalidMetadata { key, .. }) if key == key::TOKENS
        ));
    }

    #[test]
    fn digest_is_stable_across_loads_and_sees_special_ids() {
        let digest = |meta: &HashMap<String, GgufValue>| {
            let tok = Tokenizer::from_gguf(path(), meta).expect("loads");
            let mut hasher = blake3::Hasher::new();
            tok.digest(&mut hasher);
            hasher.finalize()
        };
        let meta = tiny_gpt2_metadata("gpt2");
        assert_eq!(digest(&meta), digest(&meta));
        let mut other_eos = meta.clone();
        other_eos.insert(key::EOS_ID.to_owned(), GgufValue::U32(2));
        assert_ne!(digest(&meta), digest(&other_eos));
        assert_ne!(digest(&meta), digest(&tiny_gpt2_metadata("smollm")));
    }

    #[test]
    fn sentencepiece_merges_follow_scores_then_vocab_order() {
        let tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, -1.0, -1.0, -1.0, -2.0, -1.5, -0.5];
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges = merges_from_scores(&tokens, &scores, &vocab);
        let merges: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        // "abc" (score -0.5) splits two ways, ordered by the left half's id; then "bc", then "ab".
        assert_eq!(merges, [("a", "bc"), ("ab", "c"), ("b", "c"), ("a", "b")]);
    }

    #[test]
    fn sentencepiece_vocab_uses_spaces_and_byte_fallback() {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        let words = ["▁", "h", "i", "▁h", "▁hi"];
        tokens.extend(words.iter().map(|w| w.to_string()));
        let mut types = vec![GgufValue::I32(2), GgufValue::I32(3), GgufValue::I32(3)];
        types.extend((0..256).map(|_| GgufValue::I32(6)));
        types.extend(words.iter().map(|_| GgufValue::I32(1)));
        let mut scores: Vec<GgufValue> = (0..259).map(|_| GgufValue::F32(0.0)).collect();
        scores.extend([-1.0f32, -2.0, -2.0, -3.0, -4.0].map(GgufValue::F32));
        let strings = GgufValue::Array(tokens.iter().cloned().map(GgufValue::String).collect());
        let meta = HashMap::from([
            (key::MODEL.to_owned(), GgufValue::String("llama".into())),
            (key::TOKENS.to_owned(), strings),
            (key::TOKEN_TYPE.to_owned(), GgufValue::Array(types)),
            (key::SCORES.to_owned(), GgufValue::Array(scores)),
            (key::BOS_ID.to_owned(), GgufValue::U32(1)),
            (key::EOS_ID.to_owned(), GgufValue::U32(2)),
            (key::UNK_ID.to_owned(), GgufValue::U32(0)),
        ]);
        let tok = Tokenizer::from_gguf(path(), &meta).expect("loads");
        let id = |t: &str| tok.token_to_id(t).expect("in vocab");
        // SentencePiece adds BOS by default and a space before the text.
        let ids = tok.encode("hi hi", true).expect("encodes");
        assert_eq!(ids, [1, id("▁hi"), id("▁hi")]);
        // "é" is not in the vocabulary: its UTF-8 bytes become byte tokens.
        let ids = tok.encode("hé", false).expect("encodes");
        assert_eq!(ids, [id("▁h"), id("<0xC3>"), id("<0xA9>")]);
        assert_eq!(tok.decode(&ids, false).expect("decodes"), "hé");
        assert_eq!(
            tok.decode(&[1, id("▁hi"), id("▁hi"), 2], true)
                .expect("decodes"),
            "hi hi"
        );
    }
}
