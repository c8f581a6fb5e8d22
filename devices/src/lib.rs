pub mod interrupt;
pub mod pci;
pub mod virtio;
