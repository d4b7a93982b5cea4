//! Compiling the CUDA C of `kernels/` with NVRTC for the GPU found: six programs (each
//! `common.cuh` followed by one topic's kernels) compiled side by side, with an on-disk cache
//! keyed by each program's source and the architecture, so only the first start pays.

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

use crate::error::{Error, Result};

/// Shared memory kept for the static arrays of the kernels that take more than the default
/// 48 KiB (bytes; the batched down products' 1.2 KiB is the most they have now).
const STATIC_SHARED_ROOM: i32 = 4096;

/// Dynamic shared memory a kernel may ask for on a GPU with `per_block` bytes per block.
fn dynamic_shared(per_block: usize) -> usize {
    per_block.saturating_sub(STATIC_SHARED_ROOM as usize)
}

/// A program's source: the shared definitions, then one topic's kernels.
macro_rules! program {
    ($file:literal) => {
        concat!(
            include_str!("kernels/common.cuh"),
            include_str!(concat!("kernels/", $file))
        )
    };
}

/// The kernel programs, embedded in the binary: a name and the source.
pub const PROGRAMS: [(&str, &str); 6] = [
    ("matvec", program!("matvec.cu")),
    ("prefill", program!("prefill.cu")),
    ("elementwise", program!("elementwise.cu")),
    ("attention", program!("attention.cu")),
    ("delta", program!("delta.cu")),
    ("sampling", program!("sampling.cu")),
];

/// Every kernel the backend launches.
pub struct Kernels {
    /// Dynamic shared memory a block may take on this GPU (bytes).
    pub max_shared: usize,
    pub dequant_rows: CudaFunction,
    /// One-token affine matvec for 2, 4, 8 bits, and the fused SwiGLU (gate and up) variant.
    pub matvec_q: [CudaFunction; 3],
    /// Blocks of 256 threads of each `matvec_q` one multiprocessor holds at once.
    pub matvec_resident: [u32; 3],
    /// The same products with a pair of neighbouring rows per warp, for matrices tall enough
    /// to give every multiprocessor a block of pairs, and their blocks per multiprocessor.
    pub matvec_pairs_q: [CudaFunction; 3],
    pub matvec_pairs_resident: [u32; 3],
    pub swiglu_q: [CudaFunction; 3],
    /// Up to `MAX_MULTI` matrices reading the same x, one token, one launch (2, 4, 8 bits).
    pub matvec_multi_q: [CudaFunction; 3],
    /// All routed experts of a token in two launches (2, 4, 8 bits).
    pub swiglu_batch_q: [CudaFunction; 3],
    /// Blocks of 256 threads of each `swiglu_batch_q` (or `route_swiglu_batch_q`) one
    /// multiprocessor holds at once (their registers bound it), to size grids in whole waves.
    pub swiglu_batch_resident: [u32; 3],
    pub down_batch_q: [CudaFunction; 3],
    /// The same two launches for a token routed on the device: the gate/up launch routes it
    /// and writes the batch to device memory, where the down launch reads it.
    pub route_swiglu_batch_q: [CudaFunction; 3],
    pub down_batch_dev_q: [CudaFunction; 3],
    pub matvec_affine_any: CudaFunction,
    pub matvec_dense: CudaFunction,
    pub rms_norm: CudaFunction,
    pub gated_rms_norm: CudaFunction,
    pub add_assign: CudaFunction,
    pub axpy: CudaFunction,
    pub mul_sigmoid: CudaFunction,
    pub silu_mul: CudaFunction,
    pub split_query_gate: CudaFunction,
    pub gather_rows: CudaFunction,
    pub scatter_add_rows: CudaFunction,
    /// Each token's weighted expert outputs added in order (a layer's experts for a prompt).
    pub combine_rows: CudaFunction,
    /// One matrix of each of a layer's experts on its rows of a prompt, one launch, on the
    /// tensor cores (2, 4, 8 bits; compute capability 8.0 and later).
    pub grouped_matmul_q: [CudaFunction; 3],
    /// Rows of floats as the two f16 limbs `grouped_matmul_q` reads.
    pub split_rows_f16: CudaFunction,
    pub rope: CudaFunction,
    pub attention_inputs: CudaFunction,
    /// Decode attention split over the keys, for query groups of up to 4, 8, 16 and 32
    /// heads per KV head.
    pub attention_split: [CudaFunction; 4],
    pub attention_combine: CudaFunction,
    /// f32 rows into the 16-bit limbs that `attention_flash` reads.
    pub attention_limbs: CudaFunction,
    /// Prompt attention on the tensor cores, for head dims of 32, 64, 128 and 256.
    pub attention_flash: [CudaFunction; 4],
    /// Decode attention on the tensor cores, for head dims of 64, 128 and 256.
    pub attention_decode: [CudaFunction; 3],
    pub attention_softmax: CudaFunction,
    pub causal_conv1d_silu: CudaFunction,
    /// The conv over a prompt, rows split among threads; leaves the state to the caller.
    pub causal_conv1d_silu_rows: CudaFunction,
    pub gated_delta_rule: CudaFunction,
    /// The delta rule over a prompt in chunks of tokens.
    pub gated_delta_chunks: CudaFunction,
    pub route_top_k: CudaFunction,
    /// Greedy decoding's choice among the logits, without downloading them.
    pub argmax_f32: CudaFunction,
    /// A temperature draw's candidates: the logits near the largest, or each block's top k.
    pub logits_near_max: CudaFunction,
    pub top_keys: CudaFunction,
    /// The sampler's penalties on a copy of the logits.
    pub penalize_logits: CudaFunction,
}

impl Kernels {
    /// Lowers `max_shared` to what a GPU with `per_block` bytes of shared memory per block
    /// would allow (never raises it).
    pub fn limit_shared(&mut self, per_block: usize) {
        self.max_shared = self.max_shared.min(dynamic_shared(per_block));
    }

    pub fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Self> {
        let modules = compile(ctx, arch)?;
        let f = |name: &str| {
            modules
                .iter()
                .find_map(|m| m.load_function(name).ok())
                .ok_or_else(|| Error::Cuda(format!("kernel `{name}` not found in the compiled modules")))
        };
        // The batched down projection keeps every expert's activation in shared memory, the
        // grouped products their stages of codes and x, the chunked delta rule a block's
        // columns of the state and a chunk's keys and queries, the split attention a group's
        // queries and a chunk's scores, the prompt attention its queries and two tiles of keys,
        // the decode attention three stages of keys and values.
        // They may take what a block can have on this GPU (over 48 KiB only when asked for:
        // 227 KiB on Hopper, 163 KiB on the A100, 99 KiB on Ada and most of Ampere) less their
        // static arrays; the host checks each launch's need against `max_shared`.
        let block_shared = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| Error::Cuda(format!("reading the shared memory per block: {e}")))?;
        let big_smem = |name: &str| {
            let func = f(name)?;
            let fixed = func
                .get_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .map_err(|e| Error::Cuda(format!("reading the static shared memory of `{name}`: {e}")))?;
            if fixed > STATIC_SHARED_ROOM {
                return Err(Error::Cuda(format!(
                    "`{name}` has {fixed} bytes of static shared memory, over the {STATIC_SHARED_ROOM} kept for it"
                )));
            }
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                block_shared - fixed,
            )
            .map_err(|e| Error::Cuda(format!("raising the shared memory of `{name}`: {e}")))?;
            Ok::<_, Error>(func)
        };
        let swiglu_batch_q = [f("swiglu_batch_q2")?, f("swiglu_batch_q4")?, f("swiglu_batch_q8")?];
        // A grid-sizing hint only: two blocks per multiprocessor if the driver cannot say.
        let resident = |func: &CudaFunction| {
            func.occupancy_max_active_blocks_per_multiprocessor(256, 0, None)
                .unwrap_or(2)
        };
        let matvec_q = [f("matvec_q2")?, f("matvec_q4")?, f("matvec_q8")?];
        let matvec_resident = matvec_q.each_ref().map(resident);
        let matvec_pairs_q = [f("matvec_pairs_q2")?, f("matvec_pairs_q4")?, f("matvec_pairs_q8")?];
        let matvec_pairs_resident = matvec_pairs_q.each_ref().map(resident);
        let route_swiglu_batch_q = [
            f("route_swiglu_batch_q2")?,
            f("route_swiglu_batch_q4")?,
            f("route_swiglu_batch_q8")?,
        ];
        let swiglu_batch_resident =
            std::array::from_fn(|i| resident(&swiglu_batch_q[i]).min(resident(&route_swiglu_batch_q[i])));
        Ok(Kernels {
            max_shared: dynamic_shared(block_shared as usize),
            dequant_rows: f("dequant_rows")?,
            matvec_q,
            matvec_resident,
            matvec_pairs_q,
            matvec_pairs_resident,
            swiglu_q: [f("swiglu_q2")?, f("swiglu_q4")?, f("swiglu_q8")?],
            matvec_multi_q: [f("matvec_multi_q2")?, f("matvec_multi_q4")?, f("matvec_multi_q8")?],
            swiglu_batch_q,
            swiglu_batch_resident,
            down_batch_q: [
                big_smem("down_batch_q2")?,
                big_smem("down_batch_q4")?,
                big_smem("down_batch_q8")?,
            ],
            route_swiglu_batch_q,
            down_batch_dev_q: [
                big_smem("down_batch_dev_q2")?,
                big_smem("down_batch_dev_q4")?,
                big_smem("down_batch_dev_q8")?,
            ],
            matvec_affine_any: f("matvec_affine_any")?,
            matvec_dense: f("matvec_dense")?,
            rms_norm: f("rms_norm")?,
            gated_rms_norm: f("gated_rms_norm")?,
            add_assign: f("add_assign")?,
            axpy: f("axpy")?,
            mul_sigmoid: f("mul_sigmoid")?,
            silu_mul: f("silu_mul")?,
            split_query_gate: f("split_query_gate")?,
            gather_rows: f("gather_rows")?,
            scatter_add_rows: f("scatter_add_rows")?,
            combine_rows: f("combine_rows")?,
            grouped_matmul_q: [
                big_smem("grouped_matmul_q2")?,
                big_smem("grouped_matmul_q4")?,
                big_smem("grouped_matmul_q8")?,
            ],
            split_rows_f16: f("split_rows_f16")?,
            rope: f("rope")?,
            attention_inputs: f("attention_inputs")?,
            attention_split: [
                big_smem("attention_split_g4")?,
                big_smem("attention_split_g8")?,
                big_smem("attention_split_g16")?,
                big_smem("attention_split_g32")?,
            ],
            attention_combine: f("attention_combine")?,
            attention_limbs: f("attention_limbs")?,
            attention_flash: [
                big_smem("attention_flash_d32")?,
                big_smem("attention_flash_d64")?,
                big_smem("attention_flash_d128")?,
                big_smem("attention_flash_d256")?,
            ],
            attention_decode: [
                big_smem("attention_decode_d64")?,
                big_smem("attention_decode_d128")?,
                big_smem("attention_decode_d256")?,
            ],
            attention_softmax: f("attention_softmax")?,
            causal_conv1d_silu: f("causal_conv1d_silu")?,
            causal_conv1d_silu_rows: f("causal_conv1d_silu_rows")?,
            gated_delta_rule: f("gated_delta_rule")?,
            gated_delta_chunks: big_smem("gated_delta_chunks")?,
            route_top_k: f("route_top_k")?,
            argmax_f32: f("argmax_f32")?,
            logits_near_max: f("logits_near_max")?,
            top_keys: f("top_keys")?,
            penalize_logits: f("penalize_logits")?,
        })
    }
}

/// NVRTC options for `arch` (e.g. `sm_90`).
fn options(arch: &str) -> CompileOptions {
    CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        // Exact division and square roots: the parity tests compare with the CPU backend.
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        ..Default::default()
    }
}

/// Compiles program `PROGRAMS[i]` to PTX (no device needed). Used by the start-up path and
/// by tests that only check the source compiles.
pub fn compile_ptx(i: usize, arch: &str) -> Result<Ptx> {
    let (name, source) = PROGRAMS[i];
    compile_ptx_with_opts(source, options(arch))
        .map_err(|e| Error::Cuda(format!("compiling kernels/{name}.cu for {arch}: {e}")))
}

/// Compiles the programs `which` side by side (NVRTC compiles one program on one thread).
fn compile_all(which: &[usize], arch: &str) -> Vec<Result<Ptx>> {
    std::thread::scope(|s| {
        let threads: Vec<_> = which.iter().map(|&i| s.spawn(move || compile_ptx(i, arch))).collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(Error::Cuda("the NVRTC compile thread panicked".into())))
            })
            .collect()
    })
}

fn cache_path(source: &str, arch: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let key = twox_hash::XxHash3_64::oneshot(format!("{source}\n{arch}").as_bytes());
    Some(
        base.join("flash-moe")
            .join("kernels")
            .join(format!("{key:016x}-{arch}.ptx")),
    )
}

/// Each program's module, in `PROGRAMS` order: the cached PTX where the driver accepts it,
/// else compiled (those missing side by side) and cached.
fn compile(ctx: &Arc<CudaContext>, arch: &str) -> Result<Vec<Arc<CudaModule>>> {
    let paths: Vec<_> = PROGRAMS.iter().map(|(_, source)| cache_path(source, arch)).collect();
    let mut modules: Vec<_> = paths
        .iter()
        .map(|path| {
            let src = std::fs::read_to_string(path.as_ref()?).ok()?;
            ctx.load_module(Ptx::from_src(src)).ok()
        })
        .collect();
    let missing: Vec<usize> = (0..PROGRAMS.len()).filter(|&i| modules[i].is_none()).collect();
    for (i, ptx) in missing.iter().zip(compile_all(&missing, arch)) {
        let ptx = ptx?;
        if let Some(path) = &paths[*i] {
            // A cache that cannot be written only costs the next start a compile.
            let _ = path.parent().map(std::fs::create_dir_all);
            let _ = std::fs::write(path, ptx.to_src());
        }
        let module = ctx
            .load_module(ptx)
            .map_err(|e| Error::Cuda(format!("loading the kernel module kernels/{}.cu: {e}", PROGRAMS[*i].0)))?;
        modules[*i] = Some(module);
    }
    Ok(modules.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    /// The kernel source compiles wherever NVRTC can be loaded (no GPU needed), for Turing
    /// (no tensor-core kernels), Ampere and Ada (less shared memory), Hopper and Blackwell.
    #[test]
    fn kernels_compile_with_nvrtc() {
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            // Written past the harness's output capture, so the skip shows in every log.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "kernels_compile_with_nvrtc: SKIPPED, NVRTC (libnvrtc.so) is not installed here"
            );
            return;
        }
        let all: Vec<usize> = (0..super::PROGRAMS.len()).collect();
        for arch in ["sm_75", "sm_86", "sm_90", "sm_120"] {
            for result in super::compile_all(&all, arch) {
                if let Err(e) = result {
                    panic!("{e}");
                }
            }
        }
    }
}
