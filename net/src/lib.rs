pub mod backend;
mod counters;
pub mod log_limit;
pub mod mac;
pub mod mac_registry;
pub mod nat;
pub mod socket;
mod sys;
pub mod tap;
#[cfg(test)]
mod testutil;
