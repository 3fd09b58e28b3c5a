//! Every unusable model input is a typed `baton_engine::Error` of class `BadModel` that names
//! the file, and the tensor or metadata key where there is one; none panics.
//!
//! Each case starts from a tiny model that loads (see `unmodified_tiny_models_load`) and breaks
//! one thing in it.

mod tiny;

use std::path::Path;

use baton_engine::{Engine, EngineConfig, Error, ErrorClass, Role, WeightsSetting};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tiny::{HIDDEN, ScratchDir, TinyModel};

fn load(path: &Path) -> baton_engine::Result<Engine> {
    let mut cfg = EngineConfig::new(path, Role::Colocated);
    cfg.weights = WeightsSetting::Quantized;
    cfg.kv_cache_bytes = 4 << 20;
    Engine::load(cfg)
}

fn load_err(path: &Path) -> Error {
    match load(path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(err) => err,
    }
}

/// The error is a bad model and its message names every one of `names`.
fn assert_names(err: &Error, names: &[&str]) {
    assert_eq!(err.class(), ErrorClass::BadModel, "{err}");
    let msg = err.to_string();
    for name in names {
        assert!(msg.contains(name), "{msg:?} does not name {name:?}");
    }
}

fn file_name(path: &Path) -> &str {
    path.file_name()
        .and_then(|n| n.to_str())
        .expect("file name")
}

/// A Q4_0 tiny Llama (quick to quantize) with its metadata and tensors edited before writing.
fn write_edited(
    path: &Path,
    edit_metadata: impl FnOnce(&mut Vec<(String, Value)>),
    edit_tensors: impl FnOnce(&mut Vec<(String, QTensor)>),
) {
    let model = TinyModel::llama(GgmlDType::Q4_0);
    let mut metadata = model.metadata();
    let mut tensors = model.tensors();
    edit_metadata(&mut metadata);
    edit_tensors(&mut tensors);
    tiny::write_gguf(path, &metadata, &tensors);
}

fn remove(list: &mut Vec<(String, impl Sized)>, name: &str) {
    let before = list.len();
    list.retain(|(n, _)| n != name);
    assert_eq!(list.len(), before - 1, "{name} was not there to remove");
}

fn set(metadata: &mut [(String, Value)], key: &str, value: Value) {
    let entry = metadata
        .iter_mut()
        .find(|(k, _)| k == key)
        .expect("key present");
    entry.1 = value;
}

#[test]
fn unmodified_tiny_models_load() {
    let dir = ScratchDir::new("load-ok");
    let gguf = dir.join("model.gguf");
    write_edited(&gguf, |_| {}, |_| {});
    load(&gguf).expect("tiny gguf loads");
    for arch in ["qwen2", "qwen3"] {
        let path = dir.join(&format!("{arch}.gguf"));
        TinyModel::llama(GgmlDType::Q4_0)
            .with_arch(arch)
            .write(&path);
        load(&path).expect("tiny gguf loads");
    }
    let hf = dir.join("hf");
    std::fs::create_dir_all(&hf).expect("mkdir");
    tiny::write_hf(&hf, &tiny::hf_config(), &tiny::hf_tensors(1));
    load(&hf).expect("tiny safetensors dir loads");
}

#[test]
fn nonexistent_gguf_is_io_error_naming_the_path() {
    let dir = ScratchDir::new("absent");
    let path = dir.join("absent.gguf");
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::Io { path: p, .. } if p == &path),
        "{err:?}"
    );
    assert_names(&err, &["absent.gguf"]);
}

/// Valid bytes of a tiny model, and where its tensor data starts.
fn valid_gguf_bytes(dir: &ScratchDir) -> (Vec<u8>, gguf_file::Content) {
    let path = dir.join("valid.gguf");
    write_edited(&path, |_| {}, |_| {});
    let content = gguf_file::Content::read(&mut std::fs::File::open(&path).expect("open"))
        .expect("valid gguf");
    (std::fs::read(&path).expect("read"), content)
}

#[test]
fn gguf_cut_anywhere_in_the_header_is_corrupt_file() {
    let dir = ScratchDir::new("cut-header");
    let (bytes, content) = valid_gguf_bytes(&dir);
    let header_len = content.tensor_data_offset as usize;
    let path = dir.join("cut.gguf");
    // Cuts in the magic, the counts, the metadata (the token list is most of it) and the tensor
    // infos: a stride prime to every field size lands in each kind of field.
    for cut in (0..header_len).step_by(97).chain([header_len - 1]) {
        std::fs::write(&path, &bytes[..cut]).expect("write");
        let err = load_err(&path);
        assert!(
            matches!(&err, Error::CorruptFile { format: "GGUF", .. }),
            "cut at {cut}: {err:?}"
        );
        assert_names(&err, &["cut.gguf"]);
    }
}

#[test]
fn gguf_cut_in_tensor_data_is_corrupt_file_naming_the_tensor() {
    let dir = ScratchDir::new("cut-data");
    let (bytes, content) = valid_gguf_bytes(&dir);
    // The tensor stored last; cutting in its middle leaves every other tensor whole.
    let (last, info) = content
        .tensor_infos
        .iter()
        .max_by_key(|(_, info)| info.offset)
        .expect("tensors");
    let size = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
    let cut = (content.tensor_data_offset + info.offset) as usize + size / 2;
    let path = dir.join("cut.gguf");
    std::fs::write(&path, &bytes[..cut]).expect("write");
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::CorruptFile { format: "GGUF", .. }),
        "{err:?}"
    );
    assert_names(&err, &["cut.gguf", last]);
}

#[test]
fn random_bytes_are_corrupt_file() {
    let dir = ScratchDir::new("random");
    let path = dir.join("noise.gguf");
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let noise: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    std::fs::write(&path, &noise).expect("write");
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::CorruptFile { format: "GGUF", .. }),
        "{err:?}"
    );
    assert_names(&err, &["noise.gguf"]);
}

#[test]
fn gguf_missing_layer_tensor_is_missing_tensor_naming_it() {
    let dir = ScratchDir::new("missing-tensor");
    let path = dir.join("model.gguf");
    write_edited(&path, |_| {}, |t| remove(t, "blk.1.ffn_down.weight"));
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::MissingTensor { tensor, .. } if tensor == "blk.1.ffn_down.weight"),
        "{err:?}"
    );
    assert_names(&err, &["model.gguf", "blk.1.ffn_down.weight"]);
}

#[test]
fn qwen2_gguf_without_a_qkv_bias_is_missing_tensor_naming_it() {
    let dir = ScratchDir::new("missing-bias");
    let path = dir.join("qwen2.gguf");
    let model = TinyModel::llama(GgmlDType::Q4_0).with_arch("qwen2");
    let mut tensors = model.tensors();
    remove(&mut tensors, "blk.0.attn_k.bias");
    tiny::write_gguf(&path, &model.metadata(), &tensors);
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::MissingTensor { tensor, .. } if tensor == "blk.0.attn_k.bias"),
        "{err:?}"
    );
    assert_names(&err, &["qwen2.gguf", "blk.0.attn_k.bias"]);
}

#[test]
fn qwen3_gguf_without_a_qk_norm_is_missing_tensor_naming_it() {
    let dir = ScratchDir::new("missing-qk-norm");
    let path = dir.join("qwen3.gguf");
    let model = TinyModel::llama(GgmlDType::Q4_0).with_arch("qwen3");
    let mut tensors = model.tensors();
    remove(&mut tensors, "blk.1.attn_q_norm.weight");
    tiny::write_gguf(&path, &model.metadata(), &tensors);
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::MissingTensor { tensor, .. } if tensor == "blk.1.attn_q_norm.weight"),
        "{err:?}"
    );
    assert_names(&err, &["qwen3.gguf", "blk.1.attn_q_norm.weight"]);
}

#[test]
fn gguf_tensor_with_wrong_shape_is_tensor_shape_naming_it() {
    let dir = ScratchDir::new("wrong-shape");
    let path = dir.join("model.gguf");
    // attn_k as wide as attn_q: a file whose metadata claims 2 KV heads but whose tensors have 4.
    let square = Tensor::zeros((HIDDEN, HIDDEN), candle_core::DType::F32, &Device::Cpu)
        .and_then(|t| QTensor::quantize(&t, GgmlDType::Q4_0))
        .expect("tensor");
    write_edited(
        &path,
        |_| {},
        |t| {
            let entry = t
                .iter_mut()
                .find(|(n, _)| n == "blk.0.attn_k.weight")
                .expect("attn_k");
            entry.1 = square;
        },
    );
    let err = load_err(&path);
    match &err {
        Error::TensorShape {
            tensor,
            expected,
            got,
            ..
        } => {
            assert_eq!(tensor, "blk.0.attn_k.weight");
            assert_eq!(expected, &[tiny::KV_HEADS * tiny::HEAD_DIM, HIDDEN]);
            assert_eq!(got, &[HIDDEN, HIDDEN]);
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
    assert_names(&err, &["model.gguf", "blk.0.attn_k.weight"]);
}

#[test]
fn gguf_matrix_in_a_type_without_matmul_is_unsupported_tensor_type() {
    let dir = ScratchDir::new("q8_1");
    let path = dir.join("model.gguf");
    // Q8_1 exists only as the activation format of Q4_1/Q5_1 dot products; no matmul reads it
    // as weights.
    let q8_1 = Tensor::zeros((HIDDEN, HIDDEN), candle_core::DType::F32, &Device::Cpu)
        .and_then(|t| QTensor::quantize(&t, GgmlDType::Q8_1))
        .expect("tensor");
    write_edited(
        &path,
        |_| {},
        |t| {
            let entry = t
                .iter_mut()
                .find(|(n, _)| n == "blk.0.attn_output.weight")
                .expect("attn_output");
            entry.1 = q8_1;
        },
    );
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::UnsupportedTensorType { tensor, .. } if tensor == "blk.0.attn_output.weight"),
        "{err:?}"
    );
    assert_names(&err, &["model.gguf", "blk.0.attn_output.weight"]);
}

#[test]
fn gguf_unknown_architecture_is_unknown_architecture_naming_it() {
    let dir = ScratchDir::new("unknown-arch");
    let path = dir.join("model.gguf");
    write_edited(
        &path,
        |md| set(md, "general.architecture", Value::String("gptneox".into())),
        |_| {},
    );
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::UnknownArchitecture { architecture, .. } if architecture == "gptneox"),
        "{err:?}"
    );
    assert_names(&err, &["model.gguf", "gptneox"]);
}

#[test]
fn gguf_missing_required_metadata_is_missing_metadata_naming_the_key() {
    let dir = ScratchDir::new("missing-metadata");
    for key in [
        "general.architecture",
        "llama.block_count",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
    ] {
        let path = dir.join("model.gguf");
        write_edited(&path, |md| remove(md, key), |_| {});
        let err = load_err(&path);
        // Tokenizer keys are read by the text layer, which reports them the same way.
        assert!(
            matches!(&err, Error::MissingMetadata { key: k, .. } if k == key)
                || matches!(&err, Error::Text(baton_text::Error::MissingMetadata { key: k, .. }) if k == key),
            "{key}: {err:?}"
        );
        assert_names(&err, &["model.gguf", key]);
    }
}

#[test]
fn gguf_metadata_of_the_wrong_type_or_value_is_invalid_metadata_naming_the_key() {
    let dir = ScratchDir::new("invalid-metadata");
    // (key, bad value, what the message must name besides the file)
    for (key, value, named) in [
        (
            "llama.block_count",
            Value::String("two".into()),
            "llama.block_count",
        ),
        (
            "llama.rope.freq_base",
            Value::String("1e4".into()),
            "llama.rope.freq_base",
        ),
        (
            "general.architecture",
            Value::U32(1),
            "general.architecture",
        ),
        (
            "llama.attention.head_count",
            Value::U32(0),
            "llama.attention.head_count",
        ),
        // A relation between keys, checked once every key is read: the message names both.
        (
            "llama.attention.head_count_kv",
            Value::U32(3),
            "num_kv_heads 3",
        ),
    ] {
        let path = dir.join("model.gguf");
        write_edited(&path, |md| set(md, key, value), |_| {});
        let err = load_err(&path);
        assert!(
            matches!(&err, Error::InvalidMetadata { .. }),
            "{key}: {err:?}"
        );
        assert_names(&err, &["model.gguf", named]);
    }
}

/// Head counts whose product with the head width overflows: arithmetic on metadata happens
/// before any tensor shape can contradict it.
#[test]
fn gguf_head_counts_that_overflow_are_invalid_metadata() {
    let dir = ScratchDir::new("huge-heads");
    let path = dir.join("model.gguf");
    write_edited(
        &path,
        |md| {
            set(md, "llama.attention.head_count", Value::U64(1 << 40));
            set(md, "llama.attention.head_count_kv", Value::U64(1 << 40));
            md.push(("llama.attention.key_length".into(), Value::U64(1 << 40)));
            set(md, "llama.rope.dimension_count", Value::U64(1 << 40));
        },
        |_| {},
    );
    let err = load_err(&path);
    assert!(matches!(&err, Error::InvalidMetadata { .. }), "{err:?}");
    assert_names(&err, &["model.gguf", "num_heads"]);
}

/// Metadata that would size allocations before any tensor is read.
#[test]
fn gguf_absurd_layer_count_is_missing_tensor_not_an_allocation_failure() {
    let dir = ScratchDir::new("huge-layers");
    let path = dir.join("model.gguf");
    write_edited(
        &path,
        |md| set(md, "llama.block_count", Value::U32(u32::MAX)),
        |_| {},
    );
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::MissingTensor { tensor, .. } if tensor == "blk.2.attn_q.weight"),
        "{err:?}"
    );
    assert_names(&err, &["model.gguf", "blk.2.attn_q.weight"]);
}

#[test]
fn gguf_zero_alignment_is_corrupt_file() {
    let dir = ScratchDir::new("zero-alignment");
    let path = dir.join("model.gguf");
    write_edited(
        &path,
        |md| md.push(("general.alignment".into(), Value::U32(0))),
        |_| {},
    );
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::CorruptFile { format: "GGUF", .. }),
        "{err:?}"
    );
    assert_names(&err, &["model.gguf"]);
}

#[test]
fn safetensors_dir_without_config_json_is_io_error_naming_it() {
    let dir = ScratchDir::new("no-config");
    tiny::write_hf(dir.path(), &tiny::hf_config(), &tiny::hf_tensors(1));
    std::fs::remove_file(dir.join("config.json")).expect("rm");
    let err = load_err(dir.path());
    assert!(
        matches!(&err, Error::Io { path, .. } if path == &dir.join("config.json")),
        "{err:?}"
    );
    assert_names(&err, &["config.json"]);
}

#[test]
fn config_json_with_unknown_architecture_is_unknown_architecture_naming_it() {
    let dir = ScratchDir::new("hf-unknown-arch");
    let mut config = tiny::hf_config();
    config["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    tiny::write_hf(dir.path(), &config, &tiny::hf_tensors(1));
    let err = load_err(dir.path());
    assert!(
        matches!(&err, Error::UnknownArchitecture { architecture, .. } if architecture == "GPTNeoXForCausalLM"),
        "{err:?}"
    );
    assert_names(&err, &["config.json", "GPTNeoXForCausalLM"]);
}

#[test]
fn config_json_missing_a_field_is_corrupt_file_naming_the_field() {
    let dir = ScratchDir::new("hf-missing-field");
    let mut config = tiny::hf_config();
    config
        .as_object_mut()
        .expect("object")
        .remove("hidden_size");
    tiny::write_hf(dir.path(), &config, &tiny::hf_tensors(1));
    let err = load_err(dir.path());
    assert!(
        matches!(
            &err,
            Error::CorruptFile {
                format: "config.json",
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, &["config.json", "hidden_size"]);
}

#[test]
fn corrupt_safetensors_file_is_corrupt_file_naming_it() {
    let dir = ScratchDir::new("hf-corrupt");
    tiny::write_hf(dir.path(), &tiny::hf_config(), &tiny::hf_tensors(1));
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("read");
    // Cut in the data: the header promises bytes the file does not have.
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).expect("write");
    let err = load_err(dir.path());
    assert!(
        matches!(
            &err,
            Error::CorruptFile {
                format: "safetensors",
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, &["model.safetensors"]);
    // Garbage from the first byte: the header length itself is nonsense.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let noise: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    std::fs::write(&weights, &noise).expect("write");
    let err = load_err(dir.path());
    assert!(
        matches!(
            &err,
            Error::CorruptFile {
                format: "safetensors",
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, &["model.safetensors"]);
}

#[test]
fn safetensors_missing_layer_tensor_is_missing_tensor_naming_it() {
    let dir = ScratchDir::new("hf-missing-tensor");
    let mut tensors = tiny::hf_tensors(1);
    remove(&mut tensors, "model.layers.1.self_attn.v_proj.weight");
    tiny::write_hf(dir.path(), &tiny::hf_config(), &tensors);
    let err = load_err(dir.path());
    assert!(
        matches!(&err, Error::MissingTensor { tensor, .. } if tensor == "model.layers.1.self_attn.v_proj.weight"),
        "{err:?}"
    );
    // The tensor may belong in any shard, so the error names the directory.
    let dir_name = file_name(dir.path()).to_string();
    assert_names(&err, &[&dir_name, "model.layers.1.self_attn.v_proj.weight"]);
}

/// Loads with the context capped, so a corrupted `context_length` cannot size the RoPE tables:
/// the property below is about parsing, not about how much memory a valid huge model needs.
fn load_capped(path: &Path) -> baton_engine::Result<Engine> {
    let mut cfg = EngineConfig::new(path, Role::Colocated);
    cfg.weights = WeightsSetting::Quantized;
    cfg.kv_cache_bytes = 4 << 20;
    cfg.max_context = Some(64);
    Engine::load(cfg)
}

/// A valid tiny GGUF and the offsets of its header bytes that hold structure (counts, key
/// lengths, value types, model hyperparameters, tensor dims, types and offsets) rather than
/// token text, which is most of the header and parses whatever its bytes are.
fn fuzz_base() -> &'static (Vec<u8>, Vec<usize>) {
    static BASE: std::sync::OnceLock<(Vec<u8>, Vec<usize>)> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let dir = ScratchDir::new("fuzz-base");
        let (bytes, content) = valid_gguf_bytes(&dir);
        let header = &bytes[..content.tensor_data_offset as usize];
        let find = |needle: &[u8]| {
            header
                .windows(needle.len())
                .position(|w| w == needle)
                .expect("key in header")
        };
        let tokens = find(b"tokenizer.ggml.tokens")..find(b"tokenizer.ggml.merges");
        let structural = (0..header.len()).filter(|i| !tokens.contains(i)).collect();
        (bytes, structural)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any few corrupted structural bytes in the header either still load or are a `BadModel`
    /// error naming the file.
    #[test]
    fn gguf_with_corrupted_header_bytes_never_panics(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)
    ) {
        let (valid, structural) = fuzz_base();
        let mut bytes = valid.clone();
        for (at, xor) in &flips {
            bytes[*at.get(structural)] ^= xor;
        }
        let dir = ScratchDir::new("fuzz");
        let path = dir.join("fuzzed.gguf");
        std::fs::write(&path, &bytes).expect("write");
        if let Err(err) = load_capped(&path) {
            assert_names(&err, &["fuzzed.gguf"]);
        }
    }
}
