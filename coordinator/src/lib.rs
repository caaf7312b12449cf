//! chingu-coordinator: the gRPC service that owns a training job (rendezvous, rank and data
//! plan, heartbeats, restarts, checkpoints), the manifest format, and the local launcher.

pub mod launcher;
pub mod manifest;
pub mod service;
