//! chingu-worker: one training process per device. It joins the coordinator, maps its share of
//! the token shards, runs train steps, all-reduces gradients through a `Collective`, writes its
//! checkpoint parts and streams metrics.
//!
//! Status: empty until the coordinator/worker issue fills it.
