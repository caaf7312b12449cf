//! chingu-kernels: the [`Backend`] trait the model is written against, the CPU backend
//! ([`cpu::Cpu`]) — the reference implementation of every op — and the hand-written CUDA
//! kernels with what runs them ([`gpu`]: a real GPU with feature "cuda", our CPU emulation
//! of CUDA with feature "emu"), each checked op by op against the CPU backend.

pub mod backend;
pub mod cpu;
pub mod device_failure;
pub mod gpu;
pub mod profile;
pub mod rng;
pub mod settings;

pub use backend::{AdamW, AttentionShape, Backend, BufRole, DropoutKey, LinearGrads};
pub use cpu::Cpu;
pub use device_failure::{catch_device_failure, DeviceFailure};
