//! Tokenizer, chat template and incremental detokenizer against the development model,
//! SmolLM2-135M-Instruct (GGUF). The model is found through `BATON_MODEL`, or else at
//! `$HOME/.cache/baton/models/SmolLM2-135M-Instruct.Q4_1.gguf`; `scripts/fetch-model.sh` puts it
//! there. These tests fail, rather than skip, without it.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use baton_text::chat::Role;
use baton_text::{ChatMessage, ChatTemplate, Error, IncrementalDetokenizer, Tokenizer};
use candle_core::quantized::gguf_file::{self, Value};

fn model_path() -> PathBuf {
    let path = match std::env::var_os("BATON_MODEL") {
        Some(path) => PathBuf::from(path),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is set");
            Path::new(&home).join(".cache/baton/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(
        path.is_file(),
        "model file {} not found: run scripts/fetch-model.sh (or set BATON_MODEL to the .gguf)",
        path.display()
    );
    path
}

fn read_metadata(path: &Path) -> HashMap<String, Value> {
    let mut file = File::open(path).expect("open model file");
    gguf_file::Content::read(&mut file)
        .expect("read GGUF header")
        .metadata
}

/// The model's metadata, read once for all tests.
fn smollm_metadata() -> &'static (PathBuf, HashMap<String, Value>) {
    static META: OnceLock<(PathBuf, HashMap<String, Value>)> = OnceLock::new();
    META.get_or_init(|| {
        let path = model_path();
        let metadata = read_metadata(&path);
        (path, metadata)
    })
}

fn smollm() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let (path, metadata) = smollm_metadata();
        Tokenizer::from_gguf(path, metadata).expect("SmolLM2 tokenizer loads")
    })
}

/// Expected ids, produced by Hugging Face `tokenizers` 0.23.3 (Python) from the same GGUF's
/// `tokenizer.ggml.tokens` and `tokenizer.ggml.merges` (read with the `gguf` package), with
/// SmolLM2's tokenizer.json pipeline: `models.BPE(vocab, merges)`, pre-tokenizer
/// `Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)])`,
/// `decoders.ByteLevel()`, the 17 control tokens (token_type 3) added as special tokens, and
/// `encode(text, add_special_tokens=False).ids`.
const SMOLLM_CASES: &[(&str, &[u32])] = &[
    (
        "Hello, world! This is a test.",
        &[19556, 28, 905, 17, 669, 314, 253, 1028, 30],
    ),
    ("12345", &[33, 34, 35, 36, 37]),
    ("   leading spaces", &[256, 2899, 5600]),
    (" Hello", &[38699]),
    (
        "line one\nline two\n\n  indented",
        &[1311, 582, 198, 1311, 827, 8866, 641, 6574],
    ),
    ("<|im_start|>user\nHi<|im_end|>", &[1, 4093, 198, 26843, 2]),
    ("👋🏽", &[10813, 235, 229, 10813, 233, 138]),
    (
        "你好，世界",
        &[18645, 250, 48392, 138, 12831, 7906, 240, 178, 239, 230],
    ),
    (
        "The year 2024 had 366 days.",
        &[
            504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30,
        ],
    ),
    (
        "tabs\tand trailing spaces  ",
        &[100, 7366, 197, 397, 35079, 5600, 256],
    ),
    (
        "Grüße, naïve café — ça va? 🚀",
        &[
            27302, 7170, 34878, 85, 28, 15486, 46494, 37366, 1841, 5549, 117, 81, 46316, 47, 15107,
            244, 218,
        ],
    ),
];

const SMOLLM_DEFAULT_SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

fn multi_turn() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new(Role::System, "You are terse."),
        ChatMessage::new(Role::User, "What is 2+2?"),
        ChatMessage::new(Role::Assistant, "4."),
        ChatMessage::new(Role::User, "And 3+3?"),
    ]
}

const MULTI_TURN_PROMPT: &str = "<|im_start|>system\nYou are terse.<|im_end|>\n\
<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
<|im_start|>assistant\n4.<|im_end|>\n\
<|im_start|>user\nAnd 3+3?<|im_end|>\n\
<|im_start|>assistant\n";

/// Texts whose tokens split characters across byte-level pieces.
const STREAM_TEXTS: &[&str] = &[
    "👋🏽 hello 你好，世界! 🚀🚀",
    "你好，世界",
    "naïve café — 3.14159 ça va? 😶‍🌫️",
    "Ελληνικά, русский, العربية, हिन्दी, 한국어, 日本語のテキスト",
];

#[test]
fn smollm_encoding_matches_hf_tokenizers() {
    let tok = smollm();
    for &(text, expected) in SMOLLM_CASES {
        let ids = tok.encode(text, false).expect("encodes");
        assert_eq!(ids, expected, "encoding of {text:?}");
    }
}

#[test]
fn smollm_splits_digits_one_per_token() {
    let tok = smollm();
    let ids = tok.encode("12345", false).expect("encodes");
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| tok.id_to_token(id).expect("in vocab"))
        .collect();
    assert_eq!(pieces, ["1", "2", "3", "4", "5"]);
}

#[test]
fn smollm_special_ids_come_from_metadata() {
    let tok = smollm();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token_id(), Some(1));
    // EOS is <|im_end|> (2); <|endoftext|> (0) also ends generation, as in llama.cpp.
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    assert_eq!(tok.pad_token_id(), Some(2));
    assert_eq!(tok.unk_token_id(), Some(0));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert!(tok.is_special(1) && tok.is_special(16) && !tok.is_special(17));
    // SmolLM2 does not add BOS: add_special_tokens changes nothing.
    assert_eq!(
        tok.encode("Hello", true).expect("encodes"),
        tok.encode("Hello", false).expect("encodes")
    );
}

#[test]
fn encode_decode_round_trips_unicode() {
    let tok = smollm();
    let texts = SMOLLM_CASES
        .iter()
        .map(|&(text, _)| text)
        .chain(STREAM_TEXTS.iter().copied());
    for text in texts {
        let ids = tok.encode(text, false).expect("encodes");
        assert_eq!(tok.decode(&ids, false).expect("decodes"), text);
    }
}

#[test]
fn decode_can_skip_special_tokens() {
    let tok = smollm();
    let ids = tok
        .encode("<|im_start|>user\nHi<|im_end|>", false)
        .expect("encodes");
    assert_eq!(tok.decode(&ids, true).expect("decodes"), "user\nHi");
    assert_eq!(
        tok.decode(&ids, false).expect("decodes"),
        "<|im_start|>user\nHi<|im_end|>"
    );
}

#[test]
fn smollm_template_injects_default_system_prompt() {
    let template = smollm()
        .chat_template()
        .expect("SmolLM2 ships a chat template");
    let messages = [ChatMessage::new(Role::User, "Hi there")];
    let text = template.render(&messages, false).expect("renders");
    assert_eq!(
        text,
        format!("{SMOLLM_DEFAULT_SYSTEM}<|im_start|>user\nHi there<|im_end|>\n")
    );
    let prompt = template.render(&messages, true).expect("renders");
    assert_eq!(prompt, format!("{text}<|im_start|>assistant\n"));
}

#[test]
fn smollm_template_renders_multi_turn_with_generation_prompt() {
    let tok = smollm();
    let template = tok.chat_template().expect("SmolLM2 ships a chat template");
    let prompt = template.render(&multi_turn(), true).expect("renders");
    assert_eq!(prompt, MULTI_TURN_PROMPT);
    // The rendered prompt carries its own special tokens; ids from the same HF reference as
    // SMOLLM_CASES.
    let ids = tok.encode(&prompt, false).expect("encodes");
    assert_eq!(
        ids,
        [
            1, 9690, 198, 2683, 359, 1733, 313, 30, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27,
            34, 47, 2, 198, 1, 520, 9531, 198, 36, 30, 2, 198, 1, 4093, 198, 3528, 216, 35, 27, 35,
            47, 2, 198, 1, 520, 9531, 198
        ]
    );
}

/// Pushes `ids` one by one and returns the deltas, `finish` included.
fn stream(tok: &Tokenizer, prompt_tail: &[u32], ids: &[u32], skip_special: bool) -> Vec<String> {
    let mut detok = IncrementalDetokenizer::new(tok.clone(), prompt_tail, skip_special);
    let mut deltas: Vec<String> = ids
        .iter()
        .filter_map(|&id| detok.push(id).expect("push"))
        .collect();
    deltas.push(detok.finish().expect("finish"));
    deltas
}

#[test]
fn incremental_deltas_concatenate_to_full_decode() {
    let tok = smollm();
    for &text in STREAM_TEXTS {
        let ids = tok.encode(text, false).expect("encodes");
        let deltas = stream(tok, &[], &ids, true);
        for delta in &deltas {
            assert!(
                !delta.contains(char::REPLACEMENT_CHARACTER),
                "delta {delta:?} of {text:?} holds half a character"
            );
        }
        assert_eq!(deltas.concat(), tok.decode(&ids, true).expect("decodes"));
        assert_eq!(deltas.concat(), text);
        // Characters were split over tokens, so fewer deltas than tokens came out.
        assert!(deltas.len() < ids.len() + 1, "{text:?}");
    }
}

#[test]
fn incremental_holds_back_an_emoji_split_over_tokens() {
    let tok = smollm();
    // 👋 is F0 9F 91 8B: pieces ðŁ (F0 9F), ĳ (91), ĭ (8B).
    let ids = tok.encode("👋", false).expect("encodes");
    assert_eq!(ids, [10813, 235, 229]);
    let mut detok = IncrementalDetokenizer::new(tok.clone(), &[], true);
    assert_eq!(detok.push(ids[0]).expect("push"), None);
    assert_eq!(detok.push(ids[1]).expect("push"), None);
    assert_eq!(detok.push(ids[2]).expect("push").as_deref(), Some("👋"));
    assert_eq!(detok.finish().expect("finish"), "");
}

#[test]
fn incremental_with_prompt_tail_streams_only_the_new_text() {
    let tok = smollm();
    let prompt = tok.encode(MULTI_TURN_PROMPT, false).expect("encodes");
    let answer = "6. 🎲 六";
    let generated = tok.encode(answer, false).expect("encodes");
    let mut all = prompt.clone();
    all.extend(&generated);
    all.push(2); // <|im_end|>

    let deltas = stream(tok, &prompt, &all[prompt.len()..], true);
    assert_eq!(deltas.concat(), answer);
    let kept = stream(tok, &prompt, &all[prompt.len()..], false);
    assert_eq!(kept.concat(), format!("{answer}<|im_end|>"));
}

#[test]
fn unknown_role_is_a_typed_error() {
    match "developer".parse::<Role>() {
        Err(Error::UnknownRole { role }) => assert_eq!(role, "developer"),
        other => panic!("expected UnknownRole, got {other:?}"),
    }
    assert_eq!("user".parse::<Role>().ok(), Some(Role::User));
}

#[test]
fn broken_template_is_a_typed_error() {
    assert!(matches!(
        ChatTemplate::new(
            "{% for message in messages %}{{ message.content }}",
            None,
            None
        ),
        Err(Error::ChatTemplateSyntax { .. })
    ));
    // A model whose template does not compile fails to load, naming the problem.
    let (path, metadata) = smollm_metadata();
    let mut broken = metadata.clone();
    broken.insert(
        "tokenizer.chat_template".into(),
        Value::String("{% if messages %}unterminated".into()),
    );
    assert!(matches!(
        Tokenizer::from_gguf(path, &broken),
        Err(Error::ChatTemplateSyntax { .. })
    ));
}

#[test]
fn raise_exception_in_template_is_a_typed_error() {
    let template = ChatTemplate::new(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tools are not supported') }}{% endif %}{% endfor %}",
        None,
        None,
    )
    .expect("compiles");
    match template.render(&[ChatMessage::new(Role::Tool, "{}")], false) {
        Err(Error::ChatTemplateRaised { message }) => {
            assert_eq!(message, "tools are not supported")
        }
        other => panic!("expected ChatTemplateRaised, got {other:?}"),
    }
}

#[test]
fn unknown_tokenizer_model_is_a_typed_error() {
    let (path, metadata) = smollm_metadata();
    let mut bert = metadata.clone();
    bert.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    match Tokenizer::from_gguf(path, &bert) {
        Err(Error::UnsupportedTokenizer { path: p, model }) => {
            assert_eq!((p.as_path(), model.as_str()), (path.as_path(), "bert"));
        }
        other => panic!("expected UnsupportedTokenizer, got {other:?}"),
    }
}

#[test]
fn missing_metadata_key_is_a_typed_error() {
    let (path, metadata) = smollm_metadata();
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
    ] {
        let mut missing = metadata.clone();
        missing.remove(key);
        match Tokenizer::from_gguf(path, &missing) {
            Err(Error::MissingMetadata { path: p, key: k }) => {
                assert_eq!((p.as_path(), k.as_str()), (path.as_path(), key));
            }
            other => panic!("expected MissingMetadata for {key}, got {other:?}"),
        }
    }
    let mut wrong_type = metadata.clone();
    wrong_type.insert("tokenizer.ggml.add_bos_token".into(), Value::U32(1));
    assert!(matches!(
        Tokenizer::from_gguf(path, &wrong_type),
        Err(Error::InvalidMetadata { key, .. }) if key == "tokenizer.ggml.add_bos_token"
    ));
}

fn digest(tok: &Tokenizer) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    tok.digest(&mut hasher);
    *hasher.finalize().as_bytes()
}

#[test]
fn digest_is_deterministic_across_loads_and_sees_merges() {
    let path = model_path();
    // Two independent reads of the file, so no state is shared between the loads.
    let first = Tokenizer::from_gguf(&path, &read_metadata(&path)).expect("loads");
    let mut metadata = read_metadata(&path);
    let second = Tokenizer::from_gguf(&path, &metadata).expect("loads");
    assert_eq!(digest(&first), digest(&second));

    // Swapping the order of two merges changes how text is tokenized, and the digest.
    if let Some(Value::Array(merges)) = metadata.get_mut("tokenizer.ggml.merges") {
        merges.swap(0, 1);
    }
    let swapped = Tokenizer::from_gguf(&path, &metadata).expect("loads");
    assert_ne!(digest(&first), digest(&swapped));
}

#[test]
fn tokenizer_is_cheap_to_share_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<ChatTemplate>();
    let tok = smollm().clone();
    let handle = std::thread::spawn(move || tok.encode("12345", false).expect("encodes"));
    assert_eq!(handle.join().expect("thread"), [33, 34, 35, 36, 37]);
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("baton-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_hf_dir(dir: &Path, tok: &Tokenizer, config: serde_json::Value) {
    let json = tok.to_tokenizer_json().expect("serializes");
    std::fs::write(dir.join("tokenizer.json"), json).expect("write tokenizer.json");
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string())
        .expect("write tokenizer_config.json");
}

#[test]
fn hf_dir_round_trip_matches_gguf() {
    let gguf = smollm();
    let template = gguf.chat_template().expect("template").source().to_owned();
    let dir = TempDir::new("hf-dir-round-trip");
    write_hf_dir(
        &dir.0,
        gguf,
        serde_json::json!({
            "chat_template": template,
            "bos_token": "<|im_start|>",
            "eos_token": { "content": "<|im_end|>", "special": true },
            "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "add_bos_token": false,
        }),
    );
    std::fs::write(
        dir.0.join("generation_config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": [2]}"#,
    )
    .expect("write generation_config.json");

    let hf = Tokenizer::from_hf_dir(&dir.0).expect("loads");
    for &(text, expected) in SMOLLM_CASES {
        assert_eq!(
            hf.encode(text, true).expect("encodes"),
            expected,
            "{text:?}"
        );
    }
    assert_eq!(hf.vocab_size(), gguf.vocab_size());
    assert_eq!(hf.bos_token_id(), Some(1));
    assert_eq!(hf.eos_token_ids(), &[2]);
    assert_eq!(hf.pad_token_id(), Some(2));
    assert_eq!(hf.unk_token_id(), Some(0));
    let rendered = hf
        .chat_template()
        .expect("template from tokenizer_config.json")
        .render(&multi_turn(), true)
        .expect("renders");
    assert_eq!(rendered, MULTI_TURN_PROMPT);
    assert_eq!(
        digest(&hf),
        digest(&Tokenizer::from_hf_dir(&dir.0).expect("loads again"))
    );
}

#[test]
fn hf_dir_add_bos_token_and_missing_template() {
    let gguf = smollm();
    let dir = TempDir::new("hf-dir-add-bos");
    write_hf_dir(
        &dir.0,
        gguf,
        serde_json::json!({ "bos_token": "<|im_start|>", "add_bos_token": true }),
    );
    let hf = Tokenizer::from_hf_dir(&dir.0).expect("loads");
    assert_eq!(
        hf.encode("12345", true).expect("encodes"),
        [1, 33, 34, 35, 36, 37]
    );
    assert_eq!(
        hf.encode("12345", false).expect("encodes"),
        [33, 34, 35, 36, 37]
    );
    // No template anywhere: none is invented.
    assert!(hf.chat_template().is_none());
    // No generation_config.json and no eos_token: nothing to stop on but what the caller adds.
    assert!(hf.eos_token_ids().is_empty());
}

#[test]
fn hf_dir_without_tokenizer_json_is_an_io_error() {
    let dir = TempDir::new("hf-dir-empty");
    match Tokenizer::from_hf_dir(&dir.0) {
        Err(Error::Io { path, .. }) => assert_eq!(path, dir.0.join("tokenizer.json")),
        other => panic!("expected Io, got {other:?}"),
    }
    std::fs::write(dir.0.join("tokenizer.json"), "{ not json").expect("write");
    assert!(matches!(
        Tokenizer::from_hf_dir(&dir.0),
        Err(Error::CorruptFile { .. })
    ));
}

/// Conformance with llama.cpp's tokenizer test vectors (`models/ggml-vocab-*.gguf` with their
/// `.inp` inputs and `.out` ids, which llama.cpp generates with Hugging Face `transformers`).
/// Those files are not in this repository: point `BATON_LLAMA_VOCAB_DIR` at a llama.cpp
/// `models/` directory and run with `--ignored`.
#[test]
#[ignore = "needs llama.cpp's models/ggml-vocab-*.gguf; set BATON_LLAMA_VOCAB_DIR"]
fn llama_cpp_vocab_conformance() {
    let dir = PathBuf::from(
        std::env::var_os("BATON_LLAMA_VOCAB_DIR")
            .expect("set BATON_LLAMA_VOCAB_DIR to llama.cpp's models/ directory"),
    );
    let vocabs = [
        "gpt-2",
        "starcoder",
        "refact",
        "llama-bpe",
        "qwen2",
        "qwen35",
        "llama-spm",
        "phi-3",
        "mpt",
        "command-r",
    ];
    let mut failures = Vec::new();
    for name in vocabs {
        let path = dir.join(format!("ggml-vocab-{name}.gguf"));
        let tok = Tokenizer::from_gguf(&path, &read_metadata(&path)).expect("vocab loads");
        let inputs = std::fs::read_to_string(path.with_extension("gguf.inp")).expect("read .inp");
        let outputs = std::fs::read_to_string(path.with_extension("gguf.out")).expect("read .out");
        let inputs: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
        for (text, line) in inputs.iter().zip(outputs.lines()) {
            let expected: Vec<u32> = line
                .split_whitespace()
                .map(|id| id.parse().expect("id"))
                .collect();
            let ids = tok.encode(text, false).expect("encodes");
            if ids != expected {
                failures.push(format!(
                    "{name}: {text:?}\n  got      {ids:?}\n  expected {expected:?}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
