//! Tiny random-weight models written as GGUF files by the tests themselves, so loader coverage
//! needs no download: every tensor type and architecture the engine claims to load, at a size
//! that runs in milliseconds.
//!
//! Shape: vocab 256 (the byte-level alphabet of `data/tiny-byte-tokenizer.json`), hidden 256,
//! intermediate 512, 2 layers, 4 query heads and 2 KV heads of 64 dims. K-quants pack rows in
//! super-blocks of 256, so every matrix's input dimension is a multiple of 256.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const VOCAB: usize = 256;
pub const HIDDEN: usize = 256;
pub const INTERMEDIATE: usize = 512;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = HIDDEN / HEADS;
pub const CONTEXT: usize = 256;

/// Token ids spread over the vocabulary, enough of them that prefill masks several rows.
pub const PROMPT: &[u32] = &[72, 101, 108, 108, 111, 44, 32, 98, 97, 116, 111, 110, 33];

/// Teacher-forced decode steps after the prompt.
pub const DECODE_STEPS: usize = 8;

/// What to write: an architecture, the tensor type of its matrices, and whether the output head
/// is its own tensor. Norms and biases are always F32, as llama.cpp's converters store them.
#[derive(Debug, Clone, Copy)]
pub struct TinyModel {
    pub arch: &'static str,
    pub matrices: GgmlDType,
    pub tied: bool,
    pub seed: u64,
    /// Query and kv heads; `HEADS` and `KV_HEADS` unless [`TinyModel::with_heads`] says.
    pub heads: usize,
    pub kv_heads: usize,
}

impl TinyModel {
    pub fn llama(matrices: GgmlDType) -> Self {
        Self {
            arch: "llama",
            matrices,
            tied: false,
            seed: 7,
            heads: HEADS,
            kv_heads: KV_HEADS,
        }
    }

    /// The same hidden width split into other heads (tensor-parallel tests need 8 and 4).
    pub fn with_heads(self, heads: usize, kv_heads: usize) -> Self {
        Self {
            heads,
            kv_heads,
            ..self
        }
    }

    pub fn head_dim(&self) -> usize {
        HIDDEN / self.heads
    }

    pub fn with_arch(self, arch: &'static str) -> Self {
        Self { arch, ..self }
    }

    pub fn tied(self) -> Self {
        Self { tied: true, ..self }
    }

    /// The GGUF metadata llama.cpp's converter writes for this shape, plus a byte-level `gpt2`
    /// tokenizer.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        let a = self.arch;
        let mut md = vec![
            ("general.architecture".into(), Value::String(a.into())),
            // Read by candle's quantized_qwen3 only: 0 keeps its RoPE tables in f32 (its
            // default is f16, which would make the reference, not the engine, the odd one out).
            ("general.dtype".into(), Value::U32(0)),
            (format!("{a}.block_count"), Value::U32(LAYERS as u32)),
            (format!("{a}.embedding_length"), Value::U32(HIDDEN as u32)),
            (
                format!("{a}.feed_forward_length"),
                Value::U32(INTERMEDIATE as u32),
            ),
            (
                format!("{a}.attention.head_count"),
                Value::U32(self.heads as u32),
            ),
            (
                format!("{a}.attention.head_count_kv"),
                Value::U32(self.kv_heads as u32),
            ),
            (format!("{a}.rope.freq_base"), Value::F32(10_000.0)),
            (
                format!("{a}.rope.dimension_count"),
                Value::U32(self.head_dim() as u32),
            ),
            (
                format!("{a}.attention.layer_norm_rms_epsilon"),
                Value::F32(1e-6),
            ),
            (format!("{a}.context_length"), Value::U32(CONTEXT as u32)),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(byte_tokens().into_iter().map(Value::String).collect()),
            ),
            ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(vec![Value::I32(1); VOCAB]),
            ),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ];
        if a == "qwen3" {
            // Qwen3 heads are not hidden / heads wide in general; its converter always writes it.
            md.push((
                format!("{a}.attention.key_length"),
                Value::U32(self.head_dim() as u32),
            ));
        }
        md
    }

    /// Random tensors named as llama.cpp names them, in the order its converter writes them.
    pub fn tensors(&self) -> Vec<(String, QTensor)> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut out = Vec::new();
        let matrix = |rng: &mut ChaCha8Rng, name: &str, rows: usize, cols: usize| {
            // Uniform with variance 1/cols keeps activations near unit scale through the layers.
            let scale = (3.0 / cols as f32).sqrt();
            (
                name.to_string(),
                quantize(rng, &[rows, cols], scale, 0.0, self.matrices),
            )
        };
        let vector = |rng: &mut ChaCha8Rng, name: &str, len: usize, scale: f32, offset: f32| {
            (
                name.to_string(),
                quantize(rng, &[len], scale, offset, GgmlDType::F32),
            )
        };
        // The embedding is unit scale so the first norm sees well-conditioned rows.
        out.push((
            "token_embd.weight".into(),
            quantize(&mut rng, &[VOCAB, HIDDEN], 1.0, 0.0, self.matrices),
        ));
        for l in 0..LAYERS {
            let p = format!("blk.{l}");
            out.push(vector(
                &mut rng,
                &format!("{p}.attn_norm.weight"),
                HIDDEN,
                0.2,
                1.0,
            ));
            out.push(matrix(
                &mut rng,
                &format!("{p}.attn_q.weight"),
                HIDDEN,
                HIDDEN,
            ));
            out.push(matrix(
                &mut rng,
                &format!("{p}.attn_k.weight"),
                self.kv_heads * self.head_dim(),
                HIDDEN,
            ));
            out.push(matrix(
                &mut rng,
                &format!("{p}.attn_v.weight"),
                self.kv_heads * self.head_dim(),
                HIDDEN,
            ));
            if self.arch == "qwen2" {
                out.push(vector(
                    &mut rng,
                    &format!("{p}.attn_q.bias"),
                    HIDDEN,
                    0.5,
                    0.0,
                ));
                out.push(vector(
                    &mut rng,
                    &format!("{p}.attn_k.bias"),
                    self.kv_heads * self.head_dim(),
                    0.5,
                    0.0,
                ));
                out.push(vector(
                    &mut rng,
                    &format!("{p}.attn_v.bias"),
                    self.kv_heads * self.head_dim(),
                    0.5,
                    0.0,
                ));
            }
            if self.arch == "qwen3" {
                out.push(vector(
                    &mut rng,
                    &format!("{p}.attn_q_norm.weight"),
                    self.head_dim(),
                    0.2,
                    1.0,
                ));
                out.push(vector(
                    &mut rng,
                    &format!("{p}.attn_k_norm.weight"),
                    self.head_dim(),
                    0.2,
                    1.0,
                ));
            }
            out.push(matrix(
                &mut rng,
                &format!("{p}.attn_output.weight"),
                HIDDEN,
                HIDDEN,
            ));
            out.push(vector(
                &mut rng,
                &format!("{p}.ffn_norm.weight"),
                HIDDEN,
                0.2,
                1.0,
            ));
            out.push(matrix(
                &mut rng,
                &format!("{p}.ffn_gate.weight"),
                INTERMEDIATE,
                HIDDEN,
            ));
            out.push(matrix(
                &mut rng,
                &format!("{p}.ffn_up.weight"),
                INTERMEDIATE,
                HIDDEN,
            ));
            out.push(matrix(
                &mut rng,
                &format!("{p}.ffn_down.weight"),
                HIDDEN,
                INTERMEDIATE,
            ));
        }
        out.push(vector(&mut rng, "output_norm.weight", HIDDEN, 0.2, 1.0));
        if !self.tied {
            out.push(matrix(&mut rng, "output.weight", VOCAB, HIDDEN));
        }
        out
    }

    /// Writes the model to `path`.
    pub fn write(&self, path: &Path) {
        write_gguf(path, &self.metadata(), &self.tensors());
    }
}

/// Uniform random values in `offset ± scale`, stored as `dtype`.
fn quantize(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    scale: f32,
    offset: f32,
    dtype: GgmlDType,
) -> QTensor {
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| offset + scale * rng.random_range(-1.0f32..1.0))
        .collect();
    let t = Tensor::from_vec(data, shape, &Device::Cpu).expect("random tensor");
    QTensor::quantize(&t, dtype).expect("quantize")
}

/// Writes a GGUF file from metadata and tensors, in the order given.
pub fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) {
    let mut file = std::fs::File::create(path).expect("create gguf");
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut file, &md, &ts).expect("write gguf");
}

/// The 256 tokens of the byte-level vocabulary in `data/tiny-byte-tokenizer.json`, by id.
pub fn byte_tokens() -> Vec<String> {
    let json: serde_json::Value =
        serde_json::from_str(include_str!("../data/tiny-byte-tokenizer.json")).expect("json");
    let vocab = json["model"]["vocab"].as_object().expect("vocab");
    let mut tokens = vec![String::new(); vocab.len()];
    for (text, id) in vocab {
        tokens[id.as_u64().expect("id") as usize] = text.clone();
    }
    assert_eq!(tokens.len(), VOCAB);
    tokens
}

/// A directory under the system temp dir, removed when dropped. Named per test and process so
/// parallel tests and concurrent runs never share files.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("baton-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// config.json of a Hugging Face Llama with the same shape as the GGUF models.
pub fn hf_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": false
    })
}

/// Random f32 tensors named as a Hugging Face Llama checkpoint names them.
pub fn hf_tensors(seed: u64) -> Vec<(String, Tensor)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut random = |shape: &[usize]| {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).expect("random tensor")
    };
    let kv = KV_HEADS * HEAD_DIM;
    let mut out = vec![
        (
            "model.embed_tokens.weight".to_string(),
            random(&[VOCAB, HIDDEN]),
        ),
        ("lm_head.weight".to_string(), random(&[VOCAB, HIDDEN])),
        ("model.norm.weight".to_string(), random(&[HIDDEN])),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("input_layernorm.weight", vec![HIDDEN]),
            ("post_attention_layernorm.weight", vec![HIDDEN]),
            ("self_attn.q_proj.weight", vec![HIDDEN, HIDDEN]),
            ("self_attn.k_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.v_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.o_proj.weight", vec![HIDDEN, HIDDEN]),
            ("mlp.gate_proj.weight", vec![INTERMEDIATE, HIDDEN]),
            ("mlp.up_proj.weight", vec![INTERMEDIATE, HIDDEN]),
            ("mlp.down_proj.weight", vec![HIDDEN, INTERMEDIATE]),
        ] {
            out.push((format!("{p}.{name}"), random(&shape)));
        }
    }
    out
}

/// Writes a Hugging Face directory: config.json, the byte-level tokenizer.json and
/// model.safetensors.
pub fn write_hf(dir: &Path, config: &serde_json::Value, tensors: &[(String, Tensor)]) {
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config");
    std::fs::write(
        dir.join("tokenizer.json"),
        include_str!("../data/tiny-byte-tokenizer.json"),
    )
    .expect("write tokenizer");
    let map: std::collections::HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).expect("save");
}
