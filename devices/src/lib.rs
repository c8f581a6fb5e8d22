pub mod interrupt;
pub mod pci;
