//! chingu-kernels: the [`Backend`] trait the model is written against and the CPU backend
//! ([`cpu::Cpu`]), the reference implementation of every op. The CUDA backend with the
//! hand-written kernels (feature "cuda") arrives with its own issue and must agree with the
//! CPU backend op by op.

pub mod backend;
pub mod cpu;
pub mod rng;

pub use backend::{AdamW, AttentionShape, Backend, DropoutKey};
pub use cpu::Cpu;
