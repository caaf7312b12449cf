//! chingu-proto: the wire types of the coordinator ↔ worker gRPC protocol (`pub mod pb`,
//! generated from `coordinator.proto` by `build.rs`). Nothing else lives here: coordinator and
//! worker convert these messages to their own domain types at the RPC boundary.
//!
//! Status: empty until the coordinator issue adds the protocol; the crate exists so the
//! workspace has its final shape.
