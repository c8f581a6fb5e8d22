pub mod e1000;
pub mod interrupt;
pub mod pci;
pub mod virtio;
