//! chingu-proto: the wire types of the coordinator/worker gRPC protocol
//! (`coordinator.proto`), generated at build time. Nothing else lives here: the coordinator
//! and the worker convert these messages to their own types at the RPC boundary.

/// Generated messages, client and server of `chingu.coordinator.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("chingu.coordinator.v1");
}
