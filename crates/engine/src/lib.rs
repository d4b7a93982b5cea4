//! flash-moe: an inference engine for giant Mixture-of-Experts models (Qwen3.5-MoE,
//! Qwen3-Next) on machines whose memory is smaller than the model.
//!
//! Layers, each with one job, data flowing one way (tokens in, logits out):
//! - [`model`]: configuration, architecture and the forward pass, written against
//! - [`backend`]: where arithmetic happens (CPU now; CUDA slots in beside it);
//! - [`storage`]: checkpoint readers, weight encodings, experts;
//! - [`engine`]: sequences, sampling and generation loops;
//! - [`tokenizer`]: text to ids and back;
//! - [`chat`]: chat templates and the parsing of replies into reasoning, answer and tool calls.

pub mod backend;
pub mod chat;
pub mod engine;
pub mod error;
pub mod model;
pub mod storage;
pub mod tokenizer;

pub use error::{Error, Result};
