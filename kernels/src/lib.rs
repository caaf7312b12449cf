//! chingu-kernels: the `Backend` trait the model is written against, the CPU backend (the
//! reference implementation and a usable trainer) and, behind the `cuda` feature, the CUDA
//! backend with its hand-written kernels in `kernels/cuda/*.cu`.
//!
//! Status: empty until the model and kernel issues fill it.
