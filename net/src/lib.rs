pub mod backend; pub mod mac;
