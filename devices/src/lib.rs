pub mod interrupt;
pub mod pci;
pub mod e1000;
