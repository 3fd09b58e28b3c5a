//! Model hyperparameters and engine settings: what a model file says about its shape, and how the
//! engine should hold its weights and KV cache.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Decoder families the engine runs. All are Llama-shaped (RMSNorm, RoPE, SwiGLU, GQA); the
/// variants differ in the details each field of [`ModelConfig`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM/SmolLM2.
    Llama,
    Mistral,
    /// Qwen2/Qwen2.5: biases on q, k and v.
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k, no qkv bias.
    Qwen3,
}

impl Architecture {
    /// Parses the GGUF `general.architecture` / HF `model_type` spelling.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" | "LlamaForCausalLM" => Some(Self::Llama),
            "mistral" | "MistralForCausalLM" => Some(Self::Mistral),
            "qwen2" | "Qwen2ForCausalLM" => Some(Self::Qwen2),
            "qwen3" | "Qwen3ForCausalLM" => Some(Self::Qwen3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }
}

/// Which pairs of a head's dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): llama.cpp's "norm" type; GGUF Llama files permute q/k for it.
    Interleaved,
    /// Pairs (i, i + d/2): Hugging Face checkpoints and GGUF Qwen ("neox" in llama.cpp).
    Halves,
}

/// Frequency scaling for long context, as the model files describe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1's per-frequency scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: usize,
    },
    /// One divisor per rotated frequency (GGUF `rope_freqs.weight`, how llama.cpp stores Llama 3.1
    /// scaling).
    FreqFactors(Vec<f32>),
}

/// The shape of a model, read from GGUF metadata or config.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rope_scaling: Option<RopeScaling>,
    /// Longest sequence (prompt + generated tokens) the model was trained for.
    pub max_position: usize,
    pub qkv_bias: bool,
    pub qk_norm: bool,
}

impl ModelConfig {
    /// Checks the relations between fields that the forward pass relies on.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position", self.max_position),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        // Checked here because loaders size q/k/v from it before any tensor can contradict it.
        if self.num_heads.checked_mul(self.head_dim).is_none() {
            return Err(format!(
                "num_heads {} times head_dim {} overflows",
                self.num_heads, self.head_dim
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta {} must be positive", self.rope_theta));
        }
        Ok(())
    }

    /// Bytes of K plus V one token occupies in one layer at `dtype`.
    pub fn kv_bytes_per_token_layer(&self, dtype: KvDType) -> usize {
        2 * self.num_kv_heads * self.head_dim * dtype.size()
    }
}

/// How the linear layers' weights are held for one phase of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// As the file stores them (GGUF quantized blocks; safetensors floats as f32).
    Quantized,
    /// Expanded to f32: fastest for compute-bound prefill on CPU.
    F32,
    /// Expanded to f16.
    F16,
}

/// The `weights` setting: `auto` picks per role (prefill dequantized, decode quantized).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WeightsSetting {
    /// f32 for prefill (compute-bound), the file's quantized weights for decode (memory-bound).
    #[default]
    Auto,
    /// As the file stores them.
    Quantized,
    /// Dequantized to f32 (`dequantized` is accepted too).
    #[serde(alias = "dequantized")]
    F32,
    /// Dequantized to f16.
    F16,
}

impl std::str::FromStr for WeightsSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "quantized" => Ok(Self::Quantized),
            "f32" | "dequantized" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            other => Err(format!(
                "unknown weights setting {other:?} (expected auto, quantized, f32 or f16)"
            )),
        }
    }
}

/// The work a process does, which decides what `weights = auto` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Prefill,
    Decode,
    /// Both phases in one process (colocated serving, `baton generate --local`).
    Colocated,
}

/// Weight formats per phase, resolved from the setting and the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightPlan {
    pub prefill: WeightFormat,
    pub decode: WeightFormat,
}

impl WeightPlan {
    /// `auto` gives prefill dequantized f32 weights (compute-bound: the project brief measured candle at 226 tok/s against
    /// 80 tok/s on Q4_1) and decode the file's quantized weights (memory-bound). A prefill worker
    /// never decodes, so it loads only the prefill format; a decode worker loads both, because
    /// it prefills short prompts itself and must compute them as a prefill worker would.
    pub fn resolve(setting: WeightsSetting, role: Role) -> Self {
        match setting {
            WeightsSetting::Auto => match role {
                Role::Prefill => Self::uniform(WeightFormat::F32),
                Role::Decode | Role::Colocated => Self {
                    prefill: WeightFormat::F32,
                    decode: WeightFormat::Quantized,
                },
            },
            WeightsSetting::Quantized => Self::uniform(WeightFormat::Quantized),
            WeightsSetting::F32 => Self::uniform(WeightFormat::F32),
            WeightsSetting::F16 => Self::uniform(WeightFormat::F16),
        }
    }

    pub fn uniform(format: WeightFormat) -> Self {
        Self {
            prefill: format,
            decode: format,
        }
    }
}

pub use baton_core::KvDType;

/// candle's element type for KV blocks of `dtype`.
pub(crate) fn candle_dtype(dtype: KvDType) -> candle_core::DType {
    match dtype {
        KvDType::F32 => candle_core::DType::F32,
        KvDType::F16 => candle_core::DType::F16,
    }
}

/// Whose code runs the engine's hot operations: baton's CPU kernels, or candle's ops (always on
/// a GPU; on the CPU when `cpu_kernels = candle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// baton's: repacked quantized matmuls (Q4_0, Q4_1, Q8_0), paged decode attention, fused
    /// RMSNorm, rope and SwiGLU passes, in-place KV writes.
    #[default]
    Baton,
    /// candle's tensor ops throughout: the code a CUDA device runs, on the CPU. Several times
    /// slower; it exists so the GPU's path through the engine (everything but candle's CUDA
    /// kernels themselves) is tested on machines without a GPU, and as a reference when a
    /// result of baton's kernels is in doubt.
    Candle,
}

impl Kernels {
    /// As written in configuration and flags.
    pub fn name(self) -> &'static str {
        match self {
            Self::Baton => "baton",
            Self::Candle => "candle",
        }
    }
}

impl std::str::FromStr for Kernels {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "baton" => Ok(Self::Baton),
            "candle" => Ok(Self::Candle),
            other => Err(format!(
                "unknown CPU kernels {other:?} (expected baton or candle)"
            )),
        }
    }
}

/// Where the engine keeps its weights and KV pool. Written `cpu`, `cuda` (ordinal 0) or `cuda:N`
/// in configuration and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSetting {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal; needs a build with the `cuda` feature.
    Cuda(usize),
}

impl std::str::FromStr for DeviceSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown device {other:?} (expected cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

impl std::fmt::Display for DeviceSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl TryFrom<String> for DeviceSetting {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceSetting> for String {
    fn from(d: DeviceSetting) -> String {
        d.to_string()
    }
}

impl JsonSchema for DeviceSetting {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DeviceSetting".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^(cpu|cuda(:[0-9]+)?)$",
            "description": "cpu, cuda (ordinal 0) or cuda:N; CUDA needs a build with the `cuda` feature."
        })
    }
}

impl DeviceSetting {
    /// Whose kernels an engine on this device runs: candle's on CUDA, whatever `cpu` asks for
    /// on the CPU.
    pub fn kernels(self, cpu: Kernels) -> Kernels {
        match self {
            Self::Cpu => cpu,
            Self::Cuda(_) => Kernels::Candle,
        }
    }

    /// Opens the device; a CUDA setting in a build without the `cuda` feature is a clear error.
    pub fn open(self) -> crate::Result<candle_core::Device> {
        match self {
            Self::Cpu => Ok(candle_core::Device::Cpu),
            #[cfg(feature = "cuda")]
            Self::Cuda(n) => Ok(candle_core::Device::new_cuda(n)?),
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(_) => Err(crate::Error::invalid(
                "device",
                "this build has no CUDA support; rebuild with `--features cuda`",
            )),
        }
    }
}

/// Settings for one engine instance: the `[prefill.engine]` and `[decode.engine]` tables of a
/// config file. Every key is optional; a missing key has the default [`EngineConfig::new`] gives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default = "EngineConfig::unset")]
pub struct EngineConfig {
    /// A `.gguf` file, or a Hugging Face directory with config.json, *.safetensors and
    /// tokenizer.json. Default: empty, meaning `$BATON_MODEL`, else the development model
    /// (fetched by scripts/fetch-model.sh).
    pub model: std::path::PathBuf,
    /// How linear-layer weights are held: `auto` (f32 for prefill, the file's quantized weights
    /// for decode), `quantized`, `f32` or `f16`. Default `auto`.
    pub weights: WeightsSetting,
    /// What `weights = auto` means. Not configuration: the role running the engine sets it.
    #[serde(skip)]
    pub role: Role,
    /// Whether the KV pool's memory may be mapped by another process on this host. Not
    /// configuration: a decode worker that receives over shared memory sets it.
    #[serde(skip)]
    pub pool_memory: crate::kv::PoolMemory,
    /// Which part of the model this engine holds: all of it, or one rank's shard of a
    /// tensor- and pipeline-parallel group. Not configuration: the group launcher sets it.
    #[serde(skip)]
    pub shard: crate::shard::Shard,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` feature). Default `cpu`.
    pub device: DeviceSetting,
    /// On a `cpu` device, whose kernels run: `baton` (fast) or `candle` (candle's tensor ops,
    /// the path a CUDA device takes). Ignored on CUDA, which always runs candle's. Default
    /// `baton`.
    pub cpu_kernels: Kernels,
    /// Tokens per KV block, 1 to 1024. Default 16.
    pub block_size: usize,
    /// Size of the KV block pool, in MiB (in code: bytes). Default 512.
    #[serde(rename = "kv_cache_mib", with = "mib")]
    #[schemars(rename = "kv_cache_mib", with = "u64")]
    pub kv_cache_bytes: usize,
    /// Element type of KV blocks: `f32` or `f16`. Default `f32`: the numbers the reference
    /// tests check. `f16` halves the pool's bytes per token, the bytes a handoff moves and
    /// decode attention's reads, at the cost of rounding K and V (on SmolLM2, logits then drift
    /// up to about 2 from candle's f32 reference within 64 greedy steps). Attention reads K and
    /// V from the cache in prefill too, so a disaggregated run matches one process with either.
    pub kv_dtype: KvDType,
    /// Longest prompt slice computed in one step, in tokens; longer prompts are prefilled in
    /// chunks so they share steps with running decodes. A positive multiple of `block_size`, so
    /// every chunk but a prompt's last fills whole blocks and a block's KV can leave after the
    /// step that wrote it. Default 512.
    pub prefill_chunk_tokens: usize,
    /// Most tokens (decode tokens plus prefill chunk tokens) one step computes; at least
    /// `prefill_chunk_tokens`. Default 2048.
    pub max_batch_tokens: usize,
    /// Most sequences decoding at once. Default 64.
    pub max_running: usize,
    /// Context length cap, in tokens (prompt plus generated). Default: unset, the model's
    /// trained maximum.
    pub max_context: Option<usize>,
    /// Automatic prefix caching: a full KV block stays in the pool after its sequence ends,
    /// named by its tokens and everything before them, until its memory is needed (least
    /// recently used first); a new prompt starts from the longest cached prefix and computes
    /// only the rest. Default true.
    pub prefix_cache: bool,
    /// Which cached blocks a prompt may start from: `prefill` (blocks prefill steps computed,
    /// here or on a prefill worker: the same bits a run without the cache computes, so greedy
    /// outputs are identical) or `any` (also blocks decode steps wrote, such as a
    /// conversation's earlier answers: less to compute, with decode weights' numbers; the
    /// measured difference is in docs/architecture.md). Default `prefill`.
    pub prefix_reuse: PrefixReuse,
    /// The context a prefill step's attention spans on candle's kernels (a CUDA device, or
    /// `cpu_kernels = candle`), whose matrix multiply over the context sums in an order that
    /// depends on its length: `tile` (zero keys pad it to a multiple of 64, behind the causal
    /// mask, so a prompt's KV depends less on what prompt it is part of), `chunk` (padded to the
    /// chunk grid) or `prompt` (no padding). baton's CPU kernels (the default on a CPU) compute
    /// each row over its own context, in an order no chunking or cache changes, and ignore it:
    /// there a cached prefix gives exactly a recompute's outputs. Default `tile`.
    pub prefill_attention_span: AttentionSpan,
}

/// What a prefill step's attention spans ([`EngineConfig::prefill_attention_span`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AttentionSpan {
    /// The context rounded up to a multiple of [`AttentionSpan::TILE`] keys.
    #[default]
    Tile,
    /// The context up to the end of the chunk grid cell.
    Chunk,
    /// The context only.
    Prompt,
}

impl AttentionSpan {
    /// Keys a `tile` span rounds up to. candle's CPU matmul (gemm) sums the last, partial
    /// group of a row's products in another order than a full one, so a context whose length
    /// differs below this granularity gives other bits. Padding does not make it exact: the
    /// same matmul also sums differently with the chunk's row count once contexts pass 512
    /// keys (engine/tests/prefix_cache.rs), which is why baton's CPU kernels compute prefill
    /// attention per row instead.
    pub const TILE: usize = 64;

    /// The keys a prefill step ending at position `end` attends over, in `chunk`-token chunks.
    pub fn span(self, end: usize, chunk: usize) -> usize {
        match self {
            Self::Tile => end.next_multiple_of(Self::TILE),
            Self::Chunk => end.next_multiple_of(chunk),
            Self::Prompt => end,
        }
    }
}

/// Which cached KV blocks a new prompt may start from ([`EngineConfig::prefix_reuse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PrefixReuse {
    /// Only blocks every token of which a prefill step computed.
    #[default]
    Prefill,
    /// Any cached block, decode-written ones too.
    Any,
}

impl PrefixReuse {
    /// Whether a block computed as `source` may be reused.
    pub fn accepts(self, source: crate::kv::KvSource) -> bool {
        self == Self::Any || source == crate::kv::KvSource::Prefill
    }
}

/// `kv_cache_bytes` as whole MiB in configuration.
mod mib {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &usize, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64((*bytes >> 20) as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let mib = u64::deserialize(d)?;
        usize::try_from(mib)
            .ok()
            .and_then(|m| m.checked_mul(1 << 20))
            .ok_or_else(|| serde::de::Error::custom(format!("{mib} MiB does not fit in memory")))
    }
}

impl EngineConfig {
    pub fn new(model: impl Into<std::path::PathBuf>, role: Role) -> Self {
        Self {
            model: model.into(),
            weights: WeightsSetting::Auto,
            role,
            pool_memory: crate::kv::PoolMemory::Private,
            shard: crate::shard::Shard::whole(),
            device: DeviceSetting::Cpu,
            cpu_kernels: Kernels::Baton,
            block_size: 16,
            kv_cache_bytes: 512 << 20,
            kv_dtype: KvDType::F32,
            prefill_chunk_tokens: 512,
            max_batch_tokens: 2048,
            max_running: 64,
            max_context: None,
            prefix_cache: true,
            prefix_reuse: PrefixReuse::Prefill,
            prefill_attention_span: AttentionSpan::Tile,
        }
    }

    /// The defaults of a config file's engine table: no model chosen yet, role set by the
    /// enclosing worker config.
    fn unset() -> Self {
        Self::new(std::path::PathBuf::new(), Role::Colocated)
    }

    pub fn validate(&self) -> crate::Result<()> {
        use crate::Error;
        if self.block_size == 0 || self.block_size > 1024 {
            return Err(Error::invalid("block_size", "must be between 1 and 1024"));
        }
        if self.prefill_chunk_tokens == 0
            || !self.prefill_chunk_tokens.is_multiple_of(self.block_size)
        {
            return Err(Error::invalid(
                "prefill_chunk_tokens",
                format!(
                    "must be a positive multiple of block_size ({})",
                    self.block_size
                ),
            ));
        }
        if self.max_batch_tokens < self.prefill_chunk_tokens {
            return Err(Error::invalid(
                "max_batch_tokens",
                "must be at least prefill_chunk_tokens",
            ));
        }
        if self.max_running == 0 {
            return Err(Error::invalid("max_running", "must be positive"));
        }
        if self.max_context == Some(0) {
            return Err(Error::invalid("max_context", "must be positive"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_setting_parses_and_names_bad_values() {
        assert_eq!("cpu".parse(), Ok(DeviceSetting::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSetting::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSetting::Cuda(3)));
        let err = "gpu".parse::<DeviceSetting>().expect_err("unknown device");
        assert!(err.contains("gpu"), "{err}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_device_without_the_feature_is_a_clear_error() {
        let err = DeviceSetting::Cuda(0)
            .open()
            .expect_err("no cuda in this build");
        assert!(err.to_string().contains("--features cuda"), "{err}");
        assert_eq!(err.class(), crate::ErrorClass::InvalidRequest);
    }

    #[test]
    fn auto_weights_are_f32_for_prefill_and_quantized_for_decode() {
        let plan = WeightPlan::resolve(WeightsSetting::Auto, Role::Colocated);
        assert_eq!(plan.prefill, WeightFormat::F32);
        assert_eq!(plan.decode, WeightFormat::Quantized);
        let prefill_only = WeightPlan::resolve(WeightsSetting::Auto, Role::Prefill);
        assert_eq!(prefill_only, WeightPlan::uniform(WeightFormat::F32));
        assert_eq!("dequantized".parse(), Ok(WeightsSetting::F32));
        assert!("q4".parse::<WeightsSetting>().is_err());
    }

    #[test]
    fn engine_config_reads_devices_as_text_and_the_kv_pool_in_mib() {
        let cfg: EngineConfig = serde_json::from_str(
            r#"{"device": "cuda:1", "kv_cache_mib": 64, "weights": "dequantized"}"#,
        )
        .expect("a valid engine table");
        assert_eq!(cfg.device, DeviceSetting::Cuda(1));
        assert_eq!(cfg.kv_cache_bytes, 64 << 20);
        assert_eq!(cfg.weights, WeightsSetting::F32);
        assert_eq!(cfg.block_size, 16, "missing keys keep their defaults");
        let text = serde_json::to_value(&cfg).expect("serializes");
        assert_eq!(text["device"], "cuda:1");
        assert_eq!(text["kv_cache_mib"], 64);
        assert!(text.get("role").is_none(), "the role is not configuration");
        let err = serde_json::from_str::<EngineConfig>(r#"{"kv_cache_mb": 64}"#)
            .expect_err("unknown key");
        assert!(err.to_string().contains("kv_cache_mb"), "{err}");
    }

    #[test]
    fn cuda_always_runs_candle_kernels_and_the_cpu_runs_the_ones_asked_for() {
        for asked in [Kernels::Baton, Kernels::Candle] {
            assert_eq!(DeviceSetting::Cuda(0).kernels(asked), Kernels::Candle);
            assert_eq!(DeviceSetting::Cpu.kernels(asked), asked);
        }
        let cfg: EngineConfig =
            serde_json::from_str(r#"{"cpu_kernels": "candle"}"#).expect("a valid engine table");
        assert_eq!(cfg.cpu_kernels, Kernels::Candle);
        assert_eq!(EngineConfig::unset().cpu_kernels, Kernels::Baton);
        let err = serde_json::from_str::<EngineConfig>(r#"{"cpu_kernels": "avx"}"#)
            .expect_err("unknown kernels");
        assert!(err.to_string().contains("avx"), "{err}");
        assert_eq!("candle".parse(), Ok(Kernels::Candle));
        let err = "avx".parse::<Kernels>().expect_err("unknown kernels");
        assert!(err.contains("baton or candle"), "{err}");
    }

    #[test]
    fn engine_config_validation_names_the_field() {
        let mut cfg = EngineConfig::new("m.gguf", Role::Decode);
        cfg.validate().expect("defaults are valid");
        cfg.block_size = 0;
        let err = cfg.validate().expect_err("zero block size");
        assert!(err.to_string().contains("block_size"), "{err}");
        let mut cfg = EngineConfig::new("m.gguf", Role::Decode);
        cfg.max_batch_tokens = cfg.prefill_chunk_tokens - 1;
        let err = cfg.validate().expect_err("batch smaller than a chunk");
        assert!(err.to_string().contains("max_batch_tokens"), "{err}");
    }
}
