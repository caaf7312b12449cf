//! chingu-coordinator: the gRPC service that owns a job's truth (step, data cursor, seeds,
//! checkpoints, restarts), hands out ranks and shard plans, and the local launcher that starts
//! worker processes from a deploy manifest.
//!
//! Status: empty until the coordinator issue fills it.
