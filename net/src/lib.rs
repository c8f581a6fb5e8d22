pub mod backend;
pub mod mac;
pub mod nat;
