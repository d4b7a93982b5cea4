//! A full GPU: when the sequence state needs memory the expert cache holds, the cache gives
//! experts back and the allocation succeeds; when no expert is left to give, the caller gets
//! an error that says so. Without a usable GPU the test prints why it is skipped and passes.
//!
//! Its own test binary (its own process), so that no memory pooled by other tests hides the
//! shortage. On a machine without cargo, tools/gpu-check.sh runs the prebuilt binary.

use cudarc::driver::{CudaContext, result, sys};
use flash_moe_engine::Error;
use flash_moe_engine::backend::Backend;
use flash_moe_engine::backend::cuda::{self, CudaBackend};
use flash_moe_engine::model::weights::ExpertView;
use flash_moe_engine::storage::blob::Blob;
use flash_moe_engine::storage::checkpoint::DType;
use flash_moe_engine::storage::quant::MatrixView;

const MIB: u64 = 1 << 20;

/// An f32 expert of `3 * rows * cols * 4` bytes (the values play no part here).
fn expert(rows: usize, cols: usize) -> ExpertView {
    let m = |r: usize, c: usize| {
        MatrixView::dense("w", r, c, DType::F32, Blob::from_vec(vec![1u8; 4 * r * c])).expect("an f32 matrix")
    };
    ExpertView {
        gate: m(rows, cols),
        up: m(rows, cols),
        down: m(cols, rows),
    }
}

/// Takes device memory outside the backend until less than `leave` bytes are free.
fn fill_device(b: &CudaBackend, leave: u64) -> Vec<sys::CUdeviceptr> {
    const CHUNK: u64 = 256 * MIB;
    let mut held = Vec::new();
    loop {
        let free = b.memory().expect("free memory").0 as u64;
        if free < leave {
            return held;
        }
        let size = (free - leave).clamp(2 * MIB, CHUNK);
        // SAFETY: freed with `free_sync` at the end of the test.
        match unsafe { result::malloc_sync(size as usize) } {
            Ok(ptr) => held.push(ptr),
            Err(_) => return held,
        }
    }
}

#[test]
fn a_full_gpu_gives_expert_memory_to_the_sequence_state() {
    if !cuda::is_available() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "cuda_memory: SKIPPED, no CUDA driver or no GPU on this machine"
        );
        return;
    }
    let b = CudaBackend::new(0, Some(4 << 30)).unwrap_or_else(|e| panic!("a GPU is present but unusable: {e}"));
    let ctx = CudaContext::new(0).expect("the GPU's context");
    ctx.bind_to_thread().expect("binding the context");

    // 24 experts of 48 MiB each in the VRAM cache.
    let view = expert(1024, 4096);
    for e in 0..24 {
        b.load_expert(0, e, &view).expect("loading an expert");
    }
    let before = b.expert_cache_stats().expect("a CUDA backend has an expert cache");
    assert!(before.resident_bytes >= 24 * 48 * MIB, "{before:?}");

    let held = fill_device(&b, 64 * MIB);
    // 512 MiB of state: more than is free, less than the experts hold.
    let state = b.zeros(32 << 10, 4096);
    let after = b.expert_cache_stats().expect("stats");
    let freed = before.resident_bytes - after.resident_bytes;
    eprintln!(
        "cuda_memory: {} MiB free before, the cache gave back {} MiB of {} MiB",
        b.memory().map(|m| m.0 as u64 / MIB).unwrap_or(0),
        freed / MIB,
        before.resident_bytes / MIB
    );
    assert!(state.is_ok(), "the state's allocation failed: {:?}", state.err());
    assert!(freed >= 512 * MIB, "gave back only {freed} bytes");
    assert_eq!(
        after.budget_bytes, after.resident_bytes,
        "the budget drops to what stays"
    );

    // More than every expert holds: an error, not a panic.
    match b.zeros(1 << 20, 4096) {
        Err(Error::OutOfDeviceMemory { bytes, .. }) => assert_eq!(bytes, 16 << 30),
        other => panic!("expected OutOfDeviceMemory, got {:?}", other.map(|_| ())),
    }
    let empty = b.expert_cache_stats().expect("stats");
    assert_eq!(empty.resident_bytes, 0, "every expert was given back");

    for ptr in held {
        // SAFETY: allocated by `fill_device` with `malloc_sync`, freed once.
        unsafe { result::free_sync(ptr) }.expect("freeing");
    }
}
