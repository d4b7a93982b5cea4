//! Weight storage: turning checkpoint files into tensors. Readers for safetensors
//! checkpoints (HF and MLX layouts), the weight encodings, and the experts. Knows nothing of
//! the math.

pub mod blob;
pub mod checkpoint;
pub mod convert;
pub mod experts;
pub mod io;
pub mod layout;
pub mod npy;
pub mod packed;
pub mod quant;
pub mod quantize;
pub mod store;
pub mod synth;
pub mod write;
