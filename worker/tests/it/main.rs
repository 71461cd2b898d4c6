//! Worker integration tests: membership on real ZooKeeper (a fresh chroot per test), on
//! the in-memory coordinator where an expiry must be forced at an exact point, and the
//! join against the real API on a fresh database.

mod join;
mod memory;
mod support;
mod zookeeper;
