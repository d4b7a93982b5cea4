//! One module per subcommand; shared model options here.

pub mod bench_io;
pub mod chat;
pub mod convert;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod serve;
pub mod synth;
pub mod timing;
pub mod tokenize;

use std::path::PathBuf;

use std::sync::Arc;

use anyhow::Context;
use flash_moe_engine::Error as EngineError;
use flash_moe_engine::backend::Backend;
use flash_moe_engine::backend::cpu::CpuBackend;
use flash_moe_engine::backend::cuda::{self, CudaBackend};
use flash_moe_engine::engine::load_model;
use flash_moe_engine::model::{CpuShare, Model};
use flash_moe_engine::storage::io::IoMode;
use flash_moe_engine::storage::store::{ExpertIo, ExpertStore, StoreConfig};

/// How routed experts are read (`--io`).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum IoChoice {
    /// On the CPU, memory-map the expert files when the model fits in available memory (no
    /// copy per read) and --expert-cache-mib asks for no cache of its own; otherwise, and on
    /// a GPU (whose copies go from page-locked buffers), buffered reads.
    Auto,
    /// Buffered reads; the OS page cache keeps warm experts.
    PageCache,
    /// O_DIRECT reads that bypass the page cache (for machines where it thrashes).
    Direct,
    /// Memory-map the expert files (resident memory grows with the experts touched).
    Mmap,
}

/// Where the arithmetic runs (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// CUDA when a GPU is found and can run the model, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("`{s}` is not auto, cpu, cuda or cuda:N")),
        }
    }
}

/// Tokens of sequence state (KV caches) an automatic VRAM expert budget leaves room for. A
/// model's full context (262k tokens for Qwen3.5) would take most of a 24 GB card for a
/// length few conversations reach; longer ones take memory from the expert cache as they grow.
const RESERVED_CONTEXT: usize = 32 << 10;

/// A command's work, written once for every backend.
pub trait ModelJob {
    fn run<B: Backend>(self, model: Model<B>, store: Arc<ExpertStore>) -> anyhow::Result<()>;

    /// The longest sequence the job allows, when the user set one: an automatic VRAM expert
    /// budget then leaves room for the state of that many tokens (otherwise RESERVED_CONTEXT).
    fn max_context(&self) -> Option<usize> {
        None
    }
}

/// Options every command that runs the model takes.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model directory: config.json, safetensors weights, tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Routed experts per token (default: the model's num_experts_per_tok). Fewer is faster
    /// and lowers quality.
    #[arg(long)]
    pub experts_per_token: Option<usize>,
    /// How routed experts are read from disk.
    #[arg(long, value_enum, default_value = "auto")]
    pub io: IoChoice,
    /// In-process LRU cache of experts, in MiB (0: none; the OS page cache still works).
    #[arg(long, default_value_t = 0)]
    pub expert_cache_mib: u64,
    /// Threads reading experts.
    #[arg(long, default_value_t = 8)]
    pub io_threads: usize,
    /// Where to compute: auto (CUDA when a GPU is found, the CPU with a warning where the
    /// CUDA libraries are missing or the GPU cannot hold the dense weights), cpu, cuda or
    /// cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// VRAM for the routed-expert cache, in GiB (default: what is free after the dense
    /// weights, the state of a 32k-token sequence or of --max-context where a command takes
    /// one, and 2 GiB of headroom; 0: no cache). When a longer sequence or prompt snapshots
    /// need more, the cache gives experts back.
    #[arg(long)]
    pub gpu_expert_cache_gib: Option<f64>,
    /// On a GPU: of one token's routed experts missing from the VRAM cache, the share (0 to
    /// 1, rounded) the CPU computes from host memory while the others are copied to the GPU.
    /// auto: for each number of missed experts, the split that gave the shortest layers so
    /// far, measured as decoding goes (a few splits around the best share found tried first,
    /// the best one's neighbours now and then after); the last bits of the sum then vary with
    /// the split.
    /// 0: every missed expert goes to the GPU.
    #[arg(long, default_value = "auto")]
    pub cpu_expert_share: CpuShare,
    /// Launch every kernel of a GPU decode step one by one, instead of replaying layer steps
    /// recorded as CUDA graphs (for comparison and debugging).
    #[arg(long)]
    pub no_cuda_graphs: bool,
    /// Run attention on a GPU in FP32 (a prompt's as cuBLAS matrix products, a token's on
    /// the split kernels) instead of the tensor-core kernels (for comparison and debugging).
    #[arg(long)]
    pub no_flash_attention: bool,
    /// Prompt tokens per attention pass. A prompt is prefilled layer by layer in windows of 8
    /// chunks: each layer's experts run on the whole window, so each expert is read once per
    /// window. Larger chunks take more memory for activations.
    #[arg(long, default_value_t = flash_moe_engine::model::DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
}

impl ModelArgs {
    fn store_config(&self, on_cpu: bool) -> StoreConfig {
        StoreConfig {
            io: match self.io {
                IoChoice::Auto if on_cpu && self.expert_cache_mib == 0 && weights_fit_in_memory(&self.model) => {
                    ExpertIo::Mmap
                }
                IoChoice::Auto | IoChoice::PageCache => ExpertIo::Read(IoMode::PageCache),
                IoChoice::Direct => ExpertIo::Read(IoMode::Direct),
                IoChoice::Mmap => ExpertIo::Mmap,
            },
            cache_bytes: self.expert_cache_mib << 20,
            io_threads: self.io_threads,
            host_memory: None,
        }
    }

    /// Loads the model on the chosen device and runs `job` with it.
    pub fn run<J: ModelJob>(&self, job: J) -> anyhow::Result<()> {
        let device = match self.device {
            Device::Auto if cuda::is_available() => Device::Cuda(0),
            Device::Auto => Device::Cpu,
            d => d,
        };
        let Device::Cuda(n) = device else {
            return self.run_on_cpu(job);
        };
        // Where `auto` chose a GPU that cannot run the model (CUDA libraries missing, no room
        // for the dense weights), the CPU still can.
        let auto = self.device == Device::Auto;
        let fall_back = |e: anyhow::Error| {
            eprintln!("warning: {e:#}; running on the CPU instead");
        };
        let backend = match self.open_cuda(n) {
            Ok(backend) => backend,
            Err(e) if auto => {
                fall_back(e);
                return self.run_on_cpu(job);
            }
            Err(e) => return Err(e),
        };
        match self.load_on_cuda(backend, job.max_context()) {
            Ok((model, store)) => job.run(model, store),
            Err(e) if auto && is_out_of_device_memory(&e) => {
                fall_back(e);
                self.run_on_cpu(job)
            }
            Err(e) if is_out_of_device_memory(&e) => Err(anyhow::anyhow!("{e:#} (--device cpu runs it on the CPU)")),
            Err(e) => Err(e),
        }
    }

    fn run_on_cpu<J: ModelJob>(&self, job: J) -> anyhow::Result<()> {
        let store = ExpertStore::new(self.store_config(true));
        let context = job.max_context();
        job.run(self.load_on(CpuBackend::new(), Arc::clone(&store), context)?, store)
    }

    fn open_cuda(&self, n: usize) -> anyhow::Result<CudaBackend> {
        let cache = self.gpu_expert_cache_gib.map(|g| (g * (1u64 << 30) as f64) as u64);
        Ok(CudaBackend::new(n, cache)
            .with_context(|| format!("opening cuda:{n}"))?
            .record_steps(!self.no_cuda_graphs)
            .flash_attention(!self.no_flash_attention))
    }

    /// The model on `backend`, with an expert store whose buffers are page-locked (copies to
    /// the GPU go straight from them).
    fn load_on_cuda(
        &self,
        backend: CudaBackend,
        context: Option<usize>,
    ) -> anyhow::Result<(Model<CudaBackend>, Arc<ExpertStore>)> {
        let store = ExpertStore::new(StoreConfig {
            host_memory: Some(backend.pinned_allocator()),
            ..self.store_config(false)
        });
        Ok((self.load_on(backend, Arc::clone(&store), context)?, store))
    }

    /// The model on `backend`, its expert budget leaving room for the state of `context`
    /// tokens (default: RESERVED_CONTEXT, or the model's context if shorter).
    fn load_on<B: Backend>(
        &self,
        backend: B,
        store: Arc<ExpertStore>,
        context: Option<usize>,
    ) -> anyhow::Result<Model<B>> {
        let mut model = load_model(&self.model, backend, store)
            .with_context(|| format!("loading model from {}", self.model.display()))?;
        model.set_prefill_chunk(self.prefill_chunk)?;
        model.set_cpu_expert_share(self.cpu_expert_share)?;
        model.reserve_state_memory(context.unwrap_or(model.config.max_position_embeddings.min(RESERVED_CONTEXT)));
        if let Some(k) = self.experts_per_token {
            let native = model.config.moe.experts_per_token;
            model.set_experts_per_token(k)?;
            if k < native {
                eprintln!("warning: using {k} of the model's {native} experts per token; output quality drops");
            }
        }
        if let Some(bytes) = model
            .preload_experts_if_they_fit()
            .context("loading the routed experts into the GPU's expert cache")?
        {
            eprintln!(
                "all routed experts ({:.2} GiB) loaded into the GPU's expert cache",
                bytes as f64 / (1u64 << 30) as f64
            );
        }
        Ok(model)
    }
}

/// Whether `e` is, or was caused by, the GPU running out of memory.
fn is_out_of_device_memory(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<EngineError>(),
            Some(EngineError::OutOfDeviceMemory { .. })
        )
    })
}

/// Memory left free beside a model whose files are mapped: the process's own buffers, the
/// OS, and whatever else runs.
const MAP_HEADROOM: u64 = 4 << 30;

/// Whether the model's weight files fit in the memory the kernel reports available, with
/// MAP_HEADROOM to spare: then mapping them keeps every expert resident after its first
/// read. Unknown memory counts as not fitting.
fn weights_fit_in_memory(dir: &std::path::Path) -> bool {
    fits_with_headroom(model_bytes(dir), available_memory())
}

fn fits_with_headroom(bytes: u64, available: Option<u64>) -> bool {
    available.is_some_and(|available| bytes + MAP_HEADROOM <= available)
}

/// Bytes of the files directly in `dir` and in `dir/experts` (a packed model's layout; a
/// checkpoint's shards sit in `dir`).
fn model_bytes(dir: &std::path::Path) -> u64 {
    let files = |d: std::path::PathBuf| {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum::<u64>()
    };
    files(dir.to_path_buf()) + files(dir.join("experts"))
}

/// `MemAvailable` of /proc/meminfo, in bytes: free memory plus what the page cache could
/// give back (which includes the model's own cached pages).
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_available(&info)
}

fn meminfo_available(info: &str) -> Option<u64> {
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// A progress bar over `total` bytes on stderr, hidden when stderr is not a terminal.
pub fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_device_memory_is_found_under_context() {
        let oom = EngineError::OutOfDeviceMemory {
            what: "tensor `lm_head.weight`".into(),
            bytes: 1 << 30,
        };
        let e = anyhow::Error::new(oom).context("loading model from m");
        assert!(is_out_of_device_memory(&e));
        assert!(is_out_of_device_memory(&e.context("opening cuda:0")));
        let other = anyhow::Error::new(EngineError::Cuda("launch failed".into())).context("loading model from m");
        assert!(!is_out_of_device_memory(&other));
    }

    #[test]
    fn available_memory_is_read_from_meminfo() {
        let info = "MemTotal:       24542756 kB\nMemFree:         1000 kB\nMemAvailable:   23000000 kB\n";
        assert_eq!(meminfo_available(info), Some(23_000_000 << 10));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
        assert_eq!(meminfo_available("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn a_model_maps_when_it_fits_beside_the_headroom() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("experts")).expect("experts dir");
        std::fs::write(dir.path().join("dense.safetensors"), vec![0u8; 3000]).expect("write");
        std::fs::write(dir.path().join("experts/layer-000.bin"), vec![0u8; 5000]).expect("write");
        assert_eq!(model_bytes(dir.path()), 8000);
        assert!(fits_with_headroom(8000, Some(MAP_HEADROOM + 8000)));
        assert!(!fits_with_headroom(8001, Some(MAP_HEADROOM + 8000)));
        assert!(!fits_with_headroom(0, None), "unknown memory");
        assert_eq!(model_bytes(std::path::Path::new("/nonexistent/model")), 0);
    }
}
